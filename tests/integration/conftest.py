"""Integration fixtures: every test here runs against the real Kafka broker."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.integration.harness import Deployment, Worker, create_topics
from tools.kafka_broker import KafkaCluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def kafka_on_disk(
    own_kafka: KafkaCluster | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KafkaCluster]:
    """A broker whose log files a test can damage, as a disk does: the
    session's own, or, when the tests use another broker, one started for
    the test."""
    if own_kafka is not None:
        yield own_kafka
        return
    with KafkaCluster(tmp_path_factory.mktemp("kafka-on-disk")) as cluster:
        yield cluster


@pytest.fixture
def deployment(
    kafka_bootstrap: str, unique_name: Callable[[str], str], tmp_path: Path
) -> Deployment:
    d = Deployment(kafka_bootstrap, unique_name("it"), tmp_path / "state")
    asyncio.run(create_topics(kafka_bootstrap, [d.topics.commands], d.partitions))
    return d


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start workers; every one still running at teardown is stopped (or killed).

    Then each must have exited 0, or as the test said (``Worker.expect_exit``),
    unless the test killed it: a worker that crashed, or exited 1 on SIGTERM,
    fails the test even where the test itself did not look at its exit."""
    started: list[Worker] = []

    def start(
        d: Deployment,
        app_id: str | None = None,
        data_dir: Path | None = None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Worker:
        """``env`` replaces the deployment's environment entirely; ``cwd`` is the
        worker's working directory (default: the repository root)."""
        worker = Worker(
            d.env(app_id, data_dir) if env is None else env,
            tmp_path / f"worker-{len(started)}.log",
            cwd=cwd,
        )
        started.append(worker)
        return worker

    yield start
    wrong: list[str] = []
    for worker in started:
        if worker.proc.poll() is None:
            worker.signal_group(signal.SIGCONT)  # a test may have left it stopped
            worker.stop(timeout=30)  # SIGKILLed after that: not 0 either
        worker.close_log()  # also of the workers that exited by themselves
        rc = worker.proc.returncode
        if worker.expected_exit is not None and rc != worker.expected_exit:
            wrong.append(
                f"worker pid {worker.proc.pid} exited {rc}, not {worker.expected_exit}; "
                f"{worker.log_path}:\n{worker.log_tail(3000)}"
            )
    assert not wrong, "\n".join(wrong)
