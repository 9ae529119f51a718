"""Per-application settings: file, topic overrides, tombstones, bad records."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from stream_app import json
from stream_app.errors import ConfigurationError
from stream_app.pipeline import application_settings, unreadable
from stream_app.pipeline.application_settings import DEFAULT, ApplicationSettingsRegistry
from stream_app.pipeline.unreadable import RawRecord
from stream_app.settings import Settings
from tests.pipeline.fakes import IdleKafkaClient


@pytest.fixture(autouse=True)
def _no_raw_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """read_past's own client, idle: its reads are stood in for below."""
    monkeypatch.setattr(unreadable, "AIOKafkaClient", IdleKafkaClient)


def test_file_settings_apply_per_application_and_others_get_defaults(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    path.write_text('{"7": {"flattening": false, "additionalCosts": ["shipping"]}}')
    registry = ApplicationSettingsRegistry.load(path)
    seven = registry.settings_for(7)
    assert seven.flattening is False
    assert seven.additional_costs == frozenset({"shipping"})
    assert registry.settings_for(8) == DEFAULT
    assert DEFAULT.flattening is True


def test_topic_records_override_the_file_and_tombstones_restore_it(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    path.write_text('{"7": {"flattening": false}}')
    registry = ApplicationSettingsRegistry.load(path)
    registry.apply_record(b"7", b'{"flattening": true, "attributes": ["city"]}')
    assert registry.settings_for(7).flattening is True
    assert registry.settings_for(7).attributes == frozenset({"city"})
    registry.apply_record(b"7", None)
    assert registry.settings_for(7).flattening is False


def test_keys_that_are_not_settings_are_ignored_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The settings file's own shape written to the topic, or a misspelt key,
    gave the application the defaults (every cost and attribute allowed), and
    nothing said so. Unknown keys are still ignored (the contract, section 7)."""
    path = tmp_path / "apps.json"
    path.write_text('{"7": {"flattening": false, "Attributes": ["city"]}}')
    with caplog.at_level(logging.WARNING):
        registry = ApplicationSettingsRegistry.load(path)
        registry.apply_record(b"7", b'{"7": {"flattening": false}, "additional_costs": ["x"]}')
        many = {f"k{n}": 1 for n in range(8)}
        registry.apply_record(b"8", json.dumps({"flattening": False, **many}))
    assert registry.settings_for(7) == DEFAULT
    assert registry.settings_for(8).flattening is False
    told = (
        "(the settings are flattening, additionalCosts, attributes; documents with "
        "just these unknown keys are not named again)"
    )
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: application 7: ignoring keys that are not settings: 'Attributes' {told}",
        "application settings record key=b'7': ignoring keys that are not settings: "
        f"'7', 'additional_costs' {told}",
        "application settings record key=b'8': ignoring keys that are not settings: "
        f"'k0', 'k1', 'k2', 'k3', 'k4' and 3 more {told}",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        registry.apply_record(b"7", b'{"flattening": true, "attributes": ["city"]}')
        # Documents that carry more than settings on purpose, for thousands of
        # applications, are not a line each.
        for application_id in range(10, 2000):
            registry.apply_record(b"%d" % application_id, b'{"flattening": false, "owner": "x"}')
    assert [r.getMessage() for r in caplog.records] == [
        "application settings record key=b'10': ignoring keys that are not settings: "
        f"'owner' {told}"
    ]


def test_a_bad_settings_record_counts_as_a_tombstone(tmp_path: Path) -> None:
    """After compaction a worker that starts sees only the bad record: the
    running ones must end where it does (before, they kept the previous
    override, and two workers applied different rules)."""
    path = tmp_path / "settings.json"
    path.write_text('{"3": {"attributes": ["city"]}}')
    for bad in (b'{"flattening": "no"}', b"{broken"):
        running = ApplicationSettingsRegistry.load(path)
        running.apply_record(b"3", b'{"flattening": false}')
        running.apply_record(b"3", bad)
        starting = ApplicationSettingsRegistry.load(path)
        starting.apply_record(b"3", bad)  # all that compaction left
        assert running.settings_for(3) == starting.settings_for(3)
        assert running.settings_for(3).flattening is True
        assert running.settings_for(3).attributes == frozenset({"city"})  # the file's


@pytest.mark.parametrize(
    "key",
    [b"07", b"+7", b" 7", b"7 ", b"1_0", b"\xd9\xa3", b"0", b"x", b"", b"1" * 11, b"1" * 5000],
)
def test_a_key_that_is_not_a_plain_application_id_is_ignored(key: bytes) -> None:
    """Compaction keeps "07" and "7" apart: read as one application, a later
    tombstone of one would be undone on restart by the other."""
    registry = ApplicationSettingsRegistry()
    registry.apply_record(b"7", b'{"flattening": false}')
    registry.apply_record(key, b'{"flattening": true}')
    registry.apply_record(key, None)
    assert registry.settings_for(7).flattening is False


@pytest.mark.parametrize("content", ["[1]", '{"x": {}}', '{"1": {"attributes": "city"}}', "{"])
def test_an_unusable_settings_file_stops_the_worker_at_start(tmp_path: Path, content: str) -> None:
    path = tmp_path / "apps.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError):
        ApplicationSettingsRegistry.load(path)


@pytest.mark.parametrize("key", ["07", " 8 ", "1_0", "0", "-5", "99999999999", "²"])
def test_a_file_key_that_is_not_a_plain_application_id_stops_the_worker(
    tmp_path: Path, key: str
) -> None:
    """int() read " 8 " as 8 and "1_0" as 10, and "07" as 7 (replacing "7"'s
    settings unsaid); "0", "-5" and past the int32 range matched no command."""
    path = tmp_path / "apps.json"
    path.write_text(json.dumps({"7": {"flattening": False}, key: {"flattening": True}}).decode())
    with pytest.raises(ConfigurationError, match=f"key '{key}' is not an applicationId"):
        ApplicationSettingsRegistry.load(path)


def test_a_bad_document_in_the_file_names_its_application(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    path.write_text('{"7": {"flattening": "sometimes"}}')
    with pytest.raises(ConfigurationError, match="application 7: "):
        ApplicationSettingsRegistry.load(path)


class _SettingsConsumer:
    """The follower's consumer over a one-partition settings topic holding one record."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.records = [(b"7", b'{"flattening": false}')]
        self.position_ = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, tps: object) -> None:
        pass

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    async def seek_to_beginning(self, *tps: object) -> None:
        pass

    async def end_offsets(self, tps: list[object]) -> dict[object, int]:
        return {tp: len(self.records) for tp in tps}

    async def beginning_offsets(self, tps: list[object]) -> dict[object, int]:
        return dict.fromkeys(tps, 0)

    async def position(self, tp: object) -> int:
        return self.position_

    async def getmany(self, timeout_ms: int) -> dict[object, list[object]]:
        if self.position_ >= len(self.records):
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        self.position_ = len(self.records)
        records = [
            SimpleNamespace(offset=n, key=k, value=v) for n, (k, v) in enumerate(self.records)
        ]
        return {TopicPartition("settings", 0): records}


async def _one_partition(options: object, topic: str) -> int:
    """``partition_count`` of a settings topic of one partition."""
    return 1


async def _followed(registry: ApplicationSettingsRegistry) -> asyncio.Task[None]:
    """The settings follower (over the stand-ins patched in), once it has read
    the topic to its end."""
    ready = asyncio.Event()
    follower = asyncio.create_task(
        application_settings.follow_settings_topic(Settings(), registry, ready)
    )
    await asyncio.wait_for(ready.wait(), 5)
    return follower


async def test_a_settings_topic_just_created_is_followed_once_the_broker_shows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker creates the topic just before; the broker may not show it
    at once. Before, the follower gave up at the first look ("does not exist:
    file settings only") and ignored the topic for the worker's whole life."""
    answers = [0, 0, 1]

    async def partition_count(options: object, topic: str) -> int:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    monkeypatch.setattr(application_settings, "partition_count", partition_count)
    monkeypatch.setattr(application_settings, "AIOKafkaConsumer", _SettingsConsumer)
    registry = ApplicationSettingsRegistry()
    follower = await _followed(registry)
    follower.cancel()
    assert registry.settings_for(7).flattening is False


class _FloodedSettingsConsumer(_SettingsConsumer):
    """2,000 records whose key is not an applicationId, and 2,000 applications
    whose record is not a settings document, two of them set right later."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()
        self.records = [(b"app-%d" % n, b"{}") for n in range(2000)]
        self.records += [(b"%d" % n, b"{broken") for n in range(1, 2001)]
        self.records += [(b"5", b'{"flattening": false}'), (b"7", b'{"flattening": false}')]


async def test_records_that_are_not_settings_are_a_line_per_kind_and_one_summary(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Compaction keeps every key: such records were a WARNING each, at every
    start of every worker (4,000 lines here). Now one of each kind, then what
    was ignored in one line once the settings are loaded."""

    monkeypatch.setattr(application_settings, "partition_count", _one_partition)
    monkeypatch.setattr(application_settings, "AIOKafkaConsumer", _FloodedSettingsConsumer)
    registry = ApplicationSettingsRegistry()
    with caplog.at_level(logging.WARNING):
        follower = await _followed(registry)
        follower.cancel()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 3, lines
    assert lines[0].startswith("ignoring application settings record key=")
    assert "is not a settings document" in lines[1]
    assert lines[2] == (
        "the application settings topic sessions.application-settings: ignored 2000 records "
        "whose key is not an applicationId; the newest records of 1998 applications "
        "(1, 2, 3, 4, 6 and 1993 more), which are not settings documents: those "
        "applications take the settings file's or the defaults"
    )
    assert registry.settings_for(5).flattening is False
    assert registry.settings_for(6) == DEFAULT


def test_once_loaded_each_application_s_bad_document_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Held back as one kind, a second application's broken document written
    with the first's was never named: it fell back to the defaults unsaid."""
    registry = ApplicationSettingsRegistry()
    registry.loading = False
    with caplog.at_level(logging.WARNING):
        registry.apply_record(b"5", b"{broken")
        registry.apply_record(b"7", b"{broken")
        registry.apply_record(b"7", b"{broken")  # the same application again: held back
    named = [r.getMessage().split(": application ")[1][:2] for r in caplog.records]
    assert named == ["5 ", "7 "]


def test_a_first_read_begun_again_counts_what_it_ignores_once() -> None:
    """A first read cut short by an outage reads the topic from its start
    again: the summary counted the records read before the outage twice."""
    registry = ApplicationSettingsRegistry()
    for _ in range(2):
        registry.read_from_start()
        registry.apply_record(b"07", b"{}")
        registry.apply_record(b"3", b"{broken")
    assert registry.ignored() == (
        "1 record whose key is not an applicationId; the newest records of 1 "
        "application (3), which are not settings documents: those applications take "
        "the settings file's or the defaults"
    )


async def test_a_settings_topic_the_broker_shows_late_is_waited_for_not_given_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a settings topic not shown within 10 s was given up for the
    worker's whole life ("does not exist: file settings only"): that worker
    applied its file settings alone while the rest of its group applied the
    topic's. Now the worker is not ready until the topic is shown and read."""
    shown = asyncio.Event()

    async def partition_count(options: object, topic: str) -> int:
        return 1 if shown.is_set() else 0

    monkeypatch.setattr(application_settings, "partition_count", partition_count)
    monkeypatch.setattr(application_settings, "AIOKafkaConsumer", _SettingsConsumer)
    monkeypatch.setattr(application_settings, "TOPIC_VISIBLE_WAIT_S", 0.3)
    registry = ApplicationSettingsRegistry()
    ready = asyncio.Event()
    follower = asyncio.create_task(
        application_settings.follow_settings_topic(Settings(), registry, ready)
    )
    await asyncio.sleep(1.5)  # five times the wait
    assert not ready.is_set()
    assert not follower.done()
    assert "waiting for it before applying commands" in caplog.text
    shown.set()
    await asyncio.wait_for(ready.wait(), 5)
    follower.cancel()
    assert registry.settings_for(7).flattening is False


class _StalledSettingsConsumer(_SettingsConsumer):
    """Its fetches return nothing: the partition's leader is away."""

    async def getmany(self, timeout_ms: int) -> dict[object, list[object]]:
        await asyncio.sleep(timeout_ms / 1000)
        return {}


async def test_a_first_read_that_stalls_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, a fetch that stalled after the end offsets were known kept the
    worker unready without a word until its startup probe killed it."""

    monkeypatch.setattr(application_settings, "partition_count", _one_partition)
    monkeypatch.setattr(application_settings, "AIOKafkaConsumer", _StalledSettingsConsumer)
    monkeypatch.setattr(application_settings, "_READING_TOLD_EVERY_S", 0.1)
    ready = asyncio.Event()
    follower = asyncio.create_task(
        application_settings.follow_settings_topic(Settings(), ApplicationSettingsRegistry(), ready)
    )
    await asyncio.sleep(0.8)
    follower.cancel()
    assert not ready.is_set()
    assert "still reading the settings topic sessions.application-settings" in caplog.text
    assert "at offset 0 of 1" in caplog.text


#: What aiokafka's getmany raises at a header name that is not UTF-8, and at
#: a control batch of no records (read_committed; see unreadable.py).
_POISONS: dict[str, Exception] = {
    "a header name that is not UTF-8": UnicodeDecodeError(
        "utf-8", b"\xff", 0, 1, "invalid start byte"
    ),
    "an empty control batch": KafkaError("Control batch did not contain any records"),
}


class _PoisonedSettingsConsumer(_SettingsConsumer):
    """Its one record has a header name that is not UTF-8 (or another poison):
    aiokafka's getmany fails."""

    poison: Exception = _POISONS["a header name that is not UTF-8"]

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()
        self.sought: list[tuple[object, int]] = []

    async def getmany(self, timeout_ms: int) -> dict[object, list[object]]:
        if self.position_ < len(self.records):
            raise self.poison
        return await super().getmany(timeout_ms)

    def seek(self, tp: object, offset: int) -> None:
        self.sought.append((tp, offset))
        self.position_ = offset


class _GrowingSettingsConsumer:
    """A settings topic of one partition, to which an operator adds a second
    holding a record for application 8 once the first has been read."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.records = {
            0: [(b"7", b'{"flattening": false}')],
            1: [(b"8", b'{"flattening": false}')],
        }
        self.partitions = {0}
        self.positions: dict[TopicPartition, int] = {}
        self.assignments: list[list[TopicPartition]] = []
        self.sought: list[tuple[TopicPartition, int]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assignments.append(list(tps))
        self.positions = {}  # as aiokafka's: every position reset

    def partitions_for_topic(self, topic: str) -> set[int]:
        return set(self.partitions)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.sought.append((tp, offset))
        self.positions[tp] = offset

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.positions[tp] = 0

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.records[tp.partition]) for tp in tps}

    async def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[object]]:
        await asyncio.sleep(0.01)
        batches = {}
        for tp, position in self.positions.items():
            records = self.records[tp.partition]
            if position < len(records):
                batches[tp] = [
                    SimpleNamespace(offset=n, key=k, value=v)
                    for n, (k, v) in enumerate(records)
                    if n >= position
                ]
                self.positions[tp] = len(records)
        self.partitions = {0, 1}  # added once the first poll has returned
        return batches


async def test_partitions_added_to_the_settings_topic_are_followed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Only the partitions of the worker's start were read: settings written
    to a partition added later never applied, and nothing said so."""
    consumers: list[_GrowingSettingsConsumer] = []

    def consumer(*args: object, **kwargs: object) -> _GrowingSettingsConsumer:
        consumers.append(_GrowingSettingsConsumer())
        return consumers[-1]

    monkeypatch.setattr(application_settings, "partition_count", _one_partition)
    monkeypatch.setattr(application_settings, "AIOKafkaConsumer", consumer)
    registry = ApplicationSettingsRegistry()
    with caplog.at_level(logging.WARNING):
        follower = await _followed(registry)
        for _ in range(100):
            if registry.settings_for(8).flattening is False:
                break
            await asyncio.sleep(0.01)
    follower.cancel()
    assert registry.settings_for(7).flattening is False
    assert registry.settings_for(8).flattening is False
    topic = Settings().topics.application_settings
    first, second = TopicPartition(topic, 0), TopicPartition(topic, 1)
    assert consumers[0].assignments == [[first], [first, second]]
    assert consumers[0].sought == [(first, 1)]  # not read again from its start
    assert "has 2 partitions now, 1 more" in caplog.text


@pytest.mark.parametrize("poison", list(_POISONS))
async def test_a_settings_record_the_client_cannot_read_is_read_raw_and_applied(
    monkeypatch: pytest.MonkeyPatch, poison: str
) -> None:
    """Before, the follower died on it and stopped the worker, on every start
    of every worker, until compaction removed the record. (An empty control
    batch, which Kafka's log cleaner leaves in a compacted transactional
    topic, stopped it too.)"""
    consumers: list[_PoisonedSettingsConsumer] = []

    def consumer(*args: object, **kwargs: object) -> _PoisonedSettingsConsumer:
        consumers.append(_PoisonedSettingsConsumer())
        consumers[-1].poison = _POISONS[poison]
        return consumers[-1]

    async def read_batches_at(
        options: object, tp: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        if offset >= 1:
            return [], offset  # the end of the topic
        record = RawRecord(
            tp.topic, tp.partition, offset, 0, b"7", b'{"flattening": false}', ((b"\xff", b"x"),)
        )
        return [record], offset + 1

    monkeypatch.setattr(application_settings, "partition_count", _one_partition)
    monkeypatch.setattr(application_settings, "AIOKafkaConsumer", consumer)
    monkeypatch.setattr(unreadable, "read_batches_at", read_batches_at)
    registry = ApplicationSettingsRegistry()
    follower = await _followed(registry)
    assert not follower.done()  # still following
    follower.cancel()
    assert registry.settings_for(7).flattening is False
    [(_, offset)] = consumers[0].sought
    assert offset == 1


async def test_a_raw_read_starts_from_what_was_applied_on_every_partition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failed fetch can move a partition's position past records it then
    does not return: the raw read starts from the last record applied, not
    from the consumer's position, and goes through several batches."""
    reads: list[tuple[int, int]] = []

    async def read_batches_at(
        options: object, tp: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        reads.append((tp.partition, offset))
        if offset >= 3:
            return [], offset
        value = b'{"flattening": false}' if offset == 2 else b"{}"
        key = b"%d" % (tp.partition + 1)
        return [RawRecord(tp.topic, tp.partition, offset, 0, key, value)], offset + 1

    monkeypatch.setattr(unreadable, "read_batches_at", read_batches_at)
    consumer = _PoisonedSettingsConsumer()
    registry = ApplicationSettingsRegistry()
    applied = {TopicPartition("s", 0): 1, TopicPartition("s", 1): 0}
    await application_settings._read_past_the_client(consumer, applied, registry, {})  # type: ignore[arg-type]
    assert reads == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert applied == {TopicPartition("s", 0): 3, TopicPartition("s", 1): 3}
    assert [offset for _, offset in consumer.sought] == [3, 3]
    assert registry.settings_for(1).flattening is False
    assert registry.settings_for(2).flattening is False


async def test_kafka_out_of_reach_before_the_settings_are_loaded_is_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker waits for Kafka before it declares its topics; an outage
    right after, as the follower started, stopped the worker with exit 1
    and a traceback, as if the follower had failed."""
    failures = [KafkaConnectionError("Unable to bootstrap"), KafkaTimeoutError()]

    class _Reaching(_SettingsConsumer):
        async def start(self) -> None:
            if failures:
                raise failures.pop(0)

    monkeypatch.setattr(application_settings, "FIRST_READ_BACKOFF_S", 0.01)
    monkeypatch.setattr(application_settings, "partition_count", _one_partition)
    monkeypatch.setattr(application_settings, "AIOKafkaConsumer", _Reaching)
    registry = ApplicationSettingsRegistry()
    follower = await _followed(registry)
    assert failures == []
    assert registry.settings_for(7).flattening is False
    follower.cancel()


async def test_once_the_settings_are_loaded_a_failure_ends_the_follower(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not waited for then: the worker stops rather than apply settings that
    may be stale (docs/operations.md)."""

    class _Failing(_SettingsConsumer):
        async def getmany(self, timeout_ms: int) -> dict[object, list[object]]:
            if self.position_ >= len(self.records):
                raise KafkaTimeoutError
            return await super().getmany(timeout_ms)

    monkeypatch.setattr(application_settings, "partition_count", _one_partition)
    monkeypatch.setattr(application_settings, "AIOKafkaConsumer", _Failing)
    follower = await _followed(ApplicationSettingsRegistry())
    with pytest.raises(KafkaTimeoutError):
        await asyncio.wait_for(follower, 5)
