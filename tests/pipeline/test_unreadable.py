"""Our v2 record-batch parser (stream_app.pipeline.unreadable), on hand-built batches.

No broker: batches come from the test encoder in tests/pipeline/record_batches.py.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from types import SimpleNamespace

import aiokafka.codec
import pytest
from aiokafka.errors import CorruptRecordException, OffsetOutOfRangeError
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app.pipeline import unreadable
from stream_app.pipeline.unreadable import (
    RawRecord,
    RecordBatch,
    RecordBatchError,
    committed_batches,
    parse_record_batches,
)
from tests.pipeline.fakes import IdleKafkaClient
from tests.pipeline.record_batches import GZIP, BatchRecord, control_batch, encode_batch, recrc

TP = TopicPartition("commands", 2)
BAD_NAME = b"\xff\xfe"
T0 = 1_700_000_000_000

A = BatchRecord(b"a", b'{"type":"a"}', ((b"trace", b"1"),))
B = BatchRecord(b"b", b'{"type":"b"}', ((BAD_NAME, b"x"), (b"ok", None)), timestamp_delta=5)
C = BatchRecord(b"c", b'{"type":"c"}', timestamp_delta=9)


def raw(record: BatchRecord, offset: int, timestamp_ms: int) -> RawRecord:
    return RawRecord(
        TP.topic, TP.partition, offset, timestamp_ms, record.key, record.value, record.headers
    )


def committed_records(
    batches: list[RecordBatch], offset: int, aborted: list[tuple[int, int]] | None = None
) -> tuple[list[RawRecord], int]:
    """The first batch with committed records at or after ``offset``, by
    :func:`committed_batches`' rules: its records and the offset after it; or
    no records and the offset after the batches passed over."""
    position = offset
    for records, after in committed_batches(batches, offset, aborted or []):
        if records:
            return records, after
        position = after
    return [], position


def test_aiokafka_cannot_decode_a_header_name_that_is_not_utf8() -> None:
    """Pins the behaviour the module works around (pure Python or C, whichever
    aiokafka loaded): the consumer's own batch reader raises on record B."""
    batch = MemoryRecords(encode_batch([A, B, C], base_offset=40)).next_batch()
    first = next(batch)
    assert first.headers == [("trace", b"1")]
    with pytest.raises(UnicodeDecodeError):
        next(batch)


def test_parses_every_record_of_a_batch_with_an_unreadable_header_name() -> None:
    batches = parse_record_batches(encode_batch([A, B, C], base_offset=40, first_timestamp=T0), TP)

    assert len(batches) == 1
    assert batches[0].records == (raw(A, 40, T0), raw(B, 41, T0 + 5), raw(C, 42, T0 + 9))
    assert batches[0].next_offset == 43
    a, b, c = batches[0].records
    assert (a.readable(), b.readable(), c.readable()) == (True, False, True)
    assert b.headers == ((BAD_NAME, b"x"), (b"ok", None))
    assert a.decoded_headers() == (("trace", b"1"),)
    with pytest.raises(UnicodeDecodeError):
        b.decoded_headers()


def test_returns_the_records_from_the_offset_on_and_where_to_resume() -> None:
    batches = parse_record_batches(
        encode_batch([A, B, C], base_offset=40, first_timestamp=T0)
        + encode_batch([A], base_offset=43, first_timestamp=T0),
        TP,
    )

    assert committed_records(batches, 41) == ([raw(B, 41, T0 + 5), raw(C, 42, T0 + 9)], 43)
    assert committed_records(batches, 43) == ([raw(A, 43, T0)], 44)


def test_keeps_null_and_empty_keys_values_and_header_values_apart() -> None:
    records = [
        BatchRecord(None, None, ((b"", None),)),
        BatchRecord(b"", b"", ((b"h", b""),)),
    ]
    (batch,) = parse_record_batches(encode_batch(records, first_timestamp=T0), TP)

    assert batch.records == (raw(records[0], 0, T0), raw(records[1], 1, T0))


def test_gzip_batch_with_an_unreadable_header_name() -> None:
    data = encode_batch([A, B, C], base_offset=7, compression=GZIP, first_timestamp=T0)

    (batch,) = parse_record_batches(data, TP)

    assert batch.records == (raw(A, 7, T0), raw(B, 8, T0 + 5), raw(C, 9, T0 + 9))
    assert committed_records([batch], 8) == ([raw(B, 8, T0 + 5), raw(C, 9, T0 + 9)], 10)


def test_log_append_time_gives_every_record_the_batch_max_timestamp() -> None:
    (batch,) = parse_record_batches(
        encode_batch([A, C], first_timestamp=T0, log_append_time=True), TP
    )

    assert [r.timestamp_ms for r in batch.records] == [T0 + 9, T0 + 9]


def test_control_batches_are_skipped() -> None:
    data = control_batch(0, producer_id=7, commit=True) + encode_batch(
        [A, C], base_offset=1, first_timestamp=T0
    )
    batches = parse_record_batches(data, TP)

    assert batches[0].control
    assert committed_records(batches, 0) == ([raw(A, 1, T0), raw(C, 2, T0 + 9)], 3)


def test_batches_of_aborted_transactions_are_skipped() -> None:
    data = (
        encode_batch([A, B], base_offset=10, transactional=True, producer_id=7, first_timestamp=T0)
        + control_batch(12, producer_id=7, commit=False)
        + encode_batch([C], base_offset=13, transactional=True, producer_id=7, first_timestamp=T0)
    )
    batches = parse_record_batches(data, TP)

    # As the fetch response lists it: producer 7 aborted a transaction from offset 10.
    assert committed_records(batches, 10, [(7, 10)]) == ([raw(C, 13, T0 + 9)], 14)
    # The marker ends the abort: producer 7's next transaction is read.
    assert committed_records(batches, 10, []) == ([raw(A, 10, T0), raw(B, 11, T0 + 5)], 12)


def test_an_aborted_transaction_of_another_producer_does_not_hide_a_batch() -> None:
    (batch,) = parse_record_batches(
        encode_batch([A], base_offset=5, transactional=True, producer_id=8, first_timestamp=T0),
        TP,
    )

    assert committed_records([batch], 5, [(7, 0)]) == ([raw(A, 5, T0)], 6)


def test_only_markers_and_aborted_batches_give_no_records_and_the_offset_after_them() -> None:
    data = encode_batch([A], base_offset=3, transactional=True, producer_id=7) + control_batch(
        4, producer_id=7, commit=False
    )

    assert committed_records(parse_record_batches(data, TP), 3, [(7, 3)]) == ([], 5)
    assert committed_records([], 3) == ([], 3)


def test_a_batch_emptied_by_compaction_below_the_offset_is_passed_over() -> None:
    # Compaction kept the batch's last offset delta (2) but not its records past 20.
    data = encode_batch([A], base_offset=20, last_offset_delta=2) + encode_batch(
        [C], base_offset=23, first_timestamp=T0
    )
    batches = parse_record_batches(data, TP)

    assert committed_records(batches, 21) == ([raw(C, 23, T0 + 9)], 24)


def test_a_partial_batch_at_the_end_of_the_fetch_is_left_out() -> None:
    whole = encode_batch([A], base_offset=0)
    cut = encode_batch([C], base_offset=1)[:-3]

    assert len(parse_record_batches(whole + cut, TP)) == 1
    assert parse_record_batches(whole[:30], TP) == []


def test_a_corrupt_batch_is_an_error_that_names_its_base_offset() -> None:
    data = bytearray(encode_batch([A]) + encode_batch([A, B, C], base_offset=1))
    data[-1] ^= 0xFF

    with pytest.raises(unreadable.CorruptBatchError, match="CRC") as raised:
        parse_record_batches(bytes(data), TP)
    assert raised.value.base_offset == 1
    assert isinstance(raised.value, RecordBatchError)


def _legacy_message(offset: int, value: bytes) -> bytes:
    """A message of magic 1 (Kafka before 0.11), its CRC-32 right."""
    body = struct.pack(">bbqii", 1, 0, T0, -1, len(value)) + value
    return struct.pack(">qiI", offset, 4 + len(body), zlib.crc32(body)) + body


def test_an_old_message_format_is_an_error() -> None:
    with pytest.raises(RecordBatchError, match="magic 1, only magic 2") as raised:
        parse_record_batches(_legacy_message(3, b"v" * 40), TP)
    assert not isinstance(raised.value, unreadable.CorruptBatchError)


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data.__setitem__(16, 1),  # the magic byte, which no CRC of magic 2 covers
        lambda data: data.__setitem__(slice(12, 30), bytes(18)),  # zeroed from the leader epoch
    ],
)
def test_a_damaged_magic_byte_is_a_damaged_batch(damage: Callable[[bytearray], None]) -> None:
    """aiokafka reads the batch as an old format whose CRC does not match
    ("Invalid CRC"). The raw read said "magic 0" (not damage): first in a
    fetch, the records before it in the consumer's failed fetch were never
    read; after them, the whole raw fetch failed."""
    good = encode_batch([A], base_offset=0, first_timestamp=T0)
    damaged = bytearray(encode_batch([C], base_offset=1, first_timestamp=T0))
    damage(damaged)
    with pytest.raises(unreadable.CorruptBatchError, match="CRC mismatch") as raised:
        parse_record_batches(bytes(damaged), TP)
    assert raised.value.base_offset == 1
    [batch] = parse_record_batches(good + bytes(damaged), TP, whole=True)
    assert batch.next_offset == 1


def test_a_codec_that_is_not_installed_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker installs every codec (aiokafka's extras); this is the path
    # for an install without them.
    monkeypatch.setattr(aiokafka.codec, "has_snappy", lambda: False)
    data = bytearray(encode_batch([A]))
    (attributes,) = struct.unpack_from(">h", data, 21)
    struct.pack_into(">h", data, 21, attributes | 2)  # snappy
    # The CRC must match for the codec check to be reached.
    struct.pack_into(">I", data, 17, calc_crc32c(bytes(data[21:])))

    with pytest.raises(RecordBatchError, match="snappy codec is not installed"):
        parse_record_batches(bytes(data), TP)
    # Not the batch's fault, so not rejected with it: this machine's to mend.
    with pytest.raises(RecordBatchError, match="snappy codec is not installed"):
        parse_record_batches(bytes(data), TP, whole=True)


_bytes = st.binary(max_size=40)
_records = st.lists(
    st.builds(
        BatchRecord,
        key=st.none() | _bytes,
        value=st.none() | _bytes,
        headers=st.lists(st.tuples(_bytes, st.none() | _bytes), max_size=3).map(tuple),
        timestamp_delta=st.integers(0, 10**6),
    ),
    min_size=1,
    max_size=5,
)


@settings(deadline=None)  # a loaded machine stalls any example
@given(records=_records, base_offset=st.integers(0, 2**40), gzip=st.booleans())
def test_every_record_comes_back_byte_for_byte(
    records: list[BatchRecord], base_offset: int, gzip: bool
) -> None:
    data = encode_batch(
        records, base_offset=base_offset, first_timestamp=T0, compression=GZIP if gzip else 0
    )

    (batch,) = parse_record_batches(data, TP)

    assert batch.records == tuple(
        raw(r, base_offset + i, T0 + r.timestamp_delta) for i, r in enumerate(records)
    )
    assert batch.next_offset == base_offset + len(records)


class _Log:
    """Stands for a partition's leader: a fetch at an offset answers every batch
    from the one holding it, up to ``max_batches`` of them (as a byte limit
    would), with ``aborted`` as the response's aborted transactions."""

    def __init__(
        self, batches: list[bytes], aborted: list[tuple[int, int]], max_batches: int
    ) -> None:
        self.batches = [(parse_record_batches(b, TP)[0], b) for b in batches]
        self.aborted = aborted
        self.max_batches = max_batches
        self.fetched: list[int] = []

    async def fetch(
        self, client: object, tp: TopicPartition, offset: int, max_bytes: int
    ) -> tuple[bytes, list[tuple[int, int]]]:
        self.fetched.append(offset)
        held = [data for batch, data in self.batches if batch.next_offset > offset]
        return b"".join(held[: self.max_batches]), self.aborted


@pytest.fixture
def log_of(monkeypatch: pytest.MonkeyPatch) -> Callable[..., _Log]:
    def make(batches: list[bytes], aborted: list[tuple[int, int]], max_batches: int = 100) -> _Log:
        log = _Log(batches, aborted, max_batches)
        monkeypatch.setattr(unreadable, "AIOKafkaClient", IdleKafkaClient)
        monkeypatch.setattr(unreadable, "_fetch", log.fetch)
        return log

    return make


async def test_one_raw_read_returns_many_batches_up_to_the_first_unreadable_one(
    log_of: Callable[..., _Log],
) -> None:
    """A backlog written one record per batch: a read returned one batch, so
    getting past an unreadable record 3,000 records ahead took 3,000 reads
    with a connection each. A read now returns every batch of its fetch, up
    to and including the first that holds an unreadable record; aborted
    transactions and markers on the way are passed over as before."""
    batches = [encode_batch([A], base_offset=n, first_timestamp=T0) for n in range(4)]
    batches += [
        encode_batch([C], base_offset=4, transactional=True, producer_id=7, first_timestamp=T0),
        control_batch(5, producer_id=7, commit=False),
        encode_batch([B, C], base_offset=6, first_timestamp=T0),
        encode_batch([A], base_offset=8, first_timestamp=T0),
    ]
    log = log_of(batches, [(7, 4)])
    records, after = await unreadable.read_batches_at({}, TP, 1)
    assert records == [raw(A, n, T0) for n in (1, 2, 3)] + [raw(B, 6, T0 + 5), raw(C, 7, T0 + 9)]
    assert after == 8
    assert log.fetched == [1]
    assert await unreadable.read_batches_at({}, TP, 8) == ([raw(A, 8, T0)], 9)
    assert await unreadable.read_batches_at({}, TP, 9) == ([], 9)


async def test_a_fetch_of_markers_only_is_read_past(log_of: Callable[..., _Log]) -> None:
    batches = [
        encode_batch([C], base_offset=0, transactional=True, producer_id=7, first_timestamp=T0),
        control_batch(1, producer_id=7, commit=False),
        encode_batch([A], base_offset=2, first_timestamp=T0),
    ]
    log = log_of(batches, [(7, 0)], max_batches=2)
    assert await unreadable.read_batches_at({}, TP, 0) == ([raw(A, 2, T0)], 3)
    assert log.fetched == [0, 2]


async def test_read_past_reads_about_raw_records_then_lets_the_caller_poll(
    log_of: Callable[..., _Log], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unreadable, "RAW_RECORDS", 5)
    log_of([encode_batch([A], base_offset=n, first_timestamp=T0) for n in range(20)], [], 3)
    read = [(len(raws), after) async for raws, after in unreadable.read_past({}, TP, 0)]
    assert read == [(3, 3), (3, 6)]
    read = [(len(raws), after) async for raws, after in unreadable.read_past({}, TP, 0, end=4)]
    assert read == [(3, 3), (3, 6)]  # a fetch is not cut at the end
    read = [(len(raws), after) async for raws, after in unreadable.read_past({}, TP, 18)]
    assert read == [(2, 20)]


async def test_read_past_reads_a_backlog_of_unreadable_batches_a_fetch_at_a_time(
    log_of: Callable[..., _Log], monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 unreadable records, one per batch: read_past stopped at the first of
    each fetch, so it fetched (and parsed up to 2 MiB) once per record, about
    11 ms each against a real broker; and made a client per fetch."""
    made: list[object] = []

    class _Counted(IdleKafkaClient):
        def __init__(self, **options: object) -> None:
            made.append(self)

    backlog = [encode_batch([B], base_offset=n, first_timestamp=T0) for n in range(300)]
    log = log_of(backlog, [], 100)
    monkeypatch.setattr(unreadable, "AIOKafkaClient", _Counted)  # over log_of's
    read = [(len(raws), after) async for raws, after in unreadable.read_past({}, TP, 0)]
    assert read == [(100, 100), (100, 200), (100, 300)]
    assert log.fetched == [0, 100, 200, 300]  # the last finds the end
    assert len(made) == 1
    # An input read up to its last stable offset: no connection at all.
    assert [r async for r in unreadable.read_past({}, TP, 300, end=300)] == []
    assert len(made) == 1


@pytest.mark.parametrize("length", [-5, 0, 20])
def test_a_batch_length_shorter_than_a_header_is_a_record_batch_error(length: int) -> None:
    """Before, struct.error or IndexError: not the error the raw read handles."""
    data = bytearray(encode_batch([A], base_offset=7, first_timestamp=T0))
    struct.pack_into(">i", data, 8, length)
    with pytest.raises(RecordBatchError, match=rf"@7: batch length {length} is shorter") as raised:
        parse_record_batches(bytes(data), TP)
    # Damage: shorter than a message of any format (aiokafka's error names no
    # partition), or not an old format's message either.
    assert isinstance(raised.value, unreadable.CorruptBatchError)


def test_a_short_message_of_an_old_format_is_not_damage() -> None:
    with pytest.raises(RecordBatchError, match="batch length 26 is shorter") as raised:
        parse_record_batches(_legacy_message(3, b"four") + _legacy_message(4, b"five"), TP)
    assert not isinstance(raised.value, unreadable.CorruptBatchError)


def _read_in_pure_python(batch: bytes) -> Exception:
    """What aiokafka's pure-Python reader (used when its C extension cannot
    load) raises reading ``batch``."""
    from aiokafka.record.default_records import _DefaultRecordBatchPy

    try:
        list(_DefaultRecordBatchPy(bytearray(batch)))
    except Exception as exc:  # what it raises is the point
        return exc
    raise AssertionError("read without an error")


def test_a_header_name_the_pure_python_reader_cannot_decode_is_read_past() -> None:
    """Without aiokafka's C extension a header name that is not UTF-8 comes as
    CorruptRecordException, not UnicodeDecodeError: it stopped the worker.
    The fetcher's checksum mismatch is not read past: the raw read checks the
    checksum too, and cannot pass the batch either."""
    header = encode_batch([BatchRecord(b"k", b"v", ((b"\xff\xfe", b"x"),))])
    raised = _read_in_pure_python(header)
    assert type(raised).__name__ == "CorruptRecordException"
    assert unreadable.can_read_past(raised)
    assert not unreadable.can_read_past(CorruptRecordException(f"Invalid CRC - {TP}"))
    assert not isinstance(CorruptRecordException("Invalid CRC"), unreadable.UNREADABLE)
    # Nor damage the checksum does not cover (zeroed bytes: a batch length of
    # 0). Read past, the raw read dropped the fetch, and the worker looped.
    zeroed = CorruptRecordException("Record size is less than the minimum record overhead (14)")
    assert not unreadable.can_read_past(zeroed)


def test_aiokafka_fails_read_committed_on_a_control_batch_of_no_records() -> None:
    """Pins what unreadable.empty_control_batch recognises: Kafka's log
    cleaner leaves such a batch in a compacted transactional topic (a
    producer's last batch, its marker removed: KAFKA-7467). aiokafka's
    consumer raises a plain KafkaError on it, read_committed; the raw read
    passes it, as Java's consumer does."""
    from aiokafka.consumer.fetcher import READ_COMMITTED, PartitionRecords
    from aiokafka.errors import KafkaError

    data = encode_batch(
        [], base_offset=10, transactional=True, control=True, producer_id=7, last_offset_delta=0
    ) + encode_batch([A], base_offset=11, first_timestamp=T0)
    records = PartitionRecords(TP, MemoryRecords(data), [], 10, None, None, True, READ_COMMITTED)
    with pytest.raises(KafkaError) as raised:
        list(records)
    assert unreadable.empty_control_batch(raised.value)
    assert committed_records(parse_record_batches(data, TP), 10) == ([raw(A, 11, T0)], 12)
    assert not unreadable.empty_control_batch(KafkaError("another"))


@pytest.mark.parametrize(
    "damage",
    ["a negative record count", "bytes after the last record", "an offset past the batch's"],
)
def test_a_batch_kafka_would_refuse_is_an_error_not_records_at_other_offsets(damage: str) -> None:
    """Only a damaged log holds one (its CRC right): it was read as fewer
    records, or with offsets past the batch, where the consumer was then
    sought, past records it never read."""
    batch = encode_batch([A, C], base_offset=40, first_timestamp=T0)
    if damage == "a negative record count":
        batch = recrc(batch[:57] + struct.pack(">i", -1) + batch[61:])
    elif damage == "bytes after the last record":
        batch = recrc(batch + b"\x00\x00")
    else:
        batch = encode_batch([A, C], base_offset=40, first_timestamp=T0, last_offset_delta=0)
    with pytest.raises(RecordBatchError):
        parse_record_batches(batch, TP)
    assert [
        r.offset for r in parse_record_batches(encode_batch([A, C], base_offset=40), TP)[0].records
    ] == [40, 41]


def _hand_built(damage: str) -> bytes:
    """A batch at offset 40 whose CRC matches and which no Kafka client writes,
    as Kafka 4.1 stores it from a raw Produce request."""
    if damage == "gzip with bytes after it":
        return recrc(encode_batch([A, C], base_offset=40, compression=GZIP) + b"JUNKJUNK")
    if damage == "an offset behind the one before":
        # The second record's delta 1 (varint 02) made 0 (varint 00): the same length.
        good = encode_batch([A, C], base_offset=40)
        second = good.rindex(b"\x02\x02c")  # its offset delta, then its key's length and key
        return recrc(good[:second] + b"\x00" + good[second + 1 :])
    if damage == "an unknown codec":
        data = bytearray(encode_batch([A, C], base_offset=40))
        (attributes,) = struct.unpack_from(">h", data, 21)
        struct.pack_into(">h", data, 21, attributes | 5)
        return recrc(bytes(data))
    return encode_batch([A, C], base_offset=40, last_offset_delta=0)  # an offset past the batch's


@pytest.mark.parametrize(
    "damage",
    [
        "gzip with bytes after it",
        "an offset behind the one before",
        "an unknown codec",
        "an offset past the batch's",
    ],
)
def test_whole_a_batch_that_cannot_be_read_is_one_record_at_its_base_offset(damage: str) -> None:
    """Kafka stores these from a writer who builds batches by hand; aiokafka's
    consumer fails on the payload (every worker stopped, at every start) or
    drops records unseen. The engine's raw read rejects such a batch whole, by
    its position, with its bytes; restores and the settings keep raising."""
    batch = _hand_built(damage)
    with pytest.raises(RecordBatchError):
        parse_record_batches(batch, TP)
    [parsed] = parse_record_batches(batch + encode_batch([C], base_offset=42), TP, whole=True)[:1]
    [record] = parsed.records
    assert record.offset == 40
    assert record.value == batch
    assert record.key is None
    assert not record.readable()
    assert record.problem is not None
    last = 40 if damage == "an offset past the batch's" else 41  # as its header says
    assert record.problem.startswith(f"the record batch at offsets 40..{last} is rejected whole: ")
    assert parsed.next_offset == last + 1
    # The batch after it is read as any.
    after = parse_record_batches(batch + encode_batch([C], base_offset=42), TP, whole=True)[1]
    assert [r.offset for r in after.records] == [42]


def test_aiokafka_fails_on_a_batch_whose_payload_has_bytes_after_it() -> None:
    """Pins what the engine reads past with a raw read (``undecompressable``)."""
    batch = MemoryRecords(_hand_built("gzip with bytes after it")).next_batch()
    with pytest.raises(Exception) as raised:  # noqa: PT011 - whatever aiokafka raises
        list(batch)
    assert unreadable.undecompressable(raised.value)
    lz4 = pytest.raises(Exception)  # noqa: PT011 - cramjam's own error type
    with lz4 as failed:
        aiokafka.codec.lz4_decode(aiokafka.codec.lz4_encode(b"x" * 100) + b"\x00" * 4)
    assert unreadable.undecompressable(failed.value)
    assert not unreadable.undecompressable(ValueError("another"))
    assert not unreadable.undecompressable(CorruptRecordException("crc"))


@pytest.mark.parametrize(
    ("offsets", "position", "out_of_order"),
    [
        ([], 0, False),
        ([1, 2, 3], 4, False),
        ([1, 2, 3], 9, False),  # the last batch ends past its last record (compaction)
        ([1, 5, 9], 10, False),  # gaps: markers, aborted records, compaction
        ([1, 51, 3, 4], 5, True),  # a record that claimed an offset ahead of its batch
        ([1, 51], 3, True),  # the same as the poll's last: the client reads next at 3
        ([1, 1, 2], 3, True),
        ([1, 2, 3], 3, True),
    ],
)
def test_a_poll_s_offsets_show_a_batch_whose_offsets_lie(
    offsets: list[int], position: int, out_of_order: bool
) -> None:
    assert unreadable.offsets_out_of_order(offsets, position) is out_of_order


def test_a_batch_rejected_whole_and_read_from_inside_it_is_rejected_from_there() -> None:
    """A poll cut after a lying batch's first record processed it; the raw
    read then began inside the batch, left the whole-batch record at its base
    offset out, and the rest of the batch was neither applied nor rejected."""
    batch = _hand_built("an offset behind the one before")  # offsets 40..41
    batches = parse_record_batches(batch, TP, whole=True)
    [(inside, after)] = list(committed_batches(batches, 41))
    [record] = inside
    assert (record.offset, record.last_offset, after) == (41, 41, 42)
    # Not "rejected whole": offset 40 was processed (replaying the rejection
    # would apply it again).
    assert record.problem is not None
    assert record.problem.startswith(
        "the record batch at offsets 40..41 is rejected from offset 41 on (the records "
        "before it were processed): "
    )
    assert list(committed_batches(batches, 42)) == [([], 42)]


def _recompressed(codec_id: int, compress: Callable[[bytes], bytes]) -> bytes:
    """A batch of record A at offset 40 whose payload ``compress`` gives, and
    flagged with ``codec_id``, its CRC right."""
    plain = bytearray(encode_batch([A], base_offset=40))
    (attributes,) = struct.unpack_from(">h", plain, 21)
    struct.pack_into(">h", plain, 21, attributes | codec_id)
    return recrc(bytes(plain[:61]) + compress(bytes(plain[61:])))


def test_what_aiokafka_raises_on_payloads_kafka_stores_is_read_past() -> None:
    """Two more shapes Kafka's readers take and aiokafka's consumer fails on:
    an lz4 payload followed by a second frame (aiokafka decodes both, then
    finds bytes after the records: CorruptRecordException), and a snappy
    stream in xerial's framing with bytes after it (struct.error). Both
    stopped every worker; the raw read rejects either whole."""
    codec = aiokafka.codec
    lz4 = _recompressed(3, lambda p: codec.lz4_encode(p) + codec.lz4_encode(b"x"))
    with pytest.raises(CorruptRecordException) as raised:
        list(MemoryRecords(lz4).next_batch())
    assert unreadable.can_read_past(raised.value)
    snappy = _recompressed(2, lambda p: codec.snappy_encode(p) + b"\x00\x01")
    with pytest.raises(Exception) as failed:  # noqa: PT011 - struct.error, from aiokafka's framing
        list(MemoryRecords(snappy).next_batch())
    assert unreadable.undecompressable(failed.value)
    for batch in (lz4, snappy):
        [parsed] = parse_record_batches(batch, TP, whole=True)
        assert parsed.records[0].problem is not None
    # The fetcher's checksum mismatch is not read past: the raw read fails on it too.
    assert not unreadable.can_read_past(CorruptRecordException(f"Invalid CRC - {TP}"))


@pytest.mark.parametrize("damage", ["a CRC that does not match", "a batch length of 0"])
def test_whole_the_batches_before_a_damaged_one_are_read_past(damage: str) -> None:
    """A fetch of a batch rejected whole, then a damaged one: the whole fetch
    raised, the raw read moved nothing on that input, and the worker polled,
    failed and read again, never naming the damaged batch. Now the batches
    before it are read, and the client meets it at the next poll."""
    first = _hand_built("gzip with bytes after it")  # offsets 40..41
    if damage == "a CRC that does not match":
        bad = bytearray(encode_batch([C], base_offset=42))
        bad[-1] ^= 0xFF
        damaged = bytes(bad)
    else:
        damaged = encode_batch([C], base_offset=42)[:8] + b"\x00" * 53
    [parsed] = parse_record_batches(first + damaged, TP, whole=True)
    assert parsed.next_offset == 42
    with pytest.raises(RecordBatchError):
        parse_record_batches(first + damaged, TP)
    with pytest.raises(RecordBatchError):  # first in the fetch: nothing to read past
        parse_record_batches(damaged, TP, whole=True)


def _serve(monkeypatch: pytest.MonkeyPatch, log: dict[int, bytes]) -> None:
    """Raw fetches answered from ``log``: the bytes a fetch at an offset gets
    (none for any other offset), with no aborted transactions."""

    async def fetch(
        client: object, tp: TopicPartition, offset: int, max_bytes: int
    ) -> tuple[bytes, list[tuple[int, int]]]:
        return log.get(offset, b""), []

    monkeypatch.setattr(unreadable, "AIOKafkaClient", IdleKafkaClient)
    monkeypatch.setattr(unreadable, "_fetch", fetch)


async def test_a_corrupt_batch_is_found_behind_a_batch_rejected_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The search for the batch to name read strictly: a batch the engine
    rejects whole, in front of it, failed the search, and the worker said only
    where the failed fetch began."""
    bad = bytearray(encode_batch([C], base_offset=42))
    bad[-1] ^= 0xFF
    log = {40: _hand_built("gzip with bytes after it") + bytes(bad), 42: bytes(bad)}
    _serve(monkeypatch, log)
    assert await unreadable.corrupt_batch_at({}, TP, 40) == 42


async def test_a_batch_whose_header_was_zeroed_is_named_where_its_read_began(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A zeroed page of a broker's disk: the batch's own base offset reads 0,
    and the worker named offset 0 for a batch at 42."""
    good = encode_batch([A, B], base_offset=40)
    zeroed = bytes(61) + encode_batch([C], base_offset=43)[61:]
    log = {40: good + zeroed, 42: zeroed}
    _serve(monkeypatch, log)
    assert await unreadable.corrupt_batch_at({}, TP, 40) == 42


async def test_a_zeroed_batch_behind_a_marker_is_named_at_its_own_offset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The read passes a marker on its own, then meets the damage: the offset
    named was where the search began, the marker's."""
    marker = control_batch(22, 7, commit=True)
    zeroed = bytes(61) + encode_batch([C], base_offset=24)[61:]
    log = {22: marker + zeroed, 23: zeroed}
    _serve(monkeypatch, log)
    assert await unreadable.corrupt_batch_at({}, TP, 22) == 23


class _Leader:
    """Stands for a client whose partition leader answers every fetch with
    ``error_code``."""

    def __init__(self, error_code: int) -> None:
        self.error_code = error_code
        self.cluster = self

    async def add_topic(self, topic: str) -> None:
        pass

    async def force_metadata_update(self) -> None:
        pass

    def leader_for_partition(self, tp: TopicPartition) -> int:
        return 1

    async def send(self, node: int, request: object) -> object:
        partition = (TP.partition, self.error_code, 0, 0, 0, [], b"")
        return SimpleNamespace(API_VERSION=5, topics=[(TP.topic, [partition])])


async def test_a_fetch_the_broker_cannot_serve_from_its_log_is_a_damaged_batch() -> None:
    """A batch whose length is damaged in the broker's own log: Kafka answers
    a fetch at it CORRUPT_MESSAGE. The raw read raised a KafkaError, the search
    for the batch found nothing, and the worker said it could not find it."""
    with pytest.raises(unreadable.CorruptBatchError, match="the broker cannot read") as raised:
        await unreadable._fetch(_Leader(2), TP, 42, 1024)
    assert raised.value.at == 42
    with pytest.raises(OffsetOutOfRangeError):  # any other error as it was
        await unreadable._fetch(_Leader(1), TP, 42, 1024)
