"""Tasks: the unit of ownership, state and transactions.

A task is one partition number of one stage, as in Kafka Streams:

* stage 1, ``commands``: ``<commands>[p]`` and ``<app>-sessions.rekeyed[p]``,
  with partition ``p`` of the ``sessions`` and ``session-ids`` stores;
* stage 2, ``profiles``: ``<app>-sessions.by-profile[p]``, with partition
  ``p`` of the ``first-sessions`` store.

The consumer group's assignor gives partition ``p`` of every input of a
stage to the same worker: one writer per store partition.
Each task has its own transactional producer with the stable
``transactional.id`` ``<app id>-<first input topic>-<p>``: whoever starts a
task fences every earlier owner of it (Kafka aborts the old owner's open
transaction and refuses its later writes), so a worker that lost a task
cannot commit outputs, changelog records or offsets for it.

Starting a task (:meth:`Task.start`), in this order: start the producer
(fencing), restore each store from its changelog (read_committed, from the
stored offset to the end), then the engine seeks the inputs to their
committed offsets. Only then are records processed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from stream_app.domain import Reason
from stream_app.errors import StoreError, StreamAppError
from stream_app.logs import HeldBack, held_back
from stream_app.pipeline.checkpoint import (
    ChangelogStore,
    Checkpoint,
    OffsetCommitter,
    recorded_consumption,
)
from stream_app.pipeline.kafka import client_options, start_fully, stop_fully
from stream_app.pipeline.processor import (
    LatencyHistogram,
    Limits,
    Metrics,
    Outgoing,
    SourceRecord,
    channels,
    pipeline_rejection,
    record_size,
    reject,
)
from stream_app.pipeline.store import PartitionStore, RocksDBResources, StoreOverlay
from stream_app.pipeline.topics import rekey_topic
from stream_app.pipeline.unreadable import RawRecord, empty_control_batch, read_past
from stream_app.settings import Settings

log = logging.getLogger(__name__)

#: How often a long restore logs its progress.
_RESTORE_LOG_EVERY_S: Final = 5.0
#: How long a store whose offset is past the changelog's end waits for the
#: end to move (transaction markers land shortly after a commit) before it
#: is treated as corrupt and restored from scratch.
_OFFSET_AHEAD_GRACE_S: Final = 10.0

Process = Callable[[SourceRecord], list[Outgoing]]
#: Told (task, records restored since the last call, records left) during a restore.
RestoreProgress = Callable[["TaskId", int, int], None]

#: What a restore fetches at most per changelog partition and request. With
#: 1M sessions (bench/memory_bench.py, six tasks restoring at once): 4 MiB
#: and 5,000 records per poll gave 102k records/s and a 243 MB peak; 8 MiB,
#: 113k/s and 348 MB; 8 MiB and 20,000 records, 118k/s and 356 MB.
_RESTORE_FETCH_BYTES: Final = 4 * 1024 * 1024

#: The bytes (outputs and store writes) that a worker's open transactions
#: hold together past which they take no more records: the rest of the fetched
#: batch waits for the next ones, which a commit round begins. A command of a
#: few bytes can write a session of 250 KB (a close of a large cart, an update
#: of one line), and each to the store too: 5,000 of them in one poll held over
#: 700 MiB until the commit, and the worker was OOM-killed again at each
#: restart. A bound per task still let twelve tasks hold twelve times it (and
#: as much again in the round in flight). A whole transaction of 5,000 bench
#: commands holds about 8 MiB.
TRANSACTION_BYTES: Final = 16 * 1024 * 1024


class RecordTooLargeError(StreamAppError):
    """An output would exceed what the topics accept: its record is rejected instead."""


@dataclass(frozen=True, slots=True)
class Stage:
    """One processor: its input topics, its stores and how to build it."""

    name: str
    inputs: tuple[str, ...]
    stores: tuple[str, ...]
    #: Builds the processor of partition p over the task's store overlays.
    build: Callable[[int, Mapping[str, StoreOverlay]], Process]
    #: Whether its inputs are commands (counted in ``Metrics.commands``).
    commands: bool = False


@dataclass(frozen=True, slots=True)
class TaskId:
    stage: str
    partition: int

    def __str__(self) -> str:
        return f"{self.stage}[{self.partition}]"


class Task:
    """One stage's partition: inputs, stores, producer and current transaction."""

    def __init__(
        self,
        stage: Stage,
        partition: int,
        *,
        settings: Settings,
        changelogs: Mapping[str, str],
        state_dir: Path,
        resources: RocksDBResources,
        commit_offsets: OffsetCommitter,
        limits: Limits,
        max_record_bytes: int,
        offset_metadata: str = "",
        latency: LatencyHistogram | None = None,
        phases: Mapping[str, LatencyHistogram] | None = None,
        metrics: Metrics | None = None,
        restore_progress: RestoreProgress | None = None,
    ) -> None:
        self.id = TaskId(stage.name, partition)
        self.stage = stage
        self.partition = partition
        self.settings = settings
        self.inputs = [TopicPartition(topic, partition) for topic in stage.inputs]
        self._changelogs = {
            name: TopicPartition(changelogs[name], partition) for name in stage.stores
        }
        self._state_dir = state_dir
        self._resources = resources
        self._commit_offsets = commit_offsets
        #: Said with each offset committed (checkpoint.offset_metadata).
        self._offset_metadata = offset_metadata
        self.limits = limits
        #: The largest record the written topics accept (see topics.py).
        self.max_record_bytes = max_record_bytes
        self._latency = latency or LatencyHistogram()
        #: How long each phase of this task's commits took (checkpoint.PHASES).
        self._phases = phases or {}
        self.metrics = metrics or Metrics()
        #: The output channel of each downstream topic (outputs are counted by it).
        self._channel_of = channels(settings.topics)
        self._restore_progress = restore_progress
        self.exactly_once = settings.processing_guarantee == "exactly_once"
        self.stores: dict[str, PartitionStore] = {}
        self.overlays: dict[str, StoreOverlay] = {}
        self.producer: AIOKafkaProducer | None = None
        self.process: Process | None = None
        self.checkpoint: Checkpoint | None = None
        #: Next offset to process per input; records below it are repeats. The
        #: engine moves it past transaction markers and aborted records too.
        self.positions: dict[TopicPartition, int] = {}
        #: The offset after the last record processed per input: where a read
        #: past the consumer begins (see Engine._read_past_the_client).
        self.handled: dict[TopicPartition, int] = {}
        #: The offsets of the inputs this task's last transactions committed.
        self.committed: dict[TopicPartition, int] = {}
        self.active = False
        self._opened_at = 0.0
        #: Bytes of the outputs in the open transaction (its store writes are
        #: counted by the overlays: StoreOverlay.written).
        self._output_bytes = 0
        #: Records below what was processed: one line per 10 s (_tell_behind).
        self._behind = HeldBack()

    @property
    def transactional_id(self) -> str:
        return f"{self.settings.app_id}-{self.stage.inputs[0]}-{self.partition}"

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> int:
        """Fence earlier owners, open and restore the stores. Returns records restored."""
        self.producer = AIOKafkaProducer(
            **client_options(self.settings),
            # None: an idempotent producer without transactions (at_least_once).
            transactional_id=self.transactional_id if self.exactly_once else None,
            enable_idempotence=True,
            acks="all",
            linger_ms=self.settings.producer_linger_ms,
            # A transaction's records go out as whole batches (checkpoint.py), each
            # within the smallest max.message.bytes of the topics written.
            max_batch_size=min(512 * 1024, self.max_record_bytes),
            max_request_size=self.max_record_bytes,
        )
        # For a transactional producer, start() is InitProducerId: the fence.
        await self.producer.start()
        for name in self.stage.stores:
            path = self._state_dir / name / str(self.partition)
            self.stores[name] = PartitionStore(path, self._resources)
        progress = (
            None
            if self._restore_progress is None
            else functools.partial(self._restore_progress, self.id)
        )
        restored = await restore(
            self.settings, self.stores, self._changelogs, str(self.id), progress
        )
        self.overlays = {name: StoreOverlay(store) for name, store in self.stores.items()}
        self.process = self.stage.build(self.partition, self.overlays)
        return restored

    def consumed_positions(self) -> dict[TopicPartition, int]:
        """Under at_least_once, the input offsets the restored state holds every
        record before (see ``Checkpoint.seal``); nothing under exactly_once,
        where the committed offsets say it."""
        return {} if self.exactly_once else recorded_consumption(self.stores)

    def activate(self, positions: Mapping[TopicPartition, int]) -> None:
        self.positions = dict(positions)
        self.handled = dict(positions)
        self.active = True

    async def close(self) -> None:
        """Stop without committing: the open transaction (if any) is aborted."""
        self.active = False
        if self.checkpoint is not None:
            await self.checkpoint.abort()
            self.checkpoint = None
        if self.producer is not None:
            producer, self.producer = self.producer, None
            try:
                await stop_fully(producer)
            except Exception as exc:  # closing: it is gone either way
                log.debug("%s: producer stop failed: %r", self.id, exc)
        failed: list[StoreError] = []
        for store in self.stores.values():
            try:
                store.close()
            except StoreError as exc:  # the others are closed all the same
                failed.append(exc)
        self.stores.clear()
        self.overlays.clear()
        if failed:
            raise failed[0]

    # -- processing ----------------------------------------------------------------------
    def _current(self) -> Checkpoint:
        if self.checkpoint is None:
            assert self.producer is not None  # noqa: S101 - started before processing
            self.checkpoint = Checkpoint(
                self.producer,
                {
                    name: ChangelogStore(overlay, self._changelogs[name])
                    for name, overlay in self.overlays.items()
                },
                group_id=self.settings.app_id,
                exactly_once=self.exactly_once,
                commit_offsets=None if self.exactly_once else self._commit_offsets,
                offset_metadata=self._offset_metadata,
                phases=self._phases,
            )
            self._opened_at = time.monotonic()
            self._output_bytes = 0
        return self.checkpoint

    async def handle(self, record: Any) -> None:
        """Process one consumed record inside the current transaction."""
        await self.handle_many((record,))

    async def handle_many(self, records: Sequence[Any], limit: int = TRANSACTION_BYTES) -> int:
        """Process consumed records of this task, in order, inside the current
        transaction (the engine's hot loop: one call per fetched batch). Returns
        how many were taken: all, unless the transaction's outputs and store
        writes (:meth:`held_bytes`) reached ``limit`` first, which the engine
        sets to what the worker's other open transactions leave of
        :data:`TRANSACTION_BYTES`. The first record is always taken.

        A record the processor fails on becomes an INTERNAL_ERROR rejection of
        that record alone: what it wrote is taken back, the worker goes on.
        """
        process = self.process
        assert process is not None  # noqa: S101 - started before processing
        checkpoint: Checkpoint | None = None
        overlays = tuple(self.overlays.values())
        positions = self.positions
        handled = self.handled
        observe = self._latency.observe
        max_bytes = self.max_record_bytes
        metrics = self.metrics
        emitted = metrics.emitted
        channel_of = self._channel_of
        clock = time.perf_counter
        output_bytes = 0  # the open transaction's, from when it is opened below
        tp: TopicPartition | None = None
        for taken, record in enumerate(records, 1):
            if tp is None or record.topic != tp.topic or record.partition != tp.partition:
                tp = TopicPartition(record.topic, record.partition)
            offset = record.offset
            if offset < positions.get(tp, 0):
                self._tell_behind(tp, offset, positions[tp])
                continue  # delivered again after a seek: already processed
            if checkpoint is None:
                checkpoint = self._current()  # a new transaction counts from 0
                output_bytes = self._output_bytes
            source = SourceRecord(
                record.topic,
                record.partition,
                offset,
                record.timestamp,
                record.key,
                record.value,
                tuple(record.headers) if record.headers else (),
            )
            for overlay in overlays:
                overlay.begin_record()
            failure: Exception | None = None
            metrics.counted = None
            began = clock()
            try:
                outgoing = process(source)
            except StoreError:
                # Not the record's fault (a disk that cannot be read, say): the
                # engine restarts the task, which reads the record again.
                raise
            except Exception as exc:  # a bug must not lose the record or stop the worker
                self._tell_failure(source, exc)
                failure = exc
            else:
                for out in outgoing:
                    size = record_size(out)
                    output_bytes += size
                    if size > max_bytes:
                        failure = RecordTooLargeError(
                            f"an output to {out.topic} would be {size} bytes; "
                            f"the topics take at most {max_bytes}"
                        )
                        break
            if failure is not None:
                for overlay in overlays:
                    overlay.undo_record()
                metrics.rejected_after_all(self.stage.commands)
                outgoing = [internal_error(self.settings, self.limits, source, failure, metrics)]
                # Counted too: it carries the command, up to a quarter of a record.
                output_bytes += record_size(outgoing[0])
            else:
                for out in outgoing:
                    if (channel := channel_of.get(out.topic)) is not None:
                        emitted[channel] = emitted.get(channel, 0) + 1
            observe(clock() - began)
            for out in outgoing:
                if not checkpoint.add(out):  # once per topic and transaction
                    await checkpoint.send(out)
            checkpoint.consumed(tp, offset)
            positions[tp] = handled[tp] = offset + 1
            held = output_bytes  # held_bytes, inline: the count is local until the end
            for overlay in overlays:
                held += overlay.written
            if held >= limit:
                self._output_bytes = output_bytes
                return taken
        if checkpoint is not None:
            self._output_bytes = output_bytes
        return len(records)

    def _tell_failure(self, source: SourceRecord, exc: Exception) -> None:
        """Log a record the processor failed on, with its traceback: the first
        of each exception type and place in 10 s, then with how many more (a
        bug that every command of a type meets logged a traceback per record). A
        re-keyed command's line names where it first arrived too, as its
        rejection does."""
        # By type and where it was raised: two bugs of one type are two kinds.
        frames = traceback.extract_tb(exc.__traceback__)
        raised_at = (frames[-1].filename, frames[-1].lineno) if frames else None
        held = self.metrics.told.due(("failed", type(exc).__name__, raised_at))
        if held is None:
            return
        origin = source.origin_from_header() if source.topic == rekey_topic(self.settings) else None
        log.error(
            "%s[%d]@%d%s: processing failed%s",
            source.topic,
            source.partition,
            source.offset,
            ""
            if origin is None
            else f" (first arrived at {origin.topic}[{origin.partition}]@{origin.offset})",
            held_back(held, f"records failed with {type(exc).__name__}"),
            exc_info=exc,
        )

    def _tell_behind(self, tp: TopicPartition, offset: int, position: int) -> None:
        """Say that a record below what was processed is skipped, at most once
        every 10 s. The Kafka client hands none over after a seek; one record
        that claimed an offset past its batch (a batch built by hand, the last
        of a poll: the engine's check of each poll cannot see past it) made
        the records up to that offset look processed."""
        held = self._behind.due(tp)
        if held is not None:
            log.warning(
                "%s[%d]@%d: skipped, below offset %d already processed (a record batch "
                "whose offsets disagree with its header?)%s",
                tp.topic,
                tp.partition,
                offset,
                position,
                held_back(held, "such records"),
            )

    async def handle_raw(self, raw: RawRecord) -> None:
        """A record read past the Kafka client (see ``unreadable.py``): processed
        like any other when its headers can be read, otherwise rejected as
        UNREADABLE_RECORD by its position, with its key and value."""
        tp = TopicPartition(raw.topic, raw.partition)
        if raw.offset < self.positions.get(tp, 0):
            return
        if raw.readable():
            await self.handle(RecordView(raw))
            return
        source = SourceRecord(
            raw.topic, raw.partition, raw.offset, raw.timestamp_ms, raw.key, raw.value
        )
        rejection = pipeline_rejection(
            Reason.UNREADABLE_RECORD,
            "The Kafka client cannot read this record",
            raw.problem or "a header name is not UTF-8",
        )
        if self.stage.commands:
            self.metrics.count("unknown", "rejected")
        checkpoint = self._current()
        out = reject(self.settings.topics, self.metrics, self.limits, rejection, source)
        await checkpoint.send(out)
        self._output_bytes += record_size(out)
        # A batch rejected whole is consumed to its end: from inside it, the
        # client would hand over its records at the offsets they claim.
        last = raw.offset if raw.last_offset is None else max(raw.offset, raw.last_offset)
        checkpoint.consumed(tp, last)
        self.positions[tp] = self.handled[tp] = last + 1

    def commit_due(self, now: float) -> bool:
        c = self.checkpoint
        if c is None or c.closed:
            return False
        if c.records >= self.settings.batch_size:
            return True
        return now - self._opened_at >= self.settings.checkpoint_interval_s

    def held_bytes(self) -> int:
        """What the open transaction holds: its outputs and its store writes
        (the engine bounds their sum over its tasks by :data:`TRANSACTION_BYTES`)."""
        if self.checkpoint is None:
            return 0
        return self._output_bytes + sum(overlay.written for overlay in self.overlays.values())

    def commit_due_in(self, now: float) -> float | None:
        """Seconds until the open transaction falls due by time (0 once it
        has); None without one."""
        c = self.checkpoint
        if c is None or c.closed:
            return None
        return max(0.0, self._opened_at + self.settings.checkpoint_interval_s - now)

    async def commit(self) -> None:
        """Commit the current transaction (see :class:`Checkpoint`); raises its errors."""
        await self.begin_commit()

    def begin_commit(self) -> Awaitable[None]:
        """Seal the current transaction now and return its commit to await: the
        records handled from here on go to the next one. The caller awaits that
        commit before it begins the next (see :meth:`Checkpoint.seal`)."""
        checkpoint, self.checkpoint = self.checkpoint, None
        if checkpoint is None or checkpoint.closed:
            return _nothing()
        checkpoint.seal()
        return self._committed(checkpoint)

    async def _committed(self, checkpoint: Checkpoint) -> None:
        await checkpoint.commit()
        self.committed.update(checkpoint.offsets)


async def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class RecordView:
    """A readable :class:`RawRecord` in the shape of a consumer record."""

    raw: RawRecord

    @property
    def topic(self) -> str:
        return self.raw.topic

    @property
    def partition(self) -> int:
        return self.raw.partition

    @property
    def offset(self) -> int:
        return self.raw.offset

    @property
    def timestamp(self) -> int:
        return self.raw.timestamp_ms

    @property
    def key(self) -> bytes | None:
        return self.raw.key

    @property
    def value(self) -> bytes | None:
        return self.raw.value

    @property
    def headers(self) -> tuple[tuple[str, bytes | None], ...]:
        return self.raw.decoded_headers()


def internal_error(
    settings: Settings,
    limits: Limits,
    record: SourceRecord,
    exc: BaseException,
    metrics: Metrics | None = None,
) -> Outgoing:
    """The rejection of a record the worker could not process (a bug, or a
    limit). A re-keyed command's names where it first arrived, with its key,
    as the processor's own rejections of it do."""
    if record.topic == rekey_topic(settings):
        record = record.origin_from_header() or record
    if isinstance(exc, RecordTooLargeError):
        rejection = pipeline_rejection(
            Reason.LIMIT_EXCEEDED, "The command's outputs exceed a limit", str(exc), "/session"
        )
    else:
        rejection = pipeline_rejection(
            Reason.INTERNAL_ERROR,
            f"the processor failed on this record: {type(exc).__name__}",
            str(exc),
        )
    return reject(settings.topics, metrics or Metrics(), limits, rejection, record)


async def restore(
    settings: Settings,
    stores: Mapping[str, PartitionStore],
    changelogs: Mapping[str, TopicPartition],
    label: str,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Bring each store up to the end of its changelog partition (read_committed).

    Reads from the offset the store recorded (nothing is discarded). When a
    store's offset lies past its changelog's end (the topic was recreated),
    every store of the task is wiped and read from the beginning: the task's
    stores hold one state together (the sessions and their id counter). Past
    only the last stable offset (a transaction still open), it raises a
    StreamAppError, and the engine starts the task again later.
    """
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        # Bounded so that restoring every task of a worker at once stays within
        # the memory of the worker's normal run (docs/performance-history.md).
        max_partition_fetch_bytes=_RESTORE_FETCH_BYTES,
        fetch_max_bytes=4 * _RESTORE_FETCH_BYTES,
    )
    total = 0
    try:
        # Inside the try: a start that fails or is cancelled (the task dropped,
        # the worker stopping) must not leave the consumer's connections open.
        await start_fully(consumer)
        tps = [changelogs[name] for name in stores]
        consumer.assign(tps)
        end = await consumer.end_offsets(tps)
        beginning = await consumer.beginning_offsets(tps)
        by_tp = {changelogs[name]: store for name, store in stores.items()}
        starts = {tp: store.changelog_offset for tp, store in by_tp.items()}
        for tp, store in by_tp.items():
            start = starts[tp]
            if start is not None and start > end[tp]:
                end[tp] = await _wait_for_end(consumer, tp, start)
                if start > end[tp] and await _high_watermark(settings, tp) >= start:
                    # read_committed ends at the first record of a transaction
                    # still open (a killed exactly_once worker's, left to time
                    # out when its successor runs at_least_once, which fences
                    # nothing): the records are there. Wiping threw away state
                    # ahead of the inputs' offsets, session-id counters included.
                    raise StreamAppError(
                        f"store {store.path} is at changelog offset {start}, past the last "
                        f"stable offset {end[tp]} of {tp.topic}[{tp.partition}]: a "
                        "transaction is still open on it; waiting for it to end"
                    )
                if start > end[tp]:
                    log.warning(
                        "%s: store %s is at changelog offset %d, past the end %d of %s[%d] "
                        "(the topic was recreated): restoring every store of the task "
                        "from the beginning",
                        label,
                        store.path,
                        start,
                        end[tp],
                        tp.topic,
                        tp.partition,
                    )
                    # All of them, as Kafka Streams wipes a corrupted task's
                    # state: the task's stores hold one state together. This
                    # one last: a wipe cut short (a kill) is found again.
                    for other in by_tp.values():
                        if other is not store:
                            other.wipe()
                    store.wipe()
                    starts = dict.fromkeys(by_tp)
                    break
        for tp, start in starts.items():
            begins = beginning[tp]
            if (start or 0) < begins:
                # Deleted (DeleteRecords, or a retention set after the worker
                # started: topics.py refuses one at the start): what the gap
                # held of its keys is gone from Kafka too. Said, not hidden.
                log.warning(
                    "%s: store %s needs %s[%d] from offset %d, but it begins at %d: the "
                    "records between were deleted, and the sessions they changed last "
                    "are %s",
                    label,
                    by_tp[tp].path,
                    tp.topic,
                    tp.partition,
                    start or 0,
                    begins,
                    "missing" if start is None else "as the store held them before",
                )
            consumer.seek(tp, max(start or 0, begins))
        #: Per changelog, the offset of the first record not yet in its store.
        #: Not the consumer's position: a getmany that fails on one partition
        #: has moved the others' past records it then did not return.
        written = {tp: max(starts[tp] or 0, beginning[tp]) for tp in tps}
        started = time.monotonic()
        last_log = started
        remaining = set()
        for tp in tps:
            position = await consumer.position(tp)
            if position < end[tp]:
                remaining.add(tp)
            elif (recorded := by_tp[tp].changelog_offset) is not None and position > recorded:
                # Every record past the store's offset was deleted: else the
                # store kept its offset, and each start warned of it again.
                written[tp] = position
                by_tp[tp].write({}, position)
        while remaining:
            fetched = 0
            try:
                batches = await consumer.getmany(*remaining, timeout_ms=500, max_records=5_000)
            except KafkaError as exc:
                if not empty_control_batch(exc):
                    raise
                passed = await _restore_past_the_client(
                    settings, consumer, remaining, by_tp, written, end, label
                )
                if passed is None:
                    raise  # not where these changelogs are read
                fetched += passed
                batches = {}
            for tp, records in batches.items():
                if records:
                    changes = {r.key: r.value for r in records if r.key is not None}
                    written[tp] = records[-1].offset + 1
                    by_tp[tp].write(changes, written[tp])
                    fetched += len(records)
            total += fetched
            # Offsets, not records: a compacted changelog has fewer records
            # than offsets, so counting down the records fetched from the
            # offsets at the start stayed near that count until the end.
            left = 0
            for tp in list(remaining):
                position = await consumer.position(tp)
                if position >= end[tp]:
                    written[tp] = position
                    by_tp[tp].write({}, position)
                    remaining.discard(tp)
                else:
                    left += end[tp] - position
            if progress is not None:
                progress(fetched, left)
            now = time.monotonic()
            if remaining and now - last_log >= _RESTORE_LOG_EVERY_S:
                last_log = now
                log.info(
                    "%s: restoring, %d records so far (%.0f/s)",
                    label,
                    total,
                    total / (now - started),
                )
        elapsed = time.monotonic() - started
        if total:
            log.info(
                "%s: restored %d records in %.2f s (%.0f/s)",
                label,
                total,
                elapsed,
                total / max(elapsed, 1e-6),
            )
    finally:
        await stop_fully(consumer)
    return total


async def _restore_past_the_client(
    settings: Settings,
    consumer: AIOKafkaConsumer,
    remaining: set[TopicPartition],
    by_tp: Mapping[TopicPartition, PartitionStore],
    written: dict[TopicPartition, int],
    end: Mapping[TopicPartition, int],
    label: str,
) -> int | None:
    """Records restored by reading each changelog left raw from the first
    record not in its store (up to its end, or about ``RAW_RECORDS``
    records), the consumer sought past them. aiokafka fails, read_committed,
    on a control batch of no records, which Kafka's log cleaner leaves in a
    compacted transactional topic (see
    :func:`~stream_app.pipeline.unreadable.empty_control_batch`), and says
    not of which partition; the task's start failed at every attempt. From
    ``written``, not the consumer's positions: the failed getmany moved the
    partitions it drained before the failing one past records it then threw
    away. None when no changelog moves past the consumer's position: then
    the batch is not where they are read."""
    options = client_options(settings)
    restored = 0
    moved = False
    for tp in sorted(remaining):
        polled = await consumer.position(tp)
        position = written[tp]
        async with contextlib.aclosing(read_past(options, tp, position, end=end[tp])) as reading:
            async for raws, after in reading:
                by_tp[tp].write({r.key: r.value for r in raws if r.key is not None}, after)
                restored += len(raws)
                written[tp] = position = after
        moved = moved or position > polled
        consumer.seek(tp, position)
    if moved:
        log.info(
            "%s: read %d changelog records past aiokafka's consumer, which stops on the "
            "control batch of no records that Kafka's log cleaner leaves (KAFKA-7467)",
            label,
            restored,
        )
    return restored if moved else None


async def _high_watermark(settings: Settings, tp: TopicPartition) -> int:
    """The end of ``tp`` including records of transactions still open, where a
    read_committed end stops at the first of them."""
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_uncommitted",
    )
    try:
        await start_fully(consumer)
        end: int = (await consumer.end_offsets([tp]))[tp]
        return end
    finally:
        await stop_fully(consumer)


async def _wait_for_end(consumer: AIOKafkaConsumer, tp: TopicPartition, start: int) -> int:
    """The changelog's end, waiting up to a grace period for it to reach ``start``."""
    deadline = time.monotonic() + _OFFSET_AHEAD_GRACE_S
    while True:
        end: int = (await consumer.end_offsets([tp]))[tp]
        if end >= start or time.monotonic() > deadline:
            return end
        await asyncio.sleep(0.2)
