"""The group's assignor, as the group's leader runs it, over a fake cluster."""

from __future__ import annotations

import pytest
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from stream_app import json
from stream_app.pipeline.assignor import RoutingAssignor, sticky_shares
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
    assigned = RoutingAssignor("http://a").assign(cluster, members)
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
        assigned = RoutingAssignor("http://a").assign(cluster, members)
    assert _assigned(assigned["a"]) == {topic: [0, 1] for topic in STAGE_INPUTS}
    assert _assigned(assigned["b"]) == {topic: [2, 3] for topic in STAGE_INPUTS}
    assert _assigned(assigned["c"]) == {}
    [error] = caplog.records
    assert "group members subscribe to different topics: c [" in error.getMessage()
    assert "'other.commands'" in error.getMessage()


def _moved(before: dict[str, list[int]], after: dict[str, list[int]]) -> int:
    owner = {p: m for m, ps in before.items() for p in ps}
    return sum(1 for m, ps in after.items() for p in ps if owner.get(p) != m)


@pytest.mark.parametrize(
    ("partitions", "before", "after", "least"),
    [(12, 2, 3, 4), (12, 5, 6, 2), (12, 9, 10, 1), (12, 3, 2, 4), (6, 1, 2, 3), (12, 10, 2, 8)],
)
def test_a_change_of_the_group_s_size_moves_only_what_balance_needs(
    partitions: int, before: int, after: int, least: int
) -> None:
    """Range assignment moved 6 of 12 partitions from 2 members to 3 (4 must
    move), 9 from 5 to 6 (2 must), 7 from 9 to 10 (1 must): each a restore on
    its new worker."""
    names = [f"stream-app-{i}" for i in range(max(before, after))]
    had = sticky_shares(partitions, {n: [] for n in names[:before]})
    now = sticky_shares(partitions, {n: had.get(n, []) for n in names[:after]})
    assert sorted(p for ps in now.values() for p in ps) == list(range(partitions))
    assert {len(ps) for ps in now.values()} <= {partitions // after, -(-partitions // after)}
    assert _moved(had, now) == least


def test_a_new_group_is_assigned_as_by_range() -> None:
    assert sticky_shares(8, {"b": [], "a": [], "c": []}) == {
        "a": [0, 1, 2],
        "b": [3, 4, 5],
        "c": [6, 7],
    }


def test_stale_or_odd_claims_still_give_every_partition_once() -> None:
    """Two members claiming one partition (one of them stale), a claim past
    the partition count, a member with no claim."""
    shares = sticky_shares(6, {"a": [0, 1, 2, 9], "b": [2, 3], "c": [], "d": [0]})
    assert sorted(p for ps in shares.values() for p in ps) == list(range(6))
    assert shares["a"] == [0, 1]  # its share: two of its own
    assert 3 in shares["b"]
    assert all(1 <= len(ps) <= 2 for ps in shares.values())


def test_the_leader_gives_each_worker_back_what_its_url_owned() -> None:
    """Whichever member leads, it holds the last routing map: the members'
    URLs say what each had, with no change to the protocol (a group with a
    worker of an earlier release agrees on it)."""
    cluster = PartitionCounts(dict.fromkeys(STAGE_INPUTS, 12))
    two = {"m-a": _member("http://a", STAGE_INPUTS), "m-b": _member("http://b", STAGE_INPUTS)}
    leader = RoutingAssignor("http://a")
    leader.on_assignment(leader.assign(cluster, two)["m-a"])
    assert leader.owner(COMMANDS, 11) == "http://b"
    # A third worker joins; the other worker leads now, with the same map.
    three = {**two, "m-c": _member("http://c", STAGE_INPUTS)}
    other = RoutingAssignor("http://b")
    other.on_assignment(leader.assign(cluster, two)["m-b"])
    assigned = {m: _assigned(a) for m, a in other.assign(cluster, three).items()}
    before = {"m-a": list(range(6)), "m-b": list(range(6, 12))}
    after = {m: a[COMMANDS] for m, a in assigned.items()}
    assert _moved(before, after) == 4  # range: 6
    assert set(after["m-a"]) <= set(before["m-a"])
    assert set(after["m-b"]) <= set(before["m-b"])
    for member, topics in assigned.items():  # every input of a number together
        assert all(topics[t] == topics[COMMANDS] for t in STAGE_INPUTS), member


def test_a_url_two_members_advertise_claims_nothing_and_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Workers left to advertise one address (a misconfigured host) cannot be
    told apart by it: they are assigned as new members, never one partition
    twice. Each then took the other's partitions for its own and answered
    their queries 503 for ever, and nothing said why. Said at WARNING with
    both causes: a worker restarted at its address while its former self is
    still a member does it too, until the session timeout (the members say
    at ERROR what lasts longer: test_engine_state)."""
    cluster = PartitionCounts(dict.fromkeys(STAGE_INPUTS, 4))
    same = {
        "m-a": _member("http://x", STAGE_INPUTS),
        "m-b": _member("http://x", STAGE_INPUTS),
        "m-c": _member("http://c", STAGE_INPUTS),
    }
    assignor = RoutingAssignor("http://x")
    with caplog.at_level("WARNING"):
        first = assignor.assign(cluster, same)
    assignor.on_assignment(first["m-a"])
    [warning] = caplog.records
    assert warning.levelname == "WARNING"
    assert warning.getMessage().startswith("group members m-a, m-b all advertise http://x: ")
    assert "restarted at that address" in warning.getMessage()
    assert "STREAM_APP_ADVERTISED_HOST" in warning.getMessage()
    assigned = {m: _assigned(a)[COMMANDS] for m, a in assignor.assign(cluster, same).items()}
    assert sorted(p for ps in assigned.values() for p in ps) == [0, 1, 2, 3]
    assert assigned["m-c"] == _assigned(first["m-c"])[COMMANDS]  # its own, by the map
