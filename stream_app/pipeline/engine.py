"""The worker's engine: one consumer group member, its tasks, rebalances and stop.

Contracts
---------
* **Processing.** One read_committed consumer in group ``<app id>``
  (sticky assignor, see :mod:`stream_app.pipeline.assignor`) feeds the records
  of each partition, in order, to the task that owns it. Once any task holds
  ``batch_size`` records or ``checkpoint_interval_s`` has passed, every task's
  transaction (:class:`~stream_app.pipeline.checkpoint.Checkpoint`) is sealed
  and committed in one round, beside the processing of the next records; a
  round begins only after the previous one has ended.
* **Assignment.** New partitions are paused at once; their task fences the
  previous owner, restores its stores, then the inputs are sought to their
  committed offsets (read after the fence, so a fenced owner's last commit is
  included) and resumed. Restores run beside the processing of other tasks.
* **Revocation.** Before the listener returns, the commit round in flight
  ends, then every task of a revoked partition commits its transaction (or
  aborts it, if the commit fails) and closes. The group never waits on more
  than that.
* **Fencing.** A task whose producer was fenced is dropped: another worker
  owns it. If the group does not reassign it within two heartbeats
  (:func:`fenced_wait_s`), this worker leaves and rejoins the group.
* **Stop.** :meth:`Engine.stop` ends the loop: the current transactions
  commit, stores close, the consumer leaves the group. The CLI bounds the
  whole stop (``shutdown_timeout_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import (
    CorruptRecordException,
    IllegalStateError,
    KafkaConnectionError,
    KafkaError,
)
from aiokafka.structs import TopicPartition

from stream_app import json
from stream_app.errors import ConfigurationError, StoreError, StreamAppError
from stream_app.logs import HeldBack, held_back
from stream_app.pipeline.application_settings import (
    ApplicationSettingsRegistry,
    follow_settings_topic,
)
from stream_app.pipeline.assignor import RoutingAssignor
from stream_app.pipeline.checkpoint import (
    PHASES,
    CheckpointError,
    CommitOutcomeUnknownError,
    NotAuthorizedError,
    StoreWriteError,
    TaskFencedError,
    offset_metadata,
)
from stream_app.pipeline.cleanup import StoreCleaner, remove
from stream_app.pipeline.kafka import (
    KAFKA_RETRY_FIRST_S,
    KAFKA_RETRY_MAX_S,
    GroupOffsets,
    client_options,
    not_authorized,
    refused_join,
    refused_worker,
    start_fully,
    stop_fully,
    unless_stopped,
)
from stream_app.pipeline.processor import (
    BOOKKEEPING_BYTES,
    COMMIT_BUCKETS,
    CommandProcessor,
    LatencyHistogram,
    Limits,
    Metrics,
    PartitionSequenceAllocator,
    ProfileProcessor,
    partition_for,
    session_key,
)
from stream_app.pipeline.purge import purger
from stream_app.pipeline.store import RocksDBResources, StoreOverlay
from stream_app.pipeline.tasks import TRANSACTION_BYTES, Process, Stage, Task, TaskId
from stream_app.pipeline.topics import (
    FIRST_SESSIONS_STORE,
    SESSION_IDS_STORE,
    SESSIONS_STORE,
    STORES,
    TopicLayout,
    changelog_topic,
    profile_topic,
    rekey_topic,
)
from stream_app.pipeline.unreadable import (
    MAYBE_UNREADABLE,
    CorruptBatchError,
    OffsetsOutOfOrderError,
    RecordBatchError,
    can_read_past,
    corrupt_batch_at,
    corrupt_message_at,
    empty_control_batch,
    misread,
    offsets_out_of_order,
    read_past,
    undecompressable,
)
from stream_app.settings import Settings

log = logging.getLogger(__name__)

_METRICS_LOG_EVERY_S: Final = 30.0
#: Seconds a corrupt batch is looked for before the worker stops on it.
_CORRUPT_BATCH_SEARCH_S: Final = 5.0
#: Seconds an input may go unanswered by Kafka, while it answers others,
#: before a raw fetch asks whether Kafka cannot read its log there; and how
#: often that is looked at.
_UNANSWERED_S: Final = 15.0
_UNANSWERED_CHECK_EVERY_S: Final = 5.0
#: Kafka's default ``heartbeat.interval.ms``.
_HEARTBEAT_S: Final = 3.0
#: Added to the session timeout, twice, before another member that still
#: advertises this worker's URL is said at ERROR (see _watch_the_url): a dead
#: member's expiry, then the rebalance it begins.
_URL_SHARED_GRACE_S: Final = 15.0
#: Of the stop's bound, left for what follows the consumer's stop (HTTP, exit).
_LEAVE_MARGIN_S: Final = 1.0
#: How often the tasks' positions are moved past what the consumer skipped
#: (see :meth:`Engine._pass_skipped`), and how long to wait for a position.
_PASS_SKIPPED_EVERY_S: Final = 1.0
_POSITION_WAIT_S: Final = 0.5
#: How often the stores of partitions no longer owned are looked at (see
#: cleanup.py); the first time one ``state_cleanup_delay_s`` after the first
#: assignment, when the worker's own partitions are assigned (and their
#: stores in use).
_CLEANUP_EVERY_S: Final = 60.0
#: How often the stores not written since the last time are flushed (see
#: RocksDBResources.flush_idle): a quiet store is flushed 10-20 s after its
#: last write.
_FLUSH_IDLE_EVERY_S: Final = 10.0
_LAYOUT_FILE: Final = "layout.json"

#: How long the look at a new group's outputs may hold the start (_tell_reprocessing).
_REPROCESSING_LOOK_S: Final = 5.0
#: How often the consumer refreshes its metadata (aiokafka's default: 5
#: minutes). A group whose leader assigned while an input topic had no
#: metadata yet rebalances once a refresh shows it: until then its tasks
#: cannot start (see :meth:`Engine.on_partitions_assigned`).
_METADATA_MAX_AGE_MS: Final = 10_000
#: aiokafka's request timeout, raised for long session timeouts (see _consume).
_REQUEST_TIMEOUT_MS: Final = 40_000
_REQUEST_TIMEOUT_CAP_MS: Final = 65_000
#: How long to wait, before joining the group, for the broker to serve the
#: metadata of input topics just created.
_TOPICS_VISIBLE_WAIT_S: Final = 10.0
#: A commit round older than this is logged, and again each time as long
#: again passes: the brokers are unreachable or stalled.
_ROUND_WAIT_WARN_S: Final = 30.0
#: A task restarted again within this long of its last restart waits before it
#: starts: 0.5 s, doubling, at most _RESTART_BACKOFF_MAX_S. A failure that
#: repeats (a disk that cannot be read, a commit the broker always refuses)
#: then restarts the task, its producer's fence and its restore, every 10 s
#: rather than at once, again and again.
_RESTART_QUIET_S: Final = 60.0
#: What :meth:`Engine._restart` is given for a store a query found corrupt.
_CORRUPT_READ: Final = StoreError("a query found a store corrupt")
_RESTART_BACKOFF_MAX_S: Final = 10.0


@dataclass(slots=True)
class _Round:
    """One commit round: the tasks whose transactions it commits, and their outcome."""

    tasks: list[Task]
    commits: asyncio.Future[list[BaseException | None]]
    #: ``time.monotonic()`` when it began.
    began: float = field(default_factory=time.monotonic)
    #: The intervals of its age already logged (see :meth:`warn_if_slow`).
    warned: int = 0

    def next_warning_in(self) -> float:
        """Seconds until it is old enough for its next slow-round warning."""
        return max(0.0, (self.warned + 1) * _ROUND_WAIT_WARN_S - (time.monotonic() - self.began))

    def warn_if_slow(self) -> None:
        """aiokafka retries a transaction's requests for as long as the brokers
        cannot be reached, logging only its connection errors: say what that
        means for the worker, once per :data:`_ROUND_WAIT_WARN_S` of the round's age."""
        if self.commits.done() or self.next_warning_in() > 0:
            return
        age = time.monotonic() - self.began
        # Once, however many intervals passed unseen (the event loop held up).
        self.warned = int(age // _ROUND_WAIT_WARN_S)
        log.warning(
            "a commit round of %d transaction(s) has waited %.0f s for Kafka (brokers "
            "unreachable or overloaded? see aiokafka's errors): its outputs are not "
            "visible until it ends, and no record is processed once the next round is due",
            len(self.tasks),
            age,
        )


@dataclass(frozen=True, slots=True)
class Lookup:
    """The answer of :meth:`Engine.session_lookup`."""

    #: The session's partition is here: ``stored`` is its committed state (None: unknown).
    found: bool = False
    stored: bytes | None = None
    #: The URL of the worker that owns the session's partition.
    owner: str | None = None
    #: Why no worker can answer right now (a rebalance or restore).
    unavailable: str | None = None


def heartbeat_s(settings: Settings) -> float:
    """The group heartbeat's interval: Kafka's default, or a third of a
    shorter session timeout."""
    return min(_HEARTBEAT_S, settings.session_timeout_s / 3)


def fenced_wait_s(settings: Settings) -> float:
    """How long a worker whose task was fenced waits for the group to move the
    task before it rejoins: two heartbeats, in which a member learns of a
    rebalance. aiokafka raises the same ProducerFenced when Kafka aborted the
    task's transaction on its timeout (a commit held past 60 s: a partition
    under min.insync.replicas, a coordinator away); then nobody else owns the
    task and no rebalance comes. It waited a session timeout (45 s in the
    manifests, up to 30 min), every such task idle and the worker unready."""
    return 2 * heartbeat_s(settings)


class Engine(ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs the two stages for one worker until :meth:`stop`."""

    def __init__(
        self,
        settings: Settings,
        layout: TopicLayout,
        registry: ApplicationSettingsRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.partitions = layout.partitions
        self.max_record_bytes = layout.max_record_bytes
        self.output_partitions = layout.output_partitions
        #: Reads the group's committed offsets, where aiokafka's consumer
        #: cannot (see _start); made at the first need.
        self._offsets: GroupOffsets | None = None
        self.limits = Limits(
            max_command_bytes=settings.max_command_bytes,
            max_session_bytes=settings.max_session_bytes,
            # A stored session within a third of the record limit (topics.check_topics).
            bookkeeping_bytes=max(
                0,
                min(BOOKKEEPING_BYTES, layout.max_record_bytes // 3 - settings.max_session_bytes),
            ),
            max_stored_bytes=layout.max_record_bytes // 3,
            # A rejection holds the original in base64 (4/3) and its parsed echo.
            max_original_bytes=layout.max_record_bytes // 4,
            # Room for the record's own overhead in its batch.
            max_record_bytes=layout.max_record_bytes - 1024,
        )
        self.registry = registry or ApplicationSettingsRegistry.load(
            settings.application_settings_file
        )
        self.metrics = Metrics()
        self.stages = self._stages()
        self._stage_of = {topic: stage for stage in self.stages for topic in stage.inputs}
        self._changelogs = {store: changelog_topic(settings, store) for store in STORES}
        self.state_dir = settings.data_dir / settings.app_id
        self._resources = RocksDBResources(settings.rocksdb)
        self._tasks: dict[TaskId, Task] = {}
        self._task_of: dict[TopicPartition, Task] = {}
        self._starting: dict[TaskId, asyncio.Task[None]] = {}
        #: Each restarted task's last restart (monotonic) and how many in a row.
        self._restarts: dict[TaskId, tuple[float, int]] = {}
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        #: Per-query lines, one per task every 10 s (a store that cannot be read).
        self._told = HeldBack()
        self._fenced_since: float | None = None
        #: When each input partition was last resumed (wall-clock ms; unheard_s).
        self._resumed_ms: dict[TopicPartition, float] = {}
        #: When each input last had a raw fetch of _stop_on_unanswered_damage
        #: (time.monotonic()): one unanswered for another reason (its leader
        #: gone) is asked again only after _UNANSWERED_S.
        self._asked_raw: dict[TopicPartition, float] = {}
        #: Whether the last look found the worker cut off (_note_unheard).
        self._cut_off = False
        self._consumer: AIOKafkaConsumer | None = None
        #: Called once, when the engine begins to stop for any reason.
        self.on_stopping: Callable[[], None] | None = None
        #: False when the stop could not reach Kafka (see :meth:`_close`).
        self.stopped_cleanly = True
        #: The first fault that stopped the worker (see :meth:`_fail`); :meth:`run`
        #: raises it once the stop is done.
        self._failure: Exception | None = None
        # What /readyz and /metrics report.
        self.latency = LatencyHistogram()
        #: Seconds per commit round: every task's transaction, committed together
        #: while processing goes on.
        self.commit_latency = LatencyHistogram(COMMIT_BUCKETS)
        #: Seconds per phase of the task transactions' commits (checkpoint.PHASES).
        self.phase_latency = {phase: LatencyHistogram(COMMIT_BUCKETS) for phase in PHASES}
        self.commits = 0
        self.aborts = 0
        #: Transactions whose commit was sent but not answered: committed or not,
        #: the task restarted and read the outcome from Kafka.
        self.commits_unknown = 0
        #: The commit round in flight (see :meth:`_commit`).
        self._round: _Round | None = None
        self.restored_records = 0
        #: Changelog records left to restore, by task (while it restores).
        self.restore_remaining: dict[str, int] = {}
        self._joined = False
        self._rebalancing = False
        #: Whether it owned a task when it began to stop (see :meth:`_leave`).
        self._owned_at_stop = True
        #: Rebalances begun (revocations), for what was decided before one.
        self._rebalances = 0
        #: Tasks restarted after a failure (a commit that failed, a fence, an error).
        self.task_restarts = 0
        #: Tasks assigned without all of their inputs (see on_partitions_assigned):
        #: not started, and the worker not ready, until the next rebalance.
        self._waiting: set[TaskId] = set()
        #: The consumer's poll in flight (see :meth:`_poll`).
        self._polling: asyncio.Future[Any] | None = None
        #: When a stop must be done by (set by :meth:`stop`).
        self._stop_deadline: float | None = None
        #: Sticky assignment that also tells every worker who owns which
        #: partition; its URL is set by the worker once HTTP is up.
        self.assignor = RoutingAssignor(url="")
        #: Says at ERROR that other members advertise this worker's URL, if
        #: no assignment has ended it by then (see :meth:`_watch_the_url`).
        self._url_shared: asyncio.TimerHandle | None = None
        #: Deletes processed records from the re-key and by-profile topics.
        self.purger = purger(settings)
        self._purging: asyncio.Task[None] | None = None
        self._purged_at = time.monotonic()
        #: Deletes the stores of partitions no longer owned (see :meth:`_clean_up`).
        self.cleaner = StoreCleaner(
            self.state_dir,
            tuple(name for stage in self.stages for name in stage.stores),
            settings.state_cleanup_delay_s,
        )
        #: When the unused stores are next looked at.
        self._cleanup_at = time.monotonic() + settings.state_cleanup_delay_s
        #: The deletion in a thread of the stores last set aside.
        self._removing: threading.Thread | None = None

    # -- topology --------------------------------------------------------------------------
    def _stages(self) -> tuple[Stage, Stage]:
        s = self.settings

        def commands(partition: int, stores: Mapping[str, StoreOverlay]) -> Process:
            return CommandProcessor(
                topics=s.topics,
                rekey_topic=rekey_topic(s),
                profile_topic=profile_topic(s),
                sessions=stores[SESSIONS_STORE],
                allocator=PartitionSequenceAllocator(
                    stores[SESSION_IDS_STORE], self.partitions, partition
                ),
                settings_for=self.registry.settings_for,
                default_application_id=s.default_application_id,
                metrics=self.metrics,
                limits=self.limits,
            ).process

        def profiles(partition: int, stores: Mapping[str, StoreOverlay]) -> Process:
            return ProfileProcessor(
                topics=s.topics,
                first_sessions=stores[FIRST_SESSIONS_STORE],
                metrics=self.metrics,
                limits=self.limits,
            ).process

        return (
            Stage(
                "commands",
                (s.topics.commands, rekey_topic(s)),
                # The id counter first: at_least_once confirms its changelog
                # before the sessions' (Checkpoint._send_groups).
                (SESSION_IDS_STORE, SESSIONS_STORE),
                commands,
                commands=True,
            ),
            Stage("profiles", (profile_topic(s),), (FIRST_SESSIONS_STORE,), profiles),
        )

    @property
    def input_topics(self) -> list[str]:
        return [topic for stage in self.stages for topic in stage.inputs]

    def check_local_state(self) -> None:
        """Create the state directory; refuse local state built for another partition count."""
        layout = usable_state_dir(self.settings) / _LAYOUT_FILE
        try:
            if not layout.exists():
                # Written aside and renamed into place: a worker starting beside
                # this one in the same directory never reads it half-written.
                partial = layout.with_name(f"{layout.name}.{os.getpid()}.partial")
                partial.write_bytes(json.dumps({"partitions": self.partitions}))
                partial.replace(layout)
                return
            recorded = json.loads(layout.read_bytes()).get("partitions")
        except OSError as exc:
            raise _unusable_state_dir(self.settings, exc) from exc
        except (json.JSONDecodeError, AttributeError) as exc:
            raise ConfigurationError(
                f"{layout} is not the layout file the worker writes ({exc}): if it was "
                "damaged, remove it to use the local state as it is, or the whole "
                "directory to restore from the changelogs"
            ) from exc
        if recorded != self.partitions:
            raise ConfigurationError(
                f"local state in {self.state_dir} was built for {recorded} partitions, but "
                f"the command topic {self.settings.topics.commands} has {self.partitions}: "
                "re-partitioning is a migration to a new app id (docs/operations.md, "
                "Migrate). If the topics were deleted and made again (a development "
                f"broker started afresh), remove {self.state_dir}"
            )

    # -- what the probes and metrics see ---------------------------------------------------
    @property
    def ready(self) -> bool:
        """Joined the group, not rebalancing, no task restoring, none waiting for
        the rest of its inputs, none fenced (its partitions, paused, are read by
        nobody until the group moves them or the worker rejoins), and not
        stopping (a pod being stopped takes no more queries: its stores close
        as its tasks commit and end).

        Not whether Kafka answers (:meth:`unheard_s`): in an outage every
        worker would be unready at once, which blocks node drains under the
        PodDisruptionBudget and hides a stall from the alert that watches
        ready workers (``StreamAppStalled``). Queries check it themselves."""
        return self._routing_current and not self._starting and not self._waiting

    @property
    def _routing_current(self) -> bool:
        """Whether the group's routing map holds for this worker's queries:
        joined, not rebalancing, no task fenced, not stopping. (Tasks
        restoring or waiting for their other inputs leave it current.)"""
        return (
            self._joined
            and not self._rebalancing
            and self._fenced_since is None
            and not self._stopping.is_set()
        )

    def _not_ready(self) -> str:
        """Why :attr:`ready` is False, for a query's 503."""
        if self._stopping.is_set():
            return "this worker is stopping"
        if self._fenced_since is not None:
            return "a task of this worker was fenced: it waits for the group to move it"
        if self._waiting:
            return "a task of this worker waits for the rest of its partitions"
        if not self._joined:
            return "this worker has not joined the group yet"
        return "the group is rebalancing or restoring"

    def unheard_s(self, now_ms: float | None = None) -> float | None:
        """Seconds since Kafka last answered a fetch of any partition the worker
        reads, when that is longer than the group's session timeout; else None.

        Past that timeout the group may have given this worker's partitions to
        another, which goes on applying commands: what its stores hold may be
        stale, so it answers no query for them (:meth:`session_lookup`); its
        readiness does not depend on it (:attr:`ready`). Within the timeout the
        partitions are still its own: its stores lag, as they would under load.
        Paused partitions, not being fetched, say nothing either way; one
        resumed and never answered since is as old as its resumption."""
        age = self._fetch_age_s(now_ms)
        return age if age is not None and age > self.settings.session_timeout_s else None

    def _fetch_age_s(self, now_ms: float | None = None) -> float | None:
        """Seconds since Kafka last answered a fetch of any unpaused partition
        the worker reads; None when there is none to measure."""
        consumer = self._consumer
        if consumer is None or not self._joined:
            return None
        paused = consumer.paused()
        heard = [
            at
            for tp in consumer.assignment()
            if tp not in paused and (at := self._answered_ms(consumer, tp)) is not None
        ]
        if not heard:
            return None
        now = time.time() * 1000 if now_ms is None else now_ms
        return (now - max(heard)) / 1000

    def _answered_ms(self, consumer: AIOKafkaConsumer, tp: TopicPartition) -> float | None:
        """When Kafka last answered a fetch of ``tp`` without an error (unix
        ms), or, if later, when its task resumed it; None when neither is known.

        aiokafka keeps the time across a pause: a partition resumed after a
        long restore is as old as its resumption, not its pause. It forgets it
        at a new assignment: a partition resumed after that and never answered
        (Kafka gone meanwhile) is as old as its resumption too, not unmeasured,
        which answered queries for ever."""
        at = consumer.last_poll_timestamp(tp)
        resumed = self._resumed_ms.get(tp)
        if at is None and resumed is None:
            return None
        return max(at or 0.0, resumed or 0.0)

    def status(self) -> dict[str, Any]:
        unheard = self.unheard_s()
        return {
            "ready": self.ready,
            "joined": self._joined,
            "rebalancing": self._rebalancing,
            "stopping": self._stopping.is_set(),
            "fenced": self._fenced_since is not None,
            "unheard_s": None if unheard is None else round(unheard, 1),
            "starting": sorted(str(task_id) for task_id in self._starting),
            "waiting": sorted(str(task_id) for task_id in self._waiting),
            "active": sorted(str(t.id) for t in self._tasks.values() if t.active),
        }

    @property
    def rebalances(self) -> int:
        """Rebalances this worker took part in (each began with a revocation,
        empty or not)."""
        return self._rebalances

    def lag(self) -> dict[tuple[str, int], int]:
        """Records between each active input's position and its last stable offset."""
        consumer = self._consumer
        out: dict[tuple[str, int], int] = {}
        if consumer is None:
            return out
        for task in list(self._tasks.values()):
            if not task.active:
                continue
            for tp in task.inputs:
                stable = consumer.last_stable_offset(tp)
                if stable is not None:
                    out[tp.topic, tp.partition] = max(0, stable - task.positions.get(tp, 0))
        return out

    def store_sizes(self) -> dict[tuple[str, int], tuple[int, int]]:
        """(estimated keys, bytes) per open store partition."""
        return {
            (name, task.partition): store.sizes()
            for task in list(self._tasks.values())
            if task.active
            for name, store in task.stores.items()
        }

    def session_lookup(self, application_id: int, integration_id: str) -> Lookup:
        """Where the committed state of a session is: here (with its stored bytes,
        None when unknown), at another worker's URL, or nowhere right now."""
        partition = partition_for(integration_id.encode(), self.partitions)
        owner = self.assignor.owner(self.settings.topics.commands, partition)
        elsewhere = owner is not None and owner != self.assignor.url
        unheard = self.unheard_s()
        if unheard is not None:
            if elsewhere:
                # Safe to forward: the owner answers only a session its own,
                # current assignment gives it, and forwards nothing further.
                return Lookup(owner=owner)
            return Lookup(
                unavailable=f"Kafka has answered none of this worker's fetches for "
                f"{unheard:.0f} s, longer than the group's session timeout: its partitions "
                "may have moved"
            )
        if not self._routing_current:
            # A task of this worker restoring or waiting does not stop the
            # rest: other workers' sessions are forwarded, active tasks answer.
            return Lookup(unavailable=self._not_ready())
        task_id = TaskId("commands", partition)
        task = self._tasks.get(task_id)
        active = task is not None and task.active
        # Active here, the partition is this worker's in the current
        # generation, whatever the map says: a static member restarted with
        # another advertised address gets its assignment back, and the map
        # with its old address, without a rebalance.
        if owner is None and self.assignor.routes and not active:
            return Lookup(unavailable="the group is rebalancing or restoring")
        if elsewhere and not active:
            return Lookup(owner=owner)
        if task is None or not task.active:
            if owner is None:  # no map at all: a leader of another release, say
                return Lookup(
                    unavailable="this worker does not own the session's partition, and the "
                    "group's assignment names no owner (a worker of another release?)"
                )
            if task_id in self._starting:
                return Lookup(unavailable="the session's partition is restoring on this worker")
            if task_id in self._waiting:
                return Lookup(
                    unavailable="the session's partition waits for the rest of its task's "
                    "partitions on this worker"
                )
            return Lookup(unavailable="the session's partition is moving")
        # RocksDB holds what committed; the open transaction's overlay is not read.
        try:
            stored = task.stores[SESSIONS_STORE].get(session_key(application_id, integration_id))
        except StoreError as exc:
            # Corrupt: the loop restarts the task, which restores the store
            # (_restart_corrupted). The path is for the log, not for clients.
            if (held := self._told.due(task.id)) is not None:
                log.warning(
                    "%s: a query could not read its store: %s%s",
                    task.id,
                    exc,
                    held_back(held, "queries could not read it"),
                )
            return Lookup(unavailable="the session's store cannot be read (see the worker's log)")
        return Lookup(found=True, stored=stored)

    # -- running ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the current batch, commit and stop, all within
        ``shutdown_timeout_s`` from now (see :meth:`_leave`). The first call
        calls :attr:`on_stopping` (the worker arms its watchdog there)."""
        if not self._stopping.is_set():
            self._stop_deadline = time.monotonic() + self.settings.shutdown_timeout_s
            if self.on_stopping is not None:
                self.on_stopping()
        self._stopping.set()
        if self._polling is not None:
            self._polling.cancel()

    async def run(self) -> None:
        """Consume until :meth:`stop`; the caller has run :meth:`check_local_state`."""
        ready = asyncio.Event()
        follower = asyncio.create_task(follow_settings_topic(self.settings, self.registry, ready))
        follower.add_done_callback(self._follower_ended)
        try:
            await _first(ready.wait(), self._stopping.wait(), follower)
            if follower.done() and not follower.cancelled():
                exc = follower.exception()
                if exc is not None:
                    # What stopped it; a refusal (an ACL) as a configuration
                    # error, as _follower_ended makes it: the client's own
                    # error was a traceback and exit 1 instead of exit 2.
                    raise not_authorized(exc) or exc
            if self._stopping.is_set():
                return
            await self._consume()
            if self._failure is not None:
                # What stopped the worker, once every other task committed.
                raise self._failure
        finally:
            if not follower.done():
                follower.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follower

    def _follower_ended(self, follower: asyncio.Task[None]) -> None:
        """The application settings can no longer be followed: stop, as Kafka
        Streams stops when its global thread dies, rather than go on applying
        limits that may be stale (the restarted worker reads the topic again)."""
        if follower.cancelled():
            return
        exc = follower.exception()
        if isinstance(exc, Exception):
            log.error("stopping: the application settings topic cannot be followed: %r", exc)
            self._fail(not_authorized(exc) or exc)

    async def _consume(self) -> None:
        s = self.settings
        consumer = AIOKafkaConsumer(
            **client_options(s),
            group_id=s.app_id,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            partition_assignment_strategy=(self.assignor,),
            group_instance_id=s.group_instance_id,
            session_timeout_ms=int(s.session_timeout_s * 1000),
            # The broker holds a JoinGroup for up to the rebalance timeout
            # (aiokafka's: the session timeout) while other members rejoin; a
            # shorter request timeout dropped it and marked the coordinator
            # dead. As the Java client gives its JoinGroup: 5 s more. aiokafka
            # has one timeout for every request, so capped: a broker gone
            # silent holds a fetch or a heartbeat that long.
            request_timeout_ms=min(
                max(_REQUEST_TIMEOUT_MS, int(s.session_timeout_s * 1000) + 5000),
                _REQUEST_TIMEOUT_CAP_MS,
            ),
            # So the broker holds a JoinGroup no longer than that: a long
            # session timeout (a static member given minutes to come back)
            # made it outlast the capped request timeout. A member rejoins at
            # once; only its revoked tasks' commits come first.
            rebalance_timeout_ms=min(
                int(s.session_timeout_s * 1000), _REQUEST_TIMEOUT_CAP_MS - 5000
            ),
            # A member learns of a rebalance from its next heartbeat, so a worker
            # that joins or leaves moves partitions only then: Kafka's default
            # 3 s, not a third of the session timeout (10 s).
            heartbeat_interval_ms=int(heartbeat_s(s) * 1000),
            max_partition_fetch_bytes=2 * 1024 * 1024,
            metadata_max_age_ms=_METADATA_MAX_AGE_MS,
        )
        self._consumer = consumer
        try:
            started = await self._start_consumer(consumer)
            if started:
                # Before this worker processes: the outputs it finds are not its own.
                await unless_stopped(self._tell_reprocessing(consumer), self._stopping)
                consumer.subscribe(self.input_topics, listener=self)
        except BaseException:  # failed or cancelled: leave no connection open
            await consumer.stop()
            raise
        if not started:  # told to stop first: it owns nothing
            await consumer.stop()
            return
        last_metrics = passed_at = counted_at = unanswered_at = time.monotonic()
        consumed_any = False
        # Beside the loop: in an outage the loop waits on the commit round.
        watching = asyncio.create_task(self._watch_unheard())
        # Beside it too: a rebalance or an outage holds the loop up.
        flushing = asyncio.create_task(self._flush_quiet_stores())
        try:
            while not self._stopping.is_set():
                # Before the poll: a rebalance may begin while it fails, and
                # take the lock before the pass below.
                rebalances = self._rebalances
                try:
                    batches = await self._poll(consumer, self._poll_ms(time.monotonic()))
                except MAYBE_UNREADABLE as exc:
                    if not can_read_past(exc):
                        damage = await self._read_up_to_damage(consumer, exc, rebalances)
                        if damage is None:
                            continue  # poll again: the client meets the batch first now
                        await self._name_the_corrupt_batch(consumer, exc, damage)
                        raise
                    await self._read_past_and_commit(consumer, exc, rebalances)
                    continue
                except KafkaError as exc:
                    if empty_control_batch(exc):
                        await self._read_past_and_commit(consumer, exc, rebalances)
                        continue
                    refused = not_authorized(exc) or refused_join(exc, s)
                    if refused is None:
                        raise
                    self._fail(refused)
                    break
                except Exception as exc:
                    if undecompressable(exc):
                        await self._read_past_and_commit(consumer, exc, rebalances)
                        continue
                    if not misread(exc):
                        raise
                    damage = await self._read_up_to_damage(consumer, exc, rebalances)
                    if damage is None:
                        held = self._told.due("misread")
                        if held is not None:
                            log.warning(
                                "the Kafka client failed reading a fetch (%r): every input "
                                "was read raw past it%s",
                                exc,
                                held_back(held, "such failures"),
                            )
                        continue
                    if damage.tp is not None:
                        await self._name_the_corrupt_batch(consumer, exc, damage)
                    raise
                if batches is None:
                    break  # told to stop
                if batches and not consumed_any:
                    consumed_any = True
                    log.info("first records consumed (unix time %.6f)", time.time())
                async with self._lock:
                    lying = await _out_of_order(consumer, batches)
                    if lying is not None:
                        # Read raw from the last record processed: the honest
                        # records of the poll are processed, the lying batch
                        # rejected whole; every input sought past them.
                        await self._read_past_the_client(consumer, lying, rebalances)
                        await self._commit(due_only=True)
                        continue
                    await self._process(batches)
                    await self._commit(due_only=True)
                    await self._restart_corrupted()
                    if time.monotonic() - passed_at >= _PASS_SKIPPED_EVERY_S:
                        passed_at = time.monotonic()
                        await self._pass_skipped(consumer)
                now = time.monotonic()
                if self._rejoin_due(now):
                    await self._rejoin()
                if now - unanswered_at >= _UNANSWERED_CHECK_EVERY_S:
                    await self._stop_on_unanswered_damage(consumer)
                    unanswered_at = time.monotonic()
                if self._round is not None:
                    self._round.warn_if_slow()  # one not waited for, with no record to process
                if now - last_metrics >= _METRICS_LOG_EVERY_S:
                    last_metrics = now
                    self.log_metrics()
                if now - self._purged_at >= s.purge_interval_s:
                    self._purge(now)
                if now >= self._cleanup_at:
                    self._cleanup_at = now + min(_CLEANUP_EVERY_S, max(s.state_cleanup_delay_s, 1))
                    self._clean_up()
                if now - counted_at >= _METADATA_MAX_AGE_MS / 1000:
                    counted_at = now
                    self._check_partition_counts(consumer)
        finally:
            watching.cancel()
            flushing.cancel()
            # Stopping, whatever ended the loop: a failure raised from a poll
            # left the final commits and the leave unbounded, and the worker
            # ready, with no watchdog (armed only on a signal) to end a hang.
            self.stop()
            await self._close(consumer)

    async def _tell_reprocessing(self, consumer: AIOKafkaConsumer) -> None:
        """Warn when the group has committed no offset on the command topic
        while the downstream topics hold records already: a new or mistyped
        app id reads the command topic from its start and publishes every
        output again (a group whose offsets expired, some). Kafka Streams says
        nothing of it; its operators find out downstream.

        Looked at before the worker joins the group, so that the outputs it
        finds are not its own; the offsets are asked again after the outputs,
        as another worker of a new group may have begun meanwhile (under
        exactly_once an output commits with its offsets). Any failure, or a
        look longer than ``_REPROCESSING_LOOK_S``, says nothing."""
        try:
            async with asyncio.timeout(_REPROCESSING_LOOK_S):
                if await self._commands_committed():
                    return  # the usual start: not looked further
                outputs = [
                    TopicPartition(topic, partition)
                    for topic, count in sorted(self.output_partitions.items())
                    for partition in range(count)
                ]
                # Ever written, not only holding records now: outputs deleted
                # by their retention were still read downstream.
                ends = await self._ends_of(outputs) if outputs else {}
                written = sorted({tp.topic for tp, end in ends.items() if end > 0})
                if not written or await self._commands_committed():
                    return
        except Exception as exc:  # a warning's look: nothing to stop for
            log.debug("could not tell whether the outputs are another group's: %r", exc)
            return
        # Under at_least_once a restored store records where its task had read to.
        restored = self.settings.processing_guarantee == "at_least_once"
        log.warning(
            "group %s has committed no offset on the command topic %s: it reads it from "
            "its start%s, while %s already hold outputs. If another app id wrote them (a "
            "changed or mistyped STREAM_APP_APP_ID), every output is published again (on "
            "purpose, a new app id writes its own output topics: docs/operations.md, "
            "Migrate); if this group's offsets expired, some may be (README, Starting a "
            "task)",
            self.settings.app_id,
            self.settings.topics.commands,
            " (or from where its restored stores say)" if restored else "",
            ", ".join(written),
        )

    async def _ends_of(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Where ``partitions`` end, asked by a consumer of its own: the group's
        consumer keeps metadata of the topics it subscribes to only, and its
        ``end_offsets`` of others waited for metadata until it timed out."""
        reader = AIOKafkaConsumer(**client_options(self.settings), enable_auto_commit=False)
        try:
            await start_fully(reader)
            ends: dict[TopicPartition, int] = await reader.end_offsets(partitions)
        finally:
            await stop_fully(reader)
        return ends

    async def _commands_committed(self) -> bool:
        """Whether the group has committed an offset on any command partition
        (one request; a coordinator loading or moved raises, see
        :meth:`_start`)."""
        committed = await self._group_offsets().read(self.settings.app_id)
        return any(tp.topic == self.settings.topics.commands for tp in committed)

    def _group_offsets(self) -> GroupOffsets:
        if self._offsets is None:
            self._offsets = GroupOffsets(client_options(self.settings))
        return self._offsets

    async def _read_up_to_damage(
        self, consumer: AIOKafkaConsumer, exc: Exception, rebalances: int
    ) -> _Damage | None:
        """Read raw what precedes a batch no client can read (damaged on a
        broker's disk): None when the poll is to be tried again, else the
        batch the worker names as it stops.

        aiokafka fails the whole fetch that holds such a batch: the records
        before it in the fetch, up to 2 MiB of them, were never processed, and
        the worker stopped at every start with the group's offset before them.
        An operator's reset past the batch then passed them unrejected. A raw
        pass (:meth:`_read_past_and_commit`) reads every input from its last
        record processed; the fetch it parses ends before a damaged batch, and
        the next one meets it. The worker stops once the pass meets it on the
        partition aiokafka's error names (``Invalid CRC - <partition>``), or no
        longer moves that partition: other inputs moving do not count, or a
        partition with traffic would keep the worker in raw passes.

        An error that names no partition (a damaged length: ``less than the
        minimum record overhead``; a damaged magic byte, a ``SystemError`` of
        aiokafka's reader) is the damage the pass meets on any input. A pass
        that meets none but moves polls again, as for a record read past:
        aiokafka fails on some batches whose CRC matches (a hand-built
        record's attributes byte) that the raw read reads."""
        named = _partition_named(consumer, exc)
        task = None if named is None else self._task_of.get(named)
        if named is not None and (task is None or not self._running(task)):
            return _Damage(named, None)
        before = 0 if named is None or task is None else task.positions.get(named, 0)
        met: dict[TopicPartition, int] = {}
        try:
            await self._read_past_and_commit(consumer, exc, rebalances, met)
            moved = True
        except Exception as again:
            if again is not exc:
                raise
            moved = False  # the pass moved nothing at all
        if named is None or task is None:
            if met:
                tp, offset = next(iter(met.items()))
                return _Damage(tp, offset)
            return None if moved else _Damage(None, None)
        if named in met:
            return _Damage(named, met[named])
        if moved and (
            rebalances != self._rebalances  # the partition moved, or its task
            or not self._running(task)  # restarts and reads it again
            or task.positions.get(named, 0) > before
        ):
            return None
        return _Damage(named, None)

    async def _stop_on_unanswered_damage(self, consumer: AIOKafkaConsumer) -> None:
        """Stop the worker, naming the batch, when Kafka cannot read its own
        log where the consumer fetches one of its inputs.

        A batch whose length is damaged on a broker's disk: a fetch from below
        it fails in the client (:meth:`_read_up_to_damage`), but Kafka answers
        a fetch at it CORRUPT_MESSAGE, and aiokafka's consumer then logs a
        warning and fetches there again, for good. The worker that stopped on
        the batch left the group's offset there: every start after it stalled
        silently, Ready. Such an input is one Kafka has not answered for
        :data:`_UNANSWERED_S` while it answers others (or one whose records
        the consumer holds, a backlog's, which it does not fetch meanwhile);
        a fetch of one batch at its position, not parsed, says whether Kafka
        cannot read its log there (:func:`corrupt_message_at`)."""
        now_ms = time.time() * 1000
        paused = consumer.paused()
        ages: dict[TopicPartition, float] = {}
        for tp in consumer.assignment():
            owner = self._task_of.get(tp)
            if tp not in paused and owner is not None and self._running(owner):
                ages[tp] = now_ms - (self._answered_ms(consumer, tp) or 0.0)
        limit = _UNANSWERED_S * 1000
        if not ages or min(ages.values()) >= limit:
            return  # nothing read, or Kafka answers none of them: not this
        now = time.monotonic()
        stale = [
            tp
            for tp, age in ages.items()
            if age >= limit and now - self._asked_raw.get(tp, -_UNANSWERED_S) >= _UNANSWERED_S
        ]
        if not stale:
            return
        try:  # the client the task starts read offsets with: made already
            client = await asyncio.wait_for(self._group_offsets().client(), _CORRUPT_BATCH_SEARCH_S)
        except Exception as exc:  # Kafka out of reach: the client says so
            log.debug("no client to ask the unanswered inputs with: %r", exc)
            return

        async def ask(tp: TopicPartition, offset: int) -> bool:
            """Whether Kafka cannot read its log at the input's position."""
            self._asked_raw[tp] = time.monotonic()
            try:
                return await corrupt_message_at(client, tp, offset)
            except Exception as exc:  # not the damage: the client says the rest
                log.debug("%s[%d]: a raw fetch failed: %r", tp.topic, tp.partition, exc)
            return False

        # At once, and bounded together: a leader that hangs holds the loop
        # (commits, polls) once, not once per input it leads; a stop, not at all.
        positions = {tp: self._task_of[tp].positions.get(tp, 0) for tp in stale}
        asked = [asyncio.ensure_future(ask(tp, positions[tp])) for tp in stale]
        every = asyncio.ensure_future(asyncio.wait(asked))
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait(
            [every, stopping],
            timeout=_CORRUPT_BATCH_SEARCH_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
        pending = [answer for answer in asked if not answer.done()]
        for waiting in (*pending, every, stopping):
            waiting.cancel()
        await asyncio.gather(*pending, every, stopping, return_exceptions=True)
        for tp, answer in zip(stale, asked, strict=True):
            if answer not in pending and answer.result():
                failure = CorruptRecordException(f"{_CANNOT_READ_ITS_LOG} ({tp!r})")
                await self._name_the_corrupt_batch(consumer, failure, _Damage(tp, positions[tp]))
                raise failure

    async def _name_the_corrupt_batch(
        self, consumer: AIOKafkaConsumer, exc: Exception, damage: _Damage
    ) -> None:
        """Say where the batch is that no client can read (:meth:`_read_up_to_damage`):
        aiokafka names its partition at most, and leaves the position where its
        failed fetch began, not the offset an operator needs to decide what to do."""
        tp = damage.tp
        if tp is None:
            log.error(
                "a record batch is corrupt (%s), on a partition the worker could not find: "
                "no Kafka client can read it, and the worker stops (docs/operations.md, "
                "A worker is down)",
                exc,
            )
            return
        position: int | str = "unknown"
        found = damage.offset
        try:
            position = await asyncio.wait_for(consumer.position(tp), 1.0)
            # aiokafka's position is where the failed fetch began, up to a
            # fetch (2 MiB) of good batches before the corrupt one. Not
            # while stopping: the stop has its own bound.
            if found is None and not self._stopping.is_set():
                found = await asyncio.wait_for(
                    corrupt_batch_at(client_options(self.settings), tp, int(position)),
                    _CORRUPT_BATCH_SEARCH_S,
                )
        except Exception:  # noqa: S110 - the error below is what matters
            pass
        if found is not None:
            where: int | str = found
        elif isinstance(position, int):
            where = f"{position} or after it"
        else:
            where = position
        log.error(
            "%s[%d]: the record batch at offset %s is corrupt (%s): no Kafka client can "
            "read it, and the worker stops (docs/operations.md, A worker is down)",
            tp.topic,
            tp.partition,
            where,
            exc,
        )

    async def _flush_quiet_stores(self) -> None:
        # A flush is not worth the worker: the next write says more.
        await _every(
            _FLUSH_IDLE_EVERY_S,
            self._resources.flush_idle,
            "flushing the stores not written lately failed",
        )

    async def _watch_unheard(self) -> None:
        # A log line is not worth the watch.
        await _every(1.0, self._note_unheard, "looking at the consumer's fetches failed")

    def _note_unheard(self) -> None:
        """Log once when Kafka has answered none of the worker's fetches for
        longer than the session timeout, and once when it answers again (not
        when there is just nothing to measure: every partition paused, or a
        rejoin)."""
        age = self._fetch_age_s()
        if age is None:
            return
        cut_off = age > self.settings.session_timeout_s
        if cut_off == self._cut_off:
            return
        self._cut_off = cut_off
        if cut_off:
            log.warning(
                "Kafka has answered none of this worker's fetches for %.0f s, longer than "
                "the group's session timeout: its partitions may have moved, so it answers "
                "503 for the sessions it owns (and forwards the others) until Kafka answers "
                "again",
                age,
            )
        else:
            log.info("Kafka answers this worker's fetches again")

    def _check_partition_counts(self, consumer: AIOKafkaConsumer) -> None:
        """Stop the worker when an input topic's partition count is no longer
        the one its state is laid out for.

        The rebalance that partitions added to a topic cause says so too
        (:meth:`on_partitions_assigned`), but only a group leader that assigned
        watches the metadata for it, and a static member that rejoins after a
        restart is told it follows, whichever member was the leader: after a
        rolling restart, no member may be watching. So each checks its consumer's
        metadata (refreshed every ``_METADATA_MAX_AGE_MS``)."""
        changed = []
        for topic in self.input_topics:
            partitions = consumer.partitions_for_topic(topic)
            if partitions and len(partitions) != self.partitions:
                changed.append(f"{topic} has {len(partitions)}")
        if changed:
            self._fail(
                ConfigurationError(
                    f"the input topics' partitions changed while the worker ran "
                    f"({', '.join(changed)}); its state and internal topics have "
                    f"{self.partitions}: a re-partitioned deployment needs a new app id "
                    "(docs/operations.md, Migrate)"
                )
            )

    async def _pass_skipped(self, consumer: AIOKafkaConsumer) -> None:
        """Move each active input's position past the offsets the consumer
        skipped after its last record: transaction markers and aborted records.

        Without this a partition written in transactions (the re-key and
        by-profile topics always, the command topic when checkout systems use
        transactions) shows a lag of 1 at rest, its last commit marker, and
        the lag would never say "caught up". Called between polls, with every
        record delivered to an active task processed, so the consumer's
        position is past nothing but such offsets. (Or past a batch handed to
        aiokafka cut short, if a broker ever does: it then raises at a later
        poll, and the read past the client begins at the task's last record
        processed, not here; nothing is committed from these positions, only
        from the records processed.)
        Positions being reset are not waited for: all are asked at once, for
        at most ``_POSITION_WAIT_S``."""
        inputs = [(task, tp) for task in self._tasks.values() if task.active for tp in task.inputs]
        if not inputs or self._stopping.is_set():
            return
        asks = [asyncio.ensure_future(consumer.position(tp)) for _, tp in inputs]
        try:
            done, waiting = await asyncio.wait(asks, timeout=_POSITION_WAIT_S)
        finally:
            for ask in asks:
                ask.cancel()  # those still waiting; the others are done
        if waiting:
            # Unwound before the pass ends, not at some later turn of the
            # event loop, in the middle of the next poll or a rebalance.
            await asyncio.wait(waiting, timeout=_POSITION_WAIT_S)
        for (task, tp), ask in zip(inputs, asks, strict=True):
            if ask not in done:
                continue
            exc = ask.exception()
            if isinstance(exc, IllegalStateError):
                continue  # no longer assigned: the revocation will drop the task
            if exc is not None:
                # position() raises what the group coordinator met, as a poll would.
                refused = not_authorized(exc)
                if refused is None:
                    raise exc
                self._fail(refused)
                return
            position = ask.result()
            if position > task.positions.get(tp, 0):
                task.positions[tp] = position

    def _clean_up(self) -> None:
        """Delete the local stores of partitions this worker has not owned for
        ``state_cleanup_delay_s`` (see cleanup.py). Not those of its tasks, also
        while they start; a store still open (a dropped task closing) is never
        deleted, and a closed one was used at its close. Not before the first
        assignment: a worker restarted in a Kafka incident (its stores closed
        then) that could not join within the delay deleted every store it was
        about to be given back."""
        if not self._joined or self._rebalancing:  # its partitions maybe back soon
            return
        if self._removing is not None and self._removing.is_alive():
            return
        in_use = {
            (name, task.partition) for task in self._tasks.values() for name in task.stage.stores
        }
        try:
            aside = self.cleaner.set_aside(in_use, time.time())
        except OSError as exc:  # the data dir unreadable: the stores will say so
            log.warning("looking for unused local stores in %s failed: %s", self.state_dir, exc)
            return
        if aside:
            # Deleting a large store takes a while: not on the event loop, nor
            # in the default executor, which asyncio.run waits for at the end
            # of a stop. A daemon thread stopped by the exit leaves the rest
            # aside, for the next cleanup.
            self._removing = threading.Thread(
                target=remove, args=(aside,), name="stream-app-cleanup", daemon=True
            )
            self._removing.start()

    def _purge(self, now: float) -> None:
        """Begin purging what the tasks have committed from the re-key and
        by-profile topics (see ``purge.py``), unless a purge is still going."""
        if self._purging is not None and not self._purging.done():
            return
        self._purged_at = now
        internal = {rekey_topic(self.settings), profile_topic(self.settings)}
        committed = {
            tp: offset
            for task in self._tasks.values()
            for tp, offset in task.committed.items()
            if tp.topic in internal
        }
        self._purging = asyncio.create_task(self.purger.purge(committed))

    async def _stop_purging(self) -> None:
        purging, self._purging = self._purging, None
        if purging is not None:
            purging.cancel()
            await asyncio.gather(purging, return_exceptions=True)
        await self.purger.close()

    def _poll_ms(self, now: float) -> int:
        """How long a poll may wait for records: the checkpoint interval, or
        until the first open transaction falls due. A poll of a whole interval
        begun just before one fell due committed it almost two intervals after
        it opened, and held a quiet stream's outputs back as long. (The broker
        sees a transaction only at its commit, which sends its records: no
        interval comes near its transaction timeout.)"""
        wait = self.settings.checkpoint_interval_s
        for task in self._tasks.values():
            due = task.commit_due_in(now) if task.active else None
            if due is not None and due < wait:
                wait = due
        return max(1, int(wait * 1000))

    async def _poll(
        self, consumer: AIOKafkaConsumer, timeout_ms: int
    ) -> dict[TopicPartition, list[Any]] | None:
        """One ``getmany``, or None once :meth:`stop` gave it up. During a
        rebalance aiokafka's ``getmany`` waits for the new assignment, past its
        timeout, for as long as the rebalance lasts: up to the session timeout
        when a member was killed. No record is taken before that wait ends, so
        cancelling it loses none."""
        poll = asyncio.ensure_future(
            consumer.getmany(timeout_ms=timeout_ms, max_records=self.settings.batch_size)
        )
        self._polling = poll
        try:
            batches: dict[TopicPartition, list[Any]] = await poll
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._stopping.is_set() and not (current is not None and current.cancelling()):
                return None
            raise
        finally:
            self._polling = None
        return batches

    async def _close(self, consumer: AIOKafkaConsumer) -> None:
        self._unwatch_the_url()
        if self._purging is not None:
            self._purging.cancel()  # nothing to wait for before the last commits
        starters = list(self._starting.values())
        for starter in starters:
            starter.cancel()
        await asyncio.gather(*starters, return_exceptions=True)
        async with self._lock:
            self._owned_at_stop = bool(self._tasks)
            failed = self.aborts + self.commits_unknown
            await self._commit(due_only=False)
            if self.aborts + self.commits_unknown > failed:
                # Their tasks are not restarted now: the next owner processes
                # those records again, as after a kill.
                self.stopped_cleanly = False
            for task in list(self._tasks.values()):
                await self._drop(task)
        await self._stop_purging()
        try:
            await self._leave(consumer)
        except (KafkaError, OSError, asyncio.CancelledError) as exc:
            # aiokafka cancels its in-flight fetch on stop, and that surfaces
            # here when the broker is gone; only our own cancellation goes on.
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            self.stopped_cleanly = False
            if isinstance(self._failure, StoreError):
                # Each store that cannot flush takes RocksDB about a second.
                log.warning("could not leave the group in time after %s: %r", self._failure, exc)
            else:
                log.warning("could not leave the group (is Kafka reachable?): %r", exc)
        if self._offsets is not None:
            with contextlib.suppress(Exception):  # stopping: it is gone either way
                await self._offsets.close()
        self.log_metrics()
        if self.stopped_cleanly:
            log.info("stopped: every transaction committed, stores closed")

    async def _leave(self, consumer: AIOKafkaConsumer) -> None:
        """Stop the consumer, which leaves the group, within the stop's bound.

        aiokafka's ``stop`` first lets a rebalance in progress end, and one
        ends only once every member has rejoined or timed out: after a worker
        was killed, ``session_timeout_s`` (30 s) later. A worker in a
        rebalance owns no task, so nothing of it is uncommitted: it waits
        until just before its bound, then stops without leaving (the group
        drops it after the session timeout), as does one that owned none (more
        workers than partitions) when Kafka is gone. One that owned tasks until
        the stop and cannot leave in time has lost Kafka: its stop is not clean."""
        if self._stop_deadline is None:
            await consumer.stop()
            return
        left = self._stop_deadline - _LEAVE_MARGIN_S - time.monotonic()
        try:
            await asyncio.wait_for(consumer.stop(), max(left, 0.0))
        except TimeoutError:
            if self._joined and not self._rebalancing and self._owned_at_stop:
                raise  # a TimeoutError is an OSError: reported by _close
            log.warning(
                "could not leave the group in time: it is rebalancing (a worker that "
                "is gone holds a rebalance until its session timeout) or Kafka is "
                "unreachable. This worker owns no task, so nothing is uncommitted; "
                "the group drops it after STREAM_APP_SESSION_TIMEOUT_S (%.0f s)",
                self.settings.session_timeout_s,
            )

    def log_metrics(self) -> None:
        m = self.metrics
        log.info(
            "metrics: applied=%d duplicates=%d rejected=%d rekeyed=%d emitted=%s",
            m.applied,
            m.duplicates,
            m.rejected,
            m.rekeyed,
            m.emitted,
        )

    # -- processing and commits (callers hold the lock) --------------------------------------
    async def _process(self, batches: Mapping[TopicPartition, list[Any]]) -> None:
        for tp, records in batches.items():
            task = self._task_of.get(tp)
            if task is None or not task.active:
                continue  # not ours (any more), or not started: its owner reads it again
            while True:
                taken: list[int] = []
                limit = TRANSACTION_BYTES - self._held_bytes() + task.held_bytes()
                if not await self._guarded(task, _handle(task, records, limit, taken)):
                    break
                if taken[0] == len(records):
                    break
                records = records[taken[0] :]
                if not await self._commit_full(task):
                    break  # restarted by the round that ended: it reads them again

    def _held_bytes(self) -> int:
        """What the open transactions of all tasks hold (outputs and store
        writes): past TRANSACTION_BYTES, a commit round is due."""
        return sum(task.held_bytes() for task in self._tasks.values())

    async def _commit_full(self, task: Task) -> bool:
        """Begin a commit round (after the one in flight, if any) now that the
        open transactions hold TRANSACTION_BYTES, before the rest of ``task``'s
        records; whether it is still this worker's running task, not restarted
        by the round that ended."""
        await self._commit(due_only=True)
        return self._running(task)

    def _running(self, task: Task) -> bool:
        """Whether ``task`` is still the active task of its id."""
        return self._tasks.get(task.id) is task and task.active

    async def _guarded(self, task: Task, work: Awaitable[object]) -> bool:
        """Await ``work`` of ``task``; whether it succeeded. A task fenced is
        dropped; one whose transaction, Kafka or store failed is restarted
        from its committed offsets, its transaction aborted (an output topic
        it may not describe stops the worker instead)."""
        try:
            await work
        except TaskFencedError as exc:
            await self._lose(task, exc)
        except (KafkaError, CheckpointError, OSError, StoreError) as exc:
            refused = not_authorized(exc)  # an output topic it may not describe
            if refused is not None:
                self._fail(refused)
                await self._drop(task)
            else:
                await self._restart(task, exc)
        else:
            return True
        return False

    async def _read_past_and_commit(
        self,
        consumer: AIOKafkaConsumer,
        exc: Exception,
        rebalances: int,
        damaged: dict[TopicPartition, int] | None = None,
    ) -> None:
        """:meth:`_read_past_the_client`, then commit what it processed as any
        poll's records are: a backlog of unreadable records, pass after pass,
        held every output and offset of the worker back."""
        async with self._lock:
            await self._read_past_the_client(consumer, exc, rebalances, damaged)
            await self._commit(due_only=True)

    async def _read_past_the_client(
        self,
        consumer: AIOKafkaConsumer,
        exc: Exception,
        rebalances: int,
        damaged: dict[TopicPartition, int] | None = None,
    ) -> None:
        """aiokafka could not decode a fetched record and says not which; polling
        again does not tell either (the failed fetch stays buffered, empty). So
        every active input is read raw from its last record processed
        (:mod:`~stream_app.pipeline.unreadable`), a fetch at a time, up to its
        last stable offset or about ``RAW_RECORDS`` records: readable records
        are processed as usual, unreadable ones rejected by position. Every
        input is then sought to its position, which drops the consumer's
        buffered fetches, and consumption goes on past the bad batches.

        One poll holds up to a batch size of records from each input, and so
        may fail on a record further ahead than one raw pass reads
        (:data:`~stream_app.pipeline.unreadable.RAW_RECORDS`): a pass that
        moved an input on without finding it polls again, and the next pass
        starts where this one stopped. Only a pass that moves nothing raises
        ``exc``: then what aiokafka cannot decode is not where these inputs
        are read. A task that fails in the pass is dropped or restarted as in
        :meth:`_process`, and counts as moved: it reads its inputs again.

        ``damaged`` is given the inputs whose read met a batch damaged on a
        broker's disk, with its offset (:class:`CorruptBatchError`'s ``at``):
        each read ends there."""
        options = client_options(self.settings)
        found = moved = False
        # A committed offset older than the log's start (the workers were down
        # longer than the topic's retention): the consumer reset to the start,
        # and a fetch below it would be refused. Asked once for every input:
        # each request waits behind the consumer's fetch in flight (up to
        # half a second), once per input before.
        inputs = [tp for task in self._tasks.values() if task.active for tp in task.inputs]
        beginnings: dict[TopicPartition, int] = {}
        if inputs:
            with contextlib.suppress(KafkaError):  # asked again per input, in read()
                beginnings = await consumer.beginning_offsets(inputs)

        async def read(task: Task) -> None:
            nonlocal found, moved
            for tp in task.inputs:
                end = consumer.last_stable_offset(tp)
                begins = beginnings.get(tp)
                if begins is None:
                    begins = (await consumer.beginning_offsets([tp])).get(tp, 0)
                # From the last record processed, not from the consumer's
                # position: aiokafka moves that one past a batch too large to
                # fetch whole, and _pass_skipped follows it. Between the two lie
                # only offsets it did not deliver, which the raw read passes
                # again (markers, aborted records) or delivers (that batch).
                handled, passed = task.handled.get(tp, 0), task.positions.get(tp, 0)
                task.positions[tp] = position = max(handled, begins)
                try:
                    async with contextlib.aclosing(
                        read_past(options, tp, position, end=end, whole=True)
                    ) as reading:
                        async for raws, resume in reading:
                            for raw in raws:
                                await task.handle_raw(raw)
                                # As _process does: a pass reads up to 5,000
                                # records per input, each a close that may
                                # write a whole session.
                                full = self._held_bytes() >= TRANSACTION_BYTES
                                if full and not await self._commit_full(task):
                                    return  # restarted by the round: it reads them again
                            task.positions[tp] = max(task.positions.get(tp, 0), resume)
                            found = found or not all(raw.readable() for raw in raws)
                except CorruptBatchError as damage:
                    # The client meets it too: the worker names it (_read_up_to_damage).
                    if damaged is not None:
                        damaged[tp] = damage.at
                except RecordBatchError as unparsed:
                    # Records this parser does not read (old message formats,
                    # say) where aiokafka may: not this input's to pass, then.
                    log.warning("%s[%d]: cannot read it raw: %s", tp.topic, tp.partition, unparsed)
                moved = (
                    moved
                    or task.handled.get(tp, 0) > handled
                    or task.positions.get(tp, 0) > max(passed, position)
                )

        for task in list(self._tasks.values()):
            if not self._running(task):
                continue  # not started, or dropped meanwhile by a round a restart above ended
            if not await self._guarded(task, read(task)):
                moved = True
            elif not self._running(task):
                moved = True  # restarted by a round of the pass: its start seeks
            else:
                for tp in task.inputs:
                    consumer.seek(tp, task.positions.get(tp, 0))
        if not found and not moved and rebalances == self._rebalances:
            # (After a rebalance, the failed fetch is gone with the partitions
            # it was for, or fetched again for their new tasks: poll again.)
            raise exc

    async def _commit(self, *, due_only: bool) -> None:
        """Begin a commit round of every open transaction, or (``due_only``) of
        all of them once any one is due, as Kafka Streams commits all of a
        thread's tasks together; without ``due_only``, wait for it too.

        A round runs beside the processing: its transactions are sealed at once
        (:meth:`Task.begin_commit`) and the records handled meanwhile go to each
        task's next transaction, which the next round commits once this one
        has finished. So processing waits for a round only when the next one
        is due before it ends. A round that has ended is acted on (counted,
        failed tasks restarted) at the next call, due or not: the loop calls
        this at least once per checkpoint interval."""
        if self._round is not None and self._round.commits.done():
            await self._finish_round()
        now = time.monotonic()
        if (
            due_only
            and not any(task.commit_due(now) for task in self._tasks.values())
            and self._held_bytes() < TRANSACTION_BYTES
        ):
            return
        await self._finish_round()
        due = [t for t in self._tasks.values() if t.active and t.checkpoint is not None]
        if due:
            began = time.perf_counter()
            sealed = [task.begin_commit() for task in due]  # now, before any other record
            commits = asyncio.gather(*map(self._counted, sealed), return_exceptions=True)
            commits.add_done_callback(
                lambda _: self.commit_latency.observe(time.perf_counter() - began)
            )
            self._round = _Round(due, commits)
        if not due_only:
            await self._finish_round()

    @staticmethod
    async def _round_outcome(current: _Round) -> list[BaseException | None]:
        """The outcome of ``current``, waited for, warning while it is slow.
        ``asyncio.wait`` cancels nothing: a waiter that is cancelled (a
        starter, as the worker stops) leaves the round's transactions to finish."""
        commits = current.commits
        while True:
            done, _ = await asyncio.wait({commits}, timeout=current.next_warning_in())
            if done:
                return commits.result()
            current.warn_if_slow()

    async def _counted(self, commit: Awaitable[None]) -> None:
        """One transaction of a round, counted as soon as it ends."""
        try:
            await commit
        except CommitOutcomeUnknownError:
            self.commits_unknown += 1
            raise
        except TaskFencedError as exc:
            # Fenced as its commit was retried: the new owner may have made it.
            if exc.committing:
                self.commits_unknown += 1
            else:
                self.aborts += 1
            raise
        except CheckpointError:
            self.aborts += 1
            raise
        except StoreWriteError:
            self.commits += 1  # committed: only the stores' write after it failed
            raise
        self.commits += 1

    async def _finish_round(self) -> None:
        """Wait for the commit round in flight, if any, and act on its outcome."""
        current, self._round = self._round, None
        if current is None:
            return
        try:
            results = await self._round_outcome(current)
        except asyncio.CancelledError:
            if self._round is None:
                self._round = current  # the next waiter acts on its outcome
            raise
        for task, result in zip(current.tasks, results, strict=True):
            if self._tasks.get(task.id) is not task:
                continue  # dropped meanwhile (its next transaction with it)
            if isinstance(result, NotAuthorizedError):
                self._fail(result.cause)
                await self._drop(task)
            elif isinstance(result, TaskFencedError):
                await self._lose(task, result)
            elif isinstance(result, CheckpointError | StoreWriteError):
                await self._restart(task, result)
            elif isinstance(result, BaseException):
                raise result

    async def _lose(self, task: Task, exc: TaskFencedError) -> None:
        log.warning(
            "%s: fenced: another worker owns this task now, or Kafka aborted its "
            "transaction on its timeout%s; dropping it until the group says which (%s)",
            task.id,
            # Its commit retried, as _revoke says it.
            ": its transaction may or may not have been committed" if exc.committing else "",
            exc,
        )
        await self._drop(task)
        # Until the group moves them, no task here reads them: fetched, their
        # records would be dropped, and one aiokafka cannot decode would fail
        # every poll with nothing to read it raw (_read_past_the_client).
        if self._consumer is not None:
            assigned = self._consumer.assignment()
            self._consumer.pause(*(tp for tp in task.inputs if tp in assigned))
        if self._fenced_since is None:
            self._fenced_since = time.monotonic()

    async def _restart_corrupted(self) -> None:
        """Restart the tasks a query found a corrupt store of: their records
        may never read the damaged block, and every query of it would be a
        503 until the task next closed."""
        for task in list(self._tasks.values()):
            if task.active and any(store.corrupted for store in task.stores.values()):
                await self._restart(task, _CORRUPT_READ)

    async def _restart(self, task: Task, exc: BaseException) -> None:
        if exc is _CORRUPT_READ:
            log.warning(
                "%s: a query found a store corrupt: restarting the task, which deletes and "
                "restores it",
                task.id,
            )
        elif isinstance(exc, StoreWriteError):
            log.warning(
                "%s: transaction committed, but its stores could not be written (%s): "
                "restarting the task, which restores them from the changelog",
                task.id,
                exc,
            )
        elif isinstance(exc, CommitOutcomeUnknownError):
            log.warning(
                "%s: the commit failed with no answer to say whether it was made (%s): "
                "restarting the task, which reads from Kafka what was committed",
                task.id,
                exc,
            )
        else:
            log.warning(
                "%s: transaction failed (%s): aborted; restarting the task from its "
                "committed offsets",
                task.id,
                exc,
            )
        # Settled first: the round in flight may hold the task's previous
        # transaction, and learn only now that it was fenced, or fail and
        # restart the task itself.
        await self._finish_round()
        owned = self._tasks.get(task.id) is task
        await self._drop(task)
        # Not a task dropped already (fenced, say: starting it again would fence
        # its new owner), nor one the round has restarted already.
        if owned and not self._stopping.is_set() and task.id not in self._tasks:
            self._begin_start(task.stage, task.partition, delay=self._restart_delay(task.id))

    def _restart_delay(self, task_id: TaskId) -> float:
        """How long a restart of ``task_id`` waits: nothing for the first in
        :data:`_RESTART_QUIET_S`, then 0.5 s, doubling, up to the bound."""
        now = time.monotonic()
        last, count = self._restarts.get(task_id, (now - _RESTART_QUIET_S, 0))
        count = count + 1 if now - last < _RESTART_QUIET_S else 1
        self._restarts[task_id] = (now, count)
        self.task_restarts += 1
        if count == 1:
            return 0.0
        # The exponent bounded too: 2.0 ** 1024 overflows, after some hours
        # of a failure that repeats every 10 s.
        delay: float = min(0.5 * 2.0 ** min(count - 2, 16), _RESTART_BACKOFF_MAX_S)
        log.warning("%s: restarted %d times in a row: starting in %.1f s", task_id, count, delay)
        return delay

    async def _drop(self, task: Task) -> None:
        """Forget and close ``task``, once the commit round in flight (which may
        hold its previous transaction, on its producer) has ended; and stop its
        starter if it is still starting."""
        await self._finish_round()
        starter = self._starting.get(task.id) if self._tasks.get(task.id) is task else None
        self._forget(task)
        if starter is not None and starter is not asyncio.current_task():
            # A task restarted by the round that a revocation or a rejoin just
            # finished, and dropped by them before it began: left to run, its
            # starter would still take the transactional id (fencing whichever
            # worker now owns the partition) and open the stores.
            starter.cancel()
            await asyncio.gather(starter, return_exceptions=True)
            # A starter cancelled before its first step never ran its cleanup.
            if self._starting.get(task.id) is starter:
                del self._starting[task.id]
        try:
            await task.close()
        except StoreError as exc:
            # Its commits are in Kafka; RocksDB cannot write (no space left?), so
            # neither could the next task: stop, closing the others.
            log.error("%s: %s: stopping the worker", task.id, exc)  # noqa: TRY400 - one line
            self._fail(exc)

    def _forget(self, task: Task) -> None:
        """No longer route records to ``task`` (unless a successor has its id)."""
        if self._tasks.get(task.id) is task:
            del self._tasks[task.id]
        for tp in task.inputs:
            if self._task_of.get(tp) is task:
                del self._task_of[tp]

    async def _start_consumer(self, consumer: AIOKafkaConsumer) -> bool:
        """Start the group's consumer and wait for the input topics' metadata;
        False when told to stop first. Both wait on Kafka: a broker that
        accepts connections and never answers held a stop for the request
        timeout (40-65 s), past the shutdown bound, so the worker exited 1.
        Kafka lost since the topic check is waited for with backoff, as at the
        other steps of the start (it was a traceback and exit 1)."""
        backoff = KAFKA_RETRY_FIRST_S
        while True:
            attempt = await unless_stopped(consumer.start(), self._stopping)
            if attempt is None:
                return False
            try:
                attempt.result()
                break
            except KafkaConnectionError as exc:
                # aiokafka reports a refused certificate or credentials (the
                # brokers rolled with another CA, a password rotated) as this
                # too: told apart as the worker's own start does.
                refused = await refused_worker(self.settings, self._stopping)
                if self._stopping.is_set():
                    return False
                if refused is not None:
                    raise refused from exc
                log.warning(
                    "Kafka at %s cannot be reached to join the group (%s), retrying in %.0f s",
                    self.settings.bootstrap_servers,
                    exc,
                    backoff,
                )
            if await unless_stopped(asyncio.sleep(backoff), self._stopping) is None:
                return False
            backoff = min(backoff * 2, KAFKA_RETRY_MAX_S)
        return await unless_stopped(self._await_input_topics(consumer), self._stopping) is not None

    async def _await_input_topics(self, consumer: AIOKafkaConsumer) -> None:
        """Wait (bounded) until the broker serves the metadata of every input
        topic. Topics the worker has just created may not show yet; a group
        leader that assigned then would leave them out (see
        :meth:`on_partitions_assigned`)."""
        deadline = time.monotonic() + _TOPICS_VISIBLE_WAIT_S
        missing: list[str] = []
        while not self._stopping.is_set():
            try:
                missing = sorted(set(self.input_topics) - await consumer.topics())
            except KafkaError as exc:
                missing = [f"(metadata: {exc!r})"]
            if not missing or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if missing:
            log.warning("joining the group before the broker shows %s", ", ".join(missing))

    def _fail(self, exc: Exception) -> None:
        """Stop the worker (every other task committed and closed), then have
        :meth:`run` raise ``exc``, or the fault that came first."""
        if self._failure is None:
            self._failure = exc
        self.stop()

    def _rejoin_due(self, now: float) -> bool:
        """Whether a task fenced here has waited for the group long enough."""
        return (
            self._fenced_since is not None
            and not self._rebalancing  # the group is moving them now
            and now - self._fenced_since > fenced_wait_s(self.settings)
        )

    async def _rejoin(self) -> None:
        """A fenced task was not reassigned (see :func:`fenced_wait_s`): leave
        and rejoin the group."""
        assert self._consumer is not None  # noqa: S101 - consuming
        log.warning(
            "fenced tasks were not reassigned within %.0f s: their transactions timed "
            "out, or this worker left the group unawares; rejoining",
            fenced_wait_s(self.settings),
        )
        self._fenced_since = None
        # Not ready until the new assignment: its tasks are dropped below, and
        # the join that follows may begin only at the consumer's next poll.
        self._rebalancing = True
        async with self._lock:
            await self._commit(due_only=False)
            for task in list(self._tasks.values()):
                await self._drop(task)
        self._consumer.unsubscribe()
        self._consumer.subscribe(self.input_topics, listener=self)

    # -- starting tasks --------------------------------------------------------------------
    def _begin_start(self, stage: Stage, partition: int, *, delay: float = 0.0) -> None:
        assert self._consumer is not None  # noqa: S101 - consuming
        task = Task(
            stage,
            partition,
            settings=self.settings,
            changelogs=self._changelogs,
            state_dir=self.state_dir,
            resources=self._resources,
            commit_offsets=self._consumer.commit,
            limits=self.limits,
            max_record_bytes=self.max_record_bytes,
            offset_metadata=offset_metadata(self.partitions),
            latency=self.latency,
            phases=self.phase_latency,
            metrics=self.metrics,
            restore_progress=self._restore_progress,
        )
        self._tasks[task.id] = task
        for tp in task.inputs:
            self._task_of[tp] = task
        self._consumer.pause(*task.inputs)
        self._starting[task.id] = asyncio.create_task(self._start(task, delay))

    async def _past_what_the_state_holds(
        self, consumer: AIOKafkaConsumer, task: Task, positions: dict[TopicPartition, int]
    ) -> None:
        """Under at_least_once, move ``positions`` past the records ``task``'s
        restored state holds (:meth:`Task.consumed_positions`: an offset
        commit cut short after the changelogs), and commit them, so that a
        later start, whose changelog may record other inputs only, starts
        there too. An offset past the input's end is not this topic's (it was
        recreated): ignored."""
        held = {tp: o for tp, o in task.consumed_positions().items() if tp in positions}
        ahead = {tp: o for tp, o in held.items() if o > positions[tp]}
        if not ahead:
            return
        ends = await consumer.end_offsets(list(ahead))
        for tp, offset in ahead.items():
            if offset > ends[tp]:
                log.warning(
                    "%s: its state records %s[%d] consumed up to %d, past the end %d: "
                    "another topic of that name; starting at %d",
                    task.id,
                    tp.topic,
                    tp.partition,
                    offset,
                    ends[tp],
                    positions[tp],
                )
                continue
            log.info(
                "%s: %s[%d] starts at %d, past its committed offset %d: the restored "
                "state holds those records (a commit cut short)",
                task.id,
                tp.topic,
                tp.partition,
                offset,
                positions[tp],
            )
            positions[tp] = offset
        metadata = offset_metadata(self.partitions)
        moved = {tp: (positions[tp], metadata) for tp in ahead if positions[tp] == ahead[tp]}
        if moved:
            await consumer.commit(moved)

    def _restore_progress(self, task_id: TaskId, restored: int, remaining: int) -> None:
        self.restored_records += restored
        if remaining:
            self.restore_remaining[str(task_id)] = remaining
        else:
            self.restore_remaining.pop(str(task_id), None)

    async def _start(self, task: Task, delay: float = 0.0) -> None:
        consumer = self._consumer
        assert consumer is not None  # noqa: S101 - consuming
        backoff = 0.5
        try:
            if delay:
                await asyncio.sleep(delay)  # see _restart_delay
            while True:
                try:
                    restored = await task.start()
                    # Not the consumer's committed(): it reads a coordinator's
                    # error for the whole request (one loading the group's
                    # offsets after a failover, or one that moved) as no
                    # offset, and a task took its partition for one never
                    # committed on: read from its start, under exactly_once
                    # every output of it published again. GroupOffsets raises
                    # that error (the start retries), in one request for all
                    # the task's inputs on a client the worker keeps.
                    found = await self._group_offsets().read(self.settings.app_id)
                    positions: dict[TopicPartition, int] = {}
                    for tp in task.inputs:
                        if tp in found:
                            positions[tp] = found[tp][0]
                        else:
                            positions[tp] = (await consumer.beginning_offsets([tp]))[tp]
                    await self._past_what_the_state_holds(consumer, task, positions)
                    break
                except (KafkaError, OSError, StreamAppError) as exc:
                    refused = not_authorized(exc)
                    if refused is not None:
                        raise refused from exc  # stops the worker: see below
                    log.warning(
                        "%s: could not start (%r): retrying in %.1f s", task.id, exc, backoff
                    )
                    # A store that cannot flush (no space left) fails to close
                    # but lets go of its database: the next attempt opens it again.
                    with contextlib.suppress(StoreError):
                        await task.close()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 10.0)
            async with self._lock:
                if self._tasks.get(task.id) is not task:
                    await task.close()
                    return
                for tp, offset in positions.items():
                    consumer.seek(tp, offset)
                task.activate(positions)
                consumer.resume(*task.inputs)
                resumed_ms = time.time() * 1000
                for tp in task.inputs:
                    self._resumed_ms[tp] = resumed_ms
            log.info(
                "%s: started at %s (restored %d changelog records)",
                task.id,
                ", ".join(f"{tp.topic}@{offset}" for tp, offset in positions.items()),
                restored,
            )
        except asyncio.CancelledError:
            await task.close()
            raise
        except Exception as exc:
            # Not a fault that retrying mends: its partitions would stay paused
            # for good. Stop the worker instead, committing the other tasks.
            self._fail(exc)
            # It never became active, so no commit round holds a transaction of
            # it: closed at once, not after the round in flight (this starter is
            # cancelled as the worker stops, and must not wait on the round).
            self._forget(task)
            with contextlib.suppress(StoreError):
                await task.close()
        finally:
            self.restore_remaining.pop(str(task.id), None)
            if self._starting.get(task.id) is asyncio.current_task():
                del self._starting[task.id]

    # -- ConsumerRebalanceListener ---------------------------------------------------------
    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        """Commit (or abort) and close every task of a revoked partition."""
        self._rebalancing = True
        self._rebalances += 1
        self._unwatch_the_url()  # the assignment that follows looks again
        gone = {self._task_of[tp].id for tp in revoked if tp in self._task_of}
        starters = [self._starting[i] for i in gone if i in self._starting]
        for starter in starters:
            starter.cancel()
        await asyncio.gather(*starters, return_exceptions=True)
        async with self._lock:
            await self._finish_round()
            # Asked again: a task restarted while this waited for the lock (by
            # the main loop, whose _restart held it, or by the round that just
            # failed) is not the one counted above. Left out, it went on: its
            # starter failed the worker on a seek of a partition no longer
            # assigned, or, started already, answered queries from a stale
            # store for a partition another worker owned.
            gone |= {i for i, task in self._tasks.items() if not revoked.isdisjoint(task.inputs)}
            # A round that failed restarted its tasks: their starters must not
            # take a first step (the transactional id) before _drop stops them.
            for task_id in gone:
                if task_id in self._starting and task_id in self._tasks:
                    self._starting[task_id].cancel()
            # All at once, as a commit round: the joining worker waits for the
            # slowest commit, not for their sum.
            await asyncio.gather(*(self._revoke(self._tasks[i]) for i in gone if i in self._tasks))
        if gone:
            log.info("revoked %d task(s): %s", len(gone), ", ".join(sorted(map(str, gone))))

    async def _revoke(self, task: Task) -> None:
        """Commit (or abort) ``task``'s transaction and close it; raises nothing."""
        try:
            if task.active and task.checkpoint is not None:
                await self._counted(task.commit())
        except TaskFencedError as exc:
            # A worker paused past its session timeout learns it here:
            # its successor's producer took over the transactional id.
            log.warning(
                "%s: fenced, another worker owns this task now: its open transaction %s (%s)",
                task.id,
                "may or may not have been committed" if exc.committing else "is aborted",
                exc,
            )
        except NotAuthorizedError as exc:
            self._fail(exc.cause)
        except StoreWriteError as exc:
            log.warning(
                "%s: committed on revocation, but its stores could not be written (%s): "
                "a later start of the task restores them from the changelog",
                task.id,
                exc,
            )
        except CommitOutcomeUnknownError as exc:
            log.warning(
                "%s: commit on revocation failed with no answer to say whether it was "
                "made (%s): the next owner starts from what Kafka committed",
                task.id,
                exc,
            )
        except Exception as exc:  # the task is closed either way, never left half-open
            log.warning(
                "%s: commit on revocation failed (%r): %s; the next owner processes its "
                "records again",
                task.id,
                exc,
                "aborted"
                if self.settings.processing_guarantee == "exactly_once"
                else "its outputs may be out already",  # no transaction to abort
            )
        finally:
            await self._drop(task)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        """Pause the new partitions and start their tasks (see :meth:`_start`)."""
        if self._stopping.is_set():
            # A rebalance that ends while the worker stops: the tasks' next owner
            # starts them. Starting them here would fence their producers and
            # open and restore their stores, only for the stop to drop them.
            # Still rebalancing for _leave: a worker that owns no task has
            # nothing uncommitted if it cannot leave the group in time.
            assert self._consumer is not None  # noqa: S101 - consuming
            self._consumer.pause(*assigned)
            self._waiting = set()  # nothing waits for a later assignment now
            log.info("stopping: %d partition(s) assigned, no task started", len(assigned))
            return
        self._fenced_since = None
        if not self._joined:  # the delay counts from the first assignment (_clean_up)
            self._cleanup_at = max(
                self._cleanup_at, time.monotonic() + self.settings.state_cleanup_delay_s
            )
        self._joined = True
        self._rebalancing = False
        beyond = sorted(
            f"{tp.topic}[{tp.partition}]"
            for tp in assigned
            if tp.topic in self._stage_of and tp.partition >= self.partitions
        )
        if beyond:
            # An operator added partitions while the worker ran: its state and
            # its internal topics are laid out for the old count, and keys now
            # hash elsewhere. Stop, as Kafka Streams does, rather than go on
            # with some partitions (and, before, none of stage 2's tasks).
            self._fail(
                ConfigurationError(
                    f"partitions were added while the worker ran ({', '.join(beyond)}); its "
                    f"state and internal topics have {self.partitions}: a re-partitioned "
                    "deployment needs a new app id (docs/operations.md, Migrate)"
                )
            )
            return
        self._watch_the_url(assigned)
        wanted = {
            (self._stage_of[tp.topic], tp.partition)
            for tp in assigned
            if tp.topic in self._stage_of
        }
        started = 0
        self._waiting = set()
        for stage, partition in sorted(wanted, key=lambda w: (w[0].name, w[1])):
            task_id = TaskId(stage.name, partition)
            inputs = [TopicPartition(topic, partition) for topic in stage.inputs]
            lacking = [tp for tp in inputs if tp not in assigned]
            if lacking:
                # The leader assigned before it had metadata for some input
                # topic (just created): this assignment cannot run the task. The
                # group rebalances once the consumer's metadata shows the topic.
                log.warning(
                    "%s: not started: %s not assigned (no metadata yet?); waiting "
                    "for the next rebalance",
                    task_id,
                    ", ".join(f"{tp.topic}[{tp.partition}]" for tp in lacking),
                )
                assert self._consumer is not None  # noqa: S101 - consuming
                self._consumer.pause(*(tp for tp in inputs if tp in assigned))
                self._waiting.add(task_id)
                continue
            started += 1
            if task_id not in self._tasks:
                self._begin_start(stage, partition)
        log.info("assigned %d task(s)", started)

    def _watch_the_url(self, assigned: set[TopicPartition]) -> None:
        """When the routing map gives this worker's URL to partitions it was
        not assigned, another member advertises it: a worker restarted at
        this address before the group dropped its former self (which the
        group does within the session timeout, and the rebalance then
        mends), or workers that share one address (a Service's name), whose
        session queries are then answered 503 for ever. Only the second
        outlasts the session timeout: said at ERROR if no assignment has
        come after two of them. The group's leader names the members at
        WARNING."""
        self._unwatch_the_url()
        url = self.assignor.url
        others = sorted(
            (topic, partition)
            for topic, owners in self.assignor.routes.items()
            for partition, owner in owners.items()
            if owner == url and TopicPartition(topic, partition) not in assigned
        )
        if url and others:
            # Twice: a dead former self may outlast one session timeout (its
            # coordinator moved, whose load of the group gives every member a
            # new one; a former self that ran with a longer one).
            self._url_shared = asyncio.get_running_loop().call_later(
                2 * (self.settings.session_timeout_s + _URL_SHARED_GRACE_S),
                self._say_the_url_shared,
                others,
            )

    def _say_the_url_shared(self, others: list[tuple[str, int]]) -> None:
        self._url_shared = None
        log.error(
            "other group members advertise this worker's URL %s, for %d partitions (%s%s), "
            "and have for more than twice STREAM_APP_SESSION_TIMEOUT_S (%.0f s), so they "
            "are not a restarted worker's former self: session queries for their "
            "partitions cannot be routed. Give each worker its own "
            "STREAM_APP_ADVERTISED_HOST (or port): its own host name, not a Service's",
            self.assignor.url,
            len(others),
            ", ".join(f"{topic}[{partition}]" for topic, partition in others[:3]),
            ", …" if len(others) > 3 else "",
            self.settings.session_timeout_s,
        )

    def _unwatch_the_url(self) -> None:
        if self._url_shared is not None:
            self._url_shared.cancel()
            self._url_shared = None


def usable_state_dir(settings: Settings, *, create: bool = True) -> Path:
    """The worker's state directory (``STREAM_APP_DATA_DIR``/app id), created
    (unless not ``create``: then the directory it would be created in is
    checked); raises ConfigurationError, one line, when it cannot be created
    or written. The worker checks it before any broker call, the engine again
    as it reads it, ``stream-app config`` without creating it."""
    state_dir = settings.data_dir / settings.app_id
    try:
        if create:
            state_dir.mkdir(parents=True, exist_ok=True)
            existing = state_dir
        else:
            existing = next(p for p in (state_dir, *state_dir.parents) if p.exists())
            if not existing.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError("not writable")  # said as an OSError would be
    except OSError as exc:
        raise _unusable_state_dir(settings, exc) from exc
    return state_dir


def _unusable_state_dir(settings: Settings, why: OSError) -> ConfigurationError:
    return ConfigurationError(
        f"STREAM_APP_DATA_DIR={settings.data_dir}: cannot use the state directory "
        f"{settings.data_dir / settings.app_id}: {why}"
    )


#: The failure a worker stops with on a partition Kafka answers CORRUPT_MESSAGE.
_CANNOT_READ_ITS_LOG: Final = (
    "Kafka answered a fetch CORRUPT_MESSAGE: it cannot read its own log there"
)


@dataclass(frozen=True, slots=True)
class _Damage:
    """A batch no client can read, which the worker names as it stops."""

    #: None: on no input the worker could find.
    tp: TopicPartition | None
    #: None: not met by a raw read; looked for from the consumer's position.
    offset: int | None


def _partition_named(consumer: AIOKafkaConsumer, exc: Exception) -> TopicPartition | None:
    """The assigned partition aiokafka's error names (``Invalid CRC - <tp>``)."""
    return next((tp for tp in consumer.assignment() if repr(tp) in str(exc)), None)


async def _out_of_order(
    consumer: AIOKafkaConsumer, batches: Mapping[TopicPartition, list[Any]]
) -> OffsetsOutOfOrderError | None:
    """What a poll's records say of a batch whose offsets lie
    (:func:`~stream_app.pipeline.unreadable.offsets_out_of_order`), or None.
    A false alarm costs a raw read of the records, processed as any."""
    for tp, records in batches.items():
        try:
            position = await consumer.position(tp)
        except IllegalStateError:
            continue  # revoked meanwhile: its records are not processed
        offsets = [record.offset for record in records]
        if offsets_out_of_order(offsets, position):
            return OffsetsOutOfOrderError(
                f"{tp.topic}[{tp.partition}]: the Kafka client handed over records at offsets "
                f"{offsets[:3]}...{offsets[-3:]} and reads next at {position}: a record batch "
                "whose offsets disagree with its header"
            )
    return None


async def _handle(task: Task, records: list[Any], limit: int, taken: list[int]) -> None:
    """``task.handle_many(records, limit)``, how many it took appended to ``taken``."""
    taken.append(await task.handle_many(records, limit))


async def _first(*aws: Any) -> None:
    """Wait until the first of ``aws`` (coroutines or tasks) is done; cancel the rest."""
    tasks = [a if isinstance(a, asyncio.Future) else asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t, a in zip(tasks, aws, strict=True):
            if t is not a:
                t.cancel()


async def _every(seconds: float, action: Callable[[], object], failed: str) -> None:
    """Run ``action`` every ``seconds``, beside the engine's loop, until
    cancelled; a failure of it is logged as ``failed``, and the next turn
    comes all the same."""
    while True:
        await asyncio.sleep(seconds)
        try:
            action()
        except Exception:
            log.exception(failed)
