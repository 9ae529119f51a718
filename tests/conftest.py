"""Fixtures shared by every test. The broker is started only when a test asks for it,
so the domain tests run without Java."""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest

from tools.kafka_broker import KafkaCluster

#: The broker the integration tests use instead of starting their own, when set.
#: A variable of the tests' own, read once here, before :func:`_no_deployment_environment`
#: removes it with the other ``STREAM_APP_*``: a ``KAFKA_BOOTSTRAP_SERVERS`` exported
#: for the application (a shell that just ran the demo) no longer points the tests
#: at some other cluster.
EXTERNAL_BOOTSTRAP_SERVERS: Final = os.environ.get("STREAM_APP_TEST_BOOTSTRAP_SERVERS", "")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-integration",
        action="store_true",
        help="fail unless tests against the real broker are among those run (make test)",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    """With ``--require-integration`` (the suite's own command), a run with no
    integration test left fails: with tests/integration missing, or its
    conftest no longer marking them, the broker-free tests alone passed."""
    if not session.config.getoption("--require-integration"):
        return
    if not any(item.get_closest_marker("integration") for item in session.items):
        pytest.exit(
            "--require-integration: no test against the real broker was collected "
            "(tests/integration missing, or deselected)",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


@pytest.fixture(autouse=True)
def _no_deployment_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the shell's ``STREAM_APP_*`` (in any case) or ``KAFKA_*``: they
    would change ``Settings()`` (and what a subprocess inherits), or be refused
    by it (another client's ``KAFKA_SECURITY_PROTOCOL``), so that a result
    depended on where pytest was started. A test that wants one sets it itself."""
    for name in list(os.environ):
        if name.upper().startswith(("STREAM_APP_", "KAFKA_")):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """The root logger as it was before each test: the CLI's in-process runs
    configure it (a handler on that test's stderr, INFO), and a later test's
    logging then depended on the order the tests ran in."""
    root = logging.getLogger()
    client = logging.getLogger("aiokafka")
    saved = (root.handlers[:], root.level, client.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    client.setLevel(saved[2])
    logging.captureWarnings(False)  # configure_logging routes warnings to it


@pytest.fixture(scope="session")
def own_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster | None]:
    """The project's own KRaft broker, started once per session; None when
    ``STREAM_APP_TEST_BOOTSTRAP_SERVERS`` names another."""
    if EXTERNAL_BOOTSTRAP_SERVERS:
        yield None
        return
    with KafkaCluster(tmp_path_factory.mktemp("kafka")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def kafka_bootstrap(own_kafka: KafkaCluster | None) -> str:
    """Bootstrap servers of a real Kafka broker: ``STREAM_APP_TEST_BOOTSTRAP_SERVERS``
    when set, otherwise the project's own KRaft broker."""
    return EXTERNAL_BOOTSTRAP_SERVERS if own_kafka is None else own_kafka.bootstrap_servers


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Topic/group/app names unique to this test, so tests never see each other's data."""
    token = uuid.uuid4().hex[:8]
    test = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60].strip("-")

    def make(prefix: str) -> str:
        return f"{prefix}.{test}.{token}"

    return make


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path
