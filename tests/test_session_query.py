"""What the session query answers for a stored session."""

from __future__ import annotations

from pathlib import Path

import orjson
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer
from yarl import URL

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
from stream_app.pipeline.engine import Engine, Lookup
from stream_app.pipeline.topics import TopicLayout
from stream_app.settings import Settings
from stream_app.web.server import WebServer, query_document


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


async def test_a_forwarded_503_keeps_its_retry_after_and_odd_digits_are_a_400(
    tmp_path: Path,
) -> None:
    """`stream-app inspect` waits on a 503's Retry-After: forwarded from the
    owner without it, the answer made the command give up at once."""
    owner = web.Application()

    async def restoring(_request: web.Request) -> web.Response:
        return web.json_response({"status": 503}, status=503, headers={"Retry-After": "2"})

    owner.router.add_get("/v2/customer_sessions/{integration_id}", restoring)
    async with TestServer(owner) as owner_server:
        settings = Settings(data_dir=tmp_path)
        engine = Engine(settings, TopicLayout(1, 1_048_588))
        owner_url = str(owner_server.make_url(""))
        engine.session_lookup = lambda *_: Lookup(owner=owner_url)  # type: ignore[method-assign]
        async with TestServer(WebServer(settings, engine).app) as server, ClientSession() as http:
            async with http.get(server.make_url("/v2/customer_sessions/c-1")) as answer:
                assert (answer.status, answer.headers.get("Retry-After")) == (503, "2")
            # "²" (int() refuses it), "٣" (Arabic-Indic 3), more digits than int() takes,
            # and the ends of the int32 range an applicationId has
            for odd in ("%C2%B2", "%D9%A3", "1" * 5000, "0", "2147483648"):
                path = server.make_url("/v2/customer_sessions/c-1")
                url = URL(f"{path}?applicationId={odd}", encoded=True)
                async with http.get(url) as answer:
                    assert answer.status == 400
