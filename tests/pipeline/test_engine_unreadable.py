"""The engine reading past a record aiokafka's consumer cannot decode (a header
name that is not UTF-8), with the raw reads served from memory."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    CorruptRecordException,
    IllegalStateError,
    KafkaError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
)

from stream_app.pipeline import engine as engine_module
from stream_app.pipeline import unreadable
from stream_app.pipeline.checkpoint import TaskFencedError
from stream_app.pipeline.engine import Engine, _Damage
from stream_app.pipeline.tasks import TaskId
from stream_app.pipeline.topics import TopicLayout
from stream_app.pipeline.unreadable import RAW_RECORDS, UNREADABLE, RawRecord
from stream_app.settings import Settings
from tests.pipeline.fakes import IdleKafkaClient, single_record_batches


@pytest.fixture(autouse=True)
def _no_raw_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """read_past's own client, idle: its reads are stood in for below."""
    monkeypatch.setattr(unreadable, "AIOKafkaClient", IdleKafkaClient)


_POISON = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


class _Task:
    """Stands for an active Task: records the raw records it is handed."""

    def __init__(self, tp: TopicPartition) -> None:
        self.id = TaskId("commands", tp.partition)
        self.inputs = [tp]
        self.active = True
        self.checkpoint = None
        self.positions = {tp: 0}
        #: As Task's: the offset after the last record processed.
        self.handled = {tp: 0}
        self.processed: list[int] = []
        self.rejected: list[int] = []
        self.closed = False

    async def handle_raw(self, raw: RawRecord) -> None:
        tp = TopicPartition(raw.topic, raw.partition)
        if raw.offset < self.positions.get(tp, 0):
            return
        (self.processed if raw.readable() else self.rejected).append(raw.offset)
        self.positions[tp] = self.handled[tp] = raw.offset + 1

    def held_bytes(self) -> int:
        return 0

    async def close(self) -> None:
        self.closed = True


class _Consumer:
    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.sought: dict[TopicPartition, int] = {}
        self.log_start = 0
        self.pausing: list[TopicPartition] = []
        self.asked: list[list[TopicPartition]] = []

    def last_stable_offset(self, tp: TopicPartition) -> int | None:
        return None

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.sought[tp] = offset

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.asked.append(list(tps))
        return dict.fromkeys(tps, self.log_start)

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def pause(self, *partitions: TopicPartition) -> None:
        self.pausing.extend(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.pausing)

    def unsubscribe(self) -> None:
        self.assigned = set()

    def subscribe(self, topics: list[str], listener: object) -> None:
        self.subscribed = topics

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return None


async def test_a_record_more_batches_ahead_than_one_pass_reads_is_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll failed on a record further ahead than a raw pass reads. Before,
    the first pass found nothing it could not read and raised aiokafka's error:
    the worker exited, and each restart moved on one pass. Now each pass moves
    the input on and the poll is tried again; the third pass reaches the record
    and rejects it. (Seen live with passes of 64 batches, since made fetches of
    many: a poll of 5,000 records failed on a record 300 single-record batches
    ahead.)"""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    tp = TopicPartition(settings.topics.commands, 0)
    task = _Task(tp)
    engine._tasks[task.id] = task  # type: ignore[assignment]
    engine._task_of[tp] = task  # type: ignore[assignment]
    consumer = _Consumer({tp})
    bad = 2 * RAW_RECORDS + 10
    monkeypatch.setattr(unreadable, "read_batches_at", single_record_batches(bad, bad + 50))

    for sought in (RAW_RECORDS, 2 * RAW_RECORDS):
        await engine._read_past_the_client(consumer, _POISON, engine._rebalances)  # type: ignore[arg-type]
        assert consumer.sought == {tp: sought}
        assert task.positions == {tp: sought}
        assert task.rejected == []
    await engine._read_past_the_client(consumer, _POISON, engine._rebalances)  # type: ignore[arg-type]
    assert task.rejected == [bad]
    assert task.processed == [*range(bad), *range(bad + 1, bad + 50)]  # and on, to the end
    assert consumer.sought == {tp: bad + 50}


async def test_a_pass_that_moves_no_input_raises_what_the_consumer_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every input read to its end and nothing unreadable found: what aiokafka
    cannot decode is not where the inputs are read, and polling again would
    fail the same way for good."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    tp = TopicPartition(settings.topics.commands, 0)
    task = _Task(tp)
    task.positions[tp] = task.handled[tp] = 200
    engine._tasks[task.id] = task  # type: ignore[assignment]
    engine._task_of[tp] = task  # type: ignore[assignment]
    monkeypatch.setattr(unreadable, "read_batches_at", single_record_batches(bad=150, end=200))
    with pytest.raises(UnicodeDecodeError):
        await engine._read_past_the_client(_Consumer({tp}), _POISON, engine._rebalances)  # type: ignore[arg-type]


async def test_a_fenced_task_s_inputs_are_paused_until_the_group_moves_them(
    tmp_path: Path,
) -> None:
    """Dropped as fenced, a task no longer reads its inputs, but the consumer
    still fetches them until the next rebalance: an undecodable record there
    failed every poll, and the raw read, which covers active tasks only, could
    not get past it."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(2, 1_048_588))
    fenced = _Task(TopicPartition(settings.topics.commands, 0))
    consumer = _Consumer({fenced.inputs[0], TopicPartition(settings.topics.commands, 1)})
    engine._consumer = consumer  # type: ignore[assignment]
    engine._tasks[fenced.id] = fenced  # type: ignore[assignment]
    engine._task_of[fenced.inputs[0]] = fenced  # type: ignore[assignment]
    engine._joined = True
    assert engine.ready
    await engine._lose(fenced, TaskFencedError("there is a newer producer"))  # type: ignore[arg-type]
    assert fenced.closed
    assert consumer.pausing == fenced.inputs
    assert engine._task_of == {}
    # Nobody reads those partitions now: /readyz said 200, and with the task
    # gone from the lag metric, the worker looked healthy and idle.
    assert not engine.ready
    assert engine.status()["fenced"] is True
    # Two heartbeats later (6 s), never reassigned: Kafka aborted the task's
    # transaction on its timeout, or this worker left the group unawares. It
    # waited a session timeout (30 s by default), its partitions idle.
    fenced_at = engine._fenced_since
    assert fenced_at is not None
    assert not engine._rejoin_due(fenced_at + 5.9)
    assert engine._rejoin_due(fenced_at + 6.1)
    assert settings.session_timeout_s == 30
    engine._rebalancing = True  # the group is moving it now
    assert not engine._rejoin_due(fenced_at + 60)
    engine._rebalancing = False
    # The worker rejoins, and is not ready until the new assignment (it said
    # 200 while it dropped its tasks and waited for the join, reading nothing).
    await engine._rejoin()
    assert engine.status()["fenced"] is False
    assert engine.status()["rebalancing"] is True
    assert not engine.ready


def _engine_reading(tmp_path: Path, *tps: TopicPartition) -> tuple[Engine, list[_Task]]:
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(2, 1_048_588))
    tasks = [_Task(tp) for tp in tps]
    for task in tasks:
        engine._tasks[task.id] = task  # type: ignore[assignment]
        engine._task_of[task.inputs[0]] = task  # type: ignore[assignment]
    return engine, tasks


async def test_a_position_below_the_log_start_is_read_from_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers down longer than the command topic's retention: the committed
    offset lies before the log's start. The raw read fetched from it, the
    broker refused (OFFSET_OUT_OF_RANGE), and the task restarted at the same
    offset again and again."""
    tp = TopicPartition(Settings().topics.commands, 0)
    engine, [task] = _engine_reading(tmp_path, tp)
    consumer = _Consumer({tp})
    consumer.log_start = 100
    single = single_record_batches(bad=105, end=120)

    async def read_batches_at(
        options: object, tp: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        if offset < 100:
            raise OffsetOutOfRangeError({tp: offset})
        return await single(options, tp, offset)  # type: ignore[operator, no-any-return]

    monkeypatch.setattr(unreadable, "read_batches_at", read_batches_at)
    await engine._read_past_the_client(consumer, _POISON, engine._rebalances)  # type: ignore[arg-type]
    assert task.processed == [*range(100, 105), *range(106, 120)]
    assert task.rejected == [105]
    assert consumer.sought == {tp: 120}


async def test_an_input_the_raw_read_cannot_parse_is_left_to_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the parser's error (an old message format it does not read,
    where aiokafka does) stopped the worker, whichever input held the
    undecodable record."""
    commands = Settings().topics.commands
    old, new = TopicPartition(commands, 0), TopicPartition(commands, 1)
    engine, [old_task, new_task] = _engine_reading(tmp_path, old, new)
    single = single_record_batches(bad=3, end=10)

    async def read_batches_at(
        options: object, tp: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        if tp == old:
            raise unreadable.RecordBatchError(f"{tp}@{offset}: record batch magic 1")
        return await single(options, tp, offset)  # type: ignore[operator, no-any-return]

    monkeypatch.setattr(unreadable, "read_batches_at", read_batches_at)
    consumer = _Consumer({old, new})
    await engine._read_past_the_client(consumer, _POISON, engine._rebalances)  # type: ignore[arg-type]
    assert new_task.rejected == [3]
    assert (old_task.processed, old_task.rejected) == ([], [])
    assert consumer.sought == {old: 0, new: 10}


async def test_a_pass_after_a_rebalance_polls_again_rather_than_raise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebalance that took the engine's lock between the failed poll and the
    pass dropped the tasks: the pass, moving nothing, raised the poll's error
    and stopped the worker, though the failed fetch went with the partitions."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    before = engine._rebalances
    await engine.on_partitions_revoked(set())  # nothing of ours: only the count moves
    await engine._read_past_the_client(_Consumer(set()), _POISON, before)  # type: ignore[arg-type]
    with pytest.raises(UnicodeDecodeError):
        await engine._read_past_the_client(_Consumer(set()), _POISON, engine._rebalances)  # type: ignore[arg-type]


def _unreadable_backlog(start: int, end: int) -> object:
    """A log whose records from ``start`` to ``end`` were each written in a
    batch of its own (a producer with no linger), every one with a header
    name that is not UTF-8."""

    async def read_batches_at(
        options: object, tp: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        assert client.get("client") is not None, "a client per fetch"
        if offset >= end:
            return [], offset
        headers = ((b"\xff\xfe", b"x"),) if offset >= start else ()
        return [RawRecord(tp.topic, tp.partition, offset, 0, b"k", b"{}", headers)], offset + 1

    return read_batches_at


async def test_a_backlog_of_unreadable_batches_is_read_past_in_one_pass_then_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A producer wrote thousands of such records, one per batch. A pass
    stopped after the first, with a client of its own for each fetch, and
    the loop went back to poll without committing: one failed poll, one pass
    and one connection per record, while nothing the worker processed was
    committed, on any partition, until the backlog ended."""
    tp = TopicPartition(Settings().topics.commands, 0)
    engine, [task] = _engine_reading(tmp_path, tp)
    monkeypatch.setattr(unreadable, "read_batches_at", _unreadable_backlog(10, 1_010))
    commits: list[bool] = []

    async def commit(*, due_only: bool) -> None:
        commits.append(due_only)

    monkeypatch.setattr(engine, "_commit", commit)
    made = IdleKafkaClient.made
    consumer = _Consumer({tp})
    await engine._read_past_and_commit(consumer, _POISON, engine._rebalances)  # type: ignore[arg-type]
    assert task.processed == list(range(10))
    assert task.rejected == list(range(10, 1_010))
    assert consumer.sought == {tp: 1_010}
    assert IdleKafkaClient.made - made == 1
    assert IdleKafkaClient.closed == IdleKafkaClient.made
    assert commits == [True]


async def test_a_pass_asks_for_every_input_s_log_start_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each ListOffsets waits behind the consumer's fetch in flight (up to
    half a second): asked per input, a pass over twelve inputs took six
    seconds before it committed anything."""
    commands = Settings().topics.commands
    tps = [TopicPartition(commands, p) for p in range(2)]
    engine, tasks = _engine_reading(tmp_path, *tps)
    monkeypatch.setattr(unreadable, "read_batches_at", single_record_batches(bad=3, end=5))
    consumer = _Consumer(set(tps))
    await engine._read_past_the_client(consumer, _POISON, engine._rebalances)  # type: ignore[arg-type]
    assert consumer.asked == [tps]
    assert [task.rejected for task in tasks] == [[3], [3]]


async def test_a_batch_too_large_to_fetch_is_read_raw_from_the_last_record_processed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command topic whose max.message.bytes is above the consumer's fetch
    size: the broker sends such a batch whole only to the first partition of
    a fetch response; aiokafka, handed its first bytes, raised
    RecordTooLargeError, which stopped the worker (and each worker the
    partition went to after it), and moved its position one past the batch,
    where _pass_skipped followed it. The raw read fetches one partition at a
    time, so the broker sends it whole."""
    tp = TopicPartition(Settings().topics.commands, 0)
    too_large = RecordTooLargeError(
        "There are some messages at [Partition=Offset]: %s=%s whose size is larger than "
        "the fetch size %s and hence cannot be ever returned.",
        tp,
        40,
        2 * 1024 * 1024,
    )
    assert isinstance(too_large, UNREADABLE)  # the engine's loop reads past it
    engine, [task] = _engine_reading(tmp_path, tp)
    task.handled[tp] = 40
    task.positions[tp] = 41
    monkeypatch.setattr(unreadable, "read_batches_at", single_record_batches(bad=-1, end=60))
    consumer = _Consumer({tp})
    await engine._read_past_the_client(consumer, too_large, engine._rebalances)  # type: ignore[arg-type]
    assert task.processed == list(range(40, 60))
    assert consumer.sought == {tp: 60}


async def test_a_pass_that_only_passes_skipped_markers_again_moves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from the last record processed, a pass goes over the transaction
    markers the consumer had passed already: that is no progress, or a pass
    that finds nothing would poll again, and fail again, for ever."""
    tp = TopicPartition(Settings().topics.commands, 0)
    engine, [task] = _engine_reading(tmp_path, tp)
    task.handled[tp] = 40
    task.positions[tp] = 45  # offsets 40-44: markers and aborted records

    async def read_batches_at(
        options: object, tp: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        return [], max(offset, 45)

    monkeypatch.setattr(unreadable, "read_batches_at", read_batches_at)
    with pytest.raises(UnicodeDecodeError):
        await engine._read_past_the_client(_Consumer({tp}), _POISON, engine._rebalances)  # type: ignore[arg-type]
    assert task.positions == {tp: 45}


@pytest.mark.parametrize(("corrupt", "said"), [(1300, "1300"), (None, "1234 or after it")])
async def test_a_corrupt_batch_is_named_with_its_offset_before_the_worker_stops(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    corrupt: int | None,
    said: str,
) -> None:
    """aiokafka names the partition of a batch whose CRC does not match, not
    the offset an operator needs; its position is where the failed fetch
    began, up to 2 MiB of good batches before the corrupt one. The named
    offset was that position: the runbook's reset past "the batch after it"
    skipped good commands unrejected. A raw read finds the batch."""
    tp = TopicPartition(Settings().topics.commands, 3)
    engine, _ = _engine_reading(tmp_path)

    async def read_batches_at(
        options: object, tp: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        if corrupt is not None and offset >= corrupt:
            raise unreadable.CorruptBatchError("CRC mismatch", corrupt)
        if offset >= 1400:
            return [], offset
        return [RawRecord(tp.topic, tp.partition, offset, 0, b"k", b"{}", ())], offset + 11

    monkeypatch.setattr(unreadable, "read_batches_at", read_batches_at)

    class _Positioned(_Consumer):
        async def position(self, tp: TopicPartition) -> int:
            return 1234

    consumer = _Positioned({tp, TopicPartition(tp.topic, 4)})
    with caplog.at_level("ERROR", logger="stream_app.pipeline.engine"):
        await engine._name_the_corrupt_batch(
            consumer,  # type: ignore[arg-type]
            CorruptRecordException(f"Invalid CRC - {tp!r}"),
            _Damage(tp, None),
        )
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"{tp.topic}[3]: the record batch at offset {said} is corrupt")


async def test_a_corrupt_batch_whose_position_cannot_be_had_is_still_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A position that failed (the partition revoked meanwhile) left the
    offset unset: an UnboundLocalError stopped the worker instead of the line
    the runbook looks for."""
    tp = TopicPartition(Settings().topics.commands, 3)
    engine, _ = _engine_reading(tmp_path)

    class _Revoked(_Consumer):
        async def position(self, tp: TopicPartition) -> int:
            raise IllegalStateError("No current assignment for partition")

    with caplog.at_level("ERROR", logger="stream_app.pipeline.engine"):
        await engine._name_the_corrupt_batch(
            _Revoked({tp}),  # type: ignore[arg-type]
            CorruptRecordException(f"Invalid CRC - {tp!r}"),
            _Damage(tp, None),
        )
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"{tp.topic}[3]: the record batch at offset unknown is corrupt")


def _crc_failing_at(corrupt: int, tp: TopicPartition, end: int = 10_000) -> object:
    """A log of single-record batches whose batch at ``corrupt`` of ``tp`` has
    a CRC that does not match: a fetch from below it ends before it (as
    parse_record_batches reads it), a fetch from it raises."""

    async def read_batches_at(
        options: object, at: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        if at == tp and offset >= corrupt:
            raise unreadable.CorruptBatchError(f"{at}@{corrupt}: CRC mismatch", corrupt)
        if offset >= end:
            return [], offset
        return [RawRecord(at.topic, at.partition, offset, 0, b"k", b"{}", ())], offset + 1

    return read_batches_at


def _commits_counted(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    commits: list[bool] = []

    async def commit(*, due_only: bool) -> None:
        commits.append(due_only)

    monkeypatch.setattr(engine, "_commit", commit)
    return commits


async def test_the_records_before_a_corrupt_batch_are_processed_before_the_worker_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka fails the whole fetch that holds a batch whose CRC does not
    match: the records before it in the fetch were never processed, the worker
    stopped at every start, and the runbook's reset past the batch passed them
    unrejected (found by a black-box run: ten commands before the batch lost).
    Now they are read raw and processed; the worker stops once the raw read
    meets the batch, and names it there."""
    tp = TopicPartition(Settings().topics.commands, 3)
    engine, [task] = _engine_reading(tmp_path, tp)
    task.positions = {tp: 1234}
    task.handled = {tp: 1234}
    monkeypatch.setattr(unreadable, "read_batches_at", _crc_failing_at(1300, tp))
    commits = _commits_counted(engine, monkeypatch)
    consumer = _Consumer({tp})
    crc = CorruptRecordException(f"Invalid CRC - {tp!r}")

    with caplog.at_level("WARNING"):
        damage = await engine._read_up_to_damage(consumer, crc, engine._rebalances)  # type: ignore[arg-type]
    assert damage == _Damage(tp, 1300)
    assert task.processed == list(range(1234, 1300))
    assert task.rejected == []
    assert consumer.sought == {tp: 1300}
    assert commits == [True]  # committed as any poll's records are
    assert caplog.records == []  # the stop names the batch, not the raw read


async def test_a_pass_that_moves_the_named_partition_short_of_the_batch_polls_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch further ahead than one pass reads (RAW_RECORDS): the poll is
    tried again, and the next pass goes on from there."""
    tp = TopicPartition(Settings().topics.commands, 3)
    engine, [task] = _engine_reading(tmp_path, tp)
    monkeypatch.setattr(unreadable, "read_batches_at", _crc_failing_at(RAW_RECORDS + 10, tp))
    _commits_counted(engine, monkeypatch)
    consumer = _Consumer({tp})
    crc = CorruptRecordException(f"Invalid CRC - {tp!r}")
    assert await engine._read_up_to_damage(consumer, crc, engine._rebalances) is None  # type: ignore[arg-type]
    assert consumer.sought == {tp: RAW_RECORDS}
    damage = await engine._read_up_to_damage(consumer, crc, engine._rebalances)  # type: ignore[arg-type]
    assert damage == _Damage(tp, RAW_RECORDS + 10)
    assert task.processed == list(range(RAW_RECORDS + 10))


async def test_traffic_on_other_inputs_does_not_keep_a_worker_from_stopping_on_a_corrupt_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another input's new records move every raw pass: counted as moving, the
    worker would poll, fail on the batch and read raw again for as long as
    that partition had traffic, without ever naming the batch."""
    commands = Settings().topics.commands
    corrupt_tp, busy_tp = TopicPartition(commands, 3), TopicPartition(commands, 4)
    engine, [corrupt_task, busy_task] = _engine_reading(tmp_path, corrupt_tp, busy_tp)
    corrupt_task.positions = {corrupt_tp: 1300}
    corrupt_task.handled = {corrupt_tp: 1300}
    failing = _crc_failing_at(1300, corrupt_tp, end=50)
    monkeypatch.setattr(unreadable, "read_batches_at", failing)
    _commits_counted(engine, monkeypatch)
    consumer = _Consumer({corrupt_tp, busy_tp})
    crc = CorruptRecordException(f"Invalid CRC - {corrupt_tp!r}")
    damage = await engine._read_up_to_damage(consumer, crc, engine._rebalances)  # type: ignore[arg-type]
    assert damage == _Damage(corrupt_tp, 1300)
    assert busy_task.processed == list(range(50))  # read and processed all the same
    assert consumer.sought == {corrupt_tp: 1300, busy_tp: 50}


async def test_damage_aiokafka_names_no_partition_of_is_found_by_the_raw_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch whose length is damaged (zeroed): aiokafka's error ("less than
    the minimum record overhead") names no partition. The worker read nothing
    raw and stopped with a bare traceback, no partition or offset for the
    operator. The raw pass meets the damage on whichever input holds it."""
    commands = Settings().topics.commands
    quiet, damaged = TopicPartition(commands, 0), TopicPartition(commands, 1)
    engine, [quiet_task, damaged_task] = _engine_reading(tmp_path, quiet, damaged)
    monkeypatch.setattr(unreadable, "read_batches_at", _crc_failing_at(40, damaged, end=60))
    _commits_counted(engine, monkeypatch)
    consumer = _Consumer({quiet, damaged})
    overhead = CorruptRecordException("Record size is less than the minimum record overhead (14)")
    damage = await engine._read_up_to_damage(consumer, overhead, engine._rebalances)  # type: ignore[arg-type]
    assert damage == _Damage(damaged, 40)
    assert damaged_task.processed == list(range(40))
    assert quiet_task.processed == list(range(60))

    damage = await engine._read_up_to_damage(consumer, overhead, engine._rebalances)  # type: ignore[arg-type]
    assert damage == _Damage(damaged, 40)  # met again, first at the position
    # No damage there after all: read on, then nothing met and nothing moved.
    monkeypatch.setattr(unreadable, "read_batches_at", _crc_failing_at(10_000, damaged, end=60))
    assert await engine._read_up_to_damage(consumer, overhead, engine._rebalances) is None  # type: ignore[arg-type]
    assert damaged_task.processed == list(range(60))
    damage = await engine._read_up_to_damage(consumer, overhead, engine._rebalances)  # type: ignore[arg-type]
    assert damage == _Damage(None, None)
    with caplog.at_level("ERROR", logger="stream_app.pipeline.engine"):
        await engine._name_the_corrupt_batch(consumer, overhead, damage)  # type: ignore[arg-type]
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("a record batch is corrupt ([Error 2] CorruptRecordException: Record")


async def test_a_batch_aiokafka_misreads_although_its_crc_matches_is_read_past(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hand-built record whose attributes byte is 0x80 or more: Kafka stores
    it (it ignores the byte), aiokafka's reader fails with an error that names
    no partition, and the worker stopped for good; the raw read reads it. A
    pass that moves and meets no damage polls again, as for a record read
    past."""
    tp = TopicPartition(Settings().topics.commands, 0)
    engine, [task] = _engine_reading(tmp_path, tp)
    monkeypatch.setattr(unreadable, "read_batches_at", _crc_failing_at(10_000, tp, end=30))
    _commits_counted(engine, monkeypatch)
    misread = CorruptRecordException("Can't read 11 bytes from pos 70")
    assert await engine._read_up_to_damage(_Consumer({tp}), misread, engine._rebalances) is None  # type: ignore[arg-type]
    assert task.processed == list(range(30))


class _Answered(_Consumer):
    """A consumer Kafka last answered for each partition at ``answered_ms``."""

    def __init__(self, answered_ms: dict[TopicPartition, float]) -> None:
        super().__init__(set(answered_ms))
        self.answered_ms = answered_ms

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return int(self.answered_ms[tp])


class _Offsets:
    """Stands for the engine's GroupOffsets: its kept client."""

    async def client(self) -> object:
        return "the kept client"


async def test_an_input_kafka_answers_corrupt_message_stops_the_worker_rather_than_stall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch whose length is damaged in the broker's log: Kafka answers a
    fetch at it CORRUPT_MESSAGE, and aiokafka's consumer only warns and
    fetches there again, for good. The worker that stopped on the batch left
    the group's offset there: every start after it stalled silently, Ready.
    An input Kafka has not answered for a while, as it answers the others, is
    now asked at its position; that answer stops the worker."""
    commands = Settings().topics.commands
    stuck, fine = TopicPartition(commands, 0), TopicPartition(commands, 1)
    engine, [stuck_task, _] = _engine_reading(tmp_path, stuck, fine)
    stuck_task.positions = {stuck: 10}
    monkeypatch.setattr(engine, "_group_offsets", _Offsets)
    now_ms = time.time() * 1000
    asked: list[tuple[object, TopicPartition, int]] = []

    async def corrupt_message_at(client: object, tp: TopicPartition, offset: int) -> bool:
        asked.append((client, tp, offset))
        return True

    monkeypatch.setattr(engine_module, "corrupt_message_at", corrupt_message_at)
    # Answered lately, both: nothing to ask.
    await engine._stop_on_unanswered_damage(_Answered({stuck: now_ms, fine: now_ms}))  # type: ignore[arg-type]
    # Neither answered for a minute (Kafka gone): not this.
    old = now_ms - 60_000
    await engine._stop_on_unanswered_damage(_Answered({stuck: old, fine: old}))  # type: ignore[arg-type]
    assert asked == []

    consumer = _Answered({stuck: old, fine: now_ms})
    with (
        caplog.at_level("ERROR", logger="stream_app.pipeline.engine"),
        pytest.raises(CorruptRecordException, match="CORRUPT_MESSAGE"),
    ):
        await engine._stop_on_unanswered_damage(consumer)  # type: ignore[arg-type]
    assert asked == [("the kept client", stuck, 10)]
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"{commands}[0]: the record batch at offset 10 is corrupt")


async def test_an_input_unanswered_for_another_reason_is_left_to_the_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inputs whose leader hangs or is gone, or whose records the consumer
    holds (a backlog's): asked at once, under one bound (one after another,
    each up to 5 s, they held the loop, its polls and commits, 20 s at every
    look for four such inputs), and not again until they have gone
    unanswered another while. A stop ends the look at once."""
    commands = Settings().topics.commands
    hung, gone, held, fine = (TopicPartition(commands, p) for p in range(4))
    engine, _ = _engine_reading(tmp_path, hung, gone, held, fine)
    monkeypatch.setattr(engine, "_group_offsets", _Offsets)
    now_ms = time.time() * 1000
    asked: list[TopicPartition] = []

    async def corrupt_message_at(client: object, tp: TopicPartition, offset: int) -> bool:
        asked.append(tp)
        if tp == gone:
            raise KafkaError(f"no leader known for {tp}")
        if tp == hung:
            await asyncio.Event().wait()
        return False

    monkeypatch.setattr(engine_module, "corrupt_message_at", corrupt_message_at)
    monkeypatch.setattr(engine_module, "_CORRUPT_BATCH_SEARCH_S", 0.05)
    old = now_ms - 60_000
    consumer = _Answered({hung: old, gone: old, held: old, fine: now_ms})
    await engine._stop_on_unanswered_damage(consumer)  # type: ignore[arg-type]
    assert sorted(asked) == [hung, gone, held]
    await engine._stop_on_unanswered_damage(consumer)  # type: ignore[arg-type]
    assert sorted(asked) == [hung, gone, held]  # not asked again so soon

    monkeypatch.setattr(engine_module, "_CORRUPT_BATCH_SEARCH_S", 3600.0)
    engine._asked_raw.clear()
    engine.stop()
    await engine._stop_on_unanswered_damage(consumer)  # not the hour: the stop ends it
