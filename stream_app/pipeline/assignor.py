"""The group's assignor: sticky balanced assignment, plus who owns what, for queries.

Every member gets the same partition numbers of every input topic (they all
have the command topic's partition count), so all inputs of a task land on
one worker. As Kafka Streams does with ``application.server``, each member
puts the URL of its HTTP server in its subscription's user data, and the
leader sends every member the whole map ``topic -> partition -> URL`` in the
assignment's user data. Any worker can then forward a query to the owner of
the key's partition.

That map also makes the assignment sticky, as Kafka Streams' is: the leader
(any member that was in the last generation holds its map; one that just
started holds none, and assigns as by range) gives each member
back the partition numbers its URL owned, as far as a balanced share allows
(:func:`sticky_shares`). Range assignment moved most partitions whenever the
group changed size (2 to 3 members over 12 partitions: 6, where 4 must
move), each a restore on its new worker.

The protocol is unchanged from the range assignor of earlier releases (its
name, and the URL alone as user data), so a group mixing releases agrees on
it; a leader of an earlier release assigns by range. (Offering a second
assignor instead would double every join: aiokafka 0.14 sends one
JoinGroup per assignor it is given.)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

from stream_app import json

log = logging.getLogger(__name__)

#: topic -> partition -> advertised URL of its owner.
Routes = dict[str, dict[int, str]]


class RoutingAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """One instance per worker (aiokafka calls its methods on the object given)."""

    #: The name of earlier releases' range assignor: see the module docstring.
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
        urls = {member: _url(meta) for member, meta in subscribed.items()}
        _name_shared_urls(urls)
        topics = sorted({topic for meta in subscribed.values() for topic in meta.subscription})
        counts = {topic: len(cluster.partitions_for_topic(topic) or ()) for topic in topics}
        numbers = sticky_shares(max(counts.values(), default=0), self._had(urls))
        assigned = {
            member: [(t, [p for p in mine if p < counts[t]]) for t in topics if counts[t]]
            for member, mine in numbers.items()
        }
        routes: dict[str, dict[str, str]] = {}
        for member, assignment in assigned.items():
            for topic, partitions in assignment:
                for partition in partitions:
                    routes.setdefault(topic, {})[str(partition)] = urls[member]
        user_data = json.dumps(routes)
        return {
            member: ConsumerProtocolMemberAssignment(
                self.version, assigned.get(member, []), user_data
            )
            for member in members
        }

    def _had(self, urls: Mapping[str, str]) -> dict[str, list[int]]:
        """The partition numbers each member owned in the last assignment, by
        its URL in the last routing map (a URL two members advertise, or
        none, says nothing: those members are new to it)."""
        advertised = Counter(urls.values())
        by_url: dict[str, set[int]] = {}
        for owners in self.routes.values():
            for partition, url in owners.items():
                by_url.setdefault(url, set()).add(partition)
        return {
            member: sorted(by_url.get(url, ())) if url and advertised[url] == 1 else []
            for member, url in urls.items()
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


def _url(meta: ConsumerProtocolMemberMetadata) -> str:
    """The URL a member advertises in its subscription."""
    return bytes(meta.user_data or b"").decode("utf-8", "replace")


def sticky_shares(partitions: int, had: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """Partition numbers ``0..partitions-1`` shared among the members of
    ``had`` (member -> the numbers it had): each gets ``partitions // m`` or
    one more, keeping as many of its own as that allows; the rest fill the
    shares in member order. Deterministic. A number two members claim is kept
    by the first in member order."""
    order = sorted(had)
    if not order:
        return {}
    base, extra = divmod(partitions, len(order))
    kept: dict[str, list[int]] = {member: [] for member in order}
    taken: set[int] = set()
    for member in order:
        for p in sorted(set(had[member])):
            if 0 <= p < partitions and p not in taken and len(kept[member]) < base + 1:
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
    # The rest in order, filling each member's share in member order: with
    # nothing kept (a new group), exactly range assignment.
    free = iter([p for p in range(partitions) if p not in taken])
    for member in order:
        share = base + (member in more)
        kept[member].extend(next(free) for _ in range(share - len(kept[member])))
    return {member: sorted(numbers) for member, numbers in kept.items()}


def _name_shared_urls(urls: Mapping[str, str]) -> None:
    """Say, at WARNING, which members advertise one URL: each takes every
    partition of the routing map that names it for its own, and answers the
    queries of those it does not hold 503 ("moving"). A worker killed while
    it joined and restarted at its address does it until the group drops its
    former self; workers given one address (a Service's name) for ever, and
    each says so at ERROR once it has lasted past two session timeouts
    (``Engine._watch_the_url``)."""
    advertised = Counter(url for url in urls.values() if url)
    shared = sorted(url for url, count in advertised.items() if count > 1)
    for url in shared:
        log.warning(
            "group members %s all advertise %s: session queries for their partitions "
            "cannot be routed until the group drops all but one. A worker restarted at "
            "that address before the group dropped its former self: the group does "
            "within STREAM_APP_SESSION_TIMEOUT_S. Workers that share one address: give "
            "each its own STREAM_APP_ADVERTISED_HOST (or port), its own host name, not a "
            "Service's",
            ", ".join(sorted(member for member, mine in urls.items() if mine == url)),
            url,
        )
