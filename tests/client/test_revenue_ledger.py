"""The revenue example's arithmetic, without a broker: each output record's
change, duplicates, and a figure that does not depend on the order of topics."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import signal
import sys
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest

from stream_app import json
from tests.pipeline.fakes import EmptyCluster, FixedRecordsConsumer

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
    assert "application 1: 47.1 from 11 outputs" in ledger.report()


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
    assert await example.consume("k:9092", ["sessions.closed"], ledger, follow=False, out=print)
    assert ledger.records == 1
    assert ledger.figures() == {1: Decimal(10)}


def test_sums_are_exact_whatever_order_the_topics_are_read_in(example: ModuleType) -> None:
    """Decimal's default 28 digits rounded a figure of 1e11 plus a total such
    as 0.30000000000000004 (a checkout's 0.1 + 0.2, accepted by the workers):
    99999999999.99999999999999996 or 100000000000 by the order of topics."""
    big = output("talon_session_closed", "big", "e1", 1e11)
    odd = output("talon_session_closed", "odd", "e1", 0.30000000000000004)
    revoked = output("talon_session_revoked", "odd", "e2", 0.30000000000000004)
    for order in ((big, odd, revoked), (revoked, big, odd), (odd, revoked, big)):
        ledger = example.RevenueLedger()
        for doc in order:
            ledger.record(example.parse(json.dumps(doc)))
        assert ledger.figures() == {1: Decimal(100_000_000_000)}


def test_output_keys_are_remembered_per_partition_for_a_window(example: ModuleType) -> None:
    """Every key was kept for ever: about 300 bytes per output, gigabytes after
    weeks of --follow. A duplicate comes soon after its original, on its
    partition (see the module doc)."""
    ledger = example.RevenueLedger(window=2)
    first, second, third = (output("talon_session_closed", f"s{n}", "e1", TOTAL) for n in range(3))
    assert ledger.record(first, "p0")
    assert ledger.record(first, "p1")  # another partition's window
    assert not ledger.record(first, "p0")
    assert ledger.record(second, "p0")
    assert ledger.record(third, "p0")
    assert not ledger.record(third, "p0")
    assert ledger.record(first, "p0")  # past the window: forgotten
    assert len(ledger.seen["p0"]) == 2
    unbounded = example.RevenueLedger(window=0)
    for n in range(5):
        unbounded.record(output("talon_session_closed", f"s{n}", "e1", TOTAL), "p0")
    assert len(unbounded.seen["p0"]) == 5


class _Admin(EmptyCluster):
    """Stands for the admin client of a cluster with ``sessions.closed`` (one
    partition): the topics it was asked to describe."""

    described: ClassVar[list[list[str]]] = []

    async def list_topics(self) -> list[str]:
        return ["sessions.closed"]

    async def describe_topics(self, topics: list[str]) -> list[dict[str, Any]]:
        self.described.append(topics)
        return [{"topic": t, "error_code": 0, "partitions": [{"partition": 0}]} for t in topics]


class _Topics(FixedRecordsConsumer):
    """A consumer of the cluster ``_Admin`` stands for."""


async def test_a_topic_is_looked_up_among_all_not_by_name(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A metadata request naming the topic has a broker with
    auto.create.topics.enable (Apache Kafka's default) create a mistyped one."""
    monkeypatch.setattr(example, "AIOKafkaAdminClient", _Admin)
    monkeypatch.setattr(example, "AIOKafkaConsumer", _Topics)
    ledger = example.RevenueLedger()
    assert await example.consume("k:9092", ["sessions.closed"], ledger, follow=False, out=print)
    with pytest.raises(SystemExit, match=r"topic sessions\.closd does not exist"):
        await example.consume("k:9092", ["sessions.closd"], ledger, follow=False, out=print)
    assert _Admin.described == [["sessions.closed"]]  # never the missing name


async def test_a_history_that_lost_its_first_records_gives_no_figure(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read from the beginning after retention, a return or a revoke whose
    close was deleted subtracted from nothing: a negative figure, printed."""
    tp = example.TopicPartition("sessions.closed", 0)

    class Retained(_Topics):
        async def beginning_offsets(self, partitions: list[Any]) -> dict[Any, int]:
            return dict.fromkeys(partitions, 1200)

    ledger = example.RevenueLedger()
    monkeypatch.setattr(example, "AIOKafkaAdminClient", _Admin)
    monkeypatch.setattr(example, "AIOKafkaConsumer", Retained)
    with pytest.raises(SystemExit, match=r"records are gone \(sessions\.closed\[0\] from 1200"):
        await example.consume("k:9092", [tp.topic], ledger, follow=False, out=print)

    made: list[Any] = []

    class Deleting(_Topics):
        records: ClassVar[dict[Any, list[bytes]]] = {tp: [b"{}"]}

        def __init__(self, **options: object) -> None:
            super().__init__(**options)
            made.append(self)

        async def getmany(self, timeout_ms: int) -> dict[Any, list[Any]]:
            # What aiokafka raises for a fetch below the first offset left,
            # with no reset to jump by.
            assert self.options["auto_offset_reset"] == "none"
            assert self.seeks == [(tp, 0)]  # not "the beginning", wherever it is by then
            raise example.OffsetOutOfRangeError({tp: 0})

    monkeypatch.setattr(example, "AIOKafkaConsumer", Deleting)
    with pytest.raises(SystemExit, match="deleted while being read"):
        await example.consume("k:9092", [tp.topic], ledger, follow=False, out=print)
    assert len(made) == 1


async def test_a_one_shot_run_stopped_before_the_end_prints_no_figure(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job deadline or Ctrl-C printed the part read so far as the figure,
    with exit status 0."""
    tp = example.TopicPartition("sessions.closed", 0)
    closed = json.dumps(output("talon_session_closed", "c1", "e1", 10))

    class Stopped(_Topics):
        records: ClassVar[dict[Any, list[bytes]]] = {tp: [closed, closed]}

        async def getmany(self, timeout_ms: int) -> dict[Any, list[Any]]:
            os.kill(os.getpid(), signal.SIGTERM)  # the stop comes before the end
            await asyncio.sleep(0.05)
            return {}

    monkeypatch.setattr(example, "AIOKafkaAdminClient", _Admin)
    monkeypatch.setattr(example, "AIOKafkaConsumer", Stopped)
    ledger = example.RevenueLedger()
    assert not await example.consume("k:9092", [tp.topic], ledger, follow=False, out=print)

    async def cut_short(*args: object, **kwargs: object) -> bool:
        return False

    monkeypatch.setattr(example, "consume", cut_short)
    assert await asyncio.to_thread(example.main, ["--json"]) == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "stopped before the end: no figure" in captured.err


async def test_a_follow_stops_when_the_topics_gain_partitions(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--follow`` assigned the partitions it found at start: closes of the
    sessions whose keys hash to partitions added later were never read, and
    the figure it printed stayed too low, with no warning."""
    first = example.TopicPartition("sessions.closed", 0)
    found = [[first], [first, example.TopicPartition("sessions.closed", 1)]]

    async def partitions(bootstrap_servers: str, topics: list[str]) -> list[Any]:
        return found.pop(0) if len(found) > 1 else found[0]

    monkeypatch.setattr(example, "AIOKafkaConsumer", _Topics)
    monkeypatch.setattr(example, "_partitions", partitions)
    monkeypatch.setattr(example, "PARTITIONS_CHECKED_EVERY_S", 0.0)
    ledger = example.RevenueLedger()
    with pytest.raises(SystemExit, match="now have 2 partitions, not 1"):
        await example.consume("k:9092", [first.topic], ledger, follow=True, out=print)
