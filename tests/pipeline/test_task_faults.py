"""What a task does when processing a record fails: a bug in the processor
rejects that record; a store that cannot be read is no fault of the record,
so the task is restarted and reads it again. The engine's raw read past the
client, where a task that fails is restarted like anywhere else. And a task's
close cancelled while its producer stops."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from stream_app import json
from stream_app.domain import ApplicationSettings
from stream_app.errors import StoreError, StreamAppError
from stream_app.pipeline import engine as engine_module
from stream_app.pipeline import tasks as tasks_module
from stream_app.pipeline import unreadable
from stream_app.pipeline.checkpoint import TaskFencedError
from stream_app.pipeline.engine import Engine
from stream_app.pipeline.processor import (
    CommandProcessor,
    Limits,
    Metrics,
    Outgoing,
    PartitionSequenceAllocator,
    SourceRecord,
)
from stream_app.pipeline.store import PartitionStore, RocksDBResources
from stream_app.pipeline.tasks import TRANSACTION_BYTES, Stage, Task, TaskId
from stream_app.pipeline.topics import TopicLayout, profile_topic, rekey_topic
from stream_app.pipeline.unreadable import RawRecord
from stream_app.settings import RocksDBSettings, Settings
from tests.pipeline.fakes import IdleKafkaClient, single_record_batches


class _Checkpoint:
    """Stands for the task's open transaction: what it was given."""

    def __init__(self) -> None:
        self.sent: list[Outgoing] = []
        self.offsets: list[int] = []

    def add(self, out: Outgoing) -> bool:
        self.sent.append(out)
        return True

    async def send(self, out: Outgoing) -> None:
        self.sent.append(out)

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        self.offsets.append(offset)


class _Record:
    def __init__(self, topic: str, offset: int) -> None:
        self.topic = topic
        self.partition = 0
        self.offset = offset
        self.timestamp = 1_764_000_000_000
        self.key = b"cart-1"
        self.value = b"{}"
        self.headers: tuple[Any, ...] = ()


def _make_task(
    tmp_path: Path,
    process: Callable[[SourceRecord], list[Outgoing]],
    *,
    inputs: tuple[str, ...] | None = None,
    max_record_bytes: int = 1_048_588,
    metrics: Metrics | None = None,
) -> Task:
    """A real Task of partition 0 of stage 1 with no stores, ``process`` as its
    processor (its inputs the command topic unless given)."""
    settings = Settings(data_dir=tmp_path)
    stage = Stage(
        "commands",
        inputs or (settings.topics.commands,),
        (),
        lambda _p, _o: process,
        commands=True,
    )
    task = Task(
        stage,
        0,
        settings=settings,
        changelogs={},
        state_dir=tmp_path,
        resources=RocksDBResources(RocksDBSettings()),
        commit_offsets=lambda offsets: None,
        limits=Limits(),
        max_record_bytes=max_record_bytes,
        metrics=metrics,
    )
    task.process = stage.build(0, {})
    return task


def _task(tmp_path: Path, failure: Exception) -> tuple[Task, _Checkpoint]:
    def process(record: SourceRecord) -> list[Outgoing]:
        raise failure

    task = _make_task(tmp_path, process)
    checkpoint = _Checkpoint()
    task.checkpoint = checkpoint  # type: ignore[assignment]
    return task, checkpoint


async def test_a_store_that_cannot_be_read_fails_the_task_not_the_record(tmp_path: Path) -> None:
    """Before, a RocksDB read error in the processor was taken for a bug in
    it: the record, a valid command, was rejected as INTERNAL_ERROR for good."""
    task, checkpoint = _task(tmp_path, StoreError("cannot read the store at x: IO error"))
    with pytest.raises(StoreError):
        await task.handle_many([_Record(task.inputs[0].topic, 5)])
    assert checkpoint.sent == []
    assert checkpoint.offsets == []
    assert task.positions == {}


async def test_a_bug_in_the_processor_rejects_that_record_and_goes_on(tmp_path: Path) -> None:
    task, checkpoint = _task(tmp_path, RuntimeError("a bug, say"))
    await task.handle_many([_Record(task.inputs[0].topic, 5)])
    [rejection] = checkpoint.sent
    assert rejection.topic == task.settings.topics.rejected
    assert b"INTERNAL_ERROR" in rejection.value
    assert checkpoint.offsets == [5]


async def test_a_bug_in_stage_1_counts_its_record_as_a_rejected_command(tmp_path: Path) -> None:
    """The processor failed before it counted the record: stream_app_commands_total
    left it out, while the rejections counted it."""
    task, _ = _task(tmp_path, RuntimeError("a bug, say"))
    await task.handle_many([_Record(task.inputs[0].topic, 5)])
    assert task.metrics.commands == {("unknown", "rejected"): 1}
    assert task.metrics.rejections == {"INTERNAL_ERROR": 1}


async def test_a_re_keyed_command_whose_outputs_are_refused_is_rejected_where_it_arrived(
    tmp_path: Path,
) -> None:
    """A command applied, its close too large for the topics (a limit raised
    above theirs): its rejection named the re-key topic's position, where the
    purger deletes it, and held its integrationId as key; the metrics counted
    it applied and its close emitted, and a rejection too."""
    settings = Settings(data_dir=tmp_path)
    rekeyed = rekey_topic(settings)
    metrics = Metrics()
    processor = CommandProcessor(
        topics=settings.topics,
        rekey_topic=rekeyed,
        profile_topic=profile_topic(settings),
        sessions={},
        allocator=PartitionSequenceAllocator({}, 1),
        settings_for=lambda _app: ApplicationSettings(),
        default_application_id=1,
        metrics=metrics,
    )
    task = _make_task(
        tmp_path,
        processor.process,
        inputs=(settings.topics.commands, rekeyed),
        max_record_bytes=600,
        metrics=metrics,
    )
    checkpoint = _Checkpoint()
    task.checkpoint = checkpoint  # type: ignore[assignment]
    close = json.dumps({"type": "update", "integrationId": "s1", "session": {"state": "closed"}})
    arrived = SourceRecord(settings.topics.commands, 4, 1234, 1_764_000_000_000, b"order-77", close)
    record = _Record(rekeyed, 9)
    record.key, record.value, record.headers = b"s1", close, (arrived.origin_header(),)

    await task.handle_many([record])

    [rejection] = checkpoint.sent
    assert rejection.topic == settings.topics.rejected
    assert rejection.key == b"order-77"
    doc = json.loads(rejection.value)
    assert doc["reason"] == "LIMIT_EXCEEDED"
    assert doc["source"] == {"topic": settings.topics.commands, "partition": 4, "offset": 1234}
    assert {series: n for series, n in metrics.commands.items() if n} == {("update", "rejected"): 1}
    assert (metrics.applied, metrics.emitted, metrics.rejections) == (
        0,
        {},
        {"LIMIT_EXCEEDED": 1},
    )


async def test_failures_of_one_type_log_one_traceback_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug that every command of a type meets logged a traceback per record,
    thousands a second. Each record is still rejected and counted."""
    task, checkpoint = _task(tmp_path, RuntimeError("a bug, say"))
    now = [100.0]
    task.metrics.told.clock = lambda: now[0]
    with caplog.at_level("ERROR", logger="stream_app.pipeline.tasks"):
        await task.handle_many([_Record(task.inputs[0].topic, n) for n in range(50)])
        now[0] += 10
        await task.handle_many([_Record(task.inputs[0].topic, 50)])
    lines = [r for r in caplog.records if "processing failed" in r.getMessage()]
    assert [r.getMessage() for r in lines] == [
        f"{task.inputs[0].topic}[0]@0: processing failed",
        f"{task.inputs[0].topic}[0]@50: processing failed "
        "(49 more records failed with RuntimeError since the last such line)",
    ]
    assert all(r.exc_info is not None for r in lines)
    assert len(checkpoint.sent) == 51
    assert task.metrics.rejections == {"INTERNAL_ERROR": 51}


async def test_two_bugs_of_one_exception_type_each_log_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Held back by exception type alone, a rare bug's traceback never showed
    while a frequent one of the same type filled each interval."""

    def process(record: SourceRecord) -> list[Outgoing]:
        if record.offset % 100:
            raise KeyError("frequent")
        raise KeyError("rare")

    task = _make_task(tmp_path, process)
    task.checkpoint = _Checkpoint()  # type: ignore[assignment]
    with caplog.at_level("ERROR", logger="stream_app.pipeline.tasks"):
        await task.handle_many([_Record(task.inputs[0].topic, n) for n in range(1, 201)])
    lines = [r for r in caplog.records if "processing failed" in r.getMessage()]
    assert [r.getMessage().split(":")[0] for r in lines] == [
        f"{task.inputs[0].topic}[0]@1",
        f"{task.inputs[0].topic}[0]@100",
    ]


async def test_a_re_keyed_command_s_failure_names_where_it_first_arrived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Its rejection names where it first arrived; its traceback was logged at
    the re-key topic's position alone, which the runbook could not find."""
    task, _ = _task(tmp_path, RuntimeError("a bug, say"))
    arrived = SourceRecord(task.settings.topics.commands, 4, 1234, 1_764_000_000_000, b"k", b"{}")
    record = _Record(rekey_topic(task.settings), 9)
    record.headers = (arrived.origin_header(),)
    with caplog.at_level("ERROR", logger="stream_app.pipeline.tasks"):
        await task.handle_many([record])
    [line] = [r.getMessage() for r in caplog.records if "processing failed" in r.getMessage()]
    assert line == (
        f"{record.topic}[0]@9 (first arrived at {task.settings.topics.commands}[4]@1234): "
        "processing failed"
    )


class _FillingTask:
    """Stands for an active Task each of whose records holds 3/10 of
    TRANSACTION_BYTES: it takes records as Task does, until it holds its limit."""

    EACH = TRANSACTION_BYTES * 3 // 10

    def __init__(self, tp: TopicPartition) -> None:
        self.id = TaskId("commands", tp.partition)
        self.inputs = [tp]
        self.active = True
        self.checkpoint: object | None = None
        self.held = 0
        self.calls: list[list[int]] = []
        self.limits: list[int] = []
        self.commits: list[int] = []

    async def handle_many(self, records: list[Any], limit: int = TRANSACTION_BYTES) -> int:
        self.calls.append([r.offset for r in records])
        self.limits.append(limit)
        self.checkpoint = object()
        for taken, _ in enumerate(records, 1):
            self.held += self.EACH
            if self.held >= limit:
                return taken
        return len(records)

    def held_bytes(self) -> int:
        return self.held

    def commit_due(self, now: float) -> bool:
        return False  # by its bytes: the engine's sum over its tasks

    def begin_commit(self) -> Any:
        self.commits.append(self.calls[-1][0])
        self.checkpoint, self.held = None, 0
        return asyncio.sleep(0)


def _engine_of_filling(tmp_path: Path, partitions: int) -> tuple[Engine, list[_FillingTask]]:
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(partitions, 1_048_588))
    tasks = [
        _FillingTask(TopicPartition(engine.settings.topics.commands, p)) for p in range(partitions)
    ]
    for task in tasks:
        engine._tasks[task.id] = task  # type: ignore[assignment]
        engine._task_of[task.inputs[0]] = task  # type: ignore[assignment]
    return engine, tasks


async def test_the_engine_commits_a_full_transaction_before_the_rest_of_the_batch(
    tmp_path: Path,
) -> None:
    engine, [task] = _engine_of_filling(tmp_path, 1)
    tp = task.inputs[0]
    await engine._process({tp: [_Record(tp.topic, n) for n in range(10)]})
    assert task.calls == [list(range(10)), [4, 5, 6, 7, 8, 9], [8, 9]]
    assert task.commits == [0, 4]  # a round after each full transaction, before the rest
    assert task.held == 2 * _FillingTask.EACH
    await engine._finish_round()


async def test_the_tasks_of_a_worker_share_one_byte_bound(tmp_path: Path) -> None:
    """Twelve tasks each held up to 16 MiB, and as much again in the round in
    flight: a backlog of large closes on every partition could hold 384 MiB."""
    engine, [first, second] = _engine_of_filling(tmp_path, 2)
    tp0, tp1 = first.inputs[0], second.inputs[0]
    await engine._process(
        {
            tp0: [_Record(tp0.topic, n) for n in range(5)],
            tp1: [_Record(tp1.topic, n) for n in range(5)],
        }
    )
    assert first.calls == [[0, 1, 2, 3, 4], [4]]
    # The second is left what the first holds after its round: 3/10 of it.
    assert second.limits[0] == TRANSACTION_BYTES - _FillingTask.EACH
    assert second.calls == [[0, 1, 2, 3, 4], [3, 4]]
    assert first.commits == [0, 4]  # sealed with the second's round too
    assert second.commits == [0]
    await engine._finish_round()


class _RawTask:
    """Stands for an active Task in a raw read: fails, or takes what it is handed."""

    def __init__(self, tp: TopicPartition, failure: Exception | None) -> None:
        self.id = TaskId("commands", tp.partition)
        self.stage = "commands"  # what _begin_start is given
        self.partition = tp.partition
        self.inputs = [tp]
        self.active = True
        self.checkpoint = None
        self.positions = {tp: 0}
        #: As Task's: the offset after the last record processed.
        self.handled = {tp: 0}
        self.failure = failure
        self.processed: list[int] = []

    async def handle_raw(self, raw: RawRecord) -> None:
        if self.failure is not None:
            raise self.failure
        self.processed.append(raw.offset)
        tp = TopicPartition(raw.topic, raw.partition)
        self.positions[tp] = self.handled[tp] = raw.offset + 1

    def held_bytes(self) -> int:
        return 0

    async def close(self) -> None:
        self.active = False


def _engine_owning(tmp_path: Path, *tasks: _RawTask) -> Engine:
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(len(tasks), 1_048_588))
    for task in tasks:
        engine._tasks[task.id] = task  # type: ignore[assignment]
        engine._task_of[task.inputs[0]] = task  # type: ignore[assignment]
    return engine


class _Consumer:
    def __init__(self) -> None:
        self.sought: dict[TopicPartition, int] = {}
        self.log_start = 0

    def last_stable_offset(self, tp: TopicPartition) -> None:
        return None

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.sought[tp] = offset

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, self.log_start)


async def _raw_pass(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, *, end: int, unreadable_at: int
) -> _Consumer:
    """One raw pass of ``engine`` past the client over inputs holding records
    0 to ``end`` - 1, the one at ``unreadable_at`` with a header name that is
    not UTF-8; returns the consumer it seeks."""

    monkeypatch.setattr(
        unreadable, "read_batches_at", single_record_batches(bad=unreadable_at, end=end)
    )
    monkeypatch.setattr(unreadable, "AIOKafkaClient", IdleKafkaClient)
    consumer = _Consumer()
    await engine._read_past_the_client(
        consumer, UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x"), engine._rebalances
    )  # type: ignore[arg-type]
    return consumer


async def test_a_task_that_fails_in_a_raw_read_is_restarted_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, an error of one task in the raw read (its producer unable to
    reach Kafka, say) left the pass, and the main loop, which stopped the
    worker: committing, on the way, the records of that task it had already
    processed in the pass, without their offsets."""
    commands = Settings().topics.commands
    failing = _RawTask(TopicPartition(commands, 0), KafkaConnectionError("down"))
    working = _RawTask(TopicPartition(commands, 1), None)
    engine = _engine_owning(tmp_path, failing, working)
    restarted: list[object] = []

    async def restart(task: object, exc: BaseException) -> None:
        restarted.append(task)

    monkeypatch.setattr(engine, "_restart", restart)
    consumer = await _raw_pass(engine, monkeypatch, end=3, unreadable_at=2)
    assert restarted == [failing]
    assert working.processed == [0, 1, 2]
    assert consumer.sought == {working.inputs[0]: 3}


class _FillingRawTask(_RawTask):
    """Its transaction is full after every second record handed to it."""

    def __init__(self, tp: TopicPartition, fill: int = TRANSACTION_BYTES) -> None:
        super().__init__(tp, None)
        self.checkpoint: object | None = None
        self.commits: list[int] = []
        self.fill = fill

    async def handle_raw(self, raw: RawRecord) -> None:
        await super().handle_raw(raw)
        self.checkpoint = object()

    def held_bytes(self) -> int:
        full = self.checkpoint is not None and len(self.processed) % 2 == 0
        return self.fill if full else 0

    def commit_due(self, now: float) -> bool:
        return False  # by its bytes: the engine's sum over its tasks

    def begin_commit(self) -> Any:
        self.commits.append(self.processed[-1])
        self.checkpoint = None
        return asyncio.sleep(0)


async def test_a_raw_read_commits_a_full_transaction_before_it_reads_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass reads up to 5,000 records per input into the task's transaction,
    past its byte bound: a backlog of large closes behind an unreadable record
    held them all until the pass ended."""
    commands = Settings().topics.commands
    task = _FillingRawTask(TopicPartition(commands, 0))
    engine = _engine_owning(tmp_path, task)
    consumer = await _raw_pass(engine, monkeypatch, end=6, unreadable_at=0)
    await engine._finish_round()
    assert task.processed == [0, 1, 2, 3, 4, 5]
    assert task.commits == [1, 3, 5]  # a round after each full transaction, in the pass
    assert consumer.sought == {task.inputs[0]: 6}


class _HoldingRawTask(_RawTask):
    """Stands for a task whose open transaction holds half of TRANSACTION_BYTES."""

    def held_bytes(self) -> int:
        return TRANSACTION_BYTES // 2

    def commit_due(self, now: float) -> bool:
        return False


async def test_a_raw_read_bounds_the_bytes_of_all_the_tasks_transactions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the main loop does: a task whose own transaction holds half the
    bound fills it with another's."""
    commands = Settings().topics.commands
    task = _FillingRawTask(TopicPartition(commands, 0), fill=TRANSACTION_BYTES // 2)
    other = _HoldingRawTask(TopicPartition(commands, 1), None)
    engine = _engine_owning(tmp_path, task, other)
    await _raw_pass(engine, monkeypatch, end=6, unreadable_at=0)
    await engine._finish_round()
    assert task.commits == [1, 3, 5]
    assert other.processed == [0, 1, 2, 3, 4, 5]


class _UnreadableStoreTask(_RawTask):
    async def handle_many(self, records: object, limit: int) -> None:
        raise StoreError("cannot read the store at x: IO error")


async def test_the_engine_restarts_a_task_whose_store_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The task is started again from its committed offsets: its store opened
    anew (and restored, if RocksDB finds it corrupt), its records read again."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    task = _UnreadableStoreTask(TopicPartition(settings.topics.commands, 0), None)
    engine._tasks[task.id] = task  # type: ignore[assignment]
    engine._task_of[task.inputs[0]] = task  # type: ignore[assignment]
    restarted: list[tuple[object, BaseException]] = []

    async def restart(task: object, exc: BaseException) -> None:
        restarted.append((task, exc))

    monkeypatch.setattr(engine, "_restart", restart)
    await engine._process({task.inputs[0]: [_Record(task.inputs[0].topic, 0)]})
    [(which, why)] = restarted
    assert which is task
    assert isinstance(why, StoreError)


async def test_a_raw_read_skips_a_task_dropped_during_the_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restarting one task waits for the commit round in flight, which can end
    by dropping another (fenced, say). The pass used to read that one too:
    closed, its stores closed, its producer gone."""
    commands = Settings().topics.commands
    failing = _RawTask(TopicPartition(commands, 0), KafkaConnectionError("down"))
    dropped = _RawTask(TopicPartition(commands, 1), None)
    engine = _engine_owning(tmp_path, failing, dropped)

    async def restart(task: object, exc: BaseException) -> None:
        # The round that _drop waits for ends: ``dropped`` was fenced in it.
        dropped.active = False
        del engine._tasks[dropped.id]  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "_restart", restart)

    async def read_batches_at(
        options: object, tp: TopicPartition, offset: int
    ) -> tuple[list[RawRecord], int]:
        return (
            ([RawRecord(tp.topic, tp.partition, 0, 0, b"k", b"{}")], 1)
            if offset == 0
            else ([], offset)
        )

    monkeypatch.setattr(unreadable, "read_batches_at", read_batches_at)
    await engine._read_past_the_client(
        _Consumer(), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "x"), engine._rebalances
    )  # type: ignore[arg-type]
    assert dropped.processed == []


async def test_a_task_dropped_already_is_not_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its failure reported after it was dropped (as fenced): starting it
    again would take its transactional id from the worker that owns it now."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    gone = _RawTask(TopicPartition(settings.topics.commands, 0), None)
    started: list[object] = []
    monkeypatch.setattr(engine, "_begin_start", lambda *args: started.append(args))
    await engine._restart(gone, StoreError("cannot read the store at x"))  # type: ignore[arg-type]
    assert started == []


async def test_a_task_the_round_in_flight_finds_fenced_is_not_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task failed (a store read, a raw fetch) while the commit round holding
    its previous transaction was in flight; the round then learnt that another
    worker had fenced it. Its ownership was judged before the round settled,
    so the task was started again: its new producer fenced the new owner."""
    commands = Settings().topics.commands
    task = _RawTask(TopicPartition(commands, 0), None)
    engine = _engine_owning(tmp_path, task)
    rounds = [True]

    async def finish_round() -> None:
        if rounds.pop() if rounds else False:
            await engine._lose(task, TaskFencedError("fenced"))

    started: list[object] = []
    monkeypatch.setattr(engine, "_finish_round", finish_round)
    monkeypatch.setattr(engine, "_begin_start", lambda *args, **kwargs: started.append(args))
    await engine._restart(task, StoreError("cannot read the store at x"))  # type: ignore[arg-type]
    assert started == []
    assert task.id not in engine._tasks


async def test_a_failure_that_repeats_for_hours_keeps_its_backoff_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The delay's exponent grew with every restart a minute apart or less:
    2.0 ** 1024 overflowed about 3.4 hours into a failure that repeats every
    10 s, and the OverflowError stopped the worker."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    now = [1000.0]
    monkeypatch.setattr(engine_module.time, "monotonic", lambda: now[0])
    task_id = TaskId("commands", 0)
    for _ in range(1100):
        delay = engine._restart_delay(task_id)
        now[0] += 12.0
    assert delay == 10.0


class _SlowToStop:
    """Stops as aiokafka's producer and consumer do: marked closed at once, so
    a second ``stop`` does nothing, then its work (flush, connections)."""

    def __init__(self) -> None:
        self.closed = False
        self.stopped = False
        self.stopping = asyncio.Event()
        self.release = asyncio.Event()

    async def stop(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stopping.set()
        await self.release.wait()
        self.stopped = True


async def test_a_task_closed_and_cancelled_during_its_producer_s_stop_still_stops_it(
    tmp_path: Path,
) -> None:
    """A task's close (its start failed, say) cancelled as its producer stops,
    by a revocation or the worker's stop: before, the stop was cut short and,
    the producer marked closed, never finished; its sender and connections
    stayed open for the life of the process. Now the stop goes on."""
    task = _make_task(tmp_path, lambda _record: [])
    producer = _SlowToStop()
    task.producer = producer  # type: ignore[assignment]
    closing = asyncio.ensure_future(task.close())
    await producer.stopping.wait()
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert not producer.stopped
    producer.release.set()
    for _ in range(3):
        await asyncio.sleep(0)
    assert producer.stopped


async def test_a_task_restarted_again_and_again_waits_longer_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure that repeats (a disk that cannot be read) restarted its task
    at once, every time: a new producer fencing the last, a new restore, in a
    tight loop. Restarts within a minute of the last now wait 0.5 s, doubling,
    at most 10 s; after a quiet minute the next is immediate again."""
    commands = Settings().topics.commands
    task = _RawTask(TopicPartition(commands, 0), None)
    engine = _engine_owning(tmp_path, task)
    now = [1000.0]
    monkeypatch.setattr(engine_module.time, "monotonic", lambda: now[0])
    delays: list[float] = []

    def begin_start(stage: object, partition: int, *, delay: float = 0.0) -> None:
        delays.append(delay)
        engine._tasks[task.id] = task  # type: ignore[assignment]  # started again

    monkeypatch.setattr(engine, "_begin_start", begin_start)
    for _ in range(7):
        await engine._restart(task, StoreError("cannot read the store at x"))  # type: ignore[arg-type]
        now[0] += 5.0
    now[0] += 60.0
    await engine._restart(task, StoreError("cannot read the store at x"))  # type: ignore[arg-type]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 0.0]


async def test_a_delayed_start_waits_before_it_fences_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._consumer = object()  # type: ignore[assignment] - _start only checks it is set
    steps: list[str] = []

    async def sleep(seconds: float) -> None:
        steps.append(f"sleep {seconds}")

    class _Starting:
        id = TaskId("commands", 0)
        inputs: tuple[TopicPartition, ...] = ()

        async def start(self) -> int:
            steps.append("start")
            raise RuntimeError("stop here")

        async def close(self) -> None:
            pass

    monkeypatch.setattr(engine_module.asyncio, "sleep", sleep)
    await engine._start(_Starting(), 2.0)  # type: ignore[arg-type]
    assert steps == ["sleep 2.0", "start"]


class _CompactedChangelog:
    """A consumer of one changelog partition of 100 offsets of which compaction
    left every tenth record, fetched five at a time."""

    kept: ClassVar = list(range(0, 100, 10))

    def __init__(self, **options: Any) -> None:
        self.at = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, tps: list[TopicPartition]) -> None:
        self.tp = tps[0]

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 100)

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.at = offset

    async def position(self, tp: TopicPartition) -> int:
        return self.at

    async def getmany(self, *tps: TopicPartition, **kwargs: Any) -> dict[TopicPartition, list[Any]]:
        offsets = [o for o in self.kept if o >= self.at][:5]
        self.at = offsets[-1] + 1 if offsets and offsets[-1] != self.kept[-1] else 100
        records = [_ChangelogRecord(b"k%d" % o, b"v", o) for o in offsets]
        return {self.tp: records}


class _ChangelogRecord:
    def __init__(self, key: bytes, value: bytes, offset: int) -> None:
        self.key, self.value, self.offset = key, value, offset


async def test_the_restore_counts_down_what_is_left_of_a_compacted_changelog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stream_app_restore_remaining counted the records fetched down from the
    offsets to restore: on a compacted changelog it stayed near the start's
    count until the end, then fell to 0."""
    monkeypatch.setattr(tasks_module, "AIOKafkaConsumer", _CompactedChangelog)
    store = PartitionStore(tmp_path / "sessions" / "0", RocksDBResources(RocksDBSettings()))
    reported: list[tuple[int, int]] = []
    try:
        restored = await tasks_module.restore(
            Settings(),
            {"sessions": store},
            {"sessions": TopicPartition("app-sessions-changelog", 0)},
            "commands[0]",
            lambda fetched, left: reported.append((fetched, left)),
        )
    finally:
        store.close()
    assert restored == 10
    assert reported == [(5, 59), (5, 0)]


class _EmptyControlBatchAt30(_CompactedChangelog):
    """The same, with a control batch of no records at offset 30, on which
    aiokafka's getmany fails (read_committed) until sought past it."""

    async def getmany(self, *tps: TopicPartition, **kwargs: Any) -> dict[TopicPartition, list[Any]]:
        if self.at <= 30 < self.at + 50:
            raise KafkaError("Control batch did not contain any records")
        return await super().getmany(*tps, **kwargs)


async def test_a_restore_passes_a_control_batch_of_no_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kafka's log cleaner leaves such a batch in a compacted transactional
    topic, which every changelog is. aiokafka's consumer fails on it, and
    the task's start failed at every attempt: the partition never restored.
    What the consumer cannot read is read raw, up to the changelog's end."""
    monkeypatch.setattr(tasks_module, "AIOKafkaConsumer", _EmptyControlBatchAt30)
    monkeypatch.setattr(unreadable, "AIOKafkaClient", IdleKafkaClient)
    tp = TopicPartition("app-sessions-changelog", 0)

    async def read_batches_at(
        options: object, at: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        kept = [o for o in _CompactedChangelog.kept if o >= offset and o != 30][:3]
        if not kept:
            return [], 100
        records = [RawRecord(at.topic, at.partition, o, 0, b"k%d" % o, b"v") for o in kept]
        return records, kept[-1] + 1

    monkeypatch.setattr(unreadable, "read_batches_at", read_batches_at)
    store = PartitionStore(tmp_path / "sessions" / "0", RocksDBResources(RocksDBSettings()))
    try:
        restored = await tasks_module.restore(
            Settings(), {"sessions": store}, {"sessions": tp}, "c[0]"
        )
        assert store.changelog_offset == 100
        assert sorted(store.get(b"k%d" % o) is not None for o in _CompactedChangelog.kept) == (
            [False] + [True] * 9
        )
    finally:
        store.close()
    assert restored == 9  # every record kept but the marker's offset, 30


class _TwoChangelogsOneFailing:
    """A task's two changelogs, as one producer writes them: the counter's
    (offsets 0-2, its marker at 3) and the sessions' (records 0-4, a control
    batch of no records at 5, records 6-9). As aiokafka's does, the failing
    getmany first drains the counter's records, moving its position past
    them, then fails on the sessions' batch, and returns neither."""

    logs: ClassVar = {"counter": ([0, 1, 2], 4), "sessions": ([0, 1, 2, 3, 4, 6, 7, 8, 9], 10)}

    def __init__(self, **options: Any) -> None:
        self.at: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, tps: list[TopicPartition]) -> None:
        self.at = dict.fromkeys(tps, 0)

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.logs[tp.topic][1] for tp in tps}

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.at[tp] = offset

    async def position(self, tp: TopicPartition) -> int:
        return self.at[tp]

    async def getmany(self, *tps: TopicPartition, **kwargs: Any) -> dict[TopicPartition, list[Any]]:
        for tp in sorted(tps):
            if tp.topic == "counter":
                self.at[tp] = 4  # drained, then thrown away with the failure
            elif self.at[tp] <= 5:
                raise KafkaError("Control batch did not contain any records")
        return {}


async def test_a_restore_passing_an_empty_control_batch_loses_no_other_changelog_s_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review's case: the raw read began at the consumer's positions, which
    the failed getmany had moved past the counter's records; the counter's
    store was left without them and recorded as caught up."""
    monkeypatch.setattr(tasks_module, "AIOKafkaConsumer", _TwoChangelogsOneFailing)
    monkeypatch.setattr(unreadable, "AIOKafkaClient", IdleKafkaClient)

    async def read_batches_at(
        options: object, at: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        kept, end = _TwoChangelogsOneFailing.logs[at.topic]
        found = [o for o in kept if o >= offset]
        if not found:
            return [], end
        key = at.topic[0].encode()
        records = [RawRecord(at.topic, 0, o, 0, key + b"%d" % o, b"v") for o in found]
        return records, end

    monkeypatch.setattr(unreadable, "read_batches_at", read_batches_at)
    stores = {
        name: PartitionStore(tmp_path / name / "0", RocksDBResources(RocksDBSettings()))
        for name in ("counter", "sessions")
    }
    try:
        restored = await tasks_module.restore(
            Settings(), stores, {name: TopicPartition(name, 0) for name in stores}, "c[0]"
        )
        assert [stores["counter"].get(b"c%d" % o) for o in (0, 1, 2)] == [b"v"] * 3
        assert stores["counter"].changelog_offset == 4
        assert stores["sessions"].changelog_offset == 10
    finally:
        for store in stores.values():
            store.close()
    assert restored == 12


class _TruncatedChangelog(_CompactedChangelog):
    """The same, with its first 40 offsets deleted (DeleteRecords)."""

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 40)


class _WhollyDeletedChangelog(_CompactedChangelog):
    """The same, with every offset deleted: it begins where it ends, at 100."""

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 100)


async def test_a_store_whose_changelog_records_were_all_deleted_is_moved_to_its_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing was left to read, so the store kept its offset, and every later
    start warned again of the records deleted."""
    monkeypatch.setattr(tasks_module, "AIOKafkaConsumer", _WhollyDeletedChangelog)
    store = PartitionStore(tmp_path / "sessions" / "0", RocksDBResources(RocksDBSettings()))
    store.write({b"k10": b"old"}, 20)
    tp = TopicPartition("app-sessions-changelog", 0)
    try:
        with caplog.at_level("WARNING", logger="stream_app.pipeline.tasks"):
            for _ in range(2):
                await tasks_module.restore(Settings(), {"sessions": store}, {"sessions": tp}, "c")
        assert store.changelog_offset == 100
    finally:
        store.close()
    warned = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1  # the first start, not the second


@pytest.mark.parametrize(("recorded", "said"), [(None, "missing"), (20, "as the store held")])
async def test_a_restore_that_needs_deleted_changelog_records_says_so(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    recorded: int | None,
    said: str,
) -> None:
    """It read on from the changelog's new beginning without a word, the
    sessions the deleted records had changed last left out or stale."""
    monkeypatch.setattr(tasks_module, "AIOKafkaConsumer", _TruncatedChangelog)
    store = PartitionStore(tmp_path / "sessions" / "0", RocksDBResources(RocksDBSettings()))
    if recorded is not None:
        store.write({b"k10": b"old"}, recorded)
    try:
        with caplog.at_level("WARNING", logger="stream_app.pipeline.tasks"):
            restored = await tasks_module.restore(
                Settings(),
                {"sessions": store},
                {"sessions": TopicPartition("app-sessions-changelog", 0)},
                "commands[0]",
            )
        assert restored == 6  # offsets 40, 50, ..., 90
        assert store.changelog_offset == 100
    finally:
        store.close()
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert line.startswith("commands[0]: store ")
    assert f"app-sessions-changelog[0] from offset {recorded or 0}, but it begins at 40" in line
    assert said in line


async def test_a_restore_from_the_beginning_of_a_whole_changelog_says_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(tasks_module, "AIOKafkaConsumer", _CompactedChangelog)
    store = PartitionStore(tmp_path / "sessions" / "0", RocksDBResources(RocksDBSettings()))
    try:
        with caplog.at_level("WARNING", logger="stream_app.pipeline.tasks"):
            await tasks_module.restore(
                Settings(),
                {"sessions": store},
                {"sessions": TopicPartition("app-sessions-changelog", 0)},
                "commands[0]",
            )
    finally:
        store.close()
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []


class _TwoChangelogs:
    """A consumer of a task's two changelog partitions: ``sessions`` with 100
    offsets, ``session-ids`` recreated (5 offsets), all fetched at once."""

    logs: ClassVar = {
        TopicPartition("app-sessions-changelog", 0): [b"s%d" % o for o in range(100)],
        TopicPartition("app-session-ids-changelog", 0): [b"p0"] * 5,
    }

    def __init__(self, **options: Any) -> None:
        self.at: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, tps: list[TopicPartition]) -> None:
        pass

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.logs[tp]) for tp in tps}

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.at[tp] = offset

    async def position(self, tp: TopicPartition) -> int:
        return self.at[tp]

    async def getmany(self, *tps: TopicPartition, **kwargs: Any) -> dict[TopicPartition, list[Any]]:
        batches = {}
        for tp in tps:
            keys = self.logs[tp]
            batches[tp] = [
                _ChangelogRecord(key, b"%d" % o, o)
                for o, key in enumerate(keys)
                if o >= self.at[tp]
            ]
            self.at[tp] = len(keys)
        return batches


async def test_one_recreated_changelog_rebuilds_every_store_of_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Session-ids' changelog was recreated (its store's offset lies past its
    end): every store of the task is rebuilt from its changelog, as Kafka
    Streams wipes a corrupted task, not that one alone beside a sessions store
    holding what its changelog may no longer have (``old-session``). That
    store is wiped last: a kill in between leaves it to be found again."""
    monkeypatch.setattr(tasks_module, "AIOKafkaConsumer", _TwoChangelogs)
    wiped: list[str] = []
    wipe = PartitionStore.wipe

    def recorded(store: PartitionStore) -> None:
        wiped.append(store.path.parent.name)
        wipe(store)

    monkeypatch.setattr(PartitionStore, "wipe", recorded)
    monkeypatch.setattr(tasks_module, "_OFFSET_AHEAD_GRACE_S", 0.0)  # no end to wait for
    resources = RocksDBResources(RocksDBSettings())
    sessions = PartitionStore(tmp_path / "sessions" / "0", resources)
    ids = PartitionStore(tmp_path / "session-ids" / "0", resources)
    sessions.write({b"old-session": b"x"}, 50)  # within its changelog's 100 offsets
    ids.write({b"p0": b"40"}, 40)  # past the recreated changelog's 5
    try:
        restored = await tasks_module.restore(
            Settings(),
            {"session-ids": ids, "sessions": sessions},  # the engine's order
            {
                "session-ids": TopicPartition("app-session-ids-changelog", 0),
                "sessions": TopicPartition("app-sessions-changelog", 0),
            },
            "commands[0]",
        )
        assert restored == 105  # both from the beginning
        assert sessions.get(b"old-session") is None
        assert sessions.get(b"s0") == b"0"
        assert sessions.changelog_offset == 100
        assert ids.get(b"p0") == b"4"
        assert ids.changelog_offset == 5
        assert wiped == ["sessions", "session-ids"]
    finally:
        sessions.close()
        ids.close()


class _OpenTransaction(_TwoChangelogs):
    """Both changelogs hold 100 records, but a transaction left open at offset
    60 (a killed exactly_once worker's, when its successor runs at_least_once
    and so fences nothing) holds a read_committed end there."""

    logs: ClassVar = {tp: [b"p0"] * 100 for tp in _TwoChangelogs.logs}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.committed = options["isolation_level"] == "read_committed"

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 60 if self.committed else 100)


async def test_a_changelog_held_back_by_an_open_transaction_is_waited_for_not_wiped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taken for a recreated topic: every store of the task was wiped and
    restored up to the held-back end, so the session-id counter went back
    from 100 to 60 and the next sessions got ids given before."""
    monkeypatch.setattr(tasks_module, "AIOKafkaConsumer", _OpenTransaction)
    monkeypatch.setattr(tasks_module, "_OFFSET_AHEAD_GRACE_S", 0.0)
    resources = RocksDBResources(RocksDBSettings())
    ids = PartitionStore(tmp_path / "session-ids" / "0", resources)
    ids.write({b"p0": b"100"}, 100)
    try:
        with pytest.raises(StreamAppError, match="a transaction is still open on it"):
            await tasks_module.restore(
                Settings(),
                {"session-ids": ids},
                {"session-ids": TopicPartition("app-session-ids-changelog", 0)},
                "commands[0]",
            )
        assert ids.get(b"p0") == b"100"
        assert ids.changelog_offset == 100
    finally:
        ids.close()
