"""The thin Faust layer: topics, tables, the two agents and the commit discipline.

Exactly-once, and why this module commits by itself
----------------------------------------------------
Faust-streaming's transactional mode keeps one transactional producer per
assigned source partition (``<app id>-<group>-<partition>``) and commits
every producer that has acked offsets. Left alone it is not exactly-once for
this topology: it picks the producer by the *destination* partition (and
fails outright for topics it does not consume, such as the outputs), its
commit timer can commit a transaction that holds sends of events whose
offsets are not yet acked, and it does not drain its changelog buffer before
committing. So here:

* every output, rejection and re-keyed record is sent with the transactional
  id of the *source* partition of the event that caused it, the same
  producer that carries that partition's changelog writes and offsets;
* batches are processed under one lock, acked at the end of the batch, and
  only :meth:`SessionPipeline.commit` (under the same lock, after draining
  the changelog buffer) commits; Faust's own periodic commit is switched
  off. A transaction therefore always holds whole batches: their state
  changes, their outputs and their offsets, or nothing.

Under ``at_least_once`` the same code sends with the plain producer.

Local state after a crash
-------------------------
RocksDB is written as records are processed, before their transaction
commits, so after a crash the local store can hold state of aborted
transactions (a session "closed" by a batch whose close was never
committed). A worker therefore marks a clean stop (all batches committed,
stores closed) in ``<data_dir>/clean-shutdown``; a worker that finds its
table directory without that mark discards it and rebuilds the tables from
their (read_committed) changelogs, as Kafka Streams does under exactly-once.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import faust
from faust.streams import _current_event

from stream_app import json
from stream_app.domain import ErrorDetail, Reason, Rejection, rejection_document
from stream_app.pipeline.application_settings import (
    ApplicationSettingsRegistry,
    follow_settings_topic,
)
from stream_app.pipeline.kafka import committed_offsets_between, faust_broker, faust_credentials
from stream_app.pipeline.processor import (
    CommandProcessor,
    Metrics,
    Outgoing,
    PartitionSequenceAllocator,
    ProfileProcessor,
    SessionIdSpaceExhaustedError,
    SourceRecord,
)
from stream_app.pipeline.topics import ensure_topics, profile_topic, rekey_topic
from stream_app.settings import Settings

log = logging.getLogger(__name__)

CLEAN_SHUTDOWN_MARK = "clean-shutdown"
_NEVER = 10.0**9  # seconds / events: Faust's own commit triggers are switched off
_RAW: dict[str, Any] = {
    "key_type": bytes,
    "value_type": bytes,
    "key_serializer": "raw",
    "value_serializer": "raw",
}


def _record(event: Any) -> SourceRecord:
    message = event.message
    headers = message.headers or ()
    if isinstance(headers, dict):
        headers = tuple(headers.items())
    return SourceRecord(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=round(message.timestamp * 1000) if message.timestamp else 0,
        key=message.key,
        value=message.value,
        headers=tuple(headers),
    )


class SessionPipeline:
    """Builds the Faust app for one worker from :class:`Settings`."""

    def __init__(
        self,
        settings: Settings,
        registry: ApplicationSettingsRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or ApplicationSettingsRegistry.load(
            settings.application_settings_file
        )
        self.metrics = Metrics()
        self.settings_ready = asyncio.Event()
        self._lock = asyncio.Lock()
        self._dirty = False
        self._inside_commit = False
        self._next_offset: dict[Any, int] = {}
        self._resync: dict[Any, deque[int]] = {}
        self._transactions_ended = False
        self._last_commit = time.monotonic()
        self.app = self._create_app()
        self._declare()

    # -- construction -----------------------------------------------------------------------
    def _create_app(self) -> faust.App:
        s = self.settings
        eos = s.processing_guarantee == "exactly_once"
        return faust.App(
            s.app_id,
            broker=faust_broker(s),
            broker_credentials=faust_credentials(s),
            store="rocksdb://",
            datadir=str(s.data_dir),
            processing_guarantee=s.processing_guarantee,
            topic_partitions=s.partitions,
            topic_replication_factor=s.replication_factor,
            consumer_auto_offset_reset="earliest",
            broker_commit_interval=_NEVER if eos else 1.0,
            broker_commit_every=int(_NEVER) if eos else 10_000,
            producer_linger=0.005,
            producer_max_batch_size=256 * 1024,
            stream_buffer_maxsize=max(4096, s.batch_size * 2),
            table_standby_replicas=0,
            broker_session_timeout=s.session_timeout_s,
            web_enabled=s.web_enabled,
            web_port=s.web_port,
            web_host="127.0.0.1",
        )

    def _declare(self) -> None:
        s = self.settings
        app = self.app
        rocks = {
            "block_cache_size": s.rocksdb.block_cache_mb * 1024 * 1024,
            "write_buffer_size": s.rocksdb.write_buffer_mb * 1024 * 1024,
            "max_write_buffer_number": s.rocksdb.max_write_buffers,
            "max_open_files": s.rocksdb.max_open_files,
        }

        def table(name: str, help_: str) -> Any:
            return app.Table(
                name,
                key_type=bytes,
                value_type=bytes,
                partitions=s.partitions,
                options=dict(rocks),
                help=help_,
            )

        self.sessions = table("sessions", "session state by (applicationId, integrationId)")
        self.session_ids = table("session-ids", "per-partition session id counters")
        self.first_sessions = table("first-sessions", "first session by profile")
        self.rekey_topic = rekey_topic(s)
        self.profile_topic = profile_topic(s)
        self.commands = app.topic(
            s.topics.commands, self.rekey_topic, partitions=s.partitions, **_RAW
        )
        self.by_profile = app.topic(self.profile_topic, partitions=s.partitions, **_RAW)
        self.command_processor = CommandProcessor(
            topics=s.topics,
            rekey_topic=self.rekey_topic,
            profile_topic=self.profile_topic,
            sessions=self.sessions,
            allocator=PartitionSequenceAllocator(self.session_ids, s.partitions),
            settings_for=self.registry.settings_for,
            default_application_id=s.default_application_id,
            metrics=self.metrics,
        )
        self.profile_processor = ProfileProcessor(
            topics=s.topics, first_sessions=self.first_sessions, metrics=self.metrics
        )
        app.agent(self.commands, name="session-commands")(
            self._agent(self.command_processor.process)
        )
        app.agent(self.by_profile, name="session-profiles")(
            self._agent(self.profile_processor.process)
        )
        # mode's Signal types want a ``signal=`` keyword these handlers ignore.
        cast(Any, app.on_before_shutdown).connect(self._mark_clean_shutdown)
        cast(Any, app.on_partitions_assigned).connect(self._on_rebalance)
        cast(Any, app.on_partitions_revoked).connect(self._on_rebalance)
        app.task(self._follow_settings)
        app.timer(0.1)(self._commit_timer)
        app.timer(30.0)(self._log_metrics)

    # -- processing ------------------------------------------------------------------------
    def _agent(self, process: Callable[[SourceRecord], list[Outgoing]]) -> Callable[[Any], Any]:
        async def agent(stream: Any) -> None:
            self._guard_commits()
            await self.settings_ready.wait()
            # noack_take: this agent acks exactly the events it processed.
            async for events in stream.noack_take(
                self.settings.batch_size, within=self.settings.batch_within_s
            ):
                async with self._lock:
                    if self._transactions_ended:
                        continue  # shutting down: leave the batch uncommitted
                    await self._process_batch(stream, events, process)

        return agent

    async def _process_batch(
        self,
        stream: Any,
        events: Sequence[Any],
        process: Callable[[SourceRecord], list[Outgoing]],
    ) -> None:
        producer = self.app.producer
        assigned = self.app.consumer.assignment()
        processed: list[Any] = []
        for event in events:
            if event.message.tp not in assigned:
                # Revoked while buffered: its new owner processes it; neither
                # send nor ack it here (its transaction producer is gone).
                continue
            if not await self._in_sequence(event.message):
                continue
            processed.append(event)
            record = _record(event)
            # Table writes go to the changelog partition of the *current event*;
            # noack_take fills its buffer in another task, so set it here.
            token = _current_event.set(weakref.ref(event))
            try:
                try:
                    outgoing = process(record)
                except SessionIdSpaceExhaustedError:
                    raise
                except Exception as exc:  # a bug must not lose the record or stop the worker
                    log.exception(
                        "%s[%d]@%d: processing failed",
                        record.topic,
                        record.partition,
                        record.offset,
                    )
                    outgoing = [self._internal_error(record, exc)]
                tid = self._transactional_id(record)
                for out in outgoing:
                    await producer.send(
                        out.topic,
                        out.key,
                        out.value,
                        None,
                        None,
                        list(out.headers) or None,
                        transactional_id=tid,
                    )
            finally:
                _current_event.reset(token)
        for event in processed:
            await stream.ack(event)
        self._dirty = True
        if time.monotonic() - self._last_commit >= self.settings.batch_within_s:
            await self._commit_locked()

    async def _in_sequence(self, message: Any) -> bool:
        """Whether ``message`` is the next record of its partition to process.

        After a crash, Faust can hand over records fetched *before* its
        post-assignment seek to the committed offset (from where a dead
        worker's aborted transaction had read to), and then drops the
        re-fetched records below them as already read: processing such a record
        would skip the ones before it for good. So the first record of each
        partition after an assignment is checked against the committed offset;
        on a jump, the committed records in between are listed, the partition
        is sought back, and exactly those are processed, in order, before
        anything else of that partition. Records delivered twice are dropped.
        Dropped records are neither processed nor acknowledged.
        """
        tp, offset = message.tp, message.offset
        pending = self._resync.get(tp)
        if pending is not None:
            if offset != pending[0]:
                return False
            pending.popleft()
            if not pending:
                del self._resync[tp]
        elif tp in self._next_offset:
            if offset < self._next_offset[tp]:
                return False
        else:
            consumer: Any = self.app.consumer
            processed = consumer._acked_index[tp]  # processed, not yet committed
            if offset in processed:
                return False
            committed = consumer._committed_offset.get(tp)
            if committed is not None and offset > committed:
                skipped = [
                    o
                    for o in await committed_offsets_between(
                        self.settings, tp.topic, tp.partition, committed, offset
                    )
                    if o not in processed
                ]
                if skipped:
                    log.warning(
                        "%s[%d]: got offset %d before %d earlier record(s) from %d: seeking back",
                        tp.topic,
                        tp.partition,
                        offset,
                        len(skipped),
                        committed,
                    )
                    await consumer.seek(tp, skipped[0])
                    self._resync[tp] = deque(skipped)
                    return False
        self._next_offset[tp] = offset + 1
        return True

    async def _on_rebalance(self, sender: Any, *args: Any, **kwargs: Any) -> None:
        self._next_offset.clear()
        self._resync.clear()

    def _transactional_id(self, record: SourceRecord) -> str | None:
        if not self.app.in_transaction:
            return None
        group = self.app.assignor.group_for_topic(record.topic)
        return f"{self.app.conf.id}-{group}-{record.partition}"

    def _internal_error(self, record: SourceRecord, exc: Exception) -> Outgoing:
        rejection = Rejection(
            reason=Reason.INTERNAL_ERROR,
            message=f"the processor failed on this record: {type(exc).__name__}",
            errors=(ErrorDetail(title="internal error", details=str(exc)[:500], pointer=""),),
        )
        doc = rejection_document(
            rejection,
            record.value or b"",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            timestamp_ms=record.timestamp_ms,
        )
        return Outgoing(self.settings.topics.rejected, record.key or b"", json.dumps(doc))

    # -- commits ---------------------------------------------------------------------------
    def _guard_commits(self) -> None:
        """Route every commit, Faust's own included (rebalance, shutdown), through
        the processing lock, so no commit ever splits a batch."""
        consumer: Any = self.app.consumer
        if getattr(consumer, "_stream_app_guarded", False):
            return
        consumer._stream_app_guarded = True
        faust_commit = consumer.commit

        async def commit_between_batches(*args: Any, **kwargs: Any) -> bool:
            if self._inside_commit:
                return bool(await faust_commit(*args, **kwargs))
            async with self._lock:
                if self._transactions_ended:
                    return False
                await self.app.producer.buffer.flush()
                committed = bool(await faust_commit(*args, **kwargs))
                if self.app.in_transaction and kwargs.get("start_new_transaction") is False:
                    # Faust's shutdown commit ended every transaction: from here on
                    # nothing may be sent or committed. Unprocessed records stay
                    # uncommitted and are processed again after the restart.
                    self._transactions_ended = True
                return committed

        consumer.commit = commit_between_batches

    async def _commit_timer(self) -> None:
        if self._dirty and not self._lock.locked():
            async with self._lock:
                await self._commit_locked()

    async def _commit_locked(self) -> None:
        """Commit what whole batches produced. Caller holds the processing lock."""
        if not self._dirty:
            return
        # Changelog writes wait in Faust's producer buffer: send them into the
        # transaction before it commits.
        await self.app.producer.buffer.flush()
        self._inside_commit = True
        try:
            await self.app.consumer.commit()
        finally:
            self._inside_commit = False
        if not self.app.in_transaction:
            await self.app.producer.flush()
        self._dirty = False
        self._last_commit = time.monotonic()

    # -- local state ------------------------------------------------------------------------
    @property
    def _clean_shutdown_mark(self) -> Path:
        return self.settings.data_dir / CLEAN_SHUTDOWN_MARK

    def discard_state_after_unclean_stop(self) -> bool:
        """Before the worker starts: drop local tables a crash may have left ahead
        of the committed changelog. Returns whether anything was discarded."""
        tabledir = Path(self.app.conf.tabledir)
        mark = self._clean_shutdown_mark
        discarded = False
        if tabledir.exists() and not mark.exists():
            log.warning(
                "the last worker on %s did not stop cleanly: discarding local table state, "
                "it is rebuilt from the changelog topics",
                tabledir,
            )
            shutil.rmtree(tabledir)
            discarded = True
        mark.unlink(missing_ok=True)
        return discarded

    async def _mark_clean_shutdown(
        self, sender: Any, *args: Any, signal: Any = None, **kwargs: Any
    ) -> None:
        # Faust has committed and closed the stores by now (App.on_stop). Under
        # exactly_once the final commit must have ended the transactions.
        if self.app.in_transaction and not self._transactions_ended:
            log.warning("final commit did not complete: local state will be rebuilt")
            return
        self._clean_shutdown_mark.parent.mkdir(parents=True, exist_ok=True)
        self._clean_shutdown_mark.touch()

    async def _log_metrics(self) -> None:
        m = self.metrics
        log.info(
            "metrics: applied=%d duplicates=%d rejected=%d rekeyed=%d emitted=%s",
            m.applied,
            m.duplicates,
            m.rejected,
            m.rekeyed,
            m.emitted,
        )

    async def _follow_settings(self) -> None:
        await follow_settings_topic(self.settings, self.registry, self.settings_ready)


def create_pipeline(settings: Settings) -> SessionPipeline:
    return SessionPipeline(settings)


def create_worker(settings: Settings) -> faust.Worker:
    """A Faust worker for the pipeline, with the app's topics created first."""
    asyncio.run(ensure_topics(settings))
    pipeline = create_pipeline(settings)
    pipeline.discard_state_after_unclean_stop()
    return faust.Worker(pipeline.app, loglevel=settings.log_level.lower())
