"""The producer client against a real worker on the real broker: a mistake the
client refuses is rejected by the pipeline with the same reason and pointer, and
what the client sends is applied."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from stream_app import json
from stream_app.client import (
    CommandRejectedError,
    CommandTopicMissingError,
    SessionClient,
    cart_item,
    returned_item,
    validate_command,
)
from stream_app.domain import ApplicationSettings
from stream_app.settings import TopicNames
from tests.integration.harness import Deployment, Worker, consume, deployment_settings, produce


def _update(iid: str, **session: Any) -> dict[str, Any]:
    return {"type": "update", "integrationId": iid, "eventId": f"{iid}-1", "session": session}


#: Mistakes a checkout could make, one session each.
MISTAKES: list[dict[str, Any]] = [
    _update("m-type", cartItems=[{"sku": "a", "quantity": "two", "price": 1}]),
    _update("m-price", cartItems=[{"sku": "a", "quantity": 1}]),
    _update("m-coupon", couponCodes=["C" * 101]),
    _update("m-card", loyaltyCards=["no spaces"]),
    _update("m-ids", identifiers=["i"] * 6),
    _update("m-state", state="shipped"),
    {"type": "delete", "integrationId": "m-kind"},
    {"type": "reopen", "integrationId": "m-event", "eventId": ""},
    {"type": "reopen", "integrationId": "m-app", "applicationId": 0},
    {"type": "return", "integrationId": "m-return", "returnedCartItems": []},
    {"type": "return", "integrationId": "m-line", "returnedCartItems": [{"quantity": 1}]},
    # depends on the application's settings (flattening on: at most 10,000 units)
    _update("m-units", cartItems=[{"sku": "a", "quantity": 10_001, "price": 1}]),
    # over the workers' max_command_bytes
    _update("m-size", attributes={"blob": "x" * 300_000}),
]


async def test_the_client_refuses_what_the_pipeline_rejects_with_the_same_reason(
    deployment: Deployment, workers: Callable[..., Worker]
) -> None:
    settings = deployment_settings(deployment)
    client = SessionClient(settings, application_settings=ApplicationSettings())
    await client.start()
    try:
        refused: dict[str, tuple[str, str]] = {}
        for command in MISTAKES:
            with pytest.raises(CommandRejectedError) as caught:
                await client.send(command)
            refused[command["integrationId"]] = (str(caught.value.reason), caught.value.pointer)
        # Valid commands are sent, keyed by integrationId, with an eventId.
        sent = [
            await client.update_session("ok-1", cart_items=[cart_item("SKU-1", 2, 0.1)]),
            await client.close_session("ok-1", event_id="close-1"),
            await client.return_items("ok-1", [returned_item(0, quantity=1)]),
        ]
    finally:
        await client.stop()
    assert len({s.event_id for s in sent}) == 3
    assert sent[1].event_id == "close-1"
    assert {s.partition for s in sent} == {sent[0].partition}  # one key, one partition

    # The same bytes, past the client, to a real worker.
    await produce(
        deployment.bootstrap,
        deployment.topics.commands,
        [(c["integrationId"].encode(), json.dumps(c)) for c in MISTAKES],
    )
    workers(deployment)
    t = deployment.topics
    outputs = await consume(
        deployment.bootstrap,
        [t.rejected, t.closed, t.returned],
        expect=len(MISTAKES) + 2,
        timeout=25,
        settle=1,
    )
    rejected = {
        (out.key or b"").decode(): (
            out.doc()["reason"],
            out.doc()["errors"][0]["source"]["pointer"],
        )
        for out in outputs
        if out.topic == t.rejected
    }
    assert rejected == refused
    assert len(set(refused.values())) >= 9  # many different reasons and pointers

    applied = {out.topic: out.doc() for out in outputs if out.topic != t.rejected}
    assert applied[t.closed]["eventId"] == "close-1"
    assert applied[t.closed]["session"]["total"] == 0.2
    assert applied[t.returned]["return"]["value"] == 0.1
    assert applied[t.returned]["eventId"] == sent[2].event_id


def test_validate_command_matches_the_client() -> None:
    for command in MISTAKES[:-2]:
        with pytest.raises(CommandRejectedError):
            validate_command(command)


async def test_a_missing_command_topic_is_a_clear_error(
    deployment: Deployment, unique_name: Callable[[str], str]
) -> None:
    settings = deployment_settings(deployment).model_copy(
        update={"topics": TopicNames(commands=unique_name("missing"))}
    )
    with pytest.raises(CommandTopicMissingError, match="stream-app topics create"):
        await SessionClient(settings).start()
