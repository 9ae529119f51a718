"""Read the record batch that aiokafka's consumer cannot decode.

Why this exists
---------------
A Kafka record header name is a string on the wire, but neither the producer
protocol nor the broker checks that it is valid UTF-8: any producer can write
``b"\\xff\\xfe"`` as a header name and the broker stores it. aiokafka's fetcher
decodes header names strictly (``h_key.decode("utf-8")`` in
``aiokafka/record/default_records.py``, and the same in its C extension), so
``AIOKafkaConsumer.getmany`` raises :class:`UnicodeDecodeError` on such a
record, on every call, and the consumer can neither hand it out nor move past
it; the records after it in the same batch are out of its reach too. aiokafka
has no public option to decode leniently or to skip a record.

What it does
------------
:func:`read_batches_at` fetches the partition itself, with its own
:class:`~aiokafka.client.AIOKafkaClient`, a read_committed ``FetchRequest``
to the partition leader and our own minimal parser of the v2 record-batch
format (magic 2) that keeps header names as raw bytes. It returns the records
of the fetched batches from an offset, up to and including the first batch
that holds an unreadable record, each as a :class:`RawRecord`, and the offset
right after the last of those batches, so the caller can reject the
unreadable records by their position, process the readable ones and seek the
consumer past the batch.

:func:`read_past` reads on, fetch after fetch over one client, past any
number of unreadable batches, up to about :data:`RAW_RECORDS` records: a
backlog of unreadable records, one per batch (a producer with no linger),
took a pass, a new connection and a failed poll each.

It is used **only after** ``getmany`` failed to decode a partition: it does
none of the consumer's prefetching, so it is no replacement for the consumer.

The same read passes a batch larger than the consumer's fetch size (a command
topic whose ``max.message.bytes`` is above it), should aiokafka ever be
handed one cut short: it then raises ``RecordTooLargeError`` and moves its
position one past the batch's offset. (Kafka sends such a batch whole when
it comes first in a fetch response and, since Fetch v3, nothing of it
otherwise: the Kafka 4.1 broker of the tests never cut one. A guard, then.)
A raw read fetches one partition at a time, so the batch comes whole, and
its records are processed (a command over the size limit, rejected as
``LIMIT_EXCEEDED``).

And it passes a control batch of no records, which Kafka's log cleaner
leaves in compacted transactional topics (the changelogs) and on which
aiokafka's consumer fails, read_committed (:func:`empty_control_batch`):
a restore reads past it from what each store holds (``tasks.restore``), the
engine's poll and the settings follower as past an unreadable record.

Contracts
---------
* The same records a read_committed aiokafka consumer would deliver, in the
  same order: control batches and batches of aborted transactions are skipped
  by the rule of aiokafka's fetcher (``PartitionRecords._unpack_records``);
  records below the requested offset are left out.
* Batch CRCs are checked, as the consumer does by default. A batch that cannot
  be parsed (corrupt, magic other than 2, a codec that is not installed, a
  count, length or offset Kafka would refuse) raises
  :class:`RecordBatchError`; nothing is guessed.
* ``FetchRequest`` is the class aiokafka's consumer sends: its version is
  negotiated per connection (the highest both sides support: v11 against
  Kafka 4.x, which dropped Fetch v0-v3). Versions below 4 cannot read
  committed data and are refused by aiokafka itself.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import operator
import struct
import zlib
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any, Final

import aiokafka.codec as codec
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    CorruptRecordException,
    KafkaError,
    NoError,
    RecordTooLargeError,
    for_code,
)
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.util import calc_crc32c
from aiokafka.structs import TopicPartition

from stream_app.errors import StreamAppError

log = logging.getLogger(__name__)

#: What ``AIOKafkaConsumer.getmany`` raises for records it cannot hand over and
#: a raw read may: a header name that is not UTF-8 (``UnicodeDecodeError`` is
#: a ValueError; see also :func:`can_read_past`) and a batch cut short
#: (``RecordTooLargeError``, see the module docstring).
UNREADABLE: Final = (UnicodeDecodeError, RecordTooLargeError)


#: What ``getmany`` raises that may be a record a raw read passes (see
#: :func:`can_read_past`): UNREADABLE, and ``CorruptRecordException``.
MAYBE_UNREADABLE: Final = (*UNREADABLE, CorruptRecordException)


def can_read_past(exc: BaseException) -> bool:
    """Whether a raw read passes what ``getmany`` raised: any of UNREADABLE,
    and two kinds of ``CorruptRecordException`` of a batch whose checksum matches: a
    header name that is not UTF-8, which aiokafka's pure-Python reader (used
    when its C extension cannot load) reports so, and bytes left after a
    batch's records (an lz4 payload followed by a second frame, which Kafka
    stores and the raw read rejects whole). Not any other: a batch whose CRC
    is wrong, or damage the CRC does not cover (a batch length of 0, a magic
    byte), which the raw read cannot pass either; the worker processes what
    precedes it, names it and stops."""
    if isinstance(exc, UNREADABLE):
        return True
    if not isinstance(exc, CorruptRecordException):
        return False
    return isinstance(exc.__cause__, UnicodeDecodeError) or _BYTES_LEFT in str(exc)


#: How aiokafka's batch reader says that bytes are left after a batch's records.
_BYTES_LEFT: Final = "unconsumed bytes after all records consumed"


#: What aiokafka's consumer raises, read_committed, at a control batch that
#: holds no record (a plain ``KafkaError``: no type says it). Kafka's log
#: cleaner leaves one where it removed a transaction's marker but keeps a
#: producer's last batch (KAFKA-7467); Java's consumer reads it as a batch of
#: no data, and so does the raw read (tests/pipeline/test_unreadable.py pins
#: aiokafka's message).
_EMPTY_CONTROL_BATCH: Final = "Control batch did not contain any records"


def empty_control_batch(exc: BaseException) -> bool:
    """Whether ``exc`` is aiokafka failing on a control batch of no records,
    which a raw read passes: on a compacted, transactional topic (the
    changelogs, the settings topic) a restore never ended, and a poll
    stopped the worker."""
    return type(exc) is KafkaError and _EMPTY_CONTROL_BATCH in str(exc)


def undecompressable(exc: BaseException) -> bool:
    """Whether ``exc`` is aiokafka's consumer failing to decompress a batch that
    Kafka stored: a gzip payload with bytes after it (``BadGzipFile``, or
    ``EOFError`` when they look like a gzip member), an lz4 frame with bytes
    after it or two snappy streams in one batch (cramjam's
    ``DecompressionError``), a snappy stream with 1-3 bytes after it
    (``struct.error``). Kafka's own reader takes these; no Kafka client
    writes them. A raw read rejects such a batch whole (``whole`` in
    :func:`parse_record_batches`)."""
    kind = type(exc)
    # struct.error: a snappy stream in xerial's framing with a few bytes after it.
    return isinstance(exc, gzip.BadGzipFile | EOFError | zlib.error | struct.error) or (
        kind.__name__ == "DecompressionError" and kind.__module__.startswith("cramjam")
    )


def misread(exc: BaseException) -> bool:
    """Whether ``exc`` is aiokafka's record reader failing on bytes it cannot
    make sense of other than by :class:`CorruptRecordException`: a batch whose
    magic byte was damaged, read by its C extension (``SystemError``: a
    negative size passed to ``PyBytes_FromStringAndSize``)."""
    return isinstance(exc, SystemError)


class OffsetsOutOfOrderError(StreamAppError):
    """Records the Kafka client handed over at offsets no honest batch gives:
    not increasing, or past where the client says it reads next. A batch
    built by hand whose records' offsets disagree with its header does it
    (Kafka 4.1 stores one, uncompressed): the worker skipped, unrejected, the
    commands up to the offset a record claimed. Raised only when a raw read
    (which rejects such a batch whole) cannot move past it either."""


def offsets_out_of_order(offsets: list[int], position: int) -> bool:
    """Whether ``offsets``, a poll's records of one partition in order, are
    not what the Kafka client gives from honest batches: strictly increasing,
    each below ``position``, where it reads next (the end of the last batch
    it read, or the offset after the last record when the poll was cut)."""
    return bool(offsets) and (
        offsets[-1] >= position or not all(map(operator.lt, offsets, islice(offsets, 1, None)))
    )


#: isolation_level of a FetchRequest: 1 = read_committed.
_READ_COMMITTED: Final = 1
#: A raw read takes what is there: at a log's end, waiting (the broker's long
#: poll) cost every input a pass reads to its end half a second.
_MAX_WAIT_MS: Final = 0
_DEFAULT_MAX_BYTES: Final = 2 * 1024 * 1024
#: How many records of one partition :func:`read_past` reads, about: whole
#: fetches, the last one taking it past. One poll of the worker's consumer
#: holds a batch size of them (5,000 by default).
RAW_RECORDS: Final = 5_000
_ATTEMPTS: Final = 5
_RETRY_BACKOFF_S: Final = 0.2

# RecordBatch header: BaseOffset, Length, PartitionLeaderEpoch, Magic, CRC,
# Attributes, LastOffsetDelta, FirstTimestamp, MaxTimestamp, ProducerId,
# ProducerEpoch, BaseSequence, RecordCount.
_BATCH_HEADER: Final = struct.Struct(">qiibIhiqqqhii")
_LOG_OVERHEAD: Final = 12  # BaseOffset + Length: the bytes Length does not count
_CRC_FROM: Final = 21  # the CRC covers Attributes to the end of the batch
_MAGIC_AT: Final = 16
#: A message of magic 0 or 1: its CRC (after Offset and Length) covers Magic
#: to the end; it is at least 14 bytes long (CRC, Magic, Attributes, the key's
#: and the value's lengths), as aiokafka's reader checks.
_LEGACY_CRC_AT: Final = 12
_LEGACY_MIN_LENGTH: Final = 14
_CODEC_MASK: Final = 0x07
_TIMESTAMP_TYPE_LOG_APPEND: Final = 0x08
_TRANSACTIONAL: Final = 0x10
_CONTROL: Final = 0x20
_ABORT_MARKER_TYPE: Final = 0  # control record key: version int16, type int16


class RecordBatchError(StreamAppError):
    """A fetched record batch that cannot be parsed (corrupt, unknown format or codec)."""


class CodecMissingError(RecordBatchError):
    """A fetched record batch compressed with a codec that is not installed:
    this machine's to mend, not the batch's fault."""


class CorruptBatchError(RecordBatchError):
    """A fetched record batch whose checksum does not match: damaged on disk."""

    def __init__(self, message: str, base_offset: int) -> None:
        super().__init__(message)
        self.base_offset = base_offset
        #: Where the batch is: its base offset, or, when that is below the
        #: offset of the fetch that met it (damage that zeroed the header
        #: says 0), that offset (set by :func:`read_batches_at`).
        self.at = base_offset


Header = tuple[bytes, bytes | None]


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as the broker stores it, header names as raw bytes."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None
    headers: tuple[Header, ...] = ()
    #: Set for a whole batch that cannot be read (see :func:`parse_record_batches`):
    #: why; the record stands for the batch, its value the batch's bytes.
    problem: str | None = None
    #: With ``problem``, the batch's last offset, which its rejection consumes.
    last_offset: int | None = None

    def readable(self) -> bool:
        """Whether aiokafka's consumer can decode this record: every header name is UTF-8."""
        if self.problem is not None:
            return False
        try:
            self.decoded_headers()
        except UnicodeDecodeError:
            return False
        return True

    def decoded_headers(self) -> tuple[tuple[str, bytes | None], ...]:
        """The headers as aiokafka's consumer gives them (names decoded strictly).

        Raises :class:`UnicodeDecodeError` when the record is not :meth:`readable`.
        """
        return tuple((name.decode("utf-8"), value) for name, value in self.headers)


@dataclass(frozen=True, slots=True)
class RecordBatch:
    """One v2 record batch: what the skip rules need, and its records."""

    base_offset: int
    last_offset_delta: int
    producer_id: int
    transactional: bool
    control: bool
    records: tuple[RawRecord, ...]

    @property
    def next_offset(self) -> int:
        """Where a consumer resumes after this batch (kept even when compaction
        removed its last records)."""
        return self.base_offset + self.last_offset_delta + 1

    def is_abort_marker(self) -> bool:
        """A control batch whose (first) control record ends a transaction by aborting it."""
        if not self.control or not self.records:
            return False
        key = self.records[0].key
        return (
            key is not None
            and len(key) >= 4
            and struct.unpack_from(">hh", key)[1] == _ABORT_MARKER_TYPE
        )


async def read_batches_at(
    options: dict[str, Any],
    tp: TopicPartition,
    offset: int,
    *,
    max_bytes: int = _DEFAULT_MAX_BYTES,
    client: AIOKafkaClient | None = None,
    past_unreadable: bool = False,
    whole: bool = False,
) -> tuple[list[RawRecord], int]:
    """The committed records of ``tp`` at or after ``offset`` in the first fetch
    that has any, up to and including the first batch that holds a record
    aiokafka's consumer cannot read; and the offset right after the last batch
    they come from.

    ``options`` are the keyword arguments of our aiokafka clients
    (:func:`stream_app.pipeline.kafka.client_options`). Control batches and
    aborted batches are passed over. When nothing committed is there yet (end
    of the log, or only markers), the list is empty and the offset is where
    reading may resume (``offset`` itself when nothing was passed over). A
    fetch holds up to ``max_bytes`` of batches, and at least one whole batch
    however large: one fetch reads a backlog written one record per batch
    thousands of records at a time.

    Raises :class:`RecordBatchError` for a batch that cannot be parsed and
    aiokafka's :class:`~aiokafka.errors.KafkaError` when the broker refuses
    the fetch (after retrying errors it marks as retriable). Fetches with
    ``client`` when given (bootstrapped, left open), else with its own; with
    ``past_unreadable``, returns every committed record of the fetch; with
    ``whole``, a batch that cannot be parsed as :func:`parse_record_batches`
    says.
    """
    own = client is None
    if client is None:
        client = AIOKafkaClient(**options)
    try:
        if own:
            await client.bootstrap()
        position = offset
        while True:
            try:
                message_set, aborted = await _fetch(client, tp, position, max_bytes)
                batches = parse_record_batches(message_set, tp, whole=whole)
            except CorruptBatchError as exc:
                exc.at = max(exc.base_offset, position)
                raise
            if not batches:
                return [], position
            found: list[RawRecord] = []
            after = position
            for records, next_offset in committed_batches(batches, position, aborted):
                found += records
                after = next_offset
                if not past_unreadable and not all(record.readable() for record in records):
                    break
            if found or after <= position:
                return found, after
            position = after  # only markers or aborted batches so far: read on
    finally:
        if own:
            await client.close()


async def read_past(
    options: dict[str, Any],
    tp: TopicPartition,
    offset: int,
    *,
    end: int | None = None,
    whole: bool = False,
) -> AsyncGenerator[tuple[list[RawRecord], int], None]:
    """The records of ``tp`` from ``offset``, read raw a fetch at a time
    (:func:`read_batches_at`, over one client), each fetch's with the offset
    right after it, no further than ``end`` (a last stable offset), the end of
    the log or about :data:`RAW_RECORDS` records: past every unreadable
    record on the way, and with ``whole`` past every batch that cannot be
    parsed (:func:`parse_record_batches`). What reads past the client after
    aiokafka failed on a fetch. (Close it with ``contextlib.aclosing`` when
    not read to its end.)"""
    if end is not None and offset >= end:
        return  # caught up: no connection (a pass asks every input)
    client = AIOKafkaClient(**options)
    try:
        await client.bootstrap()
        position = offset
        read = 0
        while read < RAW_RECORDS:
            if end is not None and position >= end:
                return
            raws, resume = await read_batches_at(
                options, tp, position, client=client, past_unreadable=True, whole=whole
            )
            if not raws and resume <= position:
                return
            yield raws, resume
            read += max(len(raws), 1)  # never 0: the loop ends
            position = max(position, resume)
    finally:
        await client.close()


async def corrupt_message_at(client: AIOKafkaClient, tp: TopicPartition, offset: int) -> bool:
    """Whether Kafka answers a fetch of ``tp`` at ``offset`` CORRUPT_MESSAGE:
    it cannot read its own log there (a batch length damaged on its disk),
    which aiokafka's consumer only logs, fetching there again for good. One
    fetch of the least Kafka sends (one batch), not parsed; ``client`` is
    bootstrapped and left open."""
    try:
        await _fetch(client, tp, offset, 1)
    except CorruptBatchError:
        return True
    return False


#: Fetches a search for a corrupt batch reads at most: the consumer's fetch,
#: which failed on it, is 2 MiB, as is a raw fetch.
CORRUPT_BATCH_FETCHES: Final = 8


async def corrupt_batch_at(options: dict[str, Any], tp: TopicPartition, offset: int) -> int | None:
    """The base offset of the first batch of ``tp`` at or after ``offset``
    whose checksum does not match, read raw a fetch at a time; None when
    none is found within :data:`CORRUPT_BATCH_FETCHES` fetches. aiokafka's
    consumer names only the partition of such a batch, and its position is
    where the failed fetch began: up to a fetch of good batches before it.
    A base offset below the offset the damaged fetch was read from is damage
    too (a zeroed header says 0): that offset is the answer then."""
    client = AIOKafkaClient(**options)
    try:
        await client.bootstrap()
        position = offset
        for _ in range(CORRUPT_BATCH_FETCHES):
            try:
                # whole: a batch rejected whole before it does not hide it.
                _, after = await read_batches_at(
                    options, tp, position, client=client, past_unreadable=True, whole=True
                )
            except CorruptBatchError as exc:
                return exc.at
            if after <= position:
                return None
            position = after
        return None
    finally:
        await client.close()


def committed_batches(
    batches: Sequence[RecordBatch],
    offset: int,
    aborted_transactions: Sequence[tuple[int, int]] = (),
) -> Iterator[tuple[list[RawRecord], int]]:
    """Each batch's records at or after ``offset``, and the offset after it
    (never below ``offset``): an empty list for a batch passed over.

    ``aborted_transactions`` are the ``(producer_id, first_offset)`` pairs of
    the fetch response. The rule is aiokafka's fetcher's: a producer counts as
    aborted from the first offset of its aborted transaction until its abort
    marker; its transactional batches in between are skipped; control batches
    are always skipped.
    """
    pending = sorted(aborted_transactions, key=lambda entry: entry[1])
    aborted_producers: set[int] = set()
    position = offset
    for batch in batches:
        while pending and pending[0][1] <= batch.base_offset:
            aborted_producers.add(pending.pop(0)[0])
        if batch.is_abort_marker():
            aborted_producers.discard(batch.producer_id)
        position = max(position, batch.next_offset)
        if batch.control or (batch.transactional and batch.producer_id in aborted_producers):
            yield [], position
            continue
        if len(batch.records) == 1 and batch.records[0].problem is not None:
            whole = batch.records[0]
            if batch.next_offset <= offset:
                yield [], position
                continue
            if offset > whole.offset:
                # Read from inside it: its first records were processed
                # before the client gave it away. The rest of it is rejected.
                problem = (whole.problem or "").replace(
                    _REJECTED_WHOLE,
                    f" is rejected from offset {offset} on (the records before it were "
                    "processed): ",
                    1,
                )
                whole = replace(whole, offset=offset, problem=problem)
            yield [whole], position
            continue
        yield [record for record in batch.records if record.offset >= offset], position


def parse_record_batches(
    message_set: bytes, tp: TopicPartition, *, whole: bool = False
) -> list[RecordBatch]:
    """Every complete batch of a fetched message set; a trailing partial batch
    (the broker cuts the set at its size limit) is left out.

    With ``whole``, a batch whose checksum matches but whose records cannot be
    read (a payload that does not decompress, records whose offsets disagree
    with the batch's header, lengths that do not add up) is one record at its
    base offset whose ``problem`` says why, its value the batch's bytes: a
    rejection by its position. Kafka 4.1 stores such batches when a writer
    builds them by hand (raw Produce requests); no Kafka client writes them,
    and aiokafka's consumer fails on the payloads (or, on such offsets,
    drops records unseen). A batch of another magic, or one compressed with
    a codec that is not installed, is not rejected: it raises as without
    ``whole``. A damaged batch (its CRC, its magic byte, or a length below
    any message's) raises :class:`CorruptBatchError` too, but only when it
    comes first: after other batches, the fetch ends before it, so that what
    precedes it is read and the client meets it next."""
    data = memoryview(message_set)
    batches: list[RecordBatch] = []
    pos = 0
    while len(data) - pos >= _BATCH_HEADER.size:
        (length,) = struct.unpack_from(">i", data, pos + 8)
        if length < _BATCH_HEADER.size - _LOG_OVERHEAD:
            if whole and batches:
                break  # as a batch whose CRC is wrong, below
            (base_offset,) = struct.unpack_from(">q", data, pos)
            where = f"{tp.topic}[{tp.partition}]@{base_offset}"
            problem = f"{where}: batch length {length} is shorter than a batch header"
            end = pos + _LOG_OVERHEAD + length
            if length < _LEGACY_MIN_LENGTH or (
                end <= len(data) and not _legacy_crc_matches(data[pos:end])
            ):
                # Shorter than any message of any format (aiokafka: "less than
                # the minimum record overhead"), or not a message of an old
                # format either: damage the CRC does not cover.
                raise CorruptBatchError(problem, base_offset)
            raise RecordBatchError(problem)
        end = pos + _LOG_OVERHEAD + length
        if end > len(data):
            break
        try:
            batches.append(_parse_batch(data[pos:end], tp, whole=whole))
        except CorruptBatchError:
            if not whole or not batches:
                raise
            # The batches before it are read past; the client meets it at the
            # next poll, and the worker names it and stops.
            break
        pos = end
    return batches


def _legacy_crc_matches(batch: memoryview) -> bool:
    """Whether a magic 0 or 1 message's CRC (CRC-32 of Magic onwards) matches."""
    (crc,) = struct.unpack_from(">I", batch, _LEGACY_CRC_AT)
    return batch[_MAGIC_AT] in (0, 1) and zlib.crc32(batch[_MAGIC_AT:]) == crc


def _parse_batch(batch: memoryview, tp: TopicPartition, *, whole: bool = False) -> RecordBatch:
    magic = batch[_MAGIC_AT]
    (base_offset,) = struct.unpack_from(">q", batch)
    where = f"{tp.topic}[{tp.partition}]@{base_offset}"
    if magic != 2:
        if not _legacy_crc_matches(batch):
            # A damaged magic byte (the CRC of magic 2 does not cover it), or
            # damage from the header's leader epoch on: aiokafka reads it as a
            # message of an old format whose CRC does not match.
            raise CorruptBatchError(
                f"{where}: record batch CRC mismatch (its magic byte reads {magic})", base_offset
            )
        raise RecordBatchError(f"{where}: record batch magic {magic}, only magic 2 is parsed")
    (
        _,
        _,
        _,
        _,
        crc,
        attributes,
        last_offset_delta,
        first_timestamp,
        max_timestamp,
        producer_id,
        _,
        _,
        count,
    ) = _BATCH_HEADER.unpack_from(batch)
    if calc_crc32c(bytes(batch[_CRC_FROM:])) != crc:
        raise CorruptBatchError(f"{where}: record batch CRC mismatch", base_offset)
    try:
        records = _parse_records(
            batch,
            tp,
            base_offset,
            attributes,
            last_offset_delta,
            first_timestamp,
            max_timestamp,
            count,
            where,
        )
    except CodecMissingError:
        raise
    except RecordBatchError as exc:
        if not whole:
            raise
        records = [
            RawRecord(
                topic=tp.topic,
                partition=tp.partition,
                offset=base_offset,
                timestamp_ms=int(first_timestamp),
                key=None,
                value=bytes(batch),
                last_offset=base_offset + last_offset_delta,
                problem=(
                    f"the record batch at offsets {base_offset}.."
                    f"{base_offset + last_offset_delta}{_REJECTED_WHOLE}{exc}"
                ),
            )
        ]
    return RecordBatch(
        base_offset=base_offset,
        last_offset_delta=last_offset_delta,
        producer_id=producer_id,
        transactional=bool(attributes & _TRANSACTIONAL),
        control=bool(attributes & _CONTROL),
        records=tuple(records),
    )


#: What a batch's rejection says between its offsets and why.
_REJECTED_WHOLE: Final = " is rejected whole: "


def _parse_records(
    batch: memoryview,
    tp: TopicPartition,
    base_offset: int,
    attributes: int,
    last_offset_delta: int,
    first_timestamp: int,
    max_timestamp: int,
    count: int,
    where: str,
) -> list[RawRecord]:
    """The records of a batch whose header is read and checksum checked."""
    payload = _decompress(batch[_BATCH_HEADER.size :], attributes & _CODEC_MASK, where)

    def timestamp(delta: int) -> int:
        if attributes & _TIMESTAMP_TYPE_LOG_APPEND:
            return int(max_timestamp)
        return int(first_timestamp) + delta

    # Kafka refuses such a batch on produce, and aiokafka on reading it: only
    # a damaged log holds one, and its offsets could send the consumer past
    # records it never read.
    if count < 0:
        raise RecordBatchError(f"{where}: negative record count {count}")
    records: list[RawRecord] = []
    pos = 0
    for _ in range(count):
        record, pos = _parse_record(payload, pos, tp, base_offset, timestamp, where)
        if not 0 <= record.offset - base_offset <= last_offset_delta:
            raise RecordBatchError(
                f"{where}: a record's offset delta {record.offset - base_offset} is outside "
                f"the batch's 0..{last_offset_delta}"
            )
        if records and record.offset <= records[-1].offset:
            # aiokafka's consumer drops such a record unseen.
            raise RecordBatchError(
                f"{where}: a record's offset delta {record.offset - base_offset} does not "
                f"follow the one before it, {records[-1].offset - base_offset}"
            )
        records.append(record)
    if pos != len(payload):
        raise RecordBatchError(f"{where}: {len(payload) - pos} bytes after the batch's records")
    return records


def _decompress(payload: memoryview, codec_id: int, where: str) -> bytes:
    if codec_id == 0:
        return bytes(payload)
    codecs: dict[int, tuple[str, Callable[[], bool], Callable[[bytes], bytes]]] = {
        1: ("gzip", codec.has_gzip, codec.gzip_decode),
        2: ("snappy", codec.has_snappy, codec.snappy_decode),
        3: ("lz4", codec.has_lz4, codec.lz4_decode),
        4: ("zstd", codec.has_zstd, codec.zstd_decode),
    }
    if codec_id not in codecs:
        raise RecordBatchError(f"{where}: unknown compression codec {codec_id}")
    name, available, decode = codecs[codec_id]
    if not available():
        raise CodecMissingError(f"{where}: the {name} codec is not installed")
    try:
        return bytes(decode(bytes(payload)))
    except Exception as exc:  # each codec library raises its own errors
        raise RecordBatchError(f"{where}: {name} payload does not decompress: {exc}") from exc


def _parse_record(
    buf: bytes,
    pos: int,
    tp: TopicPartition,
    base_offset: int,
    timestamp: Callable[[int], int],
    where: str,
) -> tuple[RawRecord, int]:
    # Record: Length varint, Attributes int8, TimestampDelta varlong,
    # OffsetDelta varint, Key bytes, Value bytes, Headers [name bytes, value bytes]
    length, pos = _varint(buf, pos, where)
    start = pos
    if length < 1 or start + length > len(buf):
        raise RecordBatchError(f"{where}: record length {length} is out of the batch")
    pos += 1  # attributes: unused
    timestamp_delta, pos = _varint(buf, pos, where)
    offset_delta, pos = _varint(buf, pos, where)
    key, pos = _nullable_bytes(buf, pos, where)
    value, pos = _nullable_bytes(buf, pos, where)
    header_count, pos = _varint(buf, pos, where)
    if header_count < 0:
        raise RecordBatchError(f"{where}: negative header count {header_count}")
    headers: list[Header] = []
    for _ in range(header_count):
        name, pos = _nullable_bytes(buf, pos, where)
        if name is None:
            raise RecordBatchError(f"{where}: a header without a name")
        header_value, pos = _nullable_bytes(buf, pos, where)
        headers.append((name, header_value))
    if pos - start != length:
        raise RecordBatchError(f"{where}: record length {length}, but it holds {pos - start}")
    record = RawRecord(
        topic=tp.topic,
        partition=tp.partition,
        offset=base_offset + offset_delta,
        timestamp_ms=timestamp(timestamp_delta),
        key=key,
        value=value,
        headers=tuple(headers),
    )
    return record, pos


def _varint(buf: bytes, pos: int, where: str) -> tuple[int, int]:
    """A zigzag varint (up to 64 bits) and the position after it."""
    raw = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:  # a varlong has at most 64 bits
            raise RecordBatchError(f"{where}: truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        raw |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (raw >> 1) ^ -(raw & 1), pos
        shift += 7


def _nullable_bytes(buf: bytes, pos: int, where: str) -> tuple[bytes | None, int]:
    size, pos = _varint(buf, pos, where)
    if size < 0:
        return None, pos
    if pos + size > len(buf):
        raise RecordBatchError(f"{where}: a field of {size} bytes runs past the batch")
    return buf[pos : pos + size], pos + size


async def _fetch(
    client: Any, tp: TopicPartition, offset: int, max_bytes: int
) -> tuple[bytes, list[tuple[int, int]]]:
    """One read_committed fetch of ``tp`` at ``offset`` from its leader: the
    message set and the aborted transactions of the response."""
    await client.add_topic(tp.topic)
    failure: KafkaError | None = None
    for attempt in range(_ATTEMPTS):
        if attempt:
            await asyncio.sleep(_RETRY_BACKOFF_S * attempt)
            await client.force_metadata_update()
        leader = client.cluster.leader_for_partition(tp)
        if leader is None or leader < 0:
            failure = KafkaError(f"no leader known for {tp.topic}[{tp.partition}]")
            continue
        request = FetchRequest(
            _MAX_WAIT_MS,
            1,  # min_bytes: answer as soon as anything is there
            max_bytes,
            _READ_COMMITTED,
            [(tp.topic, [(tp.partition, offset, max_bytes)])],
        )
        response = await client.send(leader, request)
        for topic, partitions in response.topics:
            for partition, error_code, _highwater, *part_data in partitions:
                if (topic, partition) != (tp.topic, tp.partition):
                    continue
                error_type = for_code(error_code)
                if error_type is NoError:
                    log.debug(
                        "%s[%d]@%d: FetchResponse v%d",
                        tp.topic,
                        tp.partition,
                        offset,
                        response.API_VERSION,
                    )
                    return bytes(part_data[-1] or b""), _aborted(response.API_VERSION, part_data)
                failure = error_type(f"fetch of {tp.topic}[{tp.partition}]@{offset}")
                if error_type is CorruptRecordException:
                    # The broker cannot read its own log there (a batch length
                    # below any message's): it answers a fetch at the batch so.
                    raise CorruptBatchError(
                        f"{tp.topic}[{tp.partition}]@{offset}: the broker cannot read the "
                        f"batch there ({failure})",
                        offset,
                    )
                if not error_type.retriable:
                    raise failure
        log.debug("%s[%d]@%d: fetch failed (%r), retrying", tp.topic, tp.partition, offset, failure)
    raise failure or KafkaError(f"{tp.topic}[{tp.partition}] missing from the fetch responses")


def _aborted(api_version: int, part_data: list[Any]) -> list[tuple[int, int]]:
    """The aborted transactions in a partition's fetch response, whose layout
    after the high watermark is (as in aiokafka's fetcher):

    * v4:      last_stable_offset, aborted_transactions, records
    * v5-v10:  last_stable_offset, log_start_offset, aborted_transactions, records
    * v11:     last_stable_offset, log_start_offset, aborted_transactions,
               preferred_read_replica, records
    """
    if api_version < 4:
        raise RecordBatchError(f"FetchResponse v{api_version} cannot read committed data")
    entries = part_data[2] if api_version >= 11 else part_data[-2]
    return [(int(producer_id), int(first)) for producer_id, first in entries or ()]
