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
from stream_app.pipeline import engine as engine_module
from stream_app.pipeline.application_settings import (
    ApplicationSettingsRegistry,
    follow_settings_topic,
)
from stream_app.pipeline.engine import Engine
from stream_app.pipeline.kafka import partition_count
from stream_app.pipeline.topics import TopicLayout
from stream_app.settings import Settings


class _Client:
    """An aiokafka consumer or admin client whose ``start`` never gets through."""

    made: list[_Client]
    never_answers: bool
    starting: asyncio.Event
    #: Set, a start that has not answered fails.
    gone: asyncio.Event

    def __init__(self, **options: Any) -> None:
        self.closed = False
        self.starts = 0
        self.made.append(self)

    async def start(self) -> None:
        self.starts += 1
        self.starting.set()
        if self.never_answers:
            await self.gone.wait()
        raise KafkaConnectionError("Unable to bootstrap from [('k1', 9092)]")

    async def bootstrap(self) -> None:  # aiokafka's AIOKafkaClient starts so
        await self.start()

    async def stop(self) -> None:
        self.closed = True

    async def topics(self) -> set[str]:
        return set()  # no input topic shows yet: the worker waits

    def subscribe(self, topics: list[str], listener: object) -> None:
        raise AssertionError("subscribed before its topics showed")

    async def close(self) -> None:
        self.closed = True


def _clients(never_answers: bool) -> type[_Client]:
    attributes = {
        "made": [],
        "never_answers": never_answers,
        "starting": asyncio.Event(),
        "gone": asyncio.Event(),
    }
    return type("Client", (_Client,), attributes)


def _starting(settings: Settings) -> dict[str, Callable[[], Awaitable[object]]]:
    return {
        "restore": lambda: tasks.restore(settings, {}, {}, "commands[0]"),
        "settings follower": lambda: follow_settings_topic(
            settings, ApplicationSettingsRegistry(), asyncio.Event()
        ),
        "partition count": lambda: partition_count({}, "sessions.commands"),
        "worker's consumer": Engine(settings, TopicLayout(1, 1_048_588))._consume,
    }


STARTING = ["restore", "settings follower", "partition count", "worker's consumer"]


@pytest.mark.parametrize("starting", STARTING)
@pytest.mark.parametrize("never_answers", [False, True], ids=["start fails", "start cancelled"])
async def test_a_client_whose_start_fails_or_is_cancelled_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, starting: str, never_answers: bool
) -> None:
    client = _clients(never_answers)
    monkeypatch.setattr(tasks, "AIOKafkaConsumer", client)
    monkeypatch.setattr(application_settings, "AIOKafkaConsumer", client)
    monkeypatch.setattr("aiokafka.admin.AIOKafkaAdminClient", client)
    monkeypatch.setattr("aiokafka.client.AIOKafkaClient", client)
    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", client)
    monkeypatch.setattr(application_settings, "FIRST_READ_BACKOFF_S", 0.01)
    monkeypatch.setattr(engine_module, "KAFKA_RETRY_FIRST_S", 0.01)
    call = _starting(Settings(data_dir=tmp_path))[starting]
    running = asyncio.ensure_future(call())
    if never_answers:
        await client.starting.wait()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert len(client.made) == 1
        if starting == "restore":
            # Its start goes on (see the test below), and its stop follows.
            assert not client.made[0].closed
            client.gone.set()
            for _ in range(5):
                await asyncio.sleep(0)
    elif starting in ("settings follower", "worker's consumer"):
        # Kafka out of reach is waited for: by the settings follower until the
        # settings are loaded, a client per attempt; by the worker's consumer
        # until it joins, its start tried again. Each client closed.
        for _ in range(500):
            if sum(made.starts for made in client.made) >= 3:
                break
            await asyncio.sleep(0.01)
        assert sum(made.starts for made in client.made) >= 3
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    else:
        with pytest.raises(KafkaConnectionError):
            await running
        assert len(client.made) == 1
    assert all(made.closed for made in client.made)


async def test_the_workers_consumer_is_closed_when_cancelled_waiting_for_its_topics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started, then cancelled while it waits (up to 10 s) for the broker to
    show its input topics, before the loop whose end closes it."""

    class Started(_clients(never_answers=False)):  # type: ignore[misc]
        async def start(self) -> None:
            self.starting.set()

    monkeypatch.setattr(engine_module, "AIOKafkaConsumer", Started)
    running = asyncio.ensure_future(
        Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))._consume()
    )
    await Started.starting.wait()
    await asyncio.sleep(0.05)  # in the wait's first sleep
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert len(Started.made) == 1
    assert Started.made[0].closed


async def test_a_restore_cut_short_in_its_consumer_s_bootstrap_closes_that_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka's consumer, cancelled while its bootstrap waits for the
    broker's metadata, never closes that connection: a worker logged
    ``ERROR asyncio: Unclosed AIOKafkaConnection`` for each task start a
    rebalance cut short (37 at once in a 48-partition kill -9 run). The
    real consumer and client, with their connection stood in for."""
    import aiokafka.client

    sent = asyncio.Event()
    answer = asyncio.Event()
    connections: list[_Connection] = []

    class _Connection:
        def __init__(self) -> None:
            self.closed = False
            connections.append(self)

        async def send(self, request: object) -> object:
            sent.set()
            await answer.wait()  # a slow broker
            raise KafkaConnectionError("the broker went")

        def close(self, *args: object, **kwargs: object) -> None:
            self.closed = True

    async def create_conn(*args: object, **kwargs: object) -> _Connection:
        return _Connection()

    monkeypatch.setattr(aiokafka.client, "create_conn", create_conn)
    restoring = asyncio.ensure_future(tasks.restore(Settings(data_dir=tmp_path), {}, {}, "c[0]"))
    await sent.wait()
    restoring.cancel()
    with pytest.raises(asyncio.CancelledError):
        await restoring
    answer.set()  # the bootstrap then ends, and the consumer's stop follows
    for _ in range(20):
        await asyncio.sleep(0)
    assert [c.closed for c in connections] == [True]
