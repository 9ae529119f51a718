"""Per-application settings: a JSON file, overridden by a compacted settings topic.

Every worker needs every application's settings, whichever partitions it
owns, so each worker reads the whole settings topic with its own unassigned
consumer (the role of a global table in Kafka Streams). Workers do not
process commands until they have read the topic to its end.

Record format: key = the applicationId as ASCII digits, value = a JSON
settings document (``{"flattening": false, "additionalCosts": [...],
"attributes": [...]}``), a tombstone removes the override.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
)

from stream_app import json
from stream_app.domain import ApplicationSettings
from stream_app.domain.decoding import INT32_MAX
from stream_app.errors import ConfigurationError
from stream_app.logs import HeldBack, excerpt, held_back
from stream_app.pipeline.kafka import client_options, partition_count
from stream_app.pipeline.unreadable import (
    MAYBE_UNREADABLE,
    can_read_past,
    empty_control_batch,
    read_past,
)
from stream_app.settings import Settings

log = logging.getLogger(__name__)

DEFAULT = ApplicationSettings()
#: How often the follower says it is still waiting for the settings topic
#: to be shown. The worker creates it just before (``ensure_topics``), and
#: the broker may not show it at once; the follower waits for as long as it
#: takes, as commands must not be applied with settings it has not read.
TOPIC_VISIBLE_WAIT_S = 10.0
#: How often a first read of the settings topic that has not reached its
#: end says so.
_READING_TOLD_EVERY_S: Final = 30.0
#: How often the follower's metadata, and so the settings topic's partition
#: count, is refreshed (the engine's input topics are watched as often).
METADATA_MAX_AGE_MS: Final = 10_000


def plain_application_id(raw: bytes) -> int | None:
    """The applicationId ``raw`` writes plainly (``7``; not ``07``, ``+7`` or
    `` 7``), or None."""
    # At most 10 digits before int(): Python refuses more than 4,300 (ValueError).
    if not (0 < len(raw) <= 10 and raw.isdigit() and raw == b"%d" % int(raw)):
        return None
    application_id = int(raw)
    return application_id if 0 < application_id <= INT32_MAX else None


class ApplicationSettingsRegistry:
    """Settings by applicationId: topic overrides, then the file, then defaults."""

    def __init__(self, from_file: dict[int, ApplicationSettings] | None = None) -> None:
        self._from_file = dict(from_file or {})
        self._from_topic: dict[int, ApplicationSettings] = {}
        #: The sets of unknown keys already named (see _warn_of_unknown_keys).
        self._told: set[frozenset[str]] = set()
        #: A record that is not settings is a line at most every 10 s per kind:
        #: compaction keeps each key, so thousands of them were as many lines
        #: at every start of every worker.
        self._ignored = HeldBack()
        #: Records ignored for their key, and the applications whose newest
        #: record is not a settings document: said in full once loaded.
        self.keys_ignored = 0
        self.not_documents: set[int] = set()
        #: Until the topic is first read to its end, when a flood of such
        #: records is one line: then each application's is named.
        self.loading = True

    def read_from_start(self) -> None:
        """The topic is read again from its start: what was ignored is counted
        again (a first read cut short by an outage counted it twice)."""
        self.keys_ignored = 0
        self.not_documents.clear()

    @classmethod
    def load(cls, path: Path | None) -> ApplicationSettingsRegistry:
        if path is None:
            return cls()
        try:
            doc: Any = json.loads(path.read_bytes())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigurationError(f"cannot read application settings {path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise ConfigurationError(f"{path}: expected an object keyed by applicationId")
        registry = cls()
        for key, value in doc.items():
            # As the topic's keys: "07", " 7" or "1_0" were read as 7 and 10,
            # a later one silently replacing an earlier ("7" and "07").
            application_id = plain_application_id(key.encode())
            if application_id is None:
                raise ConfigurationError(
                    f"{path}: key {key!r} is not an applicationId written plainly "
                    f"(1..{INT32_MAX}, no sign, spaces or leading zeros)"
                )
            try:
                registry._from_file[application_id] = ApplicationSettings.from_document(value)
            except (ValueError, ConfigurationError) as exc:
                raise ConfigurationError(f"{path}: application {key}: {exc}") from exc
            registry._warn_of_unknown_keys(value, f"{path}: application {key}")
        return registry

    def settings_for(self, application_id: int) -> ApplicationSettings:
        found = self._from_topic.get(application_id)
        if found is None:
            found = self._from_file.get(application_id, DEFAULT)
        return found

    def apply_record(self, key: bytes | None, value: bytes | None) -> None:
        """Apply one settings-topic record. The topic is compacted, so a worker
        that starts later sees only each key's newest record: every worker
        must read the same settings from that alone.

        * A key that is not an applicationId written plainly (``7``, not
          ``07`` or ``+7``, which compaction keeps apart) is logged and ignored.
        * A value that is not a settings document is logged and counts as a
          tombstone: the application falls back to the settings file or the
          defaults, as a worker starting after compaction would.
        """
        application_id = plain_application_id(key or b"")
        if application_id is None:
            self.keys_ignored += 1
            held = self._ignored.due("key")
            if held is not None:
                log.warning(
                    "ignoring application settings record key=%s: not an applicationId%s",
                    excerpt(key),
                    held_back(held, "such records"),
                )
            return
        self.not_documents.discard(application_id)
        if value is None:
            self._from_topic.pop(application_id, None)
            return
        try:
            doc = json.loads(value)
            parsed = ApplicationSettings.from_document(doc)
        except (ValueError, ConfigurationError) as exc:
            self._from_topic.pop(application_id, None)
            self.not_documents.add(application_id)
            held = self._ignored.due("document" if self.loading else application_id)
            if held is not None:
                log.warning(
                    "application settings record key=%s is not a settings document (%s): "
                    "application %d falls back to the settings file or the defaults%s",
                    excerpt(key),
                    exc,
                    application_id,
                    held_back(held, "records that are not settings documents"),
                )
            return
        self._warn_of_unknown_keys(doc, f"application settings record key={excerpt(key)}")
        self._from_topic[application_id] = parsed

    def ignored(self) -> str | None:
        """What the records read so far left out, in one line, or None."""
        said = []
        if self.keys_ignored:
            n = self.keys_ignored
            said.append(f"{n} record{'s' * (n != 1)} whose key is not an applicationId")
        if self.not_documents:
            ids = sorted(self.not_documents)
            shown = ", ".join(map(str, ids[:_UNKNOWN_KEYS_SHOWN]))
            more = len(ids) - _UNKNOWN_KEYS_SHOWN
            said.append(
                f"the newest records of {len(ids)} application{'s' * (len(ids) != 1)} ({shown}"
                f"{f' and {more} more' if more > 0 else ''}), which are not settings "
                "documents: those applications take the settings file's or the defaults"
            )
        return "; ".join(said) or None

    def _warn_of_unknown_keys(self, doc: dict[Any, Any], where: str) -> None:
        """Unknown keys are ignored (the contract, section 7), but a document
        with ``additional_costs`` or the settings file's own shape under one
        key gave the application the defaults, every cost and attribute
        allowed, silently. Each set of unknown keys is named once: documents
        that carry more than settings on purpose, for thousands of
        applications, are not a line each at every start."""
        unknown = sorted(str(k) for k in doc if k not in ApplicationSettings.KEYS)
        if not unknown or frozenset(unknown) in self._told:
            return
        if len(self._told) < _UNKNOWN_KEY_SETS_TOLD:
            self._told.add(frozenset(unknown))
        shown = [
            repr(k) if len(k) <= 64 else f"{k[:64]!r}..." for k in unknown[:_UNKNOWN_KEYS_SHOWN]
        ]
        more = len(unknown) - len(shown)
        log.warning(
            "%s: ignoring keys that are not settings: %s%s (the settings are %s; "
            "documents with just these unknown keys are not named again)",
            where,
            ", ".join(shown),
            f" and {more} more" if more else "",
            ", ".join(ApplicationSettings.KEYS),
        )


#: Unknown keys a warning names (a record may hold thousands).
_UNKNOWN_KEYS_SHOWN: Final = 5
#: Sets of unknown keys remembered as named (past it, each is named again).
_UNKNOWN_KEY_SETS_TOLD: Final = 1000


#: Seconds between the first read's attempts while Kafka cannot be reached.
FIRST_READ_BACKOFF_S = 1.0
_FIRST_READ_BACKOFF_MAX_S: Final = 30.0


async def follow_settings_topic(
    settings: Settings, registry: ApplicationSettingsRegistry, ready: asyncio.Event
) -> None:
    """Read the settings topic from the beginning, set ``ready`` at its end, keep following.

    Until ``ready``, Kafka out of reach is waited for, with backoff, as the
    worker waits for it before it declares its topics: an outage between the
    two stopped the worker, exit 1, as if the follower had failed. Once the
    settings are loaded, a failure ends this (and the worker)."""
    backoff = FIRST_READ_BACKOFF_S
    while True:
        try:
            await _follow(settings, registry, ready)
        except (
            KafkaConnectionError,
            KafkaTimeoutError,
            NodeNotReadyError,
            RequestTimedOutError,
        ) as exc:
            if ready.is_set():
                raise
            # Not only an outage: a settings partition without a leader
            # times out the same way, with the rest of Kafka answering.
            log.warning(
                "reading the application settings topic %s from Kafka at %s failed (%r): "
                "Kafka or the topic's leader is not reachable; retrying in %.0f s",
                settings.topics.application_settings,
                settings.bootstrap_servers,
                exc,
                backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _FIRST_READ_BACKOFF_MAX_S)
        else:
            return


async def _follow(
    settings: Settings, registry: ApplicationSettingsRegistry, ready: asyncio.Event
) -> None:
    topic = settings.topics.application_settings
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        # Replaying the compacted topic from its start gives the same settings;
        # skipping to its end (aiokafka's default) could lose some.
        auto_offset_reset="earliest",
        metadata_max_age_ms=METADATA_MAX_AGE_MS,
    )
    try:
        await consumer.start()  # in the try: a failed or cancelled start closes it too
        count = await _shown_partitions(settings, topic)
        tps = [TopicPartition(topic, p) for p in range(count)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        if not ready.is_set():
            registry.read_from_start()
        end = await consumer.end_offsets(tps)
        #: Per partition, the offset after the last record applied.
        applied = {tp: await consumer.position(tp) for tp in tps}
        loop = asyncio.get_running_loop()
        told = loop.time()
        while True:
            if not ready.is_set():
                if await _caught_up(consumer, end):
                    log.info("application settings loaded")
                    ignored = registry.ignored()
                    if ignored is not None:
                        log.warning("the application settings topic %s: ignored %s", topic, ignored)
                    registry.loading = False
                    ready.set()
                elif loop.time() - told >= _READING_TOLD_EVERY_S:
                    # Else a fetch that stalls (a partition without a leader)
                    # kept the worker unready without a word.
                    told = loop.time()
                    log.warning(
                        "still reading the settings topic %s before applying commands: "
                        "at offset %s of %s",
                        topic,
                        sum(applied.values()),
                        sum(end.values()),
                    )
            try:
                batches = await consumer.getmany(timeout_ms=200)
            except MAYBE_UNREADABLE as exc:
                if not can_read_past(exc):
                    raise
                await _read_past_the_client(consumer, applied, registry, client_options(settings))
                continue
            except KafkaError as exc:
                if not empty_control_batch(exc):
                    raise
                await _read_past_the_client(consumer, applied, registry, client_options(settings))
                continue
            for tp, records in batches.items():
                for record in records:
                    registry.apply_record(record.key, record.value)
                    applied[tp] = record.offset + 1
            await _follow_added_partitions(consumer, topic, applied)
    finally:
        await consumer.stop()


async def _shown_partitions(settings: Settings, topic: str) -> int:
    """The settings topic's partition count, once the cluster shows it.

    The worker has just created the topic or found it (``ensure_topics``),
    so a topic not shown is one the broker has not caught up with: it is
    asked for again, for as long as it takes. Before, the follower gave up
    after 10 s and the worker applied its file settings alone for its whole
    life, while the group's other workers applied the topic's."""
    loop = asyncio.get_running_loop()
    began = warned = loop.time()
    while True:
        count = await partition_count(client_options(settings), topic)
        if count:
            return count
        now = loop.time()
        if now - warned >= TOPIC_VISIBLE_WAIT_S:
            warned = now
            log.warning(
                "settings topic %s is not shown by the cluster %.0f s after the worker "
                "declared it: waiting for it before applying commands (a worker that has "
                "not read the applications' settings would apply others than its group)",
                topic,
                now - began,
            )
        await asyncio.sleep(0.2 if now - began < TOPIC_VISIBLE_WAIT_S else 1.0)


async def _follow_added_partitions(
    consumer: AIOKafkaConsumer, topic: str, applied: dict[TopicPartition, int]
) -> None:
    """Follow, from their start, partitions added to the settings topic since
    they were assigned. The rest go on from what was applied (a new
    assignment resets every position). Before, only the partitions of the
    worker's start were read, and settings written to a partition added
    later never applied, without a word."""
    known = consumer.partitions_for_topic(topic) or set()
    added = [
        TopicPartition(topic, p) for p in sorted(known) if TopicPartition(topic, p) not in applied
    ]
    if not added:
        return
    log.warning(
        "settings topic %s has %d partitions now, %d more than when it was first read: "
        "following them from their start. Applications' settings now hash to other "
        "partitions than their older records, and a later start may apply either last: "
        "recreate the topic with one partition, write the settings again and restart the "
        "workers (docs/contract.md, section 7)",
        topic,
        len(known),
        len(added),
    )
    consumer.assign([*applied, *added])
    for tp, offset in applied.items():
        consumer.seek(tp, offset)
    await consumer.seek_to_beginning(*added)
    for tp in added:
        applied[tp] = await consumer.position(tp)


async def _read_past_the_client(
    consumer: AIOKafkaConsumer,
    applied: dict[TopicPartition, int],
    registry: ApplicationSettingsRegistry,
    options: dict[str, Any],
) -> None:
    """aiokafka cannot decode a fetched record (a header name that is not
    UTF-8) and would fail on it at every poll, in every worker, until
    compaction removed it. The settings never read headers: each partition is
    read raw (:func:`~stream_app.pipeline.unreadable.read_past`) from the last
    record applied, its records applied like any other, and the consumer
    sought past them. From ``applied``, not from the consumer's positions: a
    failed fetch can have moved another partition's position past records it
    then did not return."""
    for tp, offset in applied.items():
        # Not below the log's start (records deleted since): the fetch would
        # be refused, and the follower, and so the worker, would stop.
        offset = max(offset, (await consumer.beginning_offsets([tp]))[tp])
        async with contextlib.aclosing(read_past(options, tp, offset)) as reading:
            async for records, after in reading:
                for record in records:
                    if not record.readable():
                        log.warning(
                            "settings topic %s[%d]@%d: a header name is not UTF-8 (headers "
                            "are not read): applied as any record",
                            tp.topic,
                            tp.partition,
                            record.offset,
                        )
                    registry.apply_record(record.key, record.value)
                offset = after
        applied[tp] = offset
        consumer.seek(tp, offset)


async def _caught_up(consumer: AIOKafkaConsumer, end: dict[TopicPartition, int]) -> bool:
    for tp, offset in end.items():
        if await consumer.position(tp) < offset:
            return False
    return True
