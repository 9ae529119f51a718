"""No Docker engine runs here, so the compose file is checked against the code it mirrors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_app.settings import Settings
from tools.kafka_broker import KAFKA_VERSION, POM

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def test_services_are_broker_worker_and_producer(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"kafka", "worker", "demo-producer"}
    for name in ("worker", "demo-producer"):
        assert compose["services"][name]["build"] == "."
    assert (ROOT / "Dockerfile").is_file()


def test_broker_image_is_the_version_the_project_runs(compose: dict[str, Any]) -> None:
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"
    pom_version = re.search(r"<kafka.version>([^<]+)</kafka.version>", POM.read_text())
    assert pom_version is not None
    assert pom_version.group(1) == KAFKA_VERSION


def test_broker_is_single_node_kraft_like_the_local_one(compose: dict[str, Any]) -> None:
    env = compose["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert "9092:9092" in compose["services"]["kafka"]["ports"]


def test_clients_reach_the_broker_through_its_advertised_listener(
    compose: dict[str, Any],
) -> None:
    advertised = compose["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    internal = re.search(r"PLAINTEXT://([^,]+)", advertised)
    assert internal is not None
    for name in ("worker", "demo-producer"):
        env = compose["services"][name]["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == internal.group(1)


def test_service_environment_is_understood_by_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("worker", "demo-producer"):
        env = compose["services"][name]["environment"]
        for key in env:
            assert key == "KAFKA_BOOTSTRAP_SERVERS" or key.startswith("STREAM_APP_")
            monkeypatch.setenv(key, str(env[key]))
        settings = Settings.from_env()
        assert settings.bootstrap_servers == env["KAFKA_BOOTSTRAP_SERVERS"]
        assert settings.app_id == env["STREAM_APP_APP_ID"]
        if "STREAM_APP_PROCESSING_GUARANTEE" in env:
            assert settings.processing_guarantee == env["STREAM_APP_PROCESSING_GUARANTEE"]
        if "STREAM_APP_DATA_DIR" in env:
            assert str(settings.data_dir) == env["STREAM_APP_DATA_DIR"]
        for key in env:
            monkeypatch.delenv(key)
