"""``stream-app send`` without a broker: what it says of a generated eventId,
how soon it ends when stopped with a record Kafka has not acknowledged, and
the numbers of a JSON command it cannot carry exactly."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from stream_app import json
from stream_app.cli import main

#: ``stream-app send`` with a producer that behaves as aiokafka's does for a
#: record a broker never acknowledges: send() hands back a future that never
#: ends, and stop(), which waits for the records it holds, never ends either.
_STUCK = r"""
import asyncio, signal, sys
from unittest import mock

import stream_app.pipeline.kafka as kafka
from stream_app import client, console

class StuckProducer:
    async def send(self, topic, value, key):
        return asyncio.get_running_loop().create_future()

    async def stop(self):
        await asyncio.Event().wait()

async def partitions(options, topic):
    return 6

async def producer(self):
    return StuckProducer()

# Python keeps SIGINT ignored when its parent did (a background job).
signal.signal(signal.SIGINT, signal.default_int_handler)
with mock.patch.object(kafka, "partition_count", partitions), mock.patch.object(
    client.SessionClient, "_open_producer", producer
):
    sys.argv = ["stream-app", *sys.argv[1:]]
    sys.exit(console.main())
"""

_SAID = "stream-app send: sending it with a new eventId; to send it again without a second "


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_send_stopped_while_kafka_has_not_acknowledged_ends_soon_its_event_id_said(
    stop: signal.Signals, code: int
) -> None:
    """One SIGTERM (`docker stop`) or Ctrl-C held it for the delivery timeout,
    120 s, in the client's stop; `docker stop` killed it after 10, and the
    generated eventId, said only at the end, was never said: the same flags
    again sent the command with a new one, and it was applied twice."""
    command = ["send", "--type", "return", "--integration-id", "cart-1", "--return-item", "0"]
    lines: queue.Queue[str] = queue.Queue()
    with subprocess.Popen(
        [sys.executable, "-c", _STUCK, *command],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    ) as child:
        reader = threading.Thread(
            target=lambda: [lines.put(line) for line in child.stderr or ()], daemon=True
        )
        reader.start()
        try:
            # Said before the record goes to the producer: a process killed
            # says nothing later.
            said = ""
            deadline = time.monotonic() + 20
            while _SAID not in said and time.monotonic() < deadline:
                try:
                    said = lines.get(timeout=0.5)
                except queue.Empty:
                    continue
            assert _SAID in said
            given = re.fullmatch(r".*give it its eventId: (--event-id=[0-9a-f]{32})\n", said)
            assert given is not None, said
            child.send_signal(stop)
            # Generous: the client gives up on the record after a second.
            assert child.wait(timeout=20) == code
        finally:
            child.kill()
            reader.join(timeout=5)
    rest = "".join(lines.queue)
    assert "interrupted; the command may have been sent: to send it again without a second " in rest
    assert f"give it its eventId: {given[1]}" in rest


def _stand_in_client(
    monkeypatch: pytest.MonkeyPatch, said: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """``send``'s SessionClient, replaced by one that notes what stderr held
    when the command was handed to it."""
    from stream_app import client

    class _Client:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        async def __aenter__(self) -> _Client:
            return self

        async def __aexit__(self, *args: object) -> None:
            pass

        async def send(self, command: dict[str, object]) -> client.SentCommand:
            said.append(capsys.readouterr().err)
            return client.SentCommand("c", str(command["eventId"]), "sessions.commands", 0, 7)

    monkeypatch.setattr(client, "SessionClient", _Client)


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--type", "reopen", "--integration-id", "c"], r"--event-id=([0-9a-f]{32})"),
        (['{"type":"reopen","integrationId":"c"}'], r'"eventId": "([0-9a-f]{32})" in the document'),
        (
            ['{"type":"reopen","integrationId":"c","eventId":null}'],
            r'"eventId": "([0-9a-f]{32})" in the document',
        ),
    ],
)
def test_send_says_a_generated_event_id_before_it_sends(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    shown: str,
) -> None:
    said: list[str] = []
    _stand_in_client(monkeypatch, said, capsys)
    assert main(["send", *args]) == 0
    [before] = said
    assert before.startswith(_SAID)
    assert before.count("\n") == 1
    event_id = re.search(shown, before)
    assert event_id is not None, before
    assert f"(eventId {event_id[1]})" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["--type", "reopen", "--integration-id", "c", "--event-id", "e-1"],
        ['{"type":"reopen","integrationId":"c","eventId":"e-1"}'],
    ],
)
def test_send_says_nothing_of_an_event_id_it_was_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    said: list[str] = []
    _stand_in_client(monkeypatch, said, capsys)
    assert main(["send", *args]) == 0
    [before] = said
    assert "eventId" not in before


def _command(session: str) -> str:
    return f'{{"type":"update","integrationId":"c1","eventId":"e","session":{session}}}'


@pytest.mark.parametrize(
    ("session", "said"),
    [
        (
            '{"attributes":{"x":123456789012345678901234}}',
            "123456789012345678901234 at /session/attributes/x cannot travel exactly as a "
            "JSON number: the workers would read 1.2345678901234569e+23; round it first (or, "
            "to send it as text, quote it)\n",
        ),
        (
            '{"cartItems":[{"sku":"SKU","quantity":1,"price":0.1000000000000000000001}]}',
            "0.1000000000000000000001 at /session/cartItems/0/price cannot travel exactly as "
            "a JSON number: the workers would read 0.1; round it first\n",
        ),
        (
            '{"attributes":{"a/b~":[1, 1e-400]}}',
            "1E-400 at /session/attributes/a~1b~0/1 cannot travel exactly",
        ),
    ],
)
def test_a_json_command_with_a_number_it_cannot_carry_exactly_is_refused(
    capsys: pytest.CaptureFixture[str], session: str, said: str
) -> None:
    """The flags refuse these numbers; in a JSON document they were rounded to
    the nearest double, in silence, and sent."""
    assert main(["send", "--dry-run", _command(session)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("stream-app send: error: ")
    assert said in err
    assert err.count("\n") == 1


def test_a_json_command_whose_numbers_it_carries_exactly_is_sent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    session = (
        '{"attributes":{"big":9223372036854775808,"e":1e2,"z":-0.0,"half":0.5,"tenth":0.1},'
        '"cartItems":[{"sku":"SKU","quantity":1,"price":19.99}]}'
    )
    assert main(["send", "--dry-run", _command(session)]) == 0
    sent = json.loads(capsys.readouterr().out)["session"]
    assert sent["attributes"] == {
        "big": 9223372036854775808,
        "e": 100.0,
        "z": -0.0,
        "half": 0.5,
        "tenth": 0.1,
    }
    assert sent["cartItems"][0]["price"] == 19.99
    # Fields the workers pass over may hold any number: they were refused.
    ignored = (
        '{"type":"update","integrationId":"c1","eventId":"e","trace":{"spanId":'
        '123456789012345678901234},"session":{"state":"open","sentAt":1764000000.1234567891,'
        '"cartItems":[{"sku":"S","quantity":1,"price":1,"discount":0.1000000000000000000001}]}}'
    )
    assert main(["send", "--dry-run", ignored]) == 0, capsys.readouterr().err
    # It says so, once, as the command goes out with the number as read.
    err = capsys.readouterr().err
    assert err == (
        "stream-app send: note: 123456789012345678901234 at /trace/spanId goes out as "
        "1.2345678901234569e+23, as JSON numbers are read (the workers do not read it)\n"
    )
    for passed_over in (
        '{"type":"return","integrationId":"c1","eventId":"e","returnedCartItems":'
        '[{"position":0,"orderLineId":123456789012345678901234}]}',
        '{"type":"update","integrationId":"c1","eventId":"e","session":{"additionalCosts":'
        '{"shipping":{"price":1,"carrierRef":123456789012345678901234}}}}',
        '{"type":"reopen","integrationId":"c1","eventId":"e","session":{"attributes":'
        '{"ref":123456789012345678901234}}}',
    ):
        assert main(["send", "--dry-run", passed_over]) == 0, capsys.readouterr().err
        assert "goes out as" in capsys.readouterr().err
    # A number the workers read, in a return or an item's cost, is refused.
    for read in (
        '{"type":"return","integrationId":"c1","eventId":"e","returnedCartItems":'
        '[{"position":0,"quantity":1.0000000000000000000001}]}',
        '{"type":"update","integrationId":"c1","eventId":"e","session":{"cartItems":[{"sku":"S",'
        '"quantity":1,"price":1,"additionalCosts":{"fee":{"price":0.1000000000000000000001}}}]}}',
    ):
        assert main(["send", "--dry-run", read]) == 2
        assert "cannot travel exactly" in capsys.readouterr().err
