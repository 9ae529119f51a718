"""The broker script's cache and probes (the broker itself runs in tests/integration)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tools import kafka_broker


def test_a_cached_broker_is_not_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = kafka_broker.jar_dir(tmp_path)
    lib.mkdir(parents=True)
    (lib / ".complete").touch()

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("fetch ran a download although the jars are cached")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert kafka_broker.fetch(tmp_path) == lib


def test_cluster_ids_are_never_read_as_options() -> None:
    ids = {kafka_broker._kafka_uuid() for _ in range(2000)}
    assert len(ids) == 2000
    assert not any(i.startswith("-") for i in ids)


def test_metadata_probe_fails_cleanly_when_nothing_listens() -> None:
    port = kafka_broker.free_port()
    with pytest.raises(ConnectionRefusedError):
        kafka_broker.metadata_brokers("127.0.0.1", port, timeout=0.5)


def test_three_node_cluster_configuration_replicates_internal_topics(tmp_path: Path) -> None:
    cluster = kafka_broker.KafkaCluster(tmp_path, nodes=3)
    node = kafka_broker.Node(2, 9001, 9002, tmp_path / "node-2")
    props = cluster._properties(node, "1@127.0.0.1:1,2@127.0.0.1:2,3@127.0.0.1:3")
    assert "node.id=2" in props
    assert "transaction.state.log.replication.factor=3" in props
    assert "transaction.state.log.min.isr=2" in props
    assert "auto.create.topics.enable=false" in props


def _fake_java(tmp_path: Path, version: str) -> Path:
    home = tmp_path / f"jdk-{version}"
    (home / "bin").mkdir(parents=True)
    java = home / "bin" / "java"
    java.write_text(f"#!/bin/sh\necho '    java.specification.version = {version}' >&2\n")
    java.chmod(0o755)
    return home


@pytest.mark.parametrize("version", ["11", "1.8"])
def test_a_java_older_than_17_is_named_before_kafka_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, version: str
) -> None:
    """Kafka's jars need Java 17; an older java failed the storage format with
    its output thrown away: a bare CalledProcessError, which the demo retried
    as a bad cluster id."""
    monkeypatch.setenv("JAVA_HOME", str(_fake_java(tmp_path, version)))
    with pytest.raises(RuntimeError, match=f"Java 17\\+ is needed .* is Java {version} "):
        kafka_broker.java_command()


def test_java_home_is_preferred_to_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _fake_java(tmp_path, "21")
    monkeypatch.setenv("JAVA_HOME", str(home))
    assert kafka_broker.java_command() == str(home / "bin" / "java")


def test_a_port_taken_before_kafka_binds_it_starts_the_broker_on_other_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process takes the port free_port found free, before the JVM binds it.
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picked = [taken.getsockname()[1]]
    real_free_port = kafka_broker.free_port

    def racing_free_port() -> int:
        return picked.pop() if picked else real_free_port()

    monkeypatch.setattr(kafka_broker, "free_port", racing_free_port)
    with taken, kafka_broker.KafkaCluster(tmp_path / "broker") as cluster:
        port = cluster.members[0].port
        assert port != taken.getsockname()[1]
        assert kafka_broker.metadata_brokers("127.0.0.1", port) == 1
