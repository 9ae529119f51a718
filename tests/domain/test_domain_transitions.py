"""The state machine, merge semantics, returns, reopen and idempotency."""

from __future__ import annotations

from decimal import Context, Decimal, getcontext, localcontext
from typing import Any

import msgspec
import pytest
from domain_support import (
    T0,
    CountingIds,
    applied,
    context,
    decode,
    fresh_event_id,
    item,
    rejected,
    reopen_doc,
    return_doc,
    run,
    session_in,
    update_doc,
)

from stream_app.domain import (
    RECENT_EVENT_IDS,
    ApplicationSettings,
    Applied,
    Duplicate,
    EventName,
    Reason,
    Rejected,
    Session,
    SessionState,
    apply,
)

E = EventName

# --------------------------------------------------------------------------- the table

COMMANDS: dict[str, dict[str, Any]] = {
    "update": update_doc({"couponCodes": ["X1"]}),
    "update open": update_doc({"state": "open"}),
    "update closed": update_doc({"state": "closed"}),
    "update cancelled": update_doc({"state": "cancelled"}),
    "update partially_returned": update_doc({"state": "partially_returned"}),
    "return": return_doc([{"position": 0, "quantity": 1}]),
    "reopen": reopen_doc(),
}

# (from, command) -> (to, events); everything else is rejected.
TABLE: dict[tuple[str, str], tuple[str, tuple[EventName, ...]]] = {
    ("none", "update"): ("open", (E.CREATED,)),
    ("none", "update open"): ("open", (E.CREATED,)),
    ("none", "update closed"): ("closed", (E.CREATED, E.CLOSED)),
    ("open", "update"): ("open", (E.UPDATED,)),
    ("open", "update open"): ("open", (E.UPDATED,)),
    ("open", "update closed"): ("closed", (E.CLOSED,)),
    ("open", "update cancelled"): ("cancelled", (E.CANCELLED,)),
    ("closed", "update cancelled"): ("cancelled", (E.REVOKED,)),
    ("closed", "return"): ("partially_returned", (E.PARTIALLY_RETURNED,)),
    ("closed", "reopen"): ("open", (E.REOPENED,)),
    ("partially_returned", "return"): ("partially_returned", (E.PARTIALLY_RETURNED,)),
    ("partially_returned", "update cancelled"): ("cancelled", (E.CANCELLED,)),
}
STATES = ("none", "open", "closed", "partially_returned", "cancelled")
ALL_PAIRS = [(state, command) for state in STATES for command in COMMANDS]
REJECTED_PAIRS = [pair for pair in ALL_PAIRS if pair not in TABLE]


def _stored(state: str) -> Session | None:
    return None if state == "none" else session_in(state)


@pytest.mark.parametrize(("state", "command"), list(TABLE))
def test_allowed_transition(state: str, command: str) -> None:
    to, names = TABLE[(state, command)]
    ids = CountingIds()
    outcome = apply(
        _stored(state), decode({**COMMANDS[command], "eventId": "e-x"}), context(ids=ids)
    )
    assert isinstance(outcome, Applied)
    assert outcome.session.state == to
    assert tuple(event.name for event in outcome.events) == names
    assert all(event.event_id == "e-x" and event.timestamp_ms == T0 for event in outcome.events)
    assert ids.calls == (1 if state == "none" else 0)


@pytest.mark.parametrize(("state", "command"), REJECTED_PAIRS)
def test_everything_else_is_rejected_and_changes_nothing(state: str, command: str) -> None:
    stored = _stored(state)
    ids = CountingIds()
    outcome = apply(stored, decode(COMMANDS[command]), context(ids=ids))
    assert isinstance(outcome, Rejected)
    expected = (
        Reason.UNKNOWN_SESSION
        if state == "none" and command in {"return", "reopen"}
        else Reason.INVALID_TRANSITION
    )
    assert outcome.rejection.reason == expected
    assert ids.calls == 0
    if stored is not None:
        # A later command still sees the same session: nothing was recorded.
        assert stored == _stored_copy(stored)


def _stored_copy(session: Session) -> Session:
    from stream_app.domain import decode_session, encode_session

    return decode_session(encode_session(session))


def test_rejection_pointers_for_transitions() -> None:
    assert rejected(None, COMMANDS["return"]).errors[0].pointer == "/integrationId"
    assert rejected(None, COMMANDS["update cancelled"]).errors[0].pointer == "/session/state"
    closed = session_in("closed")
    assert rejected(closed, COMMANDS["update"]).errors[0].pointer == "/type"
    assert rejected(closed, COMMANDS["update closed"]).errors[0].pointer == "/session/state"


def test_a_refused_update_of_a_session_not_open_says_what_it_accepts() -> None:
    """Before, an update without a state on a closed session read "a closed
    session cannot be updated to its current state", as if its state were
    what was wrong with it."""
    content = {"couponCodes": []}
    assert rejected(session_in("closed"), update_doc(content)).errors[0].details == (
        "a closed session accepts only an update to cancelled, not one that changes its "
        "content: reopen it first to change it"
    )
    returned = rejected(session_in("partially_returned"), COMMANDS["update closed"])
    assert returned.errors[0].details == (
        "a partially_returned session accepts only an update to cancelled, not one to "
        "closed: it cannot be reopened"
    )
    cancelled = rejected(session_in("cancelled"), update_doc(content))
    assert cancelled.errors[0].details == "a cancelled session accepts no update"


# --------------------------------------------------------------------------- creation


def test_creation_sets_identity_times_and_counters() -> None:
    ids = CountingIds(start=41)
    outcome = applied(
        None,
        update_doc({"profileId": "", "cartItems": [item()]}, integration_id="abc"),
        ids=ids,
        application_id=7,
        source_event_id="commands[3]@17",
    )
    session = outcome.session
    assert (session.id, session.integration_id, session.application_id) == (42, "abc", 7)
    assert (session.created_ms, session.updated_ms, session.update_count) == (T0, T0, 1)
    assert session.first_session is True
    assert session.profile_id == ""
    assert outcome.events[0].event_id == "commands[3]@17"
    assert session.recent_event_ids == ("commands[3]@17",)


def test_first_session_false_for_profiles_until_pipeline_decides() -> None:
    session = applied(None, update_doc({"profileId": "p-1"})).session
    assert session.first_session is False


def test_a_session_that_loses_its_profile_is_a_first_session() -> None:
    """Anonymous sessions are always first sessions (contract section 12), also
    one created with a profile that an update then clears; one that gets a
    profile keeps its value, which the pipeline's profile stage overrides."""
    profiled = applied(None, update_doc({"profileId": "p-1"}, eventId="a")).session
    anonymous = applied(profiled, update_doc({"profileId": ""}, eventId="b")).session
    assert anonymous.first_session is True
    closed = applied(anonymous, update_doc({"state": "closed"}, eventId="c")).session
    assert closed.first_session is True
    again = applied(anonymous, update_doc({"profileId": "p-2"}, eventId="d")).session
    assert again.first_session is True


def test_an_anonymous_session_stored_with_a_false_first_session_is_emitted_first() -> None:
    """Earlier versions kept a cleared profile's placeholder (false) in the
    stored session; returns, revokes and reopens carry the stored value on."""
    from stream_app.domain import session_document

    stored = msgspec.structs.replace(session_in("closed", CART), first_session=False, profile_id="")
    returned = applied(stored, return_doc([{"position": 0, "quantity": 1}])).session
    assert session_document(returned)["firstSession"] is True


def test_update_count_and_updated_follow_applied_commands_only() -> None:
    s1 = applied(None, update_doc({}, eventId="a")).session
    s2 = applied(s1, update_doc({}, eventId="b"), timestamp_ms=T0 + 5).session
    assert (s2.update_count, s2.created_ms, s2.updated_ms) == (2, T0, T0 + 5)
    assert isinstance(run(s2, update_doc({}, eventId="b"), timestamp_ms=T0 + 9), Duplicate)
    assert isinstance(run(s2, update_doc({"state": "partially_returned"})), Rejected)
    s3 = applied(s2, update_doc({"state": "closed"}, eventId="c"), timestamp_ms=T0 + 10).session
    assert (s3.update_count, s3.updated_ms) == (3, T0 + 10)


# --------------------------------------------------------------------------- merge


def test_present_fields_replace_absent_fields_keep() -> None:
    s1 = applied(
        None,
        update_doc(
            {
                "profileId": "p",
                "storeIntegrationId": "store-1",
                "couponCodes": ["A", "B"],
                "referralCode": "REF",
                "loyaltyCards": ["card-0001"],
                "identifiers": ["1.2.3.4"],
                "cartItems": [item("A", 2, 1.5)],
                "additionalCosts": {"shipping": {"price": 5}},
            }
        ),
    ).session
    s2 = applied(s1, update_doc({"couponCodes": ["C"], "storeIntegrationId": "store-2"})).session
    assert s2.coupon_codes == ("C",)
    assert s2.store_integration_id == "store-2"
    assert (s2.profile_id, s2.referral_code, s2.loyalty_cards) == ("p", "REF", ("card-0001",))
    assert s2.identifiers == ("1.2.3.4",)
    assert s2.cart_items == s1.cart_items
    assert s2.total == Decimal(8)


def test_empty_coupon_list_and_empty_referral_clear() -> None:
    s1 = applied(None, update_doc({"couponCodes": ["A"], "referralCode": "R"})).session
    s2 = applied(s1, update_doc({"couponCodes": [], "referralCode": ""})).session
    assert (s2.coupon_codes, s2.referral_code) == ((), "")


def test_null_means_absent() -> None:
    s1 = applied(None, update_doc({"couponCodes": ["A"], "profileId": "p"})).session
    s2 = applied(s1, update_doc({"couponCodes": None, "profileId": None}, eventId=None)).session
    assert (s2.coupon_codes, s2.profile_id) == (("A",), "p")


def test_cart_is_replaced_whole() -> None:
    s1 = applied(
        None, update_doc({"cartItems": [item("A", attributes={"gift": True}), item("B")]})
    ).session
    s2 = applied(s1, update_doc({"cartItems": [item("A", 2)]})).session
    assert [(line.sku, line.quantity, line.attributes) for line in s2.cart_items] == [
        ("A", 2, None)
    ]
    s3 = applied(s2, update_doc({"cartItems": []})).session
    assert s3.cart_items == ()
    assert s3.total == 0


def test_attributes_merge_key_by_key_and_null_deletes() -> None:
    s1 = applied(None, update_doc({"attributes": {"a": 1, "b": {"x": 1}, "gone": None}})).session
    assert s1.attributes == {"a": 1, "b": {"x": 1}}
    s2 = applied(s1, update_doc({"attributes": {"b": None, "c": [1, 2], "missing": None}})).session
    assert s2.attributes == {"a": 1, "c": [1, 2]}
    assert s1.attributes == {"a": 1, "b": {"x": 1}}  # the stored session is never mutated


def test_closing_update_applies_its_fields() -> None:
    s1 = applied(None, update_doc({"cartItems": [item("A")]})).session
    s2 = applied(s1, update_doc({"state": "closed", "cartItems": [item("B", 2, 3)]})).session
    assert s2.state == SessionState.CLOSED
    assert [line.sku for line in s2.cart_items] == ["B"]
    assert s2.total == 6


@pytest.mark.parametrize("state", ["closed", "partially_returned"])
def test_cancelling_a_closed_session_changes_only_the_state(state: str) -> None:
    stored = session_in(state)
    settings = ApplicationSettings(attributes=frozenset({"known"}))
    after = applied(
        stored,
        update_doc({"state": "cancelled", "couponCodes": ["NEW"], "attributes": {"x": 1}}),
        settings=settings,
    ).session
    assert after.state == SessionState.CANCELLED
    assert (after.coupon_codes, after.attributes, after.cart_items) == (
        stored.coupon_codes,
        stored.attributes,
        stored.cart_items,
    )


# --------------------------------------------------------------------------- totals


def test_totals_are_exact_decimals() -> None:
    session = applied(
        None,
        update_doc(
            {
                "cartItems": [
                    item("A", 1, 0.1),
                    item("B", 1, 0.2, additionalCosts={"wrap": {"price": 0.1}}),
                    item("C", 3, 0.1, additionalCosts={"wrap": {"price": 0.2}, "x": {"price": 1}}),
                ],
                "additionalCosts": {"shipping": {"price": 0.1}, "fee": {"price": 0.2}},
            }
        ),
    ).session
    assert session.cart_item_total == Decimal("0.6")
    assert session.cart_item_additional_cost_total == Decimal("3.7")
    assert session.additional_cost_total == Decimal("0.3")
    assert session.total == Decimal("4.6")


def test_totals_are_exact_whatever_the_callers_decimal_context() -> None:
    """apply computes in its own exact context and gives the caller's back,
    after an applied command, a rejection and an unexpected exception alike."""
    doc = update_doc({"cartItems": [item("A", 3, 123456.789), item("B", 7, 0.01)]})
    with localcontext(Context(prec=3, traps=[])) as mine:
        session = applied(None, doc).session
        assert getcontext() is mine
        assert rejected(None, update_doc({"state": "partially_returned"}))
        assert getcontext() is mine
        with pytest.raises(AttributeError):  # a bug's exception, raised inside apply's context
            apply(None, decode({**doc, "eventId": "e-1"}), None)  # type: ignore[arg-type]
        assert getcontext() is mine
    assert session.cart_item_total == Decimal("370370.437")
    assert session.total == Decimal("370370.437")


def test_additional_costs_replace_and_keep_cart_totals() -> None:
    s1 = applied(
        None,
        update_doc({"cartItems": [item("A", 2, 1.25)], "additionalCosts": {"s": {"price": 1}}}),
    ).session
    s2 = applied(s1, update_doc({"additionalCosts": {}})).session
    assert (s2.cart_item_total, s2.additional_cost_total, s2.total) == (
        Decimal("2.5"),
        Decimal(0),
        Decimal("2.5"),
    )


# --------------------------------------------------------------------------- settings


def test_flattening_quantity_limit_boundary() -> None:
    at_limit = [item(f"S{i}", 10) for i in range(1000)]
    assert applied(None, update_doc({"cartItems": at_limit})).session.cart_items[-1].quantity == 10
    over = [*at_limit[:-1], item("S999", 11)]
    rejection = rejected(None, update_doc({"cartItems": over}))
    assert rejection.reason == Reason.LIMIT_EXCEEDED
    assert rejection.errors[0].pointer == "/session/cartItems"
    no_flattening = ApplicationSettings(flattening=False)
    assert applied(None, update_doc({"cartItems": over}), settings=no_flattening)
    huge = [item("S", 1_000_000)]
    assert applied(None, update_doc({"cartItems": huge}), settings=no_flattening)


def test_quantity_limit_is_checked_on_updates_of_open_sessions() -> None:
    stored = session_in("open")
    rejection = rejected(stored, update_doc({"cartItems": [item("A", 10_001)]}))
    assert rejection.reason == Reason.LIMIT_EXCEEDED


def test_unknown_additional_costs_are_rejected_when_listed() -> None:
    settings = ApplicationSettings(additional_costs=frozenset({"shipping"}))
    ok = update_doc(
        {
            "additionalCosts": {"shipping": {"price": 1}},
            "cartItems": [item(additionalCosts={"shipping": {"price": 1}})],
        }
    )
    assert applied(None, ok, settings=settings)
    session_level = rejected(
        None, update_doc({"additionalCosts": {"a/b": {"price": 1}}}), settings=settings
    )
    assert session_level.reason == Reason.UNKNOWN_ADDITIONAL_COST
    assert session_level.errors[0].pointer == "/session/additionalCosts/a~1b"
    item_level = rejected(
        None,
        update_doc({"cartItems": [item(), item(additionalCosts={"wrap": {"price": 1}})]}),
        settings=settings,
    )
    assert item_level.reason == Reason.UNKNOWN_ADDITIONAL_COST
    assert item_level.errors[0].pointer == "/session/cartItems/1/additionalCosts/wrap"
    assert applied(None, update_doc({"additionalCosts": {"any": {"price": 1}}}))


def test_unknown_attributes_are_rejected_when_listed() -> None:
    settings = ApplicationSettings(attributes=frozenset({"city"}))
    assert applied(None, update_doc({"attributes": {"city": "Berlin"}}), settings=settings)
    rejection = rejected(
        None, update_doc({"attributes": {"city": "x", "colour": None}}), settings=settings
    )
    assert rejection.reason == Reason.UNKNOWN_ATTRIBUTE
    assert rejection.errors[0].pointer == "/session/attributes/colour"


def test_application_mismatch_is_rejected() -> None:
    stored = session_in("open")
    rejection = rejected(stored, update_doc({}), application_id=2)
    assert rejection.reason == Reason.APPLICATION_MISMATCH
    other = rejected(stored, update_doc({}, integration_id="other"))
    assert other.reason == Reason.APPLICATION_MISMATCH


# --------------------------------------------------------------------------- returns

CART = [
    item("A", 3, 2.5),
    item("B", 1, 10, additionalCosts={"deposit": {"price": 0.25}}),
    item("A", 2, 2.5),
]


def _closed(**settings: Any) -> Session:
    return session_in("closed", CART, **settings)


def test_returns_over_several_commands() -> None:
    s1 = _closed()
    first = applied(s1, return_doc([{"position": 0, "quantity": 1}]))
    s2 = first.session
    assert s2.state == SessionState.PARTIALLY_RETURNED
    assert (s2.cart_items[0].returned_quantity, s2.cart_items[0].remaining_quantity) == (1, 2)
    returned = first.events[0].returned
    assert returned is not None
    assert [(ln.position, ln.sku, ln.quantity, ln.value) for ln in returned.lines] == [
        (0, "A", 1, Decimal("2.5"))
    ]
    second = applied(s2, return_doc([{"position": 1}, {"position": 0, "quantity": 2}]))
    s3 = second.session
    returned = second.events[0].returned
    assert returned is not None
    assert [(ln.position, ln.quantity, ln.value) for ln in returned.lines] == [
        (0, 2, Decimal(5)),
        (1, 1, Decimal("10.25")),
    ]
    assert returned.value == Decimal("15.25")
    assert [line.remaining_quantity for line in s3.cart_items] == [0, 0, 2]
    # Totals are those of the cart as sent; returns do not rewrite them.
    assert s3.total == s1.total == Decimal("22.75")
    over = rejected(s3, return_doc([{"position": 2, "quantity": 3}]))
    assert over.reason == Reason.RETURN_EXCEEDS_REMAINING
    assert over.errors[0].pointer == "/returnedCartItems/0/quantity"
    nothing_left = rejected(s3, return_doc([{"position": 0}]))
    assert nothing_left.reason == Reason.RETURN_EXCEEDS_REMAINING
    s4 = applied(s3, return_doc([{"position": 2}])).session
    assert all(line.remaining_quantity == 0 for line in s4.cart_items)
    assert s4.state == SessionState.PARTIALLY_RETURNED
    assert s4.update_count == s1.update_count + 3


def test_return_by_sku_takes_the_first_line_with_quantity_left() -> None:
    s1 = _closed()
    outcome = applied(s1, return_doc([{"sku": "A", "quantity": 3}, {"sku": "A"}]))
    assert [line.returned_quantity for line in outcome.session.cart_items] == [3, 0, 2]
    returned = outcome.events[0].returned
    assert returned is not None
    assert [(ln.position, ln.quantity) for ln in returned.lines] == [(0, 3), (2, 2)]
    assert rejected(outcome.session, return_doc([{"sku": "A"}])).reason == (
        Reason.RETURN_EXCEEDS_REMAINING
    )
    unknown = rejected(s1, return_doc([{"sku": "Z"}]))
    assert unknown.reason == Reason.UNKNOWN_CART_ITEM
    assert unknown.errors[0].pointer == "/returnedCartItems/0/sku"
    spill = rejected(s1, return_doc([{"sku": "A", "quantity": 4}]))
    assert spill.reason == Reason.RETURN_EXCEEDS_REMAINING


def test_return_with_position_and_sku_must_match() -> None:
    s1 = _closed()
    assert applied(s1, return_doc([{"position": 1, "sku": "B"}]))
    mismatch = rejected(s1, return_doc([{"position": 1, "sku": "A"}]))
    assert mismatch.reason == Reason.SKU_MISMATCH
    assert mismatch.errors[0].pointer == "/returnedCartItems/0/sku"
    outside = rejected(s1, return_doc([{"position": 0}, {"position": 3}]))
    assert outside.reason == Reason.UNKNOWN_CART_ITEM
    assert outside.errors[0].pointer == "/returnedCartItems/1/position"


def test_same_line_twice_is_summed() -> None:
    s1 = _closed()
    outcome = applied(s1, return_doc([{"position": 0, "quantity": 1}, {"sku": "A", "quantity": 1}]))
    returned = outcome.events[0].returned
    assert returned is not None
    assert [(ln.position, ln.quantity) for ln in returned.lines] == [(0, 2)]
    over = rejected(
        s1, return_doc([{"position": 0, "quantity": 2}, {"position": 0, "quantity": 2}])
    )
    assert over.reason == Reason.RETURN_EXCEEDS_REMAINING
    assert over.errors[0].pointer == "/returnedCartItems/1/quantity"


def test_without_flattening_lines_are_returned_whole() -> None:
    s1 = _closed(flattening=False)
    settings = ApplicationSettings(flattening=False)
    partial = rejected(s1, return_doc([{"position": 0, "quantity": 2}]), settings=settings)
    assert partial.reason == Reason.PARTIAL_LINE_RETURN
    assert partial.errors[0].pointer == "/returnedCartItems/0"
    whole = applied(s1, return_doc([{"position": 0, "quantity": 3}]), settings=settings)
    assert whole.session.cart_items[0].remaining_quantity == 0
    implicit = applied(s1, return_doc([{"position": 0}]), settings=settings).session
    assert implicit.cart_items == whole.session.cart_items
    summed = applied(
        s1,
        return_doc([{"position": 0, "quantity": 1}, {"position": 0, "quantity": 2}]),
        settings=settings,
    )
    assert summed.session.cart_items[0].returned_quantity == 3


def test_flattening_turned_off_after_a_partial_return_leaves_the_rest_returnable() -> None:
    """Whole is all that remains of the line: before, the remainder of a line
    returned in part while flattening was on could never be returned."""
    part = applied(_closed(), return_doc([{"position": 0, "quantity": 1}])).session
    settings = ApplicationSettings(flattening=False)
    still_partial = rejected(part, return_doc([{"position": 0, "quantity": 1}]), settings=settings)
    assert still_partial.reason == Reason.PARTIAL_LINE_RETURN
    assert "returned whole (2)" in still_partial.errors[0].details
    rest = applied(part, return_doc([{"position": 0}]), settings=settings).session
    assert rest.cart_items[0].remaining_quantity == 0
    explicit = applied(part, return_doc([{"position": 0, "quantity": 2}]), settings=settings)
    assert explicit.session.cart_items == rest.cart_items


def test_reopen_then_close_again() -> None:
    s1 = _closed()
    s2 = applied(s1, reopen_doc()).session
    assert s2.state == SessionState.OPEN
    s3 = applied(s2, update_doc({"cartItems": [item("Z", 1, 1)]})).session
    assert s3.state == SessionState.OPEN
    closing = applied(s3, update_doc({"state": "closed"}))
    assert closing.session.state == SessionState.CLOSED
    assert [event.name for event in closing.events] == [EventName.CLOSED]
    assert closing.session.total == 1
    assert closing.session.update_count == s1.update_count + 3
    assert closing.session.id == s1.id
    back = applied(closing.session, return_doc([{"sku": "Z"}]))
    assert back.session.state == SessionState.PARTIALLY_RETURNED
    assert rejected(back.session, reopen_doc()).reason == Reason.INVALID_TRANSITION


# --------------------------------------------------------------------------- idempotency


def test_duplicate_event_ids_change_nothing() -> None:
    s1 = applied(None, update_doc({"couponCodes": ["A"]}, eventId="e1")).session
    outcome = run(s1, update_doc({"couponCodes": ["B"]}, eventId="e1"))
    assert isinstance(outcome, Duplicate)
    assert outcome.session is s1


def test_fallback_event_id_is_used_for_duplicates() -> None:
    s1 = applied(None, update_doc({}), source_event_id="t[0]@1").session
    assert isinstance(run(s1, update_doc({}), source_event_id="t[0]@1"), Duplicate)
    assert isinstance(run(s1, update_doc({}), source_event_id="t[0]@2"), Applied)


def test_rejected_commands_are_not_remembered() -> None:
    s1 = session_in("open")
    bad = update_doc({"state": "partially_returned"}, eventId="retry-me")
    assert isinstance(run(s1, bad), Rejected)
    assert isinstance(run(s1, update_doc({}, eventId="retry-me")), Applied)


def test_recent_event_ids_are_bounded() -> None:
    session = applied(None, update_doc({}, eventId="e0")).session
    for number in range(1, RECENT_EVENT_IDS + 5):
        session = applied(session, update_doc({}, eventId=f"e{number}")).session
    assert len(session.recent_event_ids) == RECENT_EVENT_IDS
    assert session.recent_event_ids[-1] == f"e{RECENT_EVENT_IDS + 4}"
    assert isinstance(run(session, update_doc({}, eventId=f"e{RECENT_EVENT_IDS + 4}")), Duplicate)
    assert isinstance(run(session, update_doc({}, eventId="e0")), Applied)


def test_event_ids_are_per_session() -> None:
    a = applied(None, update_doc({}, eventId="same", integration_id="a")).session
    assert a.recent_event_ids == ("same",)
    assert applied(None, update_doc({}, eventId="same", integration_id="b"))


def test_fresh_event_ids_differ() -> None:
    assert fresh_event_id() != fresh_event_id()
