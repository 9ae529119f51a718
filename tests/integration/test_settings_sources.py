"""Application settings reach the workers from the file and the settings topic."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from stream_app import json
from tests.integration.harness import Deployment, Worker, command, consume, create_topics, produce


async def test_settings_from_file_and_topic_decide_validation(
    deployment: Deployment, workers: Callable[..., Worker], tmp_path: Path
) -> None:
    t = deployment.topics
    settings_file = tmp_path / "applications.json"
    settings_file.write_text(json.dumps({"5": {"attributes": ["city"]}}).decode())
    deployment.extra_env["STREAM_APP_APPLICATION_SETTINGS_FILE"] = str(settings_file)
    # Created by an operator as docs/operations.md says: compacted.
    await create_topics(
        deployment.bootstrap, [t.application_settings], 1, {"cleanup.policy": "compact"}
    )
    await produce(
        deployment.bootstrap,
        t.application_settings,
        [
            (b"7", json.dumps({"flattening": False, "additionalCosts": ["shipping"]})),
        ],
    )
    cart = [{"sku": "mug", "quantity": 2, "price": 4.5}]

    def update(iid: str, app: int, **session: object) -> tuple[bytes, bytes]:
        return iid.encode(), command(
            "update", iid, applicationId=app, eventId=f"{iid}-u", session=session
        )

    await produce(
        deployment.bootstrap,
        t.commands,
        [
            update("s7-cost", 7, cartItems=cart, additionalCosts={"giftwrap": {"price": 2}}),
            update(
                "s7-ret",
                7,
                cartItems=cart,
                additionalCosts={"shipping": {"price": 3}},
                state="closed",
            ),
            (
                b"s7-ret",
                command(
                    "return",
                    "s7-ret",
                    applicationId=7,
                    eventId="r1",
                    returnedCartItems=[{"position": 0, "quantity": 1}],
                ),
            ),
            (
                b"s7-ret",
                command(
                    "return",
                    "s7-ret",
                    applicationId=7,
                    eventId="r2",
                    returnedCartItems=[{"position": 0, "quantity": 2}],
                ),
            ),
            update("s5-attr", 5, attributes={"color": "red"}),
            update("s5-ok", 5, attributes={"city": "Berlin"}, state="closed"),
            update(
                "s1-free",
                1,
                attributes={"color": "red"},
                cartItems=cart,
                additionalCosts={"giftwrap": {"price": 2}},
                state="closed",
            ),
        ],
    )
    workers(deployment)
    outputs = await consume(
        deployment.bootstrap, deployment.output_topics(), expect=7, timeout=120, settle=2
    )
    got = sorted(
        (o.key or b"").decode() + ":" + (o.doc().get("event") or o.doc()["reason"]) for o in outputs
    )
    assert got == sorted(
        [
            "s7-cost:UNKNOWN_ADDITIONAL_COST",
            "s7-ret:talon_session_closed",
            "s7-ret:PARTIAL_LINE_RETURN",  # flattening off: whole lines only
            "s7-ret:talon_session_partially_returned",
            "s5-attr:UNKNOWN_ATTRIBUTE",
            "s5-ok:talon_session_closed",
            "s1-free:talon_session_closed",  # no lists configured: anything goes
        ]
    )
    rejected = {(o.key or b"").decode(): o.doc() for o in outputs if o.topic == t.rejected}
    assert rejected["s5-attr"]["errors"][0]["source"]["pointer"] == "/session/attributes/color"


async def test_settings_on_a_partition_added_later_reach_the_running_worker(
    deployment: Deployment, workers: Callable[..., Worker]
) -> None:
    """Only the settings topic's partitions of the worker's start were read:
    settings written to a partition added later never applied, and nothing
    said so."""
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

    t = deployment.topics
    await create_topics(
        deployment.bootstrap, [t.application_settings], 1, {"cleanup.policy": "compact"}
    )
    await produce(deployment.bootstrap, t.application_settings, [(b"7", b"{}")], partition=0)
    worker = workers(deployment)

    def giftwrapped(iid: str) -> tuple[bytes, bytes]:
        return iid.encode(), command(
            "update",
            iid,
            applicationId=9,
            eventId=f"{iid}-u",
            session={"additionalCosts": {"giftwrap": {"price": 2}}, "state": "closed"},
        )

    # Running, with application 9 taking any cost name.
    await produce(deployment.bootstrap, t.commands, [giftwrapped("before")])
    [applied] = await consume(deployment.bootstrap, [t.closed], expect=1, timeout=120)
    assert applied.key == b"before"
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.bootstrap)
    await admin.start()
    try:
        await admin.create_partitions({t.application_settings: NewPartitions(2)})
    finally:
        await admin.close()
    await produce(
        deployment.bootstrap,
        t.application_settings,
        [(b"9", json.dumps({"additionalCosts": ["shipping"]}))],
        partition=1,
    )
    # Within a metadata refresh (10 s) the worker follows the new partition.
    deadline = asyncio.get_running_loop().time() + 60
    while "has 2 partitions now" not in worker.log_tail(100_000):
        assert asyncio.get_running_loop().time() < deadline, worker.log_tail()
        await asyncio.sleep(0.5)
    await asyncio.sleep(1)  # its records read (polls of 0.2 s)
    await produce(deployment.bootstrap, t.commands, [giftwrapped("after")])
    [rejected] = await consume(deployment.bootstrap, [t.rejected], expect=1, timeout=60)
    assert (rejected.key, rejected.doc()["reason"]) == (b"after", "UNKNOWN_ADDITIONAL_COST")
