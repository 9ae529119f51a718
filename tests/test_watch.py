"""`stream-app watch` (the demo's view) over a stand-in consumer: counts by kind."""

from __future__ import annotations

import asyncio
from typing import ClassVar

import pytest
from aiokafka import TopicPartition

from stream_app import json
from stream_app.demo import view
from stream_app.pipeline import kafka
from stream_app.settings import Settings, TopicNames
from tests.pipeline.fakes import FixedRecordsConsumer


def _output(event: str) -> bytes:
    return json.dumps({"event": event, "integrationId": "c", "session": {"state": "x"}})


async def test_outputs_sharing_a_topic_are_counted_by_their_kind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The settings let outputs share a topic; watch counted every record on
    it as the last kind mapped to the topic, and the others as none."""
    shared = "sessions.outputs"
    topics = TopicNames(closed=shared, returned=shared, cancelled=shared, reopened=shared)
    outputs = [
        _output("talon_session_closed"),
        _output("talon_session_closed"),
        _output("talon_session_partially_returned"),
        _output("talon_session_revoked"),
        _output("talon_session_cancelled"),
        _output("talon_session_reopened"),
    ]
    rejection = json.dumps({"reason": "MALFORMED_JSON"})

    class Consumer(FixedRecordsConsumer):
        records: ClassVar[dict[TopicPartition, list[bytes]]] = {
            TopicPartition(shared, 0): outputs,
            TopicPartition(topics.rejected, 0): [rejection],
        }

    async def reachable(options: object) -> None:
        return None

    async def partitions(options: object, names: list[str], deadline: float) -> list[object]:
        assert sorted(names) == sorted({shared, topics.rejected})
        return [TopicPartition(name, 0) for name in names]

    monkeypatch.setattr(kafka, "unreachable", reachable)
    monkeypatch.setattr(view, "wait_for_partitions", partitions)
    monkeypatch.setattr("aiokafka.AIOKafkaConsumer", Consumer)
    result = await view.watch(
        Settings(topics=topics),
        seconds=5,
        expected={"closed": 2, "returned": 1, "cancelled": 2, "reopened": 1, "rejected": 1},
        interval=0.05,
        out=lambda _: None,
    )
    assert result.counts == {
        "closed": 2,
        "returned": 1,
        "cancelled": 2,
        "reopened": 1,
        "rejected": 1,
    }


async def test_output_topics_the_principal_may_not_describe_are_said_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refusal was waited out (60 s by default), then reported as output
    topics that do not exist."""
    from aiokafka.errors import TopicAuthorizationFailedError

    async def reachable(options: object) -> None:
        return None

    asked: list[str] = []

    async def refused(options: object, topic: str) -> int:
        asked.append(topic)
        raise TopicAuthorizationFailedError

    monkeypatch.setattr(kafka, "unreachable", reachable)
    monkeypatch.setattr(kafka, "partition_count", refused)
    # Waited out, the refusal would be asked again every 0.2 s for the 30 s
    # (and the timeout end the wait); a single ask means it was said at once.
    result = await asyncio.wait_for(view.watch(Settings(), seconds=30, out=lambda _: None), 25)
    assert len(asked) == 1, f"the refusal was asked again: {asked}"
    assert "does not authorize" in result.stopped_because


@pytest.mark.parametrize(
    "doc",
    [
        {"session": "oops"},
        {"event": "talon_session_closed", "return": {"lines": [{"quantity": "2"}]}},
        {"reason": "X", "errors": [None]},
        {"reason": "X", "errors": "text"},
        {"reason": "X", "source": "s"},
        {"reason": "VALIDATION", "errors": {"sku": "must not be empty"}},
    ],
)
def test_a_record_of_another_producer_is_shown_not_a_traceback(doc: dict[str, object]) -> None:
    """`watch` reads the topics from their start: one record another producer
    wrote there, of a shape the worker never writes, ended the view with a
    traceback."""
    kind = "rejected" if "reason" in doc else "closed"
    line = view.shorten(kind, doc)  # raised AttributeError, TypeError or KeyError
    assert line.startswith(("(not as the worker writes it) {", "X /", "VALIDATION /")), line


def test_a_rejection_without_its_command_says_it_was_not_kept() -> None:
    """A command too large to keep, or a tombstone, was shown as "(not JSON)"."""
    doc = {"reason": "LIMIT_EXCEEDED", "errors": [], "source": {"topic": "c"}, "command": None}
    assert "(command not kept)" in view.shorten("rejected", doc)


def test_a_record_nested_deeper_than_repr_goes_is_shown_too() -> None:
    """orjson reads 1,024 levels; repr() of 1,000 nested lists raised."""
    deep: list[object] = []
    inner = deep
    for _ in range(1000):
        inner.append([])
        inner = inner[0]  # type: ignore[assignment]
    assert view.shorten("closed", deep).startswith("[[[[")
