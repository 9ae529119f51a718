"""The engine's local state directory, checked before any broker call, a task
start that fails for good, stores that cannot be closed, a settings follower
that dies, fences and refusals (a missing ACL) met on a start, a commit round,
a revocation or a send, and added partitions."""

from __future__ import annotations

import asyncio
import logging
import time
from asyncio import Event
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import (
    CoordinatorLoadInProgressError,
    CorruptRecordException,
    GroupAuthorizationFailedError,
    IllegalStateError,
    InconsistentGroupProtocolError,
    InvalidSessionTimeoutError,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnknownTopicOrPartitionError,
)

from stream_app.errors import ConfigurationError, StoreError
from stream_app.pipeline import engine as engine_module
from stream_app.pipeline.checkpoint import (
    CheckpointError,
    CommitOutcomeUnknownError,
    NotAuthorizedError,
    StoreWriteError,
    TaskFencedError,
    encode_consumed,
    offset_metadata,
)
from stream_app.pipeline.engine import Engine, _Damage
from stream_app.pipeline.processor import BOOKKEEPING_BYTES, Limits
from stream_app.pipeline.store import CONSUMED_KEY, PartitionStore, RocksDBResources
from stream_app.pipeline.tasks import Stage, Task, TaskId
from stream_app.pipeline.topics import TopicLayout, check_topics, largest_session_bytes
from stream_app.settings import RocksDBSettings, Settings
from tests.pipeline.fakes import PartitionCounts


def _owning(engine: Engine, *tasks: Any) -> Engine:
    """``engine``, routing to ``tasks`` (stand-ins for Task) as if it had started them."""
    for task in tasks:
        engine._tasks[task.id] = task
        for tp in task.inputs:
            engine._task_of[tp] = task
    return engine


class _Group:
    """Stands for the engine's GroupOffsets: a group that has committed
    ``offsets`` (the offset of each input partition)."""

    def __init__(self, offsets: dict[TopicPartition, int] | None = None) -> None:
        self.offsets = offsets or {}

    def install(self, engine: Engine) -> None:
        engine._offsets = self  # type: ignore[assignment]

    async def read(self, group_id: str) -> dict[TopicPartition, tuple[int, str]]:
        return {tp: (offset, "") for tp, offset in self.offsets.items()}


def test_state_directory_is_created_with_its_parents(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "not" / "there" / "yet", app_id="shop")
    Engine(settings, TopicLayout(4, 1_048_588)).check_local_state()
    assert (tmp_path / "not" / "there" / "yet" / "shop").is_dir()


@pytest.mark.parametrize("max_record_bytes", [100_000, 262_144, 786_432, 1_048_588, 8 << 20])
def test_a_session_limit_the_worker_takes_leaves_room_to_return_cancel_or_reopen(
    tmp_path: Path, max_record_bytes: int
) -> None:
    """A stored session stays within a third of a record, with the allowance
    of a return, a cancel or a reopen past the session limit. A limit of a
    third of the record limit was taken, with no allowance left: a closed
    session at its limit took none of them, and the revenue counted at its
    close could never be corrected."""
    layout = TopicLayout(1, max_record_bytes)
    most = largest_session_bytes(max_record_bytes)
    for max_session_bytes in (1024, most // 2, most):
        settings = Settings(data_dir=tmp_path, max_session_bytes=max_session_bytes)
        check_topics(settings, layout)
        limits = Engine(settings, layout).limits
        allowance = limits.bookkeeping_bytes
        assert allowance >= min(BOOKKEEPING_BYTES, max_session_bytes // 4)
        assert (max_session_bytes + allowance) * 3 <= max_record_bytes
        # Nor past a third when a lowered limit left more content stored.
        assert max_session_bytes + allowance <= limits.max_stored_bytes
        assert limits.max_stored_bytes * 3 <= max_record_bytes
    with pytest.raises(ConfigurationError, match=f"so it may be at most {most}$"):
        check_topics(Settings(data_dir=tmp_path, max_session_bytes=most + 1), layout)


class _MadeOnlyError(Exception):
    """Ends a consumer's start: only the options it was made with count."""


@pytest.mark.parametrize(
    ("session_timeout_s", "request_timeout_ms", "rebalance_timeout_ms"),
    [(30, 40_000, 30_000), (45, 50_000, 45_000), (600, 65_000, 60_000)],
)
async def test_the_group_consumer_waits_out_a_joingroup_the_broker_holds(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    session_timeout_s: float,
    request_timeout_ms: int,
    rebalance_timeout_ms: int,
) -> None:
    """With the shipped StatefulSet's 45 s session timeout (aiokafka's
    rebalance timeout), a JoinGroup the broker held while others rejoined
    outlasted the 40 s request timeout: dropped, the coordinator marked dead.
    A long session timeout (static members given minutes to come back) made
    the rebalance timeout longer than the capped request timeout."""
    made: list[dict[str, Any]] = []

    class Consumer:
        def __init__(self, **options: Any) -> None:
            made.append(options)

        async def start(self) -> None:
            raise _MadeOnlyError

        async def stop(self) -> None:
            pass

    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", Consumer)
    settings = Settings(data_dir=tmp_path, session_timeout_s=session_timeout_s)
    with pytest.raises(_MadeOnlyError):
        await Engine(settings, TopicLayout(1, 1_048_588))._consume()
    [options] = made
    assert options["session_timeout_ms"] == session_timeout_s * 1000
    assert options["request_timeout_ms"] == request_timeout_ms
    assert options["rebalance_timeout_ms"] == rebalance_timeout_ms


def _polls_failing(engine: Engine, failure: Exception) -> type:
    """A consumer of ``engine``'s inputs whose every poll raises ``failure``."""

    class Consumer:
        def __init__(self, **options: Any) -> None:
            pass

        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            pass

        async def topics(self) -> set[str]:
            return set(engine.input_topics)

        def subscribe(self, topics: list[str], listener: object) -> None:
            pass

        def unsubscribe(self) -> None:
            pass

        async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, Any]:
            raise failure

    return Consumer


async def test_a_poll_failing_on_a_control_batch_of_no_records_reads_past_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka's consumer fails, read_committed, on a control batch of no
    records (Kafka's log cleaner leaves them in compacted transactional
    topics): a plain KafkaError, which stopped the worker. It is read past
    raw, as a header name that is not UTF-8 is."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))

    passes: list[BaseException] = []

    async def read_past_and_commit(consumer: object, exc: BaseException, rebalances: int) -> None:
        passes.append(exc)
        engine.stop()

    failing = KafkaError("Control batch did not contain any records")
    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", _polls_failing(engine, failing))
    monkeypatch.setattr(engine, "_read_past_and_commit", read_past_and_commit)
    await engine._consume()
    assert [str(exc) for exc in passes] == ["KafkaError: Control batch did not contain any records"]


@pytest.mark.parametrize(
    "failing",
    [
        CorruptRecordException("Invalid CRC - TopicPartition(topic='c', partition=0)"),
        # aiokafka's C reader on a damaged magic byte: it was a bare traceback.
        SystemError("Negative size passed to PyBytes_FromStringAndSize"),
    ],
)
async def test_a_poll_failing_on_a_corrupt_batch_reads_up_to_it_before_the_worker_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: Exception
) -> None:
    """A batch whose CRC does not match failed the poll: the worker named it
    and stopped at once, and the records before it in the failed fetch were
    never processed. Now the poll is tried again while raw passes move its
    partition; then the batch is named and the worker stops."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    passes: list[BaseException] = []
    named: list[BaseException] = []

    async def read_up_to(consumer: object, exc: BaseException, rebalances: int) -> _Damage | None:
        passes.append(exc)
        # Two passes move the partition, the third meets the batch.
        return None if len(passes) < 3 else _Damage(TopicPartition("c", 0), 7)

    async def name(consumer: object, exc: BaseException, damage: _Damage) -> None:
        named.append(exc)

    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", _polls_failing(engine, failing))
    monkeypatch.setattr(engine, "_read_up_to_damage", read_up_to)
    monkeypatch.setattr(engine, "_name_the_corrupt_batch", name)
    with pytest.raises(type(failing)):
        await engine._consume()
    assert passes == [failing] * 3
    assert named == [failing]


async def test_any_other_failure_of_a_poll_reads_nothing_raw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    failing = RuntimeError("not a record the client misread")

    async def read_up_to(consumer: object, exc: BaseException, rebalances: int) -> None:
        raise AssertionError("read raw")

    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", _polls_failing(engine, failing))
    monkeypatch.setattr(engine, "_read_up_to_damage", read_up_to)
    with pytest.raises(RuntimeError):
        await engine._consume()


async def test_a_failing_poll_stops_the_engine_as_a_signal_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure raised from a poll closed the engine without stopping it:
    its last commits and its leave had no bound, the worker's watchdog (armed
    only on a signal) could not end a hang, and /readyz could still say ready."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))

    failing = KafkaTimeoutError("no broker answers")
    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", _polls_failing(engine, failing))
    stopping: list[bool] = []
    engine.on_stopping = lambda: stopping.append(engine._stopping.is_set())
    with pytest.raises(KafkaTimeoutError):
        await engine._consume()
    assert stopping == [False]  # called once, as the stop began
    assert engine._stopping.is_set()
    engine.stop()  # again: no second call
    assert stopping == [False]


def test_state_built_for_another_partition_count_is_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, app_id="shop")
    Engine(settings, TopicLayout(4, 1_048_588)).check_local_state()
    Engine(settings, TopicLayout(4, 1_048_588)).check_local_state()  # same count: fine
    with pytest.raises(ConfigurationError) as refused:
        Engine(settings, TopicLayout(6, 1_048_588)).check_local_state()
    message = str(refused.value)
    assert "4 partitions" in message
    assert "sessions.commands has 6" in message
    # A migration for a deployment; for a broker started afresh, the directory.
    assert "re-partitioning is a migration to a new app id" in message
    assert message.endswith(f"a development broker started afresh), remove {tmp_path / 'shop'}")


def test_the_layout_file_is_written_whole_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    """Two workers started at once in one directory: one read the file the
    other had created but not yet written, and exited 1 with a traceback. The
    file is now renamed into place whole; one found damaged is one clear error."""
    settings = Settings(data_dir=tmp_path, app_id="shop")
    Engine(settings, TopicLayout(4, 1_048_588)).check_local_state()
    assert sorted(p.name for p in (tmp_path / "shop").iterdir()) == ["layout.json"]
    for damaged in (b"", b"[4]", b'{"partitions": 4'):
        (tmp_path / "shop" / "layout.json").write_bytes(damaged)
        with pytest.raises(ConfigurationError) as refused:
            Engine(settings, TopicLayout(4, 1_048_588)).check_local_state()
        assert "is not the layout file the worker writes" in str(refused.value)


class _TaskThatCannotStart:
    """Stands for a Task whose start fails for a reason retrying does not mend."""

    def __init__(self) -> None:
        self.id = TaskId("commands", 0)
        self.inputs: list[object] = []
        self.closed = False

    async def start(self) -> int:
        raise RuntimeError("a bug, say")

    async def close(self) -> None:
        self.closed = True


async def test_a_start_that_fails_for_good_stops_the_engine_instead_of_pausing_it(
    tmp_path: Path,
) -> None:
    """Its partitions would otherwise stay paused for good while the rest runs:
    the engine stops (committing the other tasks) and ``run`` raises it."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._consumer = object()  # type: ignore[assignment] - _start only checks it is set
    task = _TaskThatCannotStart()
    await engine._start(task)  # type: ignore[arg-type]
    assert task.closed
    assert engine._stopping.is_set()
    assert isinstance(engine._failure, RuntimeError)


def test_a_data_dir_that_cannot_be_a_directory_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    settings = Settings(data_dir=tmp_path / "a-file" / "state", app_id="shop")
    with pytest.raises(ConfigurationError) as refused:
        Engine(settings, TopicLayout(4, 1_048_588)).check_local_state()
    message = str(refused.value)
    assert message.startswith(f"STREAM_APP_DATA_DIR={tmp_path / 'a-file' / 'state'}: ")
    assert "Not a directory" in message


class _Store:
    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.closed = False

    def close(self) -> None:
        self.closed = True
        if self.fails:
            raise StoreError("cannot close the store at x: IO error: No space left on device")


def _bare_task(
    settings: Settings, tmp_path: Path, partition: int = 0, stores: tuple[str, ...] = ()
) -> Task:
    """A real Task of the commands stage, never started: no producer, no processor."""
    stage = Stage("commands", (settings.topics.commands,), stores, build=lambda *_: None)  # type: ignore[arg-type,return-value]
    return Task(
        stage,
        partition,
        settings=settings,
        changelogs={name: f"{name}-changelog" for name in stores},
        state_dir=tmp_path,
        resources=RocksDBResources(RocksDBSettings()),
        commit_offsets=lambda _offsets: None,
        limits=Limits(),
        max_record_bytes=1_048_588,
    )


async def test_a_task_closes_every_store_when_one_cannot_be_closed(tmp_path: Path) -> None:
    task = _bare_task(Settings(data_dir=tmp_path), tmp_path, stores=("a", "b", "c"))
    stores = {"a": _Store(fails=False), "b": _Store(fails=True), "c": _Store(fails=False)}
    task.stores = stores  # type: ignore[assignment]
    with pytest.raises(StoreError, match="No space left"):
        await task.close()
    assert all(store.closed for store in stores.values())
    assert task.stores == {}


class _TaskThatCannotClose:
    def __init__(self) -> None:
        self.id = TaskId("commands", 1)
        self.inputs: list[object] = []

    async def close(self) -> None:
        raise StoreError("cannot close the store at x: IO error: No space left on device")


async def test_a_task_that_cannot_be_closed_stops_the_engine(tmp_path: Path) -> None:
    """Dropping it (on a stop or a revocation) goes on; the engine then stops
    and ``run`` raises the error."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(2, 1_048_588))
    task = _TaskThatCannotClose()
    _owning(engine, task)
    await engine._drop(task)  # type: ignore[arg-type]
    assert task.id not in engine._tasks
    assert engine._stopping.is_set()
    assert isinstance(engine._failure, StoreError)


@pytest.mark.parametrize(
    ("death", "raised"),
    [
        (UnknownTopicOrPartitionError, UnknownTopicOrPartitionError),  # the worker exits 1
        # Its ACL taken away: a configuration error (exit 2), as for the other clients.
        (TopicAuthorizationFailedError, ConfigurationError),
    ],
)
async def test_a_settings_follower_that_dies_stops_the_engine(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    death: type[Exception],
    raised: type[Exception],
) -> None:
    """Once the settings are loaded, a follower that fails stops the worker
    (every task committed) rather than leave it applying stale settings."""

    async def follower_that_fails(settings: Settings, registry: object, ready: Event) -> None:
        ready.set()
        await asyncio.sleep(0.01)
        raise death

    async def consume_until_stopped() -> None:
        await engine._stopping.wait()

    monkeypatch.setattr(engine_module, "follow_settings_topic", follower_that_fails)
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    monkeypatch.setattr(engine, "_consume", consume_until_stopped)
    with pytest.raises(raised):
        await asyncio.wait_for(engine.run(), timeout=5)
    assert engine._stopping.is_set()


class _TaskOnAFullDisk:
    """A task whose first restore cannot write (no space left) and whose stores
    then cannot flush as they close; the space is freed before its next start."""

    def __init__(self) -> None:
        self.id = TaskId("commands", 0)
        self.inputs: list[object] = []
        self.starts = 0
        self.active = False

    async def start(self) -> int:
        self.starts += 1
        if self.starts == 1:
            raise StoreError("cannot write the store at x: IO error: No space left on device")
        return 0

    async def close(self) -> None:
        raise StoreError("cannot close the store at x: IO error: No space left on device")

    def consumed_positions(self) -> dict[object, int]:
        return {}

    def activate(self, positions: object) -> None:
        self.active = True


class _Consumer:
    def resume(self, *partitions: object) -> None:
        pass


async def test_a_task_whose_restore_hits_a_full_disk_is_retried_not_the_worker_stopped(
    tmp_path: Path,
) -> None:
    """Its other tasks go on meanwhile (docs/operations.md, A task cannot start)."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._consumer = _Consumer()  # type: ignore[assignment]
    _Group().install(engine)
    task = _TaskOnAFullDisk()
    _owning(engine, task)
    await engine._start(task)  # type: ignore[arg-type]
    assert task.starts == 2
    assert task.active
    assert not engine._stopping.is_set()
    assert engine._failure is None


class _TaskWhoseStateHoldsMore:
    """Restored, its state holds the records up to offset 9 of its input; the
    group's committed offset is 4 (an at_least_once commit cut short)."""

    def __init__(self, tp: TopicPartition) -> None:
        self.id = TaskId("commands", 0)
        self.inputs = [tp]
        self.active = False
        self.positions: object = None

    async def start(self) -> int:
        return 0

    def consumed_positions(self) -> dict[TopicPartition, int]:
        return {self.inputs[0]: 9}

    def activate(self, positions: object) -> None:
        self.active, self.positions = True, positions


class _SeekingConsumer(_Consumer):
    def __init__(self, end: int) -> None:
        self.end = end
        self.sought: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, self.end)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.sought.append((tp, offset))


@pytest.mark.parametrize(
    ("committed", "end", "start", "commits"),
    [
        (4, 20, 9, [9]),  # past the committed offset, and committed there for later starts
        (12, 20, 12, []),  # the committed offset is further on
        (4, 6, 4, []),  # past the input's end: a topic recreated under that name
    ],
)
async def test_a_task_starts_past_what_its_restored_state_holds(
    tmp_path: Path, committed: int, end: int, start: int, commits: list[int]
) -> None:
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    consumer = _SeekingConsumer(end)
    engine._consumer = consumer  # type: ignore[assignment]
    tp = TopicPartition(engine.settings.topics.commands, 0)
    _Group({tp: committed}).install(engine)
    task = _TaskWhoseStateHoldsMore(tp)
    _owning(engine, task)
    await engine._start(task)  # type: ignore[arg-type]
    assert consumer.sought == [(tp, start)]
    assert task.positions == {tp: start}
    # With the partition count the state was built for (topics.py refuses another).
    assert consumer.commits == [{tp: (offset, offset_metadata(1))} for offset in commits]


class _Offsets:
    """A group that has committed on the command partitions of ``committed``
    (after ``commits_after`` questions, if not None), or whose coordinator
    answers ``error``, beside output partitions whose logs end at ``ends``'
    offsets (0 if not named). Installed as the engine's committed_offsets
    and ``_ends_of``."""

    def __init__(
        self,
        ends: dict[TopicPartition, int],
        committed: set[int] = frozenset(),  # type: ignore[assignment]
        commits_after: int | None = None,
        error: Exception | None = None,
    ) -> None:
        self.ends, self.partitions, self.commits_after = ends, committed, commits_after
        self.error = error
        self.asked = 0
        self.looked = False
        self.closed = False

    def install(self, engine: Engine) -> None:
        self.engine = engine
        engine._offsets = self  # type: ignore[assignment]
        engine._ends_of = self.end_offsets  # type: ignore[method-assign]

    async def read(self, group_id: str) -> dict[TopicPartition, tuple[int, str]]:
        assert group_id == self.engine.settings.app_id
        self.asked += 1
        if self.error is not None:
            raise self.error
        partitions = set(self.partitions)
        if self.commits_after is not None and self.asked > self.commits_after:
            partitions.add(0)
        commands = self.engine.settings.topics.commands
        return {TopicPartition(commands, p): (7, "") for p in partitions}

    async def close(self) -> None:
        self.closed = True

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.looked = True
        return {tp: self.ends.get(tp, 0) for tp in tps}


@pytest.mark.parametrize(
    ("committed", "error", "closed_end", "guarantee", "warned"),
    [
        # a new or mistyped app id, beside another's outputs
        (set(), None, 3, "exactly_once", True),
        (set(), None, 3, "at_least_once", True),
        (set(), None, 0, "exactly_once", False),  # a first deployment: no outputs yet
        ({1}, None, 3, "exactly_once", False),  # a partition never committed on: not a new group
        # aiokafka's committed() read this as no offset on any partition
        (set(), CoordinatorLoadInProgressError(), 3, "exactly_once", False),
    ],
)
async def test_a_new_group_beside_outputs_already_written_is_warned_of(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    committed: set[int],
    error: Exception | None,
    closed_end: int,
    guarantee: str,
    warned: bool,
) -> None:
    """A changed STREAM_APP_APP_ID published every output again, unsaid."""
    settings = Settings(data_dir=tmp_path, processing_guarantee=guarantee)
    topics = settings.topics
    layout = TopicLayout(2, 1_048_588, output_partitions={topics.closed: 2, topics.returned: 2})
    engine = Engine(settings, layout)
    group = _Offsets({TopicPartition(topics.closed, 1): closed_end}, committed, error=error)
    group.install(engine)
    with caplog.at_level("INFO", logger="stream_app.pipeline.engine"):
        await engine._tell_reprocessing(_Consumer())  # type: ignore[arg-type]
    said = [r for r in caplog.records if "committed no offset" in r.getMessage()]
    assert len(said) == (1 if warned else 0)
    if committed or error:
        assert not group.looked  # the usual start asks no more
    if warned:
        assert said[0].levelname == "WARNING"
        line = said[0].getMessage()
        assert f"group {settings.app_id} has committed no offset on the command topic " in line
        assert f"while {topics.closed} already hold outputs" in line
        assert ("from where its restored stores say" in line) == (guarantee == "at_least_once")


async def test_a_first_deployment_s_own_first_outputs_are_not_warned_of(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Another worker's first commit lands between the two looks at the
    offsets: the outputs found are the deployment's own."""
    settings = Settings(data_dir=tmp_path)
    topics = settings.topics
    engine = Engine(settings, TopicLayout(2, 1_048_588, output_partitions={topics.closed: 1}))
    group = _Offsets({TopicPartition(topics.closed, 0): 3}, commits_after=1)
    group.install(engine)
    with caplog.at_level("INFO", logger="stream_app.pipeline.engine"):
        await engine._tell_reprocessing(_Consumer())  # type: ignore[arg-type]
    assert group.looked
    assert [r for r in caplog.records if "committed no offset" in r.getMessage()] == []


async def test_a_look_at_the_outputs_that_fails_says_nothing_and_raises_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path)
    topics = settings.topics
    engine = Engine(settings, TopicLayout(2, 1_048_588, output_partitions={topics.closed: 1}))

    class Lost(_Offsets):
        async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
            raise OSError("the connection was lost")

    Lost({}).install(engine)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        await engine._tell_reprocessing(_Consumer())  # type: ignore[arg-type]
    assert caplog.records == []


class _TaskOfAStart(_TaskWhoseStateHoldsMore):
    def consumed_positions(self) -> dict[TopicPartition, int]:
        return {}

    async def close(self) -> None:
        pass


class _BeginningConsumer(_SeekingConsumer):
    """aiokafka's consumer, of partitions whose logs begin at offset 0. It has
    no committed(): aiokafka's read a coordinator's error for the whole
    request (loading the group's offsets) as no offset."""

    async def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return dict.fromkeys(tps, 0)


async def test_a_task_started_while_the_coordinator_loads_waits_for_its_offsets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """It read the partition from its start: after a coordinator failover, a
    task under exactly_once published every output of its partition again."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    tp = TopicPartition(settings.topics.commands, 0)
    answers: list[Exception | dict[TopicPartition, tuple[int, str]]] = [
        CoordinatorLoadInProgressError(settings.app_id),
        {tp: (12, "")},
    ]

    class Loading:
        async def read(self, group_id: str) -> dict[TopicPartition, tuple[int, str]]:
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    engine._offsets = Loading()  # type: ignore[assignment]
    consumer = _BeginningConsumer(end=20)
    engine._consumer = consumer  # type: ignore[assignment]
    task = _TaskOfAStart(tp)
    _owning(engine, task)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        await asyncio.wait_for(engine._start(task), timeout=5)  # type: ignore[arg-type]
    assert task.positions == {tp: 12}
    assert consumer.sought == [(tp, 12)]
    [retried] = [r.getMessage() for r in caplog.records if "could not start" in r.getMessage()]
    assert "LoadInProgressError" in retried


@pytest.mark.parametrize(("guarantee", "read"), [("at_least_once", True), ("exactly_once", False)])
def test_a_task_reads_what_its_restored_state_holds_from_its_last_store(
    tmp_path: Path, guarantee: str, read: bool
) -> None:
    """The other half of the test above, with a real task and real stores:
    ``consumed_positions`` returning nothing left every test passing, and
    an at_least_once restart applying a session's commands again past its
    last 64 eventIds."""
    settings = Settings(data_dir=tmp_path, processing_guarantee=guarantee)
    task = _bare_task(settings, tmp_path, stores=("ids", "sessions"))
    tp = TopicPartition(settings.topics.commands, 0)
    resources = RocksDBResources(RocksDBSettings())
    task.stores = {
        name: PartitionStore(tmp_path / name / "0", resources) for name in ("ids", "sessions")
    }
    # Where Checkpoint.seal writes it: the last store's changelog.
    task.stores["sessions"].write({CONSUMED_KEY: encode_consumed({tp: 9})}, 3)
    try:
        assert task.consumed_positions() == ({tp: 9} if read else {})
    finally:
        for store in task.stores.values():
            store.close()


class _TaskRefusedItsTransactionalId(_TaskOnAFullDisk):
    async def start(self) -> int:
        self.starts += 1
        raise TransactionalIdAuthorizationFailed("app-commands-0")

    async def close(self) -> None:
        pass


async def test_a_task_refused_its_transactional_id_stops_the_worker_not_retried(
    tmp_path: Path,
) -> None:
    """Before, it was retried every 10 s for ever, each time with a warning."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._consumer = _Consumer()  # type: ignore[assignment]
    task = _TaskRefusedItsTransactionalId()
    _owning(engine, task)
    await asyncio.wait_for(engine._start(task), timeout=5)  # type: ignore[arg-type]
    assert task.starts == 1
    assert engine._stopping.is_set()
    assert isinstance(engine._failure, ConfigurationError)
    assert "TransactionalIdAuthorizationFailed" in str(engine._failure)


def test_the_limits_of_what_the_worker_writes_follow_the_topics_record_limit(
    tmp_path: Path,
) -> None:
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 2_000_000))
    assert engine.limits.max_original_bytes == 500_000
    assert engine.limits.max_record_bytes == 2_000_000 - 1024


class _AssignedConsumer:
    def __init__(self) -> None:
        self.pausing: list[object] = []

    def pause(self, *partitions: object) -> None:
        self.pausing.extend(partitions)

    def paused(self) -> set[object]:
        return set(self.pausing)

    def assignment(self) -> set[object]:
        return set()


async def test_partitions_added_while_the_worker_runs_stop_it_with_a_configuration_error(
    tmp_path: Path,
) -> None:
    """Before, a worker handed command partition 6 of a topic grown from 6 to 8
    failed in the rebalance listener, started only some tasks (none of stage
    2's) and reported itself ready."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(6, 1_048_588))
    consumer = _AssignedConsumer()
    engine._consumer = consumer  # type: ignore[assignment]
    commands = settings.topics.commands
    await engine.on_partitions_assigned(
        {TopicPartition(commands, 0), TopicPartition(commands, 6), TopicPartition(commands, 7)}
    )
    assert isinstance(engine._failure, ConfigurationError)
    assert f"{commands}[6], {commands}[7]" in str(engine._failure)
    assert engine._stopping.is_set()
    assert engine._tasks == {}
    assert consumer.pausing == []


@pytest.mark.parametrize("count", [8, 4])
def test_an_input_topic_whose_partition_count_changed_stops_the_worker(
    tmp_path: Path, count: int
) -> None:
    """A static member that rejoins after a restart is told it follows,
    whichever member led: after a rolling restart no member watched the
    metadata, and partitions added then were never assigned, nor said."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(6, 1_048_588))
    metadata = PartitionCounts(dict.fromkeys(engine.input_topics, 6))
    engine._check_partition_counts(metadata)  # type: ignore[arg-type]
    assert engine._failure is None
    metadata.counts.pop(settings.topics.commands)  # no metadata (yet): nothing to say
    engine._check_partition_counts(metadata)  # type: ignore[arg-type]
    assert engine._failure is None
    metadata.counts[settings.topics.commands] = count
    engine._check_partition_counts(metadata)  # type: ignore[arg-type]
    assert isinstance(engine._failure, ConfigurationError)
    assert f"{settings.topics.commands} has {count}" in str(engine._failure)
    assert engine._stopping.is_set()


class _StrictConsumer:
    """Pauses only what is assigned, as aiokafka's consumer (IllegalStateError)."""

    def __init__(self, assigned: set[TopicPartition], topics: list[set[str]] | None = None) -> None:
        self.assigned = assigned
        self.pausing: list[TopicPartition] = []
        self._topics = topics or []

    def pause(self, *partitions: TopicPartition) -> None:
        for tp in partitions:
            if tp not in self.assigned:
                raise IllegalStateError(f"No current assignment for partition {tp}")
        self.pausing.extend(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.pausing)

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def last_poll_timestamp(self, tp: TopicPartition) -> int | None:
        return None

    async def topics(self) -> set[str]:
        return self._topics.pop(0) if len(self._topics) > 1 else self._topics[0]

    async def commit(self, offsets: object) -> None:
        pass


async def test_an_assignment_made_without_an_input_topics_metadata_starts_no_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A leader that assigned while the internal topics it had just created had
    no metadata yet hands out command partitions without their re-key
    partitions. Before, the listener failed on the first task (aiokafka logs
    and goes on), no task started, and the worker processed nothing until a
    metadata refresh, 5 minutes later, rebalanced the group."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(2, 1_048_588))
    assigned = {TopicPartition(settings.topics.commands, p) for p in (0, 1)}
    consumer = _StrictConsumer(assigned)
    engine._consumer = consumer  # type: ignore[assignment]
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        await engine.on_partitions_assigned(assigned)
    assert engine._tasks == {}
    assert engine._failure is None
    assert set(consumer.pausing) == assigned  # not fetched while no task reads them
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2
    assert "commands[0]: not started" in warnings[0]
    assert "waiting for the next rebalance" in warnings[0]
    # Not ready while it owns partitions it does not process (/readyz says 503).
    assert not engine.ready
    assert engine.status()["waiting"] == ["commands[0]", "commands[1]"]
    await engine.on_partitions_assigned(set())  # the next assignment decides again
    assert engine.ready
    assert engine.status()["waiting"] == []


async def test_an_assignment_that_ends_while_the_worker_stops_starts_no_task(
    tmp_path: Path,
) -> None:
    """SIGTERM during a rebalance (another worker joining, in a black-box run):
    before, the new assignment started its tasks (their producers fenced,
    their stores opened and restoring) only for the stop to cancel them."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    assigned = {TopicPartition(topic, 0) for topic in engine.input_topics}
    consumer = _StrictConsumer(assigned)
    engine._consumer = consumer  # type: ignore[assignment]
    commands = {tp for tp in assigned if tp.topic == settings.topics.commands}
    await engine.on_partitions_assigned(commands)  # without the re-key partition: waits
    assert engine.status()["waiting"] == ["commands[0]"]
    await engine.on_partitions_revoked(set())
    engine.stop()
    await engine.on_partitions_assigned(assigned)
    assert engine._tasks == {}
    assert engine._starting == {}
    assert set(consumer.pausing) == assigned
    assert engine.status()["waiting"] == []
    # Owning no task, it has nothing uncommitted: a group it cannot leave in
    # time (the broker slow to answer LeaveGroup) is no unclean stop.
    engine._stop_deadline = time.monotonic()
    await engine._leave(_NeverLeaves())  # type: ignore[arg-type]  # raises if it were unclean


class _NeverLeaves:
    async def stop(self) -> None:
        await asyncio.Event().wait()


async def test_a_worker_that_owns_no_task_stops_cleanly_when_kafka_is_gone(
    tmp_path: Path,
) -> None:
    """A worker of a group with more workers than partitions, stopped while
    the broker was down, exited 1 ("Kafka could not be reached to confirm
    it"), though nothing of it was uncommitted. One that owned a task did
    lose Kafka with its transactions: its stop is not clean."""
    for owned in (False, True):
        engine = Engine(Settings(data_dir=tmp_path / str(owned)), TopicLayout(1, 1_048_588))
        engine._joined = True
        task = _FencedTask(engine.settings.topics.commands)
        task.checkpoint = None  # its transaction committed: nothing open
        if owned:
            _owning(engine, task)
        engine._stop_deadline = time.monotonic()
        await engine._close(_NeverLeaves())  # type: ignore[arg-type]
        assert engine.stopped_cleanly is not owned
        assert task.closed is owned


async def test_the_worker_joins_once_the_broker_shows_its_input_topics(tmp_path: Path) -> None:
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    everything = set(engine.input_topics)
    consumer = _StrictConsumer(set(), [set(), {"other"}, everything | {"other"}])
    await engine._await_input_topics(consumer)  # type: ignore[arg-type]
    assert consumer._topics == [everything | {"other"}]  # asked until all were there


class _FencedTask:
    """A task of a worker paused past its session timeout: its successor's
    producer has taken over the transactional id."""

    def __init__(self, commands_topic: str, *, committing: bool = False) -> None:
        self.id = TaskId("commands", 0)
        self.inputs = [TopicPartition(commands_topic, 0)]
        self.active = True
        self.checkpoint = object()
        self.closed = False
        self.committing = committing

    async def commit(self) -> None:
        raise TaskFencedError(
            "producer unusable: ProducerFenced('There is a newer producer')",
            committing=self.committing,
        )

    def begin_commit(self) -> Any:
        self.checkpoint = None
        return self.commit()

    def commit_due(self, now: float) -> bool:
        return True

    def held_bytes(self) -> int:
        return 0

    async def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("committing", [False, True])
async def test_a_task_found_fenced_on_revocation_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, committing: bool
) -> None:
    """The resumed zombie learns of its fencing either from its next commit or,
    when the rebalance comes first, from the commit on revocation: both say
    'fenced' (the zombie integration test looks for the word). Fenced as its
    commit was retried, the new owner may have completed that commit: it was
    counted and logged as aborted."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    task = _FencedTask(settings.topics.commands, committing=committing)
    _owning(engine, task)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        await engine.on_partitions_revoked(set(task.inputs))
    assert task.closed
    assert engine._tasks == {}
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    said = "may or may not have been committed" if committing else "is aborted"
    assert line.startswith(
        f"commands[0]: fenced, another worker owns this task now: its open transaction {said}"
    )
    assert (engine.aborts, engine.commits_unknown) == ((0, 1) if committing else (1, 0))


@pytest.mark.parametrize("committing", [False, True])
async def test_a_task_found_fenced_in_a_commit_round_says_whether_it_may_have_committed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, committing: bool
) -> None:
    """A worker paused past its session timeout mid-round: the retry of its
    commit meets the fence of a successor that may have completed it."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    task = _FencedTask(settings.topics.commands, committing=committing)
    _owning(engine, task)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        await engine._commit(due_only=False)
    assert task.closed
    assert engine._tasks == {}
    [line] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert line.startswith("commands[0]: fenced: another worker owns this task now")
    said = "its transaction may or may not have been committed"
    assert (said in line) == committing
    assert (engine.aborts, engine.commits_unknown) == ((0, 1) if committing else (1, 0))


class _StartRecordingTask:
    """Stands in for Task where the engine builds one (``_begin_start``)."""

    started: ClassVar[list[TaskId]] = []

    def __init__(self, stage: Stage, partition: int, **_: object) -> None:
        self.id = TaskId(stage.name, partition)
        self.stage = stage
        self.partition = partition
        self.inputs = [TopicPartition(topic, partition) for topic in stage.inputs]
        self.active = False
        self.checkpoint = None
        self.closed = False

    async def start(self) -> int:
        # Task.start: InitProducerId on the task's transactional id, then the stores.
        self.started.append(self.id)
        return 0

    async def close(self) -> None:
        self.closed = True


class _PausingConsumer(_Consumer):
    def pause(self, *partitions: object) -> None:
        pass

    async def commit(self, offsets: object) -> None:
        pass


async def test_a_task_restarted_as_its_partition_is_revoked_never_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit round that failed ends inside the revocation, which restarts the
    task; the revocation then drops the new task. Before, its starter went on:
    it took the transactional id (fencing the partition's new owner, whose next
    commit failed) and opened the stores, and stayed listed as starting."""
    monkeypatch.setattr(engine_module, "Task", _StartRecordingTask)
    _StartRecordingTask.started = []
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._consumer = _PausingConsumer()  # type: ignore[assignment]
    failing = _StartRecordingTask(engine.stages[0], 0)
    failing.active = True
    _owning(engine, failing)

    async def failed_commit() -> None:
        raise CheckpointError("KafkaTimeoutError")

    commits = asyncio.gather(engine._counted(failed_commit()), return_exceptions=True)
    engine._round = engine_module._Round([failing], commits)  # type: ignore[list-item]
    await engine.on_partitions_revoked(set(failing.inputs))
    await asyncio.sleep(0.05)
    assert engine._tasks == {}
    assert engine._starting == {}
    assert _StartRecordingTask.started == []
    assert failing.closed


class _SlowToCloseTask(_StartRecordingTask):
    """A task whose producer takes a while to stop (broker trouble) and to start."""

    made: ClassVar[list[_SlowToCloseTask]] = []

    def __init__(self, stage: Stage, partition: int, **_: object) -> None:
        super().__init__(stage, partition)
        self.made.append(self)

    async def start(self) -> int:
        await asyncio.sleep(0.05)  # InitProducerId
        return await super().start()

    async def close(self) -> None:
        await asyncio.sleep(0.1)
        await super().close()

    def consumed_positions(self) -> dict[TopicPartition, int]:
        return {}

    def activate(self, positions: object) -> None:
        self.active = True


class _StrictlyAssignedConsumer:
    """Refuses, as aiokafka does, to seek or resume a partition not assigned."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned

    def _check(self, partitions: Iterable[TopicPartition]) -> None:
        for tp in partitions:
            if tp not in self.assigned:
                raise IllegalStateError(f"No current assignment for partition {tp}")

    def pause(self, *partitions: TopicPartition) -> None:
        self._check(partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._check(partitions)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self._check([tp])

    async def committed(self, tp: TopicPartition) -> int:
        return 0

    async def commit(self, offsets: object) -> None:
        pass


async def test_a_task_restarting_as_a_rebalance_begins_is_revoked_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main loop restarts a task after a failed commit, and the group
    rebalances while the old task's producer stops. The revocation counted its
    tasks before it waited for the restart: the new task escaped it, and its
    starter failed the whole worker seeking a partition another worker then
    owned (or, started already, went on answering queries from a stale store)."""
    monkeypatch.setattr(engine_module, "Task", _SlowToCloseTask)
    _SlowToCloseTask.made = []
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    failing = _SlowToCloseTask(engine.stages[0], 0)
    failing.active = True
    consumer = _StrictlyAssignedConsumer(set(failing.inputs))
    engine._consumer = consumer  # type: ignore[assignment]
    _owning(engine, failing)

    async def main_loop() -> None:
        async with engine._lock:  # as the loop's restart of a task holds it
            await engine._restart(failing, CheckpointError("KafkaTimeoutError"))  # type: ignore[arg-type]

    restarting = asyncio.create_task(main_loop())
    await asyncio.sleep(0.02)  # the old task's close under way
    await engine.on_partitions_revoked(set(failing.inputs))
    consumer.assigned = set()  # the partition is another worker's now
    await engine.on_partitions_assigned(set())
    await restarting
    await asyncio.sleep(0.2)
    assert engine._failure is None
    assert engine._tasks == {}
    assert engine._starting == {}
    [old, new] = _SlowToCloseTask.made
    assert old is failing
    assert old.closed
    assert new.closed
    assert not new.active


class _TaskTimedOutOnRevocation(_FencedTask):
    async def commit(self) -> None:
        raise CheckpointError("KafkaTimeoutError")


@pytest.mark.parametrize(
    ("guarantee", "said"),
    [("exactly_once", "aborted"), ("at_least_once", "its outputs may be out already")],
)
async def test_a_commit_failed_on_revocation_says_what_became_of_its_outputs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, guarantee: str, said: str
) -> None:
    """Under at_least_once there is no transaction to abort: 'aborted' told an
    operator that outputs already visible downstream were not."""
    settings = Settings(data_dir=tmp_path, processing_guarantee=guarantee)  # type: ignore[arg-type]
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    task = _TaskTimedOutOnRevocation(settings.topics.commands)
    _owning(engine, task)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        await engine.on_partitions_revoked(set(task.inputs))
    [line] = [r.getMessage() for r in caplog.records if "revocation" in r.getMessage()]
    assert f"KafkaTimeoutError')): {said}; the next owner processes its records again" in line
    assert task.closed


class _TaskAnswerLostOnRevocation(_FencedTask):
    async def commit(self) -> None:
        raise CommitOutcomeUnknownError(
            "KafkaError: ... (the commit was sent: it may have been made)"
        )


async def test_a_commit_whose_answer_was_lost_on_revocation_is_not_called_aborted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker restart can cut a commit's answer after the commit is made:
    'aborted' (and the abort counter) told an operator that outputs visible
    downstream were not."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    task = _TaskAnswerLostOnRevocation(settings.topics.commands)
    _owning(engine, task)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        await engine.on_partitions_revoked(set(task.inputs))
    [line] = [r.getMessage() for r in caplog.records if "revocation" in r.getMessage()]
    assert "no answer to say whether it was made" in line
    assert "aborted" not in line
    assert (engine.commits, engine.aborts, engine.commits_unknown) == (0, 0, 1)
    assert task.closed


class _TaskRefusedOnRevocation(_FencedTask):
    """Its changelog's Write ACL was taken away: the commit on revocation is refused."""

    async def commit(self) -> None:
        raise NotAuthorizedError(
            ConfigurationError("Kafka does not authorize this worker's principal: ...")
        )


async def test_a_commit_refused_on_revocation_stops_the_worker(tmp_path: Path) -> None:
    """Before, it was a warning, and the worker went on until it met the refusal again."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(1, 1_048_588))
    task = _TaskRefusedOnRevocation(settings.topics.commands)
    _owning(engine, task)
    await engine.on_partitions_revoked(set(task.inputs))
    assert task.closed
    assert engine._tasks == {}
    assert engine._stopping.is_set()
    assert isinstance(engine._failure, ConfigurationError)


class _TaskCommittingWithOthers:
    """Its commit on revocation ends only once every revoked task's has begun."""

    def __init__(
        self, commands_topic: str, partition: int, begun: list[int], all_begun: Event
    ) -> None:
        self.id = TaskId("commands", partition)
        self.inputs = [TopicPartition(commands_topic, partition)]
        self.active = True
        self.checkpoint = object()
        self.closed = False
        self._begun, self._all_begun = begun, all_begun

    async def commit(self) -> None:
        self._begun.append(self.id.partition)
        if len(self._begun) == 6:
            self._all_begun.set()
        await self._all_begun.wait()

    async def close(self) -> None:
        self.closed = True


async def test_revoked_tasks_commit_together_so_a_rebalance_waits_for_one_commit(
    tmp_path: Path,
) -> None:
    """One after another, a joining worker waited for the sum of a revoking
    worker's commits (12 tasks each), not for one as the README says."""
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(6, 1_048_588))
    begun: list[int] = []
    all_begun = Event()
    tasks = [
        _TaskCommittingWithOthers(settings.topics.commands, p, begun, all_begun) for p in range(6)
    ]
    _owning(engine, *tasks)
    revoked = {tp for task in tasks for tp in task.inputs}
    # One after another, the first commit would wait for ever (bounded here).
    await asyncio.wait_for(engine.on_partitions_revoked(revoked), timeout=30)
    assert sorted(begun) == list(range(6))
    assert all(task.closed for task in tasks)
    assert engine._tasks == {}


class _CommittingTask:
    """An active task whose transaction is in a commit round."""

    def __init__(self, closed: list[str]) -> None:
        self.id = TaskId("commands", 0)
        self.inputs: list[object] = []
        self.active = True
        self.checkpoint = None
        self._closed = closed

    def commit_due(self, now: float) -> bool:
        return False

    async def close(self) -> None:
        self._closed.append("committing task closed")


class _TaskRefusedItsChangelog:
    """A stage-2 task whose restore is refused (no Read on its changelog)."""

    def __init__(self) -> None:
        self.id = TaskId("profiles", 0)
        self.inputs: list[object] = []
        self.active = False

    async def start(self) -> int:
        await asyncio.sleep(0.01)
        raise TopicAuthorizationFailedError("app-first-sessions-changelog")

    async def close(self) -> None:
        pass


class _LeavingConsumer(_Consumer):
    def pause(self, *partitions: object) -> None:
        pass

    async def stop(self) -> None:
        pass


async def test_a_start_refused_while_a_round_commits_leaves_the_round_to_finish(
    tmp_path: Path,
) -> None:
    """Before, the refused starter waited for the round outside the engine's
    lock; the stop then cancelled the starter, and with it the other tasks'
    transactions midway: the worker could not close them and exited 1."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._consumer = _LeavingConsumer()  # type: ignore[assignment]
    log: list[str] = []
    committing = _CommittingTask(log)
    _owning(engine, committing)

    async def commit_in_flight() -> None:
        try:
            await asyncio.sleep(0.5)  # EndTxn on its way
            log.append("commit finished")
        except asyncio.CancelledError:
            log.append("commit cancelled")
            raise

    commits = asyncio.gather(engine._counted(commit_in_flight()), return_exceptions=True)
    engine._round = engine_module._Round([committing], commits)  # type: ignore[list-item]
    refused = _TaskRefusedItsChangelog()
    _owning(engine, refused)
    starter = asyncio.create_task(engine._start(refused))  # type: ignore[arg-type]
    engine._starting[refused.id] = starter
    await asyncio.sleep(0.05)
    assert engine._stopping.is_set()
    assert isinstance(engine._failure, ConfigurationError)
    assert refused.id not in engine._tasks
    assert engine._round is not None  # still the main loop's to finish
    await engine._close(_LeavingConsumer())  # type: ignore[arg-type]
    assert log == ["commit finished", "committing task closed"], log
    assert engine.commits == 1


@pytest.mark.parametrize(
    ("error", "counted", "said"),
    [
        # It was logged 'transaction failed ... aborted' and counted neither
        # committed nor aborted, though its outputs were visible downstream.
        (
            StoreWriteError("StoreError: cannot write the store at ...: No space left"),
            (1, 0, 0),
            "transaction committed, but its stores could not be written",
        ),
        # A broker restart can cut a commit's answer after the commit is made:
        # it was logged 'transaction failed ... aborted' and counted as an abort.
        (
            CommitOutcomeUnknownError(
                "KafkaError: ... (the commit was sent: it may have been made)"
            ),
            (0, 0, 1),
            "the commit failed with no answer to say whether it was made",
        ),
    ],
    ids=["store-write-failed", "answer-lost"],
)
async def test_a_commit_that_may_have_been_made_is_not_counted_or_said_aborted(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    counted: tuple[int, int, int],
    said: str,
) -> None:
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))

    async def failing() -> None:
        raise error

    with pytest.raises(type(error)):
        await engine._counted(failing())
    assert (engine.commits, engine.aborts, engine.commits_unknown) == counted
    task = _FencedTask(engine.settings.topics.commands)
    _owning(engine, task)
    engine.stop()  # so that the restart drops the stand-in and starts nothing
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        await engine._restart(task, error)  # type: ignore[arg-type]
    [line] = [r.getMessage() for r in caplog.records if "commands[0]" in r.getMessage()]
    assert said in line
    assert "aborted" not in line


class _TaskRefusedAnOutputTopic:
    def __init__(self) -> None:
        self.id = TaskId("commands", 0)
        self.inputs = [TopicPartition("sessions.commands", 0)]
        self.active = True
        self.checkpoint = None

    async def handle_many(self, records: object, limit: int) -> None:
        # Checkpoint.send asks for the partitions of an output topic the principal
        # may not describe: aiokafka's client raises this.
        raise TopicAuthorizationFailedError("sessions.rejected")

    def held_bytes(self) -> int:
        return 0

    async def close(self) -> None:
        pass


async def test_an_output_topic_the_worker_may_not_describe_stops_it(tmp_path: Path) -> None:
    """Before, the task was restarted, met the same refusal, and so on for ever."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    restarts: list[int] = []
    engine._begin_start = lambda stage, partition: restarts.append(partition)  # type: ignore[method-assign]
    task = _TaskRefusedAnOutputTopic()
    _owning(engine, task)
    await engine._process({task.inputs[0]: [object()]})
    assert restarts == []
    assert engine._stopping.is_set()
    assert isinstance(engine._failure, ConfigurationError)
    assert "sessions.rejected" in str(engine._failure)
    assert task.id not in engine._tasks


class _TaskThatCommitted:
    """Stands for a Task whose transactions committed ``committed``."""

    def __init__(self, stage: str, partition: int, committed: dict[TopicPartition, int]) -> None:
        self.id = TaskId(stage, partition)
        self.inputs = list(committed)
        self.committed = committed


class _SlowPurger:
    """Records each purge it is asked for, which lasts until ``done`` is set."""

    def __init__(self) -> None:
        self.asked: list[dict[TopicPartition, int]] = []
        self.done = Event()
        self.cancelled = 0
        self.closed = 0

    async def purge(self, committed: dict[TopicPartition, int]) -> None:
        self.asked.append(committed)
        try:
            await self.done.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def close(self) -> None:
        self.closed += 1


async def test_purges_ask_for_the_internal_topics_committed_offsets_one_at_a_time(
    tmp_path: Path,
) -> None:
    """The command topic is the user's: only the re-key and by-profile topics
    are purged (as Kafka Streams purges only its repartition topics)."""
    settings = Settings(data_dir=tmp_path, app_id="shop")
    commands, rekeyed = (
        TopicPartition("sessions.commands", 1),
        TopicPartition("shop-sessions.rekeyed", 1),
    )
    by_profile = TopicPartition("shop-sessions.by-profile", 1)
    engine = _owning(
        Engine(settings, TopicLayout(2, 1_048_588)),
        _TaskThatCommitted("commands", 1, {commands: 40, rekeyed: 3}),
        _TaskThatCommitted("profiles", 1, {by_profile: 7}),
    )
    purger = _SlowPurger()
    engine.purger = purger  # type: ignore[assignment]
    engine._purge(1.0)
    await asyncio.sleep(0)
    engine._purge(2.0)  # the first is still going: not another
    await asyncio.sleep(0)
    assert purger.asked == [{rekeyed: 3, by_profile: 7}]
    purger.done.set()
    await asyncio.sleep(0)
    engine._purge(3.0)
    await asyncio.sleep(0)
    assert len(purger.asked) == 2
    await engine._stop_purging()
    assert engine._purging is None


async def test_a_stop_cancels_the_purge_in_flight_and_closes_its_client(tmp_path: Path) -> None:
    engine = Engine(Settings(data_dir=tmp_path, app_id="shop"), TopicLayout(1, 1_048_588))
    purger = _SlowPurger()
    engine.purger = purger  # type: ignore[assignment]
    engine._purge(1.0)
    await asyncio.sleep(0)
    await asyncio.wait_for(engine._close(_LeavingConsumer()), 5)  # type: ignore[arg-type]
    assert (purger.cancelled, purger.closed) == (1, 1)
    assert engine._purging is None


class _InputsAt:
    """A task's inputs: ``positions`` processed so far."""

    def __init__(self, task_id: TaskId, positions: dict[TopicPartition, int], active: bool) -> None:
        self.id = task_id
        self.inputs = list(positions)
        self.positions = dict(positions)
        self.active = active


class _PositionedConsumer:
    """Where the consumer stands on each input (None: being reset; an
    exception: what the group coordinator met), and each last stable offset."""

    def __init__(
        self,
        positions: dict[TopicPartition, int | Exception | None],
        stable: dict[TopicPartition, int],
    ) -> None:
        self.positions = positions
        self.stable = stable
        self.asked: list[TopicPartition] = []
        #: Resets waited for right now, the most at any one time, and those
        #: given up (cancelled): what shows how the engine waited, no clock needed.
        self.resetting = 0
        self.most_resetting = 0
        self.resets_given_up = 0

    async def position(self, tp: TopicPartition) -> int:
        self.asked.append(tp)
        if tp not in self.positions:
            raise IllegalStateError(f"Partition {tp} is not assigned")
        position = self.positions[tp]
        if isinstance(position, Exception):
            raise position
        if position is None:  # being reset: aiokafka waits for the new position
            self.resetting += 1
            self.most_resetting = max(self.most_resetting, self.resetting)
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.resets_given_up += 1
                raise
            finally:
                self.resetting -= 1
            raise AssertionError("waited for a reset")
        return position

    def last_stable_offset(self, tp: TopicPartition) -> int:
        assert tp in self.positions, "aiokafka asserts the partition is assigned"
        return self.stable[tp]


async def test_positions_pass_commit_markers_so_an_idle_worker_shows_no_lag(
    tmp_path: Path,
) -> None:
    """Before, every input written in transactions (the re-key and by-profile
    topics, always) showed a lag of 1 at rest, its last commit marker: the
    worker never looked caught up, and StreamAppStalled paged on idle workers."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    marker, plain, behind, resetting, resetting_too, gone, idle = (
        TopicPartition(f"t{i}", 0) for i in range(7)
    )
    active = _InputsAt(
        TaskId("commands", 0),
        {marker: 10, plain: 5, behind: 7, resetting: 3, resetting_too: 1, gone: 4},
        active=True,
    )
    starting = _InputsAt(TaskId("profiles", 0), {idle: 2}, active=False)
    _owning(engine, active, starting)
    consumer = _PositionedConsumer(
        # The consumer skipped the marker at 10; nothing past 5; 7 moved back
        # by a seek; two being reset; ``gone`` no longer assigned.
        {marker: 11, plain: 5, behind: 6, resetting: None, resetting_too: None, idle: 9},
        {marker: 11, plain: 5, behind: 9, resetting: 8, resetting_too: 1, idle: 9},
    )
    engine._consumer = consumer  # type: ignore[assignment]
    active.inputs.remove(gone)
    assert engine.lag()[marker.topic, 0] == 1
    active.inputs.append(gone)

    async with asyncio.timeout(5):  # no task of its own: no extra turn of the loop
        await engine._pass_skipped(consumer)  # type: ignore[arg-type]
    # The two resets were waited for together (one after the other, each wait
    # would add up), and given up rather than waited out, before the pass ended.
    assert consumer.most_resetting == 2
    assert consumer.resets_given_up == 2
    assert consumer.resetting == 0

    assert active.positions == {
        marker: 11,
        plain: 5,
        behind: 7,
        resetting: 3,
        resetting_too: 1,
        gone: 4,
    }
    assert starting.positions == {idle: 2}  # not started: its records were not processed
    assert idle not in consumer.asked
    active.inputs.remove(gone)  # its revocation would drop the task
    assert engine.lag() == {("t0", 0): 0, ("t1", 0): 0, ("t2", 0): 2, ("t3", 0): 5, ("t4", 0): 0}
    assert engine._failure is None


async def test_a_refusal_met_asking_a_position_stops_the_worker_as_a_poll_would(
    tmp_path: Path,
) -> None:
    """position() raises what the group coordinator met (aiokafka pops it):
    swallowed, a GroupAuthorizationFailed would have waited for the next poll."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    tp = TopicPartition("t", 0)
    _owning(engine, _InputsAt(TaskId("commands", 0), {tp: 1}, active=True))
    refused = _PositionedConsumer({tp: GroupAuthorizationFailedError()}, {})
    await engine._pass_skipped(refused)  # type: ignore[arg-type]
    assert isinstance(engine._failure, ConfigurationError)
    assert engine._stopping.is_set()
    engine._failure = None
    asked = _PositionedConsumer({tp: 5}, {tp: 5})
    await engine._pass_skipped(asked)  # type: ignore[arg-type]
    assert asked.asked == []  # stopping: nothing is asked any more
    engine._stopping.clear()
    broken = _PositionedConsumer({tp: KafkaConnectionError()}, {})
    with pytest.raises(KafkaConnectionError):
        await engine._pass_skipped(broken)  # type: ignore[arg-type]


async def test_a_commit_round_waiting_long_on_kafka_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that cannot be reached holds a commit round (aiokafka retries
    its transactional requests), and with it the processing. In a black-box
    run with the broker down for two minutes, the worker's log held only
    aiokafka's connection errors: nothing said that processing had stopped."""
    monkeypatch.setattr(engine_module, "_ROUND_WAIT_WARN_S", 0.05)
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    commits: asyncio.Future[list[BaseException | None]] = asyncio.Future()
    engine._round = engine_module._Round([], commits)
    finishing = asyncio.ensure_future(engine._finish_round())
    counting = _Counting("has waited", times=2)
    engine_module.log.addHandler(counting)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        try:
            await asyncio.wait_for(counting.reached.wait(), timeout=30)
        finally:
            engine_module.log.removeHandler(counting)
        assert not finishing.done()
        commits.set_result([])
        await finishing
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "a commit round of 0 transaction(s) has waited " in warnings[0]
    assert "no record is processed once the next round is due" in warnings[0]


async def test_a_slow_commit_round_is_logged_once_per_interval_of_its_age(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Once for each interval of its age, however often it is asked, and once
    for several intervals that passed while nothing asked (the event loop
    held up), not once for each of them."""
    interval = engine_module._ROUND_WAIT_WARN_S
    commits: asyncio.Future[list[BaseException | None]] = asyncio.Future()
    slow = engine_module._Round([], commits, began=time.monotonic() - interval - 1)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        for _ in range(3):
            slow.warn_if_slow()
        engine_module._Round([], commits).warn_if_slow()  # a new one: not slow
        slow.began -= 3 * interval  # three more intervals, unseen
        slow.warn_if_slow()
        slow.warn_if_slow()
        commits.set_result([])
        slow.began -= interval
        slow.warn_if_slow()  # ended: nothing to say
    ages = [int(r.getMessage().split("has waited ")[1].split(" s")[0]) for r in caplog.records]
    assert len(ages) == 2, ages
    assert interval < ages[0] < 2 * interval
    assert 4 * interval < ages[1] < 5 * interval


class _IdleConsumer:
    """A consumer with nothing to fetch: the worker polls on, as it does while
    its brokers are unreachable."""

    def __init__(self, **options: Any) -> None:
        self.topics_shown: set[str] = set()

    async def start(self) -> None:
        pass

    async def topics(self) -> set[str]:
        return self.topics_shown

    def subscribe(self, topics: list[str], listener: object) -> None:
        self.topics_shown = set(topics)

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, Any]:
        await asyncio.sleep(timeout_ms / 1000)
        return {}

    async def stop(self) -> None:
        pass


async def test_the_main_loop_logs_a_slow_commit_round_nobody_waits_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Checked live first: a worker that had caught up when its broker was
    killed logged nothing of its own, as no record was left to make it wait
    for the round in flight. The loop asks the round after each poll."""
    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", _IdleConsumer)
    monkeypatch.setattr(engine_module, "_TOPICS_VISIBLE_WAIT_S", 0.0)
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    commits: asyncio.Future[list[BaseException | None]] = asyncio.Future()
    interval = engine_module._ROUND_WAIT_WARN_S
    engine._round = engine_module._Round([], commits, began=time.monotonic() - interval - 1)
    counting = _Counting("has waited", times=1)
    engine_module.log.addHandler(counting)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        running = asyncio.ensure_future(engine._consume())
        try:
            await asyncio.wait_for(counting.reached.wait(), timeout=30)
        finally:
            engine_module.log.removeHandler(counting)
            commits.set_result([])
            engine.stop()
            await running
    assert any("has waited" in r.getMessage() for r in caplog.records)


class _Counting(logging.Handler):
    """Sets ``reached`` once ``text`` has been logged ``times`` times."""

    def __init__(self, text: str, times: int) -> None:
        super().__init__()
        self.text, self.left, self.reached = text, times, asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.left -= 1
            if self.left <= 0:
                self.reached.set()


def test_a_stopping_worker_is_not_ready(tmp_path: Path) -> None:
    """A worker that SIGTERM is stopping still answered /readyz with 200 and
    queries from stores its tasks were about to close; a load balancer kept
    sending it queries until the pod was gone."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._joined = True
    assert engine.ready
    engine.stop()
    assert not engine.ready
    assert engine.status()["stopping"] is True
    lookup = engine.session_lookup(1, "cart-1")
    assert lookup.unavailable is not None


async def test_a_settings_read_refused_before_the_settings_load_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The topic's read permission taken away, with records on it: the first
    fetch is refused before the settings are loaded. The engine raised the
    client's own error, so the worker said 'the worker failed' with a
    traceback and exit 1, where docs/operations.md says exit 2."""

    async def follower_refused(settings: Settings, registry: object, ready: Event) -> None:
        raise TopicAuthorizationFailedError

    monkeypatch.setattr(engine_module, "follow_settings_topic", follower_refused)
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    with pytest.raises(ConfigurationError, match="does not authorize"):
        await asyncio.wait_for(engine.run(), timeout=5)


async def test_the_main_loop_restarts_a_task_whose_store_a_query_found_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A corrupt block that only queries read left their sessions 503 until
    the task next closed: the loop now restarts the task after its next poll."""
    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", _IdleConsumer)
    monkeypatch.setattr(engine_module, "_TOPICS_VISIBLE_WAIT_S", 0.0)
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))

    class _Store:
        corrupted = True

    class _Task:
        id = TaskId("commands", 0)
        active = True
        stores: ClassVar[dict[str, object]] = {"sessions": _Store()}

        def commit_due(self, now: float) -> bool:
            return False  # nothing to commit: the poll is what brings the restart

        def commit_due_in(self, now: float) -> float | None:
            return None

        def held_bytes(self) -> int:
            return 0

    engine._tasks[_Task.id] = _Task()  # type: ignore[assignment]
    restarted = asyncio.Event()

    async def restart(task: object, exc: BaseException) -> None:
        assert exc is engine_module._CORRUPT_READ
        engine._tasks.clear()
        restarted.set()

    engine._restart = restart  # type: ignore[method-assign]
    running = asyncio.ensure_future(engine._consume())
    try:
        await asyncio.wait_for(restarted.wait(), timeout=10)
    finally:
        engine.stop()
        await running


class _FlakyFlushes:
    def __init__(self) -> None:
        self.calls = 0
        self.third = asyncio.Event()

    def flush_idle(self) -> int:
        self.calls += 1
        if self.calls == 3:
            self.third.set()
        if self.calls == 1:
            raise StoreError("cannot flush")
        return 0


async def test_quiet_stores_are_flushed_beside_the_loop_and_a_failure_stops_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Beside the loop, which a rebalance or an outage holds up: a store that
    fell quiet then was flushed only after it (README: 10-20 s)."""
    monkeypatch.setattr(engine_module, "_FLUSH_IDLE_EVERY_S", 0.01)
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    flushes = _FlakyFlushes()
    engine._resources = flushes  # type: ignore[assignment]
    flushing = asyncio.create_task(engine._flush_quiet_stores())
    with caplog.at_level("ERROR", logger="stream_app.pipeline.engine"):
        await asyncio.wait_for(flushes.third.wait(), timeout=30)
    flushing.cancel()
    assert [r.getMessage() for r in caplog.records] == [
        "flushing the stores not written lately failed"
    ]


class _OpenTransaction:
    closed = False


def test_a_poll_waits_no_longer_than_the_first_open_transaction_has_left(
    tmp_path: Path,
) -> None:
    """A poll of a whole checkpoint interval, begun just before a transaction
    fell due, committed it almost two intervals after it opened, its outputs
    held back as long."""
    settings = Settings(data_dir=tmp_path, checkpoint_interval_s=30)
    engine = Engine(settings, TopicLayout(2, 1_048_588))
    tasks = [_bare_task(settings, tmp_path, partition) for partition in (0, 1)]
    for task in tasks:
        task.active = True
    _owning(engine, *tasks)
    assert engine._poll_ms(1000.0) == 30_000  # no transaction open
    tasks[0].checkpoint = _OpenTransaction()  # type: ignore[assignment]
    tasks[0]._opened_at = 1000.0
    tasks[1].checkpoint = _OpenTransaction()  # type: ignore[assignment]
    tasks[1]._opened_at = 1010.0
    assert engine._poll_ms(1029.0) == 1_000  # the first falls due at 1030
    assert engine._poll_ms(1031.0) == 1  # due: the loop commits it after this poll
    tasks[0].checkpoint.closed = True  # sealed, in a commit round
    assert engine._poll_ms(1031.0) == 9_000
    tasks[1].active = False  # a task restoring takes no record
    assert engine._poll_ms(1031.0) == 30_000


class _GroupConsumer:
    """Stands for the engine's group consumer: ``start`` as the class says,
    then polls that return nothing until the engine stops."""

    unreachable_starts: ClassVar[int] = 0
    start_hangs: ClassVar[bool] = False

    def __init__(self, **options: object) -> None:
        self.starts = 0
        self.subscribed = False
        self.stopped = False

    async def start(self) -> None:
        self.starts += 1
        if self.start_hangs:
            await asyncio.sleep(3600)  # a broker that accepts and never answers
        if self.starts <= self.unreachable_starts:
            raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]")

    async def topics(self) -> set[str]:
        return {
            "sessions.commands",
            "stream-app-sessions.rekeyed",
            "stream-app-sessions.by-profile",
        }

    def subscribe(self, topics: list[str], listener: object) -> None:
        self.subscribed = True

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        await asyncio.sleep(0.01)
        return {}

    def assignment(self) -> set[TopicPartition]:
        return set()

    def paused(self) -> set[TopicPartition]:
        return set()

    async def stop(self) -> None:
        self.stopped = True


def _engine_on(
    consumer: type[_GroupConsumer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    refused: str | None = None,
) -> Engine:
    async def loaded_settings(settings: Settings, registry: object, ready: Event) -> None:
        ready.set()
        await asyncio.sleep(3600)

    async def refused_worker(settings: Settings, stopping: object) -> ConfigurationError | None:
        return None if refused is None else ConfigurationError(f"refuses this worker: {refused}")

    monkeypatch.setattr(engine_module, "follow_settings_topic", loaded_settings)
    monkeypatch.setattr(engine_module, "refused_worker", refused_worker)
    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", consumer)
    monkeypatch.setattr(engine_module, "KAFKA_RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(engine_module, "_TOPICS_VISIBLE_WAIT_S", 0.0)
    return Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))


async def test_a_new_group_s_outputs_are_looked_at_before_the_worker_joins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Looked at beside the processing, the outputs a new app id's worker had
    just written itself (and committed offsets with) hid the warning on a
    dev broker; looked at by each task as it started, a task's partners'
    outputs made a false one."""

    engine = _engine_on(_GroupConsumer, tmp_path, monkeypatch)
    engine.output_partitions = {engine.settings.topics.closed: 1}
    group = _Offsets({TopicPartition(engine.settings.topics.closed, 0): 3})
    group.install(engine)
    asked: list[bool] = []
    looking = group.read

    async def read(group_id: str) -> dict[TopicPartition, tuple[int, str]]:
        asked.append(engine._consumer.subscribed)  # type: ignore[union-attr]
        return await looking(group_id)

    group.read = read  # type: ignore[method-assign]
    running = asyncio.create_task(engine.run())
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        while engine._consumer is None or not engine._consumer.subscribed:  # type: ignore[attr-defined]
            assert not running.done(), running
            await asyncio.sleep(0.01)
    engine.stop()
    await asyncio.wait_for(running, timeout=5)
    assert asked == [False, False]  # before, and again after, the outputs
    assert group.closed  # its client is the worker's until it stops
    assert any("has committed no offset" in r.getMessage() for r in caplog.records)


async def test_kafka_lost_before_the_group_join_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Lost between the topic check and the join, Kafka was a traceback and
    exit 1, where every other step of the start waits for it."""

    class Unreachable(_GroupConsumer):
        unreachable_starts = 2

    engine = _engine_on(Unreachable, tmp_path, monkeypatch)
    running = asyncio.create_task(engine.run())
    with caplog.at_level("WARNING", logger="stream_app.pipeline.engine"):
        while engine._consumer is None or not engine._consumer.subscribed:  # type: ignore[attr-defined]
            assert not running.done(), running
            await asyncio.sleep(0.01)
    consumer = engine._consumer
    assert consumer.starts == 3  # type: ignore[attr-defined]
    retried = [r.getMessage() for r in caplog.records if "to join the group" in r.getMessage()]
    assert len(retried) == 2
    assert "cannot be reached to join the group (KafkaConnectionError: Unable" in retried[0]
    engine.stop()
    await asyncio.wait_for(running, timeout=5)
    assert engine.stopped_cleanly


async def test_kafka_refusing_the_worker_before_the_join_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka reports a certificate or credentials it refuses as a failed
    bootstrap: retried as unreachable, the worker stayed unready until its
    startup probe ran out (30 min), where its start names the refusal."""

    class Refusing(_GroupConsumer):
        unreachable_starts = 1

    refused = "SSLCertVerificationError: certificate verify failed"
    engine = _engine_on(Refusing, tmp_path, monkeypatch, refused=refused)
    with pytest.raises(ConfigurationError, match=f"refuses this worker: {refused}"):
        await asyncio.wait_for(engine.run(), timeout=5)
    assert engine._consumer.stopped  # type: ignore[union-attr]


async def test_a_stop_while_the_group_consumer_starts_ends_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that accepts connections and never answers held the stop for
    the request timeout, past the shutdown bound: exit 1, owning nothing."""

    began = Event()

    class Hanging(_GroupConsumer):
        start_hangs = True

        async def start(self) -> None:
            began.set()
            await super().start()

    engine = _engine_on(Hanging, tmp_path, monkeypatch)
    running = asyncio.create_task(engine.run())
    await asyncio.wait_for(began.wait(), timeout=5)
    engine.stop()
    await asyncio.wait_for(running, timeout=5)
    assert engine._consumer.stopped  # type: ignore[attr-defined]
    assert not engine._consumer.subscribed  # type: ignore[attr-defined]
    assert engine.stopped_cleanly


@pytest.mark.parametrize(
    ("refusal", "said"),
    [
        (
            InvalidSessionTimeoutError,
            "Kafka refuses STREAM_APP_SESSION_TIMEOUT_S=30: it is outside",
        ),
        (InconsistentGroupProtocolError, "another application uses STREAM_APP_APP_ID=stream-app"),
    ],
)
async def test_a_join_the_coordinator_refuses_for_good_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: type[Exception], said: str
) -> None:
    """A session timeout outside the brokers' bounds, or another application
    in the group: each restart crashed with a traceback and exit 1, which
    the runbook reads as a bug of ours, naming no setting."""

    engine = _engine_on(_GroupConsumer, tmp_path, monkeypatch)
    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", _polls_failing(engine, refusal()))
    with pytest.raises(ConfigurationError, match=said):
        await asyncio.wait_for(engine.run(), timeout=5)


@pytest.mark.parametrize(
    ("url", "routed", "mended", "said"),
    [
        # workers given one address: other members hold partitions 1 and 2 under it
        ("http://x", {0: "http://x", 1: "http://x", 2: "http://x"}, None, True),
        # a worker restarted at its address while its former self was a member:
        # the group drops it, and the rebalance revokes before the bound
        ("http://x", {0: "http://x", 1: "http://x"}, "revoked", False),
        # ... or after one session timeout (its coordinator moved, say)
        ("http://x", {0: "http://x", 1: "http://x"}, "revoked later", False),
        ("http://x", {0: "http://x", 1: "http://y"}, None, False),  # its own URL alone
        ("", {0: "", 1: ""}, None, False),  # no HTTP server: nothing advertised
    ],
)
async def test_a_url_other_members_advertise_is_an_error_once_it_outlasts_two_session_timeouts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    url: str,
    routed: dict[int, str],
    mended: str | None,
    said: bool,
) -> None:
    """The group's leader said at ERROR that members shared an address, and
    the runbook called it a misconfiguration with 503s for ever, when a
    worker killed while it joined had been restarted at its address: the
    group drops the dead member within the session timeout."""
    monkeypatch.setattr(engine_module, "_URL_SHARED_GRACE_S", 0.4 - 6.0)  # the ERROR at 0.8 s
    engine = Engine(Settings(data_dir=tmp_path, session_timeout_s=6.0), TopicLayout(3, 1_048_588))
    engine.assignor.url = url
    commands = engine.settings.topics.commands
    engine.assignor.routes = {commands: routed}
    with caplog.at_level("ERROR", logger="stream_app.pipeline.engine"):
        engine._watch_the_url({TopicPartition(commands, 0)})
        if mended == "revoked":
            await engine.on_partitions_revoked(set())
        if mended == "revoked later":
            await asyncio.sleep(0.6)  # past one timeout and grace, 0.2 s before the ERROR
            await engine.on_partitions_revoked(set())
        await asyncio.sleep(1.2)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    if said:
        [error] = errors
        assert error.startswith(
            f"other group members advertise this worker's URL {url}, for 2 partitions "
            f"({commands}[1], {commands}[2])"
        )
        assert "STREAM_APP_ADVERTISED_HOST" in error
    else:
        assert errors == []
