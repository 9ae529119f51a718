"""The revenue example's arithmetic, without a broker: each output record's
change, duplicates, and a figure that does not depend on the order of topics."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

from stream_app import json
from tests.pipeline.fakes import FixedRecordsConsumer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "revenue_consumer.py"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("revenue_consumer", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def output(
    event: str,
    iid: str,
    event_id: str,
    total: float,
    returned: tuple[int, int] = (0, 0),
    value: float | None = None,
    app: int = 1,
) -> dict[str, Any]:
    """An output document as the workers write it (only what revenue reads):
    two lines, 2 x 10 with a 1.5 per-unit item cost and 1 x 5.25; shipping 4.
    The n-th command of a session has eventId "e<n>" and is its n-th update."""
    doc: dict[str, Any] = {
        "event": event,
        "eventId": event_id,
        "applicationId": app,
        "integrationId": iid,
        "session": {
            "updateCount": int(event_id.removeprefix("e")),
            "total": total,
            "cartItems": [
                {
                    "sku": "a",
                    "quantity": 2,
                    "price": 10,
                    "returnedQuantity": returned[0],
                    "additionalCosts": {"wrap": {"price": 1.5}},
                },
                {"sku": "b", "quantity": 1, "price": 5.25, "returnedQuantity": returned[1]},
            ],
        },
    }
    if value is not None:
        doc["return"] = {"value": value}
    return doc


TOTAL = 32.25  # 2 x (10 + 1.5) + 5.25 + shipping 4

SCENARIO = [
    # closed then partially returned (one unit of "a": 11.5), then cancelled: 0 left
    output("talon_session_closed", "s1", "e1", TOTAL),
    output("talon_session_partially_returned", "s1", "e2", TOTAL, (1, 0), 11.5),
    output("talon_session_cancelled", "s1", "e3", TOTAL, (1, 0)),
    # closed, then revoked: 0
    output("talon_session_closed", "s2", "e1", TOTAL),
    output("talon_session_revoked", "s2", "e2", TOTAL),
    # open session cancelled: never counted
    output("talon_session_cancelled", "s3", "e1", TOTAL),
    # closed, reopened, closed again with a smaller total: counts the new total
    output("talon_session_closed", "s4", "e1", TOTAL),
    output("talon_session_reopened", "s4", "e2", TOTAL),
    output("talon_session_closed", "s4", "e3", 20.1),
    # closed and partially returned (the "b" line): 32.25 - 5.25
    output("talon_session_closed", "s5", "e1", TOTAL),
    output("talon_session_partially_returned", "s5", "e2", TOTAL, (0, 1), 5.25),
    # another application
    output("talon_session_closed", "s1", "e1", 0.1, app=2),
    output("talon_session_closed", "s2", "e1", 0.2, app=2),
]


def test_each_record_changes_revenue_as_documented(example: ModuleType) -> None:
    ledger = example.RevenueLedger()
    for doc in SCENARIO:
        assert ledger.record(example.parse(json.dumps(doc)))
    assert ledger.figures() == {1: Decimal("47.1"), 2: Decimal("0.3")}  # 20.1 + 27; 0.1 + 0.2
    assert "application 1: 47.1 from 5 sessions" in ledger.report()


def test_a_session_whose_free_line_was_returned_is_taken_back_when_cancelled(
    example: ModuleType,
) -> None:
    """The return was worth 0, so the ledger took the session for one that was
    open when cancelled, never counted: its revenue stayed."""
    ledger = example.RevenueLedger()
    free = output("talon_session_closed", "s1", "e1", TOTAL)
    free["session"]["cartItems"][1]["price"] = 0
    returned = output("talon_session_partially_returned", "s1", "e2", TOTAL, (0, 1), 0)
    cancelled = output("talon_session_cancelled", "s1", "e3", TOTAL, (0, 1))
    for doc in (returned, cancelled):
        doc["session"]["cartItems"][1]["price"] = 0
    for doc in (free, returned, cancelled):
        assert ledger.record(example.parse(json.dumps(doc)))
    assert ledger.figures() == {1: Decimal(0)}


def test_redelivered_records_are_counted_once(example: ModuleType) -> None:
    ledger = example.RevenueLedger()
    for doc in SCENARIO + SCENARIO[:4]:
        ledger.record(example.parse(json.dumps(doc)))
    assert ledger.duplicates == 4
    assert ledger.figures()[1] == Decimal("47.1")


def test_an_event_id_reused_after_64_commands_is_new_revenue(example: ModuleType) -> None:
    """A session remembers its last 64 eventIds: a close reusing an older one
    is applied again, and the ledger, which counted once per eventId, dropped
    it as a duplicate."""
    ledger = example.RevenueLedger()
    first = output("talon_session_closed", "s1", "e1", TOTAL)
    reopened = output("talon_session_reopened", "s1", "e2", TOTAL)
    again = output("talon_session_closed", "s1", "e67", 20.1)
    for doc in (first, reopened, again):
        doc["eventId"] = "close" if doc is not reopened else "reopen"
    assert [ledger.record(example.parse(json.dumps(d))) for d in (first, reopened, again)] == [
        True,
        True,
        True,
    ]
    assert ledger.figures() == {1: Decimal("20.1")}
    assert not ledger.record(example.parse(json.dumps(again)))  # redelivered: once


def test_the_figure_does_not_depend_on_which_topic_is_read_first(example: ModuleType) -> None:
    by_topic: dict[str, list[dict[str, Any]]] = {}
    for doc in SCENARIO:
        by_topic.setdefault(doc["event"].split("_")[-1], []).append(doc)
    for order in itertools.permutations(by_topic):
        ledger = example.RevenueLedger()
        for topic in order:
            for doc in by_topic[topic]:
                ledger.record(example.parse(json.dumps(doc)))
        assert ledger.figures() == {1: Decimal("47.1"), 2: Decimal("0.3")}


async def test_rejections_on_a_shared_topic_are_skipped(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs and rejections may share a topic (README's settings); the
    first rejection, which has no applicationId, killed the consumer with a
    KeyError."""
    closed = output("talon_session_closed", "c1", "e1", 10)
    values = [json.dumps(closed), json.dumps({"reason": "MALFORMED_JSON", "errors": []})]
    tp = example.TopicPartition("sessions.closed", 0)

    class Consumer(FixedRecordsConsumer):
        records: ClassVar[dict[Any, list[bytes]]] = {tp: values}

    async def partitions(bootstrap_servers: str, topics: list[str]) -> list[Any]:
        return [tp]

    monkeypatch.setattr(example, "AIOKafkaConsumer", Consumer)
    monkeypatch.setattr(example, "_partitions", partitions)
    ledger = example.RevenueLedger()
    await example.consume("k:9092", ["sessions.closed"], ledger, follow=False, out=print)
    assert ledger.records == 1
    assert ledger.figures() == {1: Decimal(10)}
