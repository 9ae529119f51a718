"""The group's assignor, as the group's leader runs it, over a fake cluster."""

from __future__ import annotations

import pytest
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from stream_app import json
from stream_app.pipeline.assignor import RoutingRangeAssignor, RoutingStickyAssignor, sticky_shares
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


def _claiming(url: str, owned: list[int], topics: list[str] = STAGE_INPUTS) -> object:
    return ConsumerProtocolMemberMetadata(
        0, sorted(topics), json.dumps({"url": url, "owned": owned})
    )


def _moved(before: dict[str, list[int]], after: dict[str, list[int]]) -> int:
    owner = {p: m for m, ps in before.items() for p in ps}
    return sum(1 for m, ps in after.items() for p in ps if owner.get(p) != m)


@pytest.mark.parametrize(
    ("partitions", "before", "after"),
    [(12, 2, 3), (12, 5, 6), (12, 9, 10), (12, 3, 2), (6, 1, 2), (12, 10, 2)],
)
def test_a_change_of_the_group_s_size_moves_only_what_balance_needs(
    partitions: int, before: int, after: int
) -> None:
    """Range assignment moved 6 of 12 partitions from 2 members to 3 (4 must
    move), 9 from 5 to 6 (2 must), 7 from 9 to 10 (1 must): each a restore on
    its new worker. The sticky assignor moves only those."""
    names = [f"stream-app-{i}" for i in range(max(before, after))]
    had = sticky_shares(partitions, {n: [] for n in names[:before]})
    now = sticky_shares(partitions, {n: had.get(n, []) for n in names[:after]})
    assert sorted(p for ps in now.values() for p in ps) == list(range(partitions))
    assert {len(ps) for ps in now.values()} <= {partitions // after, -(-partitions // after)}
    # The fewest moves: what members over their new share give up, and
    # (growing) what the new members take.
    share_max = -(-partitions // after)
    necessary = sum(max(0, len(had.get(n, [])) - share_max) for n in names[:after]) + sum(
        len(ps) for n, ps in had.items() if n not in now
    )
    necessary = max(necessary, sum(len(ps) for n, ps in now.items() if n not in had))
    assert _moved(had, now) == necessary


def test_stale_or_odd_claims_still_give_every_partition_once() -> None:
    """Two members claiming one partition (one of them stale), a claim past
    the partition count, a member with no claim."""
    shares = sticky_shares(6, {"a": [0, 1, 2, 9], "b": [2, 3], "c": [], "d": [0]})
    assert sorted(p for ps in shares.values() for p in ps) == list(range(6))
    assert shares["a"][:2] == [0, 1]  # a keeps two of its own (its share)
    assert 3 in shares["b"]
    assert all(1 <= len(ps) <= 2 for ps in shares.values())


def test_the_sticky_assignor_gives_each_number_s_inputs_together_with_routes() -> None:
    cluster = PartitionCounts(dict.fromkeys(STAGE_INPUTS, 6))
    members = {
        "m-a": _claiming("http://a", [3, 4, 5]),
        "m-b": _claiming("http://b", [0, 1, 2]),
        "m-c": _claiming("http://c", []),
    }
    assigned = RoutingStickyAssignor("http://a").assign(cluster, members)
    a, b, c = (_assigned(assigned[m]) for m in ("m-a", "m-b", "m-c"))
    for topic in STAGE_INPUTS:  # every input of a number on one member
        assert a[topic] == a[COMMANDS]
        assert b[topic] == b[COMMANDS]
        assert c[topic] == c[COMMANDS]
    assert set(a[COMMANDS]) <= {3, 4, 5}
    assert set(b[COMMANDS]) <= {0, 1, 2}
    assert len(a[COMMANDS]) == len(b[COMMANDS]) == len(c[COMMANDS]) == 2
    routes = json.loads(assigned["m-c"].user_data)
    assert {routes[COMMANDS][str(p)] for p in c[COMMANDS]} == {"http://c"}
    assert {routes[BY_PROFILE][str(p)] for p in a[COMMANDS]} == {"http://a"}


def test_a_worker_offers_sticky_then_range_sharing_one_routing() -> None:
    """A group with a worker of an earlier release (range only) agrees on
    range; the routes and what this worker owns are kept either way, and
    its sticky claim carries what range gave it."""
    sticky = RoutingStickyAssignor("http://a")
    ranged = RoutingRangeAssignor(routing=sticky.routing)
    cluster = PartitionCounts(dict.fromkeys(STAGE_INPUTS, 4))
    members = {"a": _member("http://a", STAGE_INPUTS), "b": _member("http://b", STAGE_INPUTS)}
    ranged.on_assignment(ranged.assign(cluster, members)["a"])
    assert sticky.owner(COMMANDS, 3) == "http://b"
    assert sticky.generation == 1
    claim = json.loads(sticky.metadata(STAGE_INPUTS).user_data)
    assert claim == {"url": "http://a", "owned": [0, 1]}
    sticky.url = "http://a2"
    assert ranged.url == "http://a2"
