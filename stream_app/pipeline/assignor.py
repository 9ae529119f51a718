"""The group's assignor: range assignment, plus who owns what, for queries.

Range assignment gives every member the same partition numbers of every
input topic (they all have the command topic's partition count), so all
inputs of a task land on one worker. On top of it, as Kafka Streams does
with ``application.server``, each member puts the URL of its HTTP server in
its subscription's user data, and the leader sends every member the whole
map ``topic -> partition -> URL`` in the assignment's user data. Any worker
can then forward a query to the owner of the key's partition.

The group prefers :class:`RoutingStickyAssignor`: each member also says
which partition numbers it had, and keeps them as far as a balanced share
allows, as Kafka Streams' assignor keeps tasks where their state is. Range
assignment moved most partitions on every change of the group's size (2 to 3
members: 6 of 12 partitions, where 4 must move), each a restore on its new
worker. Every member also offers range assignment, so a group with a worker
of an earlier release (which offers only that) agrees on range until the
last one is replaced.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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


@dataclass
class Routing:
    """What a worker's assignors share, whichever the group chose."""

    #: This worker's advertised URL (set once its HTTP server is up).
    url: str = ""
    #: The last assignment's map; empty until the first assignment.
    routes: Routes = field(default_factory=dict)
    #: Incremented on every assignment (a lookup started before one is stale).
    generation: int = 0
    #: The partition numbers this worker was last assigned.
    owned: list[int] = field(default_factory=list)


class RoutingRangeAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """One instance per worker (aiokafka calls its methods on the object given)."""

    name = "stream-app-range"
    version = 0

    def __init__(self, url: str = "", routing: Routing | None = None) -> None:
        self.routing = Routing(url) if routing is None else routing

    @property
    def url(self) -> str:
        return self.routing.url

    @url.setter
    def url(self, value: str) -> None:
        self.routing.url = value

    @property
    def routes(self) -> Routes:
        return self.routing.routes

    @property
    def generation(self) -> int:
        return self.routing.generation

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), self.url.encode())

    def url_of(self, meta: ConsumerProtocolMemberMetadata) -> str:
        """The URL a member advertises in its subscription."""
        return bytes(meta.user_data or b"").decode("utf-8", "replace")

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        subscribed = self._one_subscription(members)
        ranges = RangePartitionAssignor.assign(cluster, subscribed)
        return self._with_routes(members, {member: a.assignment for member, a in ranges.items()})

    def _with_routes(
        self,
        members: Mapping[str, ConsumerProtocolMemberMetadata],
        assigned: Mapping[str, list[tuple[str, list[int]]]],
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        """Each member's assignment, with the whole routing map as user data."""
        routes: dict[str, dict[str, str]] = {}
        for member, assignment in assigned.items():
            url = self.url_of(members[member])
            for topic, partitions in assignment:
                for partition in partitions:
                    routes.setdefault(topic, {})[str(partition)] = url
        user_data = json.dumps(routes)
        return {
            member: ConsumerProtocolMemberAssignment(
                self.version, assigned.get(member, []), user_data
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
        routing = self.routing
        try:
            doc = json.loads(assignment.user_data or b"{}")
            routing.routes = {
                topic: {int(p): str(url) for p, url in owners.items()}
                for topic, owners in doc.items()
            }
        except (ValueError, TypeError, AttributeError):
            log.warning(
                "assignment without a readable routing map: queries are answered for this "
                "worker's own partitions only"
            )
            routing.routes = {}
        routing.owned = sorted({p for _, partitions in assignment.assignment for p in partitions})
        routing.generation += 1

    def owner(self, topic: str, partition: int) -> str | None:
        return self.routes.get(topic, {}).get(partition)


class RoutingStickyAssignor(RoutingRangeAssignor):
    """Balanced like range assignment (every member ``n // m`` or one more
    partition numbers, each number's partitions of every input together), but
    each member keeps what it had as far as its share allows; the rest go to
    the members with the fewest, in member order. Deterministic: the leader
    alone decides, from the members' subscriptions."""

    name = "stream-app-sticky"

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        claim = json.dumps({"url": self.url, "owned": self.routing.owned})
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), claim)

    def url_of(self, meta: ConsumerProtocolMemberMetadata) -> str:
        return self._claim(meta)[0]

    @staticmethod
    def _claim(meta: ConsumerProtocolMemberMetadata) -> tuple[str, list[int]]:
        """The URL a member advertises and the partition numbers it had."""
        try:
            doc = json.loads(meta.user_data or b"{}")
            url, owned = doc["url"], doc["owned"]
            if isinstance(url, str) and isinstance(owned, list):
                return url, [p for p in owned if type(p) is int and p >= 0]
        except (ValueError, TypeError, KeyError):
            pass
        return "", []

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        subscribed = self._one_subscription(members)
        topics = sorted({topic for meta in subscribed.values() for topic in meta.subscription})
        counts = {topic: len(cluster.partitions_for_topic(topic) or ()) for topic in topics}
        numbers = sticky_shares(
            max(counts.values(), default=0),
            {member: self._claim(meta)[1] for member, meta in subscribed.items()},
        )
        assigned = {
            member: [(t, [p for p in mine if p < counts[t]]) for t in topics if counts[t]]
            for member, mine in numbers.items()
        }
        return self._with_routes(members, assigned)


def sticky_shares(partitions: int, had: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """Partition numbers ``0..partitions-1`` shared among the members of
    ``had`` (member -> the numbers it had): each gets ``partitions // m`` or
    one more, keeping as many of its own as that allows. A number two members
    claim (one of them stale) is kept by the first in member order."""
    order = sorted(had)
    if not order:
        return {}
    base, extra = divmod(partitions, len(order))
    kept: dict[str, list[int]] = {member: [] for member in order}
    taken: set[int] = set()
    for member in order:
        for p in sorted(set(had[member])):
            if p < partitions and p not in taken and len(kept[member]) < base + 1:
                kept[member].append(p)
                taken.add(p)
    # One more than the base for ``extra`` members: those that kept that many
    # first, then the others in member order.
    fuller = [m for m in order if len(kept[m]) > base]
    more = set(fuller[:extra])
    more.update([m for m in order if m not in more][: extra - len(more)])
    for member in order:
        share = base + (member in more)
        while len(kept[member]) > share:
            taken.discard(kept[member].pop())
    free = [p for p in range(partitions) if p not in taken]
    for p in free:
        member = min(
            (m for m in order if len(kept[m]) < base + (m in more)),
            key=lambda m: (len(kept[m]), order.index(m)),
        )
        kept[member].append(p)
    return {member: sorted(numbers) for member, numbers in kept.items()}
