"""Wire forms: the stored session, and the documents emitted downstream.

Stored form (:func:`encode_session` / :func:`decode_session`): msgspec JSON of
the :class:`~stream_app.domain.model.Session` struct, snake_case field names,
decimals as strings (exact), including ``recent_event_ids``; a field at its
default (``null``, ``0``, empty) is left out and read back as that default
(a typical 10-line session: 1.8 KB instead of 3 KB; sessions stored with
every field written are read the same). It is an internal
format of the state table, not a contract with consumers. msgspec is used
here because it encodes and type-checks the nested structs in one C call
(measured in ``bench/domain_bench.py``); everything parsed from or written to
Kafka by the pipeline goes through ``stream_app.json``.

Emitted documents (:func:`session_document`, :func:`output_document`,
:func:`rejection_document`) are plain dicts with the spec's camelCase names,
ready for ``stream_app.json.dumps``. Money is emitted by
:func:`~stream_app.domain.numbers.json_number`: an integer when integral,
otherwise the float nearest the exact decimal, which orjson prints in its
shortest form (0.1 + 0.2 prints ``0.3``). Optional fields never set (e.g.
``storeIntegrationId``, an item's ``name``) are omitted.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import msgspec

from stream_app.domain.model import CartItem, Rejection, Session, SessionEvent
from stream_app.domain.numbers import json_number
from stream_app.json import dumps, loads

__all__ = [
    "MAX_ORIGINAL_BYTES",
    "decode_session",
    "encode_session",
    "format_timestamp",
    "output_document",
    "rejection_document",
    "session_document",
]

_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(Session)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def encode_session(session: Session) -> bytes:
    """The stored form of ``session`` (full fidelity)."""
    return _ENCODER.encode(session)


def decode_session(data: bytes) -> Session:
    """Exact inverse of :func:`encode_session`.

    Raises ``msgspec.ValidationError``/``msgspec.DecodeError`` (both
    ``ValueError``) for bytes that are not a stored session.
    """
    return _DECODER.decode(data)


def format_timestamp(timestamp_ms: int) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-25T19:46:53.123Z``.

    Raises ``OverflowError`` outside years 1..9999.
    """
    seconds, millis = divmod(timestamp_ms, 1000)
    return f"{_format_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4096)
def _format_second(seconds: int) -> str:
    # Records of one batch share their seconds: formatting a datetime is the
    # slow part, so it is done once per second.
    # isoformat pads the year to four digits (strftime's %Y does not on glibc:
    # year 1 was "1-01-01").
    return (_EPOCH + timedelta(seconds=seconds)).replace(tzinfo=None).isoformat()


def _cart_item_document(item: CartItem) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "position": item.position,
        "sku": item.sku,
        "quantity": item.quantity,
        "returnedQuantity": item.returned_quantity,
        "remainingQuantity": item.quantity - item.returned_quantity,
        "price": json_number(item.price),
    }
    if item.name is not None:
        doc["name"] = item.name
    if item.category is not None:
        doc["category"] = item.category
    if item.product is not None:
        doc["product"] = {"name": item.product.name}
    if item.weight is not None:
        doc["weight"] = item.weight
    if item.height is not None:
        doc["height"] = item.height
    if item.width is not None:
        doc["width"] = item.width
    if item.length is not None:
        doc["length"] = item.length
    if item.attributes is not None:
        doc["attributes"] = item.attributes
    if item.additional_costs is not None:
        doc["additionalCosts"] = {
            name: {"price": json_number(cost.price)} for name, cost in item.additional_costs.items()
        }
    return doc


def session_document(session: Session) -> dict[str, Any]:
    """The session as emitted downstream (CustomerSessionV2, camelCase)."""
    doc: dict[str, Any] = {
        "id": session.id,
        "created": format_timestamp(session.created_ms),
        "integrationId": session.integration_id,
        "applicationId": session.application_id,
        "profileId": session.profile_id,
    }
    if session.store_integration_id is not None:
        doc["storeIntegrationId"] = session.store_integration_id
    doc.update(
        couponCodes=list(session.coupon_codes),
        referralCode=session.referral_code,
        loyaltyCards=list(session.loyalty_cards),
        state=session.state.value,
        cartItems=[_cart_item_document(item) for item in session.cart_items],
        additionalCosts={
            name: {"price": json_number(cost.price)}
            for name, cost in session.additional_costs.items()
        },
        identifiers=list(session.identifiers),
        attributes=session.attributes,
        # Anonymous: always a first session, also as stored by versions that
        # kept a cleared profile's placeholder (false).
        firstSession=session.first_session or session.profile_id == "",
        total=json_number(session.total),
        cartItemTotal=json_number(session.cart_item_total),
        additionalCostTotal=json_number(session.additional_cost_total),
        cartItemAdditionalCostTotal=json_number(session.cart_item_additional_cost_total),
        updateCount=session.update_count,
        updated=format_timestamp(session.updated_ms),
    )
    return doc


def output_document(event: SessionEvent, session: Session) -> dict[str, Any]:
    """One output record: the event, its cause, its time, the whole session."""
    doc: dict[str, Any] = {
        "event": event.name.value,
        "eventId": event.event_id,
        "occurredAt": format_timestamp(event.timestamp_ms),
        "applicationId": session.application_id,
        "integrationId": session.integration_id,
        "session": session_document(session),
    }
    if event.returned is not None:
        doc["return"] = {
            "lines": [
                {
                    "position": line.position,
                    "sku": line.sku,
                    "quantity": line.quantity,
                    "value": json_number(line.value),
                }
                for line in event.returned.lines
            ],
            "value": json_number(event.returned.value),
        }
    return doc


#: How many bytes of the original value a rejection keeps by default.
MAX_ORIGINAL_BYTES: Final = 256 * 1024


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def rejection_document(
    rejection: Rejection,
    key: bytes | None,
    value: bytes | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int,
    max_original_bytes: int = MAX_ORIGINAL_BYTES,
) -> dict[str, Any]:
    """A rejected record for the rejections topic. Never raises.

    Carries the reason, the Talon.One-shaped message and errors, the origin
    (topic, partition, offset, ``receivedAt`` when the timestamp is
    representable) and the original record, byte for byte:

    * ``keyBase64``: the key, ``null`` for a record without a key (an empty
      key is ``""``); past ``max_original_bytes`` only a prefix, and
      ``keyTruncated`` says so;
    * ``valueBase64``: the value, ``null`` for a tombstone (an empty value is
      ``""``); ``valueLength`` and ``valueSha256`` (hex) describe the whole
      value; past ``max_original_bytes`` only a prefix of that many bytes is
      kept, and ``valueTruncated`` says so;
    * ``command``: for convenience only, the value parsed as JSON when it is
      JSON, was kept whole and can be written again (orjson writes at most
      254 levels of nesting). Parsing loses detail (duplicate keys, big
      numbers, ``-0``): ``valueBase64`` is the record.
    """
    doc: dict[str, Any] = rejection.to_document()
    doc["source"] = {"topic": topic, "partition": partition, "offset": offset}
    try:
        doc["receivedAt"] = format_timestamp(timestamp_ms)
    except (OverflowError, ValueError, TypeError):
        doc["receivedAt"] = None
    doc["keyBase64"] = None if key is None else _base64(key[:max_original_bytes])
    doc["keyTruncated"] = key is not None and len(key) > max_original_bytes
    if value is None:
        doc.update(valueBase64=None, valueLength=None, valueSha256=None, valueTruncated=False)
        return doc
    truncated = len(value) > max_original_bytes
    doc["valueBase64"] = _base64(value[:max_original_bytes])
    doc["valueLength"] = len(value)
    doc["valueSha256"] = hashlib.sha256(value).hexdigest()
    doc["valueTruncated"] = truncated
    if not truncated:
        try:
            parsed = loads(value)
            if len(dumps({"command": parsed})) <= max_original_bytes:  # as nested below
                doc["command"] = parsed
        except (ValueError, TypeError):
            pass  # not JSON, or not writable again: the bytes are in valueBase64
    return doc


#: What :func:`fit_rejection` keeps of each text of a rejection, in characters.
FITTED_TEXT_CHARS: Final = 1024


def fit_rejection(
    doc: dict[str, Any], key: bytes | None, value: bytes | None, max_bytes: int
) -> tuple[bytes | None, bytes]:
    """The record key and JSON of ``doc`` (:func:`rejection_document` of ``key``
    and ``value``), cut down, one step after another, until the two take at
    most ``max_bytes``. A record its topic refuses would stop its partition for
    good; no rejection may be one. The steps:

    1. ``command``, the parsed echo (a convenience), left out;
    2. ``message`` and each error's ``title``, ``details`` and ``pointer``
       (which may quote the command: an attribute's name, say) to their first
       :data:`FITTED_TEXT_CHARS` characters, then ``…``;
    3. the record's key (the rejected record's own) to its first
       ``max_bytes // 64`` bytes;
    4. ``keyBase64`` and ``valueBase64`` to shorter prefixes (with
       ``keyTruncated``/``valueTruncated``), and the texts shorter still,
       halving until it fits: at the end only the fixed fields are left,
       a few hundred bytes.

    The worker's limits (a quarter of the record limit for each original part)
    make the first three enough at Kafka's default record limit.
    """
    encoded = dumps(doc)
    if _size(key, encoded) <= max_bytes:
        return key, encoded
    original_key = key
    if "command" in doc:
        del doc["command"]
        encoded = dumps(doc)
    if _size(key, encoded) > max_bytes:
        _cut_texts(doc, FITTED_TEXT_CHARS)
        encoded = dumps(doc)
    if _size(key, encoded) > max_bytes and key is not None and len(key) > max_bytes // 64:
        key = key[: max_bytes // 64]
    keep = max_bytes
    while _size(key, encoded) > max_bytes and keep > 0:
        keep //= 2
        if original_key is not None and len(original_key) > keep:
            doc["keyBase64"], doc["keyTruncated"] = _base64(original_key[:keep]), True
        if value is not None and len(value) > keep:
            doc["valueBase64"], doc["valueTruncated"] = _base64(value[:keep]), True
        # A character may take 6 bytes in JSON (a control character's escape).
        _cut_texts(doc, min(FITTED_TEXT_CHARS, keep // 64))
        encoded = dumps(doc)
    return key, encoded


def _cut_texts(doc: dict[str, Any], chars: int) -> None:
    doc["message"] = _cut(doc.get("message"), chars)
    for error in doc.get("errors") or ():
        error["title"] = _cut(error.get("title"), chars)
        error["details"] = _cut(error.get("details"), chars)
        if isinstance(error.get("source"), dict):
            error["source"]["pointer"] = _cut(error["source"].get("pointer"), chars)


def _size(key: bytes | None, encoded: bytes) -> int:
    return len(encoded) + (0 if key is None else len(key))


def _cut(text: object, chars: int) -> object:
    if isinstance(text, str) and len(text) > chars:
        return text[:chars] + "…"
    return text
