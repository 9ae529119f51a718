"""Builders shared by the domain tests (no broker, no clock)."""

from __future__ import annotations

from typing import Any

from stream_app.domain import (
    ApplicationSettings,
    Applied,
    Command,
    CommandContext,
    Outcome,
    Rejected,
    Rejection,
    Session,
    apply,
    decode_command,
)
from stream_app.json import dumps

T0 = 1_764_100_000_000  # 2025-11-25T19:46:40Z


class CountingIds:
    """A deterministic allocator that records how often it was asked."""

    def __init__(self, start: int = 100) -> None:
        self.value = start
        self.calls = 0

    def next_id(self) -> int:
        self.calls += 1
        self.value += 1
        return self.value


def context(
    *,
    timestamp_ms: int = T0,
    source_event_id: str | None = None,
    application_id: int = 1,
    settings: ApplicationSettings | None = None,
    ids: CountingIds | None = None,
) -> CommandContext:
    return CommandContext(
        timestamp_ms=timestamp_ms,
        source_event_id=source_event_id or fresh_event_id(),
        application_id=application_id,
        settings=settings or ApplicationSettings(),
        ids=ids or CountingIds(),
    )


def item(sku: str = "SKU-1", quantity: int = 1, price: Any = 10, **extra: Any) -> dict[str, Any]:
    return {"sku": sku, "quantity": quantity, "price": price, **extra}


def update_doc(
    session: dict[str, Any] | None = None, *, integration_id: str = "s-1", **top: Any
) -> dict[str, Any]:
    return {"type": "update", "integrationId": integration_id, "session": session or {}, **top}


def return_doc(entries: list[Any], *, integration_id: str = "s-1", **top: Any) -> dict[str, Any]:
    return {"type": "return", "integrationId": integration_id, "returnedCartItems": entries, **top}


def reopen_doc(*, integration_id: str = "s-1", **top: Any) -> dict[str, Any]:
    return {"type": "reopen", "integrationId": integration_id, **top}


def decode(doc: Any) -> Command:
    command = decode_command(dumps(doc))
    assert not isinstance(command, Rejection), command
    return command


def reject_decode(doc: Any) -> Rejection:
    result = decode_command(dumps(doc))
    assert isinstance(result, Rejection), result
    return result


def run(session: Session | None, doc: Any, **ctx: Any) -> Outcome:
    return apply(session, decode(doc), context(**ctx))


def applied(session: Session | None, doc: Any, **ctx: Any) -> Applied:
    outcome = run(session, doc, **ctx)
    assert isinstance(outcome, Applied), outcome
    return outcome


def rejected(session: Session | None, doc: Any, **ctx: Any) -> Rejection:
    outcome = run(session, doc, **ctx)
    assert isinstance(outcome, Rejected), outcome
    return outcome.rejection


_EVENTS = iter(range(10**9))


def fresh_event_id() -> str:
    return f"evt-{next(_EVENTS)}"


def session_in(state: str, cart: list[dict[str, Any]] | None = None, **settings: Any) -> Session:
    """A stored session brought into ``state`` through the public commands."""
    cart = cart if cart is not None else [item("A", 3, 2.5), item("B", 1, 10)]
    ctx: dict[str, Any] = {"settings": ApplicationSettings(**settings)} if settings else {}
    first_state = "closed" if state in {"closed", "partially_returned"} else "open"
    session = applied(
        None, update_doc({"cartItems": cart, "state": first_state}, eventId=fresh_event_id()), **ctx
    ).session
    if state == "partially_returned":
        session = applied(
            session, return_doc([{"position": 1}], eventId=fresh_event_id()), **ctx
        ).session
    elif state == "cancelled":
        session = applied(
            session, update_doc({"state": "cancelled"}, eventId=fresh_event_id()), **ctx
        ).session
    assert session.state == state
    return session
