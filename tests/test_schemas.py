"""The committed topic contracts (schemas/) match the code, and the code's
real documents match them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from stream_app import contract, json
from stream_app.domain import ApplicationSettings
from stream_app.pipeline.processor import (
    EVENT_CHANNEL,
    ORIGIN_HEADER,
    CommandProcessor,
    Limits,
    Outgoing,
    PartitionSequenceAllocator,
    ProfileProcessor,
    SourceRecord,
    partition_for,
)
from stream_app.settings import TopicNames

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
REGENERATE = ".venv/bin/python -m stream_app.contract write schemas/"
TOPICS = TopicNames()
REKEY, PROFILES = "app-sessions.rekeyed", "app-sessions.by-profile"
KIND_OF_TOPIC = {getattr(TOPICS, kind): kind for kind in contract.OUTPUT_KINDS}


def test_committed_schemas_are_generated_from_the_code() -> None:
    stale = contract.stale_files(SCHEMAS)
    assert not stale, f"schemas/ is out of date ({', '.join(stale)}); regenerate: {REGENERATE}"


def test_descriptions_read_the_same_whatever_python_wrote_them() -> None:
    """Python 3.13 strips the indentation of docstrings, which msgspec takes
    as descriptions; 3.11 keeps it. Written on one and checked on the other,
    the files were stale, so the schemas hold each docstring dedented."""
    for name, document in contract.generate().items():
        text = document.decode()
        assert "\\n    " not in text, f"{name} holds an indented docstring"


def test_check_command_reports_stale_files(tmp_path: Path) -> None:
    assert contract.main(["write", str(tmp_path)]) == 0
    assert contract.main(["check", str(tmp_path)]) == 0
    (tmp_path / "closed.schema.json").write_text("{}")
    (tmp_path / "old.schema.json").write_text("{}")
    assert contract.stale_files(tmp_path) == ["closed.schema.json", "old.schema.json"]
    assert contract.main(["check", str(tmp_path)]) == 1
    assert contract.main(["write", str(tmp_path)]) == 0
    assert contract.stale_files(tmp_path) == []


def schema(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((SCHEMAS / f"{name}.schema.json").read_bytes())
    return document


@pytest.mark.parametrize("name", sorted(contract.SCHEMA_FILES))
def test_each_schema_is_valid_json_schema(name: str) -> None:
    jsonschema.Draft202012Validator.check_schema(schema(name))


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_asyncapi_document_names_every_topic_and_resolves_its_references() -> None:
    document = json.loads((SCHEMAS / "asyncapi.json").read_bytes())
    assert document["asyncapi"] == "3.0.0"
    for ref in _refs(document):
        assert ref.startswith("#/"), ref
        node = document
        for token in ref[2:].split("/"):
            assert token in node, f"unresolved {ref}"
            node = node[token]
    addresses = {c["address"]: c for c in document["channels"].values()}
    for name in TOPICS.model_dump().values():
        assert name in addresses
        assert not addresses[name].get("x-internal")
    internal = [c for c in document["channels"].values() if c.get("x-internal")]
    assert {c["address"] for c in internal} == {
        "{appId}-sessions.rekeyed",
        "{appId}-sessions.by-profile",
        "{appId}-sessions-changelog",
        "{appId}-session-ids-changelog",
        "{appId}-first-sessions-changelog",
    }
    for channel in document["channels"].values():
        for message in channel["messages"].values():
            target = document["components"]["messages"][message["$ref"].rsplit("/", 1)[1]]
            assert "key" in target["bindings"]["kafka"]
    # Each component schema in the AsyncAPI document is valid JSON Schema too.
    for component in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(component)
    # and an AsyncAPI 3.0 Schema Object: its discriminator is a property's name
    # (msgspec writes OpenAPI's object), and as in draft-07 nothing stands
    # beside a $ref, where it would be ignored (a return item's position-or-sku
    # rule was).
    for node in _nodes(document["components"]["schemas"]):
        assert isinstance(node.get("discriminator", ""), str), node
        assert "$ref" not in node or len(node) == 1, node


def _nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _nodes(value)
    elif isinstance(node, list):
        for value in node:
            yield from _nodes(value)


def test_contract_names_the_pipeline_s_header_and_limits() -> None:
    assert contract.ORIGIN_HEADER == ORIGIN_HEADER
    assert str(Limits().max_command_bytes) in schema("command")["description"]


def test_output_models_route_the_events_the_processor_routes() -> None:
    """Each output model allows exactly the events the pipeline sends to its topic."""
    for kind in ("closed", "returned", "cancelled", "reopened"):
        events = {e.value for e, channel in EVENT_CHANNEL.items() if channel == kind}
        allowed = set(
            schema(kind)["$defs"][contract.OUTPUT_MODELS[kind].__name__]["properties"]["event"][
                "enum"
            ]
        )
        assert allowed == events, kind


# --------------------------------------------------------------------------- real documents


class Pipeline:
    """Stage 1 and stage 2 over dict stores; collects what reaches the topics."""

    def __init__(self) -> None:
        self.stage1 = CommandProcessor(
            topics=TOPICS,
            rekey_topic=REKEY,
            profile_topic=PROFILES,
            sessions={},
            allocator=PartitionSequenceAllocator({}, 4),
            settings_for=lambda app: ApplicationSettings(flattening=app != 2),
            default_application_id=1,
            limits=Limits(max_original_bytes=4096),
        )
        self.stage2 = ProfileProcessor(topics=TOPICS, first_sessions={})
        self.offset = 0
        self.written: list[tuple[str, bytes]] = []

    def send(
        self,
        value: bytes | None,
        key: bytes | None,
        *,
        timestamp_ms: int = 1_764_000_000_000,
        topic: str = TOPICS.commands,
    ) -> None:
        self.offset += 1
        partition = partition_for(key or b"", 4)
        record = SourceRecord(topic, partition, self.offset, timestamp_ms, key, value)
        self._route(self.stage1.process(record), timestamp_ms)

    def command(self, iid: str, **fields: Any) -> None:
        self.send(json.dumps({"integrationId": iid, **fields}), iid.encode())

    def _route(self, outgoing: list[Outgoing], timestamp_ms: int) -> None:
        for out in outgoing:
            self.offset += 1
            record = SourceRecord(
                out.topic,
                partition_for(out.key or b"", 4),
                self.offset,
                timestamp_ms,
                out.key,
                out.value,
                out.headers,
            )
            if out.topic == REKEY:
                self._route(self.stage1.process(record), timestamp_ms)
            elif out.topic == PROFILES:
                self._route(self.stage2.process(record), timestamp_ms)
            else:
                self.written.append((KIND_OF_TOPIC[out.topic], out.value))


def _cart() -> list[dict[str, Any]]:
    return [
        {
            "sku": "A",
            "quantity": 3,
            "price": 19.99,
            "name": "Mug",
            "category": "kitchen",
            "product": {"name": "Mug 1"},
            "weight": 300,
            "height": 10.5,
            "width": 8,
            "length": 8,
            "attributes": {"color": "blue", "tags": ["a", {"b": None}]},
            "additionalCosts": {"wrap": {"price": 0.5}},
        },
        {"sku": "B", "quantity": 1, "price": 0},
    ]


@pytest.fixture(scope="module")
def written() -> list[tuple[str, bytes]]:
    """Every kind of output and a range of rejections, as the pipeline writes them."""
    p = Pipeline()
    full = {
        "profileId": "",
        "storeIntegrationId": "store-1",
        "couponCodes": ["C1"],
        "referralCode": "R1",
        "loyaltyCards": ["card-1"],
        "identifiers": ["", "ip-1"],
        "attributes": {"city": "Oslo", "nested": {"a": [1, 2.5, None, True]}},
        "additionalCosts": {"shipping": {"price": 4.9}, "voucher": {"price": -1}},
        "cartItems": _cart(),
    }
    p.command("s1", type="update", eventId="e1", session=full)
    p.command("s1", type="update", session={"state": "closed"})  # closed, fallback eventId
    p.command("s1", type="return", returnedCartItems=[{"position": 0, "quantity": 2}])
    p.command("s1", type="return", returnedCartItems=[{"sku": "A"}, {"position": 1}])
    p.command("s1", type="update", session={"state": "cancelled"})  # cancelled
    p.command("s2", type="update", session={"state": "closed", "cartItems": _cart()})
    p.command("s2", type="reopen")
    p.command("s2", type="update", session={"state": "closed"})
    p.command("s2", type="update", session={"state": "cancelled"})  # revoked
    p.command("s3", type="update", session={"state": "cancelled"})  # rejected: created cancelled
    p.command("s3", type="update", session={"cartItems": [{"sku": "X", "quantity": 1, "price": 1}]})
    p.command("s3", type="update", session={"state": "cancelled"})  # cancelled from open
    # profiled sessions go through stage 2
    for iid in ("p1", "p2"):
        p.command(
            iid, type="update", applicationId=2, session={"profileId": "u-1", "state": "closed"}
        )
    p.command("p1", type="reopen", applicationId=2)
    # rejections of many kinds
    p.send(b"not json", b"k1")
    p.send(None, b"k2")  # tombstone
    p.send(b"", None)  # empty value, no key
    p.send(b'{"type":"update","integrationId":"s9","session":{}}', b"s9", timestamp_ms=-5)
    p.send(b'{"type":"reopen","integrationId":"s9"}' + b" " * 5000, b"")  # re-keyed, truncated
    p.send(b"\xff\xfe" * 3000, b"k3")  # truncated, not UTF-8
    p.command("s9", type="return", returnedCartItems=[{"position": 0}])  # unknown session
    p.command("s1", type="update", session={"couponCodes": [""]})
    p.send(b'{"type":"reopen","integrationId":"s1"}', b"s1", topic=REKEY)  # no origin header
    return p.written


def test_the_scenario_writes_every_kind_and_the_expected_events(
    written: list[tuple[str, bytes]],
) -> None:
    events = [(k, json.loads(v).get("event")) for k, v in written if k != "rejected"]
    assert events == [
        ("closed", "talon_session_closed"),
        ("returned", "talon_session_partially_returned"),
        ("returned", "talon_session_partially_returned"),
        ("cancelled", "talon_session_cancelled"),
        ("closed", "talon_session_closed"),
        ("reopened", "talon_session_reopened"),
        ("closed", "talon_session_closed"),
        ("cancelled", "talon_session_revoked"),
        ("cancelled", "talon_session_cancelled"),
        ("closed", "talon_session_closed"),
        ("closed", "talon_session_closed"),
        ("reopened", "talon_session_reopened"),
    ]
    reasons = [json.loads(v)["reason"] for k, v in written if k == "rejected"]
    assert reasons == [
        "INVALID_TRANSITION",
        "MALFORMED_JSON",
        "MALFORMED_JSON",
        "MALFORMED_JSON",
        "TIMESTAMP_OUT_OF_RANGE",
        "UNKNOWN_SESSION",
        "MALFORMED_JSON",
        "UNKNOWN_SESSION",
        "SCHEMA_VIOLATION",
        "INVALID_INTERNAL_RECORD",
    ]


def test_real_documents_validate_against_the_committed_schemas(
    written: list[tuple[str, bytes]],
) -> None:
    validators = {
        kind: jsonschema.Draft202012Validator(
            schema(kind), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        for kind in contract.OUTPUT_KINDS
    }
    for kind, value in written:
        doc = json.loads(value)
        errors = [
            f"{list(e.absolute_path)}: {e.message}" for e in validators[kind].iter_errors(doc)
        ]
        assert not errors, f"{kind} record breaks schemas/{kind}.schema.json: {errors}"


def test_real_documents_pass_validate_output(written: list[tuple[str, bytes]]) -> None:
    for kind, value in written:
        contract.validate_output(kind, value)


@pytest.mark.parametrize(
    ("kind", "change", "json_schema_can_tell"),
    [
        ("closed", {"surprise": 1}, True),
        ("closed", {"event": "talon_session_cancelled"}, True),
        ("closed", {"session": {"total": "45.18"}}, True),
        ("closed", {"session": {"total": 2.0**63}}, True),
        # 1.0 is an integer to JSON Schema, not to the contract (nor to msgspec).
        ("closed", {"session": {"updateCount": 1.0}}, False),
        ("closed", {"occurredAt": "2026-11-25 10:00:00"}, True),
        ("returned", {"return": None}, True),
        ("rejected", {"reason": "NOT_A_REASON"}, True),
        ("rejected", {"valueSha256": "ABC"}, True),
    ],
)
def test_documents_off_contract_are_refused(
    written: list[tuple[str, bytes]],
    kind: str,
    change: dict[str, Any],
    json_schema_can_tell: bool,
) -> None:
    doc = json.loads(next(v for k, v in written if k == kind))
    for field, value in change.items():
        if isinstance(value, dict):
            doc[field] = {**doc[field], **value}
        else:
            doc[field] = value
    with pytest.raises(contract.ContractViolationError):
        contract.validate_output(kind, json.dumps(doc))
    valid = jsonschema.Draft202012Validator(schema(kind)).is_valid(doc)
    assert valid is not json_schema_can_tell


def test_validate_output_names_unknown_kinds() -> None:
    with pytest.raises(contract.ContractViolationError, match="no output topic kind"):
        contract.validate_output("commands", b"{}")


def test_internal_records_validate_against_their_schemas() -> None:
    """Stage 1's envelopes, origin headers and stored sessions, as it writes them."""
    p = Pipeline()
    stage1 = p.stage1
    closed = json.dumps(
        {
            "type": "update",
            "integrationId": "p1",
            "session": {"profileId": "u-1", "state": "closed", "cartItems": _cart()},
        }
    )
    key = b"p1"
    record = SourceRecord(TOPICS.commands, partition_for(key, 4), 1, 1_764_000_000_000, key, closed)
    envelopes = [json.loads(o.value) for o in stage1.process(record) if o.topic == PROFILES]
    assert [e["kind"] for e in envelopes] == ["claim", "emit"]
    by_profile = jsonschema.Draft202012Validator(schema("internal-by-profile"))
    for envelope in envelopes:
        assert by_profile.is_valid(envelope), envelope
    stored = jsonschema.Draft202012Validator(schema("internal-stored-session"))
    for value in stage1.sessions.values():
        assert stored.is_valid(json.loads(value))
    miskeyed = SourceRecord(TOPICS.commands, 0, 2, 1_764_000_000_000, b"other", closed)
    (rekeyed,) = stage1.process(miskeyed)
    assert rekeyed.topic == REKEY
    origin = jsonschema.Draft202012Validator(schema("internal-origin-header"))
    ((name, header),) = rekeyed.headers
    assert name == "stream-app-origin"
    assert origin.is_valid(json.loads(header))


def test_asyncapi_rewriting_leaves_property_names_and_data_alone() -> None:
    """Fields named like keywords, examples, and a $ref beside an allOf."""
    schema = {
        "type": "object",
        "properties": {
            "discriminator": {"type": "string"},
            "$ref": {"type": "string", "examples": [{"$ref": 1, "z": 1}]},
            "tagged": {"oneOf": [], "discriminator": {"propertyName": "kind"}},
            "both": {"$ref": "#/a", "allOf": [{"$ref": "#/b"}], "description": "x"},
        },
        "required": ["discriminator", "$ref"],
    }
    rewritten = contract._asyncapi_schema(schema)
    properties = rewritten["properties"]
    assert properties["discriminator"] == {"type": "string"}
    assert properties["$ref"] == {"type": "string", "examples": [{"$ref": 1, "z": 1}]}
    assert properties["tagged"] == {"oneOf": []}
    assert properties["both"] == {
        "allOf": [{"$ref": "#/a"}, {"$ref": "#/b"}],
        "description": "x",
    }
    assert rewritten["required"] == ["discriminator", "$ref"]
