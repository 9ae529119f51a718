"""The group's assignor, as the group's leader runs it, over a fake cluster."""

from __future__ import annotations

import pytest
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from stream_app import json
from stream_app.pipeline.assignor import RoutingRangeAssignor
from tests.pipeline.fakes import PartitionCounts

COMMANDS, REKEYED, BY_PROFILE = "sessions.commands", "app-rekeyed", "app-by-profile"
STAGE_INPUTS = [COMMANDS, REKEYED, BY_PROFILE]


def _member(url: str, topics: list[str]) -> ConsumerProtocolMemberMetadata:
    return ConsumerProtocolMemberMetadata(0, sorted(topics), url.encode())


def _assigned(assignment: object) -> dict[str, list[int]]:
    return {topic: sorted(partitions) for topic, partitions in assignment.assignment}  # type: ignore[attr-defined]


def test_every_input_of_a_partition_number_goes_to_one_member_with_the_routes() -> None:
    cluster = PartitionCounts(dict.fromkeys(STAGE_INPUTS, 4))
    members = {"a": _member("http://a", STAGE_INPUTS), "b": _member("http://b", STAGE_INPUTS)}
    assigned = RoutingRangeAssignor("http://a").assign(cluster, members)
    assert _assigned(assigned["a"]) == {topic: [0, 1] for topic in STAGE_INPUTS}
    assert _assigned(assigned["b"]) == {topic: [2, 3] for topic in STAGE_INPUTS}
    routes = json.loads(assigned["a"].user_data)
    assert routes == {
        t: {"0": "http://a", "1": "http://a", "2": "http://b", "3": "http://b"}
        for t in STAGE_INPUTS
    }
    assert assigned["b"].user_data == assigned["a"].user_data


def test_a_member_with_other_topics_gets_nothing_and_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker with another command topic under the same app id: before, each
    topic was ranged over the members subscribing to it, so the re-key topic's
    partitions went to another worker than the command topic's of the same
    number, and both waited, for good, for a rebalance to give them the rest."""
    cluster = PartitionCounts({**dict.fromkeys(STAGE_INPUTS, 4), "other.commands": 4})
    members = {
        "a": _member("http://a", STAGE_INPUTS),
        "b": _member("http://b", STAGE_INPUTS),
        "c": _member("http://c", ["other.commands", REKEYED, BY_PROFILE]),
    }
    with caplog.at_level("ERROR"):
        assigned = RoutingRangeAssignor("http://a").assign(cluster, members)
    assert _assigned(assigned["a"]) == {topic: [0, 1] for topic in STAGE_INPUTS}
    assert _assigned(assigned["b"]) == {topic: [2, 3] for topic in STAGE_INPUTS}
    assert _assigned(assigned["c"]) == {}
    [error] = caplog.records
    assert "group members subscribe to different topics: c [" in error.getMessage()
    assert "'other.commands'" in error.getMessage()
