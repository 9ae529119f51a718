"""A record whose header name is not UTF-8, on the real broker: aiokafka's
consumer cannot decode it, read_batches_at (stream_app.pipeline.unreadable) can.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from stream_app.pipeline.kafka import client_options
from stream_app.pipeline.unreadable import RawRecord, read_batches_at
from stream_app.settings import Settings
from tests.integration.harness import create_topics, produce, produce_raw_batch
from tests.pipeline.record_batches import BatchRecord

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
