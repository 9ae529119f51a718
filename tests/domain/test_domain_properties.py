"""Property-based invariants over random command sequences and random input."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from domain_support import T0, CountingIds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream_app.domain import (
    ApplicationSettings,
    Applied,
    CommandContext,
    Duplicate,
    Rejected,
    Rejection,
    Session,
    apply,
    decode_command,
    encode_session,
    output_document,
)
from stream_app.json import dumps

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SKUS = st.sampled_from(["A", "B", "C"])
PRICES = st.one_of(
    st.sampled_from([0, 0.1, 0.2, 0.3, 1.5, 19.99, 1e-7, 123456.789, 10]),
    st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False),
    st.integers(min_value=0, max_value=10**12),
)
COSTS = st.dictionaries(
    st.sampled_from(["ship", "wrap"]), st.fixed_dictionaries({"price": PRICES}), max_size=2
)
ITEM = st.fixed_dictionaries(
    {"sku": SKUS, "quantity": st.integers(1, 4), "price": PRICES},
    optional={"additionalCosts": COSTS, "attributes": st.just({"k": 1})},
)
SESSION_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "state": st.sampled_from(["open", "closed", "cancelled", "partially_returned"]),
        "cartItems": st.lists(ITEM, max_size=4),
        "additionalCosts": COSTS,
        "couponCodes": st.lists(st.sampled_from(["X", "Y"]), max_size=2),
        "referralCode": st.sampled_from(["", "R"]),
        "attributes": st.dictionaries(
            st.sampled_from(["a", "b"]), st.one_of(st.none(), st.integers(-5, 5)), max_size=2
        ),
    },
)
RETURN_ENTRY = st.fixed_dictionaries(
    {},
    optional={
        "position": st.integers(0, 4),
        "sku": SKUS,
        "quantity": st.integers(1, 4),
    },
).filter(lambda entry: "position" in entry or "sku" in entry)
EVENT_ID = st.one_of(st.none(), st.sampled_from([f"e{i}" for i in range(6)]))


@st.composite
def commands(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["update", "update", "return", "reopen"]))
    doc: dict[str, Any] = {"type": kind, "integrationId": "s"}
    event_id = draw(EVENT_ID)
    if event_id is not None:
        doc["eventId"] = event_id
    if kind == "update":
        doc["session"] = draw(SESSION_FIELDS)
    elif kind == "return":
        doc["returnedCartItems"] = draw(st.lists(RETURN_ENTRY, min_size=1, max_size=3))
    return doc


SEQUENCES = st.lists(commands(), min_size=1, max_size=12)

ALLOWED = {
    (None, "update", "open"): "open",
    (None, "update", "closed"): "closed",
    ("open", "update", "open"): "open",
    ("open", "update", "closed"): "closed",
    ("open", "update", "cancelled"): "cancelled",
    ("closed", "update", "cancelled"): "cancelled",
    ("closed", "return", None): "partially_returned",
    ("closed", "reopen", None): "open",
    ("partially_returned", "return", None): "partially_returned",
    ("partially_returned", "update", "cancelled"): "cancelled",
}


def _frac(value: Any) -> Fraction:
    return Fraction(str(value))


def _check_totals(session: Session) -> None:
    items = sum((_frac(i.price) * i.quantity for i in session.cart_items), Fraction(0))
    item_costs = sum(
        (
            _frac(c.price) * i.quantity
            for i in session.cart_items
            for c in (i.additional_costs or {}).values()
        ),
        Fraction(0),
    )
    costs = sum((_frac(c.price) for c in session.additional_costs.values()), Fraction(0))
    assert _frac(session.cart_item_total) == items
    assert _frac(session.cart_item_additional_cost_total) == item_costs
    assert _frac(session.additional_cost_total) == costs
    assert _frac(session.total) == items + item_costs + costs
    for position, line in enumerate(session.cart_items):
        assert line.position == position
        assert 0 <= line.returned_quantity <= line.quantity
        assert line.remaining_quantity == line.quantity - line.returned_quantity >= 0


def _run(docs: list[dict[str, Any]], flattening: bool) -> list[tuple[object, ...]]:
    """Apply the sequence, checking invariants; returns a trace for replay checks."""
    session: Session | None = None
    ids = CountingIds()
    app_settings = ApplicationSettings(flattening=flattening)
    trace: list[tuple[object, ...]] = []
    for offset, doc in enumerate(docs):
        command = decode_command(dumps(doc))
        assert not isinstance(command, Rejection), command
        ctx = CommandContext(T0 + offset, f"commands[0]@{offset}", 1, app_settings, ids)
        before = encode_session(session) if session is not None else None
        calls = ids.calls
        outcome = apply(session, command, ctx)
        if session is not None:
            assert encode_session(session) == before  # the stored session is never mutated
        if isinstance(outcome, Applied):
            new = outcome.session
            target = (
                doc.get("session", {}).get("state", "open") if doc["type"] == "update" else None
            )
            state = session.state.value if session is not None else None
            assert ALLOWED[(state, doc["type"], target)] == new.state
            assert ids.calls == calls + (1 if session is None else 0)
            assert new.update_count == (1 if session is None else session.update_count + 1)
            assert new.updated_ms == T0 + offset
            _check_totals(new)
            outputs = [dumps(output_document(event, new)) for event in outcome.events]
            trace.append(("applied", encode_session(new), tuple(outputs)))
            session = new
        elif isinstance(outcome, Duplicate):
            assert outcome.session is session
            assert ids.calls == calls
            trace.append(("duplicate",))
        else:
            assert isinstance(outcome, Rejected)
            assert ids.calls == calls
            trace.append(("rejected", outcome.rejection.reason, outcome.rejection.errors))
    return trace


@FAST
@given(SEQUENCES, st.booleans())
def test_random_sequences_keep_the_invariants_and_replay_identically(
    docs: list[dict[str, Any]], flattening: bool
) -> None:
    assert _run(docs, flattening) == _run(docs, flattening)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(raw: bytes) -> None:
    result = decode_command(raw)
    if isinstance(result, Rejection):
        dumps(result.to_document())


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)
KEYS = st.sampled_from(
    [
        "type",
        "integrationId",
        "eventId",
        "applicationId",
        "session",
        "returnedCartItems",
        "cartItems",
        "sku",
        "quantity",
        "price",
        "position",
        "state",
        "additionalCosts",
        "attributes",
        "couponCodes",
        "loyaltyCards",
        "identifiers",
    ]
)
SHAPED_JSON = st.recursive(
    JSON | st.sampled_from(["update", "return", "reopen", "closed", "open", "cancelled"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(KEYS, children, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON, SHAPED_JSON))
def test_random_json_never_raises(doc: Any) -> None:
    result = decode_command(dumps(doc))
    if isinstance(result, Rejection):
        dumps(result.to_document())
        return
    open_session = _open_session()
    for session in (None, open_session):
        outcome = apply(
            session, result, CommandContext(T0, "x", 1, ApplicationSettings(), CountingIds())
        )
        assert isinstance(outcome, Applied | Duplicate | Rejected)


_OPEN: list[Session] = []


def _open_session() -> Session:
    if not _OPEN:
        command = decode_command(
            b'{"type":"update","integrationId":"s","session":{"cartItems":[{"sku":"A","quantity":2,"price":1}]}}'
        )
        assert not isinstance(command, Rejection)
        outcome = apply(
            None, command, CommandContext(T0, "seed", 1, ApplicationSettings(), CountingIds())
        )
        assert isinstance(outcome, Applied)
        _OPEN.append(outcome.session)
    return _OPEN[0]
