"""Building rejections: reason codes, Talon.One-shaped messages, JSON pointers.

Validation fails fast: a rejection carries the first offending field found
(one entry in ``errors``). Pointers are RFC 6901 pointers into the command
document as received, e.g. ``/session/cartItems/3/quantity``.
"""

from __future__ import annotations

from typing import Final

from stream_app.domain.model import ErrorDetail, Reason, Rejection
from stream_app.errors import StreamAppError

__all__ = ["InvalidCommandError", "make_rejection", "pointer_token"]

MESSAGES: Final[dict[Reason, tuple[str, str]]] = {
    # reason: (message, title)
    Reason.MALFORMED_JSON: ("The command is not valid JSON", "Malformed JSON"),
    Reason.SCHEMA_VIOLATION: ("Request failed schema validation", "Invalid value"),
    Reason.LIMIT_EXCEEDED: ("The command exceeds a limit", "Limit exceeded"),
    Reason.UNKNOWN_ATTRIBUTE: (
        "The command uses an attribute the application does not define",
        "Unknown attribute",
    ),
    Reason.UNKNOWN_ADDITIONAL_COST: (
        "The command uses an additional cost the application does not define",
        "Unknown additional cost",
    ),
    Reason.INVALID_TRANSITION: (
        "The command is not allowed in the session's state",
        "Invalid state transition",
    ),
    Reason.UNKNOWN_SESSION: ("The session does not exist", "Unknown session"),
    Reason.RETURN_EXCEEDS_REMAINING: (
        "The return exceeds the remaining quantity of a cart item",
        "Return exceeds remaining quantity",
    ),
    Reason.UNKNOWN_CART_ITEM: (
        "The return refers to a cart item that does not exist",
        "Unknown cart item",
    ),
    Reason.SKU_MISMATCH: (
        "The sku does not match the cart item at that position",
        "SKU mismatch",
    ),
    Reason.PARTIAL_LINE_RETURN: (
        "Cart item flattening is off: a cart item can only be returned whole",
        "Partial return of a cart item",
    ),
    Reason.APPLICATION_MISMATCH: (
        "The session belongs to another application",
        "Application mismatch",
    ),
}


def make_rejection(reason: Reason, pointer: str, details: str) -> Rejection:
    message, title = MESSAGES[reason]
    return Rejection(reason, message, (ErrorDetail(title, details, pointer),))


class InvalidCommandError(StreamAppError):
    """Internal control flow of validation; never escapes the domain package."""

    def __init__(self, reason: Reason, pointer: str, details: str) -> None:
        super().__init__(details)
        self.rejection = make_rejection(reason, pointer, details)


def pointer_token(key: str) -> str:
    """Escape one reference token of a JSON pointer (RFC 6901)."""
    if "~" in key or "/" in key:
        return key.replace("~", "~0").replace("/", "~1")
    return key
