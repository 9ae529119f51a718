"""Configuration mistakes, as a user makes them: `stream-app` in a fresh process.

Each mistake is one clear line on stderr and exit status 2, with no
traceback, before any broker is contacted (the bootstrap servers point at a
closed port, so a broker call would only show up as retries)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from asyncio import Event
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka.errors import KafkaError

if TYPE_CHECKING:
    from stream_app.pipeline.topics import TopicLayout

CLOSED_PORT = "127.0.0.1:1"


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 30) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_APP_")}
    base["KAFKA_BOOTSTRAP_SERVERS"] = CLOSED_PORT
    done = subprocess.run(
        [sys.executable, "-m", "stream_app", *args],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, done.stderr + done.stdout


@contextlib.contextmanager
def silent_broker() -> Iterator[str]:
    """The address of a listener that accepts connections and answers nothing
    (a broker stuck, a proxy without its backend)."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        yield f"127.0.0.1:{silent.getsockname()[1]}"
    finally:
        silent.close()


def test_a_configuration_mistake_is_a_json_line_when_json_logs_are_asked(tmp_path: Path) -> None:
    """A worker asked for JSON logs printed a configuration mistake at start
    as plain text, which a log pipeline parsing JSON lines drops or flags;
    its later configuration errors were JSON lines already."""
    env = {"stream_app_log_format": "JSON", "STREAM_APP_PARTITIONS": "abc"}
    code, output = run(["worker"], env, tmp_path)
    assert code == 2, output
    doc = json.loads(one_line(output))
    assert doc["level"] == "ERROR"
    assert doc["logger"] == "stream_app.worker"
    assert doc["message"].startswith("configuration error: STREAM_APP_PARTITIONS=abc: Input")
    # What prints the settings, and a format that is itself the mistake, stay text.
    code, output = run(["config"], env, tmp_path)
    assert code == 2
    assert one_line(output).startswith("stream-app: configuration error: STREAM_APP_PARTITIONS")
    code, output = run(["worker"], {"STREAM_APP_LOG_FORMAT": "jsn"}, tmp_path)
    assert code == 2
    assert one_line(output).startswith("stream-app: configuration error: STREAM_APP_LOG_FORMAT")


def signalled(
    args: list[str], env: dict[str, str], cwd: Path, signum: int, *, after: float
) -> tuple[int, str]:
    """`stream-app ARGS` sent ``signum`` ``after`` seconds: its exit status and
    output (killed if it has not ended 30 s later)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_APP_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_app", *args],
        env={**base, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A shell runs a background job with SIGINT ignored, and Python then
        # keeps it so; nohup ignores SIGHUP: as a terminal finds the command,
        # whatever ran pytest.
        preexec_fn=_terminal_signals,
    )
    try:
        time.sleep(after)
        proc.send_signal(signum)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, output


def _terminal_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"STREAM_APP_TOPICS__COMMAND": "x"},
            "unknown setting STREAM_APP_TOPICS__COMMAND; did you mean STREAM_APP_TOPICS__COMMANDS?",
        ),
        ({"STREAM_APP_PARTITONS": "4"}, "did you mean STREAM_APP_PARTITIONS?"),
        ({"STREAM_APP_PARTITIONS": "abc"}, "STREAM_APP_PARTITIONS=abc: Input should be a valid"),
        ({"STREAM_APP_PARTITIONS": "0"}, "STREAM_APP_PARTITIONS=0: Input should be greater"),
        ({"STREAM_APP_LOG_LEVEL": "loud"}, "STREAM_APP_LOG_LEVEL=loud"),
        (
            {"STREAM_APP_SECURITY__PROTOCOL": "SASL_SSL"},
            "protocol SASL_SSL needs STREAM_APP_SECURITY__SASL_MECHANISM",
        ),
        (
            {"STREAM_APP_SECURITY__SASL_PASSWORD": "hunter2"},
            "SASL settings are given but the protocol is PLAINTEXT",
        ),
        (
            {
                "STREAM_APP_SECURITY__PROTOCOL": "ssl",
                "STREAM_APP_SECURITY__SSL_CAFILE": "/no/ca.crt",
            },
            "STREAM_APP_SECURITY__SSL_CAFILE: no such file: /no/ca.crt",
        ),
        (
            {"STREAM_APP_APPLICATION_SETTINGS_FILE": "/no/settings.json"},
            "STREAM_APP_APPLICATION_SETTINGS_FILE=/no/settings.json: no such file",
        ),
        # A file the process cannot look at (a name too long; as for a directory
        # it may not enter): Path.is_file raised, a traceback and exit 1.
        (
            {
                "STREAM_APP_SECURITY__PROTOCOL": "ssl",
                "STREAM_APP_SECURITY__SSL_CAFILE": f"/{'x' * 300}/ca.crt",
            },
            f"STREAM_APP_SECURITY__SSL_CAFILE: cannot read /{'x' * 300}/ca.crt: File name too long",
        ),
        (
            {"STREAM_APP_APPLICATION_SETTINGS_FILE": f"/{'x' * 300}/s.json"},
            f"cannot read /{'x' * 300}/s.json: File name too long",
        ),
        # A whole nested setting that is not JSON: a traceback and exit 1 before.
        ({"STREAM_APP_TOPICS": "x"}, "STREAM_APP_TOPICS=x: not a JSON object; or set"),
        ({"STREAM_APP_ROCKSDB": "{bad"}, "STREAM_APP_ROCKSDB={bad: not a JSON object"),
        # Not shown: the test checks that "hunter2" appears nowhere.
        ({"STREAM_APP_SECURITY": '{"sasl_password": "hunter2"'}, "STREAM_APP_SECURITY: not a"),
        ({"STREAM_APP_SECURITY": '"hunter2"'}, "STREAM_APP_SECURITY: Input should be a valid"),
        # Accepted before, then: every stop unclean (no time left to leave the
        # group), OverflowError at the join, the stop's watchdog not started,
        # no purge ever, a join the broker refuses.
        ({"STREAM_APP_SHUTDOWN_TIMEOUT_S": "1"}, "STREAM_APP_SHUTDOWN_TIMEOUT_S=1: Input should"),
        ({"STREAM_APP_SESSION_TIMEOUT_S": "inf"}, "=inf: Input should be a finite number"),
        ({"STREAM_APP_SHUTDOWN_TIMEOUT_S": "inf"}, "=inf: Input should be a finite number"),
        ({"STREAM_APP_PURGE_INTERVAL_S": "inf"}, "=inf: Input should be a finite number"),
        ({"STREAM_APP_SESSION_TIMEOUT_S": "3600"}, "=3600: Input should be less than or equal"),
        # The broker refuses such a group.instance.id at the join ("" is unset).
        ({"STREAM_APP_GROUP_INSTANCE_ID": "pod/0"}, "=pod/0: 'pod/0' is not a group instance"),
        # Found only once Kafka answered, with exit 1; never during an outage.
        ({"STREAM_APP_HTTP_HOST": "192.0.2.1"}, "=192.0.2.1: cannot serve on this address"),
        # Likewise: a static member's port must survive a restart (worker.serve).
        (
            {"STREAM_APP_GROUP_INSTANCE_ID": "w-b", "STREAM_APP_HTTP_PORT": "0"},
            "STREAM_APP_HTTP_PORT is 0 (any free port): with STREAM_APP_GROUP_INSTANCE_ID set",
        ),
        # aiokafka read these only as its first client started: a traceback, exit 1.
        (
            {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:abc"},
            "KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:abc: expected host:port, comma-separated: "
            "'127.0.0.1:abc' has no port in 1..65535",
        ),
        ({"KAFKA_BOOTSTRAP_SERVERS": ""}, "KAFKA_BOOTSTRAP_SERVERS=: expected host:port"),
        ({"KAFKA_BOOTSTRAP_SERVERS": " , "}, "comma-separated: no address"),
    ],
)
def test_a_configuration_mistake_is_one_line_and_exit_2(
    env: dict[str, str], expected: str, tmp_path: Path
) -> None:
    for command in (["worker"], ["config"]):
        code, output = run(command, env, tmp_path)
        assert code == 2, output
        line = one_line(output)
        assert expected in line
        assert "hunter2" not in output


def test_a_setting_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A data directory named with a Latin-1 byte passed validation; `config`
    then died in its JSON with a traceback, and a SASL user name in Latin-1
    failed only at the first connection."""
    latin1 = os.fsdecode(b"caf\xe9")  # as Python reads that byte from the environment
    data_dir = str(tmp_path / latin1)
    for command in (["worker"], ["config"]):
        code, output = run(command, {"STREAM_APP_DATA_DIR": data_dir}, tmp_path)
        assert code == 2, output
        assert one_line(output).endswith(
            f"STREAM_APP_DATA_DIR={tmp_path}/caf\\xe9: not UTF-8 (byte 0xe9 at offset "
            f"{len(str(tmp_path)) + 4}); settings are read as UTF-8 text"
        )
        assert "Traceback" not in output
    secret = {"STREAM_APP_SECURITY__SASL_PASSWORD": os.fsdecode(b"hunter2\xe9")}
    code, output = run(["config"], secret, tmp_path)
    assert code == 2, output
    assert "STREAM_APP_SECURITY__SASL_PASSWORD: not UTF-8 (byte 0xe9 at offset 7)" in output
    assert "hunter2" not in output


def test_an_http_host_name_is_checked_before_any_broker_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name was left to the server's start, once Kafka answered: a name no
    resolver knows, or another machine's, exited 1 (read as a port taken) and
    never while Kafka was down. An address given as such was checked."""
    from stream_app import worker
    from stream_app.errors import ConfigurationError
    from stream_app.settings import Settings

    answers: dict[str, Any] = {
        "unknown.invalid": socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
        "not-yet.example": socket.gaierror(socket.EAI_AGAIN, "Temporary failure"),
        "silent.example": socket.gaierror(socket.EAI_AGAIN, "Temporary failure"),
        "elsewhere.example": [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0))],
        # The server binds every address of a name, and fails on any one
        # (::1 where IPv6 is disabled, say).
        "partly.example": [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 0)),
        ],
        "here.example": [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))],
    }
    silent = threading.Event()

    def getaddrinfo(host: str, *args: object, **kwargs: object) -> Any:
        if host == "silent.example":
            silent.wait(30)
        answer = answers[host]
        if isinstance(answer, OSError):
            raise answer
        return answer

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(worker, "_RESOLVE_S", 0.2)

    def check(host: str) -> None:
        worker.usable_http_address(Settings(data_dir=tmp_path, http_host=host))

    with pytest.raises(ConfigurationError, match=r"=unknown.invalid: no such host \(Name or"):
        check("unknown.invalid")
    with pytest.raises(
        ConfigurationError,
        match=r"=elsewhere.example: cannot serve on this address 192.0.2.1 \(Cannot assign",
    ):
        check("elsewhere.example")
    with pytest.raises(ConfigurationError, match=r"=partly.example: cannot serve .* 192.0.2.1 "):
        check("partly.example")
    check("here.example")
    check("not-yet.example")  # left to the server's start, which resolves it again
    try:
        check("silent.example")  # likewise, after _RESOLVE_S
    finally:
        silent.set()


def test_tls_files_that_do_not_load_are_one_line_and_exit_2(tmp_path: Path) -> None:
    """Files that exist but hold no PEM certificate failed in the first
    client's ssl.create_default_context: a traceback and exit 1."""
    bad = tmp_path / "ca.crt"
    bad.write_text("not a certificate\n")
    env = {"STREAM_APP_SECURITY__PROTOCOL": "SSL", "STREAM_APP_SECURITY__SSL_CAFILE": str(bad)}
    for command in (["worker"], ["config"], ["topics", "create"]):
        code, output = run(command, env, tmp_path)
        assert code == 2, output
        assert f"STREAM_APP_SECURITY__SSL_CAFILE: {bad} holds no PEM certificate" in one_line(
            output
        )
    env = {"STREAM_APP_SECURITY__PROTOCOL": "SSL", "STREAM_APP_SECURITY__SSL_CERTFILE": str(bad)}
    code, output = run(["worker"], env, tmp_path)
    assert code == 2, output
    line = one_line(output)
    assert "STREAM_APP_SECURITY__SSL_CERTFILE and SSL_KEYFILE" in line
    # A certificate without its key read as a key that does not load.
    assert line.endswith(
        "no STREAM_APP_SECURITY__SSL_KEYFILE is set, so the key must be in that file: set "
        "it to the key's file"
    )


def test_a_data_dir_that_cannot_be_used_is_reported_before_any_broker_call(
    tmp_path: Path,
) -> None:
    """Said only once Kafka answered: against an unreachable broker, never."""
    taken = tmp_path / "a-file"
    taken.write_text("")
    code, output = run(["worker"], {"STREAM_APP_DATA_DIR": str(taken)}, tmp_path, timeout=20)
    assert code == 2, output
    line = one_line(output)
    assert f"STREAM_APP_DATA_DIR={taken}: cannot use the state directory" in line
    assert "Kafka" not in output


def test_config_checks_the_data_dir_as_the_worker_does_without_creating_it(
    tmp_path: Path,
) -> None:
    """`config` passed a data dir the worker refuses, though its help says it
    reports a mistake exactly as the worker would."""
    taken = tmp_path / "a-file"
    taken.write_text("")
    for data_dir in (taken, taken / "below"):
        code, output = run(["config"], {"STREAM_APP_DATA_DIR": str(data_dir)}, tmp_path)
        assert code == 2, output
        assert f"STREAM_APP_DATA_DIR={data_dir}: cannot use the state directory" in output
    fresh = tmp_path / "not" / "yet"
    code, output = run(["config"], {"STREAM_APP_DATA_DIR": str(fresh)}, tmp_path)
    assert code == 0, output
    assert not (tmp_path / "not").exists()


def test_a_bad_settings_file_is_reported_before_any_broker_call(tmp_path: Path) -> None:
    bad = tmp_path / "apps.json"
    bad.write_text('{"1": {"flattening": "sometimes"}')
    # `config` passed it before, though its help says it reports a mistake
    # exactly as the worker would.
    for command in (["worker"], ["config"]):
        code, output = run(command, {"STREAM_APP_APPLICATION_SETTINGS_FILE": str(bad)}, tmp_path)
        assert code == 2, output
        line = one_line(output)
        assert "configuration error" in line
        assert str(bad) in line
        assert "Kafka" not in output


def test_choices_ignore_case(tmp_path: Path) -> None:
    env = {
        "STREAM_APP_LOG_LEVEL": "info",
        "STREAM_APP_PROCESSING_GUARANTEE": "At_Least_Once",
        "STREAM_APP_LOG_FORMAT": "JSON",
    }
    code, output = run(["config"], env, tmp_path)
    assert code == 0, output
    assert '"log_level": "INFO"' in output
    assert '"processing_guarantee": "at_least_once"' in output
    assert '"log_format": "json"' in output


def test_config_prints_the_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    env = {
        "STREAM_APP_SECURITY__PROTOCOL": "SASL_PLAINTEXT",
        "STREAM_APP_SECURITY__SASL_MECHANISM": "SCRAM-SHA-512",
        "STREAM_APP_SECURITY__SASL_USERNAME": "worker",
        "STREAM_APP_SECURITY__SASL_PASSWORD": "hunter2",
        "STREAM_APP_TOPICS__CLOSED": "analytics.closed",
    }
    code, output = run(["config"], env, tmp_path)
    assert code == 0, output
    assert "hunter2" not in output
    assert '"sasl_password": "**********"' in output
    assert '"closed": "analytics.closed"' in output


def _worker_without_kafka(cwd: Path, **popen: Any) -> subprocess.Popen[str]:
    """`stream-app worker` with no broker to reach, its output on a pipe."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_APP_")}
    return subprocess.Popen(
        [sys.executable, "-m", "stream_app", "worker"],
        env={**base, "KAFKA_BOOTSTRAP_SERVERS": CLOSED_PORT, "STREAM_APP_HTTP_PORT": "0"},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def test_an_unreachable_broker_is_retried_and_said_plainly(tmp_path: Path) -> None:
    proc = _worker_without_kafka(tmp_path)
    deadline = time.monotonic() + 20
    seen: list[str] = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen.append(line)
        if sum("is not reachable" in s for s in seen) >= 2:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=20)
    output = "".join(seen) + rest
    retries = [s for s in output.splitlines() if "stream_app.worker" in s and "not reachable" in s]
    assert len(retries) >= 2, output
    assert (
        f"Kafka at {CLOSED_PORT} is not reachable (KafkaConnectionError): retrying in" in retries[0]
    )
    assert "Traceback" not in output
    assert proc.returncode == 0


def test_a_worker_waiting_on_a_broker_that_never_answers_stops_at_once(tmp_path: Path) -> None:
    """A listener that accepts connections and answers nothing (a broker
    stuck, a proxy without its backend) held the first attempt for aiokafka's
    request timeout, 40 s; SIGTERM meanwhile waited for it, hit the 10 s
    shutdown bound and exited 1, saying uncommitted records would be processed
    again, though the worker owned nothing."""
    with silent_broker() as bootstrap:
        code, output = signalled(
            ["worker"],
            {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "STREAM_APP_HTTP_PORT": "0"},
            tmp_path,
            signal.SIGTERM,
            after=3,  # started, and connected to the listener
        )
    assert "could not stop cleanly" not in output
    assert "Traceback" not in output
    assert code == 0, output


def test_a_closed_terminal_stops_a_worker_cleanly(tmp_path: Path) -> None:
    """SIGHUP (the terminal of a worker run in the foreground closed) killed
    it, with no commit, as Python's default does; it stops as on SIGTERM."""
    code, output = signalled(
        ["worker"],
        {"KAFKA_BOOTSTRAP_SERVERS": CLOSED_PORT, "STREAM_APP_HTTP_PORT": "0"},
        tmp_path,
        signal.SIGHUP,
        after=3,  # its handlers in place, waiting for Kafka
    )
    assert "SIGHUP: stopping" in output, output
    assert "Traceback" not in output
    assert code == 0, output


def test_a_worker_started_with_nohup_keeps_running_when_its_terminal_closes(
    tmp_path: Path,
) -> None:
    """`nohup stream-app worker &`: SIGHUP ignored is what nohup asks for."""
    proc = _worker_without_kafka(
        tmp_path, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)
    )
    try:
        time.sleep(3)  # its handlers in place, waiting for Kafka
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "SIGHUP" not in output
    assert "SIGTERM: stopping" in output, output
    assert proc.returncode == 0, output


@pytest.mark.parametrize(
    ("command", "expected"),
    # tail stops cleanly on Ctrl-C, as it promises, even before it is connected
    [(["watch"], 130), (["tail", "closed"], 0), (["topics", "create"], 130)],
)
def test_ctrl_c_ends_a_command_quietly(command: list[str], expected: int, tmp_path: Path) -> None:
    """Ctrl-C while a command waits on a broker that does not answer printed
    a KeyboardInterrupt traceback."""
    with silent_broker() as bootstrap:
        code, output = signalled(
            command, {"KAFKA_BOOTSTRAP_SERVERS": bootstrap}, tmp_path, signal.SIGINT, after=2
        )
    assert "Traceback" not in output
    assert code == expected, output


@pytest.mark.parametrize("command", [["watch"], ["traffic", "--sessions", "1"]])
def test_sigterm_ends_a_command_as_a_ctrl_c_does(command: list[str], tmp_path: Path) -> None:
    """With no handler, a container's PID 1 ignores SIGTERM: `docker stop` of
    `traffic --rate` or `watch` waited out the grace period, then killed it.
    (Outside a container the signal's default ended it with no exit code.)"""
    with silent_broker() as bootstrap:
        code, output = signalled(
            command, {"KAFKA_BOOTSTRAP_SERVERS": bootstrap}, tmp_path, signal.SIGTERM, after=2
        )
    assert "Traceback" not in output
    assert code == 128 + signal.SIGTERM, output


def test_watch_keeps_to_its_seconds_with_a_broker_that_never_answers(tmp_path: Path) -> None:
    """`watch --seconds 5` took 52 s: its first probe waited for aiokafka's
    40 s request timeout, and more, before the deadline applied."""
    with silent_broker() as bootstrap:  # run() gives up after 30 s
        code, output = run(
            ["watch", "--seconds", "3"], {"KAFKA_BOOTSTRAP_SERVERS": bootstrap}, tmp_path
        )
    assert code == 1
    assert "did not answer within 3s" in output


def test_traffic_says_the_broker_is_unreachable(tmp_path: Path) -> None:
    code, output = run(["traffic", "--sessions", "1"], {}, tmp_path)
    assert code == 1
    assert f"stream-app traffic: Kafka at {CLOSED_PORT}: KafkaConnectionError" in output
    assert "Traceback" not in output


def test_watch_says_the_broker_is_unreachable(tmp_path: Path) -> None:
    code, output = run(["watch", "--seconds", "5"], {}, tmp_path)
    assert code == 1
    assert f"Kafka at {CLOSED_PORT} is not reachable" in output
    assert "do not exist" not in output
    assert "Traceback" not in output


def _kafka_answers(
    monkeypatch: pytest.MonkeyPatch,
    answers: list[Exception | TopicLayout],
    hint: str | None = None,
) -> None:
    """The worker's start-up topic declarations answered, in turn, by ``answers``
    (an exception is raised), and no broker refusing its credentials (the
    probe gives ``hint``)."""
    from stream_app import worker
    from stream_app.pipeline.kafka import WorkerProbe
    from stream_app.settings import Settings

    async def ensure_topics(settings: Settings, *, worker: bool = False) -> TopicLayout:
        assert worker
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def no_refusal(settings: Settings, stopping: object) -> WorkerProbe:
        return WorkerProbe(hint=hint)

    monkeypatch.setattr(worker, "ensure_topics", ensure_topics)
    monkeypatch.setattr(worker, "worker_probe", no_refusal)


async def test_an_unreachable_kafka_is_retried_at_most_every_few_seconds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker started during an outage waited up to 30 s between attempts,
    so up to 30 s after Kafka was back: now the waits double up to 5 s."""
    from aiokafka.errors import KafkaConnectionError

    from stream_app import worker
    from stream_app.pipeline.topics import TopicLayout
    from stream_app.settings import Settings

    failures = 6
    answers: list[Exception | TopicLayout] = [
        *(KafkaConnectionError("down") for _ in range(failures)),
        TopicLayout(6, 1_048_588),
    ]

    _kafka_answers(monkeypatch, answers)
    waits: list[float] = []

    async def waited(awaitable: Coroutine[Any, Any, Any], timeout: float) -> None:  # noqa: ASYNC109 - asyncio.wait_for's
        waits.append(timeout)  # the wait between attempts, not waited here
        awaitable.close()
        raise TimeoutError

    monkeypatch.setattr(worker.asyncio, "wait_for", waited)
    with caplog.at_level("WARNING", logger="stream_app.worker"):
        layout = await worker._wait_for_kafka(Settings(bootstrap_servers="k:9092"), Event())
    assert layout == TopicLayout(6, 1_048_588)
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert len(caplog.records) == failures


async def test_the_probe_s_hint_is_in_the_unreachable_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A TLS worker at a PLAINTEXT listener said only "not reachable"."""
    from aiokafka.errors import KafkaConnectionError

    from stream_app import worker
    from stream_app.pipeline.topics import TopicLayout
    from stream_app.settings import Settings

    answers: list[Exception | TopicLayout] = [
        KafkaConnectionError("Unable to bootstrap from [('k', 9093, <AddressFamily.AF_INET: 2>)]"),
        TopicLayout(6, 1_048_588),
    ]
    _kafka_answers(monkeypatch, answers, hint="closed in the TLS handshake")
    with caplog.at_level("WARNING", logger="stream_app.worker"):
        await worker._wait_for_kafka(Settings(bootstrap_servers="k:9093"), Event())
    [line] = [r.getMessage() for r in caplog.records]
    assert line == (
        "Kafka at k:9093 is not reachable (KafkaConnectionError): closed in the TLS "
        "handshake: retrying in 1 s"
    )


async def test_a_broker_that_does_not_answer_is_said_so_while_the_worker_waits(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An address that drops packets held each attempt for the request timeout
    (40 s): the worker said nothing until it failed, about 50 s in."""
    from stream_app import worker
    from stream_app.pipeline.topics import TopicLayout
    from stream_app.settings import Settings

    async def silent(settings: Settings, *, worker: bool = False) -> TopicLayout:
        await asyncio.sleep(0.3)  # then it answers
        return TopicLayout(6, 1_048_588)

    monkeypatch.setattr(worker, "ensure_topics", silent)
    monkeypatch.setattr(worker, "_UNANSWERED_S", 0.1)
    with caplog.at_level("WARNING", logger="stream_app.worker"):
        layout = await worker._wait_for_kafka(Settings(bootstrap_servers="k:9092"), Event())
    assert layout == TopicLayout(6, 1_048_588)
    assert [r.getMessage() for r in caplog.records] == [
        "waited 0 s for Kafka at k:9092 to answer, or to have the topics ready (an address "
        "that drops packets?): still waiting"
    ]
    caplog.clear()
    monkeypatch.setattr(worker, "_UNANSWERED_S", 5.0)
    await worker._wait_for_kafka(Settings(bootstrap_servers="k:9092"), Event())
    await asyncio.sleep(0.1)
    assert caplog.records == []  # answered in time: nothing said, nothing said later


async def test_a_broker_that_answers_with_a_retriable_error_is_retried_and_said_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Creating a topic just as the controller moved: the broker answered, so the
    retry (after the first backoff, 1 s) does not say it is unreachable."""
    from aiokafka.errors import NotControllerError

    from stream_app import worker
    from stream_app.pipeline.topics import TopicLayout
    from stream_app.settings import Settings

    answers: list[Exception | TopicLayout] = [
        NotControllerError("creating sessions.closed: this is not the controller"),
        TopicLayout(6, 1_048_588),
    ]

    _kafka_answers(monkeypatch, answers)
    with caplog.at_level("WARNING", logger="stream_app.worker"):
        layout = await worker._wait_for_kafka(Settings(bootstrap_servers="k:9092"), Event())
    assert layout == TopicLayout(6, 1_048_588)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("Kafka at k:9092 answered [Error 41] NotControllerError: creating ")
    assert "not reachable" not in line


def test_sigterm_before_the_worker_runs_is_noted_and_stops_it_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker stopped within its first second (a rolling restart right after
    it started, in a black-box run) died of the signal, exit 143, before its
    handlers were in place. Raising SystemExit from an early handler instead
    could crash the process (inside orjson's start: a segfault). The signal is
    now noted, and the worker stops as soon as its own handlers are in place:
    here against an unreachable broker, which it would otherwise retry for ever."""
    import asyncio

    from stream_app import cli, console, worker
    from stream_app.settings import Settings

    def not_handled(_signum: int, _frame: object) -> None:
        raise AssertionError("no SIGTERM handler: the worker would die of it")

    def starting(settings: object) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # noted, not fatal
        os.kill(os.getpid(), signal.SIGINT)  # noted too: was a KeyboardInterrupt traceback
        if signal.SIGHUP in console.STOP_SIGNALS:  # not if pytest runs under nohup
            os.kill(os.getpid(), signal.SIGHUP)  # and a closed terminal's
        return 0

    before = signal.signal(signal.SIGTERM, not_handled)  # rather than pytest dying of it
    before_int = signal.getsignal(signal.SIGINT)
    before_hup = signal.getsignal(signal.SIGHUP)
    monkeypatch.setattr(console, "early_signals", [])
    monkeypatch.setattr(cli, "run_worker", starting)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", CLOSED_PORT)
    monkeypatch.setattr(sys, "argv", ["stream-app", "worker"])
    try:
        assert console.main() == 0
        assert console.early_signals == list(console.STOP_SIGNALS)
        settings = Settings(bootstrap_servers=CLOSED_PORT, data_dir=tmp_path, http_port=0)
        assert asyncio.run(asyncio.wait_for(worker.run(settings), 20)) == 0
        # Its stop's watchdog ended with it: left running, it would end the
        # process (here, pytest) when its bound ran out.
        watchdogs = [
            t
            for t in threading.enumerate()
            if isinstance(t, threading.Timer) and t.function is worker._give_up
        ]
        for watchdog in watchdogs:
            watchdog.join(timeout=5)  # a cancelled one ends at once; a live one waits its bound
        assert not [t for t in watchdogs if t.is_alive()]
    finally:
        signal.signal(signal.SIGTERM, before)
        signal.signal(signal.SIGINT, before_int)
        signal.signal(signal.SIGHUP, before_hup)


def test_a_sigterm_while_a_command_imports_is_noted_and_ends_it_143(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Passed on as a SIGINT at once, a SIGTERM in a command's first half
    second raised a KeyboardInterrupt inside orjson's initialisation, which
    crashed the process (a segmentation fault, 2 of 180 runs). It is noted
    until the imports are done; the command then ends, having started nothing."""
    from stream_app import console

    imported: list[bool] = []

    class _Cli:
        """Stands for stream_app.cli, imported as the SIGTERM arrives: its
        import must end (no exception raised inside it)."""

        @property
        def main(self) -> object:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs within these
                pass
            imported.append(True)
            return lambda: pytest.fail("the command ran after a SIGTERM")

    monkeypatch.setitem(sys.modules, "stream_app.cli", _Cli())
    monkeypatch.setattr(sys, "argv", ["stream-app", "watch"])
    monkeypatch.setattr(console, "terminated", [])
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert console.main() == 128 + signal.SIGTERM
        assert imported == [True]
        assert signal.getsignal(signal.SIGTERM) is console._as_ctrl_c  # passed on from now
    finally:
        signal.signal(signal.SIGTERM, before)


def test_an_encrypted_tls_key_is_one_line_not_a_passphrase_prompt(tmp_path: Path) -> None:
    """OpenSSL asked for the key's passphrase on the terminal: every command
    (config, send, the worker) waited for someone to type it. Run on a
    terminal of its own, as a user runs it."""
    # Not skipped without it: a skip would pass the run with this untested. (The
    # cryptography package, which could make the key in-process, is not a
    # dependency of the project.)
    openssl = shutil.which("openssl")
    assert openssl is not None, (
        "this test makes its encrypted key with the openssl command: install it (it is "
        "on nearly every Linux, and on CI)"
    )
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-days", "1", "-subj", "/CN=x",
         "-keyout", str(key), "-out", str(cert), "-passout", "pass:secret"],
        check=True, capture_output=True,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_APP_")}
    env |= {
        "KAFKA_BOOTSTRAP_SERVERS": CLOSED_PORT,
        "STREAM_APP_SECURITY__PROTOCOL": "SSL",
        "STREAM_APP_SECURITY__SSL_CERTFILE": str(cert),
        "STREAM_APP_SECURITY__SSL_KEYFILE": str(key),
    }
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a session of its own, the pty its terminal
        try:
            os.chdir(tmp_path)
            os.execve(sys.executable, [sys.executable, "-m", "stream_app", "config"], env)  # noqa: S606
        finally:
            os._exit(127)  # never the rest of the test run, in a second process
    output = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([terminal], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO: the child closed the terminal (exited)
                break
            if not chunk:
                break
            output += chunk
        else:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"config waited on its terminal: {output.decode(errors='replace')!r}")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    text = output.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 2, text
    assert "pass phrase" not in text
    assert "STREAM_APP_SECURITY__SSL_CERTFILE and SSL_KEYFILE" in one_line(text)


def test_the_stop_bound_covers_the_event_loop_s_end(tmp_path: Path) -> None:
    """asyncio.run waits, once the worker's coroutine has returned, for its
    executor's threads: a DNS lookup that took 25 s (cluster DNS down) held
    the exit that long after a SIGTERM, past the bound, and past a pod's
    grace period. Here every lookup takes 120 s."""
    program = (
        "import socket, sys, time\n"
        "def stuck(*args, **kwargs):\n"
        "    print('resolving', flush=True)\n"
        "    time.sleep(120)\n"
        "    raise OSError('no answer')\n"
        "socket.getaddrinfo = stuck\n"
        "from stream_app.cli import main\n"
        "sys.argv = ['stream-app', 'worker']\n"
        "sys.exit(main())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_APP_")}
    env |= {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka.example:9092",
        "STREAM_APP_SHUTDOWN_TIMEOUT_S": "5",
        "STREAM_APP_HTTP_PORT": "0",
    }
    worker = subprocess.Popen(
        [sys.executable, "-c", program],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # The reading below ends at the worker's exit: a worker stuck elsewhere is killed.
    guard = threading.Timer(90, worker.kill)
    guard.start()
    try:
        assert worker.stdout is not None
        for line in worker.stdout:  # the worker's log, then the lookup's word
            if line.startswith("resolving"):
                break  # resolving kafka.example, on an executor thread
        worker.send_signal(signal.SIGTERM)
        try:
            # Held by the lookup, the exit would come 120 s later: well past this,
            # which leaves the 5 s bound room on a loaded machine.
            output, _ = worker.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            output, _ = worker.communicate()
            pytest.fail(
                "still running 20 s after SIGTERM, past the documented bound "
                f"(STREAM_APP_SHUTDOWN_TIMEOUT_S=5): {output}"
            )
    finally:
        guard.cancel()
        worker.kill()
    assert worker.returncode == 1, output
    assert "could not stop cleanly within 5 s" in output


_OPEN_FILES_PROBE = """
import resource
from stream_app.worker import raise_open_files_limit

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
raise_open_files_limit()
print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)
"""


def test_the_worker_raises_its_open_files_limit_to_the_hard_one() -> None:
    """Many container runtimes set a soft limit of 1,024 open files: a worker
    owning many partitions' stores, or held by idle HTTP clients, failed with
    EMFILE. Go's runtime raises it for every program; so does the worker."""
    probe = subprocess.run(
        [sys.executable, "-c", _OPEN_FILES_PROBE], capture_output=True, text=True, check=True
    )
    soft, hard = (int(n) for n in probe.stdout.split())
    assert soft > 64
    assert soft == hard or hard < 0  # RLIM_INFINITY: a bounded number instead


@pytest.mark.parametrize(
    ("error", "logged"),
    [
        # aiokafka fails each batch its producer held with this when its
        # sender ends: the task restarts; each was a traceback at ERROR.
        (KafkaError("Unexpected error during batch delivery"), False),
        (KafkaError("something else"), True),
        (ValueError("ours"), True),
    ],
)
def test_batches_of_a_producer_whose_sender_ended_are_no_tracebacks(
    caplog: pytest.LogCaptureFixture, error: Exception, logged: bool
) -> None:
    from stream_app import worker

    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            context = {"message": "Future exception was never retrieved", "exception": error}
            worker._quiet_fences(loop, context)
    finally:
        loop.close()
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelname == "ERROR"]
    assert len(errors) == (1 if logged else 0)
