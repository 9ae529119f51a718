"""One small aiohttp server per worker, beside the engine, on its event loop
(queries are bounded, as they take turns with the records: see
:data:`MAX_QUERIES_IN_FLIGHT`).

* ``GET /livez``: 200 while the process runs; it never depends on restores or
  rebalances, so a long restore never gets a pod killed;
* ``GET /readyz``: 200 when every assigned task has restored and started,
  none is fenced, the group is not rebalancing and the worker is not
  stopping (``Engine.ready``); 503, with what is pending, otherwise;
* ``GET /metrics``: Prometheus text (see :mod:`stream_app.web.metrics`);
* ``GET /v2/customer_sessions/{integrationId}?applicationId=N``: the
  session's committed state with the contract's field names (404 when
  unknown), answered by any worker: the owner of the key's partition answers
  from its store, any other worker forwards the request to the owner's URL
  from the group assignment; during a rebalance or restore the answer is a
  clear 503, never a stale or wrong session (a worker that Kafka has not
  answered for longer than the session timeout, whose partitions may have
  moved, answers 503 too for the sessions it owns). docs/openapi.yaml
  describes it.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import unquote_to_bytes

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from yarl import URL

from stream_app import json
from stream_app.domain import decode_session, session_document
from stream_app.domain.decoding import INT32_MAX
from stream_app.logs import HeldBack, excerpt, held_back
from stream_app.web.metrics import EngineCollector

#: Marks a request one worker forwarded to another: it is never forwarded again.
FORWARDED_HEADER = "X-Stream-App-Forwarded"
#: A connect of its own bound: an owner whose address drops packets took the
#: whole 5 s before, and held one of the connections below meanwhile.
_FORWARD_TIMEOUT = ClientTimeout(total=5, sock_connect=1)
#: Connections kept to the other workers for forwarded queries, all together:
#: more requests wait for one (within the timeout) rather than each opening its own.
_FORWARD_CONNECTIONS = 32
#: Of those, to one owner: an owner that takes connections and never answers
#: held all 32 before, and the queries for every other owner timed out too.
_FORWARD_CONNECTIONS_PER_OWNER = 8
#: Forwards to one owner at once, those waiting for a connection included;
#: more are answered 503 at once. Waiting, they held the queries' bound
#: below: a frozen owner made a worker refuse every query, its own too.
_FORWARDS_PER_OWNER = 2 * _FORWARD_CONNECTIONS_PER_OWNER
#: Queries answered at once; more are answered 503 (ask again) at once. They
#: share the event loop with the records (an id's partition is hashed in pure
#: Python): many clients could slow processing down, not only the queries.
MAX_QUERIES_IN_FLIGHT = 64
#: The longest integrationId, in code points (docs/contract.md); a longer one
#: is refused before it is hashed or forwarded.
_MAX_ID = 1000
#: Characters of an id a problem document quotes: an answer as large as its
#: request, pipelined by a client that never read, was held by the server.
_QUOTED_ID = 100
#: Bytes of a request line. aiohttp's default, 8,190, is shorter than the query
#: of an integrationId at its limit: 1,000 code points of up to 4 UTF-8 bytes,
#: each percent-escaped in 3 characters, is 12,000 characters of path.
MAX_REQUEST_LINE = 16_384
#: Seconds a connection may sit idle, or half-sent, before it is closed.
#: aiohttp's default, 3,630, let silent connections hold one file descriptor
#: each for an hour: enough of them and RocksDB and Kafka could open none.
KEEPALIVE_S = 15.0
#: Seconds a stop waits for requests in progress (a forward waits up to 5 s
#: for its owner): within the worker's shutdown bound, after the engine's.
_STOP_WAIT_S = 0.5
#: How many times a free port is sought that every address of the host has free.
_SAME_PORT_TRIES: Final = 5
#: What a worker answers a query with (a session, a problem document, or
#: aiohttp's own 400 and 500).
_ANSWERS: Final = frozenset({200, 400, 404, 500, 503})

if TYPE_CHECKING:
    from stream_app.pipeline.engine import Engine
    from stream_app.settings import Settings

log = logging.getLogger(__name__)


def query_document(stored: bytes) -> dict[str, Any]:
    """A stored session as the query answers it: as in an output record, but
    without ``firstSession`` for a profiled session. Stage 2 decides that one
    when it writes an output (docs/contract.md, section 12); what stage 1
    stores for it is a placeholder, and answering it would say false of a
    profile's first session."""
    document = session_document(decode_session(stored))
    if document["profileId"] != "":
        del document["firstSession"]
    return document


class WebServer:
    """Serves the probes and metrics of ``engine``."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(EngineCollector(engine))
        self.registry.register(_ServerCollector(self))
        self.app = web.Application(middlewares=[_problems])
        self.app.router.add_get("/livez", self.livez)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.metrics)
        # Any segment: aiohttp's default pattern, [^{}/]+, left ids with braces
        # (valid integrationIds) unanswerable.
        self.app.router.add_get(
            "/v2/customer_sessions/{integration_id:[^/]+}", self.customer_session
        )
        self.app.on_cleanup.append(self._close_client)
        self._runner: web.AppRunner | None = None
        #: Forwards queries to the owners (made at the first, closed with the app).
        self._client: ClientSession | None = None
        #: The bound port (the setting may be 0: any free port).
        self.port = settings.http_port
        self._queries = 0
        #: Forwards in flight, by owner URL.
        self._forwards: dict[str, int] = {}
        #: A forward's failure is logged once per owner every 10 s: queries of
        #: a worker that died fail until the group moves its partitions (a
        #: session timeout), and each was a line.
        self._told = HeldBack()
        #: Forwarded queries answered 503 for want of the owner's answer.
        self.forward_failures = 0

    async def start(self, port: int | None = None) -> None:
        """Listen on ``port`` (the setting's by default); raises OSError when
        the address cannot be bound."""
        if self._runner is None:
            self._runner = web.AppRunner(
                self.app,
                access_log=None,
                max_line_size=MAX_REQUEST_LINE,
                keepalive_timeout=KEEPALIVE_S,
                shutdown_timeout=_STOP_WAIT_S,
            )
            await self._runner.setup()
        port = self.settings.http_port if port is None else port
        site = await self._listen(port)
        tries = 0
        while port == 0 and len(ports := self._bound_ports()) > 1:
            # A host of several addresses ("" or localhost: IPv4 and IPv6)
            # got a free port on each, not one port: the port advertised (the
            # first) refused the other family's peers, so queries forwarded to
            # this worker failed. Bound again on that one port everywhere.
            await site.stop()
            tries += 1
            if tries > _SAME_PORT_TRIES:
                raise OSError(errno.EADDRINUSE, "no port is free on every address of the host")
            try:
                site = await self._listen(ports[0])
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                site = await self._listen(0)  # taken on another address: another one
        self.port = self._bound_ports()[0]
        log.info("serving /livez /readyz /metrics on %s:%d", self.settings.http_host, self.port)

    async def _listen(self, port: int) -> web.TCPSite:
        assert self._runner is not None  # noqa: S101 - set up by start
        site = web.TCPSite(self._runner, self.settings.http_host, port)
        await site.start()
        return site

    def _bound_ports(self) -> list[int]:
        """The ports listened on, in the order of the addresses, each once."""
        assert self._runner is not None  # noqa: S101 - set up by start
        return list(dict.fromkeys(int(address[1]) for address in self._runner.addresses))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def livez(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, _request: web.Request) -> web.Response:
        status = self.engine.status()
        return web.Response(
            body=json.dumps(status),
            status=200 if status["ready"] else 503,
            content_type="application/json",
        )

    async def customer_session(self, request: web.Request) -> web.Response:
        if self._queries >= MAX_QUERIES_IN_FLIGHT:
            return _problem(503, "too many queries in flight on this worker", retry=True)
        self._queries += 1
        try:
            return await self._customer_session(request)
        finally:
            self._queries -= 1

    async def _customer_session(self, request: web.Request) -> web.Response:
        # The id from the segment as sent: yarl leaves an escape that is not
        # UTF-8 as it is, so "%FF" was looked up as the three characters of
        # another id ("%25FF").
        if "#" in request.raw_path:
            # Not valid in a request target. Where it goes depends on the HTTP
            # parser and on whether a query follows (the id, the fragment, the
            # query dropped); forwarded, what follows it is cut off: another id.
            return _problem(400, "a '#' in an integrationId must be sent escaped, as %23")
        try:
            segment = request.rel_url.raw_path.rpartition("/")[2]
            integration_id = unquote_to_bytes(segment).decode()
        except UnicodeError:  # escaped or raw bytes that are not UTF-8
            return _problem(404, "no session has an integrationId that is not UTF-8")
        if len(integration_id) > _MAX_ID:
            return _problem(400, f"an integrationId is at most {_MAX_ID} characters")
        raw_app = request.query.get("applicationId")
        application_id = self.settings.default_application_id
        if raw_app is not None:
            # At most 10 ASCII digits: str.isdigit() also takes "²" (int() refuses
            # it) and "٣", and int() refuses more than 4,300 digits.
            if not (len(raw_app) <= 10 and raw_app.isascii() and raw_app.isdigit()) or not (
                0 < int(raw_app) <= INT32_MAX
            ):
                return _problem(400, "applicationId must be an integer in 1..2147483647")
            application_id = int(raw_app)
        lookup = self.engine.session_lookup(application_id, integration_id)
        if lookup.unavailable is not None:
            return _problem(503, lookup.unavailable, retry=True)
        if lookup.owner is not None:
            if request.headers.get(FORWARDED_HEADER):
                return _problem(503, "the session's owner is moving", retry=True)
            return await self._forward(lookup.owner, request, raw_app)
        if lookup.stored is None:
            shown = integration_id[:_QUOTED_ID] + (
                "..." if len(integration_id) > _QUOTED_ID else ""
            )
            return _problem(404, f"no session {shown!r} in application {application_id}")
        try:
            document = query_document(lookup.stored)
        except ValueError as exc:  # msgspec's DecodeError: damaged, or another release's form
            # Not a 503: asking again would not mend it.
            if (held := self._told.due("unreadable session")) is not None:
                log.warning(
                    "the stored session %s cannot be read: %s%s",
                    excerpt(integration_id.encode()),
                    exc,
                    held_back(held, "queries met a stored session they could not read"),
                )
            return _problem(500, "the session's stored form cannot be read")
        return web.Response(body=json.dumps(document), content_type="application/json")

    async def _forward(
        self, owner: str, request: web.Request, application_id: str | None
    ) -> web.Response:
        if self._forwards.get(owner, 0) >= _FORWARDS_PER_OWNER:
            self.forward_failures += 1
            return _problem(503, "the session's owner is busy or does not answer", retry=True)
        self._forwards[owner] = self._forwards.get(owner, 0) + 1
        try:
            return await self._forwarded(owner, request, application_id)
        finally:
            left = self._forwards.pop(owner) - 1
            if left:
                self._forwards[owner] = left

    async def _forwarded(
        self, owner: str, request: web.Request, application_id: str | None
    ) -> web.Response:
        # The path with its escapes as it came (a plain string would be
        # re-encoded: "%ff" would reach the owner as "%FF", another id); from
        # the relative URL, so a target sent in absolute form ("GET
        # http://host/...") is forwarded by its path too. Of the query, only
        # the applicationId checked above: other parameters mean nothing here,
        # and raw bytes among them could not be sent on.
        query = "" if application_id is None else f"?applicationId={application_id}"
        if self._client is None:
            connector = TCPConnector(
                limit=_FORWARD_CONNECTIONS, limit_per_host=_FORWARD_CONNECTIONS_PER_OWNER
            )
            self._client = ClientSession(connector=connector, timeout=_FORWARD_TIMEOUT)
        try:
            # The owner's URL is what it advertised: a worker of another
            # version may have advertised one that cannot be read (ValueError).
            url = URL(owner.rstrip("/") + request.rel_url.raw_path + query, encoded=True)
            # Not redirected: whatever answers the owner's address with a
            # redirect (a proxy, an ingress, another service) is no worker.
            async with self._client.get(
                url, headers={FORWARDED_HEADER: "1"}, allow_redirects=False
            ) as answer:
                body = await answer.read() if answer.status in _ANSWERS else b""
                if not _a_workers_answer(answer.status, answer.content_type, body):
                    return self._unanswered(
                        request,
                        owner,
                        f": answered {answer.status} {answer.content_type}, as no worker answers",
                    )
                # The owner's 503 says when to ask again: `stream-app inspect`
                # waits on it. Its type as it says (a problem document, a
                # session, or aiohttp's own plain-text 400).
                headers = {
                    name: answer.headers[name]
                    for name in ("Content-Type", "Retry-After")
                    if name in answer.headers
                }
                return web.Response(body=body, status=answer.status, headers=headers)
        except (ClientError, TimeoutError, ValueError) as exc:
            return self._unanswered(request, owner, f" failed: {exc!r}")

    def _unanswered(self, request: web.Request, owner: str, why: str) -> web.Response:
        """A forward that got no worker's answer: counted, logged once per owner
        every 10 s, answered 503."""
        self.forward_failures += 1
        if (held := self._told.due(owner)) is not None:
            log.warning(
                "forwarding %s to %s%s%s",
                request.path_qs,
                owner,
                why,
                held_back(held, f"forwards to {owner} failed"),
            )
        return _problem(503, "the session's owner did not answer", retry=True)

    async def _close_client(self, _app: web.Application) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


class _ServerCollector(Collector):
    """The HTTP server's own counters."""

    def __init__(self, server: WebServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "stream_app_forward_failures",
            "Session queries this worker forwarded to their owner that got no worker's "
            "answer (each answered 503): the owner did not answer, answered as no worker "
            "does, or had too many forwards in flight",
            value=self.server.forward_failures,
        )


def _a_workers_answer(status: int, content_type: str, body: bytes) -> bool:
    """Whether a forwarded query's answer is one a worker gives, of those
    that say something of the session: a session (200, JSON), or that there
    is none (404, a problem document of that status). Before, any 404 was
    passed on: a proxy's or another service's at the owner's address said
    that the session did not exist. (A 400, 500 or 503 says nothing of it,
    and is passed on as it came: aiohttp's own 400 is plain text.)"""
    if status not in _ANSWERS:
        return False
    if status not in (200, 404):
        return True
    if content_type != "application/json":
        return False
    if status == 200:
        return True
    try:
        problem = json.loads(body)
    except json.JSONDecodeError:
        return False
    # A worker's own, as every release has worded it: many services answer
    # a JSON 404 with a "status" (Spring's, RFC 7807's). Other fields are
    # let be, as a later release may add some.
    return (
        type(problem) is dict
        and problem.get("status") == status
        and type(problem.get("detail")) is str
        and problem["detail"].startswith("no session ")
    )


@web.middleware
async def _problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own answers for no such path or another method, as problem
    documents like the query's other answers (docs/openapi.yaml)."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _problem(404, "no such resource; sessions are at /v2/customer_sessions/{id}")
    except web.HTTPMethodNotAllowed as exc:
        response = _problem(405, f"{request.method} is not allowed here")
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        return response


def _problem(status: int, detail: str, *, retry: bool = False) -> web.Response:
    headers = {"Retry-After": "1"} if retry else None
    return web.Response(
        body=json.dumps({"status": status, "detail": detail}),
        status=status,
        content_type="application/json",
        headers=headers,
    )
