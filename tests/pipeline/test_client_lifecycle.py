"""A Kafka client of the worker whose start fails or is cancelled is closed.

Found in a black-box run: a worker stopped (SIGTERM) while a rebalance handed
it tasks cancelled their restores inside the restore consumer's ``start``,
which was outside the ``try`` that stops it, and the worker logged
"Unclosed AIOKafkaConsumer" after its stop. aiokafka's clients are faked
here; stopping one that never started is what aiokafka supports (its
``stop``/``close`` only close what exists)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from stream_app.pipeline import application_settings, tasks
from stream_app.pipeline.application_settings import (
    ApplicationSettingsRegistry,
    follow_settings_topic,
)
from stream_app.pipeline.kafka import partition_count
from stream_app.settings import Settings


class _Client:
    """An aiokafka consumer or admin client whose ``start`` never gets through."""

    made: list[_Client]
    never_answers: bool
    starting: asyncio.Event

    def __init__(self, **options: Any) -> None:
        self.closed = False
        self.made.append(self)

    async def start(self) -> None:
        self.starting.set()
        if self.never_answers:
            await asyncio.Event().wait()
        raise KafkaConnectionError("Unable to bootstrap from [('k1', 9092)]")

    async def stop(self) -> None:
        self.closed = True

    async def close(self) -> None:
        self.closed = True


def _clients(never_answers: bool) -> type[_Client]:
    attributes = {"made": [], "never_answers": never_answers, "starting": asyncio.Event()}
    return type("Client", (_Client,), attributes)


def _starting(settings: Settings) -> dict[str, Callable[[], Awaitable[object]]]:
    return {
        "restore": lambda: tasks.restore(settings, {}, {}, "commands[0]"),
        "settings follower": lambda: follow_settings_topic(
            settings, ApplicationSettingsRegistry(), asyncio.Event()
        ),
        "partition count": lambda: partition_count({}, "sessions.commands"),
    }


@pytest.mark.parametrize("starting", ["restore", "settings follower", "partition count"])
@pytest.mark.parametrize("never_answers", [False, True], ids=["start fails", "start cancelled"])
async def test_a_client_whose_start_fails_or_is_cancelled_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, starting: str, never_answers: bool
) -> None:
    client = _clients(never_answers)
    monkeypatch.setattr(tasks, "AIOKafkaConsumer", client)
    monkeypatch.setattr(application_settings, "AIOKafkaConsumer", client)
    monkeypatch.setattr("aiokafka.admin.AIOKafkaAdminClient", client)
    call = _starting(Settings(data_dir=tmp_path))[starting]
    running = asyncio.ensure_future(call())
    if never_answers:
        await client.starting.wait()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    else:
        with pytest.raises(KafkaConnectionError):
            await running
    assert len(client.made) == 1
    assert client.made[0].closed
