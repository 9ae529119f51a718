"""Kafka connection options derived from :class:`~stream_app.settings.Settings`."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Coroutine
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Protocol, TypeVar

from stream_app.errors import ConfigurationError
from stream_app.settings import Settings

if TYPE_CHECKING:  # for the annotations: this module imports aiokafka where it uses it
    from aiokafka.structs import TopicPartition

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Retries of a Kafka that does not answer at the start: the first after 1 s,
#: doubling up to 5 s. (Up to 30 s before: a worker started during an outage
#: waited that long after Kafka was back. Kafka's clients reconnect within
#: reconnect.backoff.max.ms, 1 s.)
KAFKA_RETRY_FIRST_S: Final = 1.0
KAFKA_RETRY_MAX_S: Final = 5.0


def not_authorized(exc: BaseException | None) -> ConfigurationError | None:
    """The configuration error to stop with when ``exc`` is the broker refusing
    this worker's principal an operation (an ACL is missing), else None. No
    retry mends it; Kafka Streams stops on these too."""
    from aiokafka.errors import (
        ClusterAuthorizationFailedError,
        GroupAuthorizationFailedError,
        TopicAuthorizationFailedError,
        TransactionalIdAuthorizationFailed,
    )

    refusals = (
        ClusterAuthorizationFailedError,
        GroupAuthorizationFailedError,
        TopicAuthorizationFailedError,
        TransactionalIdAuthorizationFailed,
    )
    if not isinstance(exc, refusals):
        return None
    return ConfigurationError(
        f"Kafka does not authorize this worker's principal: {exc}; grant it the ACLs "
        "that docs/operations.md lists (The worker's principal)"
    )


def refused_join(exc: BaseException, settings: Settings) -> ConfigurationError | None:
    """The configuration error to stop with when ``exc`` is the group
    coordinator refusing this worker's join for good, else None. aiokafka
    hands these to the waiting poll; they were a traceback and exit 1, which
    the runbook reads as a bug of ours, at every restart."""
    from aiokafka.errors import InconsistentGroupProtocolError, InvalidSessionTimeoutError

    if isinstance(exc, InvalidSessionTimeoutError):
        return ConfigurationError(
            f"Kafka refuses STREAM_APP_SESSION_TIMEOUT_S={settings.session_timeout_s:g}: it is "
            "outside the brokers' group.min.session.timeout.ms..group.max.session.timeout.ms "
            f"({exc})"
        )
    if isinstance(exc, InconsistentGroupProtocolError):
        return ConfigurationError(
            f"the consumer group {settings.app_id} has members that are not this worker's kind "
            "(another protocol or partition assignor): another application uses "
            f"STREAM_APP_APP_ID={settings.app_id} as its group id ({exc})"
        )
    return None


async def unless_stopped(
    work: Coroutine[Any, Any, T], stopping: asyncio.Event
) -> asyncio.Task[T] | None:
    """``work`` run until it ends (its task, done) or the worker is told to stop
    (None; the work cancelled, and given a second to end)."""
    task = asyncio.ensure_future(work)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait((task, stop), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait((task,), timeout=1.0)
    return task if task.done() and not task.cancelled() else None


async def refused_worker(settings: Settings, stopping: asyncio.Event) -> ConfigurationError | None:
    """The configuration error to stop with when the brokers refuse this
    worker (credentials or certificates, see :func:`refusal`: a retry would
    meet the same answer); None when they do not, and once the worker is told
    to stop, since the probe may wait for a broker that never answers."""
    return (await worker_probe(settings, stopping)).refused


class WorkerProbe(NamedTuple):
    """What :func:`probe` found for a worker: the configuration error to stop
    with, or a hint for its line saying that Kafka is not reachable."""

    refused: ConfigurationError | None = None
    hint: str | None = None


async def worker_probe(settings: Settings, stopping: asyncio.Event) -> WorkerProbe:
    """:func:`probe` for a worker; nothing once it is told to stop, since the
    probe may wait for a broker that never answers."""
    attempt = await unless_stopped(probe(client_options(settings)), stopping)
    if attempt is None:
        return WorkerProbe()
    found = attempt.result()
    if found.refused is None:
        return WorkerProbe(hint=found.hint)
    return WorkerProbe(
        ConfigurationError(
            f"Kafka at {settings.bootstrap_servers} refuses this worker: {found.refused} "
            "(see STREAM_APP_SECURITY__*)"
        )
    )


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for aiokafka clients (admin, producer, consumer)."""
    sec = settings.security
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": sec.protocol,
    }
    try:
        context = sec.ssl_context()
    except ValueError as exc:  # a file that loaded at start and no longer does
        raise ConfigurationError(str(exc)) from None
    if context is not None:
        options["ssl_context"] = context
    if sec.protocol.startswith("SASL"):
        options["sasl_mechanism"] = sec.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = sec.sasl_username
        options["sasl_plain_password"] = (
            sec.sasl_password.get_secret_value() if sec.sasl_password else None
        )
    return options


class _Stoppable(Protocol):
    def stop(self) -> Awaitable[None]: ...


class _Startable(_Stoppable, Protocol):
    def start(self) -> Awaitable[None]: ...


#: Stops that go on after their caller was cancelled (a reference each, so
#: that they are not collected while they run).
_STOPPING: set[asyncio.Future[None]] = set()

#: Starts of :func:`start_fully` not ended yet, by ``id`` of their client
#: (kept alive by its start meanwhile; a client need not be hashable).
_STARTING: dict[int, asyncio.Future[None]] = {}


async def start_fully(client: _Startable) -> None:
    """``client.start()``, carried to its end even when the caller is
    cancelled; a :func:`stop_fully` of the client then stops it once the
    start has ended.

    aiokafka's consumer, cancelled in its start, leaves the connection its
    bootstrap had open: ``ERROR asyncio: Unclosed AIOKafkaConnection`` when
    it is collected, one for each task start a rebalance cut short (37 at
    once in a 48-partition run). Stopped while its start goes on, it is
    closed under the start, which goes on to start its metadata task.

    Not for a transactional producer: its start is the fence, and one that
    went on after its task was revoked could fence the task's next owner."""
    starting = asyncio.ensure_future(client.start())
    _STARTING[id(client)] = starting
    starting.add_done_callback(lambda _: _STARTING.pop(id(client), None))
    await asyncio.shield(starting)


async def stop_fully(client: _Stoppable) -> None:
    """``client.stop()``, carried to its end even when the caller is cancelled.

    aiokafka's producer and consumer mark themselves closed as their stop
    begins: a stop cut short by a cancellation can never be finished, and its
    background tasks and connections stay open for the life of the process.
    Here the stop goes on in the background, and the cancellation is passed
    on at once, as the caller (a task dropped, a worker stopping) expects.

    A start of :func:`start_fully` still going on (its caller was cancelled)
    ends first, up to aiokafka's request timeout: that stop is not waited
    for, or a cancelled task start would hold its revocation as long."""
    starting = _STARTING.get(id(client))
    if starting is not None:
        _stop_in_background(_stop_once_started(client, starting))
        return
    await asyncio.shield(_stop_in_background(client.stop()))


async def _stop_once_started(client: _Stoppable, starting: asyncio.Future[None]) -> None:
    # Whether it started or failed, a stop closes what it opened; its failure
    # is its starter's to say (said there, or cancelled first).
    await asyncio.wait((starting,))
    if not starting.cancelled():
        starting.exception()
    await client.stop()


def _stop_in_background(stop: Awaitable[None]) -> asyncio.Future[None]:
    """``stop`` run to its end whoever awaits it, its failure logged."""
    stopping = asyncio.ensure_future(stop)
    _STOPPING.add(stopping)
    stopping.add_done_callback(_stopped)
    return stopping


def _stopped(stopping: asyncio.Future[None]) -> None:
    _STOPPING.discard(stopping)
    if not stopping.cancelled() and stopping.exception() is not None:
        log.debug("a Kafka client's stop failed: %r", stopping.exception())


async def partition_count(options: dict[str, Any], topic: str) -> int:
    """How many partitions ``topic`` has (0 when it does not exist, or the
    broker does not show it yet). Raises aiokafka's
    ``TopicAuthorizationFailedError`` when this principal may not describe it:
    that is no missing topic, and no wait mends it.

    Asked with auto-creation off: aiokafka's ``describe_topics`` has a broker
    with ``auto.create.topics.enable`` (Kafka's default) create a missing
    topic, with the broker's partition count and configs, and a command
    topic's partition count is permanent."""
    from aiokafka.client import AIOKafkaClient
    from aiokafka.errors import TopicAuthorizationFailedError
    from aiokafka.protocol.metadata import MetadataRequest

    client = AIOKafkaClient(**options)
    try:
        await client.bootstrap()  # in the try: a failed or cancelled start closes it too
        request = MetadataRequest([topic], allow_auto_topic_creation=False)
        response = await client.send(client.get_random_node(), request)
    finally:
        await client.close()
    for entry in response.to_object()["topics"]:
        if entry.get("topic") != topic:
            continue
        code = entry.get("error_code")
        if not code:
            return len(entry.get("partitions", ()))
        if code == TopicAuthorizationFailedError.errno:
            raise TopicAuthorizationFailedError(topic)
    return 0


async def committed_offsets(
    options: dict[str, Any], group_id: str
) -> dict[TopicPartition, tuple[int, str]]:
    """Every offset ``group_id`` has committed, with its metadata, by
    TopicPartition, asked on a client of its own (see :class:`GroupOffsets`)."""
    reader = GroupOffsets(options)
    try:
        return await reader.read(group_id)
    finally:
        await reader.close()


class GroupOffsets:
    """Reads a group's committed offsets, on one client kept open until
    :meth:`close`. Raises the Kafka error the group's coordinator answers.

    Not aiokafka's ``list_consumer_group_offsets`` nor the consumer's
    ``committed``: they read only the errors of partitions, and a coordinator
    still loading the group's offsets, or one that moved, answers with an
    error for the whole request and no partition: that read as a group with
    no offsets at all."""

    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        self._client: Any = None
        #: Held while the client is made: the task starts after an assignment
        #: read together, and each made a client of its own.
        self._making = asyncio.Lock()

    async def client(self) -> Any:
        """The kept client, bootstrapped: the engine's raw asks of an input
        share it (a client of their own, cancelled while it bootstrapped,
        left its connection open)."""
        return await self._started()

    async def _started(self) -> Any:
        from aiokafka.client import AIOKafkaClient

        async with self._making:
            if self._client is None:
                client = AIOKafkaClient(**self._options)
                bootstrapping = asyncio.ensure_future(client.bootstrap())
                try:
                    await asyncio.shield(bootstrapping)
                except BaseException:
                    # Closed once the bootstrap has ended: cancelled, aiokafka's
                    # leaves its bootstrap connection open (an ERROR at exit).
                    bootstrapping.add_done_callback(lambda done: _close_after(client, done))
                    raise
                self._client = client
            return self._client

    async def read(self, group_id: str) -> dict[TopicPartition, tuple[int, str]]:
        from aiokafka.client import CoordinationType
        from aiokafka.errors import GroupAuthorizationFailedError, for_code
        from aiokafka.protocol.commit import OffsetFetchRequest
        from aiokafka.structs import TopicPartition

        client = await self._started()
        try:
            coordinator = await client.coordinator_lookup(CoordinationType.GROUP, group_id)
        except GroupAuthorizationFailedError as exc:  # aiokafka's names no group
            raise GroupAuthorizationFailedError(group_id) from exc
        response = await client.send(coordinator, OffsetFetchRequest(group_id, None))
        code = getattr(response, "error_code", 0)  # the whole request's (v2 and later)
        if code:
            raise for_code(code)(group_id)  # named as the consumer's join names it
        offsets: dict[TopicPartition, tuple[int, str]] = {}
        for topic, partitions in response.topics:
            for partition, offset, metadata, partition_code in partitions:
                if partition_code:
                    raise for_code(partition_code)(
                        f"fetching the committed offset of group {group_id} for "
                        f"{topic}[{partition}]"
                    )
                if offset >= 0:
                    offsets[TopicPartition(topic, partition)] = (offset, metadata or "")
        return offsets

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _close_after(client: Any, bootstrap: asyncio.Future[None]) -> None:
    """Close ``client``, whose ``bootstrap`` failed or was given up on."""
    if not bootstrap.cancelled():
        bootstrap.exception()  # said by the caller that gave up, if anyone
    _stop_in_background(client.close())


class Unreachable(NamedTuple):
    """Why the brokers cannot be reached, and whether they refuse this client
    (credentials, certificates: no retry mends it) rather than not answer."""

    why: str
    refused: bool = False


async def unreachable(options: dict[str, Any]) -> Unreachable | None:
    """Why the brokers in ``options`` cannot be reached; None when they answer."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(**options)
    try:
        await admin.start()
    except (KafkaError, OSError) as exc:
        servers = options.get("bootstrap_servers")
        why = await refusal(options)
        if why is not None:
            return Unreachable(f"Kafka at {servers} refuses this client: {why}", refused=True)
        return Unreachable(f"Kafka at {servers} is not reachable ({type(exc).__name__})")
    await admin.close()
    return None


async def refusal(options: dict[str, Any], timeout_s: float = 10.0) -> str | None:
    """Why the brokers in ``options`` refuse this client, or None when one lets it
    in or none can be reached (which is worth retrying), within ``timeout_s``.

    A refusal is a configuration mistake that no retry mends: credentials the
    broker rejects, a SASL mechanism it does not enable, a certificate of the
    broker's that the configured CA does not sign. aiokafka logs these as it
    meets them, then reports only that it could not bootstrap; this connects
    to each bootstrap server once, as the client does, to tell them apart."""
    return (await probe(options, timeout_s)).refused


class Probe(NamedTuple):
    """What one connection to each bootstrap server said (see :func:`refusal`)."""

    #: Why they refuse this client: no retry mends it.
    refused: str | None = None
    #: Why none could be reached, when the way they failed suggests it.
    hint: str | None = None


#: A TLS client at a PLAINTEXT listener: the broker reads the ClientHello as
#: a request of about 369 MB, over its bound, and drops the connection. Not
#: a refusal: a proxy whose brokers are away may drop connections too.
_CUT_IN_HANDSHAKE: Final = (
    "each closed the connection in the TLS handshake, as a PLAINTEXT or "
    "SASL_PLAINTEXT listener does (check the port, and STREAM_APP_SECURITY__PROTOCOL)"
)


async def probe(options: dict[str, Any], timeout_s: float = 10.0) -> Probe:
    """:func:`refusal`, with a hint when no server let the client in."""
    from aiokafka.conn import collect_hosts, create_conn
    from aiokafka.errors import (
        AuthenticationFailedError,
        AuthenticationMethodNotSupported,
        IllegalSaslStateError,
        KafkaError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
    )

    refused = (
        AuthenticationFailedError,
        AuthenticationMethodNotSupported,
        IllegalSaslStateError,
        SaslAuthenticationFailed,
        UnsupportedSaslMechanismError,
        ssl.SSLCertVerificationError,
    )
    connection = {k: v for k, v in options.items() if k != "bootstrap_servers"}
    found: str | None = None
    tls = str(options.get("security_protocol", "")).endswith("SSL")
    cut: list[bool] = []  # per server that failed otherwise: cut in the TLS handshake
    try:
        async with asyncio.timeout(timeout_s):
            for host, port, _family in collect_hosts(options["bootstrap_servers"], False):
                try:
                    conn = await create_conn(host, port, **connection)
                except refused as exc:
                    text = str(exc)  # aiokafka's broker errors name their type already
                    named = text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"
                    found = found or named
                    continue
                except (KafkaError, OSError, ValueError) as exc:
                    # A TLS alert in the handshake (TLS 1.2) is raised as it is;
                    # one after it (TLS 1.3), as the cause of a closed connection.
                    cause = exc if isinstance(exc, ssl.SSLError) else exc.__cause__
                    found = found or _refused_connection(cause)
                    cut.append(tls and isinstance(exc, ConnectionResetError | ssl.SSLEOFError))
                    continue
                conn.close()
                # One broker lets it in: another that does not yet (a new user's
                # credentials reach each broker in turn) will.
                return Probe()
    except TimeoutError:
        pass  # the servers not tried yet do not answer: what the others said stands
    if found is None and cut and all(cut):
        return Probe(hint=_CUT_IN_HANDSHAKE)
    return Probe(found)


#: The first two bytes of a TLS record: an alert, a handshake (TLS 1.0-1.3).
_TLS_RECORDS: Final = frozenset({0x1503, 0x1603})


def _refused_connection(cause: BaseException | None) -> str | None:
    """What a closed connection's cause says the broker refused, if anything."""
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or ""
        if "CERTIFICATE" in reason or "UNKNOWN_CA" in reason:
            # The broker's TLS alert: it wants a client certificate that it trusts.
            return f"the broker refused this client's TLS certificate ({reason})"
    # A reply's length, read from the first bytes of a TLS record.
    length = cause.expected if isinstance(cause, asyncio.IncompleteReadError) else None
    if length is not None and length >> 16 in _TLS_RECORDS:
        return (
            "the broker answered with TLS: its listener wants STREAM_APP_SECURITY__PROTOCOL "
            "SSL or SASL_SSL"
        )
    return None


async def wait_for_partitions(
    options: dict[str, Any], topics: list[str], deadline: float
) -> list[Any] | None:
    """Every partition of ``topics``, waiting for the topics to be created (and the
    broker to answer); None when ``deadline`` (``time.monotonic()``) passes first.
    Raises TopicAuthorizationFailedError at once: no wait mends a refusal (it was
    waited out, then reported as topics that do not exist)."""
    import time

    from aiokafka import TopicPartition
    from aiokafka.errors import TopicAuthorizationFailedError

    partitions: list[Any] = []
    for topic in topics:
        while True:
            try:
                count = await partition_count(options, topic)
            except TopicAuthorizationFailedError:
                raise
            except Exception as exc:
                log.debug("partition lookup of %s failed: %s", topic, exc)
                count = 0
            if count:
                break
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.2)
        partitions += [TopicPartition(topic, p) for p in range(count)]
    return partitions
