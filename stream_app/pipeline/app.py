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
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import faust
from faust.streams import _current_event

from stream_app.pipeline.application_settings import (
    ApplicationSettingsRegistry,
    follow_settings_topic,
)
from stream_app.pipeline.kafka import faust_broker, faust_credentials
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
        app.task(self._follow_settings)
        app.timer(0.1)(self._commit_timer)
        app.timer(30.0)(self._log_metrics)

    # -- processing ------------------------------------------------------------------------
    def _agent(self, process: Callable[[SourceRecord], list[Outgoing]]) -> Callable[[Any], Any]:
        async def agent(stream: Any) -> None:
            self._guard_commits()
            await self.settings_ready.wait()
            async for events in stream.take_events(
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
        for event in events:
            if event.message.tp not in assigned:
                # Revoked while buffered: its new owner processes it; neither
                # send nor ack it here (its transaction producer is gone).
                continue
            record = _record(event)
            # Table writes go to the changelog partition of the *current event*;
            # take_events fills its buffer in another task, so set it here.
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
        for event in events:
            if event.message.tp in assigned:
                await stream.ack(event)
        self._dirty = True
        if time.monotonic() - self._last_commit >= self.settings.batch_within_s:
            await self._commit_locked()

    def _transactional_id(self, record: SourceRecord) -> str | None:
        if not self.app.in_transaction:
            return None
        group = self.app.assignor.group_for_topic(record.topic)
        return f"{self.app.conf.id}-{group}-{record.partition}"

    def _internal_error(self, record: SourceRecord, exc: Exception) -> Outgoing:
        from stream_app import json
        from stream_app.domain import ErrorDetail, Reason, Rejection, rejection_document

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

    async def _log_metrics(self) -> None:
        m = self.metrics
        log.info(
            "metrics: applied=%d duplicates=%d rejected=%d rekeyed=%d emitted=%s",
            m.applied, m.duplicates, m.rejected, m.rekeyed, m.emitted,
        )

    async def _follow_settings(self) -> None:
        await follow_settings_topic(self.settings, self.registry, self.settings_ready)


def create_pipeline(settings: Settings) -> SessionPipeline:
    return SessionPipeline(settings)


def create_worker(settings: Settings) -> faust.Worker:
    """A Faust worker for the pipeline, with the app's topics created first."""
    asyncio.run(ensure_topics(settings))
    pipeline = create_pipeline(settings)
    return faust.Worker(pipeline.app, loglevel=settings.log_level.lower())
