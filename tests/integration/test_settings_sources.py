"""Application settings reach the workers from the file and the settings topic."""

from __future__ import annotations

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
