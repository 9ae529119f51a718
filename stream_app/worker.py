"""``stream-app worker``: topics, engine, signals and the bounded stop.

Exit codes: 0 after a clean stop (SIGTERM, SIGINT or SIGHUP); 1 when the stop did not
finish within ``shutdown_timeout_s`` (the broker is gone, say) or the engine
failed; 2 for a configuration error. Each of these ends with one clear line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import ipaddress
import logging
import os
import resource
import signal
import socket
import threading
from typing import Any, Final

from aiokafka.errors import BrokerResponseError, KafkaError, ProducerFenced

from stream_app import console
from stream_app.errors import ConfigurationError
from stream_app.pipeline.application_settings import ApplicationSettingsRegistry
from stream_app.pipeline.engine import Engine, usable_state_dir
from stream_app.pipeline.kafka import (
    KAFKA_RETRY_FIRST_S,
    KAFKA_RETRY_MAX_S,
    not_authorized,
    unless_stopped,
    worker_probe,
)
from stream_app.pipeline.topics import (
    TopicLayout,
    check_topics,
    ensure_topics,
)
from stream_app.settings import Settings
from stream_app.web.server import WebServer

log = logging.getLogger(__name__)

EXIT_FAILED: Final = 1
EXIT_CONFIGURATION: Final = 2


async def run(settings: Settings, watchdog: list[threading.Timer] | None = None) -> int:
    """Validate, wait for Kafka, serve HTTP and run the engine until a signal.

    On a signal a watchdog timer ends the process if the stop outlasts
    ``shutdown_timeout_s``; it is put in ``watchdog`` when given, for the
    caller to cancel once the event loop is closed (``asyncio.run`` waits
    for its executor's threads, a resolver call among them), else cancelled
    when this returns."""
    own_watchdog = watchdog is None
    timers: list[threading.Timer] = [] if watchdog is None else watchdog
    raise_open_files_limit()
    try:
        registry = ApplicationSettingsRegistry.load(settings.application_settings_file)
    except ConfigurationError as exc:
        log.error("configuration error: %s", exc)  # noqa: TRY400 - one line, no traceback
        return EXIT_CONFIGURATION
    stopping = asyncio.Event()
    engine: Engine | None = None

    def arm_watchdog() -> None:
        """End the process if the stop outlasts its bound (once)."""
        if timers:
            return
        timer = threading.Timer(settings.shutdown_timeout_s, _give_up, (settings,))
        timer.daemon = True
        timer.start()
        timers.append(timer)

    def on_signal(signum: int) -> None:
        if timers:
            return
        log.info(
            "%s: stopping (bound %.0f s)", signal.Signals(signum).name, settings.shutdown_timeout_s
        )
        arm_watchdog()
        stopping.set()
        if engine is not None:
            engine.stop()

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_fences)
    for signum in console.STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    if console.early_signals:  # a SIGTERM before these handlers: stop now
        on_signal(console.early_signals[0])

    async def serve_and_run() -> int:
        nonlocal engine
        try:
            usable_state_dir(settings)
            usable_http_address(settings)
            layout = await _wait_for_kafka(settings, stopping)
            if layout is None:
                return 0
            check_topics(settings, layout)
            engine = Engine(settings, layout, registry)
            # A stop the engine begins itself (a failure) is bounded as a signalled one.
            engine.on_stopping = arm_watchdog
            engine.check_local_state()
            web = await serve(settings, engine)
        except ConfigurationError as exc:
            log.error("configuration error: %s", exc)  # noqa: TRY400
            return EXIT_CONFIGURATION
        if web is None:
            return EXIT_FAILED
        engine.assignor.url = advertised_url(settings, web.port)
        # Everything alive now (modules, classes, settings: about 60,000 tracked
        # objects) lives as long as the process. Frozen, Python's full collections
        # skip it: they paused the event loop for 25-35 ms every few seconds under
        # load, and take 4-7 ms frozen (docs/performance-history.md).
        gc.collect()
        gc.freeze()
        try:
            if stopping.is_set():
                engine.stop()
            await engine.run()
        except ConfigurationError as exc:  # partitions added meanwhile, or an ACL missing
            log.error("configuration error: %s", exc)  # noqa: TRY400 - one line, no traceback
            return EXIT_CONFIGURATION
        except Exception:
            log.exception("the worker failed")
            return EXIT_FAILED
        finally:
            await web.stop()
        if not engine.stopped_cleanly:
            log.error(
                "stopped, but not every transaction was committed (or Kafka could not be "
                "reached to confirm it): their records are processed again by the next owner"
            )
            return EXIT_FAILED
        return 0

    try:
        return await serve_and_run()
    finally:  # on every path: a watchdog left running would end the process later
        if own_watchdog:
            for timer in timers:
                timer.cancel()


#: The most open files a worker asks for when its hard limit is unlimited.
_OPEN_FILES: Final = 1 << 20


def raise_open_files_limit() -> None:
    """Raise the soft limit of open files to the hard one, as Go's runtime does
    for every program. A worker holds a RocksDB database per store of each
    partition it owns (up to ``STREAM_APP_ROCKSDB__MAX_OPEN_FILES`` files
    each), its Kafka connections and its HTTP clients; the soft limit many
    container runtimes set, 1,024, left it failing with EMFILE as its stores
    grew."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = _OPEN_FILES if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            log.debug("open files: soft limit raised from %d to %d", soft, wanted)
    except (ValueError, OSError) as exc:
        log.debug("open files: the soft limit stays as it is (%r)", exc)


def advertised_url(settings: Settings, port: int) -> str:
    """Where other workers reach this one's HTTP server (sent to them in the
    group's assignment, for forwarded queries)."""
    host = settings.advertised_host or socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def usable_http_address(settings: Settings) -> None:
    """Raise :class:`ConfigurationError` when ``STREAM_APP_HTTP_HOST`` is an
    address this machine does not have, or a name no resolver knows, or when
    ``STREAM_APP_HTTP_PORT`` is 0 for a static member (:func:`serve`). Found
    only once Kafka answered, it exited 1 (as a port taken does), and never
    while Kafka was down. A name the resolver does not answer for in
    :data:`_RESOLVE_S` is left to the start of the server."""
    if settings.group_instance_id is not None and settings.http_port == 0:
        raise ConfigurationError(_STATIC_PORT.format("STREAM_APP_HTTP_PORT is 0 (any free port)"))
    host = settings.http_host
    if not host:
        return  # every interface
    candidates: list[tuple[int, tuple[Any, ...]]]
    try:
        version = ipaddress.ip_address(host).version
        candidates = [(socket.AF_INET6 if version == 6 else socket.AF_INET, (host, 0))]
    except ValueError:
        resolved = _resolve(host)
        if resolved is None:
            return
        candidates = resolved
    for family, address in candidates:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind(address)
                    continue
                except OSError as exc:  # not this machine's, IPv6 disabled, no scope
                    failure = exc
        except OSError as exc:  # a family this machine has not
            if len(candidates) > 1:
                continue  # asyncio's server passes over it too
            failure = exc
        # The server binds every address of the name, and fails on any one.
        shown = "" if address[0] == host else f" {address[0]}"
        raise ConfigurationError(
            f"STREAM_APP_HTTP_HOST={host}: cannot serve on this address{shown} "
            f"({failure.strerror}); 0.0.0.0 serves every IPv4 address of this machine"
        )


#: Seconds the start waits for the resolver to answer for a host name.
_RESOLVE_S: Final = 2.0


def _resolve(host: str) -> list[tuple[int, tuple[Any, ...]]] | None:
    """The (family, address with port 0) ``host`` names; None when the
    resolver does not answer in time or says to try again (DNS not ready
    yet: the server's start resolves it again). A name it does not know is a
    :class:`ConfigurationError`. On a thread: a resolver that does not answer
    must not hold the start past its bound."""
    answer: list[list[tuple[int, tuple[Any, ...]]] | OSError] = []

    def ask() -> None:
        try:
            infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            answer.append(list(dict.fromkeys((info[0], info[4]) for info in infos)))
        except OSError as exc:
            answer.append(exc)

    thread = threading.Thread(target=ask, name="resolve-http-host", daemon=True)
    thread.start()
    thread.join(_RESOLVE_S)
    if not answer:
        return None
    found = answer[0]
    if isinstance(found, socket.gaierror) and found.errno in _UNKNOWN_NAME:
        raise ConfigurationError(
            f"STREAM_APP_HTTP_HOST={host}: no such host ({found.strerror}); 0.0.0.0 serves "
            "every IPv4 address of this machine"
        )
    return None if isinstance(found, OSError) else found


#: What getaddrinfo says of a name that no resolver knows (not: try again).
_UNKNOWN_NAME: Final = frozenset(
    code
    for code in (getattr(socket, "EAI_NONAME", None), getattr(socket, "EAI_NODATA", None))
    if code is not None
)


async def serve(settings: Settings, engine: Engine) -> WebServer | None:
    """The worker's HTTP server, listening; None when it cannot (logged).

    A second worker on one host, both on the default port, found it taken and
    exited 1. Left unset, the port is 8080 when free and any free port
    otherwise (the group's assignment advertises the port bound); a port set
    explicitly is that port or nothing.

    Raises ConfigurationError instead of serving on a free port for a static
    member (``group_instance_id``), whose port must survive a restart: it
    gets its assignment back without a rebalance, with the address it
    advertised before, and the other workers forwarded its sessions to a
    port nothing served, for good (port 0: :func:`usable_http_address`).
    """
    port = settings.http_port
    web = WebServer(settings, engine)
    try:
        try:
            await web.start()
        except OSError as exc:
            if "http_port" in settings.model_fields_set or exc.errno != errno.EADDRINUSE:
                raise
            if settings.group_instance_id is not None:
                await web.stop()
                raise ConfigurationError(
                    _STATIC_PORT.format(f"port {port} is taken (another worker on this host?)")
                ) from None
            log.warning(
                "port %d is taken (another worker on this host?): serving HTTP on a free port "
                "instead; set STREAM_APP_HTTP_PORT to choose one",
                port,
            )
            port = 0
            await web.start(port=port)
    except (OSError, ValueError) as exc:  # ValueError: a host name IDNA refuses
        log.error("cannot serve HTTP on %s:%d: %s", settings.http_host, port, exc)  # noqa: TRY400
        await web.stop()
        return None
    return web


#: Why a static member does not serve HTTP on any free port.
_STATIC_PORT: Final = (
    "{}: with STREAM_APP_GROUP_INSTANCE_ID set, a worker restarted within the session "
    "timeout keeps the HTTP address it advertised, and the other workers forward its "
    "sessions there: set STREAM_APP_HTTP_PORT to a port free on this host that it keeps"
)

#: Seconds a start-up attempt waits for Kafka's answer before saying so.
_UNANSWERED_S: Final = 10.0


async def _wait_for_kafka(settings: Settings, stopping: asyncio.Event) -> TopicLayout | None:
    """Declare the topics, retrying an unreachable broker with backoff until it
    answers (or the worker is told to stop: None)."""
    backoff = KAFKA_RETRY_FIRST_S
    while not stopping.is_set():
        # A broker that accepts connections and never answers holds an attempt
        # for aiokafka's request timeout (40 s): a stop meanwhile waited for it,
        # outlasted the shutdown bound and exited 1.
        # Said while an attempt waits: a broker behind an address that drops
        # packets (a wrong IP, a NetworkPolicy) answers nothing, and the
        # attempt's failure comes only after the request timeout (40 s), with
        # nothing from the worker before it.
        waiting = asyncio.get_running_loop().call_later(
            _UNANSWERED_S,
            log.warning,
            "waited %.0f s for Kafka at %s to answer, or to have the topics ready (an "
            "address that drops packets?): still waiting",
            _UNANSWERED_S,
            settings.bootstrap_servers,
        )
        try:
            attempt = await unless_stopped(ensure_topics(settings, worker=True), stopping)
        finally:
            waiting.cancel()
        if attempt is None:
            return None
        try:
            return attempt.result()
        except (KafkaError, OSError) as exc:
            found = await worker_probe(settings, stopping)
            if stopping.is_set():  # told to stop during the probe: no "retrying" line
                return None
            if found.refused is not None:
                raise found.refused from exc
            # A broker error is an answer (the controller moved, say); anything
            # else, no answer at all.
            if isinstance(exc, BrokerResponseError):
                what = f"answered {exc}"
            else:
                hint = "" if found.hint is None else f": {found.hint}"
                what = f"is not reachable ({type(exc).__name__}){hint}"
            log.warning(
                "Kafka at %s %s: retrying in %.0f s", settings.bootstrap_servers, what, backoff
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), backoff)
        backoff = min(backoff * 2, KAFKA_RETRY_MAX_S)
    return None


def _quiet_fences(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    """A fenced producer fails every future it still holds, and aiokafka keeps some
    of them to itself; the engine has already logged the fence once per task. So
    it does with a refused operation (a missing ACL), which stops the worker with
    one configuration error, and when its sender ends on an unexpected error
    (a connection closed as it looked for its coordinator): aiokafka logs that
    once, the task's transaction fails and restarts, and each batch the
    producer held was a traceback at ERROR minutes later, when the old
    producer was collected."""
    exc = context.get("exception")
    if (
        isinstance(exc, ProducerFenced)
        or (isinstance(exc, BaseException) and not_authorized(exc) is not None)
        or (isinstance(exc, KafkaError) and _SENDER_ENDED in str(exc))
    ):
        log.debug("after a fence, a refusal or an ended sender: %s", context.get("message"))
        return
    loop.default_exception_handler(context)


#: What aiokafka fails a producer's batches with when its sender routine ends
#: on an unexpected error (aiokafka/producer/sender.py).
_SENDER_ENDED: Final = "Unexpected error during batch delivery"


def _give_up(settings: Settings) -> None:
    """Runs on a thread, so it fires even if the event loop is stuck."""
    log.error(
        "could not stop cleanly within %.0f s (is Kafka at %s reachable?): exiting; "
        "uncommitted records are processed again by the next owner",
        settings.shutdown_timeout_s,
        settings.bootstrap_servers,
    )
    logging.shutdown()
    os._exit(EXIT_FAILED)
