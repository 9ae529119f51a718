"""An in-memory Kafka for testing the commit protocol without a broker.

:class:`FakeBroker` keeps one log per topic partition and the committed
offsets of each consumer group, and behaves as a broker does where the
checkpoint relies on it:

* every record written takes the next offset of its partition, aborted
  records included, and each transaction marker (commit or abort) takes one
  too, so offsets have gaps a read_committed reader skips;
* records and consumer offsets of a transaction become visible, resp.
  committed, only when it commits; a read_committed reader stops at the first
  record of a still-open transaction (the last stable offset);
* starting a producer with a ``transactional_id`` already in use fences the
  earlier one: its open transaction is aborted and every later call of it
  raises :class:`~aiokafka.errors.ProducerFenced`.

:class:`FakeProducer` satisfies :class:`stream_app.pipeline.checkpoint.Producer`.
It buffers: ``send_batch`` returns a pending future, and the batch's records
reach the log at ``flush`` (or ``commit_transaction``, which flushes first), or once
:data:`LINGER_S` has passed in the event loop, as aiokafka's background
sender does. Failures are injected per producer: a batch whose future
fails, a batch refused at once, a call (``commit_transaction``, ...) that
raises, and a hook run at the start of a call (e.g. to fence the producer
exactly there).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Literal

from aiokafka.errors import IllegalOperation, ProducerFenced
from aiokafka.structs import RecordMetadata, TopicPartition

from stream_app.pipeline.store import PartitionStore, RocksDBResources
from stream_app.pipeline.unreadable import RawRecord

Marker = Literal["commit", "abort"]

#: How long a sent record waits for a flush before it is sent anyway (linger_ms).
LINGER_S = 0.05


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One offset of a partition: a record, or a transaction marker."""

    offset: int
    key: bytes | None = None
    value: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()
    #: The transaction that wrote it (None: written outside any transaction).
    transaction: int | None = None
    marker: Marker | None = None


@dataclass(eq=False, slots=True)
class _Transaction:
    number: int
    group_offsets: dict[str, dict[TopicPartition, int]] = field(default_factory=dict)
    group_metadata: dict[str, dict[TopicPartition, str]] = field(default_factory=dict)
    partitions: set[TopicPartition] = field(default_factory=set)
    state: Literal["open", "committed", "aborted"] = "open"


class FakeBroker:
    """Logs, transactions and group offsets of one in-memory cluster."""

    def __init__(self, partitions: Mapping[str, int] | None = None) -> None:
        #: Partitions per topic; a topic not listed has one.
        self.partitions = dict(partitions or {})
        self._logs: dict[TopicPartition, list[LogEntry]] = defaultdict(list)
        self._transactions: list[_Transaction] = []
        self._committed: dict[str, dict[TopicPartition, int]] = defaultdict(dict)
        #: What each committed offset said besides the offset.
        self.offset_metadata: dict[str, dict[TopicPartition, str]] = defaultdict(dict)
        self._owners: dict[str, FakeProducer] = {}

    # -- clients -----------------------------------------------------------------------------
    def producer(self, transactional_id: str | None = None) -> FakeProducer:
        """A started producer; a transactional one fences the id's previous owner."""
        if transactional_id is not None:
            previous = self._owners.get(transactional_id)
            if previous is not None:
                previous.fence()
        producer = FakeProducer(self, transactional_id)
        if transactional_id is not None:
            self._owners[transactional_id] = producer
        return producer

    def commit_offsets(
        self, group_id: str, offsets: Mapping[TopicPartition, tuple[int, str]]
    ) -> None:
        """A consumer's own offset commit (outside any transaction)."""
        self._committed[group_id].update({tp: offset for tp, (offset, _) in offsets.items()})
        self.offset_metadata[group_id].update({tp: meta for tp, (_, meta) in offsets.items()})

    # -- what readers see --------------------------------------------------------------------
    def committed(self, group_id: str) -> dict[TopicPartition, int]:
        return dict(self._committed[group_id])

    def topic_partitions(self) -> list[TopicPartition]:
        """Every partition written to."""
        return sorted(tp for tp, log in self._logs.items() if log)

    def log(self, tp: TopicPartition) -> list[LogEntry]:
        """Every offset of the partition: records of any transaction, and markers."""
        return list(self._logs[tp])

    def end_offset(self, tp: TopicPartition) -> int:
        return len(self._logs[tp])

    def last_stable_offset(self, tp: TopicPartition) -> int:
        for entry in self._logs[tp]:
            if entry.transaction is not None and self._state(entry.transaction) == "open":
                return entry.offset
        return self.end_offset(tp)

    def read_committed(self, tp: TopicPartition, start: int = 0) -> list[LogEntry]:
        """The records an ``isolation_level="read_committed"`` consumer gets from ``start``."""
        stable = self.last_stable_offset(tp)
        return [
            entry
            for entry in self._logs[tp][start:stable]
            if entry.marker is None
            and (entry.transaction is None or self._state(entry.transaction) == "committed")
        ]

    def committed_records(self, topic: str) -> list[tuple[bytes | None, bytes | None]]:
        """(key, value) of every record of ``topic`` a read_committed reader sees."""
        return [
            (entry.key, entry.value)
            for tp in sorted(self._logs)
            if tp.topic == topic
            for entry in self.read_committed(tp)
        ]

    def visible_topics(self) -> set[str]:
        """Topics in which a read_committed reader sees at least one record."""
        return {tp.topic for tp in self._logs if self.read_committed(tp)}

    # -- what producers do ------------------------------------------------------------------
    def partition_for(self, topic: str, key: bytes | None) -> int:
        """The default partitioner, simplified: a hash of the key (not murmur2)."""
        return zlib.crc32(key or b"") % self.partitions.get(topic, 1)

    def append(
        self,
        tp: TopicPartition,
        key: bytes | None,
        value: bytes | None,
        headers: tuple[tuple[str, bytes], ...],
        transaction: int | None,
    ) -> int:
        log = self._logs[tp]
        log.append(LogEntry(len(log), key, value, headers, transaction))
        if transaction is not None:
            self._transactions[transaction].partitions.add(tp)
        return len(log) - 1

    def begin(self) -> int:
        self._transactions.append(_Transaction(len(self._transactions)))
        return len(self._transactions) - 1

    def add_offsets(
        self, transaction: int, group_id: str, offsets: Mapping[TopicPartition, tuple[int, str]]
    ) -> None:
        txn = self._transactions[transaction]
        txn.group_offsets.setdefault(group_id, {}).update(
            {tp: offset for tp, (offset, _) in offsets.items()}
        )
        txn.group_metadata.setdefault(group_id, {}).update(
            {tp: metadata for tp, (_, metadata) in offsets.items()}
        )

    def end(self, transaction: int, *, commit: bool) -> None:
        """Write the markers; a commit also commits the transaction's group offsets."""
        txn = self._transactions[transaction]
        if txn.state != "open":
            raise IllegalOperation(f"transaction {transaction} already {txn.state}")
        txn.state = "committed" if commit else "aborted"
        marker: Marker = "commit" if commit else "abort"
        for tp in sorted(txn.partitions):
            log = self._logs[tp]
            log.append(LogEntry(len(log), transaction=transaction, marker=marker))
        if commit:
            for group_id, offsets in txn.group_offsets.items():
                self._committed[group_id].update(offsets)
                self.offset_metadata[group_id].update(txn.group_metadata[group_id])

    def _state(self, transaction: int) -> str:
        return self._transactions[transaction].state


class FakeBatch:
    """An aiokafka ``BatchBuilder``: it takes its first record whatever its size,
    later ones while their keys and values fit in ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.records: list[tuple[bytes | None, bytes | None, tuple[tuple[str, bytes], ...]]] = []
        self.closed = False
        self._size = 0

    def append(
        self, *, timestamp: int | None, key: bytes | None, value: bytes | None, headers: Any
    ) -> object | None:
        size = len(key or b"") + len(value or b"")
        if self.closed or (self.records and self._size + size > self.max_bytes):
            return None
        self.records.append((key, value, tuple(headers)))
        self._size += size
        return len(self.records) - 1

    def close(self) -> None:
        self.closed = True

    def record_count(self) -> int:
        return len(self.records)


@dataclass(slots=True)
class _Buffered:
    tp: TopicPartition
    batch: FakeBatch
    future: asyncio.Future[RecordMetadata]
    error: BaseException | None


@dataclass(slots=True)
class _Fault:
    error: BaseException
    topic: str | None

    def matches(self, topic: str) -> bool:
        return self.topic is None or self.topic == topic


class FakeProducer:
    """An aiokafka producer (transactional or not) writing to a :class:`FakeBroker`."""

    def __init__(self, broker: FakeBroker, transactional_id: str | None) -> None:
        self.broker = broker
        self.transactional_id = transactional_id
        #: Every call in order: "begin_transaction", "send_batch", "flush", ...
        self.calls: list[str] = []
        #: Run once, at the start of the named call (before its checks).
        self.before: dict[str, Callable[[], None]] = {}
        self.fenced = False
        #: What a call of a fenced producer raises: ProducerFenced (the default),
        #: or what aiokafka 0.14 raises once its background sender has learned
        #: of the fence (IllegalOperation from send_batch and send_offsets_to_transaction,
        #: AssertionError from commit and abort; the futures fail with ProducerFenced).
        self.fence_style: Literal["ProducerFenced", "aiokafka-0.14"] = "ProducerFenced"
        self.stopped = False
        #: How many bytes of keys and values a batch takes (past its first record).
        self.batch_bytes = 16 * 1024
        self._transaction: int | None = None
        self._buffer: list[_Buffered] = []
        self._linger: asyncio.TimerHandle | None = None
        self._refusals: list[_Fault] = []
        self._send_failures: list[_Fault] = []
        self._call_failures: dict[str, BaseException] = {}
        #: The next commit is made at the broker, then raises this (its answer lost).
        self._lost_commit_answer: BaseException | None = None
        #: A send of the open transaction failed: it can only be aborted.
        self._abortable: BaseException | None = None

    # -- failure injection --------------------------------------------------------------------
    def refuse_next_send(self, error: BaseException, *, topic: str | None = None) -> None:
        """The next batch sent (to ``topic``) raises ``error`` at once; nothing is buffered."""
        self._refusals.append(_Fault(error, topic))

    def fail_next_send(self, error: BaseException, *, topic: str | None = None) -> None:
        """The next batch sent (to ``topic``) is accepted; its future fails with ``error``."""
        self._send_failures.append(_Fault(error, topic))

    def fail_next(self, call: str, error: BaseException) -> None:
        """The next ``call`` (e.g. "commit_transaction") raises ``error``."""
        self._call_failures[call] = error

    def lose_next_commit_answer(self, error: BaseException) -> None:
        """The next commit is made at the broker, but its answer is lost: the call
        raises ``error`` (what aiokafka raises when a broker restart cuts the
        EndTxn's answer and the coordinator's lookup after it), and the producer
        is left with no transaction it could abort."""
        self._lost_commit_answer = error

    def fence(self) -> None:
        """What the broker does when the transactional id's next producer starts."""
        self.fenced = True
        if self._transaction is not None:
            self.broker.end(self._transaction, commit=False)
            self._transaction = None

    # -- observation --------------------------------------------------------------------------
    @property
    def in_transaction(self) -> bool:
        return self._transaction is not None

    @property
    def buffered(self) -> int:
        """Records sent but not yet flushed to the broker."""
        return sum(sent.batch.record_count() for sent in self._buffer)

    # -- the Producer protocol ----------------------------------------------------------------
    async def begin_transaction(self) -> None:
        # Local in aiokafka (no request): a fence shows only at the next request.
        self.calls.append("begin_transaction")
        self._run_hook("begin_transaction")
        self._transactional()
        if self._transaction is not None:
            raise IllegalOperation("a transaction is already open")
        self._transaction = self.broker.begin()
        self._abortable = None

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.batch_bytes)

    async def send_batch(
        self, batch: FakeBatch, topic: str, *, partition: int
    ) -> asyncio.Future[RecordMetadata]:
        self._enter("send_batch")
        if self.transactional_id is not None and self._transaction is None:
            raise IllegalOperation("Can't send messages while not in transaction")
        refusal = _take(self._refusals, topic)
        if refusal is not None:
            raise refusal.error
        batch.close()
        failure = _take(self._send_failures, topic)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RecordMetadata] = loop.create_future()
        if self._linger is None:
            self._linger = loop.call_later(LINGER_S, self._drain)
        self._buffer.append(
            _Buffered(
                TopicPartition(topic, partition),
                batch,
                future,
                None if failure is None else failure.error,
            )
        )
        return future

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.broker.partitions.get(topic, 1)))

    async def flush(self) -> None:
        self.calls.append("flush")
        self._run_hook("flush")
        self._drain()

    async def send_offsets_to_transaction(
        self, offsets: dict[TopicPartition, tuple[int, str]], group_id: str
    ) -> None:
        self._enter("send_offsets_to_transaction")
        self._transactional()
        if self._transaction is None:
            raise IllegalOperation("Not in the middle of a transaction")
        self.broker.add_offsets(self._transaction, group_id, offsets)

    async def commit_transaction(self) -> None:
        self._enter("commit_transaction")
        self._transactional()
        if self._transaction is None:
            raise IllegalOperation("Not in the middle of a transaction")
        self._drain()
        if self._abortable is not None:
            raise self._abortable
        self.broker.end(self._transaction, commit=True)
        self._transaction = None
        lost, self._lost_commit_answer = self._lost_commit_answer, None
        if lost is not None:
            raise lost

    async def abort_transaction(self) -> None:
        self._enter("abort_transaction")
        self._transactional()
        if self._transaction is None:
            raise IllegalOperation("Not in the middle of a transaction")
        self._drain()  # in-flight records land, and are aborted with the rest
        self.broker.end(self._transaction, commit=False)
        self._transaction = None

    async def stop(self) -> None:
        """Like aiokafka: an open transaction is left to the broker (to a fence or timeout)."""
        self.calls.append("stop")
        self._drain()
        self.stopped = True

    # -- internals ----------------------------------------------------------------------------
    def _enter(self, call: str) -> None:
        self.calls.append(call)
        self._run_hook(call)
        if self.fenced:
            raise self._fenced_error(call)
        error = self._call_failures.pop(call, None)
        if error is not None:
            raise error

    def _fenced_error(self, call: str) -> BaseException:
        error: BaseException
        if self.fence_style == "ProducerFenced":
            error = ProducerFenced()
        # aiokafka 0.14: the sender task died of the fence, the transaction manager
        # is in FATAL_ERROR and the public calls check their state first.
        elif call == "send_batch":
            error = IllegalOperation("Can't send messages while not in transaction")
        elif call == "send_offsets_to_transaction":
            error = IllegalOperation("Not in the middle of a transaction")
        else:
            error = AssertionError(f"Invalid state transition FATAL_ERROR -> {call}")
        return error

    def _run_hook(self, call: str) -> None:
        hook = self.before.pop(call, None)
        if hook is not None:
            hook()

    def _transactional(self) -> None:
        if self.transactional_id is None:
            raise IllegalOperation("not a transactional producer")

    def _drain(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        buffered, self._buffer = self._buffer, []
        for sent in buffered:
            error = ProducerFenced() if self.fenced else sent.error
            if error is not None:
                if self._transaction is not None:
                    self._abortable = error
                sent.future.set_exception(error)
                continue
            offsets = [
                self.broker.append(sent.tp, key, value, headers, self._transaction)
                for key, value, headers in sent.batch.records
            ]
            # Like aiokafka, a batch's future holds the offset of its first record.
            sent.future.set_result(
                RecordMetadata(
                    topic=sent.tp.topic,
                    partition=sent.tp.partition,
                    topic_partition=sent.tp,
                    offset=offsets[0],
                    timestamp=None,
                    timestamp_type=0,
                    log_start_offset=0,
                )
            )


def _take(faults: list[_Fault], topic: str) -> _Fault | None:
    for i, fault in enumerate(faults):
        if fault.matches(topic):
            return faults.pop(i)
    return None


class FailingWriteStore(PartitionStore):
    """A partition store whose writes raise while ``fail_writes`` is set (a full disk)."""

    def __init__(self, path: Path, resources: RocksDBResources) -> None:
        super().__init__(path, resources)
        self.fail_writes = False

    def write(self, changes: Mapping[bytes, bytes | None], changelog_offset: int) -> None:
        if self.fail_writes:
            raise OSError(28, "No space left on device")
        super().write(changes, changelog_offset)


class EmptyCluster:
    """Stands for AIOKafkaAdminClient, of a cluster with no topic."""

    def __init__(self, **options: object) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def list_topics(self) -> list[str]:
        return []

    async def describe_topics(self, names: list[str]) -> list[object]:
        return []

    async def describe_configs(self, resources: list[object]) -> list[object]:
        return []

    async def describe_cluster(self) -> dict[str, object]:
        return {"brokers": [{"node_id": 1, "host": "127.0.0.1", "port": 9092}]}


class FixedRecordsConsumer:
    """Stands for an AIOKafkaConsumer assigned partitions that hold
    ``records`` (partition -> values, set by a subclass): its first getmany
    returns them all, with their offsets; later ones wait and return none."""

    records: ClassVar[dict[TopicPartition, list[bytes]]] = {}

    def __init__(self, **options: object) -> None:
        self.read = False
        self.options = options
        self.seeks: list[tuple[TopicPartition, int]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def assign(self, partitions: object) -> None:
        pass

    async def seek_to_beginning(self, *partitions: object) -> None:
        pass

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks.append((partition, offset))

    async def beginning_offsets(
        self, partitions: list[TopicPartition]
    ) -> dict[TopicPartition, int]:
        return dict.fromkeys(partitions, 0)

    async def end_offsets(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: len(self.records.get(tp, [])) for tp in partitions}

    async def position(self, tp: TopicPartition) -> int:
        return len(self.records.get(tp, [])) if self.read else 0

    async def getmany(self, timeout_ms: int) -> dict[TopicPartition, list[Any]]:
        if self.read:
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        self.read = True
        return {
            tp: [SimpleNamespace(offset=n, value=value) for n, value in enumerate(values)]
            for tp, values in self.records.items()
        }


class PartitionCounts:
    """Stands for cluster metadata (aiokafka's ``ClusterMetadata``, or a
    consumer's): ``partitions_for_topic`` from fixed counts per topic."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        count = self.counts.get(topic)
        return None if count is None else set(range(count))


class IdleKafkaClient:
    """Stands for ``AIOKafkaClient`` where the raw reads it would serve
    (``unreadable.read_batches_at``) are stood in for themselves: counts the
    clients made and closed."""

    made = 0
    closed = 0

    def __init__(self, **options: object) -> None:
        type(self).made += 1

    async def bootstrap(self) -> None:
        pass

    async def close(self) -> None:
        type(self).closed += 1


@contextlib.contextmanager
def held_by_another_process(path: Path) -> Iterator[None]:
    """The RocksDB database at ``path`` held open by another process (as a second
    worker given the same data dir would) for the ``with`` block."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import rocksdict, sys; db = rocksdict.Rdict({str(path)!r}); "
            "print('open', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "open\n"
        yield
    finally:
        holder.communicate("", timeout=30)


def store_deletes_done() -> None:
    """Wait for the stores' deletes, which run in threads of their own."""
    for thread in threading.enumerate():
        if thread.name == "store-delete":
            thread.join(timeout=10)


def single_record_batches(bad: int, end: int) -> object:
    """A log of ``end`` records written one per batch (a producer with no
    linger), the one at ``bad`` with a header name that is not UTF-8."""

    async def read_batches_at(
        options: object, tp: TopicPartition, offset: int, **client: object
    ) -> tuple[list[RawRecord], int]:
        if offset >= end:
            return [], offset
        headers = ((b"\xff\xfe", b"x"),) if offset == bad else ()
        return [RawRecord(tp.topic, tp.partition, offset, 0, b"k", b"{}", headers)], offset + 1

    return read_batches_at
