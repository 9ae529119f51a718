"""Drive real workers against the real broker: start/stop worker processes,
produce commands, read what comes out (read_committed, like a downstream
analytics consumer)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import for_code
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.structs import TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from stream_app import json
from stream_app.pipeline.kafka import wait_for_partitions
from stream_app.settings import Settings, TopicNames
from tests.pipeline.record_batches import BatchRecord, encode_batch
from tools.kafka_broker import tied_to_this_process

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Deployment:
    """One isolated deployment: its own topics, app id and state directory."""

    bootstrap: str
    name: str
    data_dir: Path
    partitions: int = 3
    guarantee: str = "exactly_once"
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def topics(self) -> TopicNames:
        n = self.name
        return TopicNames(
            commands=f"{n}.commands",
            closed=f"{n}.closed",
            returned=f"{n}.returned",
            cancelled=f"{n}.cancelled",
            reopened=f"{n}.reopened",
            rejected=f"{n}.rejected",
            application_settings=f"{n}.application-settings",
        )

    def env(self, app_id: str | None = None, data_dir: Path | None = None) -> dict[str, str]:
        t = self.topics
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("STREAM_APP_") and k != "KAFKA_BOOTSTRAP_SERVERS"
        }
        env.update(
            {
                "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "STREAM_APP_APP_ID": app_id or f"{self.name}-app",
                "STREAM_APP_DATA_DIR": str(data_dir or self.data_dir),
                "STREAM_APP_PARTITIONS": str(self.partitions),
                "STREAM_APP_PROCESSING_GUARANTEE": self.guarantee,
                "STREAM_APP_LOG_LEVEL": "INFO",
                "STREAM_APP_SESSION_TIMEOUT_S": "8",
                "STREAM_APP_HTTP_PORT": "0",  # several workers on one machine
                "STREAM_APP_ADVERTISED_HOST": "127.0.0.1",
                "STREAM_APP_TOPICS__COMMANDS": t.commands,
                "STREAM_APP_TOPICS__CLOSED": t.closed,
                "STREAM_APP_TOPICS__RETURNED": t.returned,
                "STREAM_APP_TOPICS__CANCELLED": t.cancelled,
                "STREAM_APP_TOPICS__REOPENED": t.reopened,
                "STREAM_APP_TOPICS__REJECTED": t.rejected,
                "STREAM_APP_TOPICS__APPLICATION_SETTINGS": t.application_settings,
            }
        )
        env.update(self.extra_env)
        return env

    def settings(self, app_id: str | None = None) -> Settings:
        return Settings(
            bootstrap_servers=self.bootstrap,
            app_id=app_id or f"{self.name}-app",
            topics=self.topics,
            partitions=self.partitions,
        )

    def output_topics(self) -> list[str]:
        t = self.topics
        return [t.closed, t.returned, t.cancelled, t.reopened, t.rejected]


class Worker:
    """A ``stream-app worker`` process."""

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: Path,
        cwd: Path | None = None,
        python: Path | None = None,
    ) -> None:
        """``cwd`` is the worker's working directory (default: the repository root);
        relative settings such as the default data dir resolve against it. The
        package is installed (editable) in the virtualenv, so any directory works.
        ``python`` runs another checkout's worker (the benchmark compares two)."""
        self.log_path = log_path
        self.cwd = cwd or ROOT
        #: The exit status the ``workers`` fixture holds this worker to at teardown
        #: (see :meth:`expect_exit`); none once the test killed it on purpose.
        self.expected_exit: int | None = 0
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            # Killed with the test run, however it ends: no worker left behind.
            tied_to_this_process([str(python or sys.executable), "-m", "stream_app", "worker"]),
            env=dict(env),
            cwd=self.cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, on purpose: its exit status says nothing about the worker."""
        self.expected_exit = None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def expect_exit(self, code: int) -> None:
        """Say that this worker is meant to exit with ``code`` (say 2, for a
        configuration it refuses), rather than 0: the ``workers`` fixture fails
        the test at teardown on any other status, so that a worker that crashed
        or failed its stop cannot pass unnoticed in a test that did not look."""
        self.expected_exit = code

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def http_url(self, timeout: float = 60.0) -> str:
        """The worker's HTTP address, from its start-up log line (it may pick a free port)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            url = logged_http_url(self.log_path)
            if url is not None:
                return url
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the worker never served HTTP:\n{self.log_tail()}")

    def close_log(self) -> None:
        """Close our handle on the log file (the process keeps its own)."""
        self._log.close()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the worker's whole process group (e.g. SIGSTOP/SIGCONT;
        SIGKILL counts as :meth:`kill`)."""
        if sig == signal.SIGKILL:
            self.expected_exit = None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)


async def create_topics(
    bootstrap: str, names: Iterable[str], partitions: int, configs: dict[str, str] | None = None
) -> None:
    """Create those of ``names`` that do not exist, as an operator would (with the
    broker's default configs unless ``configs`` are given)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(n, partitions, 1, topic_configs=configs or {})
            for n in names
            if n not in existing
        ]
        if new:
            await admin.create_topics(new)
    finally:
        await admin.close()


Record = tuple[bytes | None, bytes | None]


async def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[Record],
    *,
    partition: int | None = None,
    timestamp_ms: int | None = None,
    compression: str | None = None,
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, acks="all", compression_type=compression
    )
    await producer.start()
    try:
        futures = [
            await producer.send(
                topic, value=v, key=k, partition=partition, timestamp_ms=timestamp_ms
            )
            for k, v in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def command(kind: str, integration_id: str, **fields: Any) -> bytes:
    return json.dumps({"type": kind, "integrationId": integration_id, **fields})


@dataclass(frozen=True)
class Output:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes

    def doc(self) -> Any:
        return json.loads(self.value)


async def consume(
    bootstrap: str,
    topics: list[str],
    *,
    expect: int,
    timeout: float = 60.0,  # noqa: ASYNC109 - a read deadline, not a cancel scope
    settle: float = 0.0,
) -> list[Output]:
    """Read every topic from the beginning (read_committed) until ``expect``
    records arrived, then keep reading ``settle`` seconds to catch extras."""
    settle_until: float | None = None

    def done(out: list[Output]) -> bool:
        nonlocal settle_until
        if len(out) >= expect and settle_until is None:
            settle_until = time.monotonic() + settle
        return settle_until is not None and time.monotonic() >= settle_until

    return await consume_until(bootstrap, topics, done, timeout=timeout)


async def topic_configs(bootstrap: str, names: list[str]) -> dict[str, dict[str, str]]:
    """The effective configuration of each topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
        )
    finally:
        await admin.close()
    return {
        resource[3]: {entry[0]: entry[1] for entry in resource[4]}
        for response in described
        for resource in response.resources
    }


async def partition_offsets(
    bootstrap: str, group: str, topics: list[str]
) -> dict[TopicPartition, tuple[int, int | None, int]]:
    """(first offset, the group's committed offset, end offset) of each partition."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await consumer.start()
    await admin.start()
    try:
        partitions = [
            TopicPartition(entry["topic"], p["partition"])
            for entry in await admin.describe_topics(topics)
            for p in entry["partitions"]
        ]
        assert {tp.topic for tp in partitions} == set(topics)
        first = await consumer.beginning_offsets(partitions)
        end = await consumer.end_offsets(partitions)
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
        await consumer.stop()
    return {
        tp: (first[tp], committed[tp].offset if tp in committed else None, end[tp])
        for tp in partitions
    }


async def purged_offsets(
    bootstrap: str,
    group: str,
    topics: list[str],
    timeout: float,  # noqa: ASYNC109 - a deadline for the purge, not a cancel scope
) -> dict[TopicPartition, tuple[int, int | None, int]]:
    """:func:`partition_offsets` once every partition the group committed an
    offset of begins there (the worker purged it), or when ``timeout`` is up."""
    deadline = time.monotonic() + timeout
    while True:
        offsets = await partition_offsets(bootstrap, group, topics)
        purged = all(first == (committed or 0) for first, committed, _ in offsets.values())
        if purged or time.monotonic() > deadline:
            return offsets
        await asyncio.sleep(0.5)


def deployment_settings(d: Deployment, app_id: str | None = None) -> Settings:
    """The deployment's settings as its workers read them. (``Deployment.settings``
    alone keeps the default brokers: ``bootstrap_servers`` is only set through its
    environment alias, ``KAFKA_BOOTSTRAP_SERVERS``.)"""
    return d.settings(app_id).model_copy(update={"bootstrap_servers": d.bootstrap})


async def produce_raw_batch(
    bootstrap: str,
    topic: str,
    partition: int,
    records: Sequence[BatchRecord],
    *,
    timestamp_ms: int | None = None,
    compression: int = 0,
    edit: Callable[[bytes], bytes] | None = None,
    offset_deltas: Sequence[int] | None = None,
) -> int:
    """Write ``records`` as one v2 record batch, bytes exactly as given (header
    names need not be UTF-8, which no client producer allows), and return the
    offset of its first record. ``timestamp_ms`` is the batch's first timestamp
    (default: now); ``compression`` 0 (none) or 1 (gzip); ``edit`` changes the
    encoded batch before it is sent, and ``offset_deltas`` gives the records
    other offsets than their places (batches no client writes)."""
    first_timestamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    batch = encode_batch(
        records,
        first_timestamp=first_timestamp,
        compression=compression,
        offset_deltas=offset_deltas,
    )
    if edit is not None:
        batch = edit(batch)
    tp = TopicPartition(topic, partition)
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        deadline = time.monotonic() + 30
        await client.add_topic(topic)
        leader = client.cluster.leader_for_partition(tp)
        while leader is None or leader < 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader for {topic}[{partition}]")
            await asyncio.sleep(0.2)
            await client.force_metadata_update()
            leader = client.cluster.leader_for_partition(tp)
        request = ProduceRequest(None, -1, 30_000, [(topic, [(partition, batch)])])
        response = await client.send(leader, request)
        ((_, partitions),) = response.topics
        _, error_code, base_offset, *_ = partitions[0]
        if error_code:
            raise for_code(error_code)(f"produce to {topic}[{partition}]")
        return int(base_offset)
    finally:
        await client.close()


@dataclass(frozen=True)
class ToSend:
    """One record to produce with a client producer, exactly as given: key and
    value may be None (no key, a tombstone) or empty; ``partition`` None lets
    the client's default partitioner pick."""

    key: bytes | None
    value: bytes | None
    partition: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class Sent:
    """Where a produced record landed, and its key and value as sent."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @property
    def position(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)


async def produce_tracked(
    bootstrap: str,
    topic: str,
    records: Iterable[ToSend],
    *,
    max_request_size: int = 2 * 1024 * 1024,
) -> list[Sent]:
    """Produce ``records`` in order (with headers, explicit partitions, up to
    ``max_request_size`` bytes) and return where each landed."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, acks="all", max_request_size=max_request_size
    )
    await producer.start()
    try:
        todo = list(records)
        futures = [
            await producer.send(
                topic,
                value=r.value,
                key=r.key,
                partition=r.partition,
                headers=list(r.headers) or None,
            )
            for r in todo
        ]
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [
        Sent(topic, m.partition, m.offset, r.key, r.value)
        for r, m in zip(todo, metadata, strict=True)
    ]


async def consume_until(
    bootstrap: str,
    topics: list[str],
    done: Callable[[list[Output]], bool],
    *,
    timeout: float = 60.0,  # noqa: ASYNC109 - a read deadline, not a cancel scope
) -> list[Output]:
    """Read every topic from the beginning (read_committed) until ``done`` holds
    for what was read so far (checked after every poll), or ``timeout`` passed;
    return what was read either way (the caller asserts)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    out: list[Output] = []
    try:
        deadline = time.monotonic() + timeout
        tps = await wait_for_partitions({"bootstrap_servers": bootstrap}, topics, deadline)
        if tps is None:
            raise TimeoutError(f"topics {topics} were never created")
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for tp, records in batches.items():
                out.extend(
                    Output(tp.topic, tp.partition, r.offset, r.key, r.value or b"") for r in records
                )
            if done(out):
                break
    finally:
        await consumer.stop()
    return out


def logged_http_url(log_path: Path) -> str | None:
    """A worker's HTTP address, from the start-up line in its log; None before it."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "serving /livez /readyz /metrics on " in line:
            port = line.rsplit(":", 1)[1].strip()
            return f"http://127.0.0.1:{port}"
    return None


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a worker's /metrics, by (name, sorted labels), parsed by
    prometheus_client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
