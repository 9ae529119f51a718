"""The group's committed offsets gone (expired after the broker's
``offsets.retention.minutes`` with no member, or deleted by an operator): the
worker starts from the topics' beginning, and must not apply again what its
restored state holds. Stage 2 keeps no eventIds, so a replay of the by-profile
topic wrote every profiled session's output a second time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import for_code
from aiokafka.protocol.admin import DeleteGroupsRequest

from tests.integration.harness import Deployment, Worker, command, consume, produce

SESSIONS = 12


async def delete_group(bootstrap: str, group: str) -> None:
    """What ``kafka-consumer-groups.sh --delete --group`` does (the group must
    have no member): its committed offsets are gone."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        coordinator = await client.coordinator_lookup(0, group)
        response = await client.send(coordinator, DeleteGroupsRequest([group]))
        ((name, error_code),) = response.results
        assert name == group
        if error_code:
            raise for_code(error_code)(f"deleting group {group}")
    finally:
        await client.close()


def closed(integration_id: str, profile_id: str) -> bytes:
    return command(
        "update",
        integration_id,
        eventId=f"close-{integration_id}",
        session={
            "profileId": profile_id,
            "state": "closed",
            "cartItems": [{"sku": "lamp", "quantity": 1, "price": 25.5}],
        },
    )


async def test_exactly_once_does_not_replay_its_state_when_the_group_offsets_are_gone(
    deployment: Deployment, workers: Callable[..., Worker]
) -> None:
    t = deployment.topics
    await produce(
        deployment.bootstrap,
        t.commands,
        [(f"lost-{i}".encode(), closed(f"lost-{i}", f"p{i % 3}")) for i in range(SESSIONS)],
    )
    first = workers(deployment)
    out = await consume(deployment.bootstrap, [t.closed], expect=SESSIONS, timeout=90)
    assert len(out) == SESSIONS, first.log_tail()
    assert first.stop() == 0, first.log_tail()

    await delete_group(deployment.bootstrap, deployment.env()["STREAM_APP_APP_ID"])

    second = workers(deployment)
    marker = [(b"marker", command("update", "marker", session={"state": "closed"}))]
    await produce(deployment.bootstrap, t.commands, marker)
    # The marker's output comes after whatever a replay would have written
    # at the start; a few seconds more catch anything later.
    outputs = await consume(
        deployment.bootstrap, [t.closed], expect=SESSIONS + 1, timeout=90, settle=5
    )
    counts = Counter(o.doc()["integrationId"] for o in outputs)
    assert counts == Counter({**{f"lost-{i}": 1 for i in range(SESSIONS)}, "marker": 1}), (
        second.log_tail()
    )
    log = second.log_path.read_text(errors="replace")
    assert "past its committed offset" in log, second.log_tail()
    assert second.stop() == 0, second.log_tail()
