"""The commit protocol of a task (Checkpoint), on an in-memory broker and real RocksDB.

Every test checks the three places a user would look after a commit or a
failure: what a read_committed consumer of the broker sees, which input
offsets the group has committed, and what RocksDB holds.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import (
    CommitFailedError,
    GroupAuthorizationFailedError,
    IllegalOperation,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    TopicAuthorizationFailedError,
)
from aiokafka.structs import ConsumerRecord, TopicPartition

from stream_app import json
from stream_app.errors import ConfigurationError
from stream_app.pipeline.checkpoint import (
    PHASES,
    ChangelogStore,
    Checkpoint,
    CheckpointError,
    CommitOutcomeUnknownError,
    NotAuthorizedError,
    Observer,
    StoreWriteError,
    TaskFencedError,
    decode_consumed,
    encode_consumed,
)
from stream_app.pipeline.engine import Engine
from stream_app.pipeline.processor import Limits, Outgoing, SourceRecord
from stream_app.pipeline.store import (
    CONSUMED_KEY,
    PartitionStore,
    RocksDBResources,
    StoreOverlay,
)
from stream_app.pipeline.tasks import Stage, Task
from stream_app.pipeline.topics import SESSION_IDS_STORE, SESSIONS_STORE, TopicLayout
from stream_app.pipeline.unreadable import RawRecord
from stream_app.settings import RocksDBSettings, Settings
from tests.pipeline.fakes import FailingWriteStore, FakeBroker, FakeProducer

GROUP = "app"
TXN_ID = "app-commands-0"
INPUT = TopicPartition("commands", 0)
CLOSED = "sessions.closed"
REJECTED = "sessions.rejected"
SESSIONS = "sessions"
IDS = "session-ids"
CHANGELOGS = {
    SESSIONS: TopicPartition("app-sessions-changelog", 0),
    IDS: TopicPartition("app-session-ids-changelog", 0),
}

#: What the first (seeding) transaction stores; it consumes input offsets 0 and 1.
SEED = {SESSIONS: {b"a": b"a1", b"b": b"b1", b"c": b"c1"}, IDS: {b"p0": b"1"}}
SEED_OUTPUT = Outgoing(CLOSED, b"z", b"seeded")
#: The batch under test (input offsets 2 to 4, see Rig.process_batch) ...
BATCH_OUTPUTS = (
    Outgoing(CLOSED, b"a", b"closed a", (("trace", b"1"),)),
    Outgoing(CLOSED, b"d", b"closed d"),
    Outgoing(REJECTED, b"x", b"rejected x"),
)
#: ... changes each store by one changelog record per key, newest value ...
BATCH_CHANGES: dict[str, list[tuple[bytes, bytes | None]]] = {
    SESSIONS: [(b"a", b"a3"), (b"d", b"d1"), (b"b", None)],
    IDS: [(b"p0", b"2")],
}
#: ... and leaves the stores so.
AFTER = {SESSIONS: {b"a": b"a3", b"c": b"c1", b"d": b"d1"}, IDS: {b"p0": b"2"}}

#: What each offset commit says besides the offset (checkpoint.offset_metadata).
OFFSET_METADATA = '{"partitions":1}'

OUTPUT_AND_CHANGELOG_PARTITIONS = (
    *CHANGELOGS.values(),
    *(TopicPartition(CLOSED, p) for p in range(3)),
    *(TopicPartition(REJECTED, p) for p in range(2)),
)

Visible = dict[str, list[tuple[bytes | None, bytes | None]]]


@dataclass
class Rig:
    """One task's pieces: a producer on the fake broker, its stores and overlays."""

    broker: FakeBroker
    producer: FakeProducer
    stores: dict[str, PartitionStore]
    exactly_once: bool = True
    overlays: dict[str, StoreOverlay] = field(init=False)

    def __post_init__(self) -> None:
        self.overlays = {name: StoreOverlay(store) for name, store in self.stores.items()}

    def checkpoint(
        self,
        commit_offsets: Callable[[Any], Awaitable[None]] | None = None,
        phases: Mapping[str, Observer] | None = None,
    ) -> Checkpoint:
        if commit_offsets is None and not self.exactly_once:
            commit_offsets = self.commit_offsets
        return Checkpoint(
            self.producer,
            {
                name: ChangelogStore(overlay, CHANGELOGS[name])
                for name, overlay in self.overlays.items()
            },
            group_id=GROUP,
            exactly_once=self.exactly_once,
            commit_offsets=commit_offsets,
            offset_metadata=OFFSET_METADATA,
            phases=phases,
        )

    async def commit_offsets(self, offsets: dict[TopicPartition, tuple[int, str]]) -> None:
        self.broker.commit_offsets(GROUP, offsets)

    async def seed(self) -> None:
        """A first, committed transaction, so that later ones start from real state."""
        checkpoint = self.checkpoint()
        for name, data in SEED.items():
            self.overlays[name].update(data)
        await checkpoint.send(SEED_OUTPUT)
        checkpoint.consumed(INPUT, 0)
        checkpoint.consumed(INPUT, 1)
        await checkpoint.commit()

    async def process_batch(self, checkpoint: Checkpoint) -> None:
        """Input offsets 2 to 4, written and sent as a processor would."""
        sessions, ids = self.overlays[SESSIONS], self.overlays[IDS]
        sessions[b"a"] = b"a2"
        sessions[b"d"] = b"d1"
        await checkpoint.send(BATCH_OUTPUTS[0])
        checkpoint.consumed(INPUT, 2)
        sessions[b"a"] = b"a3"  # the same key twice: one changelog record
        del sessions[b"b"]
        ids[b"p0"] = b"2"
        await checkpoint.send(BATCH_OUTPUTS[1])
        checkpoint.consumed(INPUT, 3)
        await checkpoint.send(BATCH_OUTPUTS[2])
        checkpoint.consumed(INPUT, 4)

    async def process_and_commit(self, checkpoint: Checkpoint) -> None:
        await self.process_batch(checkpoint)
        await checkpoint.commit()

    # -- what a user would look at ------------------------------------------------------------
    def visible(self) -> Visible:
        """Every record a read_committed consumer sees, per topic."""
        topics = [CLOSED, REJECTED, *(tp.topic for tp in CHANGELOGS.values())]
        return {topic: sorted(self.broker.committed_records(topic), key=repr) for topic in topics}

    def stored(self) -> dict[str, tuple[dict[bytes, bytes | None], int | None]]:
        """Each store's RocksDB data and changelog offset."""
        return {
            name: (contents(store), store.changelog_offset) for name, store in self.stores.items()
        }


def contents(store: PartitionStore) -> dict[bytes, bytes | None]:
    return {key: store.get(key) for key in store.keys()}  # noqa: SIM118 - a store, not a dict


def changelog_state(broker: FakeBroker, tp: TopicPartition) -> dict[bytes, bytes | None]:
    """The state a changelog describes: its read_committed records folded from the start."""
    state: dict[bytes, bytes | None] = {}
    for entry in broker.read_committed(tp):
        assert entry.key is not None
        if entry.key.startswith(b"\x00"):
            continue  # reserved (CONSUMED_KEY): not the store's data
        if entry.value is None:
            state.pop(entry.key, None)
        else:
            state[entry.key] = entry.value
    return state


def assert_no_open_transaction(broker: FakeBroker) -> None:
    """A transaction left open would stall every read_committed reader of its partitions."""
    for tp in broker.topic_partitions():
        assert broker.last_stable_offset(tp) == broker.end_offset(tp), tp


def visible_with_batch(before: Visible, *, exactly_once: bool = True) -> Visible:
    after = {topic: list(records) for topic, records in before.items()}
    for out in BATCH_OUTPUTS:
        after[out.topic].append((out.key, out.value))
    for name, changes in BATCH_CHANGES.items():
        after[CHANGELOGS[name].topic].extend(changes)
    if not exactly_once:  # the batch's consumed offsets, with the last store's changelog
        last = CHANGELOGS[list(CHANGELOGS)[-1]].topic
        after[last].append((CONSUMED_KEY, encode_consumed({INPUT: 5})))
    return {topic: sorted(records, key=repr) for topic, records in after.items()}


def replay_changelogs(broker: FakeBroker, stores: dict[str, PartitionStore]) -> None:
    """What ``tasks.restore`` does, on the fake broker: read each changelog
    (read_committed) from the store's recorded offset to its end and write it."""
    for name, store in stores.items():
        tp = CHANGELOGS[name]
        records = broker.read_committed(tp, store.changelog_offset or 0)
        if records:
            store.write(
                {r.key: r.value for r in records if r.key is not None}, records[-1].offset + 1
            )
        store.write({}, broker.end_offset(tp))


@pytest.fixture
def resources() -> RocksDBResources:
    return RocksDBResources(RocksDBSettings())


@pytest.fixture
def broker() -> FakeBroker:
    # Outputs spread over partitions; changelogs and inputs have one (partition 0).
    return FakeBroker(partitions={CLOSED: 3, REJECTED: 2})  # see OUTPUT_AND_CHANGELOG_PARTITIONS


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def make_rig(
    tmp_path: Path, resources: RocksDBResources, broker: FakeBroker
) -> AsyncIterator[RigFactory]:
    opened: list[PartitionStore] = []

    async def make(
        *, exactly_once: bool = True, store_type: type[PartitionStore] = PartitionStore
    ) -> Rig:
        stores = {name: store_type(tmp_path / name / "0", resources) for name in CHANGELOGS}
        opened.extend(stores.values())
        producer = broker.producer(TXN_ID if exactly_once else None)
        rig = Rig(broker, producer, stores, exactly_once)
        await rig.seed()
        return rig

    yield make
    for store in opened:
        store.close()


@pytest.mark.parametrize("exactly_once", [True, False])
async def test_the_offsets_committed_say_the_partition_count_either_way(
    make_rig: RigFactory, exactly_once: bool
) -> None:
    """A worker's start reads it back (topics.py): partitions added to every
    co-partitioned topic together are refused, also on an empty disk."""
    rig = await make_rig(exactly_once=exactly_once)
    await rig.process_and_commit(rig.checkpoint())
    assert rig.broker.committed(GROUP) == {INPUT: 5}
    assert rig.broker.offset_metadata[GROUP] == {INPUT: OFFSET_METADATA}


# -- exactly_once: the happy path --------------------------------------------------------------
async def test_commit_makes_outputs_changelog_and_offsets_visible_then_writes_rocksdb(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    visible_before = rig.visible()
    changelog_end = {name: rig.broker.end_offset(tp) for name, tp in CHANGELOGS.items()}
    ends = {tp: rig.broker.end_offset(tp) for tp in OUTPUT_AND_CHANGELOG_PARTITIONS}
    checkpoint = rig.checkpoint()

    await rig.process_batch(checkpoint)
    # Step 1 of the contract: nothing reaches RocksDB or readers while the transaction is open.
    assert {name: data for name, (data, _) in rig.stored().items()} == SEED
    assert rig.visible() == visible_before
    assert dict(rig.overlays[SESSIONS]) == AFTER[SESSIONS]

    await checkpoint.commit()

    assert rig.visible() == visible_with_batch(visible_before)
    assert rig.broker.committed(GROUP) == {INPUT: 5}
    for name, tp in CHANGELOGS.items():
        new = rig.broker.read_committed(tp, changelog_end[name])
        # one record per changed key, with its newest value; a delete is a tombstone
        assert [(e.key, e.value) for e in new] == BATCH_CHANGES[name]
        store = rig.stores[name]
        assert contents(store) == AFTER[name] == changelog_state(rig.broker, tp)
        assert store.changelog_offset == new[-1].offset + 1
        # so a restore after this clean commit reads nothing again
        assert rig.broker.read_committed(tp, store.changelog_offset) == []
        assert rig.overlays[name].changes == {}
        assert dict(rig.overlays[name]) == AFTER[name]
    # outputs and changelog records were one transaction
    batch_records = [
        entry
        for tp in OUTPUT_AND_CHANGELOG_PARTITIONS
        for entry in rig.broker.log(tp)[ends[tp] :]
        if entry.marker is None
    ]
    assert len(batch_records) == len(BATCH_OUTPUTS) + sum(map(len, BATCH_CHANGES.values()))
    assert len({entry.transaction for entry in batch_records}) == 1
    assert checkpoint.closed
    assert not rig.producer.in_transaction
    assert "abort_transaction" not in rig.producer.calls
    assert_no_open_transaction(rig.broker)


async def test_a_transaction_without_store_changes_leaves_the_stores_offsets_alone(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    stored_before = rig.stored()
    checkpoint = rig.checkpoint()
    await checkpoint.send(BATCH_OUTPUTS[0])
    checkpoint.consumed(INPUT, 2)

    await checkpoint.commit()

    assert rig.stored() == stored_before
    assert (b"a", b"closed a") in rig.broker.committed_records(CLOSED)
    assert rig.broker.committed(GROUP) == {INPUT: 3}


async def test_add_takes_an_output_only_once_its_topic_is_known_in_the_transaction(
    make_rig: RigFactory,
) -> None:
    """``add`` is ``send`` without the wait for a topic's partition count: it
    declines (adding nothing) until ``send`` has learnt it in this transaction."""
    rig = await make_rig()
    first, second, other_topic = BATCH_OUTPUTS  # closed, closed, rejected
    checkpoint = rig.checkpoint()
    assert not checkpoint.add(first)
    assert checkpoint.empty
    await checkpoint.send(first)
    assert checkpoint.add(second)
    assert not checkpoint.add(other_topic)
    await checkpoint.send(other_topic)
    checkpoint.consumed(INPUT, 4)
    await checkpoint.commit()
    closed = rig.broker.committed_records(CLOSED)
    assert closed.count((b"a", b"closed a")) == closed.count((b"d", b"closed d")) == 1
    assert rig.broker.committed_records(REJECTED).count((b"x", b"rejected x")) == 1
    assert not rig.checkpoint().add(first)  # learnt anew in each transaction
    sealed = rig.checkpoint()
    sealed.seal()
    with pytest.raises(CheckpointError):
        sealed.add(first)


class Durations:
    def __init__(self) -> None:
        self.seen: list[float] = []

    def observe(self, seconds: float) -> None:
        self.seen.append(seconds)


@pytest.mark.parametrize(
    ("exactly_once", "failing", "timed"),
    [
        (True, None, ("produce", "offsets", "commit", "store")),
        (False, None, ("produce", "offsets", "store")),
        (True, "commit_transaction", ("produce", "offsets")),
        (True, "send_offsets_to_transaction", ("produce",)),
    ],
)
async def test_commit_times_each_phase_it_completes(
    make_rig: RigFactory, exactly_once: bool, failing: str | None, timed: tuple[str, ...]
) -> None:
    """/metrics' stream_app_transaction_phase_seconds: each phase a commit gets
    through is reported once, with the time it took (here the broker is slow to
    answer the step that ends the phase under test)."""
    rig = await make_rig(exactly_once=exactly_once)
    durations = {phase: Durations() for phase in PHASES}
    checkpoint = rig.checkpoint(phases=durations)
    await rig.process_batch(checkpoint)
    slow = "commit_transaction" if exactly_once else "flush"
    rig.producer.before[slow] = lambda: time.sleep(0.05)
    if failing is not None:
        rig.producer.fail_next(failing, KafkaError("COORDINATOR_NOT_AVAILABLE"))
        with pytest.raises(CheckpointError):
            await checkpoint.commit()
    else:
        await checkpoint.commit()

    assert [phase for phase in PHASES if durations[phase].seen] == list(timed)
    assert all(len(durations[phase].seen) == 1 for phase in timed)
    if failing is None:
        # The slow call is timed in its own phase (at least its 50 ms sleep);
        # which phase was slowest is left alone: a loaded machine can stall any.
        slowest = "commit" if exactly_once else "produce"
        assert durations[slowest].seen[0] >= 0.05


async def test_an_empty_checkpoint_opens_no_transaction_and_commits_once(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    calls_before = list(rig.producer.calls)
    checkpoint = rig.checkpoint()

    await checkpoint.commit()

    new_calls = rig.producer.calls[len(calls_before) :]
    assert not {"begin_transaction", "send_batch", "commit_transaction"} & set(new_calls)
    with pytest.raises(CheckpointError, match="already"):
        await checkpoint.commit()


async def test_outputs_reach_the_producer_only_at_the_commit(make_rig: RigFactory) -> None:
    rig = await make_rig()
    calls_before = len(rig.producer.calls)
    checkpoint = rig.checkpoint()

    await rig.process_batch(checkpoint)

    assert rig.producer.calls[calls_before:] == []
    assert not rig.producer.in_transaction
    await checkpoint.commit()
    new_calls = rig.producer.calls[calls_before:]
    assert new_calls[0] == "begin_transaction"
    assert new_calls[-2:] == ["send_offsets_to_transaction", "commit_transaction"]


async def test_records_beyond_one_batch_go_in_further_batches_in_order(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    rig.producer.batch_bytes = 20  # a few records per batch
    visible_before = rig.visible()
    changelog = CHANGELOGS[SESSIONS]
    changelog_end = rig.broker.end_offset(changelog)
    checkpoint = rig.checkpoint()
    outputs = [Outgoing(CLOSED, b"k", b"closed %d" % i) for i in range(7)]
    for offset, out in enumerate(outputs, start=2):
        rig.overlays[SESSIONS][b"key%d" % offset] = b"value %d" % offset
        await checkpoint.send(out)
        checkpoint.consumed(INPUT, offset)

    await checkpoint.commit()

    assert rig.producer.calls.count("send_batch") > 4
    new = [(k, v) for k, v in rig.broker.committed_records(CLOSED) if k == b"k"]
    assert new == [(out.key, out.value) for out in outputs]  # one key, its order kept
    written = rig.broker.read_committed(changelog, changelog_end)
    assert [e.key for e in written] == [b"key%d" % offset for offset in range(2, 9)]
    store = rig.stores[SESSIONS]
    # The offset after the last changelog record of the last batch.
    assert store.changelog_offset == written[-1].offset + 1
    assert contents(store) == {**SEED[SESSIONS], **{e.key: e.value for e in written}}
    assert rig.broker.read_committed(changelog, store.changelog_offset) == []
    assert rig.visible()[CLOSED] == sorted(
        visible_before[CLOSED] + [(out.key, out.value) for out in outputs], key=repr
    )


async def test_a_sealed_transaction_commits_while_the_next_one_is_processed(
    make_rig: RigFactory,
) -> None:
    """What the engine does: seal every task's transaction, commit them beside
    the processing of the next records, which see the sealed state."""
    rig = await make_rig()
    visible_before = rig.visible()
    first = rig.checkpoint()
    await rig.process_batch(first)
    first.seal()

    second = rig.checkpoint()
    sessions = rig.overlays[SESSIONS]
    assert sessions[b"d"] == b"d1"  # written by the sealed transaction
    sessions[b"d"] = b"d2"
    await second.send(Outgoing(CLOSED, b"d", b"closed d again"))
    second.consumed(INPUT, 5)
    await first.commit()

    assert rig.visible() == visible_with_batch(visible_before)
    assert rig.broker.committed(GROUP) == {INPUT: 5}
    assert {name: data for name, (data, _) in rig.stored().items()} == AFTER
    assert sessions[b"d"] == b"d2"
    await second.commit()
    assert rig.broker.committed(GROUP) == {INPUT: 6}
    assert contents(rig.stores[SESSIONS]) == {**AFTER[SESSIONS], b"d": b"d2"}
    assert changelog_state(rig.broker, CHANGELOGS[SESSIONS]) == contents(rig.stores[SESSIONS])
    with pytest.raises(CheckpointError, match="sealed"):
        await first.send(BATCH_OUTPUTS[0])


async def test_a_failed_commit_drops_the_transaction_processed_on_top_of_it(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    visible_before, stored_before = rig.visible(), rig.stored()
    first = rig.checkpoint()
    await rig.process_batch(first)
    first.seal()
    second = rig.checkpoint()
    rig.overlays[SESSIONS][b"d"] = b"d2"
    await second.send(Outgoing(CLOSED, b"d", b"closed d again"))
    second.consumed(INPUT, 5)
    rig.producer.fail_next("commit_transaction", KafkaError("COORDINATOR_NOT_AVAILABLE"))

    with pytest.raises(CheckpointError):
        await first.commit()
    await second.abort()  # the engine restarts the task from its committed offsets

    assert_batch_left_no_trace(rig, first, visible_before, stored_before)
    await assert_task_continues(rig, visible_before)


# -- exactly_once: failures before the commit ---------------------------------------------------
def assert_batch_left_no_trace(
    rig: Rig, checkpoint: Checkpoint, visible_before: Visible, stored_before: Any
) -> None:
    """Nothing visible, offsets and RocksDB as before, overlays dropped; and the task
    continues from its committed offsets: redoing the batch gives each output once."""
    assert rig.visible() == visible_before
    assert rig.broker.committed(GROUP) == {INPUT: 2}
    assert rig.stored() == stored_before
    assert all(overlay.changes == {} for overlay in rig.overlays.values())
    assert dict(rig.overlays[SESSIONS]) == SEED[SESSIONS]
    assert checkpoint.closed
    assert_no_open_transaction(rig.broker)


async def assert_task_continues(rig: Rig, visible_before: Visible) -> None:
    await rig.process_and_commit(rig.checkpoint())
    assert rig.visible() == visible_with_batch(visible_before)
    assert rig.broker.committed(GROUP) == {INPUT: 5}
    assert {name: data for name, (data, _) in rig.stored().items()} == AFTER


SEND_FAILURES = {
    "output send times out": lambda p: p.fail_next_send(KafkaTimeoutError(), topic=CLOSED),
    "changelog send fails": lambda p: p.fail_next_send(
        KafkaError("NOT_ENOUGH_REPLICAS"), topic=CHANGELOGS[IDS].topic
    ),
    "changelog record refused": lambda p: p.refuse_next_send(
        MessageSizeTooLargeError(), topic=CHANGELOGS[SESSIONS].topic
    ),
}


@pytest.mark.parametrize("inject", SEND_FAILURES.values(), ids=SEND_FAILURES.keys())
async def test_a_failed_send_aborts_the_transaction_and_keeps_rocksdb(
    make_rig: RigFactory, inject: Callable[[FakeProducer], None]
) -> None:
    rig = await make_rig()
    visible_before, stored_before = rig.visible(), rig.stored()
    inject(rig.producer)
    checkpoint = rig.checkpoint()

    with pytest.raises(CheckpointError) as raised:
        await rig.process_and_commit(checkpoint)

    assert not isinstance(raised.value, TaskFencedError)
    calls = rig.producer.calls
    batch_calls = calls[len(calls) - calls[::-1].index("begin_transaction") :]
    assert "commit_transaction" not in batch_calls
    assert batch_calls[-1] == "abort_transaction"
    assert_batch_left_no_trace(rig, checkpoint, visible_before, stored_before)
    await assert_task_continues(rig, visible_before)


@pytest.mark.parametrize("call", ["send_offsets_to_transaction", "commit_transaction"])
async def test_a_failed_offsets_or_commit_request_aborts_and_keeps_rocksdb(
    make_rig: RigFactory, call: str
) -> None:
    rig = await make_rig()
    visible_before, stored_before = rig.visible(), rig.stored()
    rig.producer.fail_next(call, KafkaError("COORDINATOR_NOT_AVAILABLE"))
    checkpoint = rig.checkpoint()

    with pytest.raises(CheckpointError) as raised:
        await rig.process_and_commit(checkpoint)

    assert not isinstance(raised.value, TaskFencedError)
    # A failed commit may have been made by the broker all the same (see below).
    assert isinstance(raised.value, CommitOutcomeUnknownError) == (call == "commit_transaction")
    assert rig.producer.calls[-2:] == [call, "abort_transaction"]
    assert_batch_left_no_trace(rig, checkpoint, visible_before, stored_before)
    await assert_task_continues(rig, visible_before)


async def test_a_commit_made_whose_answer_is_lost_leaves_rocksdb_to_the_changelog(
    make_rig: RigFactory,
) -> None:
    """A broker restart can cut the EndTxn's answer after the commit is made.
    The worker cannot tell it from a commit not made: the checkpoint says the
    outcome is unknown (not "aborted") and writes nothing to RocksDB, so the
    restarted task takes both its state and its offsets from Kafka, which
    agree that the batch is in."""
    rig = await make_rig()
    visible_before, stored_before = rig.visible(), rig.stored()
    rig.producer.lose_next_commit_answer(KafkaError("Unexpected error during batch delivery"))
    checkpoint = rig.checkpoint()

    with pytest.raises(CommitOutcomeUnknownError, match="may have been made"):
        await rig.process_and_commit(checkpoint)

    assert checkpoint.closed
    assert rig.stored() == stored_before
    assert all(overlay.changes == {} for overlay in rig.overlays.values())
    # What Kafka holds: the batch committed, outputs, changelog and offsets together.
    assert rig.visible() == visible_with_batch(visible_before)
    assert rig.broker.committed(GROUP) == {INPUT: 5}
    for name, data in AFTER.items():
        assert changelog_state(rig.broker, CHANGELOGS[name]) == data
    assert_no_open_transaction(rig.broker)


async def test_an_unexpected_error_in_the_commit_aborts_like_a_kafka_error(
    make_rig: RigFactory,
) -> None:
    """Raised as it was, it left the transaction open and the overlays holding
    what was processed on top of it, which a later commit (as the worker
    stopped) could have written with offsets past the aborted records."""
    rig = await make_rig()
    visible_before, stored_before = rig.visible(), rig.stored()
    rig.producer.fail_next("commit_transaction", RuntimeError("a bug"))
    checkpoint = rig.checkpoint()

    with pytest.raises(CheckpointError, match="unexpected RuntimeError: a bug"):
        await rig.process_and_commit(checkpoint)

    assert rig.producer.calls[-2:] == ["commit_transaction", "abort_transaction"]
    assert_batch_left_no_trace(rig, checkpoint, visible_before, stored_before)
    await assert_task_continues(rig, visible_before)


async def test_an_abort_that_fails_too_still_reports_the_commit_failure(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig()
    visible_before, stored_before = rig.visible(), rig.stored()
    rig.producer.fail_next("commit_transaction", KafkaError("COORDINATOR_NOT_AVAILABLE"))
    rig.producer.fail_next("abort_transaction", KafkaTimeoutError())
    checkpoint = rig.checkpoint()

    with pytest.raises(CheckpointError, match="COORDINATOR_NOT_AVAILABLE"):
        await rig.process_and_commit(checkpoint)

    assert rig.stored() == stored_before
    assert all(overlay.changes == {} for overlay in rig.overlays.values())
    # The transaction hangs until the task's next producer fences this one.
    rig.broker.producer(TXN_ID)
    assert rig.visible() == visible_before
    assert rig.broker.committed(GROUP) == {INPUT: 2}
    assert_no_open_transaction(rig.broker)


# -- exactly_once: fenced -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "call", ["send_batch", "flush", "send_offsets_to_transaction", "commit_transaction"]
)
async def test_a_fenced_producer_gives_up_the_task_without_aborting(
    make_rig: RigFactory, call: str
) -> None:
    rig = await make_rig()
    visible_before, stored_before = rig.visible(), rig.stored()
    successors: list[FakeProducer] = []
    # Another worker starts this task (InitProducerId) just before `call`.
    rig.producer.before[call] = lambda: successors.append(rig.broker.producer(TXN_ID))
    checkpoint = rig.checkpoint()

    with pytest.raises(TaskFencedError) as raised:
        await rig.process_and_commit(checkpoint)
    await checkpoint.abort()  # what Task.close does next
    # Fenced as it committed, it cannot tell (the engine counts it as unknown).
    assert raised.value.committing == (call == "commit_transaction")

    assert successors, "the fence happened"
    assert "abort_transaction" not in rig.producer.calls
    assert_batch_left_no_trace(rig, checkpoint, visible_before, stored_before)
    # The new owner redoes the batch from the committed offsets: each output once.
    rig.producer = successors[0]
    await assert_task_continues(rig, visible_before)


async def test_a_fence_learned_before_the_commit_is_a_task_fence(make_rig: RigFactory) -> None:
    rig = await make_rig()
    rig.producer.fence_style = "aiokafka-0.14"
    stored_before = rig.stored()
    checkpoint = rig.checkpoint()
    await rig.process_batch(checkpoint)
    rig.broker.producer(TXN_ID)  # another worker takes the task over

    with pytest.raises(TaskFencedError):
        await checkpoint.commit()  # its batches meet the dead sender
    assert rig.stored() == stored_before
    assert all(overlay.changes == {} for overlay in rig.overlays.values())


@pytest.mark.parametrize(
    "error",
    [
        # aiokafka's sender wraps an answer it does not expect (INVALID_PRODUCER_ID_MAPPING
        # after a long idle, INVALID_TXN_STATE) in this, and fails every pending batch
        KafkaError("Unexpected error during batch delivery"),
        OutOfOrderSequenceNumber(),
    ],
)
async def test_a_producer_whose_sender_died_of_something_else_is_not_fenced(
    make_rig: RigFactory, error: KafkaError
) -> None:
    """The sender's failure ends aiokafka's transaction, so the next send
    raises IllegalOperation, as a fence makes it; the batch futures say it was
    not one. Taken for fenced, the task was dropped and its partitions stood
    idle until the group rejoined, about a session timeout later; now it is
    restarted (CheckpointError) with a new producer."""
    rig = await make_rig()
    visible_before, stored_before = rig.visible(), rig.stored()
    rig.producer.fail_next_send(error, topic=CLOSED)
    rig.producer.refuse_next_send(
        IllegalOperation("Can't send messages while not in transaction"), topic=REJECTED
    )
    checkpoint = rig.checkpoint()

    with pytest.raises(CheckpointError) as raised:
        await rig.process_and_commit(checkpoint)

    assert not isinstance(raised.value, TaskFencedError)
    assert type(error).__name__ in str(raised.value)
    assert rig.visible() == visible_before
    assert rig.stored() == stored_before
    assert all(overlay.changes == {} for overlay in rig.overlays.values())


# -- exactly_once: not authorized ----------------------------------------------------------------
NOT_AUTHORIZED = {
    # The changelog's Write ACL missing: the send's future fails.
    "changelog send refused": lambda p: p.fail_next_send(
        TopicAuthorizationFailedError(CHANGELOGS[SESSIONS].topic), topic=CHANGELOGS[SESSIONS].topic
    ),
    # As aiokafka 0.14 does it: the refusal ends its transaction in the background,
    # so the next send raises IllegalOperation, and the refused send's future says why.
    "a later send finds the transaction ended": lambda p: (
        p.fail_next_send(TopicAuthorizationFailedError(CLOSED), topic=CLOSED),
        p.refuse_next_send(
            IllegalOperation("Can't send messages while not in transaction"), topic=REJECTED
        ),
    ),
    # The group's Read ACL missing: the offsets are refused.
    "offsets refused": lambda p: p.fail_next(
        "send_offsets_to_transaction", GroupAuthorizationFailedError(GROUP)
    ),
}


@pytest.mark.parametrize("inject", NOT_AUTHORIZED.values(), ids=NOT_AUTHORIZED.keys())
async def test_a_refused_operation_is_not_authorized_not_a_fence_and_keeps_rocksdb(
    make_rig: RigFactory, inject: Callable[[FakeProducer], None]
) -> None:
    """A missing ACL is a configuration error the worker stops on (the engine
    takes NotAuthorizedError's cause); nothing of the batch is visible or stored."""
    rig = await make_rig()
    visible_before, stored_before = rig.visible(), rig.stored()
    inject(rig.producer)
    checkpoint = rig.checkpoint()

    with pytest.raises(NotAuthorizedError) as raised:
        await rig.process_and_commit(checkpoint)

    assert isinstance(raised.value.cause, ConfigurationError)
    assert "does not authorize this worker's principal" in str(raised.value.cause)
    assert "AuthorizationFailed" in str(raised.value.cause)
    assert "commit_transaction" not in rig.producer.calls[-4:]
    assert rig.visible() == visible_before
    assert rig.stored() == stored_before
    assert all(overlay.changes == {} for overlay in rig.overlays.values())


# -- revocation and close, through Task as the engine drives it ---------------------------------
class CountingProcessor:
    """Counts commands per key in the store; b"forget" deletes the key."""

    def __init__(self, counts: StoreOverlay) -> None:
        self.counts = counts

    def __call__(self, record: SourceRecord) -> list[Outgoing]:
        key = record.key or b""
        if record.value == b"forget":
            del self.counts[key]
            return []
        count = int(self.counts.get(key) or b"0") + 1
        self.counts[key] = b"%d" % count
        return [Outgoing(CLOSED, key, b"%s=%d" % (key, count))]


def command(offset: int, key: bytes, value: bytes = b"cmd") -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic=INPUT.topic,
        partition=INPUT.partition,
        offset=offset,
        timestamp=1_764_000_000_000 + offset,
        timestamp_type=0,
        key=key,
        value=value,
        checksum=None,
        serialized_key_size=len(key),
        serialized_value_size=len(value),
        headers=[],
    )


def started_task(state_dir: Path, resources: RocksDBResources, broker: FakeBroker) -> Task:
    """Task.start without its broker: the fake producer, the store, no restore needed."""
    stage = Stage(
        "commands",
        (INPUT.topic,),
        (SESSIONS,),
        lambda _partition, overlays: CountingProcessor(overlays[SESSIONS]),
    )
    settings = Settings(app_id=GROUP, processing_guarantee="exactly_once", batch_size=1000)

    async def no_offset_commits(_offsets: dict[TopicPartition, int]) -> None:
        raise AssertionError("exactly_once commits offsets in the transaction")

    task = Task(
        stage,
        0,
        settings=settings,
        changelogs={SESSIONS: CHANGELOGS[SESSIONS].topic},
        state_dir=state_dir,
        resources=resources,
        commit_offsets=no_offset_commits,
        limits=Limits(),
        max_record_bytes=1_048_576,
    )
    task.producer = broker.producer(task.transactional_id)
    task.stores = {SESSIONS: PartitionStore(state_dir / SESSIONS / "0", resources)}
    task.overlays = {SESSIONS: StoreOverlay(task.stores[SESSIONS])}
    task.process = stage.build(0, task.overlays)
    task.activate({INPUT: 0})
    return task


async def on_revoked(task: Task) -> None:
    """What Engine.on_partitions_revoked does for one task: commit (or abort), close."""
    if task.active and task.checkpoint is not None:
        # the engine logs a failure; the commit has aborted already
        with contextlib.suppress(CheckpointError, StoreWriteError):
            await task.commit()
    await task.close()


def reopened(state_dir: Path, resources: RocksDBResources) -> PartitionStore:
    return PartitionStore(state_dir / SESSIONS / "0", resources)


async def test_each_transaction_takes_records_up_to_its_byte_bound(
    tmp_path: Path, resources: RocksDBResources, broker: FakeBroker
) -> None:
    """A close of a few bytes writes a whole session, to an output and to the
    store: one poll of such records held hundreds of MiB until the commit.
    Past its limit (what the engine's other transactions leave of
    TRANSACTION_BYTES) a transaction takes no more, and the next one counts
    from nothing (it once kept the first one's count: one record each)."""
    task = started_task(tmp_path, resources, broker)
    records = [command(offset, b"k%d" % (offset % 3)) for offset in range(60)]
    takes = []
    rest = records
    while rest:
        taken = await task.handle_many(rest, 200)
        takes.append(taken)
        rest = rest[taken:]
        if rest:
            assert task.held_bytes() >= 200
            assert not task.commit_due(0.0)  # by bytes, the engine's call: its sum
        await task.commit()
        assert task.held_bytes() == 0
    assert len(takes) > 2
    assert all(taken == takes[0] > 1 for taken in takes[:-1])
    assert sum(takes) == 60
    assert len(broker.committed_records(CLOSED)) == 60
    assert broker.committed(GROUP) == {INPUT: 60}
    # Store writes count too: an update emits nothing, and writes its session.
    overlay = task.overlays[SESSIONS]

    def writes_only(record: SourceRecord) -> list[Outgoing]:
        overlay[record.key or b""] = b"x" * 90
        return []

    task.process = writes_only
    more = [command(offset, b"k%d" % offset) for offset in range(60, 70)]
    assert await task.handle_many(more, 200) == 3  # 270 bytes written: past 200
    assert task.held_bytes() == 270
    await task.commit()
    assert await task.handle_many(more[3:], 200) == 3
    await task.commit()
    # One key written again and again is one changelog record: counted once.
    again = [command(offset, b"same") for offset in range(70, 90)]
    assert await task.handle_many(again, 200) == 20
    assert task.held_bytes() == 90
    # The first record is taken whatever the limit: the batch goes on.
    assert await task.handle_many([command(90, b"k")], 0) == 1
    await task.commit()
    # A record the processor fails on counts its INTERNAL_ERROR rejection.

    def fails(record: SourceRecord) -> list[Outgoing]:
        raise RuntimeError("a bug, say")

    task.process = fails
    assert await task.handle_many([command(91, b"k", b"x" * 150)], 200) == 1
    assert task.held_bytes() >= 200
    await task.commit()
    # A record read past the client, rejected, counts its rejection too.
    unreadable = RawRecord(INPUT.topic, INPUT.partition, 92, 0, b"k", b"{}", ((b"\xff", b""),))
    await task.handle_raw(unreadable)
    assert task.held_bytes() >= 200
    await on_revoked(task)


async def test_a_batch_rejected_whole_is_consumed_to_its_end(
    tmp_path: Path, resources: RocksDBResources, broker: FakeBroker
) -> None:
    """Its rejection committed the batch's base offset + 1: a task that
    started again there was handed the batch's other records by the client,
    at the offsets they claim, and applied part of a batch rejected whole."""
    task = started_task(tmp_path, resources, broker)
    whole = RawRecord(
        INPUT.topic, INPUT.partition, 5, 0, None, b"batch", problem="lies", last_offset=9
    )
    await task.handle_raw(whole)
    assert task.positions[INPUT] == task.handled[INPUT] == 10
    await task.commit()
    assert broker.committed(GROUP) == {INPUT: 10}
    [rejected] = broker.committed_records(REJECTED)
    assert json.loads(rejected[1] or b"")["errors"][0]["details"] == "lies"
    await on_revoked(task)


async def test_a_record_below_what_was_processed_is_skipped_and_said(
    tmp_path: Path,
    resources: RocksDBResources,
    broker: FakeBroker,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The Kafka client hands none over after a seek. A record that claimed an
    offset past its batch, the last of a poll, made the records after it look
    processed: they were skipped without a word."""
    task = started_task(tmp_path, resources, broker)
    await task.handle_many([command(0, b"k1"), command(50, b"k2")])  # 50: the lie
    with caplog.at_level(logging.WARNING, logger="stream_app.pipeline.tasks"):
        await task.handle_many([command(offset, b"k3") for offset in range(2, 6)])
    [line] = [r.getMessage() for r in caplog.records]
    assert line == (
        f"{INPUT.topic}[{INPUT.partition}]@2: skipped, below offset 51 already processed "
        "(a record batch whose offsets disagree with its header?)"
    )
    assert task.positions[INPUT] == 51
    await on_revoked(task)


async def test_revocation_mid_batch_commits_what_was_processed(
    tmp_path: Path, resources: RocksDBResources, broker: FakeBroker
) -> None:
    task = started_task(tmp_path, resources, broker)
    producer = task.producer
    for offset, key in enumerate([b"k1", b"k2", b"k1"]):
        await task.handle(command(offset, key))
    assert broker.committed_records(CLOSED) == []

    await on_revoked(task)

    assert sorted(broker.committed_records(CLOSED)) == [
        (b"k1", b"k1=1"),
        (b"k1", b"k1=2"),
        (b"k2", b"k2=1"),
    ]
    assert changelog_state(broker, CHANGELOGS[SESSIONS]) == {b"k1": b"2", b"k2": b"1"}
    assert broker.committed(GROUP) == {INPUT: 3}
    store = reopened(tmp_path, resources)
    assert contents(store) == {b"k1": b"2", b"k2": b"1"}
    assert store.changelog_offset == broker.read_committed(CHANGELOGS[SESSIONS])[-1].offset + 1
    store.close()
    assert isinstance(producer, FakeProducer)
    assert producer.stopped
    assert "abort_transaction" not in producer.calls


async def test_revocation_whose_commit_fails_aborts_and_keeps_rocksdb(
    tmp_path: Path, resources: RocksDBResources, broker: FakeBroker
) -> None:
    task = started_task(tmp_path, resources, broker)
    producer = task.producer
    assert isinstance(producer, FakeProducer)
    for offset, key in enumerate([b"k1", b"k2"]):
        await task.handle(command(offset, key))
    await task.commit()
    await task.handle(command(2, b"k1"))
    await task.handle(command(3, b"k2", b"forget"))
    producer.fail_next("commit_transaction", KafkaError("COORDINATOR_LOAD_IN_PROGRESS"))

    await on_revoked(task)

    assert sorted(broker.committed_records(CLOSED)) == [(b"k1", b"k1=1"), (b"k2", b"k2=1")]
    assert broker.committed(GROUP) == {INPUT: 2}
    store = reopened(tmp_path, resources)
    assert (
        contents(store)
        == {b"k1": b"1", b"k2": b"1"}
        == changelog_state(broker, CHANGELOGS[SESSIONS])
    )
    store.close()
    assert "abort_transaction" in producer.calls
    assert_no_open_transaction(broker)


async def test_a_task_knows_the_offsets_kafka_has_committed_for_it(
    tmp_path: Path, resources: RocksDBResources, broker: FakeBroker
) -> None:
    """What the purger may delete below (purge.py): never an offset of a
    transaction that did not commit."""
    task = started_task(tmp_path, resources, broker)
    producer = task.producer
    assert isinstance(producer, FakeProducer)
    for offset, key in enumerate([b"k1", b"k2"]):
        await task.handle(command(offset, key))
    assert task.committed == {}
    await task.commit()
    assert task.committed == {INPUT: 2} == broker.committed(GROUP)
    await task.handle(command(2, b"k1"))
    producer.fail_next("commit_transaction", KafkaError("COORDINATOR_LOAD_IN_PROGRESS"))
    with pytest.raises(CheckpointError):
        await task.commit()
    assert task.committed == {INPUT: 2} == broker.committed(GROUP)
    await task.close()


async def test_closing_a_task_without_commit_sends_nothing_of_its_transaction(
    tmp_path: Path, resources: RocksDBResources, broker: FakeBroker
) -> None:
    task = started_task(tmp_path, resources, broker)
    producer = task.producer
    assert isinstance(producer, FakeProducer)
    await task.handle(command(0, b"k1"))
    await task.commit()
    calls_after_commit = len(producer.calls)
    await task.handle(command(1, b"k1"))
    await task.handle(command(2, b"k2"))

    await task.close()

    assert broker.committed_records(CLOSED) == [(b"k1", b"k1=1")]
    assert broker.committed(GROUP) == {INPUT: 1}
    assert changelog_state(broker, CHANGELOGS[SESSIONS]) == {b"k1": b"1"}
    store = reopened(tmp_path, resources)
    assert contents(store) == {b"k1": b"1"}
    store.close()
    # Its records were never sent, so no transaction was opened: none is left open
    # to stall read_committed readers until the broker's transaction timeout.
    assert producer.calls[calls_after_commit:] == ["stop"]
    assert_no_open_transaction(broker)


# -- a crash between the commit and the RocksDB write --------------------------------------------
async def test_a_failed_rocksdb_write_after_the_commit_is_caught_up_from_the_changelog(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig(store_type=FailingWriteStore)
    visible_before, stored_before = rig.visible(), rig.stored()
    for store in rig.stores.values():
        assert isinstance(store, FailingWriteStore)
        store.fail_writes = True
    checkpoint = rig.checkpoint()

    with pytest.raises(StoreWriteError):
        await rig.process_and_commit(checkpoint)
    await checkpoint.abort()  # the engine drops the task: the committed transaction stays

    # Kafka holds the transaction ...
    assert rig.visible() == visible_with_batch(visible_before)
    assert rig.broker.committed(GROUP) == {INPUT: 5}
    assert "abort_transaction" not in rig.producer.calls
    # ... RocksDB is behind it, never ahead ...
    assert rig.stored() == stored_before
    # ... and the restore at the next start catches up to exactly what was committed.
    for store in rig.stores.values():
        assert isinstance(store, FailingWriteStore)
        store.fail_writes = False
    replay_changelogs(rig.broker, rig.stores)
    for name, tp in CHANGELOGS.items():
        assert contents(rig.stores[name]) == AFTER[name] == changelog_state(rig.broker, tp)
        assert rig.stores[name].changelog_offset == rig.broker.end_offset(tp)


# -- at_least_once ---------------------------------------------------------------------------
async def test_at_least_once_confirms_every_send_before_committing_the_offsets(
    make_rig: RigFactory,
) -> None:
    rig = await make_rig(exactly_once=False)
    visible_before = rig.visible()
    seen_at_offset_commit: list[Visible] = []

    async def commit_offsets(offsets: dict[TopicPartition, int]) -> None:
        assert rig.producer.buffered == 0, "offsets committed before the sends were flushed"
        seen_at_offset_commit.append(rig.visible())
        assert rig.stored()[SESSIONS][0] == SEED[SESSIONS], "RocksDB written before the offsets"
        rig.broker.commit_offsets(GROUP, offsets)

    checkpoint = rig.checkpoint(commit_offsets)
    await rig.process_and_commit(checkpoint)

    assert seen_at_offset_commit == [visible_with_batch(visible_before, exactly_once=False)]
    assert rig.visible() == visible_with_batch(visible_before, exactly_once=False)
    assert rig.broker.committed(GROUP) == {INPUT: 5}
    for name, tp in CHANGELOGS.items():
        store = rig.stores[name]
        assert contents(store) == AFTER[name] == changelog_state(rig.broker, tp)
        # no transaction markers: the offset after the last record is the end
        assert store.changelog_offset == rig.broker.end_offset(tp)
    transactional = {"begin_transaction", "send_offsets_to_transaction", "commit_transaction"}
    assert not transactional & set(rig.producer.calls)


AT_LEAST_ONCE_FAILURES = {
    "output send fails": (
        lambda p: p.fail_next_send(KafkaTimeoutError(), topic=REJECTED),
        None,
    ),
    "changelog send fails": (
        lambda p: p.fail_next_send(KafkaError("NOT_LEADER"), topic=CHANGELOGS[SESSIONS].topic),
        None,
    ),
    "offset commit fails": (lambda _p: None, CommitFailedError()),
}


@pytest.mark.parametrize(
    ("inject", "offset_error"), AT_LEAST_ONCE_FAILURES.values(), ids=AT_LEAST_ONCE_FAILURES.keys()
)
async def test_at_least_once_commits_no_offsets_and_keeps_rocksdb_when_a_step_fails(
    make_rig: RigFactory,
    inject: Callable[[FakeProducer], None],
    offset_error: BaseException | None,
) -> None:
    rig = await make_rig(exactly_once=False)
    stored_before = rig.stored()
    inject(rig.producer)
    offset_commits: list[dict[TopicPartition, int]] = []

    async def commit_offsets(offsets: dict[TopicPartition, int]) -> None:
        offset_commits.append(offsets)
        if offset_error is not None:
            raise offset_error

    checkpoint = rig.checkpoint(commit_offsets)
    with pytest.raises(CheckpointError):
        await rig.process_and_commit(checkpoint)

    assert rig.broker.committed(GROUP) == {INPUT: 2}
    assert len(offset_commits) == (0 if offset_error is None else 1)
    assert rig.stored() == stored_before
    assert all(overlay.changes == {} for overlay in rig.overlays.values())
    # Without transactions the sends that succeeded are visible; RocksDB stays behind
    # the changelog (never ahead of it) and the restore catches it up.
    replay_changelogs(rig.broker, rig.stores)
    for name, tp in CHANGELOGS.items():
        assert contents(rig.stores[name]) == changelog_state(rig.broker, tp)


async def test_at_least_once_state_says_which_records_it_holds_when_the_offsets_were_not_committed(
    make_rig: RigFactory,
) -> None:
    """A crash after the changelogs and before the offset commit: the task read
    from the committed offsets again and re-applied what its restored state
    held already, absorbed only by each session's last 64 eventIds (a replay
    of 65 returns of one session returned 130 units). The last changelog now
    carries the consumed offsets, and the task starts from them."""
    rig = await make_rig(exactly_once=False)

    async def crashed_before_the_offsets(offsets: dict[TopicPartition, int]) -> None:
        raise CommitFailedError()

    with pytest.raises(CheckpointError):
        await rig.process_and_commit(rig.checkpoint(crashed_before_the_offsets))
    assert rig.broker.committed(GROUP) == {INPUT: 2}
    replay_changelogs(rig.broker, rig.stores)  # the restore at the next start
    last = rig.stores[list(CHANGELOGS)[-1]]
    assert decode_consumed(last.get(CONSUMED_KEY)) == {INPUT: 5}
    for name, tp in CHANGELOGS.items():  # the reserved key is not the store's data
        assert contents(rig.stores[name]) == AFTER[name] == changelog_state(rig.broker, tp)


async def test_at_least_once_records_the_consumed_offsets_only_with_a_change_of_state(
    make_rig: RigFactory,
) -> None:
    """A batch that changed no state changes none when it is read again; a
    record of its offsets on every commit (8 rounds a second) lengthened the
    changelogs, and so every restore, by millions of records a week."""
    rig = await make_rig(exactly_once=False)
    last = CHANGELOGS[list(CHANGELOGS)[-1]]
    before = rig.broker.end_offset(last)
    checkpoint = rig.checkpoint()
    await checkpoint.send(BATCH_OUTPUTS[2])  # a rejection: outputs, no state
    checkpoint.consumed(INPUT, 2)
    await checkpoint.commit()
    assert rig.broker.end_offset(last) == before
    assert rig.broker.committed(GROUP) == {INPUT: 3}


async def test_at_least_once_records_the_consumed_offsets_with_a_change_of_any_store(
    make_rig: RigFactory,
) -> None:
    """The engine's order: the id counter, then the sessions. A creation
    rejected for its size takes an id and stores no session: with the record
    written only with the last store's change, the replay took a second id."""
    rig = await make_rig(exactly_once=False)
    stores = {
        name: ChangelogStore(rig.overlays[name], CHANGELOGS[name]) for name in (IDS, SESSIONS)
    }
    checkpoint = Checkpoint(
        rig.producer, stores, group_id=GROUP, exactly_once=False, commit_offsets=rig.commit_offsets
    )
    rig.overlays[IDS][b"p0"] = b"2"
    checkpoint.consumed(INPUT, 2)
    await checkpoint.commit()
    sessions_changelog = rig.broker.read_committed(CHANGELOGS[SESSIONS])
    assert [(r.key, r.value) for r in sessions_changelog][-1] == (
        CONSUMED_KEY,
        encode_consumed({INPUT: 3}),
    )


def test_consumed_offsets_that_cannot_be_read_are_none() -> None:
    assert decode_consumed(None) == {}
    assert decode_consumed(encode_consumed({INPUT: 7})) == {INPUT: 7}
    for odd in (b"", b"{", b"{}", b'{"abc": 1}', b"[1, 2]", b'[["t", "0", 1]]', b"[[null]]"):
        assert decode_consumed(odd) == {}


async def test_at_least_once_confirms_the_outputs_then_each_changelog_in_turn(
    make_rig: RigFactory,
) -> None:
    """A crash cuts an at_least_once commit short anywhere. Before, every batch
    was sent at once: the sessions' changelog could land without the outputs
    (the replayed command, a duplicate by its eventId, never emitted them
    again) or without the id counter's (a replayed creation took an id that a
    session already had). Now each group is confirmed before the next is sent."""
    rig = await make_rig(exactly_once=False)
    steps: list[str] = []
    send_batch, flush = rig.producer.send_batch, rig.producer.flush

    async def recorded_send(batch: Any, topic: str, *, partition: int) -> Any:
        if not steps or steps[-1] != topic:
            steps.append(topic)
        return await send_batch(batch, topic, partition=partition)

    async def recorded_flush() -> None:
        steps.append("flush")
        await flush()

    rig.producer.send_batch = recorded_send  # type: ignore[method-assign]
    rig.producer.flush = recorded_flush  # type: ignore[method-assign]
    checkpoint = rig.checkpoint()
    await rig.process_and_commit(checkpoint)
    outputs = steps[: steps.index("flush")]
    assert sorted(set(outputs)) == [CLOSED, REJECTED]
    changelogs = [store.changelog.topic for store in checkpoint.stores.values()]
    assert steps[len(outputs) :] == ["flush", changelogs[0], "flush", changelogs[1], "flush"]


async def test_exactly_once_sends_everything_before_one_flush(make_rig: RigFactory) -> None:
    """In a transaction the order does not matter: all or nothing is visible."""
    rig = await make_rig()
    seeded = len(rig.producer.calls)
    await rig.process_and_commit(rig.checkpoint())
    calls = rig.producer.calls[seeded:]
    sends = [n for n, call in enumerate(calls) if call == "send_batch"]
    assert len(sends) > 2
    assert calls.count("flush") == 1
    assert calls.index("flush") > sends[-1]


def test_the_session_id_counter_is_the_command_stage_s_first_store(tmp_path: Path) -> None:
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    commands = next(stage for stage in engine.stages if stage.name == "commands")
    assert commands.stores == (SESSION_IDS_STORE, SESSIONS_STORE)
