"""What the session query answers for a stored session."""

from __future__ import annotations

import orjson

from stream_app.domain import (
    ApplicationSettings,
    Applied,
    CommandContext,
    Session,
    UpdateCommand,
    apply,
    decode_command,
    encode_session,
    session_document,
)
from stream_app.web.server import query_document


class _Ids:
    def next_id(self) -> int:
        return 1


def _created(session: dict[str, object]) -> Session:
    command = decode_command(
        orjson.dumps({"type": "update", "integrationId": "q", "session": session})
    )
    assert isinstance(command, UpdateCommand)
    context = CommandContext(1_764_000_000_000, "e", 1, ApplicationSettings(), _Ids())
    outcome = apply(None, command, context)
    assert isinstance(outcome, Applied)
    return outcome.session


def test_an_anonymous_session_is_answered_as_in_an_output() -> None:
    session = _created({"cartItems": [{"sku": "A", "quantity": 2, "price": 1.5}]})
    answer = query_document(encode_session(session))
    assert answer == session_document(session)
    assert answer["firstSession"] is True


def test_a_profiled_session_is_answered_without_the_placeholder_first_session() -> None:
    """Stage 2 decides a profiled session's firstSession when it writes an
    output; the stored value (false) could be wrong, so it is left out."""
    session = _created({"profileId": "alice", "state": "closed"})
    answer = query_document(encode_session(session))
    assert "firstSession" not in answer
    assert answer == {k: v for k, v in session_document(session).items() if k != "firstSession"}
