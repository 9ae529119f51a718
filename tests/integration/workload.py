"""Workloads for the resilience tests, observed from outside the worker.

* :func:`produce_traffic_records` sends the demo traffic (all at once, or at a
  steady rate so that workers are mid-stream whenever a test interferes) and
  returns where each record landed (partition, offset).
* :func:`expected_outcome` replays the same records through the pure domain
  core (``decode_command`` + ``apply``) and returns what a correct deployment
  emits for them: one identity per downstream output (kind, integrationId,
  event, updateCount) with the values a user checks (state and totals), and
  one identity per rejected record (its partition and offset) with its reason.
* :class:`OutputReader` follows the output topics as a read_committed
  analytics consumer, across worker crashes and restarts, and checks each
  record against its topic's contract (``stream_app.contract.validate_output``).
* :func:`exactly_once_problems` compares what was read with what was expected
  and lists every duplicate, every missing and unexpected record and every
  wrong total.

Nothing here imports the worker's engine (``stream_app.pipeline``): only the
domain core, the demo traffic and plain aiokafka clients.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from itertools import count
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from stream_app.contract import ContractViolationError, validate_output
from stream_app.demo.traffic import OUTPUT_KINDS, Traffic
from stream_app.domain import (
    ApplicationSettings,
    Applied,
    CommandContext,
    Duplicate,
    EventName,
    Rejected,
    Rejection,
    Session,
    apply,
    decode_command,
    output_document,
)
from stream_app.settings import TopicNames
from tests.integration.harness import Output, Worker

#: Which output topic (by TopicNames field) each emitted event goes to.
TOPIC_OF_EVENT = {
    EventName.CLOSED: "closed",
    EventName.PARTIALLY_RETURNED: "returned",
    EventName.CANCELLED: "cancelled",
    EventName.REVOKED: "cancelled",
    EventName.REOPENED: "reopened",
}

#: (output kind, integrationId, event, updateCount): one downstream output.
OutputId = tuple[str, str, str, int]
#: (state, total, cartItemTotal, additionalCostTotal, returned value): what it says.
OutputValues = tuple[str, Decimal, Decimal, Decimal, Decimal | None]
#: (partition, offset) of a rejected command record.
RejectionId = tuple[int, int]

Position = tuple[int, int]


# --------------------------------------------------------------------------- producing


async def produce_traffic_records(
    bootstrap: str,
    topic: str,
    traffic: Traffic,
    *,
    rate: float | None = None,
) -> list[Position]:
    """Send every record of ``traffic`` to ``topic`` in order (one idempotent
    producer, acks=all, so each key's order holds); ``rate`` in records per
    second, ``None`` for as fast as the broker takes them. Returns the
    (partition, offset) of each record, in traffic order."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        futures = []
        for index, record in enumerate(traffic.records):
            if rate is not None and index % 50 == 0:
                delay = began + index / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            futures.append(await producer.send(topic, value=record.value, key=record.key))
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(int(m.partition), int(m.offset)) for m in metadata]


# --------------------------------------------------------------------------- expectations


def _decimal(value: Any) -> Decimal:
    return Decimal(str(value))


def output_identity(kind: str, doc: dict[str, Any]) -> tuple[OutputId, OutputValues]:
    """The identity of a downstream output document and the values a user checks."""
    session = doc["session"]
    returned = doc.get("return")
    return (
        (kind, str(doc["integrationId"]), str(doc["event"]), int(session["updateCount"])),
        (
            str(session["state"]),
            _decimal(session["total"]),
            _decimal(session["cartItemTotal"]),
            _decimal(session["additionalCostTotal"]),
            _decimal(returned["value"]) if returned is not None else None,
        ),
    )


@dataclass(frozen=True)
class Expected:
    """What a correct deployment emits for a workload."""

    #: every downstream output once, with its values
    outputs: dict[OutputId, OutputValues]
    #: every rejected record once, with its reason
    rejections: dict[RejectionId, str]
    #: output records per kind (closed, returned, cancelled, reopened, rejected)
    per_kind: dict[str, int]

    @property
    def total(self) -> int:
        return len(self.outputs) + len(self.rejections)


class _Ids:
    def __init__(self) -> None:
        self._next = count(1)

    def next_id(self) -> int:
        return next(self._next)


def expected_outcome(traffic: Traffic, positions: Sequence[Position]) -> Expected:
    """Replay ``traffic`` through the domain core, as the worker applies it:
    each session's commands in their order (the traffic keeps that order; its
    mis-keyed records are one-record sessions, so re-keying cannot reorder
    them). Also checks the replay agrees with each record's own expectation."""
    if len(positions) != len(traffic.records):
        raise ValueError("one position per record")
    stored: dict[tuple[int, str], Session] = {}
    ids = _Ids()
    outputs: dict[OutputId, OutputValues] = {}
    rejections: dict[RejectionId, str] = {}
    per_kind: Counter[str] = Counter(dict.fromkeys(OUTPUT_KINDS, 0))
    for index, (record, position) in enumerate(zip(traffic.records, positions, strict=True)):
        command = decode_command(record.value)
        produced: list[str] = []
        if isinstance(command, Rejection):
            rejections[position] = str(command.reason)
            produced.append("rejected")
        else:
            application_id = command.application_id or 1
            key = (application_id, command.integration_id)
            context = CommandContext(
                timestamp_ms=1_700_000_000_000 + index,
                source_event_id=f"replay-{index}",
                application_id=application_id,
                settings=ApplicationSettings(),
                ids=ids,
            )
            outcome = apply(stored.get(key), command, context)
            if isinstance(outcome, Rejected):
                rejections[position] = str(outcome.rejection.reason)
                produced.append("rejected")
            elif isinstance(outcome, Applied):
                stored[key] = outcome.session
                for event in outcome.events:
                    kind = TOPIC_OF_EVENT.get(event.name)
                    if kind is None:
                        continue
                    identity, values = output_identity(
                        kind, output_document(event, outcome.session)
                    )
                    if identity in outputs:
                        raise AssertionError(f"two outputs share the identity {identity}")
                    outputs[identity] = values
                    produced.append(kind)
            else:
                assert isinstance(outcome, Duplicate)
        if tuple(produced) != record.outputs:
            raise AssertionError(
                f"the domain core and the traffic disagree on {record}: {produced}"
            )
        per_kind.update(produced)
    return Expected(outputs, rejections, dict(per_kind))


# --------------------------------------------------------------------------- reading


async def partition_counts(bootstrap: str, names: Iterable[str]) -> dict[str, int]:
    """How many partitions each topic has (0 when it does not exist)."""
    names = list(names)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    counts = dict.fromkeys(names, 0)
    for entry in described:
        if entry.get("topic") in counts and not entry.get("error_code"):
            counts[entry["topic"]] = len(entry.get("partitions", ()))
    return counts


def describe_workers(workers: Iterable[Worker], chars: int = 3000) -> str:
    parts = []
    for worker in workers:
        state = "running" if worker.running else f"exited with {worker.proc.returncode}"
        parts.append(
            f"--- worker pid {worker.proc.pid} ({state}), log tail:\n{worker.log_tail(chars)}"
        )
    return "\n".join(parts)


async def exited_within(worker: Worker, timeout: float) -> float | None:  # noqa: ASYNC109
    """Seconds until ``worker`` exited, or None if it still runs after ``timeout``."""
    began = time.monotonic()
    while worker.proc.poll() is None:
        if time.monotonic() - began > timeout:
            return None
        await asyncio.sleep(0.05)
    return time.monotonic() - began


async def configuration_error(worker: Worker, timeout: float = 60.0) -> str:  # noqa: ASYNC109
    """The one ``configuration error`` line of a worker that must stop with exit 2
    within ``timeout`` seconds (each of which is asserted)."""
    worker.expect_exit(2)  # what the teardown checks too
    exit_s = await exited_within(worker, timeout)
    assert exit_s is not None, "the worker kept running\n" + describe_workers([worker])
    assert worker.proc.returncode == 2, describe_workers([worker])
    log = worker.log_path.read_text(errors="replace")
    errors = [line for line in log.splitlines() if "configuration error" in line]
    assert len(errors) == 1, log[-3000:]
    return errors[0]


class OutputReader:
    """Follows the five output topics from the beginning, read_committed."""

    def __init__(self, bootstrap: str, topics: TopicNames) -> None:
        self.bootstrap = bootstrap
        self.kind_of = {getattr(topics, kind): kind for kind in OUTPUT_KINDS}
        self.outputs: list[Output] = []
        self._consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> OutputReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def _assign(self) -> bool:
        """Assign every partition once every output topic exists."""
        counts = await partition_counts(self.bootstrap, self.kind_of)
        if not all(counts.values()):
            return False
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        )
        await consumer.start()
        tps = [TopicPartition(t, p) for t, n in counts.items() for p in range(n)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._consumer = consumer
        return True

    async def _read_once(self) -> None:
        if self._consumer is None and not await self._assign():
            await asyncio.sleep(0.5)
            return
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=200, max_records=5000)
        for tp, records in batches.items():
            kind = self.kind_of[tp.topic]
            for r in records:
                # Every output record keeps its topic's contract (schemas/).
                try:
                    validate_output(kind, r.value or b"")
                except ContractViolationError as exc:
                    raise AssertionError(
                        f"{tp.topic}[{tp.partition}]@{r.offset} breaks its schema: {exc}"
                    ) from exc
            self.outputs.extend(
                Output(tp.topic, tp.partition, r.offset, r.key, r.value or b"") for r in records
            )

    def progress(self) -> str:
        seen = Counter(self.kind_of[o.topic] for o in self.outputs)
        return ", ".join(f"{kind} {seen[kind]}" for kind in OUTPUT_KINDS)

    async def poll(self, seconds: float, alive: Sequence[Worker] = ()) -> None:
        """Keep reading for ``seconds``; fail at once if a worker in ``alive`` exits."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            _check_alive(alive)
            await self._read_once()

    async def wait_for(
        self,
        expect: int,
        *,
        timeout: float,  # noqa: ASYNC109 - a read deadline, not a cancel scope
        alive: Sequence[Worker] = (),
        what: str = "outputs",
    ) -> float:
        """Read until ``expect`` records arrived; returns the seconds it took.
        Fails with the progress and the workers' logs when the deadline passes
        or a worker in ``alive`` exits."""
        began = time.monotonic()
        while len(self.outputs) < expect:
            _check_alive(alive)
            if time.monotonic() - began > timeout:
                raise AssertionError(
                    f"{what}: only {len(self.outputs)} of {expect} output records within "
                    f"{timeout:.0f} s ({self.progress()})\n{describe_workers(alive)}"
                )
            await self._read_once()
        return time.monotonic() - began


def _check_alive(workers: Sequence[Worker]) -> None:
    dead = [w for w in workers if not w.running]
    if dead:
        raise AssertionError(f"a worker exited unexpectedly\n{describe_workers(dead)}")


# --------------------------------------------------------------------------- checking


def _first(items: Iterable[Any], n: int = 8) -> str:
    listed = list(items)
    head = ", ".join(repr(i) for i in listed[:n])
    return f"{head}{', ...' if len(listed) > n else ''}"


def exactly_once_problems(
    outputs: Sequence[Output],
    expected: Expected,
    topics: TopicNames,
    commands_topic: str,
    *,
    repeats_allowed: bool = False,
) -> list[str]:
    """Every way ``outputs`` differ from exactly-once delivery of ``expected``.

    With ``repeats_allowed`` (at_least_once), an output or rejection may
    appear more than once, each time with the expected values; nothing may be
    missing, unexpected or wrong."""
    kind_of = {getattr(topics, kind): kind for kind in OUTPUT_KINDS}
    seen: Counter[OutputId] = Counter()
    values: dict[OutputId, list[OutputValues]] = defaultdict(list)
    rejected: Counter[RejectionId] = Counter()
    reasons: dict[RejectionId, str] = {}
    foreign_rejections: list[Any] = []
    per_kind: Counter[str] = Counter()
    for out in outputs:
        kind = kind_of[out.topic]
        per_kind[kind] += 1
        doc = out.doc()
        if kind == "rejected":
            source = doc.get("source") or {}
            if source.get("topic") != commands_topic:
                foreign_rejections.append(source)
                continue
            rid = (int(source["partition"]), int(source["offset"]))
            rejected[rid] += 1
            reasons[rid] = str(doc.get("reason"))
            continue
        identity, vals = output_identity(kind, doc)
        seen[identity] += 1
        values[identity].append(vals)

    problems: list[str] = []
    if not repeats_allowed and dict(per_kind) != {k: v for k, v in expected.per_kind.items() if v}:
        problems.append(
            f"records per output topic: got {dict(sorted(per_kind.items()))}, "
            f"expected {dict(sorted(expected.per_kind.items()))}"
        )
    duplicated = {i: n for i, n in seen.items() if n > 1}
    missing = [i for i in expected.outputs if i not in seen]
    unexpected = [i for i in seen if i not in expected.outputs]
    wrong = {
        i: (v[0], expected.outputs[i])
        for i, v in values.items()
        if i in expected.outputs and any(x != expected.outputs[i] for x in v)
    }
    if duplicated and not repeats_allowed:
        problems.append(f"{len(duplicated)} outputs more than once: {_first(duplicated.items())}")
    if missing:
        problems.append(f"{len(missing)} outputs missing: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected outputs: {_first(unexpected)}")
    if wrong:
        problems.append(
            f"{len(wrong)} outputs with other state/totals than the domain core computes "
            f"(got, expected): {_first(wrong.items())}"
        )
    dup_rejections = {i: n for i, n in rejected.items() if n > 1}
    missing_rejections = [i for i in expected.rejections if i not in rejected]
    unexpected_rejections = [i for i in rejected if i not in expected.rejections]
    wrong_reasons = {
        i: (r, expected.rejections[i])
        for i, r in reasons.items()
        if i in expected.rejections and r != expected.rejections[i]
    }
    if dup_rejections and not repeats_allowed:
        problems.append(
            f"{len(dup_rejections)} records rejected more than once: "
            f"{_first(dup_rejections.items())}"
        )
    if missing_rejections:
        problems.append(
            f"{len(missing_rejections)} rejections missing (partition, offset): "
            f"{_first(missing_rejections)}"
        )
    if unexpected_rejections:
        problems.append(
            f"{len(unexpected_rejections)} unexpected rejections: {_first(unexpected_rejections)}"
        )
    if wrong_reasons:
        problems.append(f"rejections with another reason: {_first(wrong_reasons.items())}")
    if foreign_rejections:
        problems.append(
            f"{len(foreign_rejections)} rejections naming another source topic: "
            f"{_first(foreign_rejections)}"
        )
    return problems
