"""``stream-app`` without a broker: help for users, the version, and ``send``
checking commands (``--dry-run``) from JSON, stdin and flags."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    TopicAuthorizationFailedError,
)

from stream_app import json
from stream_app.cli import main


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_app", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_is_written_for_users() -> None:
    result = run("--help")
    assert result.returncode == 0
    out = result.stdout
    assert "Customer sessions on Kafka" in out
    assert "``" not in out  # no reStructuredText from a developer docstring
    for command in ("worker", "traffic", "watch", "send", "tail", "topics"):
        assert f"    {command} " in out
    assert "KAFKA_BOOTSTRAP_SERVERS" in out
    assert "exit status" in out
    for sub in (["send"], ["tail"], ["topics", "create"], ["worker"]):
        help_text = run(*sub, "--help").stdout
        assert "usage: stream-app " + " ".join(sub) in help_text
        assert "``" not in help_text


def test_version_comes_from_the_installed_package(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"stream-app {version('stream-app')}"


def _dry_run(*args: str, stdin: str = "") -> dict[str, Any]:
    result = run("send", "--dry-run", *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def test_send_builds_a_command_from_flags() -> None:
    doc = _dry_run(
        "--type=close",
        "--integration-id=cart-1",
        "--profile-id=alice",
        "--item=SKU:A:2:19.99",
        "--item=SKU-2:1:5",
        "--cost=shipping=4.99",
        "--attribute=channel=web",
        "--attribute=vip=true",
        "--coupon=SAVE10",
    )
    assert doc["type"] == "update"
    assert doc["integrationId"] == "cart-1"
    assert doc["eventId"]
    assert doc["session"] == {
        "profileId": "alice",
        "couponCodes": ["SAVE10"],
        "state": "closed",
        "cartItems": [
            {"sku": "SKU:A", "quantity": 2, "price": 19.99},
            {"sku": "SKU-2", "quantity": 1, "price": 5},
        ],
        "additionalCosts": {"shipping": {"price": 4.99}},
        "attributes": {"channel": "web", "vip": True},
    }
    returned = _dry_run(
        "--type=return", "--integration-id=cart-1", "--return-item=1:2", "--return-item=SKU-2"
    )
    assert returned["returnedCartItems"] == [{"position": 1, "quantity": 2}, {"sku": "SKU-2"}]
    cancel = _dry_run("--type=cancel", "--integration-id=cart-1", "--event-id=e-9")
    assert cancel == {
        "type": "update",
        "integrationId": "cart-1",
        "eventId": "e-9",
        "session": {"state": "cancelled"},
    }


def test_send_takes_json_from_an_argument_or_stdin() -> None:
    command = '{"type":"reopen","integrationId":"cart-1","eventId":"e-1"}'
    assert _dry_run(command)["eventId"] == "e-1"
    from_stdin = _dry_run(stdin='{"type":"reopen","integrationId":"cart-2"}')
    assert from_stdin["integrationId"] == "cart-2"
    assert from_stdin["eventId"]  # generated
    assert _dry_run("-", stdin=command)["integrationId"] == "cart-1"


DEEP = "[" * 999 + "]" * 999


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (
            ["--type=update", "--integration-id=c", "--item=a:two:1"],
            "",
            "expected SKU:QUANTITY:PRICE",
        ),
        (["--type=reopen", "--integration-id=c", "--coupon=X"], "", "cannot be used"),
        # An empty value is still given: it was dropped without a word.
        (["--type=cancel", "--integration-id=c", "--profile-id="], "", "cannot be used"),
        (["--type=reopen", "--integration-id=c", "--referral-code="], "", "cannot be used"),
        (["--type=return", "--integration-id=c"], "", "at least one --return-item"),
        (["--type=close"], "", "--integration-id is required"),
        (['{"type":"reopen","integrationId":"c"}', "--type=close"], "", "not both"),
        (["-"], "not json", "not valid JSON"),
        (["-"], "[1]", "must be a JSON object"),
        # Numbers JSON cannot hold (before: a traceback and exit 1, "Kafka could
        # not be reached"), and money beyond 64 bits (before: orjson's TypeError).
        (["--type=close", "--integration-id=c", "--item=A:1:Infinity"], "", "JSON can hold"),
        (["--type=close", "--integration-id=c", "--cost=x=sNaN"], "", "JSON can hold"),
        (["--type=close", "--integration-id=c", "--cost=x=1e20"], "", "LIMIT_EXCEEDED"),
        (["--type=close", "--integration-id=c", "--item=A:1:1e20"], "", "LIMIT_EXCEEDED"),
        (["--type=close", "--integration-id=c", "--cost=x=1e400"], "", "JSON can hold"),
        (["--type=close", "--integration-id=c", "--item=A:1:1e400"], "", "JSON can hold"),
        (["--type=close", "--integration-id=c", "--cost=x=money"], "", "expected NAME=PRICE"),
        # Before: sent as 1.2345678901234569e+23, another id.
        (["--type=update", "--integration-id=c", "--attribute=r=" + "9" * 24], "", "quote"),
        (["--type=update", "--integration-id=c", "--attribute=r=[" + "9" * 24 + "]"], "", "quote"),
        (["--type=update", "--integration-id=c", "--attribute=r=1e400"], "", "quote"),
        # Before: a RecursionError traceback.
        (["--type=update", "--integration-id=c", f"--attribute=r={DEEP}"], "", "deeper"),
        # Before: sent, and applied as 0.1.
        (["--type=close", "--integration-id=c", "--item=A:1:0.10000000000000001"], "", "read 0.1"),
    ],
)
def test_send_usage_errors_exit_2(args: list[str], stdin: str, message: str) -> None:
    result = run("send", "--dry-run", *args, stdin=stdin)
    assert result.returncode == 2
    # The error line, not the usage above it (which names SKU:QUANTITY:PRICE too).
    assert message in result.stderr.strip().splitlines()[-1]
    assert result.stdout == ""


def test_an_invalid_command_is_not_sent_and_says_why() -> None:
    command = {
        "type": "update",
        "integrationId": "cart-1",
        "session": {"cartItems": [{"sku": "a", "quantity": "two", "price": 1}]},
    }
    # No --dry-run and nothing listening: the check happens before any connection.
    result = subprocess.run(
        [sys.executable, "-m", "stream_app", "send", json.dumps(command).decode()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "SCHEMA_VIOLATION at /session/cartItems/0/quantity" in result.stderr
    assert "not sent" in result.stderr


def test_send_reads_stdin_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"type":"reopen","integrationId":"x"}'))
    assert main(["send", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["type"] == "reopen"


def test_send_reads_no_more_of_stdin_than_a_command_can_be(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`yes | stream-app send` grew until memory ran out: stdin was read whole
    before the size was checked."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(" " * (16 * 1024 * 1024 + 1)))
    assert main(["send", "--dry-run"]) == 2
    assert "stdin holds more than 16777216 bytes" in capsys.readouterr().err


def test_traffic_refuses_a_prefix_too_long_before_it_connects() -> None:
    result = run("traffic", "--prefix", "p" * 101)
    assert result.returncode == 2
    assert "--prefix: at most 100 characters, not 101" in result.stderr


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        # Under a UTF-8 locale: the locale's decoder raised UnicodeDecodeError.
        ([], b'{"type": "update", "integrationId": "\xff"}', b"not valid JSON"),
        # Numbers and strings JSON cannot hold as written: orjson's TypeError.
        (["--type=update", "--integration-id=c", "--item=S:18446744073709551616:1"], b"", b""),
        (["--type=update", "--integration-id=c", f"--application-id={2**64}"], b"", b""),
        (["--type=update", b"--integration-id=\xff"], b"", b""),
    ],
)
def test_send_of_what_is_not_json_exits_2_not_a_traceback(
    args: list[str | bytes], stdin: bytes, message: bytes
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_app", "send", "--dry-run", *args],
        input=stdin,
        capture_output=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr
    assert (message or b"SCHEMA_VIOLATION at /: not writable as JSON") in result.stderr


def test_a_return_item_of_digits_is_a_position_unless_named_a_sku() -> None:
    """An EAN as sku could not be returned by flags: its digits read as a
    position past the cart (UNKNOWN_CART_ITEM at the worker, after exit 0)."""
    result = run(
        "send", "--dry-run", "--type=return", "--integration-id=c",
        "--return-item=3:1", "--return-item=sku=4006381333931:2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["returnedCartItems"] == [
        {"position": 3, "quantity": 1},
        {"sku": "4006381333931", "quantity": 2},
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # nan compared false with 0 and passed: "did not answer within nans"
        (["watch", "--seconds", "nan"], "--seconds: must be > 0 and finite, not nan"),
        (["watch", "--seconds", "inf"], "--seconds: must be > 0 and finite, not inf"),
        (["traffic", "--rate", "nan"], "--rate: must be > 0 and finite, not nan"),
        # argparse named the parser's function: "invalid parse value: 'abc'"
        (["traffic", "--rate", "abc"], "--rate: not a float: 'abc'"),
        (["tail", "closed", "-n", "abc"], "-n/--max-records: not an int: 'abc'"),
        # CreateTopics' int32: a traceback from the request's encoding
        (["topics", "create", "--partitions", str(2**31)], "must be in 1..2147483647"),
        # built in memory first: 1e20 sessions ran until killed
        (["traffic", "--sessions", "99999999999999999999"], "--sessions: must be in 1..1000000"),
        # int() and Decimal() take "1_000" and other scripts' digits
        (["send", "--type=update", "--integration-id=c", "--item=x:1_000:1"], "SKU:QUANTITY"),
        (["send", "--type=update", "--integration-id=c", "--item=x:\u0661:3"], "SKU:QUANTITY"),
        (["send", "--type=update", "--integration-id=c", "--cost=ship=1_0"], "NAME=PRICE"),
    ],
)
def test_odd_numbers_are_usage_errors(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_traffic_refuses_a_prefix_that_is_not_utf8() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_app", "traffic", "--prefix", b"\xff"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert b"--prefix: not UTF-8" in result.stderr


def test_send_with_stdin_closed_is_a_usage_error() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stream_app", "send", "--dry-run"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(0),
    )
    assert result.returncode == 2, result.stderr
    assert "no stdin" in result.stderr


def _stand_in_client(
    monkeypatch: pytest.MonkeyPatch,
    *,
    connect: Callable[[], Awaitable[None]] | None = None,
    send: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """``send``'s SessionClient, replaced: connecting awaits ``connect`` and
    sending awaits ``send``, when given."""
    from stream_app import client

    class _Client:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        async def __aenter__(self) -> _Client:
            if connect is not None:
                await connect()
            return self

        async def __aexit__(self, *args: object) -> None:
            pass

        async def send(self, command: object) -> None:
            if send is not None:
                await send()

    monkeypatch.setattr(client, "SessionClient", _Client)


@pytest.mark.parametrize(
    ("raised", "code", "said"),
    [
        # exit 1 said "retry", which meets the same refusal
        (lambda: MessageSizeTooLargeError("1234567 bytes"), 2, "refuses a record this large"),
        # exit 130, the eventId lost: the command could not be sent again safely
        # As the command was given: JSON, here (--event-id was refused with it).
        (KeyboardInterrupt, 130, 'give it its eventId: "eventId": "e-42" in the document'),
        # It said "not sent" and "retry", though the broker may have written it:
        # the same flags again (a new eventId) would apply it twice.
        (KafkaTimeoutError, 1, "may have been sent to Kafka at 127.0.0.1:9092: "),
        # A missing Write ACL: refused, not lost. It said "may have been sent".
        (TopicAuthorizationFailedError, 2, "not sent, Kafka at 127.0.0.1:9092 refuses"),
    ],
)
def test_send_says_what_to_do_when_kafka_refuses_or_the_user_interrupts(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    raised: Any,
    code: int,
    said: str,
) -> None:
    async def refused() -> None:
        raise raised()

    _stand_in_client(monkeypatch, send=refused)
    args = ["send", '{"type":"reopen","integrationId":"c","eventId":"e-42"}']
    assert main(args) == code
    assert said in capsys.readouterr().err
    if raised is KafkaTimeoutError:  # built from flags: the flag says it, as a shell reads it
        flags = ["send", "--type", "reopen", "--integration-id", "c", "--event-id", "-a b"]
        assert main(flags) == code
        assert "give it its eventId: --event-id='-a b'" in capsys.readouterr().err


def test_send_stopped_by_sigterm_says_the_event_id_as_for_a_ctrl_c(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Under `timeout`, a CI job or `kubectl exec` ending, SIGTERM killed it with
    nothing said: its generated eventId was lost, and a run again with the same
    flags (a new eventId) could apply the command twice."""

    async def slow() -> None:
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
        await asyncio.sleep(30)

    _stand_in_client(monkeypatch, send=slow)
    before = signal.getsignal(signal.SIGTERM)
    args = ["send", '{"type":"reopen","integrationId":"c","eventId":"e-43"}']
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "interrupted; the command may have been sent" in err
    assert 'give it its eventId: "eventId": "e-43"' in err
    assert signal.getsignal(signal.SIGTERM) is before


def test_send_interrupted_before_it_connects_says_not_sent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def interrupted() -> None:
        raise KeyboardInterrupt

    _stand_in_client(monkeypatch, connect=interrupted)
    assert main(["send", '{"type":"reopen","integrationId":"c","eventId":"e-8"}']) == 130
    err = capsys.readouterr().err
    assert "interrupted before connecting: not sent" in err
    assert "may have been sent" not in err


def test_a_ctrl_c_while_the_cli_is_imported_ends_it_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Ctrl-C in the first fifth of a second (pydantic's import) printed a
    KeyboardInterrupt traceback."""
    from stream_app import cli, console

    def interrupted(argv: object = None) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    monkeypatch.setattr(sys, "argv", ["stream-app", "tail", "closed"])
    assert console.main() == 130


def test_send_that_cannot_connect_says_not_sent(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def unreachable() -> None:
        raise KafkaConnectionError("no broker")

    _stand_in_client(monkeypatch, connect=unreachable)
    assert main(["send", '{"type":"reopen","integrationId":"c","eventId":"e-7"}']) == 1
    err = capsys.readouterr().err
    assert "not sent to Kafka" in err
    assert "may have been sent" not in err


def test_an_attribute_is_text_unless_it_is_json_a_command_carries_exactly() -> None:
    """Refused for its numbers only: a lone surrogate escape was refused as 'a
    number ... cannot travel exactly', and quoting it as told sent another text."""
    attributes = _dry_run(
        "--type=update",
        "--integration-id=c",
        '--attribute=s="\\ud800"',
        "--attribute=n=9223372036854775808",
        "--attribute=open=[[[",
    )["session"]["attributes"]
    assert attributes == {"s": '"\\ud800"', "n": 9223372036854775808, "open": "[[["}
