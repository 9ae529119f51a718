"""A record whose header name is not UTF-8, on the real broker: aiokafka's
consumer cannot decode it, read_batches_at (stream_app.pipeline.unreadable) can.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError
from aiokafka.structs import TopicPartition

from stream_app.pipeline.kafka import client_options
from stream_app.pipeline.processor import partition_for
from stream_app.pipeline.unreadable import RawRecord, empty_control_batch, read_batches_at
from stream_app.settings import Settings
from tests.conftest import EXTERNAL_BOOTSTRAP_SERVERS
from tests.integration.harness import (
    Deployment,
    Worker,
    command,
    consume,
    create_topics,
    partition_offsets,
    produce,
    produce_raw_batch,
)
from tests.pipeline.record_batches import BatchRecord
from tools.kafka_broker import KafkaCluster

T0 = 1_760_000_000_000
A = BatchRecord(b"a", b'{"type":"a"}', ((b"trace", b"1"),))
B = BatchRecord(b"b", b'{"type":"b"}', ((b"\xff\xfe", b"x"), (b"ok", None)), timestamp_delta=1)
C = BatchRecord(b"c", b'{"type":"c"}', timestamp_delta=2)


def raw(tp: TopicPartition, record: BatchRecord, offset: int) -> RawRecord:
    return RawRecord(
        tp.topic,
        tp.partition,
        offset,
        T0 + record.timestamp_delta,
        record.key,
        record.value,
        record.headers,
    )


async def abort_one_transaction(bootstrap: str, tp: TopicPartition, transactional_id: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    await producer.start()
    try:
        await producer.begin_transaction()
        await producer.send_and_wait(tp.topic, b"aborted", key=b"x", partition=tp.partition)
        await producer.abort_transaction()
    finally:
        await producer.stop()
    # The coordinator writes the abort marker after abort_transaction returns:
    # wait for it, so the offsets after it are known (record 0, marker 1).
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
    await consumer.start()
    try:
        deadline = time.monotonic() + 20
        while (await consumer.end_offsets([tp]))[tp] < 2:
            assert time.monotonic() < deadline, "the abort marker was never written"
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()


async def consume_until_error(
    bootstrap: str, tp: TopicPartition, offset: int
) -> tuple[list[int], BaseException | None, BaseException | None]:
    """Offsets a read_committed consumer delivers from ``offset``, the error that
    stopped it and the error of one more ``getmany`` after that."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    delivered: list[int] = []
    first: BaseException | None = None
    again: BaseException | None = None
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + 20
        while first is None and time.monotonic() < deadline:
            try:
                batches = await consumer.getmany(timeout_ms=500)
            except Exception as exc:
                first = exc
                break
            delivered += [r.offset for records in batches.values() for r in records]
        if first is not None:
            try:
                batches = await consumer.getmany(timeout_ms=2000)
                delivered += [r.offset for records in batches.values() for r in records]
            except Exception as exc:
                again = exc
    finally:
        await consumer.stop()
    return delivered, first, again


def test_read_batches_at_reads_what_the_consumer_cannot_decode(
    kafka_bootstrap: str, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("unreadable")
    tp = TopicPartition(topic, 0)
    options = client_options(Settings().model_copy(update={"bootstrap_servers": kafka_bootstrap}))
    assert options["bootstrap_servers"] == kafka_bootstrap

    async def scenario() -> None:
        await create_topics(kafka_bootstrap, [topic], 1)
        # An aborted transaction (its record and its marker) lies before the batch.
        await abort_one_transaction(kafka_bootstrap, tp, unique_name("txn"))
        offset_a = await produce_raw_batch(kafka_bootstrap, topic, 0, [A, B, C], timestamp_ms=T0)
        assert offset_a == 2
        await produce(kafka_bootstrap, topic, [(b"d", b"after")], partition=0)

        # The aiokafka behaviour we work around: getmany raises, and again.
        delivered, first, again = await consume_until_error(kafka_bootstrap, tp, offset_a)
        assert isinstance(first, UnicodeDecodeError), (delivered, first)
        assert isinstance(again, UnicodeDecodeError), (delivered, again)
        # Not even A, before B in the batch: getmany gathers a batch's records
        # before it returns any, so the whole batch is out of reach.
        assert delivered == []

        expected = [raw(tp, A, offset_a), raw(tp, B, offset_a + 1), raw(tp, C, offset_a + 2)]
        records, next_offset = await read_batches_at(options, tp, offset_a)
        assert (records, next_offset) == (expected, offset_a + 3)
        assert [r.readable() for r in records] == [True, False, True]

        # From the start: the aborted record and the markers are passed over.
        assert await read_batches_at(options, tp, 0) == (expected, offset_a + 3)
        # From inside the batch: the records from there on.
        assert await read_batches_at(options, tp, offset_a + 1) == (expected[1:], offset_a + 3)

        after, end = await read_batches_at(options, tp, offset_a + 3)
        assert [(r.offset, r.key, r.value, r.headers) for r in after] == [
            (offset_a + 3, b"d", b"after", ())
        ]
        assert end == offset_a + 4
        assert await read_batches_at(options, tp, end) == ([], end)

    asyncio.run(scenario())


@pytest.mark.parametrize("compression", [1], ids=["gzip"])
def test_read_batches_at_reads_a_compressed_unreadable_batch(
    kafka_bootstrap: str, unique_name: Callable[[str], str], compression: int
) -> None:
    topic = unique_name("unreadable-gzip")
    tp = TopicPartition(topic, 0)
    options = client_options(Settings().model_copy(update={"bootstrap_servers": kafka_bootstrap}))

    async def scenario() -> None:
        await create_topics(kafka_bootstrap, [topic], 1)
        offset_a = await produce_raw_batch(
            kafka_bootstrap, topic, 0, [A, B, C], timestamp_ms=T0, compression=compression
        )
        _, first, _ = await consume_until_error(kafka_bootstrap, tp, offset_a)
        assert isinstance(first, UnicodeDecodeError)

        records, next_offset = await read_batches_at(options, tp, offset_a)
        assert records == [raw(tp, A, offset_a), raw(tp, B, offset_a + 1), raw(tp, C, offset_a + 2)]
        assert next_offset == offset_a + 3

    asyncio.run(scenario())


async def _alter_topic(bootstrap: str, topic: str, changes: dict[str, str]) -> None:
    """Set ``changes`` on ``topic``, keeping its other dynamic configs (AlterConfigs
    replaces a resource's whole set: the changelog's ``cleanup.policy`` with it)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
        dynamic = {
            name: value
            for response in described
            for resource in response.resources
            for name, value, _read_only, source, *_ in resource[4]
            if source == _DYNAMIC_TOPIC_CONFIG
        }
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic, {**dynamic, **changes})]
        )
    finally:
        await admin.close()


_DYNAMIC_TOPIC_CONFIG = 1


@contextlib.asynccontextmanager
async def _cleaner_backoff(bootstrap: str, ms: int) -> AsyncIterator[None]:
    """The log cleaner of the project's own broker waits ``ms`` rather than 15 s
    when it found nothing to clean, while the block runs. A broker of
    STREAM_APP_TEST_BOOTSTRAP_SERVERS is left as it is (AlterConfigs would
    replace its operator's dynamic broker configs): the test waits longer."""
    if EXTERNAL_BOOTSTRAP_SERVERS:
        yield
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        brokers = [str(b["node_id"]) for b in (await admin.describe_cluster())["brokers"]]
        setting = {"log.cleaner.backoff.ms": str(ms)}
        await admin.alter_configs(
            [ConfigResource(ConfigResourceType.BROKER, b, setting) for b in brokers]
        )
        try:
            yield
        finally:
            await admin.alter_configs(
                [ConfigResource(ConfigResourceType.BROKER, b, {}) for b in brokers]
            )
    finally:
        await admin.close()


async def _abandon_a_transaction(bootstrap: str, tp: TopicPartition, transactional_id: str) -> None:
    """A transaction left open with a record on ``tp``, then aborted by the next
    producer of its id, as after a crash: the coordinator writes the abort marker
    with the producer's epoch raised, so that marker is its producer's last batch
    on ``tp``, with no data of that epoch before it."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    await producer.start()
    await producer.begin_transaction()
    await producer.send_and_wait(tp.topic, b"never committed", key=b"ghost", partition=tp.partition)
    await producer.stop()  # a stop does not end the transaction
    successor = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=transactional_id)
    await successor.start()  # InitProducerId: the open transaction is aborted
    await successor.stop()


async def _read_committed_fails(bootstrap: str, tp: TopicPartition) -> BaseException | None:
    """The error that stops a read_committed consumer reading ``tp`` from its
    start to its end, if one does."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        deadline = time.monotonic() + 20
        while await consumer.position(tp) < end and time.monotonic() < deadline:
            try:
                await consumer.getmany(tp, timeout_ms=500)
            except KafkaError as exc:
                return exc
        return None
    finally:
        await consumer.stop()


async def test_a_restore_passes_the_empty_control_batch_the_log_cleaner_leaves(
    deployment: Deployment, workers: Callable[..., Worker], tmp_path: Path
) -> None:
    """Kafka's log cleaner, compacting a changelog, keeps a producer's last
    batch on a partition even when it removes its records (KAFKA-7467): after a
    transaction aborted with a raised epoch (a worker killed mid-transaction,
    whose task then wrote no more there), that batch is the abort marker's, a
    control batch of no records. aiokafka's consumer stops on it under
    read_committed; a worker restoring from that changelog reads past it.

    The abandoned transaction has a transactional id of its own, so that the
    worker's traffic can keep the partition changing (the cleaner needs three
    passes over new segments) without moving that producer's last batch."""
    t = deployment.topics
    app_id = deployment.env()["STREAM_APP_APP_ID"]
    partition = partition_for(b"cart-1", deployment.partitions)
    busy = [f"busy-{i}" for i in range(200)]
    busy = [iid for iid in busy if partition_for(iid.encode(), deployment.partitions) == partition]
    lamp = [{"sku": "lamp", "quantity": 2, "price": 25.5}]
    await produce(
        deployment.bootstrap,
        t.commands,
        [
            (b"cart-1", command("update", "cart-1", session={"cartItems": lamp})),
            (b"marker-1", command("update", "marker-1", session={"state": "closed"})),
        ],
    )
    first = workers(deployment)
    marker = await consume(deployment.bootstrap, [t.closed], expect=1, timeout=90)
    assert [o.doc()["integrationId"] for o in marker] == ["marker-1"], first.log_tail()

    changelog = TopicPartition(f"{app_id}-sessions-changelog", partition)
    await _alter_topic(
        deployment.bootstrap,
        changelog.topic,
        {
            "segment.ms": "100",
            "min.cleanable.dirty.ratio": "0.01",
            "delete.retention.ms": "0",
            "min.compaction.lag.ms": "0",
        },
    )
    await _abandon_a_transaction(deployment.bootstrap, changelog, f"{app_id}-crashed-elsewhere")
    updates: Counter[str] = Counter()
    failed: BaseException | None = None
    async with _cleaner_backoff(deployment.bootstrap, 200):
        # Three cleaner passes: 15 s apart at the most on an external broker.
        waited = 300 if EXTERNAL_BOOTSTRAP_SERVERS else 120
        deadline = time.monotonic() + waited
        while failed is None and time.monotonic() < deadline:
            # The worker's transactions append to the changelog: its segments roll.
            for iid in busy:
                updates[iid] += 1
                value = command("update", iid, session={"attributes": {"n": updates[iid]}})
                await produce(deployment.bootstrap, t.commands, [(iid.encode(), value)])
            await asyncio.sleep(0.5)
            failed = await _read_committed_fails(deployment.bootstrap, changelog)
    assert failed is not None, f"the cleaner left no empty control batch within {waited} s"
    assert empty_control_batch(failed), repr(failed)
    assert first.stop() == 0, first.log_tail()

    # An empty disk: every store is restored from its changelog.
    second = workers(deployment, data_dir=tmp_path / "fresh-state")
    closes = [
        (iid.encode(), command("update", iid, session={"state": "closed"}))
        for iid in ["cart-1", *busy]
    ]
    await produce(deployment.bootstrap, t.commands, closes)
    outputs = await consume(deployment.bootstrap, [t.closed], expect=2 + len(busy), timeout=120)
    closed = {o.doc()["integrationId"]: o.doc()["session"] for o in outputs}
    assert closed["cart-1"]["cartItems"][0]["sku"] == "lamp", second.log_tail()
    assert closed["cart-1"]["total"] == 51.0
    assert {iid: closed[iid]["updateCount"] for iid in busy} == {
        iid: updates[iid] + 1 for iid in busy
    }
    assert {iid: closed[iid]["attributes"] for iid in busy} == {
        iid: {"n": updates[iid]} for iid in busy
    }
    assert second.stop() == 0, second.log_tail()
    assert "(KAFKA-7467)" in second.log_path.read_text(errors="replace"), second.log_tail()


def _damage(log_dir: Path, tp: TopicPartition, needle: bytes) -> None:
    """Flip the last bit of ``needle`` in ``tp``'s one log segment, in place,
    as a broker's disk damages a batch: its CRC no longer matches. The broker
    serves the file as it is (it checks no CRC on a fetch)."""
    [segment] = (log_dir / f"{tp.topic}-{tp.partition}").glob("*.log")
    data = bytearray(segment.read_bytes())
    at = data.find(needle)
    assert data.count(needle) == 1, f"{needle!r} is not once in {segment}"
    with segment.open("r+b") as f:
        f.seek(at + len(needle) - 1)
        f.write(bytes([data[at + len(needle) - 1] ^ 1]))


async def _commit_offset(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> None:
    """What ``kafka-consumer-groups.sh --reset-offsets --to-offset`` does for
    one partition of a group that has no member."""
    # Not auto-committing: its stop would commit the position it fetched from.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.commit({tp: offset})
    finally:
        await consumer.stop()


async def _twenty_closes(
    kafka: KafkaCluster, name: str, tmp_path: Path, prefix: str
) -> tuple[Deployment, list[str], TopicPartition]:
    """A deployment named ``name`` on ``kafka`` whose command partition 0
    holds 20 closes of new sessions, a batch each."""
    d = Deployment(kafka.bootstrap_servers, name, tmp_path / "state")
    t = d.topics
    await create_topics(d.bootstrap, [t.commands], d.partitions)
    ids = [f"{prefix}-cart-{n:03d}" for n in range(200)]
    ids = [iid for iid in ids if partition_for(iid.encode(), d.partitions) == 0][:20]
    for iid in ids:
        value = command("update", iid, session={"state": "closed"})
        await produce(d.bootstrap, t.commands, [(iid.encode(), value)], partition=0)
    return d, ids, TopicPartition(t.commands, 0)


_NAMED_AT_10 = "%s[0]: the record batch at offset 10 is corrupt"


async def _the_first_ten_applied_then_stopped(
    d: Deployment, ids: list[str], workers: Callable[..., Worker]
) -> None:
    """A worker over :func:`_twenty_closes` whose batch at offset 10 is
    damaged: it applies and commits the ten closes before it, then stops on
    it (exit 1), naming it."""
    t = d.topics
    first = workers(d)
    first.expect_exit(1)
    await asyncio.to_thread(first.proc.wait, 120)
    log = first.log_path.read_text(errors="replace")
    assert _NAMED_AT_10 % t.commands in log, first.log_tail()
    closed = await consume(d.bootstrap, [t.closed], expect=10, timeout=60, settle=2)
    assert sorted(o.doc()["integrationId"] for o in closed) == ids[:10]
    offsets = await partition_offsets(d.bootstrap, d.env()["STREAM_APP_APP_ID"], [t.commands])
    assert offsets[TopicPartition(t.commands, 0)][1] == 10


async def test_a_checksum_damaged_batch_loses_only_itself(
    kafka_on_disk: KafkaCluster,
    unique_name: Callable[[str], str],
    workers: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    """A command batch damaged on the broker's disk: no client can read it, and
    aiokafka fails the whole fetch that holds it. The worker stopped at once,
    at every start, with the ten good commands before it never applied and no
    offset committed; the runbook's reset past the batch then lost them too
    (a black-box run found it). Now the worker applies and commits what
    precedes the batch before it stops and names it, and after the reset only
    the damaged batch's command is missing."""
    d, ids, tp = await _twenty_closes(kafka_on_disk, unique_name("it"), tmp_path, "crc")
    t = d.topics
    [node] = kafka_on_disk.members
    _damage(node.data_dir / "log", tp, b'"integrationId":"%s"' % ids[10].encode())
    await _the_first_ten_applied_then_stopped(d, ids, workers)

    # The runbook: the group moved past the batch (one record), the worker started again.
    await _commit_offset(d.bootstrap, d.env()["STREAM_APP_APP_ID"], tp, 11)
    second = workers(d)
    closed = await consume(d.bootstrap, [t.closed], expect=19, timeout=90, settle=2)
    assert sorted(o.doc()["integrationId"] for o in closed) == ids[:10] + ids[11:], (
        second.log_tail()
    )
    assert second.stop() == 0, second.log_tail()
    rejected = await consume(d.bootstrap, [t.rejected], expect=0, timeout=5)
    assert rejected == []


def _zero_length(log_dir: Path, tp: TopicPartition, index: int) -> None:
    """Zero the length field of ``tp``'s batch number ``index`` (from 0) in its
    one log segment, as a disk's zeroed bytes would: Kafka can no longer read
    its log from there, and answers a fetch at that batch CORRUPT_MESSAGE."""
    [segment] = (log_dir / f"{tp.topic}-{tp.partition}").glob("*.log")
    data = segment.read_bytes()
    at = 0
    for _ in range(index):
        (length,) = struct.unpack_from(">i", data, at + 8)
        at += 12 + length
    with segment.open("r+b") as f:
        f.seek(at + 8)
        f.write(bytes(4))


async def test_a_batch_whose_length_is_damaged_stops_every_worker_rather_than_stall(
    kafka_on_disk: KafkaCluster,
    unique_name: Callable[[str], str],
    workers: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    """A batch whose length reads 0: aiokafka fails the fetch that holds it
    naming no partition, and a fetch at it Kafka answers CORRUPT_MESSAGE, on
    which aiokafka only warns and fetches again. The first worker processes
    what precedes it and stops on it; the next one, starting at the batch,
    stalled silently for good. Now it stops on it too, naming it."""
    d, ids, tp = await _twenty_closes(kafka_on_disk, unique_name("it"), tmp_path, "len")
    [node] = kafka_on_disk.members
    _zero_length(node.data_dir / "log", tp, 10)
    await _the_first_ten_applied_then_stopped(d, ids, workers)

    second = workers(d)
    second.expect_exit(1)
    await asyncio.to_thread(second.proc.wait, 120)
    log = second.log_path.read_text(errors="replace")
    assert _NAMED_AT_10 % tp.topic in log, second.log_tail()
    assert "CORRUPT_MESSAGE" in log, second.log_tail()
