"""The fast path of ``decode_command`` agrees with the rules it shortcuts.

``decode_command`` first tries msgspec's typed decoding and falls back to
``decode_by_rules`` for whatever that does not take. Whatever the bytes, the
result must be exactly what ``decode_by_rules`` gives: the same command, down
to each Decimal's digits (compared through the stored form's encoder), or the
same rejection. The documents are generated around the fields the rules
know: each absent, null, valid, at a limit, of a wrong type, or out of range,
with unknown fields and byte-level damage mixed in.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stream_app.domain import Rejection, UpdateCommand, decode_command
from stream_app.domain.decoding import _fast_command, decode_by_rules

_ENCODE = msgspec.json.Encoder().encode

# Scalars at and around every boundary the rules or the JSON reader have.
_BOUNDARIES = [0, 1, -1, 2, 5, 1000, 10_000, 10_001, 2**31 - 1, 2**31, 2**53 + 1]
_INTS = st.sampled_from(
    [*_BOUNDARIES, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]
) | st.integers(-(2**70), 2**70)
_FLOATS = st.sampled_from(
    [0.0, -0.0, 0.1, 19.99, 1e-400, 1.7e308, 9.2e18, 9.3e18, -2.5, 1e-320, 0.30000000000000004]
) | st.floats(allow_nan=False, allow_infinity=False)
_TEXT = (
    st.sampled_from(["", "a", "abcd", "x" * 100, "x" * 101, "x" * 255, "x" * 256, "\u00e9", "\n"])
    | st.text(max_size=12)
    | st.text(alphabet="ab._%+@-\n ", min_size=3, max_size=6)
)
_SCALAR = st.none() | st.booleans() | _INTS | _FLOATS | _TEXT
_ANY = st.recursive(
    _SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)
_ABSENT = object()
_NAME = st.text(alphabet="abcXYZ-_ 0\u00e9\U0001f600", min_size=1, max_size=8)
_PRICE = (
    st.integers(0, 10**6)
    | st.floats(0, 1e6).map(lambda f: round(f, 2))
    | st.sampled_from([0.1, 19.99, 0.30000000000000004, 1e-300, 9.2e18, 2**63 - 1])
)
_MONEY = _INTS | _FLOATS
_CARD = st.text(alphabet="abAB09._%+@-", min_size=4, max_size=12)

Field = tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]


def commands(*, dirty: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Command documents. Each field is (valid values, edge values). Clean:
    every field valid or absent, so most documents are commands. Dirty: each
    field is now and then null, an edge value or anything at all, and objects
    now and then carry a field the rules ignore; most documents are rejected."""

    def value(field: Field) -> st.SearchStrategy[Any]:
        valid, edge = field
        if not dirty:
            return valid

        @st.composite
        def pick(draw: st.DrawFn) -> Any:
            # About one field in 20 goes wrong: many documents have exactly one
            # problem, the case where the fast path must not differ.
            roll = draw(st.integers(0, 19))
            if roll == 0:
                return draw(edge)
            if roll == 1:
                return draw(st.none() | _ANY)
            return draw(valid)

        return pick()

    def obj(fields: dict[str, Field]) -> st.SearchStrategy[dict[str, Any]]:
        @st.composite
        def build(draw: st.DrawFn) -> dict[str, Any]:
            doc = {}
            for name, field in fields.items():
                if draw(st.integers(0, 5)):
                    doc[name] = draw(value(field))
            if dirty and draw(st.integers(0, 19)) == 0:
                ignored = draw(st.sampled_from(["position", "returnedQuantity", "x", "SKU"]))
                doc[ignored] = draw(_ANY)
            return doc

        return build()

    costs: Field = (
        st.dictionaries(_NAME, obj({"price": (_PRICE | st.floats(-100, 0), _MONEY)}), max_size=2),
        st.dictionaries(_TEXT, _ANY, max_size=2),
    )
    attributes: Field = (
        st.dictionaries(_NAME, _SCALAR, max_size=3),
        st.dictionaries(_TEXT, _ANY, max_size=3),
    )
    size: Field = (st.integers(0, 500) | st.floats(0, 500), _MONEY)
    item = obj(
        {
            "sku": (_NAME, _TEXT),
            "quantity": (st.integers(1, 20), _INTS),
            "price": (_PRICE, _MONEY),
            "name": (_NAME, _SCALAR),
            "category": (_NAME, _SCALAR),
            "product": (obj({"name": (_NAME, _TEXT)}), _ANY),
            "weight": size,
            "height": size,
            "width": size,
            "length": size,
            "attributes": attributes,
            "additionalCosts": costs,
        }
    )
    session = obj(
        {
            "profileId": (_NAME | st.just(""), _TEXT),
            "storeIntegrationId": (_NAME, _TEXT),
            "couponCodes": (st.lists(_NAME, max_size=2), st.lists(_TEXT, max_size=2)),
            "referralCode": (_NAME | st.just(""), _TEXT),
            "loyaltyCards": (
                st.lists(_CARD, max_size=1),
                st.lists(_CARD, min_size=2, max_size=2) | st.lists(_TEXT, max_size=1),
            ),
            "state": (
                st.sampled_from(["open", "closed", "cancelled"]),
                st.sampled_from(["partially_returned", "x", "Open"]),
            ),
            "cartItems": (st.lists(item, max_size=4), st.lists(_ANY, max_size=2)),
            "additionalCosts": costs,
            "identifiers": (
                st.lists(_NAME | st.just(""), max_size=5),
                st.lists(_TEXT, min_size=5, max_size=7),
            ),
            "attributes": attributes,
        }
    )
    return_item = obj(
        {
            "position": (st.integers(0, 5), _INTS),
            "sku": (_NAME, _TEXT),
            "quantity": (st.integers(1, 5), _INTS),
        }
    )

    @st.composite
    def command(draw: st.DrawFn) -> dict[str, Any]:
        kind = draw(value((st.sampled_from(["update", "return", "reopen"]), _TEXT)))
        doc = draw(
            obj(
                {
                    "integrationId": (_NAME, _TEXT),
                    "eventId": (_NAME, _TEXT),
                    "applicationId": (st.integers(1, 5), _INTS),
                }
            )
        )
        doc["type"] = kind
        doc["integrationId"] = doc.get("integrationId", "cart")
        if kind == "update" or draw(st.integers(0, 9)) == 0:
            doc["session"] = draw(value((session, _ANY)))
        if kind == "return" or draw(st.integers(0, 9)) == 0:
            entries = (st.lists(return_item, min_size=1, max_size=3), _ANY)
            doc["returnedCartItems"] = draw(value(entries))
        return doc

    return command()


_REPLACEMENT = _SCALAR | _ANY | st.lists(_NAME, min_size=2, max_size=7)


@st.composite
def one_wrong(draw: st.DrawFn) -> dict[str, Any]:
    """A clean document with exactly one place changed: a value replaced, a
    member removed, or an ignored field added (the case where one rule the
    fast path forgets would show)."""
    doc = draw(commands(dirty=False))
    places: list[tuple[dict[str, Any] | list[Any], Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            places.extend((node, key) for key in node)
            for member in node.values():
                walk(member)
        elif isinstance(node, list):
            places.extend((node, index) for index in range(len(node)))
            for member in node:
                walk(member)

    walk(doc)
    container, at = draw(st.sampled_from(places))
    action = draw(st.integers(0, 9))
    if action == 0 and isinstance(container, dict):
        del container[at]
    elif action == 1 and isinstance(container, dict):
        container[draw(st.sampled_from(["position", "returnedQuantity", "x", "SKU"]))] = 1
    else:
        container[at] = draw(_REPLACEMENT)
    return doc


_COMMAND = commands(dirty=False) | commands(dirty=True) | one_wrong()


@st.composite
def command_bytes(draw: st.DrawFn) -> bytes:
    # The standard library's writer: orjson refuses integers past 64 bits.
    raw = json.dumps(draw(_COMMAND), ensure_ascii=draw(st.booleans())).encode()
    damage = draw(st.integers(0, 15))
    if damage == 0 and raw:  # one byte replaced
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=1)) + raw[at + 1 :]
    elif damage == 1:  # text the JSON writer would not produce
        piece = draw(st.sampled_from([b"\\ud800", b"\xff", b"\xed\xa0\x80", b"1e400", b"\\u00e9"]))
        at = raw.rfind(b'"', 0, len(raw) - 1)
        raw = raw[:at] + piece + raw[at:] if at > 0 else raw
    elif damage == 2:  # a duplicate key, the last one wins in both readers
        raw = raw[:-1] + b',"integrationId":"dup"}' if raw.endswith(b"}") and len(raw) > 2 else raw
    return raw


_PRODUCT = (
    b'{"type":"update","integrationId":"a","session":{"state":"closed","cartItems":'
    b'[{"sku":"s","quantity":1,"price":1,"product":{"name":"x","junk":%s}}]}}'
)


def _same(raw: bytes) -> None:
    expected = decode_by_rules(raw)
    fast = _fast_command(raw)
    if fast is not None:
        assert not isinstance(expected, Rejection), (raw, expected)
        assert type(fast) is type(expected)
        assert _ENCODE(fast) == _ENCODE(expected), raw
    got = decode_command(raw)
    if isinstance(expected, Rejection):
        assert got == expected
    else:
        assert _ENCODE(got) == _ENCODE(expected)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(command_bytes())
@example(
    b'{"type":"update","integrationId":"a","session":{"cartItems":[{"sku":"s","quantity":1,"price":-0.0}]}}'
)
@example(
    b'{"type":"update","integrationId":"a","session":{"cartItems":[{"sku":"s","quantity":1,"price":0.0}]}}'
)
@example(
    b'{"type":"update","integrationId":"a","session":{"attributes":{"n":18446744073709551615}}}'
)
@example(
    b'{"type":"update","integrationId":"a","session":{"attributes":{"n":123456789012345678901}}}'
)
@example(b'{"type":"update","integrationId":"a","session":{"loyaltyCards":["abcd\\n"]}}')
@example(b'{"type":"reopen","integrationId":"a","x":1e400}')
@example(b'{"type":"reopen","integrationId":"a","x":"\xff"}')
# An unknown field of an item's product: read by orjson's rules (it checks
# what msgspec would skip), and nested deeper than msgspec reads.
@example(_PRODUCT % b"1e400")
@example(_PRODUCT % b'"\xff"')
@example(_PRODUCT % (b"[" * 1000 + b"]" * 1000))
@example(_PRODUCT % (b"[" * 1100 + b"]" * 1100))
def test_the_fast_path_gives_what_the_rules_give(raw: bytes) -> None:
    _same(raw)


@pytest.mark.parametrize(
    "prices",
    [
        (0.0, -0.0, 0.0),
        (-0.0, 0.0, -0.0),
        (2.5, 2.5),
        (-2.5, -2.5),
        (9.3e18, 9.3e18),
        (1e-320,) * 2,
    ],
)
def test_remembered_prices_answer_as_the_rules_do(prices: tuple[float, ...]) -> None:
    """The fast path remembers the decimals of float prices, item and additional
    cost alike: a price read again, or its other zero, still decodes as the rules
    decode it (the sign of -0.0 included)."""
    for price in prices:
        for where in (
            {"additionalCosts": {"ship": {"price": price}}},
            {
                "cartItems": [
                    {
                        "sku": "s",
                        "quantity": 1,
                        "price": abs(price),
                        "additionalCosts": {"wrap": {"price": price}},
                    }
                ]
            },
        ):
            raw = orjson.dumps({"type": "update", "integrationId": "a", "session": where})
            _same(raw)
            assert _fast_command(raw) is not None or abs(price) >= 2**63, raw


def test_the_fast_path_takes_the_commands_checkout_systems_send() -> None:
    """Not a vacuous agreement: typical commands do take the fast path."""
    update = {
        "type": "update",
        "integrationId": "cart-1",
        "eventId": "e-1",
        "applicationId": 1,
        "session": {
            "profileId": "p",
            "couponCodes": ["SUMMER10"],
            "loyaltyCards": ["card-0001"],
            "cartItems": [
                {"sku": "A", "quantity": 2, "price": 19.99, "name": "Mug", "attributes": {"c": 1}},
                {
                    "sku": "B",
                    "quantity": 1,
                    "price": 5,
                    "additionalCosts": {"gift": {"price": 1.5}},
                },
            ],
            "additionalCosts": {"shipping": {"price": 4.95}},
            "attributes": {"city": "Berlin", "gone": None},
            "state": "closed",
        },
    }
    returned = {"type": "return", "integrationId": "cart-1", "returnedCartItems": [{"sku": "A"}]}
    for doc in (update, returned, {"type": "reopen", "integrationId": "cart-1"}):
        raw = orjson.dumps(doc)
        assert _fast_command(raw) is not None, doc
        _same(raw)
    fast = _fast_command(orjson.dumps(update))
    assert isinstance(fast, UpdateCommand)
    assert fast.session.cart_items is not None
    assert [str(i.price) for i in fast.session.cart_items] == ["19.99", "5"]


@pytest.mark.parametrize(
    "doc",
    [
        {
            "type": "update",
            "integrationId": "a",
            "session": {"cartItems": [{"sku": "s", "quantity": 1, "price": 1, "position": 7}]},
        },
        {"type": "update", "integrationId": "a", "session": {"attributes": {"deep": [1, [2]]}}},
        {
            "type": "update",
            "integrationId": "a",
            "session": {"cartItems": [{"sku": "s", "quantity": 1, "price": 2**63}]},
        },
    ],
)
def test_what_the_fast_path_hands_on_is_still_decided(doc: dict[str, Any]) -> None:
    raw = orjson.dumps(doc)
    assert _fast_command(raw) is None
    _same(raw)


_FULL_UPDATE: dict[str, Any] = {
    "type": "update",
    "integrationId": "cart-1",
    "eventId": "e-1",
    "applicationId": 7,
    "session": {
        "profileId": "p-1",
        "storeIntegrationId": "store-1",
        "couponCodes": ["SUMMER10", "X"],
        "referralCode": "ref",
        "loyaltyCards": ["card-0001"],
        "state": "open",
        "cartItems": [
            {
                "sku": "A",
                "quantity": 2,
                "price": 19.99,
                "name": "Mug",
                "category": "home",
                "product": {"name": "Mugs"},
                "weight": 1.5,
                "height": 10,
                "width": 0,
                "length": 3.25,
                "attributes": {"color": "red", "n": 1, "f": 0.5, "b": True, "z": None},
                "additionalCosts": {"gift": {"price": 1.5}, "fee": {"price": -2}},
            },
            {"sku": "B", "quantity": 1, "price": 5},
        ],
        "additionalCosts": {"shipping": {"price": 4.95}},
        "identifiers": ["d-1", ""],
        "attributes": {"city": "Berlin", "gone": None, "n": 2**63 - 1},
    },
}
_FULL_RETURN: dict[str, Any] = {
    "type": "return",
    "integrationId": "cart-1",
    "returnedCartItems": [{"position": 0, "sku": "A", "quantity": 1}, {"sku": "B"}],
}
#: Values every field gets in turn: each type, and each limit of a number,
#: a string or a list that one rule or another draws.
_REPLACEMENTS: list[Any] = [
    None,
    True,
    0,
    1,
    -1,
    -0.0,
    0.5,
    -0.5,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    1.7e308,
    "",
    "abc",
    "abcd\n",
    "x" * 101,
    "x" * 256,
    "x" * 1001,
    [],
    {},
    [[1]],
    {"a": {"b": 1}},
    {"price": 1},
    ["a"] * 6,
    ["card-0001", "card-0002"],
    "partially_returned",
]


def _places(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = []
    if isinstance(node, dict):
        for key, member in node.items():
            found.append((*path, key))
            found += _places(member, (*path, key))
    elif isinstance(node, list):
        for index, member in enumerate(node):
            found.append((*path, index))
            found += _places(member, (*path, index))
    return found


def _changed(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    copy = json.loads(json.dumps(doc))
    node = copy
    for step in path[:-1]:
        node = node[step]
    if value is _ABSENT:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return copy


@pytest.mark.parametrize("doc", [_FULL_UPDATE, _FULL_RETURN], ids=["update", "return"])
def test_every_single_change_of_a_full_command_is_decided_alike(doc: dict[str, Any]) -> None:
    """Every field of a command using every field, replaced in turn by each of
    the values above, or removed, or joined by a field the rules ignore."""
    _same(json.dumps(doc).encode())
    assert _fast_command(json.dumps(doc).encode()) is not None
    for path in _places(doc):
        for value in [*_REPLACEMENTS, _ABSENT]:
            if value is _ABSENT and isinstance(path[-1], int):
                continue
            _same(json.dumps(_changed(doc, path, value)).encode())
        if isinstance(path[-1], str):
            parent = _changed(doc, path, _ABSENT)
            node = parent
            for step in path[:-1]:
                node = node[step]
            node["position"] = 1  # ignored by the rules: handed on, then decided
            _same(json.dumps(parent).encode())
