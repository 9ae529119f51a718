"""Hostile numbers and nesting (issue 11, points 1 and 7), at the domain level.

Every money value and total the processor would emit must be exactly
representable in its JSON output; deeper nesting than the documented limit
is rejected when decoding, before anything is stored or emitted.
"""

from __future__ import annotations

import json
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from domain_support import (
    applied,
    context,
    decode,
    item,
    reject_decode,
    rejected,
    return_doc,
    session_in,
    update_doc,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.domain import (
    Applied,
    Reason,
    Rejected,
    Rejection,
    apply,
    decode_command,
    encode_session,
    output_document,
    session_document,
)
from stream_app.domain.decoding import MAX_COMMAND_DEPTH
from stream_app.domain.numbers import to_decimal
from stream_app.json import dumps, loads

LIMIT = Reason.LIMIT_EXCEEDED
I64_MIN = -(2**63)
I64_MAX = 2**63 - 1

# --------------------------------------------------------------------------- input numbers


def test_the_issue_case_price_1_7e308_times_2_is_rejected_at_the_price() -> None:
    rejection = reject_decode(update_doc({"cartItems": [item("A", 2, 1.7e308)]}))
    assert rejection.reason is LIMIT
    assert rejection.errors[0].pointer == "/session/cartItems/0/price"


@pytest.mark.parametrize(
    ("price_text", "accepted"),
    [
        ("9223372036854775807", True),  # 2^63 - 1
        ("9223372036854775808", False),  # 2^63: orjson gives an int, beyond signed 64 bits
        ("18446744073709551617", False),  # 2^64 + 1: orjson gives a rounded float
        ("1e20", False),
        ("9.2e18", True),
        ("0.1", True),
    ],
)
def test_price_bounds_on_the_bytes_as_sent(price_text: str, accepted: bool) -> None:
    raw = (
        b'{"type":"update","integrationId":"s-1","session":{"cartItems":['
        b'{"sku":"A","quantity":1,"price":0},{"sku":"B","quantity":1,"price":'
        + price_text.encode()
        + b"}]}}"
    )
    result = decode_command(raw)
    if not accepted:
        assert isinstance(result, Rejection)
        assert result.reason is LIMIT
        assert result.errors[0].pointer == "/session/cartItems/1/price"
        return
    assert not isinstance(result, Rejection), result
    outcome = apply(None, result, context())
    assert isinstance(outcome, Applied), outcome
    doc = session_document(outcome.session)
    emitted = loads(dumps(doc))["cartItems"][1]["price"]
    assert Decimal(str(emitted)) == Decimal(price_text)
    if "." not in price_text and "e" not in price_text:
        assert type(emitted) is int


@pytest.mark.parametrize(
    ("session", "pointer"),
    [
        ({"additionalCosts": {"ship": {"price": -1e19}}}, "/session/additionalCosts/ship/price"),
        (
            {"cartItems": [item("A", 1, 1, additionalCosts={"a/b": {"price": 1e300}})]},
            "/session/cartItems/0/additionalCosts/a~1b/price",
        ),
    ],
)
def test_additional_cost_prices_out_of_range_are_rejected(
    session: dict[str, Any], pointer: str
) -> None:
    rejection = reject_decode(update_doc(session))
    assert (rejection.reason, rejection.errors[0].pointer) == (LIMIT, pointer)


def test_a_negative_huge_price_is_still_a_schema_violation() -> None:
    rejection = reject_decode(update_doc({"cartItems": [item("A", 1, -1e300)]}))
    assert rejection.reason is Reason.SCHEMA_VIOLATION


# --------------------------------------------------------------------------- totals


@pytest.mark.parametrize(
    ("session", "pointer"),
    [
        # One line's price x quantity is beyond 2^63: that line is to blame.
        ({"cartItems": [item("A", 1, 1), item("B", 2, 5e18)]}, "/session/cartItems/1"),
        # Every line fits, their sum does not.
        ({"cartItems": [item("A", 1, 6e18), item("B", 1, 4e18)]}, "/session/cartItemTotal"),
        # Every line is exact, their sum needs 21 significant digits.
        ({"cartItems": [item("A", 1, 1), item("B", 1, 1e-20)]}, "/session/cartItemTotal"),
        # An item-level cost whose price x quantity is 0.90000000000000012.
        (
            {
                "cartItems": [
                    item("A", 3, 1, additionalCosts={"ship": {"price": 0.30000000000000004}})
                ]
            },
            "/session/cartItems/0/additionalCosts/ship",
        ),
        (
            {
                "cartItems": [
                    item("A", 1, 1, additionalCosts={"ship": {"price": 1}}),
                    item("B", 1, 1, additionalCosts={"ship": {"price": 1e-20}}),
                ]
            },
            "/session/cartItemAdditionalCostTotal",
        ),
        (
            {"additionalCosts": {"a": {"price": 1}, "b": {"price": 1e-20}}},
            "/session/additionalCostTotal",
        ),
        (
            {"cartItems": [item("A", 1, 1)], "additionalCosts": {"b": {"price": 1e-20}}},
            "/session/total",
        ),
    ],
)
def test_unrepresentable_totals_are_rejected_with_a_pointer(
    session: dict[str, Any], pointer: str
) -> None:
    for stored in (None, session_in("open")):
        rejection = rejected(stored, update_doc(session))
        assert rejection.reason is LIMIT
        assert rejection.errors[0].pointer == pointer


def test_a_rejected_total_leaves_the_session_as_it_was() -> None:
    stored = session_in("open")
    before = encode_session(stored)
    command = decode(update_doc({"cartItems": [item("A", 1, 6e18), item("B", 1, 4e18)]}))
    outcome = apply(stored, command, context())
    assert isinstance(outcome, Rejected)
    assert encode_session(stored) == before
    # The same session still takes a representable update afterwards.
    assert applied(
        stored, update_doc({"cartItems": [item("A", 1, 6e18)]})
    ).session.total == Decimal("6e18")


def test_a_session_only_update_recomputes_the_total_with_stored_parts() -> None:
    stored = applied(None, update_doc({"cartItems": [item("A", 1, 1)]})).session
    rejection = rejected(stored, update_doc({"additionalCosts": {"b": {"price": 1e-20}}}))
    assert (rejection.reason, rejection.errors[0].pointer) == (LIMIT, "/session/total")


def test_the_largest_totals_are_emitted_as_exact_integers() -> None:
    outcome = applied(
        None, update_doc({"cartItems": [item("A", 1, 2**62), item("B", 1, 2**62 - 1)]})
    )
    doc = loads(dumps(session_document(outcome.session)))
    assert doc["total"] == 2**63 - 1
    assert type(doc["total"]) is int


def test_a_line_whose_value_is_unrepresentable_is_rejected_with_its_cart() -> None:
    """Its price and its costs are counted in two totals, each fine; but
    returning the line whole would be worth 1 + 1e-20, or 1e15 + 0.01, so the
    line could never be returned. Refused when it is sent, at the line."""
    for cart, costs in (
        (
            [
                item("A", 1, 1, additionalCosts={"x": {"price": 1e-20}}),
                item("B", 1, 0, additionalCosts={"x": {"price": -1e-20}}),
            ],
            {},
        ),
        (
            [item("A", 1, 1e15, additionalCosts={"w": {"price": 0.01}})],
            {"r": {"price": -0.01}},
        ),
    ):
        doc = update_doc({"state": "closed", "cartItems": cart, "additionalCosts": costs})
        rejection = rejected(None, doc)
        assert (rejection.reason, rejection.errors[0].pointer) == (LIMIT, "/session/cartItems/0")


def test_a_return_whose_line_value_is_unrepresentable_is_rejected_at_its_entry() -> None:
    # cartItemTotal 1, yet line A alone is worth 3 x 0.30000000000000004.
    cart = [item("A", 3, 0.30000000000000004), item("B", 1, 0.09999999999999988)]
    closed = session_in("closed", cart)
    assert closed.cart_item_total == 1
    rejection = rejected(closed, return_doc([{"position": 1}, {"position": 0}]))
    assert (rejection.reason, rejection.errors[0].pointer) == (LIMIT, "/returnedCartItems/1")


def test_a_return_whose_total_value_is_unrepresentable_is_rejected_as_a_whole() -> None:
    cart = [
        item("A", 1, 1),
        item("B", 1, 0, additionalCosts={"x": {"price": 1e-20}}),
        item("C", 1, 0, additionalCosts={"x": {"price": -1e-20}}),
    ]
    closed = session_in("closed", cart)
    assert closed.total == 1
    rejection = rejected(closed, return_doc([{"position": 0}, {"position": 1}]))
    assert (rejection.reason, rejection.errors[0].pointer) == (LIMIT, "/returnedCartItems")
    # Each of those lines alone is fine.
    assert applied(closed, return_doc([{"position": 1}])).events[0].returned is not None


# --------------------------------------------------------------------------- nesting depth


def _nested(levels: int, *, key: str = "a", leaf: Any = 1) -> Any:
    """``levels`` arrays/objects, alternating, around ``leaf``."""
    value = leaf
    for level in range(levels):
        value = {key: value} if level % 2 else [value]
    return value


def _pointer_below(base: str, levels: int, key: str = "a") -> str:
    """The pointer of the container ``levels`` levels below ``base`` in ``_nested``."""
    tokens = []
    for level in range(levels, 0, -1):
        tokens.append(key if level % 2 else "0")
    return base + "".join(f"/{token}" for token in tokens)


SESSION_ROOM = MAX_COMMAND_DEPTH - 3  # /session/attributes is level 3
ITEM_ROOM = MAX_COMMAND_DEPTH - 5  # /session/cartItems/n/attributes is level 5


def test_the_limit_is_32_levels() -> None:
    assert MAX_COMMAND_DEPTH == 32


def test_session_attributes_at_the_limit_are_applied_and_written() -> None:
    doc = update_doc({"attributes": {"deep": _nested(SESSION_ROOM)}})
    outcome = applied(None, doc)
    written = dumps(output_document(outcome.events[0], outcome.session))
    assert loads(written)["session"]["attributes"] == doc["session"]["attributes"]
    encode_session(outcome.session)


def test_session_attributes_one_level_deeper_are_rejected_where_the_limit_is_crossed() -> None:
    rejection = reject_decode(update_doc({"attributes": {"deep": _nested(SESSION_ROOM + 1)}}))
    assert rejection.reason is LIMIT
    pointer = rejection.errors[0].pointer
    assert pointer.startswith("/session/attributes/deep")
    assert pointer.count("/") == MAX_COMMAND_DEPTH  # the level-33 container
    assert pointer == _pointer_below("/session/attributes/deep", SESSION_ROOM)


def test_cart_item_attributes_at_the_limit_are_applied_one_deeper_rejected() -> None:
    ok = item("A", 1, 1, attributes={"x/y": _nested(ITEM_ROOM, key="k~")})
    outcome = applied(None, update_doc({"cartItems": [ok]}))
    dumps(session_document(outcome.session))
    deep = item("B", 1, 1, attributes={"flat": "v", "x/y": _nested(ITEM_ROOM + 1, key="k~")})
    rejection = reject_decode(update_doc({"cartItems": [ok, ok, deep]}))
    assert rejection.reason is LIMIT
    assert rejection.errors[0].pointer == _pointer_below(
        "/session/cartItems/2/attributes/x~1y", ITEM_ROOM, key="k~0"
    )


def test_the_first_crossing_in_document_order_is_named() -> None:
    attributes = {"shallow": [[1]], "first": [_nested(40)], "second": _nested(40)}
    rejection = reject_decode(update_doc({"attributes": attributes}))
    assert rejection.errors[0].pointer.startswith("/session/attributes/first/0/")


@pytest.mark.parametrize("levels", [300, 1000])
def test_the_issue_case_hundreds_of_levels_in_attributes_is_rejected(levels: int) -> None:
    raw = (
        b'{"type":"update","integrationId":"s-1","session":{"state":"closed","attributes":{"a":'
        + b"[" * levels
        + b"]" * levels
        + b"}}}"
    )
    rejection = decode_command(raw)
    assert isinstance(rejection, Rejection)
    assert rejection.reason is LIMIT
    dumps(rejection.to_document())


def test_wide_shallow_attributes_are_not_limited() -> None:
    wide = {f"k{i}": [i, {"v": [i]}] for i in range(500)}
    outcome = applied(None, update_doc({"attributes": wide, "cartItems": [item(attributes=wide)]}))
    assert outcome.session.attributes == wide


def test_ignored_fields_are_not_depth_checked_and_never_kept() -> None:
    deep = _nested(100)
    doc = update_doc({"cartItems": [{**item(), "unknown": deep}], "other": deep}, extra=deep)
    outcome = applied(None, doc)
    assert b"unknown" not in dumps(session_document(outcome.session))
    assert b"unknown" not in encode_session(outcome.session)


# --------------------------------------------------------------------------- properties

EDGE_PRICES = [0, 0.1, 0.2, 0.30000000000000004, 19.99, 1e-20, 5e18, 2**62, 9.2e18, 2**63 - 1]
PRICES = st.one_of(
    st.sampled_from(EDGE_PRICES),
    st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.decimals(min_value=0, max_value=10**13, places=2).map(float),
)
# Negative too; orjson cannot write an int below -2^63, so such costs are not sent.
COST_PRICES = st.one_of(
    PRICES, PRICES.map(lambda price: -price).filter(lambda price: price >= I64_MIN)
)
COSTS = st.dictionaries(
    st.sampled_from(["ship", "wrap"]), st.fixed_dictionaries({"price": COST_PRICES}), max_size=2
)
CART = st.lists(
    st.fixed_dictionaries(
        {"sku": st.sampled_from("ABC"), "quantity": st.integers(1, 3), "price": PRICES},
        optional={"additionalCosts": COSTS},
    ),
    max_size=4,
)


def _exact(value: Any) -> Fraction:
    return Fraction(to_decimal(value))


def _representable(value: Fraction) -> bool:
    if value.denominator == 1:
        return I64_MIN <= value <= I64_MAX
    text = repr(float(value)) if abs(value) < 2**63 else "inf"
    return text not in {"inf", "-inf"} and Fraction(Decimal(text)) == value


def _emitted_money(doc: dict[str, Any]) -> list[Decimal]:
    """Every money value of an emitted session document, parsed exactly."""
    exact_doc = json.loads(dumps(doc), parse_float=Decimal)
    values = [exact_doc[name] for name in TOTALS]
    values += [cost["price"] for cost in exact_doc["additionalCosts"].values()]
    for line in exact_doc["cartItems"]:
        values.append(line["price"])
        values += [cost["price"] for cost in line.get("additionalCosts", {}).values()]
    return values


TOTALS = ("total", "cartItemTotal", "additionalCostTotal", "cartItemAdditionalCostTotal")


@settings(max_examples=400, deadline=None)
@given(CART, COSTS)
def test_an_update_is_rejected_for_its_numbers_exactly_when_one_is_unrepresentable(
    cart: list[dict[str, Any]], costs: dict[str, Any]
) -> None:
    doc = update_doc({"cartItems": cart, "additionalCosts": costs})
    inputs = [(f"/session/additionalCosts/{n}/price", c["price"]) for n, c in costs.items()]
    for position, line in enumerate(cart):
        inputs.append((f"/session/cartItems/{position}/price", line["price"]))
        for name, cost in line.get("additionalCosts", {}).items():
            pointer = f"/session/cartItems/{position}/additionalCosts/{name}/price"
            inputs.append((pointer, cost["price"]))
    result = decode_command(dumps(doc))
    bad_inputs = [pointer for pointer, value in inputs if not _representable(_exact(value))]
    if bad_inputs:
        assert isinstance(result, Rejection)
        assert result.reason is LIMIT
        assert result.errors[0].pointer in bad_inputs
        return
    assert not isinstance(result, Rejection), result

    item_total = sum((_exact(x["price"]) * x["quantity"] for x in cart), Fraction(0))
    item_costs = sum(
        (
            _exact(c["price"]) * x["quantity"]
            for x in cart
            for c in x.get("additionalCosts", {}).values()
        ),
        Fraction(0),
    )
    session_costs = sum((_exact(c["price"]) for c in costs.values()), Fraction(0))
    totals = [item_total, item_costs, session_costs, item_total + item_costs + session_costs]
    # A line with costs must be worth a representable amount too (what
    # returning it whole is worth).
    line_values = [
        (_exact(x["price"]) + sum((_exact(c["price"]) for c in line_costs.values()), Fraction(0)))
        * x["quantity"]
        for x in cart
        if (line_costs := x.get("additionalCosts", {}))
    ]
    expected_ok = all(_representable(value) for value in totals + line_values)
    outcome = apply(None, result, context())
    if not expected_ok:
        assert isinstance(outcome, Rejected)
        assert outcome.rejection.reason is LIMIT
        return
    # A command whose inputs and totals are representable is never rejected for them.
    assert isinstance(outcome, Applied), outcome
    emitted = _emitted_money(session_document(outcome.session))
    assert all(_representable(Fraction(value)) for value in emitted)
    assert [Fraction(value) for value in emitted[:4]] == [
        totals[3],
        totals[0],
        totals[2],
        totals[1],
    ]


@settings(max_examples=300, deadline=None)
@given(CART.filter(bool), st.data())
def test_every_applied_return_has_representable_values(
    cart: list[dict[str, Any]], data: st.DataObject
) -> None:
    create = decode_command(dumps(update_doc({"cartItems": cart, "state": "closed"})))
    if isinstance(create, Rejection):
        return
    created = apply(None, create, context())
    if not isinstance(created, Applied):
        return
    positions = data.draw(
        st.lists(st.integers(0, len(cart) - 1), min_size=1, max_size=len(cart), unique=True)
    )
    values = []
    for position in sorted(positions):
        line = cart[position]
        unit = _exact(line["price"]) + sum(
            (_exact(c["price"]) for c in line.get("additionalCosts", {}).values()), Fraction(0)
        )
        values.append(unit * line["quantity"])
    expected_ok = all(_representable(v) for v in values) and _representable(
        sum(values, Fraction(0))
    )
    outcome = apply(
        created.session, decode(return_doc([{"position": p} for p in positions])), context()
    )
    assert isinstance(outcome, Applied) == expected_ok, outcome
    if isinstance(outcome, Applied):
        returned = json.loads(
            dumps(output_document(outcome.events[0], outcome.session)), parse_float=Decimal
        )["return"]
        emitted = [line["value"] for line in returned["lines"]] + [returned["value"]]
        assert [Fraction(v) for v in emitted] == [*values, sum(values, Fraction(0))]
    else:
        assert isinstance(outcome, Rejected)
        assert outcome.rejection.reason is LIMIT


def test_a_value_that_cannot_be_carried_is_named_exactly_and_briefly() -> None:
    """Printed as 9.000000e-1, 0.90000000000000012 read as the 0.9 it is not;
    printed whole, 1e18 and 1e-300 on two lines made a 518-character text."""
    from stream_app.domain.transitions import _unrepresentable

    near = _unrepresentable("/p", "the returned value", Decimal("0.90000000000000012"))
    assert "the returned value 0.90000000000000012 cannot" in str(near)
    long = Decimal("1" + "0" * 18 + "." + "0" * 299 + "1")
    text = str(_unrepresentable("/p", "cartItemTotal", long))
    assert "cartItemTotal 1000000000000000000.00000000000000000000... (319 digits) cannot" in text
    assert len(text) < 300
