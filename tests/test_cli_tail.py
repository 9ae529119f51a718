"""`stream-app tail` over a record the Kafka client cannot read."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from aiokafka.errors import KafkaError

from stream_app import cli


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        # What aiokafka raises for a record whose header name is not UTF-8.
        # Before, a traceback: operators could not look at the topic holding
        # the record the workers rejected as UNREADABLE_RECORD.
        (
            UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
            ["cannot read", "UNREADABLE_RECORD"],
        ),
        # What aiokafka raises, read_committed, on a control batch of no
        # records. It said "Kafka at ...: KafkaError(...)", which reads as an
        # outage that a retry may mend; every retry stopped at the same offset.
        (
            KafkaError("Control batch did not contain any records"),
            ["a control batch of no records", "kafka-console-consumer.sh reads the whole topic"],
        ),
    ],
    ids=["unreadable record", "empty control batch"],
)
def test_tail_over_what_the_client_cannot_read_says_what_it_is_and_exits_1(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: Exception,
    said: list[str],
) -> None:
    async def tail(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(cli, "tail", tail)
    assert cli.main(["tail", "commands"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    for words in said:
        assert words in err
    assert "Traceback" not in err


_PRINTING_TAIL = """
import sys
from stream_app import cli

async def tail(*args, out, **kwargs):
    for n in range(100_000):
        out(f'{{"record": {n}}}')

cli.tail = tail
sys.exit(cli.main(["tail", "commands"]))
"""


def test_tail_into_a_reader_that_stops_early_exits_quietly() -> None:
    """`stream-app tail commands | head`: before, a BrokenPipeError traceback."""
    tail = subprocess.Popen(
        [sys.executable, "-c", _PRINTING_TAIL],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert tail.stdout is not None
    assert tail.stderr is not None
    first = [tail.stdout.readline(), tail.stdout.readline()]
    tail.stdout.close()  # as head does after its lines
    assert tail.wait(timeout=60) == 0
    with tail.stderr:
        err = tail.stderr.read()
    assert first == ['{"record": 0}\n', '{"record": 1}\n']
    assert "Traceback" not in err
    assert "BrokenPipe" not in err


def test_a_record_nested_past_what_can_be_written_again_is_shown_in_base64() -> None:
    """Valid JSON nested 300 levels (a command's ignored field may nest 1,024)
    parses, but orjson writes at most 254: tail failed with a traceback on it,
    and again at every rerun. Python's writer takes 300; 1,020 is past it."""
    from types import SimpleNamespace

    def nested(depth: int) -> bytes:
        return b'{"type":"reopen","integrationId":"c","meta":' + b"[" * depth + b"]" * depth + b"}"

    record = SimpleNamespace(
        topic="sessions.commands", partition=0, offset=7, timestamp=0, key=b"c", value=nested(300)
    )
    shown = cli._shown_record(record, metadata=True)
    assert '"offset": 7' in shown
    assert '"meta": [\n' in shown
    deeper = cli._shown_record(
        SimpleNamespace(**{**vars(record), "value": nested(1020)}), metadata=True
    )
    assert '"offset": 7' in deeper
    assert '"valueBase64"' in deeper
    plain = cli._shown_record(
        SimpleNamespace(**{**vars(record), "value": b'{"a": 1}'}), metadata=False
    )
    assert plain == '{\n  "a": 1\n}'


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        # orjson reads an integer past 64 bits as a double: tail showed
        # 1.2345678901234568e+29 for what the producer wrote.
        (
            b'{"id":123456789012345678901234567890,"n":-18446744073709551616,"s":"caf\xc3\xa9"}',
            '{\n  "id": 123456789012345678901234567890,\n  "n": -18446744073709551616,\n'
            '  "s": "caf\u00e9"\n}',
        ),
        # 19 digits, one below -2**63: orjson reads a double there too.
        (
            b"[-9223372036854775809, 9223372036854775807]",
            "[\n  -9223372036854775809,\n  9223372036854775807\n]",
        ),
        # Valid JSON that orjson refuses: it was shown in base64.
        (b'["\\ud800", 2]', '[\n  "\\ud800",\n  2\n]'),
        # Unchanged: what no JSON number can be, and what no JSON text is.
        (b"[1e400]", '{\n  "valueBase64": "WzFlNDAwXQ=="\n}'),
        (b"[NaN]", '{\n  "valueBase64": "W05hTl0="\n}'),
        (b'"\xff"', '{\n  "valueBase64": "Iv8i"\n}'),
    ],
    ids=["past 64 bits", "below -2**63", "lone surrogate", "past a double", "NaN", "not UTF-8"],
)
def test_a_value_is_shown_as_it_was_written(value: bytes, shown: str) -> None:
    from types import SimpleNamespace

    record = SimpleNamespace(topic="t", partition=0, offset=0, timestamp=0, key=None, value=value)
    assert cli._shown_record(record, metadata=False) == shown


@pytest.mark.parametrize("topic", ["", "a b", "x" * 250, "\udcff"])
def test_a_topic_that_cannot_be_one_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], topic: str
) -> None:
    """Before, 'does not exist' and exit 1 after asking Kafka (a name that is
    not UTF-8: a traceback)."""
    assert cli.main(["tail", topic]) == cli.EXIT_USAGE
    assert "is no topic name" in capsys.readouterr().err


async def _unable_to_bootstrap(*args: object, **kwargs: object) -> None:
    from aiokafka.errors import KafkaConnectionError

    raise KafkaConnectionError("Unable to bootstrap from [('k1', 9093)]")


@pytest.mark.parametrize(
    ("command", "replace"),
    [(["tail", "commands"], "tail"), (["topics", "create"], "create_topics")],
)
def test_brokers_that_refuse_the_credentials_are_said_so(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    replace: str,
) -> None:
    """aiokafka reports refused credentials as 'Unable to bootstrap': exit 1,
    an outage to retry, where the worker says what was refused, exit 2."""
    from stream_app.pipeline import kafka

    refused: list[str | None] = ["SaslAuthenticationFailed: Invalid username or password"]

    async def refusal(options: object, timeout_s: float = 10.0) -> str | None:
        return refused[0]

    monkeypatch.setattr(cli, replace, _unable_to_bootstrap)
    monkeypatch.setattr(kafka, "refusal", refusal)
    assert cli.main(command) == cli.EXIT_USAGE
    assert "refuses this client: SaslAuthenticationFailed" in capsys.readouterr().err
    refused[0] = None  # unreachable: worth retrying
    assert cli.main(command) == cli.EXIT_FAILED
    assert "Unable to bootstrap" in capsys.readouterr().err


def test_a_key_that_is_not_utf8_is_shown_in_base64() -> None:
    """Before, decoded with replacement characters: keys b"\\xff" and b"\\xfe"
    both read as "\\ufffd", and the bytes a rejection names could not be found."""
    from types import SimpleNamespace

    shown = [
        cli._record_document(
            SimpleNamespace(topic="t", partition=0, offset=n, timestamp=0, key=key, value=b"{}"),
            metadata=True,
        )
        for n, key in enumerate([b"\xff", b"\xfe", b"cart-1", None])
    ]
    assert [doc.get("keyBase64") for doc in shown[:2]] == ["/w==", "/g=="]
    assert all("key" not in doc for doc in shown[:2])
    assert [doc["key"] for doc in shown[2:]] == ["cart-1", None]
    assert all("keyBase64" not in doc for doc in shown[2:])


@pytest.mark.parametrize(
    ("command", "module", "name"),
    [
        (["traffic", "--sessions", "1"], "stream_app.demo.traffic", "produce_traffic"),
        (["watch", "--seconds", "1"], "stream_app.demo.view", "watch"),
        (
            ["send", '{"type": "reopen", "integrationId": "c"}'],
            "stream_app.client",
            "SessionClient",
        ),
    ],
)
def test_send_traffic_and_watch_say_a_refusal_as_tail_does(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str],
    module: str,
    name: str,
) -> None:
    """send and traffic said a refused password or CA was an outage ("retry",
    exit 1); watch failed with a traceback. Now as tail: exit 2, saying what
    was refused; an outage stays exit 1."""
    import importlib

    from stream_app.pipeline import kafka

    refused: list[str | None] = ["SaslAuthenticationFailed: Invalid username or password"]

    async def refusal(options: object, timeout_s: float = 10.0) -> str | None:
        return refused[0]

    class _Unreachable:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        async def __aenter__(self) -> None:
            await _unable_to_bootstrap()

        async def __aexit__(self, *args: object) -> None:
            pass

    failing = _Unreachable if name == "SessionClient" else _unable_to_bootstrap
    monkeypatch.setattr(importlib.import_module(module), name, failing)
    monkeypatch.setattr(kafka, "refusal", refusal)
    assert cli.main(command) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "refuses this client: SaslAuthenticationFailed" in err
    assert "retry" not in err
    assert "Traceback" not in err
    refused[0] = None  # unreachable: worth retrying
    assert cli.main(command) == cli.EXIT_FAILED
    assert "Unable to bootstrap" in capsys.readouterr().err


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_reader_that_stops_early_ends_any_command_quietly(unbuffered: str) -> None:
    """`stream-app config | head -3`: a BrokenPipeError traceback, exit 1
    (only tail handled it); block-buffered, the same at exit: exit 120."""
    config = subprocess.Popen(
        [sys.executable, "-m", "stream_app", "config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": unbuffered, "KAFKA_BOOTSTRAP_SERVERS": "k:9092"},
    )
    assert config.stdout is not None
    assert config.stderr is not None
    config.stdout.close()  # before it writes: as head does, when it has its lines
    assert config.wait(timeout=60) == 0
    with config.stderr:
        err = config.stderr.read()
    assert b"Traceback" not in err
    assert b"Exception ignored" not in err


def test_a_failure_that_cannot_be_said_is_still_a_failure() -> None:
    """With stderr's reader gone, the failure's message raised BrokenPipeError,
    which was taken for stdout's reader gone: exit 0."""
    send = subprocess.Popen(
        [sys.executable, "-m", "stream_app", "send", "--dry-run", "not json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert send.stdout is not None
    assert send.stderr is not None
    send.stderr.close()
    assert send.wait(timeout=60) != 0
    send.stdout.close()


def test_watch_refused_by_kafka_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """watch's probe says a refusal itself: it was a stop reason like any
    other, exit 1, where every other command says exit 2."""
    from stream_app.pipeline import kafka

    async def refused(options: object) -> kafka.Unreachable:
        why = "Kafka at k:9092 refuses this client: SaslAuthenticationFailed: no"
        return kafka.Unreachable(why, refused=True)

    monkeypatch.setattr(kafka, "unreachable", refused)
    assert cli.main(["watch", "--seconds", "1"]) == cli.EXIT_USAGE
    assert "refuses this client: SaslAuthenticationFailed" in capsys.readouterr().err


def test_tail_stops_at_ctrl_c_while_a_broker_does_not_answer() -> None:
    """Its Ctrl-C handler was installed once connected: against a broker that
    does not answer, SIGINT killed it (130), and SIGTERM too (143), where
    tail promises 0; past that point, a signal waited for the 40 s timeout."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            tail = subprocess.Popen(
                [sys.executable, "-m", "stream_app", "tail", "closed", "--follow"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={
                    **os.environ,
                    "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{silent.getsockname()[1]}",
                },
            )
            time.sleep(3)  # started, and waiting on the broker
            assert tail.poll() is None
            tail.send_signal(signum)
            _, err = tail.communicate(timeout=15)
            assert tail.returncode == 0, err
            assert b"Traceback" not in err
    finally:
        silent.close()
