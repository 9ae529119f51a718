"""Decoding and validation of command bytes: every field rule at its boundary."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from domain_support import decode, item, reject_decode, reopen_doc, return_doc, update_doc

from stream_app.domain import (
    Reason,
    Rejection,
    ReopenCommand,
    ReturnCommand,
    ReturnItem,
    SessionState,
    UpdateCommand,
    decode_command,
)

OK = None
SCHEMA = Reason.SCHEMA_VIOLATION
LIMIT = Reason.LIMIT_EXCEEDED


def _session_field(name: str, value: Any) -> dict[str, Any]:
    return update_doc({name: value})


def _top(name: str, value: Any) -> dict[str, Any]:
    return {**update_doc({}), name: value}


def _item_field(name: str, value: Any) -> dict[str, Any]:
    return update_doc({"cartItems": [item(), item(), item(), {**item(), name: value}]})


# (document, expected reason or OK, expected pointer)
CASES: dict[str, tuple[dict[str, Any], Reason | None, str]] = {
    # integrationId 1..1000
    "integrationId 1": (_top("integrationId", "x"), OK, ""),
    "integrationId 0": (_top("integrationId", ""), SCHEMA, "/integrationId"),
    "integrationId 1000": (_top("integrationId", "x" * 1000), OK, ""),
    "integrationId 1001": (_top("integrationId", "x" * 1001), LIMIT, "/integrationId"),
    "integrationId number": (_top("integrationId", 5), SCHEMA, "/integrationId"),
    "integrationId missing": ({"type": "reopen"}, SCHEMA, "/integrationId"),
    # eventId 1..255
    "eventId 255": (_top("eventId", "e" * 255), OK, ""),
    "eventId 256": (_top("eventId", "e" * 256), LIMIT, "/eventId"),
    "eventId empty": (_top("eventId", ""), SCHEMA, "/eventId"),
    "eventId number": (_top("eventId", 7), SCHEMA, "/eventId"),
    # applicationId int32 > 0
    "applicationId 1": (_top("applicationId", 1), OK, ""),
    "applicationId max": (_top("applicationId", 2**31 - 1), OK, ""),
    "applicationId 0": (_top("applicationId", 0), SCHEMA, "/applicationId"),
    "applicationId 2^31": (_top("applicationId", 2**31), SCHEMA, "/applicationId"),
    "applicationId bool": (_top("applicationId", True), SCHEMA, "/applicationId"),
    "applicationId str": (_top("applicationId", "1"), SCHEMA, "/applicationId"),
    "applicationId float": (_top("applicationId", 1.0), SCHEMA, "/applicationId"),
    # profileId 0..1000
    "profileId 0": (_session_field("profileId", ""), OK, ""),
    "profileId 1000": (_session_field("profileId", "p" * 1000), OK, ""),
    "profileId 1001": (_session_field("profileId", "p" * 1001), LIMIT, "/session/profileId"),
    # storeIntegrationId 1..1000
    "store 1": (_session_field("storeIntegrationId", "s"), OK, ""),
    "store 0": (_session_field("storeIntegrationId", ""), SCHEMA, "/session/storeIntegrationId"),
    "store 1000": (_session_field("storeIntegrationId", "s" * 1000), OK, ""),
    "store 1001": (
        _session_field("storeIntegrationId", "s" * 1001),
        LIMIT,
        "/session/storeIntegrationId",
    ),
    # couponCodes: each 1..100
    "coupon 1": (_session_field("couponCodes", ["c"]), OK, ""),
    "coupon 0": (_session_field("couponCodes", ["ok", ""]), SCHEMA, "/session/couponCodes/1"),
    "coupon 100": (_session_field("couponCodes", ["c" * 100]), OK, ""),
    "coupon 101": (_session_field("couponCodes", ["c" * 101]), LIMIT, "/session/couponCodes/0"),
    "coupons not list": (_session_field("couponCodes", "c"), SCHEMA, "/session/couponCodes"),
    "coupon not str": (_session_field("couponCodes", [1]), SCHEMA, "/session/couponCodes/0"),
    # referralCode 0..100
    "referral 0": (_session_field("referralCode", ""), OK, ""),
    "referral 100": (_session_field("referralCode", "r" * 100), OK, ""),
    "referral 101": (_session_field("referralCode", "r" * 101), LIMIT, "/session/referralCode"),
    # loyaltyCards: at most 1, 4..108, pattern
    "cards 1": (_session_field("loyaltyCards", ["card"]), OK, ""),
    "cards 2": (_session_field("loyaltyCards", ["card", "card"]), LIMIT, "/session/loyaltyCards"),
    "card 3 chars": (_session_field("loyaltyCards", ["abc"]), SCHEMA, "/session/loyaltyCards/0"),
    "card 108": (_session_field("loyaltyCards", ["c" * 108]), OK, ""),
    "card 109": (_session_field("loyaltyCards", ["c" * 109]), LIMIT, "/session/loyaltyCards/0"),
    "card pattern ok": (_session_field("loyaltyCards", ["a.b_c%d+e@f-9"]), OK, ""),
    "card pattern bad": (
        _session_field("loyaltyCards", ["card 123"]),
        SCHEMA,
        "/session/loyaltyCards/0",
    ),
    "card newline": (
        _session_field("loyaltyCards", ["card\n"]),
        SCHEMA,
        "/session/loyaltyCards/0",
    ),
    # identifiers: at most 5
    "identifiers 5": (_session_field("identifiers", ["i"] * 5), OK, ""),
    "identifiers 6": (_session_field("identifiers", ["i"] * 6), LIMIT, "/session/identifiers"),
    "identifier not str": (_session_field("identifiers", [None]), SCHEMA, "/session/identifiers/0"),
    # state
    "state open": (_session_field("state", "open"), OK, ""),
    "state unknown": (_session_field("state", "OPEN"), SCHEMA, "/session/state"),
    "state number": (_session_field("state", 1), SCHEMA, "/session/state"),
    # cart items: at most 1000
    "items 1000": (_session_field("cartItems", [item()] * 1000), OK, ""),
    "items 1001": (_session_field("cartItems", [item()] * 1001), LIMIT, "/session/cartItems"),
    "items not list": (_session_field("cartItems", {}), SCHEMA, "/session/cartItems"),
    "item not object": (_session_field("cartItems", [1]), SCHEMA, "/session/cartItems/0"),
    # cart item fields
    "quantity 1": (_item_field("quantity", 1), OK, ""),
    "quantity 0": (_item_field("quantity", 0), SCHEMA, "/session/cartItems/3/quantity"),
    "quantity float": (_item_field("quantity", 1.0), SCHEMA, "/session/cartItems/3/quantity"),
    "quantity 1.5": (_item_field("quantity", 1.5), SCHEMA, "/session/cartItems/3/quantity"),
    "quantity str": (_item_field("quantity", "1"), SCHEMA, "/session/cartItems/3/quantity"),
    "quantity bool": (_item_field("quantity", True), SCHEMA, "/session/cartItems/3/quantity"),
    "price 0": (_item_field("price", 0), OK, ""),
    "price 0.0": (_item_field("price", 0.0), OK, ""),
    "price negative": (_item_field("price", -0.01), SCHEMA, "/session/cartItems/3/price"),
    "price str": (_item_field("price", "1"), SCHEMA, "/session/cartItems/3/price"),
    "price bool": (_item_field("price", False), SCHEMA, "/session/cartItems/3/price"),
    "price null": (_item_field("price", None), SCHEMA, "/session/cartItems/3/price"),
    "sku empty": (_item_field("sku", ""), SCHEMA, "/session/cartItems/3/sku"),
    "sku number": (_item_field("sku", 1), SCHEMA, "/session/cartItems/3/sku"),
    "name number": (_item_field("name", 1), SCHEMA, "/session/cartItems/3/name"),
    "category list": (_item_field("category", []), SCHEMA, "/session/cartItems/3/category"),
    "product ok": (_item_field("product", {"name": "P"}), OK, ""),
    "product no name": (_item_field("product", {}), SCHEMA, "/session/cartItems/3/product/name"),
    "weight ok": (_item_field("weight", 1.5), OK, ""),
    "weight negative": (_item_field("weight", -1), SCHEMA, "/session/cartItems/3/weight"),
    # Written out as read, past a long: a Java consumer failed on it.
    "weight 2^63 - 1": (_item_field("weight", 2**63 - 1), OK, ""),
    "weight 2^63": (_item_field("weight", 2**63), LIMIT, "/session/cartItems/3/weight"),
    "length 2^64 - 1": (_item_field("length", 2**64 - 1), LIMIT, "/session/cartItems/3/length"),
    "height str": (_item_field("height", "1"), SCHEMA, "/session/cartItems/3/height"),
    "width bool": (_item_field("width", True), SCHEMA, "/session/cartItems/3/width"),
    "length ok": (_item_field("length", 0), OK, ""),
    "item attributes list": (
        _item_field("attributes", []),
        SCHEMA,
        "/session/cartItems/3/attributes",
    ),
    "item cost no price": (
        _item_field("additionalCosts", {"wrap": {}}),
        SCHEMA,
        "/session/cartItems/3/additionalCosts/wrap/price",
    ),
    "item cost str": (
        _item_field("additionalCosts", {"a~b": {"price": "1"}}),
        SCHEMA,
        "/session/cartItems/3/additionalCosts/a~0b/price",
    ),
    "item cost negative ok": (_item_field("additionalCosts", {"c": {"price": -1}}), OK, ""),
    "computed fields ignored": (
        _item_field("position", "anything") | {},
        OK,
        "",
    ),
    # session additional costs and attributes
    "costs not object": (_session_field("additionalCosts", []), SCHEMA, "/session/additionalCosts"),
    "cost not object": (
        _session_field("additionalCosts", {"s": 1}),
        SCHEMA,
        "/session/additionalCosts/s",
    ),
    "attributes list": (_session_field("attributes", [1]), SCHEMA, "/session/attributes"),
    # command shape
    "not an object": ([], SCHEMA, ""),  # type: ignore[dict-item]
    "type missing": ({"integrationId": "s"}, SCHEMA, "/type"),
    "type unknown": ({"type": "delete", "integrationId": "s"}, SCHEMA, "/type"),
    "session missing": ({"type": "update", "integrationId": "s"}, SCHEMA, "/session"),
    "session list": ({"type": "update", "integrationId": "s", "session": []}, SCHEMA, "/session"),
    "unknown fields": (
        {**update_doc({"futureField": 1, "cartItems": [item(extra=1)]}), "other": {"x": 1}},
        OK,
        "",
    ),
    # returns
    "return empty": (return_doc([]), SCHEMA, "/returnedCartItems"),
    "return missing": ({"type": "return", "integrationId": "s"}, SCHEMA, "/returnedCartItems"),
    "return 1000": (return_doc([{"position": 0}] * 1000), OK, ""),
    "return 1001": (return_doc([{"position": 0}] * 1001), LIMIT, "/returnedCartItems"),
    "return neither": (return_doc([{"quantity": 1}]), SCHEMA, "/returnedCartItems/0"),
    "return position -1": (return_doc([{"position": -1}]), SCHEMA, "/returnedCartItems/0/position"),
    # Before, 2^63 decoded (the fast path refused it, the rules path did not).
    "return position 2^63": (
        return_doc([{"position": 2**63}]),
        SCHEMA,
        "/returnedCartItems/0/position",
    ),
    "return position 2^63-1": (return_doc([{"position": 2**63 - 1}]), OK, ""),
    "return position str": (
        return_doc([{"position": "0"}]),
        SCHEMA,
        "/returnedCartItems/0/position",
    ),
    "return quantity 0": (
        return_doc([{"position": 0, "quantity": 0}]),
        SCHEMA,
        "/returnedCartItems/0/quantity",
    ),
    "return sku empty": (return_doc([{"sku": ""}]), SCHEMA, "/returnedCartItems/0/sku"),
    "return entry not object": (return_doc(["x"]), SCHEMA, "/returnedCartItems/0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_field_rules(case: str) -> None:
    doc, reason, pointer = CASES[case]
    if reason is None:
        decode(doc)
        return
    rejection = reject_decode(doc)
    assert rejection.reason == reason
    assert [error.pointer for error in rejection.errors] == [pointer]
    assert rejection.message
    assert rejection.errors[0].title
    assert rejection.errors[0].details


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"nul", b'{"a":1}x', b"[1,]", b"NaN"])
def test_malformed_json(raw: bytes) -> None:
    rejection = decode_command(raw)
    assert isinstance(rejection, Rejection)
    assert rejection.reason == Reason.MALFORMED_JSON


def test_overflowing_numbers_are_rejected() -> None:
    prefix = b'{"type":"update","integrationId":"s","session":{"cartItems":[{"sku":"a",'
    raw = prefix + b'"quantity":1,"price":1e400}]}}'
    rejection = decode_command(raw)
    assert isinstance(rejection, Rejection)
    assert rejection.reason == Reason.MALFORMED_JSON
    big = prefix + b'"quantity":18446744073709551616,"price":1}]}}'
    rejection = decode_command(big)
    assert isinstance(rejection, Rejection)
    assert rejection.errors[0].pointer == "/session/cartItems/0/quantity"


def test_update_decodes_every_field() -> None:
    command = decode(
        update_doc(
            {
                "profileId": "p",
                "storeIntegrationId": "st",
                "couponCodes": ["A"],
                "referralCode": "R",
                "loyaltyCards": ["card1"],
                "state": "closed",
                "identifiers": ["id"],
                "attributes": {"k": None},
                "additionalCosts": {"ship": {"price": 0.1}},
                "cartItems": [
                    item(
                        "S",
                        2,
                        19.99,
                        name="N",
                        category="C",
                        product={"name": "P"},
                        weight=1,
                        height=2.5,
                        width=3,
                        length=4,
                        attributes={"a": 1},
                        additionalCosts={"wrap": {"price": 1}},
                        position=7,
                        returnedQuantity=2,
                        remainingQuantity=0,
                    )
                ],
            },
            eventId="e",
            applicationId=9,
        )
    )
    assert isinstance(command, UpdateCommand)
    assert (command.integration_id, command.event_id, command.application_id) == ("s-1", "e", 9)
    patch = command.session
    assert patch.state is SessionState.CLOSED
    assert patch.attributes == {"k": None}
    assert patch.additional_costs is not None
    assert patch.additional_costs["ship"].price == Decimal("0.1")
    assert patch.cart_items is not None
    line = patch.cart_items[0]
    assert (line.sku, line.quantity, line.price, line.position, line.returned_quantity) == (
        "S",
        2,
        Decimal("19.99"),
        0,
        0,
    )
    assert (line.name, line.category, line.weight, line.height) == ("N", "C", 1, 2.5)
    assert line.product is not None
    assert line.product.name == "P"


def test_absent_fields_stay_absent() -> None:
    command = decode(update_doc({}))
    assert isinstance(command, UpdateCommand)
    assert command.event_id is None
    assert command.application_id is None
    patch = command.session
    assert all(
        value is None
        for value in (
            patch.profile_id,
            patch.coupon_codes,
            patch.referral_code,
            patch.cart_items,
            patch.attributes,
            patch.state,
        )
    )


def test_return_and_reopen_decode() -> None:
    command = decode(return_doc([{"position": 1, "quantity": 2}, {"sku": "A", "note": "x"}]))
    assert isinstance(command, ReturnCommand)
    assert command.returned_cart_items == (ReturnItem(1, None, 2), ReturnItem(None, "A", None))
    reopen = decode(reopen_doc(eventId="e"))
    assert isinstance(reopen, ReopenCommand)
    assert reopen.event_id == "e"


def test_quantities_are_64_bit_integers() -> None:
    """orjson reads integers up to 2^64 - 1; a quantity is written back as a
    64-bit integer (in the outputs, the return's lines), so it is at most 2^63 - 1."""
    assert decode(_item_field("quantity", 2**63 - 1))
    for quantity in (2**63, 2**64 - 1):
        rejection = reject_decode(_item_field("quantity", quantity))
        assert rejection.reason is Reason.SCHEMA_VIOLATION
        assert rejection.errors[0].pointer == "/session/cartItems/3/quantity"
        entry = reject_decode(return_doc([{"position": 0, "quantity": quantity}]))
        assert entry.reason is Reason.SCHEMA_VIOLATION
        assert entry.errors[0].pointer == "/returnedCartItems/0/quantity"


def test_rejection_document_shape() -> None:
    rejection = reject_decode(_item_field("quantity", 0))
    assert rejection.to_document() == {
        "reason": "SCHEMA_VIOLATION",
        "message": rejection.message,
        "errors": [
            {
                "title": rejection.errors[0].title,
                "details": rejection.errors[0].details,
                "source": {"pointer": "/session/cartItems/3/quantity"},
            }
        ],
    }
