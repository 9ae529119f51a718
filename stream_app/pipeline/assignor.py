"""The group's assignor: range assignment, plus who owns what, for queries.

Range assignment gives every member the same partition numbers of every
input topic (they all have the command topic's partition count), so all
inputs of a task land on one worker. On top of it, as Kafka Streams does
with ``application.server``, each member puts the URL of its HTTP server in
its subscription's user data, and the leader sends every member the whole
map ``topic -> partition -> URL`` in the assignment's user data. Any worker
can then forward a query to the owner of the key's partition.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

from stream_app import json

log = logging.getLogger(__name__)

#: topic -> partition -> advertised URL of its owner.
Routes = dict[str, dict[int, str]]


class RoutingRangeAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """One instance per worker (aiokafka calls its methods on the object given)."""

    name = "stream-app-range"
    version = 0

    def __init__(self, url: str) -> None:
        self.url = url
        #: The last assignment's map; empty until the first assignment.
        self.routes: Routes = {}
        #: Incremented on every assignment (a lookup started before one is stale).
        self.generation = 0

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), self.url.encode())

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        subscribed = self._one_subscription(members)
        ranges = RangePartitionAssignor.assign(cluster, subscribed)
        routes: dict[str, dict[str, str]] = {}
        for member, assignment in ranges.items():
            url = bytes(members[member].user_data or b"").decode("utf-8", "replace")
            for topic, partitions in assignment.assignment:
                for partition in partitions:
                    routes.setdefault(topic, {})[str(partition)] = url
        user_data = json.dumps(routes)
        return {
            member: ConsumerProtocolMemberAssignment(
                self.version, ranges[member].assignment if member in ranges else [], user_data
            )
            for member in members
        }

    @staticmethod
    def _one_subscription(
        members: Mapping[str, ConsumerProtocolMemberMetadata],
    ) -> dict[str, ConsumerProtocolMemberMetadata]:
        """The members that subscribe to the topics most of them do.

        Ranged over members whose subscriptions differ, a topic's partitions
        go to those that subscribe to it, so the inputs of one task would land
        on different workers, and each would wait for a rebalance that does not
        come. A member with other topics (another release, or settings that
        name other topics under the same app id) gets none, and is named."""
        topics = {member: tuple(sorted(meta.subscription)) for member, meta in members.items()}
        counts = Counter(topics.values())
        chosen = max(counts, key=lambda subscription: (counts[subscription], subscription))
        apart = sorted(member for member, subscription in topics.items() if subscription != chosen)
        if apart:
            log.error(
                "group members subscribe to different topics: %s get no partitions, their "
                "subscriptions differing from the %d member(s) subscribing to %s (a worker "
                "of another release, or with other topic settings, under the same app id?)",
                ", ".join(f"{member} {list(topics[member])}" for member in apart),
                counts[chosen],
                list(chosen),
            )
        return {member: members[member] for member in members if topics[member] == chosen}

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        try:
            doc = json.loads(assignment.user_data or b"{}")
            self.routes = {
                topic: {int(p): str(url) for p, url in owners.items()}
                for topic, owners in doc.items()
            }
        except (ValueError, TypeError, AttributeError):
            log.warning(
                "assignment without a readable routing map: queries are answered for this "
                "worker's own partitions only"
            )
            self.routes = {}
        self.generation += 1

    def owner(self, topic: str, partition: int) -> str | None:
        return self.routes.get(topic, {}).get(partition)
