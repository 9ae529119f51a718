"""The pipeline bench's check of a contender's outputs (``bench/outputs_check.py``):
it passes the worker's and Quix's work's outputs of the workload, and fails
outputs of the wrong kind, of another session, or not JSON, which the count
alone passed."""

from __future__ import annotations

from collections import Counter
from typing import Any

import orjson
import pytest

from stream_app.domain import ApplicationSettings
from stream_app.pipeline.processor import (
    CommandProcessor,
    PartitionSequenceAllocator,
    ProfileProcessor,
    SourceRecord,
    partition_for,
)
from stream_app.settings import TopicNames
from tests.bench.test_quix_work import bench_module, run

check = bench_module("outputs_check")
work = bench_module("workload").generate(400)
EXPECTED: Counter[tuple[bytes, str]] = Counter((r.key, r.output) for r in work.records if r.output)
TOPICS = TopicNames()
WORKER_TOPICS = [getattr(TOPICS, kind) for kind in check.EXPECTED_KINDS]


def worker_outputs() -> list[tuple[str, bytes | None, bytes | None]]:
    """Both stages' processors over the workload, with dict tables: (topic, key, value)."""
    stage1 = CommandProcessor(
        topics=TOPICS,
        rekey_topic="rekeyed",
        profile_topic="by-profile",
        sessions={},
        allocator=PartitionSequenceAllocator({}, 6),
        settings_for=lambda _app: ApplicationSettings(),
        default_application_id=1,
    )
    stage2 = ProfileProcessor(topics=TOPICS, first_sessions={})
    read = []
    for n, r in enumerate(work.records):
        partition = partition_for(r.key, 6)
        source = SourceRecord(TOPICS.commands, partition, n, 1_764_000_000_000, r.key, r.value)
        for out in stage1.process(source):
            outs = [out]
            if out.topic == "by-profile":
                outs = stage2.process(SourceRecord("by-profile", 0, n, 0, out.key, out.value))
            read += [(o.topic, o.key, o.value) for o in outs]
    return read


def quix_outputs() -> list[tuple[str, bytes | None, bytes | None]]:
    outputs = run([orjson.loads(record.value) for record in work.records])
    return [("quix.out", out["integrationId"].encode(), orjson.dumps(out)) for out in outputs]


AMOUNTS = check.expected_amounts(work.records, bench_module("quix_work").step)


def test_the_outputs_of_correct_work_pass() -> None:
    assert check.wrong_outputs(worker_outputs(), WORKER_TOPICS, EXPECTED, AMOUNTS) == ""
    assert check.wrong_outputs(quix_outputs(), ["quix.out"], EXPECTED, AMOUNTS) == ""
    assert sum(map(len, AMOUNTS.values())) > 100  # closes and returns of the workload


def _zero(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with its amount 0, as of a session whose state was lost."""
    if "session" in doc and "event" in doc:
        return {**doc, "session": {**doc["session"], "total": 0}, "return": {"value": 0}}
    return {**doc, "total": 0, "returnedAmount": 0}


@pytest.mark.parametrize("worker", [True, False], ids=["worker", "quix"])
def test_outputs_of_the_right_kinds_with_wrong_amounts_fail(worker: bool) -> None:
    """The check read kinds and keys only: every total and returned value set
    to 0 passed, so a contender that lost its state was timed and counted."""
    read = worker_outputs() if worker else quix_outputs()
    topics = WORKER_TOPICS if worker else ["quix.out"]
    last = max(
        i
        for i, (topic, _, value) in enumerate(read)
        if (topic == WORKER_TOPICS[0] if worker else orjson.loads(value or b"")["kind"] == "closed")
    )
    topic, key, value = read[last]
    read[last] = (topic, key, orjson.dumps(_zero(orjson.loads(value or b""))))
    assert "carries 0, not " in check.wrong_outputs(read, topics, EXPECTED, AMOUNTS)


def _swap_kind(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "kind": "returned" if doc["kind"] != "returned" else "closed"}


@pytest.mark.parametrize(
    ("worker", "spoil", "said"),
    [
        (True, lambda t, k, v: (WORKER_TOPICS[WORKER_TOPICS.index(t) - 1], k, v), "topic"),
        (True, lambda t, k, v: (t, b"other-" + k, v), "keyed"),
        (True, lambda t, k, v: (t, k, b"garbage"), "not JSON"),
        (False, lambda t, k, v: (t, k, orjson.dumps(_swap_kind(orjson.loads(v)))), "than expected"),
    ],
)
def test_outputs_that_only_count_right_fail(worker: bool, spoil: Any, said: str) -> None:
    read = worker_outputs() if worker else quix_outputs()
    topics = WORKER_TOPICS if worker else ["quix.out"]
    read[-1] = spoil(*read[-1])
    read[-5] = spoil(*read[-5])
    assert said in check.wrong_outputs(read, topics, EXPECTED)
