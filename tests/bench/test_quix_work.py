"""The Quix contender's work (``bench/quix_work.py``) makes every output the
bench expects of a session processor, and no other, with the values Quix's
work is meant to compute: two contenders of ``make bench`` run it, and their
rates are compared with each other and with the worker's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_module(name: str) -> ModuleType:
    """``bench/<name>.py``, loaded under a name of its own, leaving ``sys.path``
    alone (``tests/integration`` has a ``workload`` module too)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


step = bench_module("quix_work").step


def run(commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The outputs of ``commands`` in order, each session stored as orjson between them."""
    stored: dict[str, bytes] = {}
    outputs = []
    for command in commands:
        before = stored.get(command["integrationId"])
        session, out = step(command, None if before is None else orjson.loads(before))
        if session is not None:
            stored[command["integrationId"]] = orjson.dumps(session)
        if out is not None:
            outputs.append(out)
    return outputs


def test_the_outputs_are_the_workloads_expected_outputs() -> None:
    work = bench_module("workload").generate(2000)
    outputs = run([orjson.loads(record.value) for record in work.records])
    made = [(out["integrationId"].encode(), out["kind"]) for out in outputs]
    assert made == [(r.key, r.output) for r in work.records if r.output]
    assert {kind for _, kind in made} == {"closed", "cancelled", "returned"}


def update(event_id: str, **session: Any) -> dict[str, Any]:
    return {"type": "update", "integrationId": "s-1", "eventId": event_id, "session": session}


CART = [{"sku": "A", "price": 2.5, "quantity": 2}, {"sku": "B", "price": 0.1, "quantity": 3}]


def test_a_close_totals_the_cart_and_its_costs_and_a_return_its_lines() -> None:
    outputs = run(
        [
            update("e-1", cartItems=CART, additionalCosts={"shipping": {"price": 4.99}}),
            update("e-2", state="closed"),
            {
                "type": "return",
                "integrationId": "s-1",
                "eventId": "e-3",
                "returnedCartItems": [{"position": 1, "quantity": 2}],
            },
        ]
    )
    closed, returned = outputs
    assert closed["kind"] == "closed"
    assert closed["total"] == 10.29  # 5.00 + 0.30 + 4.99
    assert closed["session"]["cartItems"] == CART
    assert "events" not in closed["session"]
    assert returned["kind"] == "returned"
    assert returned["returnedAmount"] == 0.2
    assert returned["returned"] == {"1": 2}


def test_a_repeated_event_is_dropped_while_it_is_among_the_last_64() -> None:
    close = update("e-close", cartItems=CART, state="closed")
    give_back = {
        "type": "return",
        "integrationId": "s-1",
        "eventId": "e-return",
        "returnedCartItems": [{"position": 0, "quantity": 1}],
    }
    fillers = [update(f"e-{n}", attributes={"n": n}) for n in range(63)]
    kinds = [out["kind"] for out in run([close, give_back, *fillers, give_back])]
    assert kinds == ["closed", "returned"]
    # One event more, and e-return is no longer remembered: the repeat applies.
    kinds = [out["kind"] for out in run([close, give_back, *fillers, update("e-63"), give_back])]
    assert kinds == ["closed", "returned", "returned"]


def test_a_duplicate_event_stores_nothing_and_makes_no_output() -> None:
    command = update("e-1", cartItems=CART, state="closed")
    session, out = step(command, None)
    assert session is not None
    assert out is not None
    assert step(command, orjson.loads(orjson.dumps(session))) == (None, None)
