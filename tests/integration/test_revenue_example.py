"""examples/revenue_consumer.py against a real worker: the revenue figure for a
close, a partial return, a revocation, reopens and an eventId used again past
the 64 a session remembers, as a user runs it."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from collections.abc import Callable
from decimal import Decimal
from types import ModuleType

from stream_app import json
from stream_app.client import SessionClient, cart_item, returned_item
from stream_app.domain.model import RECENT_EVENT_IDS
from tests.integration.harness import ROOT, Deployment, Worker, consume, deployment_settings

EXAMPLE = ROOT / "examples" / "revenue_consumer.py"


def _example_module() -> ModuleType:
    """The example as a module (registered: its dataclass looks itself up)."""
    spec = importlib.util.spec_from_file_location("revenue_consumer", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_revenue_of_closes_returns_revocations_and_reopens(
    deployment: Deployment, workers: Callable[..., Worker]
) -> None:
    two_shirts = [cart_item("SHIRT", 2, 19.99)]
    mixed = [cart_item("MUG", 2, 10), cart_item("TEA", 1, 5.5)]  # 25.5
    async with SessionClient(deployment_settings(deployment)) as client:
        # closed: 2 x 19.99 + shipping 4.99 = 44.97
        await client.close_session(
            "s-close", cart_items=two_shirts, additional_costs={"shipping": 4.99}
        )
        # closed 25.5, one mug returned: 15.5
        await client.close_session("s-return", cart_items=mixed)
        await client.return_items("s-return", [returned_item(0, quantity=1)])
        # closed 30, revoked: 0
        await client.close_session("s-revoke", cart_items=[cart_item("LAMP", 1, 30)])
        await client.cancel_session("s-revoke")
        # closed 12, reopened and still open: 0
        await client.close_session("s-reopen", cart_items=[cart_item("BOOK", 1, 12)])
        await client.reopen_session("s-reopen")
        # closed 12, reopened, changed and closed again at 8: 8
        await client.close_session("s-reclose", cart_items=[cart_item("BOOK", 1, 12)])
        await client.reopen_session("s-reclose")
        await client.close_session("s-reclose", cart_items=[cart_item("PEN", 4, 2)])
        # an open cart cancelled: never revenue
        await client.update_session("s-abandon", cart_items=mixed)
        await client.cancel_session("s-abandon")
        # closed 25.5, a tea returned, then the rest cancelled: 0
        close = await client.close_session("s-return-cancel", cart_items=mixed)
        await client.return_items("s-return-cancel", [returned_item(sku="TEA")])
        await client.cancel_session("s-return-cancel")
        # a retry of a close that had arrived: applied once
        await client.close_session("s-return-cancel", event_id=close.event_id, cart_items=mixed)
        # another application
        await client.close_session("s-other", application_id=2, cart_items=[cart_item("X", 3, 0.1)])
        # closed 10, reopened, and closed again by a command that reuses the
        # first close's eventId after 64 more: the worker remembers only the
        # last 64, so it applies it (a second output with that eventId): 10
        await client.close_session(
            "s-reuse", event_id="reuse-close", cart_items=[cart_item("CUP", 1, 10)]
        )
        await client.reopen_session("s-reuse")
        for n in range(RECENT_EVENT_IDS):
            await client.update_session("s-reuse", attributes={"n": n})
        await client.close_session("s-reuse", event_id="reuse-close")
    workers(deployment)
    t = deployment.topics
    topics = [t.closed, t.returned, t.cancelled, t.reopened]
    outputs = await consume(deployment.bootstrap, topics, expect=18, timeout=25)
    assert len(outputs) == 18
    reused = [o.doc() for o in outputs if o.doc().get("eventId") == "reuse-close"]
    assert [doc["session"]["updateCount"] for doc in reused] == [1, RECENT_EVENT_IDS + 3]

    # An output written again (at_least_once, after a crash) counts once; the
    # second close with a reused eventId is another output and counts.
    example = _example_module()
    ledger = example.RevenueLedger()
    counted = [ledger.record(example.parse(o.value)) for o in outputs + outputs]
    assert counted == [True] * 18 + [False] * 18
    assert ledger.figures()[1] == Decimal("78.47")

    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            str(EXAMPLE),
            "--bootstrap-servers",
            deployment.bootstrap,
            "--closed-topic",
            t.closed,
            "--returned-topic",
            t.returned,
            "--cancelled-topic",
            t.cancelled,
            "--reopened-topic",
            t.reopened,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=25,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # 44.97 + 15.5 + 0 + 0 + 8 + 0 + 0 + 10
    assert {app: Decimal(v) for app, v in figures.items()} == {
        "1": Decimal("78.47"),
        "2": Decimal("0.3"),
    }

    plain = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(EXAMPLE), "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "revenue" in plain.stdout
