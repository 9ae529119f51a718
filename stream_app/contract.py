"""The topic contracts: models of every record the workers read and write.

The models below describe the records on each topic with the contract's
camelCase names; ``schemas/`` holds the JSON Schemas and the AsyncAPI 3.0
document generated from them (``docs/contract.md`` explains them in prose)::

    python -m stream_app.contract write schemas/   # regenerate the committed files
    python -m stream_app.contract check schemas/   # exit 1 when they are out of date

They are generated, never edited by hand: the limits come from the domain's
constants (``stream_app.domain.decoding``), the enumerations from its enums
(:class:`~stream_app.domain.Reason`, :class:`~stream_app.domain.SessionState`),
the stored session from the domain's own :class:`~stream_app.domain.Session`.
Tests keep the models true to the code: the documents that
``output_document`` and ``rejection_document`` produce must validate against
the schemas, and the committed files must equal a fresh generation.

Command models are *open* (unknown fields are ignored by the workers, and
``null`` means absent); output models are *closed* (a consumer may rely on
every field listed, and on no other). :func:`validate_output` checks one
output record strictly, e.g. in a consumer's tests or the integration tests.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from stream_app import __version__
from stream_app.domain import Reason, Session, SessionState
from stream_app.domain.decoding import (
    INT32_MAX,
    MAX_CART_ITEMS,
    MAX_COMMAND_DEPTH,
    MAX_IDENTIFIERS,
    MAX_LOYALTY_CARDS,
    MAX_RETURN_ITEMS,
)
from stream_app.domain.numbers import MONEY_LIMIT
from stream_app.errors import StreamAppError
from stream_app.settings import Settings, TopicNames

__all__ = [
    "OUTPUT_KINDS",
    "CancelledRecord",
    "ClosedRecord",
    "CommandRecord",
    "ContractViolationError",
    "RejectionRecord",
    "ReopenedRecord",
    "ReturnedRecord",
    "generate",
    "main",
    "validate_output",
]

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"

#: ``stream_app.pipeline.processor.ORIGIN_HEADER`` (a test keeps them equal):
#: named here so that consumers of this module need not import the pipeline.
ORIGIN_HEADER: Final = "stream-app-origin"
_MAX_COMMAND_BYTES: Final = Settings.model_fields["max_command_bytes"].default

# --------------------------------------------------------------------------- field types

Int32Id = Annotated[int, msgspec.Meta(ge=1, le=INT32_MAX)]
IntegrationId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=1000, description="The session's key.")
]
EventId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=255,
        description="Idempotency key (Talon.One's Idempotency-Key): a command whose eventId "
        "was among the session's last 64 applied event ids is a duplicate.",
    ),
]
ProfileId = Annotated[
    str, msgspec.Meta(max_length=1000, description='"" (or absent) is an anonymous session.')
]
StoreIntegrationId = Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
CouponCode = Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
ReferralCode = Annotated[str, msgspec.Meta(max_length=100)]
LoyaltyCard = Annotated[
    str, msgspec.Meta(min_length=4, max_length=108, pattern="^[A-Za-z0-9._%+@-]+$")
]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Position = Annotated[int, msgspec.Meta(ge=0, description="0-based index in the cart as last sent.")]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
Dimension = Annotated[float, msgspec.Meta(ge=0)]
Price = Annotated[float, msgspec.Meta(ge=0, lt=MONEY_LIMIT)]
CostPrice = Annotated[float, msgspec.Meta(ge=-MONEY_LIMIT, lt=MONEY_LIMIT)]
Money = Annotated[
    float,
    msgspec.Meta(
        ge=-MONEY_LIMIT,
        lt=MONEY_LIMIT,
        description="An exact decimal amount written as a JSON number: an integer when "
        "integral, otherwise the shortest decimal that reads back as the same double "
        "(0.1 + 0.2 is written 0.3).",
    ),
]
_TIMESTAMP_PATTERN: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
Timestamp = Annotated[
    str,
    msgspec.Meta(
        pattern=_TIMESTAMP_PATTERN,
        extra_json_schema={"format": "date-time"},
        description="RFC 3339 UTC with milliseconds, from a Kafka record timestamp "
        "(1970-01-01T00:00:00.000Z .. 9999-12-31T23:59:59.999Z).",
    ),
]
AnyTimestamp = Annotated[
    str, msgspec.Meta(pattern=_TIMESTAMP_PATTERN, extra_json_schema={"format": "date-time"})
]
Base64 = Annotated[
    str,
    msgspec.Meta(
        pattern="^[A-Za-z0-9+/]*={0,2}$",
        extra_json_schema={"contentEncoding": "base64"},
    ),
]
Sha256Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
Attributes = Annotated[dict[str, Any], msgspec.Meta(description="Any JSON object.")]


# --------------------------------------------------------------------------- commands


class AdditionalCostInput(msgspec.Struct, frozen=True):
    """An additional cost: a price, which may be negative (a discount line)."""

    price: CostPrice


class ProductInput(msgspec.Struct, frozen=True):
    name: str


class CartItemInput(msgspec.Struct, frozen=True, rename="camel"):
    """One cart line. ``position``, ``returnedQuantity`` and ``remainingQuantity``
    are computed by the processor and ignored when sent."""

    sku: Annotated[str, msgspec.Meta(min_length=1)]
    quantity: Quantity
    price: Price
    name: str | None = None
    category: str | None = None
    product: ProductInput | None = None
    weight: Dimension | None = None
    height: Dimension | None = None
    width: Dimension | None = None
    length: Dimension | None = None
    attributes: Attributes | None = None
    additional_costs: dict[str, AdditionalCostInput] | None = None


class SessionInput(msgspec.Struct, frozen=True, rename="camel"):
    """The ``session`` of an update (NewCustomerSessionV2). A field present replaces
    the stored one, an absent (or ``null``) field keeps it; ``attributes`` are merged
    key by key and a ``null`` attribute value removes that key."""

    profile_id: ProfileId | None = None
    store_integration_id: StoreIntegrationId | None = None
    coupon_codes: list[CouponCode] | None = None
    referral_code: ReferralCode | None = None
    loyalty_cards: (
        Annotated[list[LoyaltyCard], msgspec.Meta(max_length=MAX_LOYALTY_CARDS)] | None
    ) = None
    state: SessionState | None = None
    cart_items: (
        Annotated[
            list[CartItemInput],
            msgspec.Meta(
                max_length=MAX_CART_ITEMS,
                description="Replaces the whole cart. With flattening on, the quantities "
                "may sum to at most 10000.",
            ),
        ]
        | None
    ) = None
    additional_costs: dict[str, AdditionalCostInput] | None = None
    identifiers: Annotated[list[str], msgspec.Meta(max_length=MAX_IDENTIFIERS)] | None = None
    attributes: Attributes | None = None


class UpdateCommand(msgspec.Struct, frozen=True, rename="camel", tag_field="type", tag="update"):
    """Create or update a session (Talon.One's updateCustomerSessionV2)."""

    integration_id: IntegrationId
    session: SessionInput
    event_id: EventId | None = None
    application_id: Int32Id | None = None


_POSITION_OR_SKU: Final = {
    "anyOf": [
        {"properties": {"position": {"type": "integer"}}, "required": ["position"]},
        {"properties": {"sku": {"type": "string"}}, "required": ["sku"]},
    ]
}


class ReturnedCartItemInput(msgspec.Struct, frozen=True):
    """A line to return, by ``position`` and/or ``sku`` (both must then name the same
    line); no ``quantity`` returns all that remains of the line."""

    position: NonNegativeInt | None = None
    sku: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    quantity: Quantity | None = None


class ReturnCommand(msgspec.Struct, frozen=True, rename="camel", tag_field="type", tag="return"):
    """Return cart items of a closed or partially returned session (returnCartItems)."""

    integration_id: IntegrationId
    returned_cart_items: Annotated[
        list[Annotated[ReturnedCartItemInput, msgspec.Meta(extra_json_schema=_POSITION_OR_SKU)]],
        msgspec.Meta(min_length=1, max_length=MAX_RETURN_ITEMS),
    ]
    event_id: EventId | None = None
    application_id: Int32Id | None = None


class ReopenCommand(msgspec.Struct, frozen=True, rename="camel", tag_field="type", tag="reopen"):
    """Reopen a closed session (reopenCustomerSession)."""

    integration_id: IntegrationId
    event_id: EventId | None = None
    application_id: Int32Id | None = None


CommandRecord = Annotated[
    UpdateCommand | ReturnCommand | ReopenCommand,
    msgspec.Meta(
        title="CommandRecord",
        description="The value of a record on the command topic, keyed by integrationId. "
        "Unknown fields are ignored; null means absent. Limits that JSON Schema cannot "
        f"state: at most {_MAX_COMMAND_BYTES} bytes by default, arrays and objects "
        f"nested at most {MAX_COMMAND_DEPTH} levels (the command being level 1), totals "
        "that can be written exactly, and the checks that depend on the stored session "
        "or the application settings.",
    ),
]


class ApplicationSettingsRecord(msgspec.Struct, frozen=True, rename="camel"):
    """Settings of one application (key: the applicationId as decimal text; a
    tombstone removes them). Absent or null keys take the default."""

    flattening: bool | None = None
    additional_costs: list[str] | None = None
    attributes: list[str] | None = None


# --------------------------------------------------------------------------- outputs


class AdditionalCostDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    price: Money


class ProductDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str


class CartItemDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """A cart line as stored; optional fields appear only when they were sent."""

    position: Position
    sku: Annotated[str, msgspec.Meta(min_length=1)]
    quantity: Quantity
    returned_quantity: NonNegativeInt
    remaining_quantity: NonNegativeInt
    price: Price
    name: str | msgspec.UnsetType = msgspec.UNSET
    category: str | msgspec.UnsetType = msgspec.UNSET
    product: ProductDocument | msgspec.UnsetType = msgspec.UNSET
    weight: Dimension | msgspec.UnsetType = msgspec.UNSET
    height: Dimension | msgspec.UnsetType = msgspec.UNSET
    width: Dimension | msgspec.UnsetType = msgspec.UNSET
    length: Dimension | msgspec.UnsetType = msgspec.UNSET
    attributes: Attributes | msgspec.UnsetType = msgspec.UNSET
    additional_costs: dict[str, AdditionalCostDocument] | msgspec.UnsetType = msgspec.UNSET


class SessionDocument(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel", kw_only=True
):
    """The whole session after the command (CustomerSessionV2)."""

    id: Int32Id
    created: Timestamp
    integration_id: IntegrationId
    application_id: Int32Id
    profile_id: ProfileId
    store_integration_id: StoreIntegrationId | msgspec.UnsetType = msgspec.UNSET
    coupon_codes: list[CouponCode]
    referral_code: ReferralCode
    loyalty_cards: Annotated[list[LoyaltyCard], msgspec.Meta(max_length=MAX_LOYALTY_CARDS)]
    state: SessionState
    cart_items: Annotated[list[CartItemDocument], msgspec.Meta(max_length=MAX_CART_ITEMS)]
    additional_costs: dict[str, AdditionalCostDocument]
    identifiers: Annotated[list[str], msgspec.Meta(max_length=MAX_IDENTIFIERS)]
    attributes: Attributes
    first_session: bool
    total: Money
    cart_item_total: Money
    additional_cost_total: Money
    cart_item_additional_cost_total: Money
    update_count: Annotated[int, msgspec.Meta(ge=1)]
    updated: Timestamp


OutputEventId = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        description="The command's eventId, or <topic>-<partition>-<offset> of the command "
        "record when it had none.",
    ),
]


class ClosedRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """A session was closed (also when it was created closed). Key: integrationId."""

    event: Literal["talon_session_closed"]
    event_id: OutputEventId
    occurred_at: Timestamp
    application_id: Int32Id
    integration_id: IntegrationId
    session: SessionDocument


class ReturnedLineDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    position: Position
    sku: str
    quantity: Quantity
    value: Annotated[
        Money, msgspec.Meta(description="quantity x (price + the line's additional cost prices)")
    ]


class ReturnDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What this return command returned, by position, and its value."""

    lines: list[ReturnedLineDocument]
    value: Money


class ReturnedRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """Cart items of a closed session were returned. Key: integrationId. The session
    totals are those of the cart as sent; ``return`` says what this command returned."""

    event: Literal["talon_session_partially_returned"]
    event_id: OutputEventId
    occurred_at: Timestamp
    application_id: Int32Id
    integration_id: IntegrationId
    session: SessionDocument
    return_: ReturnDocument = msgspec.field(name="return")


class CancelledRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """A session was cancelled: ``talon_session_cancelled`` from open or partially
    returned, ``talon_session_revoked`` from closed. Key: integrationId."""

    event: Literal["talon_session_cancelled", "talon_session_revoked"]
    event_id: OutputEventId
    occurred_at: Timestamp
    application_id: Int32Id
    integration_id: IntegrationId
    session: SessionDocument


class ReopenedRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """A closed session was reopened: take back what its close counted. Key: integrationId."""

    event: Literal["talon_session_reopened"]
    event_id: OutputEventId
    occurred_at: Timestamp
    application_id: Int32Id
    integration_id: IntegrationId
    session: SessionDocument


class ErrorSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pointer: Annotated[
        str,
        msgspec.Meta(description='RFC 6901 pointer into the command ("" for the whole record).'),
    ]


class ErrorDocument(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    title: str
    details: str
    source: ErrorSource


class RecordSource(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the rejected record first arrived (before any re-keying)."""

    topic: str
    partition: NonNegativeInt
    offset: NonNegativeInt


class RejectionRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, rename="camel"):
    """A record that was not applied, with its reason and its original bytes.
    Key: the original record's key (absent when it had none); its first 1/64 of
    the record limit when the rejection would not fit otherwise."""

    reason: Reason
    message: str
    errors: Annotated[list[ErrorDocument], msgspec.Meta(min_length=1)]
    source: RecordSource
    received_at: Annotated[
        AnyTimestamp | None,
        msgspec.Meta(
            description="The record's timestamp (also when out of range, then possibly "
            "before 1970); null when it is no date of the years 1..9999."
        ),
    ]
    key_base64: Annotated[
        Base64 | None,
        msgspec.Meta(
            description="The original key (a prefix when keyTruncated); null when it had none."
        ),
    ]
    key_truncated: Annotated[
        bool, msgspec.Meta(description="keyBase64 holds only a prefix of the original key.")
    ]
    value_base64: Annotated[
        Base64 | None,
        msgspec.Meta(
            description="The original value (a prefix when valueTruncated); null for a "
            "tombstone, empty for an empty value."
        ),
    ]
    value_length: Annotated[
        NonNegativeInt | None, msgspec.Meta(description="Bytes in the whole original value.")
    ]
    value_sha256: Annotated[
        Sha256Hex | None, msgspec.Meta(description="SHA-256 of the whole original value (hex).")
    ]
    value_truncated: bool
    command: Annotated[
        Any,
        msgspec.Meta(
            description="For convenience only: the value parsed as JSON, when it is JSON "
            "and was kept whole. valueBase64 is the record."
        ),
    ] = msgspec.UNSET


# --------------------------------------------------------------------------- internal


class ClaimEnvelope(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    rename="camel",
    tag_field="kind",
    tag="claim",
):
    """Stage 1 -> stage 2: this session now has this key's profile."""

    integration_id: IntegrationId


class EmitEnvelope(
    msgspec.Struct,
    frozen=True,
    forbid_unknown_fields=True,
    rename="camel",
    tag_field="kind",
    tag="emit",
):
    """Stage 1 -> stage 2: an output of a profiled session; stage 2 sets
    ``output.session.firstSession`` and writes ``output`` to ``channel``'s topic."""

    channel: Literal["closed", "returned", "cancelled", "reopened"]
    integration_id: IntegrationId
    output: Annotated[
        dict[str, Any],
        msgspec.Meta(description="The output record, as on the channel's topic."),
    ]


ProfileEnvelope = Annotated[
    ClaimEnvelope | EmitEnvelope,
    msgspec.Meta(
        title="ProfileEnvelope",
        description="A record on the internal by-profile topic, keyed by "
        "<applicationId>\\u001f<profileId>. Written by the worker only.",
    ),
]


class OriginHeader(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``stream-app-origin`` header of a re-keyed record: where it first arrived.
    Honoured on the internal re-key topic only."""

    topic: Annotated[str, msgspec.Meta(min_length=1, max_length=249)]
    partition: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)]
    offset: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
    timestamp: Annotated[int, msgspec.Meta(ge=0, le=253_402_300_799_999)]
    key: Base64 | None


# --------------------------------------------------------------------------- validation

#: Output topic kinds (TopicNames fields) and the model of their records.
OUTPUT_MODELS: Final[dict[str, type[msgspec.Struct]]] = {
    "closed": ClosedRecord,
    "returned": ReturnedRecord,
    "cancelled": CancelledRecord,
    "reopened": ReopenedRecord,
    "rejected": RejectionRecord,
}
OUTPUT_KINDS: Final = tuple(OUTPUT_MODELS)

_DECODERS: Final = {kind: msgspec.json.Decoder(model) for kind, model in OUTPUT_MODELS.items()}


class ContractViolationError(StreamAppError):
    """A record that does not match its topic's contract."""


def validate_output(topic_kind: str, value: bytes) -> msgspec.Struct:
    """Check one output record against its topic's model, strictly; return it decoded.

    ``topic_kind`` is a :class:`~stream_app.settings.TopicNames` field name:
    ``closed``, ``returned``, ``cancelled``, ``reopened`` or ``rejected``.
    Raises :class:`ContractViolationError` naming the offending path.
    """
    decoder = _DECODERS.get(topic_kind)
    if decoder is None:
        raise ContractViolationError(f"no output topic kind {topic_kind!r}")
    try:
        decoded: msgspec.Struct = decoder.decode(value)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ContractViolationError(f"{topic_kind} record: {exc}") from exc
    return decoded


# --------------------------------------------------------------------------- generation

#: schemas/<name>.schema.json -> (model, description of the file)
SCHEMA_FILES: Final[dict[str, Any]] = {
    "command": CommandRecord,
    "closed": ClosedRecord,
    "returned": ReturnedRecord,
    "cancelled": CancelledRecord,
    "reopened": ReopenedRecord,
    "rejected": RejectionRecord,
    "application-settings": ApplicationSettingsRecord,
    "internal-by-profile": ProfileEnvelope,
    "internal-origin-header": OriginHeader,
    "internal-stored-session": Session,
}

_KAFKA_BINDING: Final = "0.5.0"


def _schema_document(name: str, model: Any) -> dict[str, Any]:
    schema = _clean_descriptions(msgspec.json.schema(model))
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        **schema,
    }


def _channel(
    address: str,
    description: str,
    message: str,
    *,
    internal: bool = False,
    compacted: bool = False,
    co_partitioned: bool = False,
) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": address,
        "description": description,
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
    }
    if "{appId}" in address:
        channel["parameters"] = {"appId": {"$ref": "#/components/parameters/appId"}}
    config: dict[str, Any] = {"cleanup.policy": ["compact" if compacted else "delete"]}
    binding: dict[str, Any] = {"topicConfiguration": config, "bindingVersion": _KAFKA_BINDING}
    if co_partitioned:
        binding["x-partitions"] = "the command topic's partition count"
    channel["bindings"] = {"kafka": binding}
    if internal:
        channel["tags"] = [{"name": "internal"}]
        channel["x-internal"] = True
    return channel


def _message(
    title: str,
    payload: Any,
    key: Mapping[str, Any],
    *,
    headers: Mapping[str, Any] | None = None,
    content_type: str = "application/json",
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "title": title,
        "contentType": content_type,
        "payload": payload,
        "bindings": {"kafka": {"key": dict(key), "bindingVersion": _KAFKA_BINDING}},
    }
    if headers is not None:
        message["headers"] = dict(headers)
    return message


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


#: Keywords whose value maps names to schemas (the names are not keywords).
_SCHEMA_MAPS: Final = frozenset({"properties", "patternProperties", "$defs", "dependentSchemas"})
#: Keywords whose value is data, not a schema.
_DATA: Final = frozenset({"examples", "default", "const", "enum"})


def _each_schema(node: Any, fix: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """``node`` with ``fix`` applied to each of its objects, innermost first:
    the names of a map of schemas (``properties``) are no keywords, and data
    (``examples``, ``const``) is left as it is."""
    if isinstance(node, list):
        return [_each_schema(item, fix) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DATA:
            out[key] = value
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _each_schema(schema, fix) for name, schema in value.items()}
        else:
            out[key] = _each_schema(value, fix)
    return fix(out)


def _clean_descriptions(node: Any) -> Any:
    """``node`` with every schema's description as :func:`inspect.cleandoc`
    leaves it. msgspec takes a class's docstring as it is, and Python 3.13
    strips the indentation of docstrings where 3.11 and 3.12 keep it: the
    files must be the same whatever Python writes them."""
    return _each_schema(node, _cleaned)


def _cleaned(schema: dict[str, Any]) -> dict[str, Any]:
    if isinstance(schema.get("description"), str):
        schema["description"] = inspect.cleandoc(schema["description"])
    return schema


def _asyncapi_schema(node: Any) -> Any:
    """``node`` as AsyncAPI 3.0 takes it (:func:`_for_asyncapi`)."""
    return _each_schema(node, _for_asyncapi)


def _for_asyncapi(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema object of msgspec's as AsyncAPI 3.0's Schema Object takes
    it: without OpenAPI's ``discriminator`` object (AsyncAPI's is a property
    name, which must be a required property of the schema itself: the
    ``oneOf`` and its tags discriminate anyway), and, draft-07 ignoring what
    stands beside a ``$ref``, a ``$ref`` with other keywords put in an
    ``allOf``. Its description cleaned, as in the schema files."""
    schema = _cleaned(schema)
    if isinstance(schema.get("discriminator"), dict):
        del schema["discriminator"]
    if "$ref" in schema and len(schema) > 1:
        ref = schema.pop("$ref")
        schema["allOf"] = [{"$ref": ref}, *schema.get("allOf", [])]
    return schema


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the worker: the topics it reads and writes."""
    topics = TopicNames()
    models = list(SCHEMA_FILES.values())
    top, components = msgspec.json.schema_components(
        models, ref_template="#/components/schemas/{name}"
    )
    schemas: dict[str, Any] = dict(components)
    for name, schema in zip(SCHEMA_FILES, top, strict=True):
        if "$ref" not in schema:  # the tagged unions: name them
            schemas[str(schema.get("title", name))] = schema
    schemas = {name: _asyncapi_schema(schema) for name, schema in schemas.items()}
    by_integration_id = {
        "type": "string",
        "description": "The command's integrationId, UTF-8. Kafka's default partitioner "
        "(murmur2) must place it: librdkafka clients set partitioner=murmur2_random, "
        "Sarama needs a murmur2 partitioner, kafka-go's Writer Murmur2Balancer.",
    }
    outputs = {
        "closed": ("talon_session_closed", "ClosedRecord"),
        "returned": ("talon_session_partially_returned", "ReturnedRecord"),
        "cancelled": ("talon_session_cancelled, talon_session_revoked", "CancelledRecord"),
        "reopened": ("talon_session_reopened", "ReopenedRecord"),
    }
    output_key = {"type": "string", "description": "The session's integrationId, UTF-8."}
    messages: dict[str, Any] = {
        "command": _message("A session command", _ref("CommandRecord"), by_integration_id),
        "rejection": _message(
            "A rejected record",
            _ref("RejectionRecord"),
            {
                "type": ["string", "null"],
                "description": "The rejected record's own key, as sent: its bytes, which "
                "need not be UTF-8 (a prefix of a key of many KB, which may end inside a "
                "character: docs/contract.md, section 11).",
            },
        ),
        "applicationSettings": _message(
            "Settings of one application (a tombstone removes them)",
            _ref("ApplicationSettingsRecord"),
            {
                "type": "string",
                "pattern": "^[1-9][0-9]{0,9}$",
                "description": "The applicationId written plainly, 1..2147483647 (a record "
                "keyed otherwise, 07 say, is ignored).",
            },
        ),
        "rekeyedCommand": _message(
            "A command that arrived with another key, re-keyed by its integrationId",
            _ref("CommandRecord"),
            output_key,
            headers={
                "type": "object",
                "properties": {
                    ORIGIN_HEADER: {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": _ref("OriginHeader"),
                    }
                },
                "required": [ORIGIN_HEADER],
            },
        ),
        "profileEnvelope": _message(
            "A claim or an output of a profiled session",
            _ref("ProfileEnvelope"),
            {"type": "string", "description": "<applicationId>\\u001f<profileId>, UTF-8."},
        ),
        "storedSession": _message(
            "The stored form of a session (snake_case, decimals as strings)",
            _ref("Session"),
            {"type": "string", "description": "<applicationId>\\u001f<integrationId>, UTF-8."},
        ),
        "sessionIdCounter": _message(
            "How many sessions a partition has created",
            {"type": "string", "pattern": "^[0-9]+$"},
            {"type": "string", "pattern": "^p[0-9]+$", "description": "p<partition>"},
            content_type="text/plain",
        ),
        "firstSession": _message(
            "The first session that claimed a profile",
            {"type": "string", "description": "its integrationId, UTF-8"},
            {"type": "string", "description": "<applicationId>\\u001f<profileId>, UTF-8."},
            content_type="text/plain",
        ),
    }
    channels: dict[str, Any] = {
        "commands": _channel(
            topics.commands,
            "Session commands from checkout systems. Key every record by integrationId; "
            "records keyed otherwise are re-keyed and lose their order.",
            "command",
            co_partitioned=True,
        ),
        "rejected": _channel(
            topics.rejected, "Every record that was not applied, with its reason.", "rejection"
        ),
        "applicationSettings": _channel(
            topics.application_settings,
            "Per-application settings, read whole by every worker.",
            "applicationSettings",
            compacted=True,
        ),
    }
    operations: dict[str, Any] = {
        "receiveCommands": {"action": "receive", "channel": {"$ref": "#/channels/commands"}},
        "sendRejections": {"action": "send", "channel": {"$ref": "#/channels/rejected"}},
        "receiveApplicationSettings": {
            "action": "receive",
            "channel": {"$ref": "#/channels/applicationSettings"},
        },
    }
    for kind, (events, model) in outputs.items():
        name = f"{kind}Session"
        messages[name] = _message(f"Event {events}", _ref(model), output_key)
        channels[kind] = _channel(
            getattr(topics, kind), f"Downstream: {events}, keyed by integrationId.", name
        )
        operations[f"send{kind.capitalize()}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{kind}"},
        }
    internal = {
        "rekeyed": (
            "{appId}-sessions.rekeyed",
            "Commands re-keyed by integrationId. Only the worker may write it.",
            "rekeyedCommand",
            False,
        ),
        "byProfile": (
            "{appId}-sessions.by-profile",
            "Stage 2 input, keyed by profile. Only the worker may write it.",
            "profileEnvelope",
            False,
        ),
        "sessionsChangelog": (
            "{appId}-sessions-changelog",
            "Changelog of the sessions store.",
            "storedSession",
            True,
        ),
        "sessionIdsChangelog": (
            "{appId}-session-ids-changelog",
            "Changelog of the per-partition session id counters.",
            "sessionIdCounter",
            True,
        ),
        "firstSessionsChangelog": (
            "{appId}-first-sessions-changelog",
            "Changelog of the first session of each profile.",
            "firstSession",
            True,
        ),
    }
    for name, (address, description, message, compacted) in internal.items():
        channels[name] = _channel(
            address, description, message, internal=True, compacted=compacted, co_partitioned=True
        )
        operations[f"send_{name}"] = {"action": "send", "channel": {"$ref": f"#/channels/{name}"}}
        operations[f"receive_{name}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{name}"},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "stream-app customer sessions",
            "version": __version__,
            "description": "The topics a stream-app worker reads and writes (see "
            "docs/contract.md). Topic names are the defaults; every public one is "
            "configurable (STREAM_APP_TOPICS__*). Channels tagged internal belong to "
            "the worker: only its principal may write them.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "messages": messages,
            "parameters": {
                "appId": {
                    "default": "stream-app",
                    "description": "The worker's STREAM_APP_APP_ID.",
                }
            },
        },
    }


def _pretty(document: Any) -> bytes:
    return msgspec.json.format(msgspec.json.encode(document), indent=2) + b"\n"


def generate() -> dict[str, bytes]:
    """Every file of ``schemas/``, by file name, as it must be committed."""
    files = {
        f"{name}.schema.json": _pretty(_schema_document(name, model))
        for name, model in SCHEMA_FILES.items()
    }
    files["asyncapi.json"] = _pretty(asyncapi_document())
    return files


def stale_files(directory: Path) -> list[str]:
    """Files of ``directory`` that differ from a fresh generation (or are missing/extra)."""
    expected = generate()
    present = {p.name for p in directory.glob("*.json")} if directory.is_dir() else set()
    stale = [
        name
        for name, content in expected.items()
        if name not in present or (directory / name).read_bytes() != content
    ]
    return sorted(stale + [name for name in present if name not in expected])


def _write(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    expected = generate()
    for name in stale_files(directory):
        target = directory / name
        if name in expected:
            target.write_bytes(expected[name])
        else:
            target.unlink()


def main(argv: list[str] | None = None) -> int:
    """``write DIR`` regenerates the files; ``check DIR`` exits 1 when they are stale."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in {"write", "check"}:
        sys.stderr.write("usage: python -m stream_app.contract {write|check} DIRECTORY\n")
        return 2
    directory = Path(args[1])
    if args[0] == "write":
        _write(directory)
        return 0
    stale = stale_files(directory)
    if stale:
        sys.stderr.write(
            f"out of date: {', '.join(stale)}; run: python -m stream_app.contract write "
            f"{directory}\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
