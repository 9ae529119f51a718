"""The broker script's cache and probes (the broker itself runs in tests/integration)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tools import kafka_broker


def test_a_cached_broker_is_not_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = kafka_broker.jar_dir(tmp_path)
    lib.mkdir(parents=True)
    (lib / ".complete").write_text(kafka_broker._pom_digest())

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("fetch ran a download although the jars are cached")

    monkeypatch.setattr(subprocess, "run", no_download)
    assert kafka_broker.fetch(tmp_path) == lib


def test_a_damaged_cached_jar_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache marked complete was trusted for ever: a jar cut short (a proxy,
    a full disk) made every later broker fail to start, until someone found
    the cache to delete."""
    lib = kafka_broker.jar_dir(tmp_path)
    lib.mkdir(parents=True)
    jar = f"kafka_2.13-{kafka_broker.KAFKA_VERSION}.jar"
    (lib / jar).write_bytes(b"PK\x03\x04 cut short")
    (lib / ".complete").write_text(kafka_broker._pom_digest())

    commands = _maven_delivering(jar, monkeypatch)
    assert kafka_broker.fetch(tmp_path) == lib
    assert len(commands) == 1
    assert "--strict-checksums" in commands[0]
    assert "-U" in commands[0]  # a failure Maven cached in ~/.m2 is tried again
    zipfile.ZipFile(lib / jar).close()  # whole now
    assert (lib / ".complete").exists()
    assert sorted(p.name for p in lib.parent.iterdir()) == ["lib"]  # no partial left
    assert kafka_broker.fetch(tmp_path) == lib
    assert len(commands) == 1


def _maven_delivering(jar: str, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Maven stood in for by one that delivers ``jar``, whole; its commands."""
    commands: list[list[str]] = []

    def maven(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(cmd)
        [out] = [arg.split("=", 1)[1] for arg in cmd if arg.startswith("-DoutputDirectory=")]
        with zipfile.ZipFile(Path(out) / jar, "w") as whole:
            whole.writestr("kafka/Kafka.class", b"")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(subprocess, "run", maven)
    monkeypatch.setattr(kafka_broker.shutil, "which", lambda name: f"/bin/{name}")
    return commands


def test_jars_fetched_for_another_pom_are_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache was keyed by the Kafka version alone: a pom.xml raising a
    dependency (log4j, say) never reached a machine that had fetched before."""
    lib = kafka_broker.jar_dir(tmp_path)
    lib.mkdir(parents=True)
    jar = f"kafka_2.13-{kafka_broker.KAFKA_VERSION}.jar"
    with zipfile.ZipFile(lib / jar, "w") as whole:
        whole.writestr("kafka/Kafka.class", b"")
    (lib / ".complete").touch()  # as fetched before the pom's digest was kept
    commands = _maven_delivering(jar, monkeypatch)
    assert kafka_broker.fetch(tmp_path) == lib
    assert len(commands) == 1
    assert (lib / ".complete").read_text() == kafka_broker._pom_digest()


def test_a_maven_failure_is_said_in_a_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(subprocess, "run", failing)
    monkeypatch.setattr(kafka_broker.shutil, "which", lambda name: f"/bin/{name}")
    with pytest.raises(
        SystemExit, match=r"Maven could not fetch .* \(exit 1; its errors are above\)"
    ):
        kafka_broker.fetch(tmp_path)
    assert sorted(p.name for p in kafka_broker.jar_dir(tmp_path).parent.iterdir()) == []


def test_a_start_that_fails_on_a_later_node_leaves_no_node_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node 1's JVM ran on when node 2's storage format failed (a full disk,
    a Ctrl-C): with no state file, `stop --workdir` could not find it, and
    the next start deleted its data under it."""
    started: list[subprocess.Popen[bytes]] = []
    real_popen = subprocess.Popen

    def node(command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = real_popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)
        started.append(proc)
        return proc

    def storage_format(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        code = 1 if started else 0  # the second node's format fails
        return subprocess.CompletedProcess(command, code, stdout="", stderr="No space left")

    monkeypatch.setattr(kafka_broker, "fetch", lambda *args: tmp_path / "lib")
    monkeypatch.setattr(kafka_broker, "java_command", lambda: "java")
    monkeypatch.setattr(subprocess, "run", storage_format)
    monkeypatch.setattr(subprocess, "Popen", node)
    cluster = kafka_broker.KafkaCluster(tmp_path / "cluster", nodes=2, tied=False)
    with pytest.raises(RuntimeError, match="No space left"):
        cluster.start()
    assert len(started) == 1
    assert started[0].poll() is not None  # stopped
    assert not (tmp_path / "cluster" / kafka_broker.STATE_FILE).exists()


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
    # Under a path Latin-1 cannot spell: Kafka read its properties as Latin-1,
    # and kept its data in another, garbled directory.
    workdir = tmp_path / "Größe Документы"
    with taken, kafka_broker.KafkaCluster(workdir) as cluster:
        port = cluster.members[0].port
        assert port != taken.getsockname()[1]
        assert kafka_broker.metadata_brokers("127.0.0.1", port) == 1
        assert (workdir / "node-1" / "log" / "meta.properties").exists()
        assert [p.name for p in tmp_path.iterdir()] == [workdir.name]
        # Found as this workdir's node; a second start there is refused.
        assert kafka_broker.running_nodes(workdir) == [cluster.members[0].pid]
        assert kafka_broker.main(["start", "--workdir", str(workdir)]) == 1


def test_a_stale_state_file_stops_no_process_that_is_not_its_node(tmp_path: Path) -> None:
    """A state file left by a run killed outright names pids that may since be
    another process's: stop signalled it, and failed on another user's."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / kafka_broker.STATE_FILE).write_text(
            json.dumps({"bootstrap_servers": "127.0.0.1:1", "pids": [other.pid, 1]})
        )
        assert kafka_broker.running_nodes(tmp_path) == []
        kafka_broker.stop_from_state(tmp_path, grace=0.5)
        assert other.poll() is None
        assert not (tmp_path / kafka_broker.STATE_FILE).exists()
    finally:
        other.kill()
        other.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_tied_process_dies_with_its_starter_even_on_sigkill(tmp_path: Path) -> None:
    """Test brokers outlived a SIGKILLed pytest (or demo, or bench) and held
    half a GiB each until someone found them. The starter here is a Python
    process that starts a tied ``sleep`` the way ``KafkaCluster`` starts a
    JVM, then is killed with SIGKILL."""
    pid_file = tmp_path / "child.pid"
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "from tools.kafka_broker import tied_to_this_process\n"
            "child = subprocess.Popen(tied_to_this_process(['sleep', '120']),"
            " start_new_session=True)\n"
            f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(120)\n",
        ],
        cwd=Path(__file__).resolve().parent.parent,
    )
    child = 0
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the starter never started its child"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        # Once the wrapper has become `sleep`, the tie is in place.
        while Path(f"/proc/{child}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "the child never became its command"
            time.sleep(0.05)
        os.kill(starter.pid, signal.SIGKILL)
        starter.wait()
        while _alive(child):
            assert time.monotonic() < deadline, "the tied child outlived its killed starter"
            time.sleep(0.05)
    finally:
        starter.kill()
        starter.wait()
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_the_cli_start_leaves_its_broker_untied(monkeypatch: pytest.MonkeyPatch) -> None:
    """``start`` returns and leaves the broker running for ``stop``."""
    made: list[kafka_broker.KafkaCluster] = []

    def fake_start(self: kafka_broker.KafkaCluster) -> kafka_broker.KafkaCluster:
        made.append(self)
        return self

    monkeypatch.setattr(kafka_broker.KafkaCluster, "start", fake_start)
    assert kafka_broker.main(["start", "--workdir", "/nonexistent"]) == 0
    assert [c.tied for c in made] == [False]
    assert kafka_broker.KafkaCluster(Path("x")).tied


def test_the_secure_broker_s_keys_are_made_with_java_home_s_keytool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: the commands use $JAVA_HOME/bin/java when JAVA_HOME is set.
    The secure broker's keys were made by the keytool on PATH: with Java
    only under JAVA_HOME, `make test`'s secure broker failed to start."""
    # Java's own home, not the one its command's path suggests: a jenv, asdf or
    # mise shim resolves to a directory with no bin/java.
    settings = subprocess.run(
        [kafka_broker.java_command(), "-XshowSettings:properties", "-version"],
        capture_output=True,
        text=True,
        check=True,
    )
    [home] = [
        line.split("=", 1)[1].strip()
        for line in settings.stderr.splitlines()
        if line.strip().startswith("java.home =")
    ]
    monkeypatch.setenv("JAVA_HOME", home)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    kafka_broker._tls_material(tmp_path)
    assert (tmp_path / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
    assert (tmp_path / "broker.p12").stat().st_size > 0
