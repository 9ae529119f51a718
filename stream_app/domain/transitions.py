"""The customer-session state machine: ``apply(session, command, context)``.

Pure: no clock (times come from ``context.timestamp_ms``), no I/O, no
randomness (the session id comes from ``context.ids``). The same stored
session, command and context always give the same outcome.

Transitions (spec section 2), each with its Talon.One event(s):

====================  ===========================  ==================  ============================
from                  command                      to                  events
====================  ===========================  ==================  ============================
(none)                update, state absent/open    open                created
(none)                update, state closed         closed              created, closed
open                  update, state absent/open    open                updated
open                  update, state closed         closed              closed
open                  update, state cancelled      cancelled           cancelled
closed                update, state cancelled      cancelled           revoked
closed                return                       partially_returned  partially_returned
closed                reopen                       open                reopened
partially_returned    return                       partially_returned  partially_returned
partially_returned    update, state cancelled      cancelled           cancelled
====================  ===========================  ==================  ============================

Everything else is ``INVALID_TRANSITION`` (or ``UNKNOWN_SESSION`` for a
return or reopen without a session) and leaves the session untouched.

Our rules, where the spec is silent:

- Idempotency: an event id (``command.event_id`` or, when absent,
  ``context.source_event_id``) among the session's last
  :data:`~stream_app.domain.model.RECENT_EVENT_IDS` applied event ids makes
  the command a ``Duplicate``, checked before anything else. Rejected
  commands are not remembered, so a corrected retry with the same id applies.
- ``updateCount`` is 1 at creation and +1 per applied command; ``updated`` is
  the timestamp of the last applied command. Duplicates and rejections
  change neither.
- A cancelling update of a closed or partially returned session changes only
  the state (a closed session cannot be modified); other fields in it are
  ignored and not checked against the application settings. A cancelling or
  closing update of an open session applies its other fields too.
- Creating a session as ``cancelled`` or ``partially_returned`` is
  ``INVALID_TRANSITION``; ``state: partially_returned`` in an update is never
  allowed (only a return gets there).
- ``firstSession`` is set at creation to ``profileId == ""``, and to true
  by an update that leaves the session anonymous. For profiled sessions the
  stored value is a placeholder: the pipeline's profile stage decides the
  emitted value (also after a ``profileId`` change), since it needs state
  keyed by profile.
- A stored session whose application or integration id differs from the
  command's is ``APPLICATION_MISMATCH`` (the pipeline keys the store).
- Settings-dependent checks happen here: total quantity <= 10,000 with
  flattening on (``LIMIT_EXCEEDED``, pointer ``/session/cartItems``); allowed
  additional cost names, session and item level
  (``UNKNOWN_ADDITIONAL_COST``); allowed session attribute names, including
  names sent with ``null`` (``UNKNOWN_ATTRIBUTE``, pointer
  ``/session/attributes/<name>``).
- Returns: a line is referenced by ``position``, by ``sku`` or both (which
  must then name the same line, else ``SKU_MISMATCH``). A ``sku`` alone
  names the first line with that sku that still has quantity left, counting
  what earlier entries of the same command already claim. No ``quantity``
  means the whole remaining quantity of the line. Entries naming the same
  line are summed; the sum must not exceed ``remainingQuantity``
  (``RETURN_EXCEEDS_REMAINING``). With flattening off the sum must be all
  that remains of the line (``PARTIAL_LINE_RETURN``). A position outside the
  cart or an unknown sku is ``UNKNOWN_CART_ITEM``. The returned value of a
  line is quantity x (price + the sum of its item-level additional cost
  prices). Totals are not rewritten by returns.
- Exact numbers: every total and returned value must be representable as
  defined in ``stream_app.domain.numbers`` (an integer in the signed 64-bit
  range, or a decimal that prints exactly as the shortest form of a double;
  e.g. any value with at most 15 significant digits below 2^63), and so must
  the value of a line with item-level costs, quantity x (price + its cost
  prices): what returning it whole is worth (a line without costs is held
  by cartItemTotal; only lines whose extra digits cancel in the total slip
  through, and their returns are refused). Otherwise the command is
  ``LIMIT_EXCEEDED`` and the session is left as it was. The pointer names
  the input to blame when there is one: the first cart line whose price x
  quantity, or whose value, is not representable (``/session/cartItems/3``),
  or the first item-level cost whose price x quantity is not
  (``/session/cartItems/3/additionalCosts/ship``), or, for a return, the
  entry of the line whose value is not (``/returnedCartItems/0``).
  Otherwise it names the total, as the field of the emitted session:
  ``/session/cartItemTotal``, ``/session/cartItemAdditionalCostTotal``,
  ``/session/additionalCostTotal``, ``/session/total``, or
  ``/returnedCartItems`` for the value of a whole return. (Input prices are
  checked by the decoder.)
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal, getcontext, setcontext
from typing import Any, Final

import msgspec

from stream_app.domain.decoding import MAX_CART_QUANTITY
from stream_app.domain.model import (
    RECENT_EVENT_IDS,
    AdditionalCost,
    ApplicationSettings,
    Applied,
    CartItem,
    Command,
    CommandContext,
    Duplicate,
    EventName,
    Outcome,
    Reason,
    Rejected,
    ReopenCommand,
    ReturnCommand,
    ReturnedLine,
    ReturnSummary,
    Session,
    SessionEvent,
    SessionPatch,
    SessionState,
    UpdateCommand,
)
from stream_app.domain.numbers import EXACT, ZERO, representable
from stream_app.domain.rejections import InvalidCommandError, pointer_token

__all__ = ["apply"]

_OPEN = SessionState.OPEN
_CLOSED = SessionState.CLOSED
_CANCELLED = SessionState.CANCELLED
_RETURNED = SessionState.PARTIALLY_RETURNED
_replace = msgspec.structs.replace


def apply(session: Session | None, command: Command, ctx: CommandContext) -> Outcome:
    """The outcome of ``command`` on ``session`` (``None``: no stored session).

    Never raises for a decoded command. ``ctx.ids.next_id()`` is called once
    if, and only if, the outcome is ``Applied`` and creates the session.
    """
    event_id = command.event_id or ctx.source_event_id
    # One exact context for all the arithmetic below, made current for the
    # call and then the caller's again: 0.2 us, where entering a copy of it
    # (``with localcontext(EXACT)``) costs 0.5, as much as a 10-line cart's sums.
    # Nothing below changes its settings, and its flags are not read.
    previous = getcontext()
    setcontext(EXACT)
    try:
        return _outcome(session, command, ctx, event_id)
    except InvalidCommandError as exc:
        return Rejected(exc.rejection)
    finally:
        setcontext(previous)


def _outcome(
    session: Session | None, command: Command, ctx: CommandContext, event_id: str
) -> Applied | Duplicate:
    if session is not None:
        if event_id in session.recent_event_ids:
            return Duplicate(session)
        if session.application_id != ctx.application_id:
            raise InvalidCommandError(
                Reason.APPLICATION_MISMATCH,
                "/applicationId",
                f"the session belongs to application {session.application_id}",
            )
        if session.integration_id != command.integration_id:
            raise InvalidCommandError(
                Reason.APPLICATION_MISMATCH,
                "/integrationId",
                "the stored session has another integrationId",
            )
    if isinstance(command, UpdateCommand):
        if session is None:
            return _create(command, ctx, event_id)
        return _update(session, command, ctx, event_id)
    if session is None:
        raise InvalidCommandError(
            Reason.UNKNOWN_SESSION, "/integrationId", "no session with this integrationId"
        )
    if isinstance(command, ReturnCommand):
        return _return(session, command, ctx, event_id)
    return _reopen(session, command, ctx, event_id)


def _invalid_transition(pointer: str, details: str) -> InvalidCommandError:
    return InvalidCommandError(Reason.INVALID_TRANSITION, pointer, details)


def _remember(recent: tuple[str, ...], event_id: str) -> tuple[str, ...]:
    if len(recent) >= RECENT_EVENT_IDS:
        return (*recent[len(recent) - RECENT_EVENT_IDS + 1 :], event_id)
    return (*recent, event_id)


def _advanced(
    session: Session, state: SessionState, timestamp: int, event_id: str, **changes: Any
) -> Session:
    """``session`` after one more applied command that leaves its cart's
    totals as they are: its state, clock, count and recent event ids, and
    ``changes``."""
    return _replace(
        session,
        state=state,
        updated_ms=timestamp,
        update_count=session.update_count + 1,
        recent_event_ids=_remember(session.recent_event_ids, event_id),
        **changes,
    )


# --------------------------------------------------------------------------- totals


# Everything below runs with apply's EXACT as the current decimal context.


def cart_totals(items: tuple[CartItem, ...]) -> tuple[int, Decimal, Decimal, bool]:
    """(total quantity, cartItemTotal, cartItemAdditionalCostTotal, whether any
    line has additional costs), exact.

    One pass: the quantity is what the flattening limit checks.
    """
    quantities = 0
    item_total = ZERO
    cost_total = ZERO
    costed = False
    for item in items:
        quantity = item.quantity
        quantities += quantity
        item_total += item.price * quantity
        costs = item.additional_costs
        if costs:
            costed = True
            for cost in costs.values():
                cost_total += cost.price * quantity
    return quantities, item_total, cost_total, costed


def unit_value(line: CartItem) -> Decimal:
    """What one unit of ``line`` is worth: its price plus its item-level cost prices."""
    unit = line.price
    if line.additional_costs:
        for cost in line.additional_costs.values():
            unit += cost.price
    return unit


def cost_total(costs: dict[str, AdditionalCost]) -> Decimal:
    total = ZERO
    for cost in costs.values():
        total += cost.price
    return total


def _unrepresentable(pointer: str, what: str, value: Decimal) -> InvalidCommandError:
    # Exact (as rounded, 0.90000000000000012 read as the 0.9 it is not), but
    # cut short: 1e18 and 1e-300 on two lines sum to 319 digits.
    shown = str(value)
    if len(shown) > 40:
        shown = f"{shown[:40]}... ({len(value.as_tuple().digits)} digits)"
    return InvalidCommandError(
        Reason.LIMIT_EXCEEDED,
        pointer,
        f"{what} {shown} cannot be carried exactly in JSON: it must be an integer "
        f"in the signed 64-bit range or a decimal that is the shortest form of a double "
        f"(e.g. at most 15 significant digits, below 2^63)",
    )


def _require_representable_cart(
    items: tuple[CartItem, ...], item_total: Decimal, item_cost_total: Decimal, *, costed: bool
) -> None:
    """Reject a cart whose totals cannot be emitted exactly, blaming a line if one
    is; and one with a line whose value (what returning it whole is worth) cannot
    be, when lines have additional costs."""
    if not representable(item_total):
        for position, line in enumerate(items):
            value = line.price * line.quantity
            if not representable(value):
                raise _unrepresentable(f"/session/cartItems/{position}", "price x quantity", value)
        raise _unrepresentable("/session/cartItemTotal", "cartItemTotal", item_total)
    if not representable(item_cost_total):
        for position, line in enumerate(items):
            for name, cost in (line.additional_costs or {}).items():
                value = cost.price * line.quantity
                if not representable(value):
                    raise _unrepresentable(
                        f"/session/cartItems/{position}/additionalCosts/{pointer_token(name)}",
                        "price x quantity",
                        value,
                    )
        raise _unrepresentable(
            "/session/cartItemAdditionalCostTotal", "cartItemAdditionalCostTotal", item_cost_total
        )
    if costed:
        # A line's unit value adds its price and its costs, which the totals
        # above count apart: it may need more digits than either (1e15 + 0.01),
        # and then the line could never be returned (see _return).
        for position, line in enumerate(items):
            if line.additional_costs:
                value = unit_value(line) * line.quantity
                if not representable(value):
                    raise _unrepresentable(
                        f"/session/cartItems/{position}",
                        "quantity x (price + the line's additional cost prices)",
                        value,
                    )


# --------------------------------------------------------------------------- update


def _check_settings(patch: SessionPatch, settings: ApplicationSettings, quantity: int) -> None:
    """The settings-dependent checks; ``quantity`` is the patch's cart quantity (if any)."""
    items = patch.cart_items
    if items is not None:
        if settings.flattening and quantity > MAX_CART_QUANTITY:
            raise InvalidCommandError(
                Reason.LIMIT_EXCEEDED,
                "/session/cartItems",
                f"with cart item flattening the total quantity must be at most "
                f"{MAX_CART_QUANTITY}, got {quantity}",
            )
        if settings.additional_costs is not None:
            for position, item in enumerate(items):
                _require_known(
                    item.additional_costs,
                    settings.additional_costs,
                    Reason.UNKNOWN_ADDITIONAL_COST,
                    f"/session/cartItems/{position}/additionalCosts",
                    "additional cost",
                )
    if settings.additional_costs is None and settings.attributes is None:
        return  # every name allowed (the default): no call for each of them
    _require_known(
        patch.additional_costs,
        settings.additional_costs,
        Reason.UNKNOWN_ADDITIONAL_COST,
        "/session/additionalCosts",
        "additional cost",
    )
    _require_known(
        patch.attributes,
        settings.attributes,
        Reason.UNKNOWN_ATTRIBUTE,
        "/session/attributes",
        "attribute",
    )


def _require_known(
    names: Iterable[str] | None,
    allowed: frozenset[str] | None,
    reason: Reason,
    pointer: str,
    what: str,
) -> None:
    """Reject the first name not in ``allowed`` (``None`` allows every name)."""
    if allowed is None or not names:
        return
    for name in names:
        if name not in allowed:
            raise InvalidCommandError(
                reason, f"{pointer}/{pointer_token(name)}", f"unknown {what} {name!r}"
            )


def _merge_attributes(stored: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    if None not in changes.values():  # nothing deleted: the common case
        return {**stored, **changes}
    merged = dict(stored)
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


#: The fields of a :class:`Session` a patch decides, in the struct's order,
#: from ``profile_id`` to ``cart_item_additional_cost_total``.
_Patched = tuple[
    str,
    str | None,
    tuple[str, ...],
    str,
    tuple[str, ...],
    tuple[CartItem, ...],
    dict[str, AdditionalCost],
    tuple[str, ...],
    dict[str, Any],
    Decimal,
    Decimal,
    Decimal,
    Decimal,
]
_NO_CART: Final = (0, ZERO, ZERO, False)


def _patched_fields(
    session: Session | None, patch: SessionPatch, settings: ApplicationSettings
) -> _Patched:
    """The fields a patch decides, after ``patch``, of ``session`` or of a new session.

    The settings' checks come first (:func:`_check_settings`), then the
    totals': the rejections' order. The patch's cart is summed once, for both.
    The result goes to ``Session(...)`` positionally: building the session in
    one call costs a third of ``replace`` with a dict of changed fields.
    """
    new_items = patch.cart_items
    sums = _NO_CART if new_items is None else cart_totals(new_items)
    _check_settings(patch, settings, sums[0])
    if session is None:
        profile_id = ""
        store: str | None = None
        coupons: tuple[str, ...] = ()
        referral = ""
        cards: tuple[str, ...] = ()
        items: tuple[CartItem, ...] = ()
        costs: dict[str, AdditionalCost] = {}
        identifiers: tuple[str, ...] = ()
        attributes: dict[str, Any] = {}
        item_total = item_cost_total = session_cost_total = ZERO
    else:
        profile_id = session.profile_id
        store = session.store_integration_id
        coupons = session.coupon_codes
        referral = session.referral_code
        cards = session.loyalty_cards
        items = session.cart_items
        costs = session.additional_costs
        identifiers = session.identifiers
        attributes = session.attributes
        item_total = session.cart_item_total
        item_cost_total = session.cart_item_additional_cost_total
        session_cost_total = session.additional_cost_total
    if patch.profile_id is not None:
        profile_id = patch.profile_id
    if patch.store_integration_id is not None:
        store = patch.store_integration_id
    if patch.coupon_codes is not None:
        coupons = patch.coupon_codes
    if patch.referral_code is not None:
        referral = patch.referral_code
    if patch.loyalty_cards is not None:
        cards = patch.loyalty_cards
    if patch.identifiers is not None:
        identifiers = patch.identifiers
    if patch.attributes is not None:
        attributes = _merge_attributes(attributes, patch.attributes)
    new_costs = patch.additional_costs
    if new_items is None and new_costs is None and session is not None:
        total = session.total
    else:
        if new_items is not None:
            _, item_total, item_cost_total, costed = sums
            _require_representable_cart(new_items, item_total, item_cost_total, costed=costed)
            items = new_items
        if new_costs is not None:
            session_cost_total = cost_total(new_costs)
            if not representable(session_cost_total):
                raise _unrepresentable(
                    "/session/additionalCostTotal", "additionalCostTotal", session_cost_total
                )
            costs = new_costs
        total = item_total + session_cost_total + item_cost_total
        if not representable(total):
            raise _unrepresentable("/session/total", "total", total)
    return (
        profile_id,
        store,
        coupons,
        referral,
        cards,
        items,
        costs,
        identifiers,
        attributes,
        total,
        item_total,
        session_cost_total,
        item_cost_total,
    )


def _create(command: UpdateCommand, ctx: CommandContext, event_id: str) -> Applied:
    patch = command.session
    state = patch.state
    if state is None or state is _OPEN:
        names: tuple[EventName, ...] = (EventName.CREATED,)
        state = _OPEN
    elif state is _CLOSED:
        names = (EventName.CREATED, EventName.CLOSED)
    else:
        raise _invalid_transition("/session/state", f"a session cannot be created as {state}")
    fields = _patched_fields(None, patch, ctx.settings)
    timestamp = ctx.timestamp_ms
    # Allocate last: the allocator is called only for an applied creation.
    session = Session(
        ctx.ids.next_id(),
        command.integration_id,
        ctx.application_id,
        state,
        timestamp,
        timestamp,
        1,
        fields[0] == "",  # first_session: see the module docstring
        *fields,
        (event_id,),
    )
    return Applied(session, tuple(SessionEvent(name, event_id, timestamp) for name in names))


def _update(
    session: Session, command: UpdateCommand, ctx: CommandContext, event_id: str
) -> Applied:
    patch = command.session
    target = patch.state
    current = session.state
    pointer = "/session/state" if target is not None else "/type"
    timestamp = ctx.timestamp_ms
    if current is _OPEN:
        if target is None or target is _OPEN:
            name, target = EventName.UPDATED, _OPEN
        elif target is _CLOSED:
            name = EventName.CLOSED
        elif target is _CANCELLED:
            name = EventName.CANCELLED
        else:
            raise _invalid_transition(pointer, "only a return makes a session partially_returned")
        fields = _patched_fields(session, patch, ctx.settings)
        updated = Session(
            session.id,
            session.integration_id,
            session.application_id,
            target,
            session.created_ms,
            timestamp,
            session.update_count + 1,
            # An anonymous session is always a first session, also after it
            # lost its profile (the placeholder of a profiled one stays).
            fields[0] == "" or session.first_session,
            *fields,
            _remember(session.recent_event_ids, event_id),
        )
    elif target is _CANCELLED and current is not _CANCELLED:
        # Closed or partially returned: only the state changes.
        name = EventName.REVOKED if current is _CLOSED else EventName.CANCELLED
        updated = _advanced(session, target, timestamp, event_id)
    else:
        raise _invalid_transition(pointer, _refused_update(current, target))
    return Applied(updated, (SessionEvent(name, event_id, timestamp),))


def _refused_update(current: SessionState, target: SessionState | None) -> str:
    """Why an update of a session that is not open is refused. (Before, "a
    closed session cannot be updated to its current state" for an update
    without a state, as if a state were what was wrong with it.)"""
    if current is _CANCELLED:
        return "a cancelled session accepts no update"
    asked = f"to {target}" if target is not None else "that changes its content"
    after = "reopen it first to change it" if current is _CLOSED else "it cannot be reopened"
    return f"a {current} session accepts only an update to cancelled, not one {asked}: {after}"


# --------------------------------------------------------------------------- reopen


def _reopen(
    session: Session, command: ReopenCommand, ctx: CommandContext, event_id: str
) -> Applied:
    del command  # carries nothing beyond its identity
    if session.state is not _CLOSED:
        raise _invalid_transition(
            "/type", f"only a closed session can be reopened, not {session.state}"
        )
    timestamp = ctx.timestamp_ms
    updated = _advanced(session, _OPEN, timestamp, event_id)
    return Applied(updated, (SessionEvent(EventName.REOPENED, event_id, timestamp),))


# --------------------------------------------------------------------------- return


def _return(
    session: Session, command: ReturnCommand, ctx: CommandContext, event_id: str
) -> Applied:
    if session.state is not _CLOSED and session.state is not _RETURNED:
        raise _invalid_transition(
            "/type",
            f"only a closed or partially returned session accepts returns, not {session.state}",
        )
    cart = session.cart_items
    claims: dict[int, int] = {}
    last_pointer: dict[int, str] = {}
    lines_of: dict[str, list[int]] | None = None  # made for the first entry by sku
    for index, entry in enumerate(command.returned_cart_items):
        base = f"/returnedCartItems/{index}"
        position = entry.position
        if position is not None:
            if position >= len(cart):
                raise InvalidCommandError(
                    Reason.UNKNOWN_CART_ITEM,
                    f"{base}/position",
                    f"the cart has {len(cart)} items, there is no position {position}",
                )
            if entry.sku is not None and entry.sku != cart[position].sku:
                raise InvalidCommandError(
                    Reason.SKU_MISMATCH,
                    f"{base}/sku",
                    f"the cart item at position {position} has sku {cart[position].sku!r}",
                )
        else:
            if lines_of is None:
                lines_of = _lines_by_sku(cart)
            position = _line_by_sku(cart, claims, lines_of, entry.sku or "", f"{base}/sku")
        line = cart[position]
        available = line.quantity - line.returned_quantity - claims.get(position, 0)
        quantity = entry.quantity if entry.quantity is not None else available
        if quantity > available or quantity < 1:
            raise InvalidCommandError(
                Reason.RETURN_EXCEEDS_REMAINING,
                f"{base}/quantity" if entry.quantity is not None else base,
                f"the cart item at position {position} has {available} left to return",
            )
        claims[position] = claims.get(position, 0) + quantity
        last_pointer[position] = base
    if not ctx.settings.flattening:
        for position, quantity in claims.items():
            # Whole: all that remains (part of it may have been returned while
            # flattening was on).
            remaining = cart[position].quantity - cart[position].returned_quantity
            if quantity != remaining:
                raise InvalidCommandError(
                    Reason.PARTIAL_LINE_RETURN,
                    last_pointer[position],
                    f"the cart item at position {position} can only be returned whole "
                    f"({remaining})",
                )
    new_cart = list(cart)
    lines = []
    total = ZERO
    for position in sorted(claims):
        quantity = claims[position]
        line = cart[position]
        new_cart[position] = _replace(line, returned_quantity=line.returned_quantity + quantity)
        value = unit_value(line) * quantity
        if not representable(value):
            raise _unrepresentable(last_pointer[position], "the returned value", value)
        total += value
        lines.append(ReturnedLine(position, line.sku, quantity, value))
    if not representable(total):
        raise _unrepresentable("/returnedCartItems", "the value of the return", total)
    timestamp = ctx.timestamp_ms
    updated = _advanced(session, _RETURNED, timestamp, event_id, cart_items=tuple(new_cart))
    summary = ReturnSummary(tuple(lines), total)
    event = SessionEvent(EventName.PARTIALLY_RETURNED, event_id, timestamp, summary)
    return Applied(updated, (event,))


def _lines_by_sku(cart: tuple[CartItem, ...]) -> dict[str, list[int]]:
    """Each sku's cart positions, the first last (see :func:`_line_by_sku`)."""
    lines: dict[str, list[int]] = {}
    for position in range(len(cart) - 1, -1, -1):
        lines.setdefault(cart[position].sku, []).append(position)
    return lines


def _line_by_sku(
    cart: tuple[CartItem, ...],
    claims: dict[int, int],
    lines_of: dict[str, list[int]],
    sku: str,
    pointer: str,
) -> int:
    """The first line of ``sku`` with quantity left to return. A line left
    with none stays so for the rest of the command (its claims only grow), so
    it is dropped from ``lines_of``: a return of n entries by sku costs n plus
    the cart, not n times the cart (1,000 entries of 1,000 lines took 47 ms)."""
    positions = lines_of.get(sku)
    if positions is None:
        raise InvalidCommandError(
            Reason.UNKNOWN_CART_ITEM, pointer, f"no cart item has sku {sku!r}"
        )
    while positions:
        position = positions[-1]
        line = cart[position]
        if line.quantity - line.returned_quantity - claims.get(position, 0) > 0:
            return position
        positions.pop()
    raise InvalidCommandError(
        Reason.RETURN_EXCEEDS_REMAINING, pointer, f"nothing is left to return of sku {sku!r}"
    )
