"""Fixtures shared by every test. The broker is started only when a test asks for it,
so the domain tests run without Java."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tools.kafka_broker import KafkaCluster


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real Kafka broker: ``KAFKA_BOOTSTRAP_SERVERS`` when set,
    otherwise the project's own KRaft broker, started once per session."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    with KafkaCluster(tmp_path_factory.mktemp("kafka")) as cluster:
        yield cluster.bootstrap_servers


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
