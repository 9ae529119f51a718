"""The worker over SASL_SSL with SCRAM-SHA-512, as a Strimzi KafkaUser gives it,
against a real broker with a TLS listener of its own CA; and the refusals a
retry cannot mend (a wrong password, no CA, TLS spoken to by a plaintext
client) each stop the worker at once with one error saying which.

The module starts its own secure broker (``tools/kafka_broker.py --secure``),
whatever ``KAFKA_BOOTSTRAP_SERVERS`` says: the test's own clients use its
PLAINTEXT listener, the worker only the SASL_SSL one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stream_app.demo.traffic import generate_traffic
from tests.integration.harness import Deployment, Worker, create_topics
from tests.integration.workload import (
    OutputReader,
    describe_workers,
    exactly_once_problems,
    expected_outcome,
    produce_traffic_records,
)
from tools.kafka_broker import SCRAM_PASSWORD, SCRAM_USER, KafkaCluster

StartWorker = Callable[..., Worker]


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    with KafkaCluster(tmp_path_factory.mktemp("secure-kafka"), secure=True) as cluster:
        yield cluster


def _secure_env(d: Deployment, cluster: KafkaCluster, **security: str) -> dict[str, str]:
    """The deployment's environment, the worker pointed at the SASL_SSL listener."""
    env = d.env()
    env["KAFKA_BOOTSTRAP_SERVERS"] = cluster.secure_bootstrap_servers
    env.update(
        {
            "STREAM_APP_SECURITY__PROTOCOL": "SASL_SSL",
            "STREAM_APP_SECURITY__SASL_MECHANISM": "SCRAM-SHA-512",
            "STREAM_APP_SECURITY__SASL_USERNAME": SCRAM_USER,
            "STREAM_APP_SECURITY__SASL_PASSWORD": SCRAM_PASSWORD,
            "STREAM_APP_SECURITY__SSL_CAFILE": str(cluster.ca_file),
        }
    )
    for name, value in security.items():
        variable = f"STREAM_APP_SECURITY__{name.upper()}"
        if value:
            env[variable] = value
        else:
            env.pop(variable, None)
    return env


async def _exit_within(worker: Worker, seconds: float) -> float | None:
    began = time.monotonic()
    while worker.proc.poll() is None:
        if time.monotonic() - began > seconds:
            return None
        await asyncio.sleep(0.05)
    return time.monotonic() - began


@pytest.mark.timeout(240)
async def test_a_worker_over_sasl_ssl_with_scram_processes_exactly_once(
    secure_cluster: KafkaCluster,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    workers: StartWorker,
) -> None:
    plain = secure_cluster.bootstrap_servers
    d = Deployment(plain, unique_name("sasl"), tmp_path / "state")
    await create_topics(plain, [d.topics.commands], d.partitions)
    traffic = generate_traffic(300, seed=5)
    positions = await produce_traffic_records(plain, d.topics.commands, traffic)
    expected = expected_outcome(traffic, positions)
    worker = workers(d, env=_secure_env(d, secure_cluster))
    async with OutputReader(plain, d.topics) as reader:
        await reader.wait_for(expected.total, timeout=150, alive=[worker])
        await reader.poll(2.0, alive=[worker])
    problems = exactly_once_problems(reader.outputs, expected, d.topics, d.topics.commands)
    assert not problems, "\n".join(problems) + "\n" + describe_workers([worker])
    assert worker.stop(timeout=30) == 0, worker.log_tail()
    log = worker.log_path.read_text(errors="replace")
    assert SCRAM_PASSWORD not in log


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("case", "security", "says"),
    [
        ("wrong password", {"sasl_password": "not the password"}, "SaslAuthenticationFailed"),
        ("no CA", {"ssl_cafile": ""}, "CERTIFICATE_VERIFY_FAILED"),
        (
            "plaintext client",
            {
                "protocol": "PLAINTEXT",
                "sasl_mechanism": "",
                "sasl_username": "",
                "sasl_password": "",
                "ssl_cafile": "",
            },
            "answered with TLS",
        ),
    ],
)
async def test_a_refusing_broker_stops_the_worker_with_one_error_saying_why(
    secure_cluster: KafkaCluster,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    workers: StartWorker,
    case: str,
    security: dict[str, str],
    says: str,
) -> None:
    """Before, the worker retried for ever, logging that Kafka was not reachable."""
    d = Deployment(secure_cluster.bootstrap_servers, unique_name("refused"), tmp_path / "state")
    worker = workers(d, env=_secure_env(d, secure_cluster, **security))
    exit_s = await _exit_within(worker, 60)
    assert exit_s is not None, f"{case}: the worker kept retrying\n" + describe_workers([worker])
    assert worker.proc.returncode == 2, describe_workers([worker])
    log = worker.log_path.read_text(errors="replace")
    errors = [line for line in log.splitlines() if "configuration error" in line]
    assert len(errors) == 1, log[-3000:]
    assert "refuses this worker" in errors[0], errors
    assert says in errors[0], errors
    assert "not reachable" not in log, log[-3000:]
    assert SCRAM_PASSWORD not in log
