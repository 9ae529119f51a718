"""A small encoder of Kafka v2 record batches (magic 2), for tests.

It writes any bytes as header names, which no Kafka client's producer lets us
do: that is how tests craft the records aiokafka's consumer cannot decode.
It shares no code with the parser under test (stream_app.pipeline.unreadable).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka.codec import gzip_encode
from aiokafka.record.util import calc_crc32c

GZIP = 1
_TIMESTAMP_LOG_APPEND = 0x08
_TRANSACTIONAL = 0x10
_CONTROL = 0x20


@dataclass(frozen=True)
class BatchRecord:
    """One record to encode; header names are raw bytes (need not be UTF-8)."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[bytes, bytes | None], ...] = ()
    timestamp_delta: int = 0


def _varint(value: int) -> bytes:
    raw = (value << 1) ^ (value >> 63)  # zigzag
    out = bytearray()
    while raw > 0x7F:
        out.append((raw & 0x7F) | 0x80)
        raw >>= 7
    out.append(raw)
    return bytes(out)


def _nullable(data: bytes | None) -> bytes:
    return _varint(-1) if data is None else _varint(len(data)) + data


def encode_record(record: BatchRecord, offset_delta: int) -> bytes:
    body = (
        b"\x00"  # attributes
        + _varint(record.timestamp_delta)
        + _varint(offset_delta)
        + _nullable(record.key)
        + _nullable(record.value)
        + _varint(len(record.headers))
        + b"".join(_nullable(name) + _nullable(value) for name, value in record.headers)
    )
    return _varint(len(body)) + body


def encode_batch(
    records: Sequence[BatchRecord],
    *,
    base_offset: int = 0,
    first_timestamp: int = 1_700_000_000_000,
    compression: int = 0,
    transactional: bool = False,
    control: bool = False,
    log_append_time: bool = False,
    producer_id: int = -1,
    producer_epoch: int = -1,
    base_sequence: int = -1,
    last_offset_delta: int | None = None,
    partition_leader_epoch: int = -1,
    offset_deltas: Sequence[int] | None = None,
) -> bytes:
    """One batch; ``last_offset_delta`` defaults to the last record's index,
    each record's offset delta (``offset_deltas``) to its index."""
    deltas = range(len(records)) if offset_deltas is None else offset_deltas
    payload = b"".join(encode_record(r, d) for r, d in zip(records, deltas, strict=True))
    if compression == GZIP:
        payload = gzip_encode(payload)
    elif compression:
        raise ValueError(f"this encoder writes gzip only, not codec {compression}")
    attributes = (
        compression
        | (_TIMESTAMP_LOG_APPEND if log_append_time else 0)
        | (_TRANSACTIONAL if transactional else 0)
        | (_CONTROL if control else 0)
    )
    last_delta = len(records) - 1 if last_offset_delta is None else last_offset_delta
    max_timestamp = first_timestamp + max((r.timestamp_delta for r in records), default=0)
    after_crc = (
        struct.pack(
            ">hiqqqhii",
            attributes,
            last_delta,
            first_timestamp,
            max_timestamp,
            producer_id,
            producer_epoch,
            base_sequence,
            len(records),
        )
        + payload
    )
    crc = calc_crc32c(after_crc)
    # Length counts everything after itself: leader epoch (4), magic (1), CRC (4), the rest.
    length = 4 + 1 + 4 + len(after_crc)
    return struct.pack(">qiibI", base_offset, length, partition_leader_epoch, 2, crc) + after_crc


def control_batch(
    base_offset: int, producer_id: int, *, commit: bool, producer_epoch: int = 0
) -> bytes:
    """A transaction marker: key (version 0, type 1 commit / 0 abort), value
    (version 0, coordinator epoch 0)."""
    marker = BatchRecord(key=struct.pack(">hh", 0, 1 if commit else 0), value=b"\x00\x00" * 3)
    return encode_batch(
        [marker],
        base_offset=base_offset,
        transactional=True,
        control=True,
        producer_id=producer_id,
        producer_epoch=producer_epoch,
    )


def recrc(batch: bytes) -> bytes:
    """``batch`` with its length and CRC made right again (after an edit): what
    a writer who builds batches by hand sends, and Kafka checks."""
    length = len(batch) - 12
    crc = calc_crc32c(batch[21:])
    return (
        batch[:8] + struct.pack(">i", length) + batch[12:17] + struct.pack(">I", crc) + batch[21:]
    )
