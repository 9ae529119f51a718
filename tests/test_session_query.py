"""What the session query answers for a stored session."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import ClassVar

import aiohttp.web_protocol
import orjson
import pytest
from aiohttp import ClientSession, web
from aiohttp.http_parser import HttpRequestParserPy
from aiohttp.test_utils import TestServer
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
from aiokafka.structs import TopicPartition
from prometheus_client import generate_latest
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
from stream_app.errors import ConfigurationError, StoreError
from stream_app.pipeline.engine import Engine, Lookup
from stream_app.pipeline.processor import partition_for, session_key
from stream_app.pipeline.tasks import TaskId
from stream_app.pipeline.topics import SESSIONS_STORE, TopicLayout
from stream_app.settings import Settings
from stream_app.web.server import WebServer, query_document
from stream_app.worker import serve


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


@contextlib.asynccontextmanager
async def _forwarding(
    tmp_path: Path, answer: Callable[[web.Request], Awaitable[web.Response]]
) -> AsyncIterator[tuple[WebServer, TestServer]]:
    """A worker's web server whose every query belongs to another worker, the
    owner, that answers with ``answer``: the server, and what serves it."""
    owner = web.Application()
    owner.router.add_get("/v2/customer_sessions/{integration_id}", answer)
    async with TestServer(owner) as owner_server:
        settings = Settings(data_dir=tmp_path)
        engine = Engine(settings, TopicLayout(1, 1_048_588))
        owner_url = str(owner_server.make_url(""))
        engine.session_lookup = lambda *_: Lookup(owner=owner_url)  # type: ignore[method-assign]
        web_server = WebServer(settings, engine)
        async with TestServer(web_server.app) as server:
            yield web_server, server


async def test_a_forwarded_503_keeps_its_retry_after_and_odd_digits_are_a_400(
    tmp_path: Path,
) -> None:
    """`stream-app inspect` waits on a 503's Retry-After: forwarded from the
    owner without it, the answer made the command give up at once."""

    async def restoring(_request: web.Request) -> web.Response:
        return web.json_response({"status": 503}, status=503, headers={"Retry-After": "2"})

    async with _forwarding(tmp_path, restoring) as (_, server), ClientSession() as http:
        async with http.get(server.make_url("/v2/customer_sessions/c-1")) as answer:
            assert (answer.status, answer.headers.get("Retry-After")) == (503, "2")
        # "²" (int() refuses it), "٣" (Arabic-Indic 3), more digits than int() takes,
        # and the ends of the int32 range an applicationId has
        for odd in ("%C2%B2", "%D9%A3", "1" * 5000, "0", "2147483648"):
            path = server.make_url("/v2/customer_sessions/c-1")
            url = URL(f"{path}?applicationId={odd}", encoded=True)
            async with http.get(url) as answer:
                assert answer.status == 400


async def _raw_get(server: TestServer, target: bytes) -> tuple[int, bytes]:
    """A GET whose request line holds ``target`` as given: raw bytes that no
    HTTP client library sends, and any sender can."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    await writer.drain()
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_raw_bytes_in_the_request_line_are_answered_not_a_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's C parser answers 400 to such a request line itself; its
    pure-Python parser, used where the C extension is not (AIOHTTP_NO_EXTENSIONS,
    a platform without wheels), passes the bytes on, as this test makes it.
    A byte that is not UTF-8 in the id then made the key's encoding fail: a
    500 and a traceback at ERROR per request. In the query of a request to
    forward, it failed the forwarding request the same way. No session can
    have such an id (404); the forward carries the applicationId alone."""
    monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", HttpRequestParserPy)
    forwarded: list[str] = []

    async def found(request: web.Request) -> web.Response:
        forwarded.append(request.rel_url.raw_path_qs)
        return web.json_response({"session": {}})

    async with _forwarding(tmp_path, found) as (_, server):
        status, body = await _raw_get(server, b"/v2/customer_sessions/c-\xff")
        assert status == 404
        assert b"not UTF-8" in body
        status, _ = await _raw_get(server, b"/v2/customer_sessions/c-%c3%bf?x=\xfe&applicationId=7")
        assert status == 200
    # its escapes as they came (lower case), the applicationId alone of the query
    assert forwarded == ["/v2/customer_sessions/c-%c3%bf?applicationId=7"]


async def test_forwarded_queries_share_their_connections_to_the_owner(tmp_path: Path) -> None:
    """Each forwarded query opened a client of its own (a connection, a DNS
    lookup, on the event loop the worker processes records on), with no bound
    on how many at once. They now share one pool, closed with the server."""
    peers: list[object] = []

    async def found(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername"))
        return web.json_response({"session": {}})

    async with _forwarding(tmp_path, found) as (web_server, server), ClientSession() as http:
        for _ in range(3):
            async with http.get(server.make_url("/v2/customer_sessions/c-1")) as answer:
                assert answer.status == 200
    assert web_server._client is None  # closed with the app
    assert len(peers) == 3
    assert len(set(peers)) == 1


async def test_an_integration_id_at_its_length_limit_is_looked_up_and_forwarded(
    tmp_path: Path,
) -> None:
    """1,000 code points of 4 UTF-8 bytes each, percent-escaped, make a request
    line of about 12,000 characters. aiohttp's default limit, 8,190, answered
    400 before the query reached the worker, and so did the owner's server
    when another worker forwarded it."""
    integration_id = "\U0001f6d2" * 1000
    path = "/v2/customer_sessions/" + "%F0%9F%9B%92" * 1000
    servers: list[WebServer] = []
    try:
        for name in ("owner", "forwarder"):
            settings = Settings(data_dir=tmp_path / name, http_host="127.0.0.1", http_port=0)
            engine = Engine(settings, TopicLayout(1, 1_048_588))
            if servers:
                url = f"http://127.0.0.1:{servers[0].port}"
                engine.session_lookup = lambda *_, url=url: Lookup(owner=url)  # type: ignore[method-assign]
            else:
                looked_up: list[str] = []

                def lookup(_app: int, wanted: str, seen: list[str] = looked_up) -> Lookup:
                    seen.append(wanted)
                    return Lookup(found=True)

                engine.session_lookup = lookup  # type: ignore[method-assign]
            server = WebServer(settings, engine)
            await server.start()
            servers.append(server)
        async with ClientSession() as http:
            for server in servers:
                url = URL(f"http://127.0.0.1:{server.port}{path}?applicationId=3", encoded=True)
                async with http.get(url) as answer:
                    assert answer.status == 404, await answer.text()
                    assert "no session" in (await answer.json())["detail"]
        assert looked_up == [integration_id, integration_id]
    finally:
        for server in servers:
            await server.stop()


async def test_a_second_worker_on_a_host_serves_on_a_free_port_unless_one_was_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers started on one machine with nothing but
    KAFKA_BOOTSTRAP_SERVERS set: the second found port 8080 taken and exited 1.
    Left unset, the port is now any free one when 8080 is taken; set, it is
    that port or an error, as before."""
    taken = socket.socket()
    try:
        with contextlib.suppress(OSError):  # taken already by something else: as good
            taken.bind(("127.0.0.1", 8080))
            taken.listen()
        engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
        monkeypatch.delenv("STREAM_APP_HTTP_PORT", raising=False)
        unset = await serve(Settings(data_dir=tmp_path, http_host="127.0.0.1"), engine)
        assert unset is not None
        try:
            assert unset.port not in (0, 8080)
            assert await _livez_status(unset.port) == 200
        finally:
            await unset.stop()
        chosen = Settings(data_dir=tmp_path, http_host="127.0.0.1", http_port=8080)
        assert await serve(chosen, engine) is None
        # A static member restarted keeps the address it advertised: the
        # others forwarded its sessions to the free port it had before.
        static = Settings(data_dir=tmp_path, http_host="127.0.0.1", group_instance_id="w-b")
        with pytest.raises(ConfigurationError, match="port 8080 is taken"):
            await serve(static, engine)
    finally:
        taken.close()


async def test_a_host_of_several_addresses_serves_on_one_port_on_each(tmp_path: Path) -> None:
    """``""`` (every interface) with any free port bound IPv4 and IPv6 on a
    port each, in either order: half the time the port advertised was the
    IPv6 one, and IPv4 peers' forwarded queries were refused."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    for _ in range(8):  # the order of the addresses is the system's: either, each time
        web_server = WebServer(Settings(data_dir=tmp_path, http_host="", http_port=0), engine)
        await web_server.start()
        try:
            addresses = web_server._runner.addresses if web_server._runner else []
            families = {len(address) for address in addresses}  # IPv6: 4 items
            assert families == {2, 4}, f"this machine binds {addresses}, not IPv4 and IPv6"
            assert {address[1] for address in addresses} == {web_server.port}
            assert await _livez_status(web_server.port) == 200
        finally:
            await web_server.stop()


async def _livez_status(port: int) -> int:
    """The status a GET of /livez on 127.0.0.1:``port`` is answered with (over IPv4)."""
    async with ClientSession() as http, http.get(f"http://127.0.0.1:{port}/livez") as answer:
        return answer.status


async def test_ids_are_read_from_the_segment_as_sent(tmp_path: Path) -> None:
    """Braces are valid in an integrationId; aiohttp's default route pattern
    refused them (a text/plain 404 before the engine was asked). An escape that
    is not UTF-8 ("%FF") was kept as its three characters by yarl, so it
    found the session "%FF", which is asked for as "%25FF"."""
    asked: list[str] = []

    def lookup(_app: int, integration_id: str) -> Lookup:
        asked.append(integration_id)
        return Lookup(found=True)

    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine.session_lookup = lookup  # type: ignore[method-assign]
    web_server = WebServer(Settings(data_dir=tmp_path), engine)
    async with TestServer(web_server.app) as server, ClientSession() as http:
        for path, status in [
            ("%7Bx%7D", 404),  # asked, and not found: 404 from the engine's answer
            ("a%2Fb", 404),
            ("%25FF", 404),
            ("%FF", 404),  # not asked: no id is not UTF-8
            ("c-%c3%bf", 404),
        ]:
            url = URL(str(server.make_url("/v2/customer_sessions/")) + path, encoded=True)
            async with http.get(url) as answer:
                assert answer.status == status
                assert answer.content_type == "application/json"
                detail = (await answer.json())["detail"]
                assert ("not UTF-8" in detail) == (path == "%FF"), detail
    assert asked == ["{x}", "a/b", "%FF", "c-\u00ff"]


async def test_other_paths_and_methods_are_answered_as_problems(tmp_path: Path) -> None:
    """aiohttp answered them in text/plain; docs/openapi.yaml describes every
    error as a problem document."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    web_server = WebServer(Settings(data_dir=tmp_path), engine)
    async with TestServer(web_server.app) as server, ClientSession() as http:
        for path in ("/v2/customer_sessions/", "/v2/customer_sessions/a/b", "/nothing"):
            async with http.get(server.make_url(path)) as answer:
                assert answer.status == 404
                assert (await answer.json())["status"] == 404
        async with http.post(server.make_url("/v2/customer_sessions/c-1")) as answer:
            assert answer.status == 405
            assert answer.headers["Allow"] == "GET, HEAD"
            assert (await answer.json())["status"] == 405


class _ActiveTask:
    """Stands for an active stage-1 Task whose sessions store is ``store``."""

    def __init__(self, partition: int, store: object) -> None:
        self.id = TaskId("commands", partition)
        self.active = True
        self.stores = {SESSIONS_STORE: store}


def _answering(engine: Engine, store: object, partition: int = 0) -> None:
    """``engine`` owns ``partition`` with an active task reading ``store``."""
    task = _ActiveTask(partition, store)
    engine._tasks[task.id] = task  # type: ignore[assignment]


async def test_without_a_routing_map_a_worker_answers_for_its_own_partitions(
    tmp_path: Path,
) -> None:
    """An assignment whose map cannot be read (a leader of another release):
    the log said queries were answered locally, but every one was a 503."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._joined = True
    engine.assignor.on_assignment(ConsumerProtocolMemberAssignment(0, [], b"not json"))
    assert engine.assignor.routes == {}
    lookup = engine.session_lookup(1, "cart-1")
    assert lookup.unavailable is not None
    assert "names no owner" in lookup.unavailable  # not here: nobody to ask
    _answering(engine, {session_key(1, "cart-1"): b"stored"})
    assert engine.session_lookup(1, "cart-1") == Lookup(found=True, stored=b"stored")


def test_a_worker_answers_for_its_active_partitions_whatever_the_map_says(
    tmp_path: Path,
) -> None:
    """A static member restarted with another advertised address (a pod IP)
    gets its assignment back without a rebalance, and the routing map with
    its old address: it forwarded its own sessions there, and got no answer."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._joined = True
    engine.assignor.url = "http://10.0.0.7:8080"
    engine.assignor.owner = lambda *_: "http://10.0.0.2:8080"  # type: ignore[method-assign]
    assert engine.session_lookup(1, "cart-1") == Lookup(owner="http://10.0.0.2:8080")
    _answering(engine, {session_key(1, "cart-1"): b"stored"})
    assert engine.session_lookup(1, "cart-1") == Lookup(found=True, stored=b"stored")


@pytest.mark.parametrize("owner", ["http://fd00::1:8080", "http://a..b:8080"])
async def test_an_owner_url_that_cannot_be_read_is_a_503_not_a_500(
    tmp_path: Path, owner: str
) -> None:
    """The owner's URL is what it advertised; a worker that advertised one
    yarl cannot read made every query forwarded to it a 500 and a traceback."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    engine.session_lookup = lambda *_: Lookup(owner=owner)  # type: ignore[method-assign]
    web_server = WebServer(settings, engine)
    async with TestServer(web_server.app) as server, ClientSession() as http:
        answer = await http.get(server.make_url("/v2/customer_sessions/c-1"))
        assert answer.status == 503
        assert (await answer.json())["detail"] == "the session's owner did not answer"


async def test_forwards_to_an_owner_that_does_not_answer_are_logged_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Until the group moves a dead worker's partitions (a session timeout),
    every query of its sessions fails: each was a warning line."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    dead = "http://127.0.0.1:1"  # nothing listens there
    engine.session_lookup = lambda *_: Lookup(owner=dead)  # type: ignore[method-assign]
    web_server = WebServer(settings, engine)
    async with TestServer(web_server.app) as server, ClientSession() as http:
        with caplog.at_level("WARNING", logger="stream_app.web.server"):
            for n in range(20):
                answer = await http.get(server.make_url(f"/v2/customer_sessions/c-{n}"))
                assert answer.status == 503
    lines = [r.getMessage() for r in caplog.records if "forwarding" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"forwarding /v2/customer_sessions/c-0 to {dead} failed: ")
    # Each counted, as the lines held back would not be said if none came after.
    metrics = generate_latest(web_server.registry).decode()
    assert "stream_app_forward_failures_total 20.0" in metrics


class _Fetching:
    """A consumer whose partitions Kafka last answered at the given times (ms)."""

    def __init__(self, heard: dict[TopicPartition, int | None], paused: set[TopicPartition]):
        self.heard = heard
        self._paused = paused

    def assignment(self) -> set[TopicPartition]:
        return set(self.heard)

    def paused(self) -> set[TopicPartition]:
        return self._paused

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return self.heard[tp]


def test_a_worker_kafka_has_not_answered_past_the_session_timeout_answers_no_query(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the session timeout the group may have moved the worker's
    partitions to another, which goes on applying commands: the worker
    answered from its stores, stale, until it reached Kafka again."""
    settings = Settings(data_dir=tmp_path, session_timeout_s=30)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    engine._joined = True
    _answering(engine, {session_key(1, "cart-1"): b"stored"})
    now = time.time() * 1000
    commands, profiles = TopicPartition("commands", 0), TopicPartition("by-profile", 0)
    consumer = _Fetching({commands: int(now - 31_000), profiles: None}, paused=set())
    engine._consumer = consumer  # type: ignore[assignment]
    assert engine.unheard_s() == pytest.approx(31, abs=1)
    # Not a readiness reason: in an outage every worker would be unready at
    # once (node drains blocked, the stall alert, which watches ready
    # workers, silenced). The query checks it, and /readyz shows it.
    assert engine.ready
    assert engine.status()["unheard_s"] == pytest.approx(31, abs=1)
    lookup = engine.session_lookup(1, "cart-1")
    assert lookup.unavailable is not None
    assert "answered none of this worker's fetches for 31 s" in lookup.unavailable
    # A session another worker owns is still forwarded: the owner answers only
    # what its own, current assignment gives it.
    engine.assignor.url = "http://me:8080"
    real_owner = engine.assignor.owner
    engine.assignor.owner = lambda *_: "http://other:8080"  # type: ignore[method-assign]
    assert engine.session_lookup(1, "cart-1") == Lookup(owner="http://other:8080")
    engine.assignor.owner = real_owner  # type: ignore[method-assign]
    # Said once in the log when it begins, and once when it ends.
    with caplog.at_level("INFO", logger="stream_app.pipeline.engine"):
        engine._note_unheard()
        engine._note_unheard()
        consumer.heard[commands] = int(time.time() * 1000)
        engine._note_unheard()
        engine._note_unheard()
        consumer.heard[commands] = int(now - 31_000)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith("Kafka has answered none of this worker's fetches for 31 s")
    assert lines[1] == "Kafka answers this worker's fetches again"
    # Nothing to measure (every partition paused, a rejoin) is not Kafka
    # answering again: no line, and the worker stays cut off until it does.
    caplog.clear()
    with caplog.at_level("INFO", logger="stream_app.pipeline.engine"):
        engine._note_unheard()  # cut off again
        consumer._paused = {commands, profiles}
        engine._note_unheard()
        consumer._paused = set()
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert engine._cut_off
    # Any partition answered within the timeout: in touch, and its own.
    consumer.heard[profiles] = int(now - 2_000)
    assert engine.unheard_s() is None
    assert engine.ready
    assert engine.status()["unheard_s"] is None
    assert engine.session_lookup(1, "cart-1") == Lookup(found=True, stored=b"stored")
    # A paused partition is not fetched, and one never fetched yet has no
    # time: their ages say nothing.
    consumer.heard[profiles] = None
    consumer._paused = {commands}
    assert engine.unheard_s() is None
    consumer._paused = set()
    assert engine.unheard_s() == pytest.approx(31, abs=1)
    # Resumed after a long pause (a restore), a partition is as old as its
    # resumption: aiokafka keeps the time of its last fetch across a pause.
    engine._resumed_ms[commands] = time.time() * 1000
    assert engine.unheard_s() is None
    # Resumed after a new assignment (aiokafka forgets its fetch times then)
    # and never answered: as old as its resumption. It was unmeasured, so the
    # worker answered queries from its stores for ever.
    consumer.heard = {commands: None, profiles: None}
    engine._resumed_ms[commands] = now - 31_000
    assert engine.unheard_s() == pytest.approx(31, abs=1)
    assert engine.session_lookup(1, "cart-1").unavailable is not None


def test_a_query_to_a_worker_that_is_not_ready_says_why(tmp_path: Path) -> None:
    """Every reason was answered 'the group is rebalancing or restoring'."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    # Kafka lost since its start: it retries the join.
    assert engine.session_lookup(1, "c").unavailable == "this worker has not joined the group yet"
    engine._joined = True
    engine._fenced_since = time.monotonic()
    assert "was fenced" in str(engine.session_lookup(1, "c").unavailable)
    engine._fenced_since = None
    engine._rebalancing = True
    assert "rebalancing" in str(engine.session_lookup(1, "c").unavailable)
    engine._rebalancing = False
    engine._stopping.set()
    assert engine.session_lookup(1, "c").unavailable == "this worker is stopping"


def test_a_worker_with_a_task_restoring_forwards_and_answers_what_it_can(tmp_path: Path) -> None:
    """A worker with one task restoring (up to half an hour after a scale-out)
    answered every query 503 'the group is rebalancing or restoring',
    sessions owned by ready workers and by its own active tasks too."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(2, 1_048_588))
    engine._joined = True
    engine.assignor.url = "http://me:8080"
    here, restoring = (partition_for(f"cart-{n}".encode(), 2) for n in (1, 2))
    assert here != restoring
    _answering(engine, {session_key(1, "cart-1"): b"stored"}, here)

    class _Restoring:
        active = False
        stores: ClassVar[dict[str, object]] = {}

    engine._tasks[TaskId("commands", restoring)] = _Restoring()  # type: ignore[assignment]
    engine._starting[TaskId("commands", restoring)] = None  # type: ignore[assignment]
    assert not engine.ready
    engine.assignor.owner = lambda *_: "http://me:8080"  # type: ignore[method-assign]
    assert engine.session_lookup(1, "cart-1") == Lookup(found=True, stored=b"stored")
    assert engine.session_lookup(1, "cart-2") == Lookup(
        unavailable="the session's partition is restoring on this worker"
    )
    engine.assignor.owner = lambda *_: "http://other:8080"  # type: ignore[method-assign]
    assert engine.session_lookup(1, "cart-2") == Lookup(owner="http://other:8080")
    engine._starting.clear()
    engine._waiting.add(TaskId("commands", restoring))
    engine.assignor.owner = lambda *_: "http://me:8080"  # type: ignore[method-assign]
    assert "waits for the rest of its task's partitions" in str(
        engine.session_lookup(1, "cart-2").unavailable
    )


def test_a_store_that_cannot_be_read_is_a_503_not_a_500(tmp_path: Path) -> None:
    """A read error (a corrupt block, say) escaped the query: aiohttp's
    plain-text 500 and a traceback for every query of the partition."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._joined = True

    class _Broken:
        def get(self, key: bytes) -> bytes | None:
            raise StoreError("Corruption: block checksum mismatch")

    _answering(engine, _Broken())
    lookup = engine.session_lookup(1, "cart-1")
    # The store's path is for the log, not for any HTTP client.
    assert lookup.unavailable == "the session's store cannot be read (see the worker's log)"


async def test_a_store_a_query_found_corrupt_is_restored(tmp_path: Path) -> None:
    """The damaged block may hold sessions no command touches: a query of
    them was a 503 until the task next closed, for as long as that took."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))

    class _Store:
        corrupted = False

    class _Task:
        active = True
        stores: ClassVar[dict[str, object]] = {SESSIONS_STORE: _Store()}

    task = _Task()
    engine._tasks[TaskId("commands", 0)] = task  # type: ignore[assignment]
    restarted: list[object] = []

    async def restart(task: object, exc: BaseException) -> None:
        restarted.append(task)

    engine._restart = restart  # type: ignore[method-assign]
    await engine._restart_corrupted()
    assert restarted == []
    _Store.corrupted = True
    await engine._restart_corrupted()
    assert restarted == [task]


async def test_a_forwarded_answer_keeps_the_owners_content_type(tmp_path: Path) -> None:
    """Every forwarded answer was labelled application/json: the owner's
    plain-text 400 (aiohttp's own) reached the client as JSON it could not parse."""

    async def plain(_request: web.Request) -> web.Response:
        return web.Response(status=400, text="Bad Request")

    async with (
        _forwarding(tmp_path, plain) as (_, server),
        ClientSession() as http,
        http.get(server.make_url("/v2/customer_sessions/c-1")) as answer,
    ):
        assert answer.status == 400
        assert answer.content_type == "text/plain"
        assert await answer.text() == "Bad Request"


@pytest.mark.parametrize("parser", ["C", "Python"])
async def test_a_raw_hash_in_the_id_is_refused_not_forwarded_as_another_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parser: str
) -> None:
    """Forwarded, 'a#frag' reached the owner as 'a' in the default
    application (yarl took the rest for a fragment): another session. Without
    a query, or with aiohttp's Python parser, 'a' was looked up here too."""
    if parser == "Python":
        monkeypatch.setattr(aiohttp.web_protocol, "HttpRequestParser", HttpRequestParserPy)
    asked: list[str] = []

    async def owner(request: web.Request) -> web.Response:
        asked.append(request.rel_url.raw_path)
        return web.json_response({})

    async with _forwarding(tmp_path, owner) as (_, server):
        for target in (b"a#frag?applicationId=2", b"a#frag", b"a?applicationId=2#frag"):
            status, body = await _raw_get(server, b"/v2/customer_sessions/" + target)
            assert status == 400, (target, body)
            assert b"%23" in body
        status, _ = await _raw_get(server, b"/v2/customer_sessions/a%23frag?applicationId=2")
        assert status == 200
    assert asked == ["/v2/customer_sessions/a%23frag"]


@pytest.mark.parametrize(
    "owner_answers",
    ["redirect", "plain 200", "502", "html 404", "json 404 of no worker", "spring's json 404"],
)
async def test_an_owner_that_answers_as_no_worker_does_is_a_503(
    tmp_path: Path, owner_answers: str
) -> None:
    """A redirect was followed, to any host, with the forwarded mark, and a
    200 in plain text from whatever answered the owner's address (a proxy,
    another service) was relayed as the session's answer; so was its 404,
    telling the client that the session did not exist."""

    async def answer(request: web.Request) -> web.Response:
        if request.match_info["integration_id"] == "c-2":
            return web.json_response({"integrationId": "c-2"})
        if owner_answers == "redirect":  # to a session the owner answers 200
            raise web.HTTPFound("/v2/customer_sessions/c-2")
        if owner_answers == "plain 200":
            return web.Response(text="a page")
        if owner_answers == "html 404":
            return web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")
        if owner_answers == "json 404 of no worker":
            return web.json_response({"error": "not found"}, status=404)
        if owner_answers == "spring's json 404":
            doc = {"timestamp": "2026-11-28T02:40:00Z", "status": 404, "error": "Not Found"}
            return web.json_response({**doc, "path": request.path}, status=404)
        return web.Response(status=502, text="bad gateway")  # a proxy's

    async with (
        _forwarding(tmp_path, answer) as (_, server),
        ClientSession() as http,
        http.get(server.make_url("/v2/customer_sessions/c-1")) as reply,
    ):
        assert (reply.status, reply.headers.get("Retry-After")) == (503, "1")
        assert (await reply.json())["detail"] == "the session's owner did not answer"


async def test_a_connection_that_sends_nothing_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp's default kept an idle or half-sent connection open for an
    hour, one file descriptor each: enough of them and the worker's RocksDB
    and Kafka connections could open none."""
    from stream_app.web import server as server_module

    monkeypatch.setattr(server_module, "KEEPALIVE_S", 0.3)
    settings = Settings(data_dir=tmp_path, http_host="127.0.0.1", http_port=0)
    web_server = WebServer(settings, Engine(settings, TopicLayout(1, 1_048_588)))
    await web_server.start()
    try:
        idle = await asyncio.open_connection("127.0.0.1", web_server.port)
        half = await asyncio.open_connection("127.0.0.1", web_server.port)
        half[1].write(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        for reader, writer in (idle, half):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()
    finally:
        await web_server.stop()


async def _own_server(
    tmp_path: Path, lookup: Callable[[int, str], Lookup] | Callable[..., Awaitable[Lookup]]
) -> tuple[WebServer, TestServer]:
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    engine.session_lookup = lookup  # type: ignore[method-assign,assignment]
    web_server = WebServer(settings, engine)
    server = TestServer(web_server.app)
    await server.start_server()
    return web_server, server


async def test_an_id_over_its_limit_is_refused_and_a_404_quotes_only_its_start(
    tmp_path: Path,
) -> None:
    """A 16 KB id was hashed and looked up, and its 404 quoted it whole: an
    answer as large as its request, which a client pipelining requests and
    never reading made the server hold, hundreds of MB over a few hundred
    connections."""
    asked: list[str] = []

    def unknown(_app: int, integration_id: str) -> Lookup:
        asked.append(integration_id)
        return Lookup(found=True)

    _, server = await _own_server(tmp_path, unknown)
    try:
        async with ClientSession() as http:
            async with http.get(server.make_url("/v2/customer_sessions/" + "a" * 1001)) as answer:
                assert answer.status == 400
                assert "at most 1000 characters" in (await answer.json())["detail"]
            async with http.get(server.make_url("/v2/customer_sessions/" + "b" * 1000)) as answer:
                assert answer.status == 404
                detail = (await answer.json())["detail"]
        assert asked == ["b" * 1000]
        assert detail == f"no session {'b' * 100 + '...'!r} in application 1"
    finally:
        await server.close()


async def test_queries_past_the_bound_in_flight_are_answered_503_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries share the event loop with the records: without a bound, many
    clients slowed processing down, and held the forwarding pool."""
    monkeypatch.setattr("stream_app.web.server.MAX_QUERIES_IN_FLIGHT", 2)
    release = asyncio.Event()

    async def owner(_request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"integrationId": "c-1"})

    async with _forwarding(tmp_path, owner) as (_, server), ClientSession() as http:
        url = server.make_url("/v2/customer_sessions/c-1")
        held = [asyncio.create_task(http.get(url)) for _ in range(2)]
        await asyncio.sleep(0.3)
        async with http.get(url) as answer:
            assert (answer.status, answer.headers.get("Retry-After")) == (503, "1")
            assert (await answer.json())["detail"] == "too many queries in flight on this worker"
        release.set()
        for task in held:
            async with await task as answer:
                assert answer.status == 200
        async with http.get(url) as answer:
            assert answer.status == 200


async def test_a_stored_session_that_cannot_be_decoded_is_a_problem_not_a_traceback(
    tmp_path: Path,
) -> None:
    """A stored form this release cannot read (damaged, or another release's)
    made the query fail with aiohttp's plain-text 500 and a traceback, for
    every query of that session."""
    _, server = await _own_server(tmp_path, lambda *_: Lookup(found=True, stored=b"{not a session"))
    try:
        async with (
            ClientSession() as http,
            http.get(server.make_url("/v2/customer_sessions/c-1")) as answer,
        ):
            # Not a 503: asking again would not mend it.
            assert (answer.status, answer.content_type) == (500, "application/json")
            assert "Retry-After" not in answer.headers
            assert (await answer.json())["detail"] == "the session's stored form cannot be read"
    finally:
        await server.close()


async def test_an_owner_that_never_answers_does_not_hold_the_queries_of_the_others(
    tmp_path: Path,
) -> None:
    """All 32 forwarding connections went to an owner that took them and never
    answered (a frozen pod): queries for sessions of every other owner waited
    for one, and timed out too. Then the queries waiting for that owner held
    the bound of queries in flight: the worker refused every query, its own
    sessions' too."""
    release = asyncio.Event()
    held: list[str] = []

    async def frozen(request: web.Request) -> web.Response:
        held.append(request.match_info["integration_id"])
        await release.wait()
        return web.json_response({"integrationId": "late"})

    async def healthy(_request: web.Request) -> web.Response:
        return web.json_response({"integrationId": "good"})

    owners = []
    for handler in (frozen, healthy):
        app = web.Application()
        app.router.add_get("/v2/customer_sessions/{integration_id}", handler)
        owners.append(TestServer(app))
    for owner in owners:
        await owner.start_server()
    frozen_url, healthy_url = (str(owner.make_url("")) for owner in owners)

    def lookup(_app: int, iid: str) -> Lookup:
        if iid == "mine":
            return Lookup(found=True)
        return Lookup(owner=healthy_url if iid == "good" else frozen_url)

    _, server = await _own_server(tmp_path, lookup)
    try:
        async with ClientSession() as http:
            stuck = [
                asyncio.create_task(http.get(server.make_url(f"/v2/customer_sessions/s-{n}")))
                for n in range(70)
            ]
            await asyncio.sleep(0.3)
            async with http.get(server.make_url("/v2/customer_sessions/good")) as answer:
                assert answer.status == 200
                assert (await answer.json())["integrationId"] == "good"
            async with http.get(server.make_url("/v2/customer_sessions/mine")) as answer:
                assert answer.status == 404
            # Of the 32 connections, the frozen owner holds 8; 8 more queries
            # wait for one, the rest are answered at once.
            assert len(held) == 8
            release.set()
            statuses: Counter[int] = Counter()
            for task in stuck:
                async with await task as answer:
                    statuses[answer.status] += 1
            assert statuses == {200: 16, 503: 54}
    finally:
        await server.close()
        for owner in owners:
            await owner.close()
