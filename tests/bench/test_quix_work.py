"""The Quix contender's work (``bench/quix_work.py``) makes every output the
bench expects of a session processor, and no other: two contenders of
``make bench`` run it, and their rates are compared with the worker's."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from quix_work import step
from workload import generate


def test_the_outputs_are_the_workloads_expected_outputs() -> None:
    work = generate(2000)
    stored: dict[bytes | None, bytes] = {}
    made: list[tuple[bytes | None, str]] = []
    for record in work.records:
        before = stored.get(record.key)
        session, out = step(
            orjson.loads(record.value), None if before is None else orjson.loads(before)
        )
        if session is not None:
            stored[record.key] = orjson.dumps(session)
        if out is not None:
            made.append((record.key, out["kind"]))
    expected = [(r.key, r.output) for r in work.records if r.output]
    assert made == expected
    assert Counter(kind for _, kind in made).keys() == {"closed", "cancelled", "returned"}


def test_a_duplicate_event_stores_nothing_and_makes_no_output() -> None:
    command = {
        "type": "update",
        "integrationId": "s-1",
        "eventId": "e-1",
        "session": {"state": "closed", "cartItems": [{"price": 2.5, "quantity": 2}]},
    }
    session, out = step(command, None)
    assert session is not None
    assert out is not None
    assert out["total"] == 5.0
    assert step(command, orjson.loads(orjson.dumps(session))) == (None, None)
