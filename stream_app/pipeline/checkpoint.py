"""The commit protocol of one task: one Kafka transaction at a time.

A *task* is the unit of work and ownership: one partition number of one
stage (stage 1: ``commands[p]`` and ``rekeyed[p]``; stage 2:
``by-profile[p]``), its stores' partition ``p`` and its own transactional
producer. :class:`Checkpoint` is one transaction of one task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiokafka.errors import IllegalOperation, KafkaError, ProducerFenced
from aiokafka.structs import TopicPartition

from stream_app import json
from stream_app.errors import ConfigurationError, StreamAppError
from stream_app.pipeline.kafka import not_authorized
from stream_app.pipeline.processor import Outgoing, partition_for
from stream_app.pipeline.store import CONSUMED_KEY, PartitionStore, StoreOverlay

log = logging.getLogger(__name__)

#: The phases of :meth:`Checkpoint.commit`, as it times them: ``produce``
#: (the transaction begun, its batches sent and confirmed), ``offsets`` (the
#: consumed offsets sent to the transaction, or committed for at_least_once),
#: ``commit`` (the transaction committed) and ``store`` (RocksDB written).
PHASES: Final = ("produce", "offsets", "commit", "store")


class Observer(Protocol):
    def observe(self, seconds: float) -> None: ...


class CheckpointError(StreamAppError):
    """The transaction did not commit (for :class:`CommitOutcomeUnknownError`:
    may not have); nothing of it is stored.

    The task must drop its overlays and continue from what Kafka committed.
    """


class CommitOutcomeUnknownError(CheckpointError):
    """The commit failed with no answer to say whether it was made: aiokafka
    raises the same error for a refusal as for an answer a broker restart cut
    off (its sender died), so the broker may have committed the transaction
    or not. Nothing of it is stored.

    Either way the task must restart: the restore and the committed offsets,
    both read from Kafka, agree on whichever outcome the broker recorded.
    """


class TaskFencedError(CheckpointError):
    """Another worker has taken this task over (its producer was fenced).

    Nothing of the transaction is visible, unless ``committing``: fenced as
    its commit was retried, which the new owner may have completed. The task
    is no longer ours either way.
    """

    def __init__(self, cause: str, *, committing: bool = False) -> None:
        super().__init__(cause)
        self.committing = committing


class NotAuthorizedError(CheckpointError):
    """The broker refused this principal an operation of the transaction (an ACL
    is missing): nothing of it is visible, and retrying would meet the same."""

    def __init__(self, cause: ConfigurationError) -> None:
        super().__init__(str(cause))
        #: What the worker stops with.
        self.cause = cause


class StoreWriteError(StreamAppError):
    """The transaction committed but RocksDB could not be written.

    Kafka holds the truth; the task must restore its stores from the changelog.
    """


class Batch(Protocol):
    """What a checkpoint needs of an aiokafka ``BatchBuilder``."""

    def append(
        self, *, timestamp: int | None, key: bytes | None, value: bytes | None, headers: Any
    ) -> object | None: ...

    def close(self) -> None: ...

    def record_count(self) -> int: ...


class Producer(Protocol):
    """What a checkpoint needs of an aiokafka producer (transactional or not)."""

    async def begin_transaction(self) -> None: ...

    def create_batch(self) -> Batch: ...

    async def send_batch(
        self, batch: Batch, topic: str, *, partition: int
    ) -> asyncio.Future[Any]: ...

    async def flush(self) -> None: ...

    async def partitions_for(self, topic: str) -> set[int]: ...

    async def send_offsets_to_transaction(self, offsets: Offsets, group_id: str) -> None: ...

    async def commit_transaction(self) -> None: ...

    async def abort_transaction(self) -> None: ...


#: How a transactional producer says it can no longer be used. A fence its
#: background sender learns (INVALID_PRODUCER_EPOCH on AddPartitionsToTxn)
#: reaches the caller of aiokafka 0.14 not as ProducerFenced but as
#: IllegalOperation from ``send_batch`` and an invalid state transition
#: (AssertionError) from ``commit_transaction``. The fake producer of
#: tests/pipeline models this, and the zombie integration test meets it.
#: Either way the task is no longer ours to write: it is treated as fenced,
#: never restarted with a new producer (which would fence the new owner);
#: unless a send says the sender died of something else (see
#: :meth:`Checkpoint._sender_failure`).
_PRODUCER_UNUSABLE = (ProducerFenced, IllegalOperation, AssertionError)
#: How long a producer left unusable is given for its sends to say why.
_SEND_OUTCOME_WAIT_S: Final = 2.0

#: Offsets to commit, each with its metadata (:func:`offset_metadata`).
Offsets = dict[TopicPartition, tuple[int, str]]
#: Commits consumer offsets outside a transaction (at_least_once).
OffsetCommitter = Callable[[Offsets], Awaitable[None]]


def offset_metadata(partitions: int) -> str:
    """What each committed offset says besides the offset: the partition count
    the state was built for. Kafka keeps it with the group's offsets, so a
    worker started after every co-partitioned topic was given more partitions
    finds the old count there, even on an empty disk
    (:func:`recorded_partitions`)."""
    return json.dumps({"partitions": partitions}).decode()


def recorded_partitions(metadata: str) -> int | None:
    """The partition count :func:`offset_metadata` recorded; None for metadata
    it did not write (an offset committed by a worker before it, or by hand)."""
    try:
        doc = json.loads(metadata)
    except json.JSONDecodeError:
        return None
    found = doc.get("partitions") if isinstance(doc, dict) else None
    return found if type(found) is int else None


def encode_consumed(offsets: Mapping[TopicPartition, int]) -> bytes:
    """The value of :data:`CONSUMED_KEY`: the next offset of each input."""
    return json.dumps([[tp.topic, tp.partition, offset] for tp, offset in offsets.items()])


def decode_consumed(value: bytes | None) -> dict[TopicPartition, int]:
    """What :func:`encode_consumed` wrote; nothing for a value it did not write."""
    try:
        entries = json.loads(value) if value is not None else []
        return {
            TopicPartition(topic, partition): offset
            for topic, partition, offset in entries
            if type(topic) is str and type(partition) is int and type(offset) is int
        }
    except (json.JSONDecodeError, TypeError, ValueError):
        return {}


def recorded_consumption(stores: Mapping[str, PartitionStore]) -> dict[TopicPartition, int]:
    """The consumed offsets :meth:`Checkpoint.seal` recorded (at_least_once),
    read from the last of a task's restored ``stores``, where it writes them."""
    if not stores:
        return {}
    return decode_consumed(list(stores.values())[-1].get(CONSUMED_KEY))


@dataclass(frozen=True, slots=True)
class ChangelogStore:
    """A store partition seen through its overlay, and the changelog partition behind it."""

    overlay: StoreOverlay
    changelog: TopicPartition


class Checkpoint:
    """One transaction of one task. The order is the contract:

    1. The processors read and write through each store's :class:`StoreOverlay`;
       nothing touches RocksDB while a transaction is open.
    2. :meth:`send` (or :meth:`add`) appends outputs to this transaction's
       record batches, one list of batches per partition written; nothing
       reaches the producer yet. :meth:`consumed` records how far each input
       was read.
    3. :meth:`seal` ends the transaction's content: one changelog record per
       changed key of each store joins the batches, and the overlays set
       those changes aside (:meth:`StoreOverlay.freeze`), so the task can go
       on processing into its next checkpoint while this one commits.
    4. :meth:`commit` (seals first if needed): the transaction begins, every
       batch is sent and confirmed, the consumed offsets join it
       (``send_offsets_to_transaction``), and the transaction commits.
    5. **Only then** each store writes its set-aside changes together with the
       offset after its last changelog record, in one RocksDB write batch.

    What each failure leaves behind:

    * a send or the offsets fail (before 5): the transaction is aborted, so
      a read_committed reader sees none of it, the overlays are dropped and
      RocksDB is untouched: :class:`CheckpointError`; the task continues from
      its committed offsets (so does any work done on top of this checkpoint:
      it is dropped with the overlays);
    * the commit itself fails: the same, but the broker may have committed
      it before the answer was lost, as :class:`CommitOutcomeUnknownError`;
      the restarted task reads the changelog and its committed offsets from
      Kafka, which agree on the outcome the broker recorded;
    * the producer is fenced (another worker owns the task now): the same,
      as :class:`TaskFencedError`; the task is closed, not continued;
    * a crash between 4 and 5: RocksDB is behind the changelog; the restore
      at the next start reads the changelog (read_committed) from the stored
      offset to its end and catches up. Local state is never ahead of Kafka.

    Under ``at_least_once`` (``exactly_once=False``) step 4 sends, flushes and
    confirms the outputs, then each store's changelog in turn (see
    :meth:`_send_groups`), the last with the consumed offsets under
    :data:`CONSUMED_KEY`, then commits the offsets with the consumer; after a
    crash between the last changelog and the offsets, the task starts from
    the offsets its restored state records (:func:`decode_consumed`), so
    nothing its state holds is applied again; only outputs are sent again.

    Sending whole batches (aiokafka's ``create_batch``/``send_batch``) rather
    than record by record costs about a third of ``send`` per record, and
    keeps the producer idle while the task processes.
    """

    def __init__(
        self,
        producer: Producer,
        stores: Mapping[str, ChangelogStore],
        *,
        group_id: str,
        exactly_once: bool,
        commit_offsets: OffsetCommitter | None = None,
        offset_metadata: str = "",
        phases: Mapping[str, Observer] | None = None,
    ) -> None:
        if not exactly_once and commit_offsets is None:
            raise ValueError("at_least_once needs an offset committer")
        self._producer = producer
        self.stores = stores
        self._group_id = group_id
        self._exactly_once = exactly_once
        self._commit_offsets = commit_offsets
        self._offset_metadata = offset_metadata
        #: Where :meth:`commit` reports how long each of its :data:`PHASES` took.
        self._phases = phases or {}
        self._in_transaction = False
        #: This transaction's records, by (topic, partition), in batches.
        self._batches: dict[tuple[str, int], list[Batch]] = {}
        self._sends: list[asyncio.Future[Any]] = []
        #: Partition counts of the topics written, learnt once per transaction.
        self._partitions: dict[str, int] = {}
        #: Each store's changes, set aside by :meth:`seal`.
        self._sealed: dict[str, dict[bytes, bytes | None]] | None = None
        self.offsets: dict[TopicPartition, int] = {}
        #: Records consumed in this transaction.
        self.records = 0
        self.closed = False

    @property
    def empty(self) -> bool:
        return not self.offsets and not self._batches

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        """``offset`` of ``tp`` has been processed (its outputs sent)."""
        self.offsets[tp] = offset + 1
        self.records += 1

    async def send(self, out: Outgoing) -> None:
        """Add one output to the transaction (sent at :meth:`commit`)."""
        if not self.add(out):
            self._partitions[out.topic] = len(await self._producer.partitions_for(out.topic))
            self.add(out)

    def add(self, out: Outgoing) -> bool:
        """:meth:`send` without waiting: False, and nothing added, when the
        partition count of the output's topic is not known yet in this
        transaction (then :meth:`send` learns it)."""
        if self._sealed is not None:
            raise CheckpointError("checkpoint already sealed")
        count = self._partitions.get(out.topic)
        if count is None:
            return False
        # The default partitioner's choice, from the cached murmur2 of stream_app's
        # keys; a record without a key goes to partition 0.
        partition = 0 if out.key is None else partition_for(out.key, count)
        self._append(out.topic, partition, out.key, out.value, list(out.headers))
        return True

    def _append(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> None:
        batches = self._batches.get((topic, partition))
        if batches is None:
            batches = self._batches[topic, partition] = [self._producer.create_batch()]
        # A batch takes its first record whatever its size, later ones while it has room.
        if batches[-1].append(timestamp=None, key=key, value=value, headers=headers) is None:
            batches.append(self._producer.create_batch())
            batches[-1].append(timestamp=None, key=key, value=value, headers=headers)

    def seal(self) -> dict[str, dict[bytes, bytes | None]]:
        """Step 3 of the protocol above (once; :meth:`commit` calls it too).
        Returns each store's changes, set aside."""
        if self._sealed is not None:
            return self._sealed
        self._sealed = {name: store.overlay.freeze() for name, store in self.stores.items()}
        if self.offsets and not self._exactly_once and any(self._sealed.values()):
            # With the last store's changes, so written and confirmed after
            # everything else of this commit (_send_groups): a restore that
            # reads it knows that the state holds every record before these
            # offsets, whether the offset commit that follows happened or not.
            # Without it a replay re-applied them, absorbed only by each
            # session's 64 eventIds. Only with a change of state: a batch that
            # changed none changes none again (and a record on every commit
            # would lengthen the restore).
            self._sealed[list(self.stores)[-1]][CONSUMED_KEY] = encode_consumed(self.offsets)
        for name, store in self.stores.items():
            topic, partition = store.changelog
            for key, value in self._sealed[name].items():
                self._append(topic, partition, key, value, [])
        return self._sealed

    async def commit(self) -> None:
        """Steps 4 and 5 of the protocol above."""
        if self.closed:
            raise CheckpointError("checkpoint already committed or aborted")
        sealed = self.seal()
        last: dict[tuple[str, int], tuple[asyncio.Future[Any], int]] = {}
        began = time.perf_counter()
        #: The commit was asked for: from then on a failure leaves its outcome open.
        committing = False
        try:
            if not self.empty and self._exactly_once:
                await self._producer.begin_transaction()
                self._in_transaction = True
            for group in self._send_groups():
                for topic, partition in group:
                    batches = self._batches[topic, partition]
                    for batch in batches:
                        batch.close()
                        future = await self._producer.send_batch(batch, topic, partition=partition)
                        self._sends.append(future)
                    last[topic, partition] = (future, batches[-1].record_count())
                await self._producer.flush()
                for future in self._sends:
                    await future  # raises the first failed batch
            began = self._observe("produce", began)
            if self._exactly_once:
                if self._in_transaction:
                    if self.offsets:
                        await self._producer.send_offsets_to_transaction(
                            self._offsets(), self._group_id
                        )
                        began = self._observe("offsets", began)
                    committing = True
                    await self._producer.commit_transaction()
                    began = self._observe("commit", began)
                    self._in_transaction = False
            elif self.offsets:
                assert self._commit_offsets is not None  # noqa: S101 - checked in __init__
                await self._commit_offsets(self._offsets())
                began = self._observe("offsets", began)
        except _PRODUCER_UNUSABLE as exc:
            refused = await self._not_authorized(exc)
            await self._fail(abort=False)
            if refused is not None:
                raise NotAuthorizedError(refused) from exc
            failure = self._sender_failure(exc)
            if failure is not None:
                raise _failed(committing, f"producer unusable: {failure!r}") from exc
            cause = self._fence_cause(exc)
            if committing:  # a retry of a commit made can meet the new owner's fence
                cause += " (the commit was sent: it may have been made)"
            raise TaskFencedError(cause, committing=committing) from exc
        except (KafkaError, OSError) as exc:
            refused = await self._not_authorized(exc)
            await self._fail()
            if refused is not None:
                raise NotAuthorizedError(refused) from exc
            raise _failed(committing, f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            # None known (aiokafka raises the errors above), but whatever it is,
            # the transaction is aborted and its changes dropped like any failed
            # one: raised as it is, it would leave the transaction open and the
            # overlays holding what was processed on top of it.
            await self._fail()
            raise _failed(committing, f"unexpected {type(exc).__name__}: {exc}") from exc
        self.closed = True
        # Step 5: the transaction is committed; now, and only now, RocksDB.
        try:
            for name, store in self.stores.items():
                changes = sealed[name]
                if changes:
                    future, count = last[store.changelog.topic, store.changelog.partition]
                    # The batch's base offset, and the offset after its last record.
                    store.overlay.store.write(changes, future.result().offset + count)
                store.overlay.release()
        except Exception as exc:
            raise StoreWriteError(f"{type(exc).__name__}: {exc}") from exc
        self._observe("store", began)

    def _offsets(self) -> Offsets:
        """This transaction's offsets to commit, each with the metadata."""
        return {tp: (offset, self._offset_metadata) for tp, offset in self.offsets.items()}

    def _send_groups(self) -> list[list[tuple[str, int]]]:
        """The partitions written, in groups, each group's batches confirmed
        before the next group is sent. In a transaction, one group: they
        become visible together.

        Without one (at_least_once) a crash can cut a commit short anywhere,
        and the replay must not lose what was cut. So the outputs go first,
        then each store's changelog, one store after the other in the order
        of the stores. A command replayed finds its session as it was (and
        emits again) or changed (its outputs written already, since before
        its changelog); and a store listed before another, as the session-id
        counter is before the sessions, never falls behind it: an id is at
        worst skipped, never given twice."""
        if self._exactly_once:
            return [list(self._batches)]
        changelogs = [(s.changelog.topic, s.changelog.partition) for s in self.stores.values()]
        groups = [[key for key in self._batches if key not in changelogs]]
        groups += [[key] for key in changelogs if key in self._batches]
        return [group for group in groups if group]

    def _observe(self, phase: str, began: float) -> float:
        """Report ``phase`` as having taken since ``began``; returns now."""
        now = time.perf_counter()
        observer = self._phases.get(phase)
        if observer is not None:
            observer.observe(now - began)
        return now

    async def abort(self) -> None:
        """End the transaction without effect: nothing visible, nothing stored."""
        if not self.closed:
            await self._fail()

    async def _not_authorized(self, exc: BaseException) -> ConfigurationError | None:
        """Whether the broker refused this principal something, in ``exc`` or in
        a send. A topic it may not write ends aiokafka's transaction in the
        background: the next call fails with IllegalOperation or AssertionError,
        and the send's future learns why shortly after, so it is waited for."""
        refused = not_authorized(exc)
        if refused is None and isinstance(exc, IllegalOperation | AssertionError):
            pending = [future for future in self._sends if not future.done()]
            if pending:
                await asyncio.wait(pending, timeout=_SEND_OUTCOME_WAIT_S)
        for error in self._send_errors():
            refused = refused or not_authorized(error)
        return refused

    def _send_errors(self) -> list[BaseException]:
        """The errors of this transaction's sends that failed, in the order sent."""
        return [
            error
            for future in self._sends
            if future.done() and not future.cancelled()
            for error in (future.exception(),)
            if error is not None
        ]

    def _sender_failure(self, exc: BaseException) -> BaseException | None:
        """What killed the producer's sender when a send says so and it is not
        a fence: an answer aiokafka does not expect (INVALID_PRODUCER_ID_MAPPING
        after a long idle, INVALID_TXN_STATE, OutOfOrderSequenceNumber). The
        task is then ours still, and restarted with a new producer; taken for
        fenced, it was dropped, its partitions idle until the group rejoined."""
        if isinstance(exc, ProducerFenced):
            return None
        failures = self._send_errors()
        if any(isinstance(failure, ProducerFenced) for failure in failures):
            return None
        return failures[0] if failures else None

    def _fence_cause(self, exc: BaseException) -> str:
        """The sends failed with the sender's own error (ProducerFenced, usually)."""
        failures = self._send_errors()
        return f"producer unusable: {(failures[0] if failures else exc)!r}"

    async def _fail(self, *, abort: bool = True) -> None:
        self.closed = True
        for store in self.stores.values():
            store.overlay.discard()
        for future in self._sends:
            _ignore_outcome(future)
        if self._exactly_once and self._in_transaction and abort:
            self._in_transaction = False
            try:
                await self._producer.abort_transaction()
            except Exception as exc:  # the producer is replaced anyway
                # A broken producer cannot abort; the broker aborts its transaction
                # when the task's next producer starts, or when it times out.
                log.debug("abort failed: %r", exc)


def _failed(committing: bool, why: str) -> CheckpointError:
    """What a failed transaction raises: once its commit was asked for (under
    exactly_once), the broker may have committed it regardless."""
    if committing:
        return CommitOutcomeUnknownError(f"{why} (the commit was sent: it may have been made)")
    return CheckpointError(why)


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    """The transaction failed: a send's own failure is no longer news."""
    if future.done():
        if not future.cancelled():
            future.exception()
    else:
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
