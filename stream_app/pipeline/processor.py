"""What the workers do with one record, apart from Faust.

Two stages, both synchronous over plain mappings (the Faust tables in
production, dicts in unit tests), each returning the records to send:

* :class:`CommandProcessor` (stage 1, keyed by ``integrationId``): decodes a
  command, re-keys it if it arrived on the wrong key, applies it to the stored
  session with the domain core, stores the result, and returns rejections,
  the downstream records of anonymous sessions, and envelopes for stage 2.
* :class:`ProfileProcessor` (stage 2, keyed by ``(applicationId, profileId)``):
  decides ``firstSession`` for profiled sessions and writes their downstream
  records. (Anonymous sessions are always first sessions and skip it; a
  session that gains a profile later therefore moves from one path to the
  other, and only its outputs across that switch may reorder.)

Contract on crash and rebalance: the tables and the sends of one record are in
the same Kafka transaction under ``exactly_once`` (Faust's per-partition
transactional producers), so a record is either fully applied, stored and
emitted, or not at all; under ``at_least_once`` a crash can re-apply the
commands after the last committed offset, and the ``eventId`` memory of each
session then suppresses the repeats that carry an ``eventId``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from stream_app import json
from stream_app.domain import (
    ApplicationSettings,
    Applied,
    CommandContext,
    Duplicate,
    EventName,
    Rejected,
    Rejection,
    Session,
    decode_command,
    decode_session,
    encode_session,
    output_document,
    rejection_document,
)
from stream_app.domain import apply as apply_command
from stream_app.errors import StreamAppError
from stream_app.settings import TopicNames

log = logging.getLogger(__name__)

#: Kafka header carrying where a re-keyed record first arrived.
ORIGIN_HEADER: Final = "stream-app-origin"

#: Which downstream topic (by TopicNames field) each emitted event goes to.
#: Created and updated sessions are state, not analytics events: not emitted.
EVENT_CHANNEL: Final[dict[EventName, str]] = {
    EventName.CLOSED: "closed",
    EventName.PARTIALLY_RETURNED: "returned",
    EventName.CANCELLED: "cancelled",
    EventName.REVOKED: "cancelled",
    EventName.REOPENED: "reopened",
}

_MAX_SESSION_ID: Final = 2**31 - 1


class SessionIdSpaceExhaustedError(StreamAppError):
    """The int32 id space of a partition is used up; no id may be reused."""


class Outgoing(NamedTuple):
    """One record to send: the Faust layer sends these in order."""

    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """Where a record came from, as the domain and the rejection topic need it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()

    def origin(self) -> SourceRecord:
        """The record as it first arrived, if it was re-keyed (see ORIGIN_HEADER)."""
        for name, raw in self.headers:
            if name == ORIGIN_HEADER:
                doc = json.loads(raw)
                return SourceRecord(
                    topic=str(doc["topic"]),
                    partition=int(doc["partition"]),
                    offset=int(doc["offset"]),
                    timestamp_ms=int(doc["timestamp"]),
                    key=self.key,
                    value=self.value,
                )
        return self

    def origin_header(self) -> tuple[str, bytes]:
        doc = {
            "topic": self.topic,
            "partition": self.partition,
            "offset": self.offset,
            "timestamp": self.timestamp_ms,
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
        if session_id > _MAX_SESSION_ID:
            raise SessionIdSpaceExhaustedError(f"partition {self.partition} has used its id space")
        self.counters[key] = b"%d" % n
        return session_id


@dataclass
class Metrics:
    """Counters a user would watch (exposed in logs and to the demo)."""

    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    rekeyed: int = 0
    emitted: dict[str, int] = field(default_factory=dict)


def downstream(
    topics: TopicNames, metrics: Metrics, channel: str, integration_id: str, value: bytes
) -> Outgoing:
    """The downstream record of one output, keyed by integrationId, counted."""
    metrics.emitted[channel] = metrics.emitted.get(channel, 0) + 1
    return Outgoing(getattr(topics, channel), integration_id.encode(), value)


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

    def process(self, record: SourceRecord) -> list[Outgoing]:
        raw = record.value if record.value is not None else b""
        origin = record.origin()
        command = decode_command(raw)
        if isinstance(command, Rejection):
            return [self._reject(command, raw, origin)]
        wanted_key = command.integration_id.encode()
        if record.key != wanted_key and record.topic != self.rekey_topic:
            # Applying it here would put the session on the wrong partition.
            self.metrics.rekeyed += 1
            log.info(
                "%s[%d]@%d: key %r is not integrationId %r, re-keying",
                record.topic,
                record.partition,
                record.offset,
                record.key,
                wanted_key,
            )
            return [Outgoing(self.rekey_topic, wanted_key, raw, (record.origin_header(),))]
        application_id = command.application_id or self.default_application_id
        key = session_key(application_id, command.integration_id)
        stored = self.sessions.get(key)
        session = decode_session(stored) if stored is not None else None
        self.allocator.partition = record.partition
        context = CommandContext(
            timestamp_ms=origin.timestamp_ms,
            source_event_id=f"{origin.topic}-{origin.partition}-{origin.offset}",
            application_id=application_id,
            settings=self.settings_for(application_id),
            ids=self.allocator,
        )
        outcome = apply_command(session, command, context)
        if isinstance(outcome, Rejected):
            return [self._reject(outcome.rejection, raw, origin)]
        if isinstance(outcome, Duplicate):
            self.metrics.duplicates += 1
            log.debug("%s[%d]@%d: duplicate eventId", origin.topic, origin.partition, origin.offset)
            return []
        assert isinstance(outcome, Applied)  # noqa: S101 - Outcome is a closed union
        self.metrics.applied += 1
        new = outcome.session
        self.sessions[key] = encode_session(new)
        return self._envelopes(session, new, outcome)

    def _envelopes(
        self, before: Session | None, after: Session, outcome: Applied
    ) -> list[Outgoing]:
        out: list[Outgoing] = []
        profiled = after.profile_id != ""
        route_key = profile_key(after.application_id, after.profile_id)
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
                out.append(
                    downstream(self.topics, self.metrics, channel, after.integration_id, doc)
                )
                continue
            envelope = {
                "kind": "emit",
                "channel": channel,
                "integrationId": after.integration_id,
                "output": output_document(event, after),
            }
            out.append(Outgoing(self.profile_topic, route_key, json.dumps(envelope)))
        return out

    def _reject(self, rejection: Rejection, raw: bytes, origin: SourceRecord) -> Outgoing:
        self.metrics.rejected += 1
        log.info(
            "%s[%d]@%d: rejected %s: %s",
            origin.topic,
            origin.partition,
            origin.offset,
            rejection.reason,
            rejection.message,
        )
        doc = rejection_document(
            rejection,
            raw,
            topic=origin.topic,
            partition=origin.partition,
            offset=origin.offset,
            timestamp_ms=origin.timestamp_ms,
        )
        return Outgoing(self.topics.rejected, origin.key or b"", json.dumps(doc))


@dataclass
class ProfileProcessor:
    """Stage 2: decides ``firstSession`` and writes the downstream records.

    ``firstSession`` of a profiled session is true when that session was the
    first to claim its (applicationId, profileId) at this stage. A session's
    claim and its outputs share a key, so its claim always precedes its own
    outputs; claims of *different* sessions race only when they were created on
    different command partitions at nearly the same time (see README).
    """

    topics: TopicNames
    first_sessions: MutableMapping[bytes, bytes]
    metrics: Metrics = field(default_factory=Metrics)

    def process(self, record: SourceRecord) -> list[Outgoing]:
        key = record.key or b""
        envelope: dict[str, Any] = json.loads(record.value or b"{}")
        integration_id = str(envelope["integrationId"]).encode()
        if envelope["kind"] == "claim":
            if key not in self.first_sessions:
                self.first_sessions[key] = integration_id
            return []
        output: dict[str, Any] = envelope["output"]
        output["session"]["firstSession"] = self.first_sessions.get(key) == integration_id
        return [
            downstream(
                self.topics,
                self.metrics,
                envelope["channel"],
                str(envelope["integrationId"]),
                json.dumps(output),
            )
        ]
