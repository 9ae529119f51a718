"""What the workers do with one record, apart from Kafka.

Two stages, both synchronous over plain mappings (the tasks' RocksDB store
overlays in production, dicts in unit tests), each returning the records to
send:

* :class:`CommandProcessor` (stage 1, keyed by ``integrationId``): decodes a
  command, re-keys it if it arrived on the wrong key, applies it to the stored
  session with the domain core, stores the result, and returns rejections,
  the downstream records of anonymous sessions, and envelopes for stage 2.
* :class:`ProfileProcessor` (stage 2, keyed by ``(applicationId, profileId)``):
  decides ``firstSession`` for profiled sessions and writes their downstream
  records. (Anonymous sessions are always first sessions and skip it; a
  session that gains a profile later therefore moves from one path to the
  other, and only its outputs across that switch may reorder.)

Contract on crash and rebalance: the store writes and the sends of one record
are in the same Kafka transaction under ``exactly_once`` (see
``checkpoint.py``), so a record is either fully applied, stored and emitted,
or not at all; under ``at_least_once`` a crash can replay the commands after
the last committed offset: a task starts past those its restored state holds
(see ``tasks.py``), and each session's ``eventId`` memory suppresses repeats
(a command without an ``eventId`` is remembered by where it first arrived,
``<topic>-<partition>-<offset>``). What is not covered is in README.md.

Trust boundaries. Anyone who may write the command topic is untrusted: its
records' headers are ignored, sizes and timestamps are bounded
(:class:`Limits`), and a record whose key is not its ``integrationId`` or
does not hash to the partition it arrived on (murmur2, Kafka's default
partitioner) is re-keyed rather than applied where it would split a session.
Records on the internal topics are checked as strictly as commands: a
re-keyed record must carry a valid :data:`ORIGIN_HEADER`, its integrationId
as key, and sit on that key's partition; a stage-2 envelope must have the
exact shape stage 1 writes. Anything else is rejected with
``INVALID_INTERNAL_RECORD`` and never applied. (A well-formed forgery on an
internal topic cannot be told from the worker's own records: only the
worker's principal may write them, see docs/operations.md.)
"""

from __future__ import annotations

import base64
import binascii
import bisect
import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Final, NamedTuple

import msgspec

from stream_app import json
from stream_app.domain import (
    ApplicationSettings,
    Applied,
    Command,
    CommandContext,
    Duplicate,
    ErrorDetail,
    EventName,
    Reason,
    Rejected,
    Rejection,
    ReopenCommand,
    ReturnCommand,
    Session,
    SessionPatch,
    SessionState,
    UpdateCommand,
    decode_command,
    decode_session,
    encode_session,
    fit_rejection,
    output_document,
    rejection_document,
)
from stream_app.domain import apply as apply_command
from stream_app.errors import StreamAppError
from stream_app.logs import HeldBack, excerpt, held_back
from stream_app.settings import TopicNames

log = logging.getLogger(__name__)

#: Kafka header carrying where a re-keyed record first arrived, and its
#: original key. Honoured only on the re-key topic (see the module docstring).
ORIGIN_HEADER: Final = "stream-app-origin"

#: 9999-12-31T23:59:59.999Z: the last instant an output timestamp can name.
MAX_TIMESTAMP_MS: Final = 253_402_300_799_999
_MAX_OFFSET: Final = 2**63 - 1
_MAX_TOPIC_NAME: Final = 249
_ORIGIN_FIELDS: Final = frozenset({"topic", "partition", "offset", "timestamp", "key"})

#: Which downstream topic (by TopicNames field) each emitted event goes to.
#: Created and updated sessions are state, not analytics events: not emitted.
EVENT_CHANNEL: Final[dict[EventName, str]] = {
    EventName.CLOSED: "closed",
    EventName.PARTIALLY_RETURNED: "returned",
    EventName.CANCELLED: "cancelled",
    EventName.REVOKED: "cancelled",
    EventName.REOPENED: "reopened",
}

#: The envelope channels stage 2 may write to (the downstream topics).
_CHANNELS: Final = frozenset(EVENT_CHANNEL.values())

#: Session ids are int32 (CustomerSessionV2), shared out by partition.
MAX_SESSION_ID: Final = 2**31 - 1

#: Decoded sessions a stage-1 processor keeps (one per partition): the
#: sessions in flight, whose next command usually follows within a few
#: hundred records, skip decoding their stored form.
DECODED_SESSIONS: Final = 512
#: ... and the most stored bytes they may come to, with a session's objects
#: taking about five times its stored bytes: 1 MiB is about 6 MiB in all per
#: partition, 512 sessions of a 20-line cart. Bounded by count alone, 512
#: carts of 400 lines held about 170 MiB per partition, past a pod's limit.
#: (Sessions in flight past it are decoded each time: round-robin updates of
#: 300 sessions of 30 lines took 33 instead of 15 us at half this bound.)
DECODED_BYTES: Final = 1024 * 1024

_COMMAND_KINDS: Final[dict[type, str]] = {
    UpdateCommand: "update",
    ReturnCommand: "return",
    ReopenCommand: "reopen",
}
#: Every (type, outcome) of :attr:`Metrics.commands` a command can have: a
#: record that is no readable command is only ever rejected.
COMMAND_SERIES: Final = (
    *(
        (kind, outcome)
        for kind in _COMMAND_KINDS.values()
        for outcome in ("applied", "duplicate", "rejected", "rekeyed")
    ),
    ("unknown", "rejected"),
)


#: See :attr:`Limits.bookkeeping_bytes`: 64 eventIds of a UUID's length
#: and a returned quantity on 1,000 lines take about a third of it.
BOOKKEEPING_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Size bounds, end to end (documented in docs/contract.md).

    Defaults fit Kafka's default 1 MiB record limit: the worker lowers
    ``max_original_bytes`` to a quarter of the smallest limit of the topics it
    writes (see ``stream_app.pipeline.topics``), so that a rejection (the
    original bytes in base64, plus the parsed echo) always fits.
    """

    #: A larger command is rejected with LIMIT_EXCEEDED.
    max_command_bytes: int = 256 * 1024
    #: An update that would make the stored session larger is rejected, and
    #: the session is left as it was. Outputs and changelog records of a
    #: session stay below the record limit because of it.
    max_session_bytes: int = 256 * 1024
    #: How far past ``max_session_bytes`` a command that only records what
    #: happened to a session (a return, a reopen, an update that changes
    #: ``state`` alone) may take it: each adds remembered eventIds and returned
    #: quantities, so a session at its limit could otherwise never be
    #: returned, cancelled or reopened. The worker lowers it so that a stored
    #: session stays within a third of the topics' record limit, and refuses
    #: to start when that leaves less than a quarter of ``max_session_bytes``
    #: (``largest_session_bytes`` in ``topics``).
    bookkeeping_bytes: int = BOOKKEEPING_BYTES
    #: The most any stored session may take: a third of the topics' record
    #: limit (shown: Kafka's default). A session whose content a higher
    #: ``max_session_bytes``, lowered since, let past the limit takes the
    #: allowance above past its content, up to this: from the lowered limit,
    #: it could never be returned, cancelled or reopened again.
    max_stored_bytes: int = 1_048_588 // 3
    #: How much of the original key and value a rejection keeps (then: a prefix).
    max_original_bytes: int = 256 * 1024
    #: The most a record the worker writes for a command (a rejection, a
    #: re-keyed record) may take, key, value and headers: the topics' record
    #: limit less 1,024 bytes for the record's own overhead in its batch.
    max_record_bytes: int = 1_048_588 - 1024


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default (murmur2) partitioner picks for ``key``."""
    cached = _PARTITIONS.get((key, partitions))
    if cached is None:
        # Pure Python, ~1 us: a session's keys repeat.
        cached = (murmur2(key) & 0x7FFFFFFF) % partitions
        # Bounded in bytes too: a rejection is keyed by the rejected record's
        # key, which may be 1 MB; no valid id is over 4,000 bytes.
        if len(key) <= _CACHED_KEY_BYTES:
            if len(_PARTITIONS) >= _PARTITIONS_CACHED or _CACHED_BYTES[0] >= _PARTITIONS_BYTES:
                _PARTITIONS.clear()
                _CACHED_BYTES[0] = 0
            _PARTITIONS[key, partitions] = cached
            _CACHED_BYTES[0] += len(key)
    return cached


_M: Final = 0x5BD1E995
_U32: Final = 0xFFFFFFFF
_WORDS: Final = struct.Struct("<I")


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``org.apache.kafka.common.utils.Utils.murmur2``), as an
    unsigned 32-bit int: aiokafka's, reading four bytes at a time (half of
    its cost; tests/pipeline/test_processor.py checks it against Kafka's own
    test vectors and aiokafka's)."""
    length = len(data)
    h = 0x9747B28C ^ length
    whole = length & ~3
    for (k,) in _WORDS.iter_unpack(data[:whole]):
        k = (k * _M) & _U32
        k = ((k ^ (k >> 24)) * _M) & _U32
        h = ((h * _M) & _U32) ^ k
    rest = length & 3
    if rest:
        if rest == 3:
            h ^= data[whole + 2] << 16
        if rest >= 2:
            h ^= data[whole + 1] << 8
        h = ((h ^ data[whole]) * _M) & _U32
    h ^= h >> 13
    h = (h * _M) & _U32
    return h ^ (h >> 15)


_PARTITIONS: dict[tuple[bytes, int], int] = {}
_PARTITIONS_CACHED: Final = 100_000
#: The key bytes the cache holds at most, and the longest key it holds.
_PARTITIONS_BYTES: Final = 8 * 1024 * 1024
_CACHED_KEY_BYTES: Final = 4096
_CACHED_BYTES = [0]


def valid_timestamp(timestamp_ms: object) -> bool:
    return type(timestamp_ms) is int and 0 <= timestamp_ms <= MAX_TIMESTAMP_MS


def _exact_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def pipeline_rejection(reason: Reason, message: str, details: str, pointer: str = "") -> Rejection:
    """A rejection the pipeline (not the domain) decides."""
    title = reason.value.replace("_", " ").lower()
    return Rejection(reason, message, (ErrorDetail(title, details[:500], pointer),))


class SessionIdSpaceExhaustedError(StreamAppError):
    """The int32 id space of a partition is used up; no id may be reused."""


class Outgoing(NamedTuple):
    """One record to send: the engine adds these to the task's transaction in order."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


#: Bytes a record needs beyond key, value and headers (record and batch framing).
RECORD_OVERHEAD: Final = 128


def record_size(out: Outgoing) -> int:
    """What ``out`` takes of a topic's record limit (``max.message.bytes``)."""
    size = len(out.value) + RECORD_OVERHEAD
    if out.key is not None:
        size += len(out.key)
    for name, value in out.headers:
        size += len(name) + len(value)
    return size


class SourceRecord(msgspec.Struct, frozen=True):
    """Where a record came from, as the domain and the rejection topic need it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    def origin_from_header(self) -> SourceRecord | None:
        """Where a re-keyed record first arrived (see ORIGIN_HEADER), with its
        original key; None unless there is exactly one well-formed header."""
        found = [raw for name, raw in self.headers if name == ORIGIN_HEADER]
        if len(found) != 1 or found[0] is None:
            return None
        try:
            doc = json.loads(found[0])
        except json.JSONDecodeError:
            return None
        if type(doc) is not dict or set(doc) != _ORIGIN_FIELDS:
            return None
        topic, key = doc["topic"], doc["key"]
        if not (
            type(topic) is str
            and 0 < len(topic) <= _MAX_TOPIC_NAME
            and _exact_int(doc["partition"], 0, 2**31 - 1)
            and _exact_int(doc["offset"], 0, _MAX_OFFSET)
            and valid_timestamp(doc["timestamp"])
            and (key is None or type(key) is str)
        ):
            return None
        try:
            original_key = None if key is None else base64.b64decode(key, validate=True)
        except (binascii.Error, ValueError):
            return None
        return SourceRecord(
            topic=topic,
            partition=doc["partition"],
            offset=doc["offset"],
            timestamp_ms=doc["timestamp"],
            key=original_key,
            value=self.value,
        )

    def origin_header(self) -> tuple[str, bytes]:
        doc = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp_ms,
            "key": None if self.key is None else base64.b64encode(self.key).decode("ascii"),
        }
        return (ORIGIN_HEADER, json.dumps(doc))


@dataclass
class PartitionSequenceAllocator:
    """Session ids from a per-partition counter kept in a changelogged table.

    ``id = (n - 1) * partitions + partition + 1`` for the n-th session created
    on ``partition``: unique across the deployment (partitions never share a
    residue), and the same after replay or recovery because a partition's
    commands are applied in offset order and the counter is restored with the
    table. Changing the partition count of the command topic breaks this.
    """

    counters: MutableMapping[bytes, bytes]
    partitions: int
    partition: int = 0

    def next_id(self) -> int:
        key = b"p%d" % self.partition
        current = self.counters.get(key)
        n = (int(current) if current is not None else 0) + 1
        session_id = (n - 1) * self.partitions + self.partition + 1
        if session_id > MAX_SESSION_ID:
            raise SessionIdSpaceExhaustedError(
                f"partition {self.partition} has created {n - 1} sessions, all that int32 "
                f"session ids allow with {self.partitions} partitions"
            )
        self.counters[key] = b"%d" % n
        return session_id

    def give_back(self) -> None:
        """Take back the id :meth:`next_id` just gave on this partition: the
        session it was for was not created after all."""
        key = b"p%d" % self.partition
        self.counters[key] = b"%d" % (int(self.counters[key]) - 1)


@dataclass
class Metrics:
    """Counters a user would watch (logged, and exported on ``/metrics``)."""

    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    rekeyed: int = 0
    emitted: dict[str, int] = field(default_factory=dict)
    #: Commands by (type, outcome): type update/return/reopen, or unknown when
    #: the record is not a readable command; outcome applied, duplicate,
    #: rejected or rekeyed.
    commands: dict[tuple[str, str], int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)
    #: What the record in hand counted in ``commands``, if anything: the task
    #: sets None before each record (see :meth:`rejected_after_all`).
    counted: tuple[str, str] | None = None
    #: Rejections' log lines, one per reason and worker every 10 s (reject).
    told: HeldBack = field(default_factory=HeldBack)

    def count(self, kind: str, outcome: str) -> None:
        self.commands[kind, outcome] = self.commands.get((kind, outcome), 0) + 1
        self.counted = (kind, outcome)
        if outcome == "applied":
            self.applied += 1

    def rejected_after_all(self, command: bool) -> None:
        """The record in hand is rejected after all: its processing failed, or
        its outputs were refused. What it counted becomes a rejection of its
        type (counted once its rejection is made); a ``command`` that counted
        nothing, the processor having failed, becomes one of type unknown."""
        counted = self.counted
        if counted is None:
            if command:
                self.count("unknown", "rejected")
            return
        kind, outcome = counted
        self.commands[counted] -= 1
        if outcome == "applied":
            self.applied -= 1
        elif outcome == "duplicate":
            self.duplicates -= 1
        elif outcome == "rekeyed":
            self.rekeyed -= 1
        self.count(kind, "rejected")


#: Seconds; from well below a record's usual cost to a stall.
LATENCY_BUCKETS: Final = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.05,
    0.25,
    1.0,
)
#: Seconds; for commits, from a quick one to a stalled broker.
COMMIT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LatencyHistogram:
    """A cumulative-at-export histogram of durations: per-record processing,
    commit rounds, commit phases."""

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


def downstream(topics: TopicNames, channel: str, integration_id: str, value: bytes) -> Outgoing:
    """The downstream record of one output, keyed by integrationId (counted by
    the task that sends it, see :func:`channels`)."""
    return Outgoing(getattr(topics, channel), integration_id.encode(), value)


def channels(topics: TopicNames) -> dict[str, str]:
    """The output channel of each downstream topic."""
    return {getattr(topics, channel): channel for channel in _CHANNELS}


def emit_head(channel: str, integration_id: str) -> bytes:
    """How a stage-2 envelope of an output begins; the output document and ``}``
    follow. The same JSON as ``{"kind": "emit", "channel": ..., "integrationId":
    ..., "output": ...}``, written so that stage 2 finds the output's bytes."""
    return b'{"kind":"emit","channel":%s,"integrationId":%s,"output":' % (
        json.dumps(channel),
        json.dumps(integration_id),
    )


def _bookkeeping(command: Command, before: Session | None, after: Session) -> bool:
    """Whether ``command``, applied to ``before`` and giving ``after``, changed
    no content of the session, only what is recorded of it (see
    :attr:`Limits.bookkeeping_bytes`)."""
    if isinstance(command, ReturnCommand | ReopenCommand):
        return True
    if before is None:
        return False
    if before.state is not SessionState.OPEN:
        # Only a cancel applies to a closed or partially returned session, and
        # changes its state alone: whatever else it re-sends is ignored (a
        # cancel that re-sent the whole session, as many integrations send
        # it, was refused at the limit while the same with state alone passed).
        return True
    patch = command.session
    if patch == SessionPatch(state=patch.state):
        return True
    # A close or cancel that re-sends the session as it is (as many
    # integrations send one) changes its state alone, as one with state alone.
    # Compared as written, not as Python values: 1, 1.0 and true are equal
    # to Python, and are stored and emitted apart.
    return patch.state in _ENDINGS and _content(before) == _content(after)


#: The states an update of an open session may end it in.
_ENDINGS: Final = frozenset({SessionState.CLOSED, SessionState.CANCELLED})


def _content(session: Session) -> bytes:
    """What a session holds apart from its state and what is recorded of it
    (timestamps, update count, remembered eventIds), as JSON."""
    return _CONTENT.encode(
        (
            session.profile_id,
            session.store_integration_id,
            session.coupon_codes,
            session.referral_code,
            session.loyalty_cards,
            session.cart_items,
            session.additional_costs,
            session.identifiers,
            session.attributes,
        )
    )


_CONTENT: Final = msgspec.json.Encoder()


def _content_bytes(session: Session) -> int:
    """The size of what ``session`` holds, without what is recorded of it
    (:func:`_content`, with no returned quantities either): never more than
    ``max_session_bytes`` unless a higher limit, lowered since, stored it."""
    items = session.cart_items
    if any(item.returned_quantity for item in items):
        items = tuple(msgspec.structs.replace(item, returned_quantity=0) for item in items)
    return len(_content(msgspec.structs.replace(session, cart_items=items)))


def session_key(application_id: int, integration_id: str) -> bytes:
    return b"%d\x1f%s" % (application_id, integration_id.encode())


def profile_key(application_id: int, profile_id: str) -> bytes:
    return b"%d\x1f%s" % (application_id, profile_id.encode())


@dataclass
class CommandProcessor:
    """Stage 1: applies commands to sessions. See the module docstring."""

    topics: TopicNames
    rekey_topic: str
    profile_topic: str
    sessions: MutableMapping[bytes, bytes]
    allocator: PartitionSequenceAllocator
    settings_for: Callable[[int], ApplicationSettings]
    default_application_id: int
    metrics: Metrics = field(default_factory=Metrics)
    limits: Limits = Limits()
    #: Recently stored or read sessions: stored bytes -> decoded (see _decode).
    _decoded: OrderedDict[bytes, tuple[bytes, Session]] = field(
        default_factory=OrderedDict, repr=False
    )
    #: The stored bytes of the sessions in _decoded.
    _decoded_bytes: int = field(default=0, repr=False)
    #: Re-keyed commands' log lines, one every 10 s (_tell_rekeyed).
    told: HeldBack = field(default_factory=HeldBack, repr=False)

    def process(self, record: SourceRecord) -> list[Outgoing]:
        out, kind, outcome = self._process(record)
        self.metrics.count(kind, outcome)
        return out

    def _process(self, record: SourceRecord) -> tuple[list[Outgoing], str, str]:
        """The records to send, the command's type and the outcome (for metrics)."""
        kind, rejected = "unknown", "rejected"
        origin = record
        if record.topic == self.rekey_topic:
            found = record.origin_from_header()
            if found is None:
                return [self._invalid_internal(record, "no valid origin header")], kind, rejected
            origin = found
        command = self._read(record.value, origin)
        if isinstance(command, Rejection):
            if record.topic == self.rekey_topic:
                # The worker re-keys only commands it decoded: this one is not its
                # own, and its origin may be forged, so not named as its source.
                # Named in the details: a command limit lowered, or decoding made
                # stricter by an upgrade, while copies were in flight refuses the
                # worker's own, and the operator looks for it there.
                problem = (
                    f"not a command the worker re-keyed ({command.reason.value}: "
                    f"{command.message}); its origin header names "
                    f"{origin.topic}[{origin.partition}]@{origin.offset}"
                )
                return [self._invalid_internal(record, problem)], kind, rejected
            return [self._reject(command, origin)], kind, rejected
        kind = _COMMAND_KINDS.get(type(command), "unknown")
        wanted_key = command.integration_id.encode()
        placed = record.key == wanted_key and record.partition == partition_for(
            wanted_key, self.allocator.partitions
        )
        if not placed:
            if record.topic == self.rekey_topic:
                problem = "not keyed and placed by integrationId"
                return [self._invalid_internal(record, problem)], kind, rejected
            # Applying it here would put the session on the wrong partition.
            value = record.value or b""
            rekeyed = Outgoing(self.rekey_topic, wanted_key, value, (record.origin_header(),))
            size = record_size(rekeyed)
            if size > self.limits.max_record_bytes:
                # Its origin header holds its key in base64: a key of
                # hundreds of KB makes the re-keyed record too large to write
                # (or, with a raised command limit, the value alone).
                key_bytes = 0 if record.key is None else len(record.key)
                rejection = pipeline_rejection(
                    Reason.LIMIT_EXCEEDED,
                    "The command is too large to re-key by its integrationId",
                    f"the re-keyed record would take {size} bytes "
                    f"(the record's key {key_bytes}, its value {len(value)}); "
                    f"at most {self.limits.max_record_bytes}",
                )
                return [self._reject(rejection, record)], kind, rejected
            self.metrics.rekeyed += 1
            self._tell_rekeyed(record, wanted_key)
            return [rekeyed], kind, "rekeyed"
        application_id = command.application_id or self.default_application_id
        key = session_key(application_id, command.integration_id)
        stored = self.sessions.get(key)
        session = None if stored is None else self._decode(key, stored)
        self.allocator.partition = record.partition
        context = CommandContext(
            timestamp_ms=origin.timestamp_ms,
            # Read by apply only for a command without an eventId.
            source_event_id=(
                "" if command.event_id else f"{origin.topic}-{origin.partition}-{origin.offset}"
            ),
            application_id=application_id,
            settings=self.settings_for(application_id),
            ids=self.allocator,
        )
        try:
            outcome = apply_command(session, command, context)
        except SessionIdSpaceExhaustedError as exc:
            # Only a creation takes an id: the partition's sessions go on.
            rejection = pipeline_rejection(
                Reason.LIMIT_EXCEEDED,
                "No more sessions can be created on this partition",
                str(exc),
                "/integrationId",
            )
            return [self._reject(rejection, origin)], kind, rejected
        if isinstance(outcome, Rejected):
            return [self._reject(outcome.rejection, origin)], kind, rejected
        if isinstance(outcome, Duplicate):
            self.metrics.duplicates += 1
            log.debug("%s[%d]@%d: duplicate eventId", origin.topic, origin.partition, origin.offset)
            return [], kind, "duplicate"
        assert isinstance(outcome, Applied)  # noqa: S101 - Outcome is a closed union
        new = outcome.session
        encoded = encode_session(new)
        if len(encoded) > self.limits.max_session_bytes:
            limit = self.limits.max_session_bytes
            if _bookkeeping(command, session, new):
                # Past the larger of the limit and the session's content: a
                # higher limit, lowered since, may have stored more content.
                held = limit if session is None else max(limit, _content_bytes(session))
                limit = max(
                    limit + self.limits.bookkeeping_bytes,
                    min(held + self.limits.bookkeeping_bytes, self.limits.max_stored_bytes),
                )
            if len(encoded) > limit:
                rejection = pipeline_rejection(
                    Reason.LIMIT_EXCEEDED,
                    "The command exceeds a limit",
                    f"the stored session would be {len(encoded)} bytes; at most {limit}",
                    "/session",
                )
                if session is None:  # the creation took a session id: give it back
                    self.allocator.give_back()
                return [self._reject(rejection, origin)], kind, rejected
        self.sessions[key] = encoded
        self._remember(key, encoded, new)
        return self._envelopes(session, new, outcome), kind, "applied"

    def _tell_rekeyed(self, record: SourceRecord, wanted_key: bytes) -> None:
        """Log a re-keyed command, at most once every 10 s (:class:`HeldBack`)
        with how many more there were. A producer that partitions by another
        hash (librdkafka's default) sends most commands to another partition:
        a line each was thousands a second, and tripled stage 1's cost."""
        held = self.told.due("rekeyed")
        if held is None:
            return
        since = held_back(held, "re-keyed on this partition")
        if record.key == wanted_key:
            log.info(
                "%s[%d]@%d: key %s is integrationId, but Kafka's default partitioner "
                "(murmur2) puts it on partition %d: the producer partitions by another "
                "hash (see the contract, section 1), re-keying%s",
                record.topic,
                record.partition,
                record.offset,
                excerpt(record.key),
                partition_for(wanted_key, self.allocator.partitions),
                since,
            )
        else:
            log.info(
                "%s[%d]@%d: key %s is not integrationId %s, re-keying%s",
                record.topic,
                record.partition,
                record.offset,
                excerpt(record.key),
                excerpt(wanted_key),
                since,
            )

    def _decode(self, key: bytes, stored: bytes) -> Session:
        """The stored session, decoded: from the cache when its bytes are the ones
        stored (equal bytes decode to an equal, immutable session)."""
        cached = self._decoded.get(key)
        if cached is not None and cached[0] == stored:
            return cached[1]
        session = decode_session(stored)
        self._remember(key, stored, session)
        return session

    def _remember(self, key: bytes, stored: bytes, session: Session) -> None:
        decoded = self._decoded
        size = len(stored)
        held = decoded.pop(key, None)  # put back last, as the most recent
        if held is not None:
            self._decoded_bytes -= len(held[0])
        if size > DECODED_BYTES:
            return  # past any session limit the topics allow: never kept
        while decoded and (
            len(decoded) >= DECODED_SESSIONS or self._decoded_bytes + size > DECODED_BYTES
        ):
            # The least recently stored or read. (A dict's first key, after many
            # deletions at its front, is found by a scan past their slots.)
            self._decoded_bytes -= len(decoded.popitem(last=False)[1][0])
        decoded[key] = (stored, session)
        self._decoded_bytes += size

    def _read(self, raw: bytes | None, origin: SourceRecord) -> Command | Rejection:
        """The command in a record, or why there is none (timestamp, size, decoding)."""
        if not valid_timestamp(origin.timestamp_ms):
            return pipeline_rejection(
                Reason.TIMESTAMP_OUT_OF_RANGE,
                "The record's timestamp is not a time a session can have",
                f"timestamp {origin.timestamp_ms} ms is outside 0..{MAX_TIMESTAMP_MS}",
            )
        if raw is None:
            return pipeline_rejection(
                Reason.MALFORMED_JSON, "The record has no value", "a tombstone is not a command"
            )
        if len(raw) > self.limits.max_command_bytes:
            return pipeline_rejection(
                Reason.LIMIT_EXCEEDED,
                "The command exceeds a limit",
                f"the command is {len(raw)} bytes; at most {self.limits.max_command_bytes}",
            )
        return decode_command(raw)

    def _envelopes(
        self, before: Session | None, after: Session, outcome: Applied
    ) -> list[Outgoing]:
        out: list[Outgoing] = []
        profiled = after.profile_id != ""
        route_key = profile_key(after.application_id, after.profile_id) if profiled else b""
        if profiled and (before is None or before.profile_id != after.profile_id):
            claim = {"kind": "claim", "integrationId": after.integration_id}
            out.append(Outgoing(self.profile_topic, route_key, json.dumps(claim)))
        for event in outcome.events:
            channel = EVENT_CHANNEL.get(event.name)
            if channel is None:
                continue
            if not profiled:
                # Anonymous sessions are always first sessions: no profile state
                # to consult, so they skip stage 2.
                doc = json.dumps(output_document(event, after))
                out.append(downstream(self.topics, channel, after.integration_id, doc))
                continue
            envelope = (
                emit_head(channel, after.integration_id)
                + json.dumps(output_document(event, after))
                + b"}"
            )
            out.append(Outgoing(self.profile_topic, route_key, envelope))
        return out

    def _reject(self, rejection: Rejection, origin: SourceRecord) -> Outgoing:
        return reject(self.topics, self.metrics, self.limits, rejection, origin)

    def _invalid_internal(self, record: SourceRecord, details: str) -> Outgoing:
        return invalid_internal(self.topics, self.metrics, self.limits, record, details)


def reject(
    topics: TopicNames, metrics: Metrics, limits: Limits, rejection: Rejection, origin: SourceRecord
) -> Outgoing:
    """The rejection record of ``origin`` (the record as it first arrived), counted."""
    metrics.rejected += 1
    reason = rejection.reason.value
    metrics.rejections[reason] = metrics.rejections.get(reason, 0) + 1
    # At most a line per reason every 10 s: a producer with a schema bug sent
    # nothing but rejections, a line each, and tripled stage 1's cost.
    held = metrics.told.due(reason)
    if held is not None:
        log.log(
            # A record the Kafka client cannot read at all is worth a warning.
            logging.WARNING if rejection.reason is Reason.UNREADABLE_RECORD else logging.INFO,
            "%s[%d]@%d: rejected %s: %s%s",
            origin.topic,
            origin.partition,
            origin.offset,
            reason,
            rejection.message,
            held_back(held, f"rejected {reason}"),
        )
    doc = rejection_document(
        rejection,
        origin.key,
        origin.value,
        topic=origin.topic,
        partition=origin.partition,
        offset=origin.offset,
        timestamp_ms=origin.timestamp_ms,
        max_original_bytes=limits.max_original_bytes,
    )
    key, value = fit_rejection(doc, origin.key, origin.value, limits.max_record_bytes)
    return Outgoing(topics.rejected, key, value)


def invalid_internal(
    topics: TopicNames, metrics: Metrics, limits: Limits, record: SourceRecord, details: str
) -> Outgoing:
    rejection = pipeline_rejection(
        Reason.INVALID_INTERNAL_RECORD,
        "The record on an internal topic was not written by the worker as it writes them",
        details,
    )
    return reject(topics, metrics, limits, rejection, record)


@dataclass
class ProfileProcessor:
    """Stage 2: decides ``firstSession`` and writes the downstream records.

    ``firstSession`` of a profiled session is true when that session was the
    first to claim its (applicationId, profileId) at this stage. A session's
    claim and its outputs share a key, so its claim always precedes its own
    outputs; claims of *different* sessions race only when they were created on
    different command partitions at nearly the same time, or one of them by a
    re-keyed command, whose copy comes back at a point that depends on timing
    (see README).

    Envelopes are checked for the exact shape stage 1 writes (kind, channel,
    integrationId, an output whose session belongs to the record's key); any
    other record is rejected as ``INVALID_INTERNAL_RECORD``. The output is
    not rebuilt: its bytes, as stage 1 wrote them, go downstream with the
    session's ``firstSession`` value set (see :func:`_first_session_value`).
    """

    topics: TopicNames
    first_sessions: MutableMapping[bytes, bytes]
    metrics: Metrics = field(default_factory=Metrics)
    limits: Limits = Limits()

    def process(self, record: SourceRecord) -> list[Outgoing]:
        envelope = _read_envelope(record)
        if isinstance(envelope, str):
            return [invalid_internal(self.topics, self.metrics, self.limits, record, envelope)]
        key = record.key or b""
        integration_id = envelope.integration_id
        if envelope.output is None:  # a claim
            if key not in self.first_sessions:
                self.first_sessions[key] = integration_id.encode()
            return []
        output, at, end = envelope.output, envelope.value_at, envelope.value_end
        first = self.first_sessions.get(key) == integration_id.encode()
        value = output[:at] + (b"true" if first else b"false") + output[end:]
        return [downstream(self.topics, envelope.channel, integration_id, value)]


class _Envelope(NamedTuple):
    integration_id: str
    channel: str = ""
    #: The output document as stage 1 wrote it; None for a claim.
    output: bytes | None = None
    #: Where in ``output`` the session's ``firstSession`` value starts and ends.
    value_at: int = 0
    value_end: int = 0


# The shape stage 1 writes, read without building the output: msgspec checks
# the JSON of the skipped parts too, and unknown fields are refused where
# a second "firstSession" could hide (see _first_session_value).
class _SessionView(msgspec.Struct, rename="camel", gc=False):
    profile_id: str
    first_session: bool


class _ReturnedLineView(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    position: int
    sku: str
    quantity: int
    value: int | float


class _ReturnView(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    lines: list[_ReturnedLineView]
    value: int | float


class _OutputView(msgspec.Struct, forbid_unknown_fields=True, rename="camel", gc=False):
    event: str
    event_id: str
    occurred_at: str
    application_id: int
    integration_id: str
    session: _SessionView
    returned: _ReturnView | None = msgspec.field(default=None, name="return")


class _EnvelopeView(msgspec.Struct, forbid_unknown_fields=True, rename="camel", gc=False):
    kind: str
    integration_id: str
    channel: str | msgspec.UnsetType = msgspec.UNSET
    output: _OutputView | msgspec.UnsetType = msgspec.UNSET


_ENVELOPE: Final = msgspec.json.Decoder(_EnvelopeView)
_FIRST_SESSION: Final = b'"firstSession":'


def _read_envelope(record: SourceRecord) -> _Envelope | str:
    """The envelope in ``record``, or why it is not one stage 1 could have written."""
    if record.key is None or b"\x1f" not in record.key or record.value is None:
        return "key or value missing"
    try:
        record.value.decode()  # msgspec does not check the UTF-8 of what it skips
        view = _ENVELOPE.decode(record.value)
    except (ValueError, RecursionError) as exc:  # DecodeError, ValidationError, UnicodeError
        return f"not an envelope: {str(exc)[:200]}"
    integration_id = view.integration_id
    if not integration_id:
        return "no integrationId"
    if view.kind == "claim":
        if view.channel is not msgspec.UNSET or view.output is not msgspec.UNSET:
            return "unexpected fields"
        return _Envelope(integration_id)
    if view.kind != "emit" or view.channel is msgspec.UNSET or view.output is msgspec.UNSET:
        return "unknown kind or missing fields"
    if view.channel not in _CHANNELS:
        return f"unknown channel {view.channel[:40]!r}"
    doc = view.output
    if (
        doc.integration_id != integration_id
        or profile_key(doc.application_id, doc.session.profile_id) != record.key
    ):
        return "the output does not belong to this record's key"
    head = emit_head(view.channel, integration_id)
    value = record.value
    if not (value.startswith(head) and value.endswith(b"}")):
        return "not written as stage 1 writes an envelope"
    output = value[len(head) : -1]
    found = _first_session_value(output)
    if found is None:
        return "no firstSession where stage 1 writes it"
    return _Envelope(integration_id, view.channel, output, *found)


def _first_session_value(output: bytes) -> tuple[int, int] | None:
    """Where the session's ``firstSession`` value lies in ``output``.

    Stage 1 writes outputs with orjson: no spaces, the session's keys in a
    fixed order. After its ``firstSession`` come only the session's numbers
    and timestamps and the ``return`` object, whose keys are fixed
    (``_ReturnView``), so the last ``"firstSession":`` in the bytes is the
    session's own. (Inside a JSON string every quote follows a backslash,
    so those bytes never occur in one.) The value must be a literal boolean
    ending a member, so replacing it keeps the document valid JSON.
    """
    at = output.rfind(_FIRST_SESSION)
    if at < 0:
        return None
    at += len(_FIRST_SESSION)
    for literal in (b"true", b"false"):
        end = at + len(literal)
        if output.startswith(literal, at) and output[end : end + 1] in (b",", b"}"):
            return at, end
    return None
