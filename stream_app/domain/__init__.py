"""The pure customer-session domain: no Kafka, no clock, no I/O.

``decode_command(raw)`` turns record bytes into a command or a rejection;
``apply(session, command, context)`` returns the outcome: ``Applied`` (new
session and events), ``Duplicate`` or ``Rejected``. ``wire`` holds the
stored and emitted forms. The behaviour contract is ``docs/contract.md``;
the docstrings of ``decoding``, ``transitions`` and ``numbers`` say how
each rule is carried out.
"""

from __future__ import annotations

from stream_app.domain.decoding import decode_command
from stream_app.domain.model import (
    RECENT_EVENT_IDS,
    AdditionalCost,
    ApplicationSettings,
    Applied,
    CartItem,
    Command,
    CommandContext,
    Duplicate,
    ErrorDetail,
    EventName,
    Outcome,
    Product,
    Reason,
    Rejected,
    Rejection,
    ReopenCommand,
    ReturnCommand,
    ReturnedLine,
    ReturnItem,
    ReturnSummary,
    Session,
    SessionEvent,
    SessionIdAllocator,
    SessionPatch,
    SessionState,
    UpdateCommand,
)
from stream_app.domain.transitions import apply
from stream_app.domain.wire import (
    decode_session,
    encode_session,
    fit_rejection,
    format_timestamp,
    output_document,
    rejection_document,
    session_document,
)

__all__ = [
    "RECENT_EVENT_IDS",
    "AdditionalCost",
    "ApplicationSettings",
    "Applied",
    "CartItem",
    "Command",
    "CommandContext",
    "Duplicate",
    "ErrorDetail",
    "EventName",
    "Outcome",
    "Product",
    "Reason",
    "Rejected",
    "Rejection",
    "ReopenCommand",
    "ReturnCommand",
    "ReturnItem",
    "ReturnSummary",
    "ReturnedLine",
    "Session",
    "SessionEvent",
    "SessionIdAllocator",
    "SessionPatch",
    "SessionState",
    "UpdateCommand",
    "apply",
    "decode_command",
    "decode_session",
    "encode_session",
    "fit_rejection",
    "format_timestamp",
    "output_document",
    "rejection_document",
    "session_document",
]
