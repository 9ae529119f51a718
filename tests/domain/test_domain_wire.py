"""Stored and emitted forms: round trips, exact numbers, documents."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from domain_support import T0, applied, item, reject_decode, return_doc, session_in, update_doc

from stream_app.domain import (
    ApplicationSettings,
    ErrorDetail,
    EventName,
    Reason,
    Rejection,
    decode_session,
    encode_session,
    fit_rejection,
    format_timestamp,
    output_document,
    rejection_document,
    session_document,
)
from stream_app.errors import ConfigurationError
from stream_app.json import dumps, loads


def test_stored_form_round_trips_exactly() -> None:
    session = applied(
        None,
        update_doc(
            {
                "profileId": "p",
                "storeIntegrationId": "st",
                "couponCodes": ["A"],
                "loyaltyCards": ["card1"],
                "attributes": {"nested": {"list": [1, 2.5, None, "x"]}},
                "additionalCosts": {"ship": {"price": 0.1}},
                "cartItems": [
                    item("A", 2, 12345678.9, product={"name": "P"}, weight=1.5),
                    item("B", 1, 0.1, additionalCosts={"w": {"price": 0.2}}),
                ],
            }
        ),
    ).session
    assert session.total == Decimal("24691358.2")
    data = encode_session(session)
    restored = decode_session(data)
    assert restored == session
    assert encode_session(restored) == data
    assert restored.total == Decimal("24691358.2")


def test_stored_form_leaves_defaults_out_and_reads_sessions_stored_with_every_field() -> None:
    session = applied(None, update_doc({"cartItems": [item("A", 1, 2.5)]})).session
    data = encode_session(session)
    for absent in (
        b"null",
        b'"returned_quantity"',
        b'"store_integration_id"',
        b'"product"',
        b'"additional_cost_total"',
        b'"cart_item_additional_cost_total"',
    ):
        assert absent not in data
    # As sessions were stored before defaults were left out: every field written.
    every_field = (
        b'{"id":1,"integration_id":"s-1","application_id":1,"state":"open",'
        b'"created_ms":1764000000000,"updated_ms":1764000000000,"update_count":1,'
        b'"first_session":true,"profile_id":"","store_integration_id":null,'
        b'"coupon_codes":[],"referral_code":"","loyalty_cards":[],"cart_items":[{"sku":"A",'
        b'"quantity":1,"price":"2.5","position":0,"returned_quantity":0,"name":null,'
        b'"category":null,"product":null,"weight":null,"height":null,"width":null,'
        b'"length":null,"attributes":null,"additional_costs":null}],"additional_costs":{},'
        b'"identifiers":[],"attributes":{},"total":"2.5","cart_item_total":"2.5",'
        b'"additional_cost_total":"0","cart_item_additional_cost_total":"0",'
        b'"recent_event_ids":["e-1"]}'
    )
    old = decode_session(every_field)
    assert decode_session(encode_session(old)) == old
    assert (old.cart_items[0].price, old.total, old.store_integration_id) == (
        Decimal("2.5"),
        Decimal("2.5"),
        None,
    )
    assert len(encode_session(old)) < len(every_field)


def test_totals_print_exactly() -> None:
    session = applied(
        None, update_doc({"cartItems": [item("A", 1, 0.1), item("B", 1, 0.2)]})
    ).session
    text = dumps(session_document(session))
    assert b'"cartItemTotal":0.3' in text
    assert b'"total":0.3' in text
    assert b"0.30000000000000004" not in text
    integral = applied(None, update_doc({"cartItems": [item("A", 3, 0.5), item("B", 1, 1.5)]}))
    doc = session_document(integral.session)
    assert doc["total"] == 3
    assert type(doc["total"]) is int


def test_session_document_fields() -> None:
    session = applied(
        None,
        update_doc({"cartItems": [item("A", 3, 2.5)], "state": "closed"}),
        timestamp_ms=T0 + 123,
    ).session
    session = applied(session, return_doc([{"position": 0, "quantity": 1}])).session
    doc = session_document(session)
    assert set(doc) == {
        "id",
        "created",
        "integrationId",
        "applicationId",
        "profileId",
        "couponCodes",
        "referralCode",
        "loyaltyCards",
        "state",
        "cartItems",
        "additionalCosts",
        "identifiers",
        "attributes",
        "firstSession",
        "total",
        "cartItemTotal",
        "additionalCostTotal",
        "cartItemAdditionalCostTotal",
        "updateCount",
        "updated",
    }
    assert doc["created"] == "2025-11-25T19:46:40.123Z"
    assert doc["state"] == "partially_returned"
    assert doc["cartItems"] == [
        {
            "position": 0,
            "sku": "A",
            "quantity": 3,
            "returnedQuantity": 1,
            "remainingQuantity": 2,
            "price": 2.5,
        }
    ]
    assert doc["updateCount"] == 2
    assert loads(dumps(doc)) == doc


def test_output_document_for_returns() -> None:
    closed = session_in("closed", [item("A", 3, 0.1), item("B", 1, 0.2)])
    outcome = applied(closed, return_doc([{"position": 0, "quantity": 3}, {"sku": "B"}]))
    event = outcome.events[0]
    doc = output_document(event, outcome.session)
    assert doc["event"] == EventName.PARTIALLY_RETURNED
    assert doc["eventId"] == event.event_id
    assert doc["occurredAt"] == format_timestamp(event.timestamp_ms)
    assert (doc["applicationId"], doc["integrationId"]) == (1, "s-1")
    assert doc["session"] == session_document(outcome.session)
    assert doc["return"] == {
        "lines": [
            {"position": 0, "sku": "A", "quantity": 3, "value": 0.3},
            {"position": 1, "sku": "B", "quantity": 1, "value": 0.2},
        ],
        "value": 0.5,
    }
    assert b'"value":0.5' in dumps(doc)
    created = applied(None, update_doc({}))
    assert "return" not in output_document(created.events[0], created.session)


@pytest.mark.parametrize(
    ("timestamp_ms", "text"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (1_795_981_613_123, "2026-11-29T19:46:53.123Z"),
        (-1, "1969-12-31T23:59:59.999Z"),
        # the years before 1000, as RFC 3339 writes them (a rejection's receivedAt)
        (-62_135_596_800_000, "0001-01-01T00:00:00.000Z"),
        (-30_610_224_000_001, "0999-12-31T23:59:59.999Z"),
        (253_402_300_799_999, "9999-12-31T23:59:59.999Z"),
    ],
)
def test_format_timestamp(timestamp_ms: int, text: str) -> None:
    assert format_timestamp(timestamp_ms) == text


def test_rejection_document_keeps_the_command() -> None:
    raw = dumps(update_doc({"cartItems": [item(quantity=0)]}))
    rejection = reject_decode(loads(raw))
    doc = rejection_document(
        rejection, b"cart-1", raw, topic="commands", partition=2, offset=9, timestamp_ms=T0
    )
    assert doc["reason"] == "SCHEMA_VIOLATION"
    assert doc["errors"][0]["source"] == {"pointer": "/session/cartItems/0/quantity"}
    assert doc["source"] == {"topic": "commands", "partition": 2, "offset": 9}
    assert base64.b64decode(doc["valueBase64"]) == raw
    assert base64.b64decode(doc["keyBase64"]) == b"cart-1"
    assert doc["valueSha256"] == hashlib.sha256(raw).hexdigest()
    assert doc["command"] == loads(raw)
    garbage = b"\xff\x00not json"
    doc = rejection_document(
        rejection, None, garbage, topic="t", partition=0, offset=0, timestamp_ms=10**20
    )
    assert base64.b64decode(doc["valueBase64"]) == garbage
    assert doc["keyBase64"] is None
    assert "command" not in doc
    assert doc["receivedAt"] is None
    dumps(doc)


@pytest.mark.parametrize(
    ("key", "value"),
    [(None, None), (b"", b""), (None, b""), (b"", None)],
)
def test_rejection_document_tells_null_from_empty(key: bytes | None, value: bytes | None) -> None:
    doc = rejection_document(
        reject_decode({}), key, value, topic="t", partition=0, offset=0, timestamp_ms=T0
    )
    assert doc["keyBase64"] == (None if key is None else "")
    assert doc["valueBase64"] == (None if value is None else "")
    assert doc["valueLength"] == (None if value is None else 0)


def test_rejection_document_keeps_the_exact_bytes_json_would_lose() -> None:
    # Duplicate keys, an integer beyond 64 bits, -0 and a long decimal: parsing
    # changes each of them; valueBase64 keeps the record as it was.
    raw = (
        b'{"type":"x","a":1,"a":2,"n":123456789012345678901234567890,'
        b'"z":-0,"d":0.1000000000000000000001}'
    )
    doc = rejection_document(
        reject_decode({}), b"k", raw, topic="t", partition=0, offset=0, timestamp_ms=T0
    )
    assert base64.b64decode(doc["valueBase64"]) == raw


def test_rejection_document_keeps_a_prefix_and_a_digest_past_the_cap() -> None:
    value = b"x" * 5000
    doc = rejection_document(
        reject_decode({}),
        b"k",
        value,
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=T0,
        max_original_bytes=1024,
    )
    assert base64.b64decode(doc["valueBase64"]) == value[:1024]
    assert doc["valueTruncated"] is True
    assert doc["valueLength"] == 5000
    assert doc["valueSha256"] == hashlib.sha256(value).hexdigest()
    assert "command" not in doc


def test_rejection_document_of_json_too_deep_to_write_again_still_writes() -> None:
    raw = b'{"type":"x","a":' + b"[" * 300 + b"]" * 300 + b"}"
    doc = rejection_document(
        reject_decode({}), b"k", raw, topic="t", partition=0, offset=0, timestamp_ms=T0
    )
    assert "command" not in doc  # orjson writes at most 254 levels
    assert base64.b64decode(loads(dumps(doc))["valueBase64"]) == raw


#: Kafka's default record limit, and what the worker then allows a rejection.
LIMIT = 1_048_588
BUDGET = LIMIT - 1024


def _rejection(
    key: bytes | None,
    value: bytes | None,
    rejection: Rejection,
    max_original_bytes: int = LIMIT // 4,
) -> dict[str, Any]:
    return rejection_document(
        rejection,
        key,
        value,
        topic="t",
        partition=0,
        offset=0,
        timestamp_ms=T0,
        max_original_bytes=max_original_bytes,
    )


def test_a_rejection_that_fits_is_left_as_it_is() -> None:
    doc = _rejection(b"cart-1", b"{}", reject_decode({}))
    assert doc["keyTruncated"] is False
    assert fit_rejection(dict(doc), b"cart-1", b"{}", BUDGET) == (b"cart-1", dumps(doc))


def test_a_rejection_of_a_record_with_a_huge_key_fits_the_record_limit() -> None:
    """A 1 MB key with a 15-byte value is a record the command topic takes;
    its rejection, keyed by that key and holding it in base64, would not fit."""
    for size in (300_000, 700_000, 1_000_000):
        key, value = bytes(range(256)) * (size // 256), b'{"type":"nope"}'
        doc = _rejection(key, value, reject_decode({}))
        assert doc["keyTruncated"] is True
        assert base64.b64decode(doc["keyBase64"]) == key[: LIMIT // 4]
        record_key, encoded = fit_rejection(doc, key, value, BUDGET)
        # 300 KB and its base64 prefix fit: the record keeps its key.
        assert record_key == (key if size == 300_000 else key[: BUDGET // 64])
        assert len(record_key) + len(encoded) <= BUDGET
        fitted = loads(encoded)
        assert base64.b64decode(fitted["keyBase64"]) == key[: LIMIT // 4]
        assert base64.b64decode(fitted["valueBase64"]) == value
        # The echo went first; it could stay only where nothing was cut.
        assert ("command" in fitted) == (size == 300_000)


def test_a_rejection_whose_texts_quote_a_huge_name_fits_the_record_limit() -> None:
    """An attribute name of 600 KB that the application does not allow (the
    command limit raised near the record limit): its pointer and details quote
    it, next to the value's prefix in base64."""
    name = "a" * 600_000
    value = dumps({"type": "update", "integrationId": "c", "session": {"attributes": {name: 1}}})
    pointer = f"/session/attributes/{name}"
    rejection = Rejection(
        Reason.UNKNOWN_ATTRIBUTE,
        "The session has an attribute the application does not allow",
        (ErrorDetail("Unknown attribute", f"unknown attribute {name!r}", pointer),),
    )
    doc = _rejection(b"c", value, rejection)
    assert len(dumps(doc)) > LIMIT
    record_key, encoded = fit_rejection(doc, b"c", value, BUDGET)
    assert record_key == b"c"
    assert len(record_key) + len(encoded) <= BUDGET
    fitted = loads(encoded)
    assert "command" not in fitted
    [error] = fitted["errors"]
    assert error["source"]["pointer"] == pointer[:1024] + "…"
    assert error["details"] == f"unknown attribute {name!r}"[:1024] + "…"
    assert base64.b64decode(fitted["valueBase64"]) == value[: LIMIT // 4]
    assert fitted["valueTruncated"] is True
    assert fitted["valueSha256"] == hashlib.sha256(value).hexdigest()


def test_leaving_out_the_echo_is_the_first_step_and_may_be_enough() -> None:
    """A 300 KB key and a 250 KB JSON value: key, key and value in base64, and
    the echo come to 1.26 MB; without the echo, 1.0 MB fits."""
    key = b"k" * 300_000
    value = dumps({"type": "update", "integrationId": "c", "session": {"a": "x" * 250_000}})
    doc = _rejection(key, value, reject_decode({}))
    assert "command" in doc
    record_key, encoded = fit_rejection(doc, key, value, BUDGET)
    assert len(record_key or b"") + len(encoded) <= BUDGET
    fitted = loads(encoded)
    assert "command" not in fitted
    assert record_key == key  # nothing else was cut
    assert base64.b64decode(fitted["valueBase64"]) == value
    assert fitted["errors"] == doc["errors"]


@pytest.mark.parametrize("budget", [2048, 5000, 20_000])
@pytest.mark.parametrize(
    ("key_size", "value_size"), [(0, 0), (10, 10_000), (10_000, 10), (6000, 6000)]
)
def test_a_rejection_always_fits_even_a_limit_its_originals_do_not(
    budget: int, key_size: int, value_size: int
) -> None:
    """The last step, for limits smaller than the worker's own steps suit
    (a record limit may be as low as three times the session limit): shorter
    prefixes, whose flags say so, and texts of control characters, which JSON
    writes six bytes each."""
    key, value = bytes(i % 251 for i in range(key_size)), b"v" * value_size
    rejection = Rejection(
        Reason.UNKNOWN_ATTRIBUTE,
        "\x01" * 3000,
        (ErrorDetail("\x02" * 3000, "\x03" * 3000, "/session/attributes/" + "\x04" * 3000),),
    )
    # The prefixes are the last step's doing: the document keeps 100,000 bytes.
    doc = _rejection(key, value, rejection, max_original_bytes=100_000)
    record_key, encoded = fit_rejection(doc, key, value, budget)
    assert len(record_key or b"") + len(encoded) <= budget
    assert key.startswith(record_key or b"")
    fitted = loads(encoded)
    kept_key = base64.b64decode(fitted["keyBase64"])
    kept_value = base64.b64decode(fitted["valueBase64"])
    assert key.startswith(kept_key)
    assert value.startswith(kept_value)
    assert fitted["keyTruncated"] == (len(kept_key) < key_size)
    assert fitted["valueTruncated"] == (len(kept_value) < value_size)
    assert fitted["valueLength"] == value_size
    assert record_key == key or len(record_key or b"") == budget // 64
    if record_key != key:  # keyBase64 keeps more of the original than the record key
        assert len(kept_key) > len(record_key or b"")


def test_application_settings_from_document() -> None:
    settings = ApplicationSettings.from_document(
        {"flattening": False, "additionalCosts": ["ship"], "attributes": [], "extra": 1}
    )
    assert settings == ApplicationSettings(False, frozenset({"ship"}), frozenset())
    assert ApplicationSettings.from_document({}) == ApplicationSettings()
    assert ApplicationSettings.from_document({"attributes": None}).attributes is None
    bad: object
    for bad in ([], {"flattening": "yes"}, {"additionalCosts": "ship"}, {"attributes": [1]}):
        with pytest.raises(ConfigurationError):
            ApplicationSettings.from_document(bad)


def test_domain_imports_no_streaming_framework() -> None:
    code = (
        "import sys, stream_app.domain; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'faust', 'aiokafka', 'mode'}); "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_domain_sources_do_not_mention_streaming_imports() -> None:
    import ast

    package = Path(__file__).resolve().parents[2] / "stream_app" / "domain"
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in {"faust", "aiokafka", "mode", "time", "random", "os"}, (
                    path,
                    name,
                )
