"""The topics the app uses, and their creation.

The command topic decides the partition count: when it exists (an operator
created it), its count is adopted; otherwise the worker creates it with
``Settings.partitions``. Every internal topic (the re-key and by-profile
topics, and each store's changelog) must have that same count, because a
task owns partition ``p`` of all of them at once. A disagreement is a
:class:`~stream_app.errors.ConfigurationError` naming the topics and counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupCoordinatorNotAvailableError,
    GroupLoadInProgressError,
    KafkaError,
    LeaderNotAvailableError,
    NoError,
    NotCoordinatorForGroupError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    for_code,
)

from stream_app.errors import ConfigurationError
from stream_app.pipeline.checkpoint import recorded_partitions
from stream_app.pipeline.kafka import client_options, committed_offsets, not_authorized
from stream_app.pipeline.processor import BOOKKEEPING_BYTES
from stream_app.settings import Settings

log = logging.getLogger(__name__)

_COMPACTED = {"cleanup.policy": "compact"}
# Outputs are analytics history, kept by the cluster's default retention.
_DEFAULT: dict[str, str] = {}
#: The re-key and by-profile topics, as Kafka Streams creates its repartition
#: topics: records are kept until the worker has processed them and purges
#: them (see ``purge.py``), never lost to a retention shorter than an outage.
_REPARTITION = {
    "cleanup.policy": "delete",
    "retention.ms": "-1",
    # Kafka Streams leaves it to the broker's log.retention.bytes; a cluster
    # that sets one would delete unprocessed records by size.
    "retention.bytes": "-1",
    "segment.bytes": "52428800",
}

#: The stores, in the order of their tasks: stage 1 owns the first two.
SESSIONS_STORE = "sessions"
SESSION_IDS_STORE = "session-ids"
FIRST_SESSIONS_STORE = "first-sessions"
STORES = (SESSIONS_STORE, SESSION_IDS_STORE, FIRST_SESSIONS_STORE)


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]
    #: Must have exactly the command topic's partition count.
    co_partitioned: bool


def rekey_topic(settings: Settings) -> str:
    """Commands that arrived with a key other than their integrationId."""
    return f"{settings.app_id}-sessions.rekeyed"


def profile_topic(settings: Settings) -> str:
    """Stage 2 input: claims and outputs keyed by (applicationId, profileId)."""
    return f"{settings.app_id}-sessions.by-profile"


def changelog_topic(settings: Settings, store: str) -> str:
    """The compacted topic behind a store (Kafka Streams' naming)."""
    return f"{settings.app_id}-{store}-changelog"


def internal_topics(settings: Settings) -> list[str]:
    """The topics the worker names from its app id: it writes and reads them."""
    return [
        rekey_topic(settings),
        profile_topic(settings),
        *(changelog_topic(settings, store) for store in STORES),
    ]


def topic_specs(settings: Settings, partitions: int) -> list[TopicSpec]:
    """Every topic the worker reads or writes, for a command topic of ``partitions``."""
    t = settings.topics
    p = partitions
    specs = [TopicSpec(t.commands, p, _DEFAULT, co_partitioned=True)]
    specs += [
        TopicSpec(name, p, _DEFAULT, co_partitioned=False)
        for name in (t.closed, t.returned, t.cancelled, t.reopened, t.rejected)
    ]
    specs.append(TopicSpec(t.application_settings, 1, _COMPACTED, co_partitioned=False))
    specs.append(TopicSpec(rekey_topic(settings), p, _REPARTITION, co_partitioned=True))
    specs.append(TopicSpec(profile_topic(settings), p, _REPARTITION, co_partitioned=True))
    specs += [
        TopicSpec(changelog_topic(settings, store), p, _COMPACTED, co_partitioned=True)
        for store in STORES
    ]
    return specs


async def _brokers(admin: AIOKafkaAdminClient) -> int:
    """How many brokers the cluster has, or 0 when it would not say."""
    try:
        cluster = await admin.describe_cluster()
    except KafkaError as exc:
        log.debug("describing the cluster failed: %r", exc)
        return 0
    return len(cluster.get("brokers") or ())


async def _broker_min_insync_replicas(admin: AIOKafkaAdminClient) -> str:
    """The ``min.insync.replicas`` a topic created without one gets (the
    broker's), or "" when the cluster would not say."""
    try:
        cluster = await admin.describe_cluster()
        node = (cluster.get("brokers") or [{}])[0].get("node_id")
        if node is None:
            return ""
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.BROKER, str(node))]
        )
    except KafkaError as exc:
        log.debug("describing a broker's configs failed: %r", exc)
        return ""
    for response in described:
        for resource in response.resources:
            if not resource[0]:
                for entry in resource[4]:
                    if entry[0] == "min.insync.replicas" and entry[1] is not None:
                        return str(entry[1])
    return ""


_FIRST: Final = "-first"


def _refuse_a_shared_changelog(settings: Settings, existing: set[str]) -> None:
    """App ``X-first``'s sessions changelog is app ``X``'s first-sessions
    changelog (``X-first-sessions-changelog``): two such apps on one cluster
    each restore the other's records, and the compaction and tombstones of
    one overwrite the other's. An app id is checked against both its
    neighbours (``a-first`` against ``a`` and ``a-first-first``).

    The ``X-first`` side is refused when it sees any topic of app ``X`` (its
    own topic list: another principal's topics may be hidden from it), and
    warned otherwise. App ``X`` is refused when it sees topics of app
    ``X-first`` and none of its own (it is the newcomer); one that has run,
    maybe for long, is told at ERROR and goes on: refusing it would stop a
    deployment that was there first."""
    app = settings.app_id
    if app.endswith(_FIRST):
        _refuse_a_changelog_shared_with(settings, existing, app.removesuffix(_FIRST))
    _refuse_a_changelog_shared_with(settings, existing, app)


def _only_of(settings: Settings, app: str) -> set[str]:
    """The internal topics of app id ``app`` that no other app id names: not
    its first-sessions changelog (app ``app-first``'s sessions changelog),
    nor, for an id ending in ``-first``, its sessions changelog."""
    of_app = settings.model_copy(update={"app_id": app})
    shared = {changelog_topic(of_app, FIRST_SESSIONS_STORE)}
    if app.endswith(_FIRST):
        shared.add(changelog_topic(of_app, SESSIONS_STORE))
    return set(internal_topics(of_app)) - shared


def _refuse_a_changelog_shared_with(settings: Settings, existing: set[str], first: str) -> None:
    """:func:`_refuse_a_shared_changelog` for the pair of apps ``first`` and
    ``first-first``, one of which is this app."""
    app = settings.app_id
    newcomer = app != first  # this app is the -first one
    other = first if newcomer else first + _FIRST
    shared = changelog_topic(settings.model_copy(update={"app_id": first}), FIRST_SESSIONS_STORE)
    found = ", ".join(sorted(_only_of(settings, other) & existing))
    mine = _only_of(settings, app)
    if found and (newcomer or not mine & existing):
        its = "first-sessions changelog" if newcomer else "sessions changelog"
        raise ConfigurationError(
            f"app id {app} shares the topic {shared} with app {other} (its "
            f"{its}), whose topics exist on this cluster ({found}): give this app "
            "another id (STREAM_APP_APP_ID)"
        )
    if newcomer:
        log.warning(
            "app id %s: its sessions changelog %s is also the first-sessions changelog "
            "of an app with id %s; never run one on this cluster (or give this app "
            "another id)",
            app,
            shared,
            other,
        )
    elif found:
        log.error(
            "topics of app %s exist on this cluster (%s): its sessions changelog is this "
            "app's first-sessions changelog, %s, and each restores the other's records. "
            "Stop app %s and give it another id",
            other,
            found,
            shared,
            other,
        )


async def _refuse_unwritable_creations(
    admin: AIOKafkaAdminClient, settings: Settings, missing: list[str]
) -> None:
    """Raise ConfigurationError, before anything is created, when ``missing``
    would be created with fewer replicas than the broker's
    ``min.insync.replicas``: Kafka would refuse every write to them. Found
    only after creating them, the refusal left the topics behind, and each
    later start refused them again until an operator deleted them."""
    if not missing:
        return
    needed = await _broker_min_insync_replicas(admin)
    if needed.isdigit() and int(needed) > settings.replication_factor:
        raise ConfigurationError(
            f"the broker's min.insync.replicas is {needed}, more than "
            f"STREAM_APP_REPLICATION_FACTOR={settings.replication_factor}: Kafka would refuse "
            f"every write to the topics this would create ({', '.join(missing)}), so none "
            f"was created. Set STREAM_APP_REPLICATION_FACTOR to at least {needed}"
        )


async def _described(
    admin: AIOKafkaAdminClient, names: list[str], *, strict: bool = True
) -> dict[str, list[Any]]:
    """The partitions (with their replicas) of ``names``, every one of which
    exists. When ``strict``, one the broker does not describe raises: not
    authorized, a ConfigurationError; anything else (a topic just created
    elsewhere, whose leader is not elected yet, or a broker whose metadata is
    behind) a Kafka error the caller retries. Read as missing, the command
    topic's count was replaced by STREAM_APP_PARTITIONS, and the internal
    topics created to it. Otherwise such a topic is left out."""
    described: dict[str, list[Any]] = {}
    for entry in await admin.describe_topics(names):
        code = entry.get("error_code")
        if not code and entry.get("partitions"):
            described[entry["topic"]] = entry["partitions"]
        elif strict and code == TopicAuthorizationFailedError.errno:
            # "This principal": `stream-app topics create` and `tail` ask too.
            raise ConfigurationError(
                f"Kafka does not authorize this principal to describe {entry['topic']}: grant "
                "it Describe on the topic"
            )
    missing = [name for name in names if name not in described]
    if strict and missing:
        raise LeaderNotAvailableError(f"Kafka lists but does not describe {', '.join(missing)}")
    return described


#: How long a group coordinator not yet available, loading or moving is
#: asked again before the start's backoff says so, and how often.
_COORDINATOR_QUIET_S: Final = 5.0
_COORDINATOR_PAUSE_S: Final = 0.25
_COORDINATOR_MOVING: Final = (
    GroupCoordinatorNotAvailableError,
    GroupLoadInProgressError,
    NotCoordinatorForGroupError,
)


async def _refuse_a_changed_partition_count(settings: Settings, partitions: int) -> None:
    """Refuse to start when the group's committed offsets record state built
    for another partition count (``checkpoint.offset_metadata``).

    Partitions added to every co-partitioned topic together (a changed
    KafkaTopic label, or the answer to the check of the counts above) pass
    that check, and a worker on an empty disk would restore the changelogs of
    the old layout into the new one: sessions on partitions their keys no
    longer hash to, and session ids given twice. A worker that keeps its disk
    is refused by its layout file; this refuses the others.
    """
    deadline = time.monotonic() + _COORDINATOR_QUIET_S
    while True:
        try:
            committed = await committed_offsets(client_options(settings), settings.app_id)
            break
        except KafkaError as exc:
            refused = not_authorized(exc)
            if refused is not None:
                raise refused from exc
            # A new cluster makes its offsets topic at the first group's
            # lookup, and answers "not available" meanwhile: asked again
            # quietly for a few seconds, as a consumer's join does, before
            # the start's backoff says anything. Not a timeout or a lost
            # connection: the backoff says those at once.
            if not isinstance(exc, _COORDINATOR_MOVING) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(_COORDINATOR_PAUSE_S)
    inputs = {settings.topics.commands, rekey_topic(settings), profile_topic(settings)}
    other = sorted(
        # The command topic's named first. Only the worker's inputs: offsets
        # left for a topic it no longer reads say nothing of its state.
        (tp.topic != settings.topics.commands, tp.topic, tp.partition, count)
        for tp, (_, metadata) in committed.items()
        if tp.topic in inputs
        and (count := recorded_partitions(metadata)) is not None
        and count != partitions
    )
    if other:
        _, topic, partition, count = other[0]
        raise ConfigurationError(
            f"group {settings.app_id} committed offsets for state built for {count} "
            f"partitions ({topic}[{partition}] and {len(other) - 1} more), but the command "
            f"topic {settings.topics.commands} has {partitions}: partitions were added to "
            "the deployment's topics. The stores and the session ids depend on the count: "
            "re-partitioning is a migration to a new app id (docs/operations.md, Migrate)"
        )


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    """Partition counts of ``names``, every one of which exists (see _described)."""
    return {name: len(partitions) for name, partitions in (await _described(admin, names)).items()}


@dataclass(frozen=True, slots=True)
class TopicLayout:
    """What the worker learns from the cluster before it starts."""

    #: The command topic's partition count: every task's partition range.
    partitions: int
    #: The largest record every topic the worker writes accepts.
    max_record_bytes: int
    #: Topics whose records the worker needs for ever but whose config deletes
    #: them (see :func:`check_retention`), each with the config that does.
    deleting: tuple[str, ...] = ()
    #: Internal topics whose config deletes records the worker may not have
    #: processed yet (an operator's or an older worker's), likewise.
    expiring: tuple[str, ...] = ()
    #: Each topic's configs, as the broker described them after the topics were
    #: created (those it would not describe are left out).
    configs: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: Internal topics of records in flight (re-key, by-profile) that compact:
    #: a backlog would lose all but each key's newest record (check_retention).
    compacting: tuple[str, ...] = ()
    #: Topics the worker writes whose min.insync.replicas exceeds their
    #: replicas: every write to them fails (check_retention).
    unwritable: tuple[str, ...] = ()
    #: What compacts the command topic, if anything (check_retention warns).
    commands_compacted: str | None = None
    #: What compacts the rejection topic, if anything (check_retention refuses).
    rejections_compacted: str | None = None
    #: The partition count of each downstream topic the broker described.
    output_partitions: Mapping[str, int] = field(default_factory=dict)
    #: The topics the worker writes whose max.message.bytes is
    #: ``max_record_bytes`` (none when no config was described).
    max_record_topics: tuple[str, ...] = ()


#: CreateTopics' answer when creations are throttled (aiokafka has no class for it).
_THROTTLING_QUOTA_EXCEEDED: Final = 89

#: Kafka's default for message.max.bytes, used when a topic's config is unreadable.
_KAFKA_DEFAULT_MAX_MESSAGE_BYTES: Final = 1_048_588


#: Attempts at the topics, RACE_PAUSE_S apart, while another client creates
#: them (a worker and `stream-app traffic` started together, say).
RACE_ATTEMPTS = 10
RACE_PAUSE_S = 1.0


async def ensure_topics(
    settings: Settings, *, worker: bool = False, declaring: bool = False
) -> TopicLayout:
    """Create the missing topics; return the partition count and record limit.

    ``worker``: the caller is a worker, which says at WARNING that it had to
    create the command topic (``stream-app topics create`` and ``traffic``
    mean to). ``declaring``: the caller is ``stream-app topics create``,
    whose principal is told what it lacks to create the topics, not to have
    them created by that same command.

    Raises ConfigurationError when an existing co-partitioned topic disagrees
    with the command topic's count. (:func:`check_topics` checks the
    record limit against the configured session size.) Another client
    creating the topics meanwhile is waited for, about RACE_ATTEMPTS seconds.
    """
    for _ in range(RACE_ATTEMPTS - 1):
        try:
            return await _ensure_topics(settings, worker=worker, declaring=declaring)
        except (TopicAlreadyExistsError, LeaderNotAvailableError) as exc:
            log.info("topics being created meanwhile (%s): looking again", exc)
            await asyncio.sleep(RACE_PAUSE_S)
    try:
        return await _ensure_topics(settings, worker=worker, declaring=declaring)
    except TopicAlreadyExistsError:
        # Still there to CreateTopics and still not listed: no race, but a
        # principal that may create topics and not describe this one.
        whose = "this principal" if declaring else "this worker's principal"
        raise ConfigurationError(
            f"Kafka says the command topic {settings.topics.commands} exists, but does not "
            f"show it to {whose}: grant it Describe (and Read) on the topic"
        ) from None


async def _ensure_topics(settings: Settings, *, worker: bool, declaring: bool) -> TopicLayout:
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        _refuse_a_shared_changelog(settings, existing)
        names = [s.name for s in topic_specs(settings, settings.partitions)]
        counts = await _partition_counts(admin, [n for n in names if n in existing])
        partitions = counts.get(settings.topics.commands, settings.partitions)
        if settings.topics.commands in counts and partitions != settings.partitions:
            log.info(
                "command topic %s exists with %d partitions: using %d for every internal topic",
                settings.topics.commands,
                partitions,
                partitions,
            )
        specs = topic_specs(settings, partitions)

        def differing(counts: Mapping[str, int]) -> list[str]:
            """The co-partitioned topics among ``counts`` without ``partitions``."""
            return [
                f"{s.name} has {counts[s.name]}"
                for s in specs
                if s.co_partitioned and s.name in counts and counts[s.name] != partitions
            ]

        mismatched = differing(counts)
        if mismatched and settings.topics.commands not in counts:
            # Its count above is STREAM_APP_PARTITIONS, not the deployment's.
            raise ConfigurationError(
                f"the command topic {settings.topics.commands} does not exist, but topics "
                f"of this deployment do: {', '.join(mismatched)} partitions. Is "
                "STREAM_APP_TOPICS__COMMANDS the topic the checkout systems write?"
            )
        if mismatched:
            raise ConfigurationError(
                f"partition counts disagree: command topic {settings.topics.commands} has "
                f"{partitions}, but {', '.join(mismatched)}; internal topics must have the "
                "command topic's count (re-partitioning is a migration, not a setting)"
            )
        if worker:
            await _refuse_a_changed_partition_count(settings, partitions)
        await _refuse_unwritable_creations(
            admin, settings, [s.name for s in specs if s.name not in existing]
        )
        created: list[str] = []
        refused: list[str] = []
        # Of those refused: for want of an ACL, and for anything else.
        unauthorized = otherwise = False
        raced: list[str] = []
        for spec in specs:
            if spec.name in existing:
                continue
            new = NewTopic(
                spec.name,
                num_partitions=spec.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=spec.config,
            )
            # aiokafka returns the broker's answer for each topic; it raises none.
            for topic_error in (await admin.create_topics([new])).topic_errors:
                error = for_code(topic_error[1])
                detail = topic_error[2] if len(topic_error) > 2 else None
                if error is NoError:
                    created.append(spec.name)
                elif error.retriable or topic_error[1] == _THROTTLING_QUOTA_EXCEEDED:
                    # The controller moved, the request timed out (the topic may
                    # exist now), creations are throttled: the caller retries.
                    raise error(f"creating {spec.name}: {detail or error.description}")
                elif error is TopicAlreadyExistsError and spec.name == settings.topics.commands:
                    # Created meanwhile, maybe with another count: the internal
                    # topics must take its count, so start over (the caller retries).
                    raise TopicAlreadyExistsError(
                        f"{spec.name} was created meanwhile: reading its partition count"
                    )
                elif error is TopicAlreadyExistsError:  # another worker won the race
                    raced.append(spec.name)
                else:
                    refused.append(f"{spec.name}: {error.__name__} ({detail or error.description})")
                    if error in (TopicAuthorizationFailedError, ClusterAuthorizationFailedError):
                        unauthorized = True
                    else:
                        otherwise = True
        if refused and declaring:
            # Not the worker's advice, to run `stream-app topics create` with a
            # principal that may, nor of "this worker's principal": that
            # command is the one refused, and its principal no worker's.
            advice = []
            if unauthorized:
                advice.append(
                    "This principal may not create topics: grant it Create (on the cluster, "
                    "or on these topics), or run `stream-app topics create` with a principal "
                    "that has it. (A topic that exists, but that this principal may not "
                    "describe, is refused the same way: grant it Describe on the topic.)"
                )
            if otherwise:
                advice.append("Fix the setting the broker names.")
            raise ConfigurationError(
                f"cannot create the topics: {'; '.join(refused)}. {' '.join(advice)}"
            )
        if refused:
            raise ConfigurationError(
                f"cannot create the topics: {'; '.join(refused)}. Have an operator create "
                "them (stream-app topics create, with a principal that may), or fix the "
                "setting the broker names. (A topic that exists, but that this worker's "
                "principal may not see, is refused the same way: grant it the ACLs "
                "docs/operations.md lists.)"
            )
        if raced:
            # Their creator chose the partition counts: check them, as those of
            # the topics found existing above.
            named = [s.name for s in specs if s.co_partitioned]
            raced_apart = differing(await _partition_counts(admin, named))
            if raced_apart:
                raise ConfigurationError(
                    f"partition counts disagree: this worker created topics for {partitions} "
                    f"partitions while another created some of them: {', '.join(raced_apart)}. "
                    "Give every worker the same STREAM_APP_PARTITIONS. Started again, a "
                    "worker takes the command topic's count, and names any topic that "
                    "differs from it"
                )
        configs, undescribed = await _topic_configs(admin, names)
        # Not the topics it only reads: their limits do not bound it. Their
        # replicas are checked (checkout systems write the command topic) but
        # refused only when this start created them (see check_retention).
        read_only = {settings.topics.commands, settings.topics.application_settings}
        written = [s.name for s in specs if s.name not in read_only]
        described = await _described(admin, names, strict=False)
        replicas = {
            name: min((len(p.get("replicas", ())) for p in partitions), default=0)
            for name, partitions in described.items()
        }
        t = settings.topics
        outputs = {t.closed, t.returned, t.cancelled, t.reopened}
        output_partitions = {
            name: len(partitions) for name, partitions in described.items() if name in outputs
        }
        # Not of the topics an operator made for the worker to read: Kafka
        # Streams says nothing of its source topics' replicas either.
        single = [
            name
            for name in names
            if replicas.get(name) == 1 and (name not in read_only or name in created)
        ]
        brokers = await _brokers(admin) if single else 0
    finally:
        await admin.close()
    if created:
        log.info("created topics: %s", ", ".join(created))
    if worker and settings.topics.commands in created:
        # Kafka Streams refuses a missing source topic; a name mistyped here
        # would give a worker that runs, ready, and reads nothing.
        log.warning(
            "the command topic %s did not exist: created it (%d partitions). If the "
            "checkout systems write another topic, set STREAM_APP_TOPICS__COMMANDS to it",
            settings.topics.commands,
            partitions,
        )
    if brokers > 1:
        # Kafka Streams takes the broker's default.replication.factor; the
        # CreateTopics versions aiokafka sends (up to v3) cannot ask for it.
        log.warning(
            "%s %s one replica on a cluster of %d brokers: losing one broker's disk "
            "loses their records. Set STREAM_APP_REPLICATION_FACTOR (3 is usual; the "
            "default is 1) before the topics are created, or raise theirs with "
            "kafka-reassign-partitions",
            ", ".join(single),
            "has" if len(single) == 1 else "have",
            brokers,
        )
    if undescribed:
        log.warning(
            "Kafka would not describe the configs of %s (no DescribeConfigs ACL?): the "
            "worker cannot check their retention, compaction or "
            "min.insync.replicas, and takes the record limit from the topics described "
            "(Kafka's default, %d bytes, if none)",
            ", ".join(undescribed),
            _KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
        )
    unwritable: list[str] = []
    unwritable_read: list[str] = []
    for name in names:
        have = replicas.get(name)  # 0 or None: the answer named none, nothing to go on
        if not have and name in created:  # not shown yet by the broker that answered
            have = settings.replication_factor
        # A topic just created and not known yet to the broker that answers
        # DescribeConfigs has the broker's min.insync.replicas, which
        # _refuse_unwritable_creations checked before creating it.
        needed = configs.get(name, {}).get("min.insync.replicas", "")
        if have and needed.isdigit() and int(needed) > have:
            plural = "s" if have != 1 else ""
            problem = f"{name} ({have} replica{plural}, min.insync.replicas={needed})"
            if name in read_only and name not in created:
                unwritable_read.append(problem)
            else:
                unwritable.append(problem)
    if unwritable_read:
        # Not the worker's to refuse (an operator made them): its own start
        # goes on, but their writers' does not.
        log.warning(
            "%s: Kafka refuses the writes of checkout systems and settings writers "
            "(acks=all) to these topics, which have fewer replicas than "
            "min.insync.replicas asks. Raise their replicas (kafka-reassign-partitions) or "
            "lower their min.insync.replicas",
            "; ".join(unwritable_read),
        )
    limits = {
        n: int(c["max.message.bytes"])
        for n in written
        if "max.message.bytes" in (c := configs.get(n, {}))
    }
    max_record_bytes = min(limits.values(), default=_KAFKA_DEFAULT_MAX_MESSAGE_BYTES)

    def flagged(
        config: Mapping[str, str], why: Callable[[Mapping[str, str]], str | None]
    ) -> tuple[str, ...]:
        """Each topic created with ``config`` whose config as described has a
        ``why``, named with it."""
        return tuple(
            f"{s.name} ({reason})"
            for s in specs
            if s.config == config and (reason := why(configs.get(s.name, {})))
        )

    return TopicLayout(
        partitions,
        max_record_bytes,
        flagged(_COMPACTED, deletes_records),
        flagged(_REPARTITION, deletes_records),
        configs,
        flagged(_REPARTITION, compacts),
        tuple(unwritable),
        compacts(configs.get(settings.topics.commands, {})),
        compacts(configs.get(settings.topics.rejected, {})),
        output_partitions,
        tuple(n for n, limit in limits.items() if limit == max_record_bytes),
    )


def check_topics(settings: Settings, layout: TopicLayout) -> None:
    """Raise ConfigurationError when a stored session could make an output
    larger than the topics take (:func:`_session_limit_refusal`), or for what
    :func:`check_retention` refuses: every refusal of both in one error,
    after every warning. An operator checking a release with ``stream-app
    topics create`` (docs/operations.md, Upgrade) fixed one topic per run
    before. The worker's check: a producer of commands does not need it."""
    limit = _session_limit_refusal(settings, layout)
    _refuse(([limit] if limit else []) + _retention_refusals(settings, layout))


def _refuse(refusals: list[str]) -> None:
    """Raise ConfigurationError of ``refusals``, numbered if several."""
    if len(refusals) == 1:
        raise ConfigurationError(refusals[0])
    if refusals:
        raise ConfigurationError(
            " ".join(f"({n}) {refusal}." for n, refusal in enumerate(refusals, 1))
        )


def _session_limit_refusal(settings: Settings, layout: TopicLayout) -> str | None:
    most = largest_session_bytes(layout.max_record_bytes)
    if settings.max_session_bytes > most:
        # An operator raises the limit of the topics named, not of every topic.
        of = f" of {', '.join(layout.max_record_topics)}" if layout.max_record_topics else ""
        return (
            f"max_session_bytes {settings.max_session_bytes} is too large for the topics' "
            f"record limit of {layout.max_record_bytes} bytes (max.message.bytes{of}): with "
            f"what a return, cancel or reopen may add past it (a quarter of it, at most "
            f"{BOOKKEEPING_BYTES}), a stored session may take at most a third of that "
            f"limit, so it may be at most {most}"
        )
    return None


def largest_session_bytes(max_record_bytes: int) -> int:
    """The largest ``max_session_bytes`` the topics' record limit allows.

    A stored session becomes an output document (field names, computed
    totals), at most about twice its stored size: with room for that and the
    envelope, a session takes at most a third of the limit, including the
    allowance past ``max_session_bytes`` of a return, a cancel or a reopen
    (``Limits.bookkeeping_bytes``). Without a quarter of the session limit
    (or BOOKKEEPING_BYTES) of it, a closed session at its limit took none of
    them: its revenue could never be corrected.
    """
    third = max_record_bytes // 3
    if third - BOOKKEEPING_BYTES >= 4 * BOOKKEEPING_BYTES:
        return third - BOOKKEEPING_BYTES
    return third * 4 // 5  # s + s // 4 <= third


def check_retention(settings: Settings, layout: TopicLayout) -> None:
    """Raise ConfigurationError when a topic whose every key's last record the
    worker needs (a store's changelog, the settings topic) deletes records by
    time or size; warn when an internal topic does (see ``expiring``). The
    worker's check: a producer of commands does not need it. Every refusal
    is named, after every warning."""
    _refuse(_retention_refusals(settings, layout))


def _retention_refusals(settings: Settings, layout: TopicLayout) -> list[str]:
    """What :func:`check_retention` refuses; its warnings said."""
    refusals: list[str] = []
    if layout.deleting:
        refusals.append(
            f"{'; '.join(layout.deleting)}: these topics would delete records the worker "
            "needs, a changelog being its store's only copy and the settings topic every "
            "application's settings, so a restore would silently lose sessions or settings. "
            "Make each compacted (kafka-configs.sh --bootstrap-server "
            f"{settings.bootstrap_servers} --alter --entity-type topics --entity-name NAME "
            "--add-config cleanup.policy=compact), or keep its records for ever "
            "(retention.ms=-1 and retention.bytes=-1)"
        )
    if layout.unwritable:
        # A transactional producer retries NOT_ENOUGH_REPLICAS for ever: the
        # worker would stay up and ready and write nothing.
        refusals.append(
            f"{'; '.join(layout.unwritable)}: Kafka refuses every write to these topics, "
            "which have fewer replicas than min.insync.replicas asks (the broker's default "
            "applies to the topics the worker creates). Set STREAM_APP_REPLICATION_FACTOR "
            "to at least min.insync.replicas and recreate them, or lower the topics' "
            f"min.insync.replicas (kafka-configs.sh --bootstrap-server "
            f"{settings.bootstrap_servers} --alter --entity-type topics --entity-name NAME "
            "--add-config min.insync.replicas=N)"
        )
    if layout.compacting:
        refusals.append(
            f"{'; '.join(layout.compacting)}: compaction keeps only each key's newest "
            "record, so a backlog would lose commands and outputs the workers have not "
            "processed yet (a session's earlier commands, a profile's earlier outputs). "
            "The workers purge what they have processed: make each delete by nothing "
            f"(kafka-configs.sh --bootstrap-server {settings.bootstrap_servers} --alter "
            "--entity-type topics --entity-name NAME --add-config "
            "cleanup.policy=delete,retention.ms=-1,retention.bytes=-1)"
        )
    if layout.rejections_compacted:
        # Kafka refuses a record without a key on a compacted topic, and the
        # rejection of a keyless command has none: its transaction failed,
        # the task replayed it and failed again, and the partition stalled.
        refusals.append(
            f"the rejection topic {settings.topics.rejected} is compacted "
            f"({layout.rejections_compacted}): Kafka refuses the rejection of a command "
            "sent without a key there, which would stop its partition, and compaction "
            "keeps only the newest rejection of each key. Make it delete by time "
            f"(kafka-configs.sh --bootstrap-server {settings.bootstrap_servers} --alter "
            f"--entity-type topics --entity-name {settings.topics.rejected} --add-config "
            "cleanup.policy=delete)"
        )
    if layout.commands_compacted:
        # The checkout systems' topic: not the worker's to refuse.
        log.warning(
            "the command topic %s is compacted (%s): compaction keeps only each "
            "integrationId's newest command, so in a backlog a session's earlier commands "
            "vanish before a worker reads them, applied or rejected by none. Make it delete "
            "by time instead (cleanup.policy=delete)",
            settings.topics.commands,
            layout.commands_compacted,
        )
    if layout.expiring:
        # Safe while the workers keep up: a warning, not a refusal, so that a
        # deployment whose topics an older worker created still starts.
        log.warning(
            "%s: records the workers have not processed yet are deleted after this "
            "retention, so an outage longer than it loses commands or outputs. The worker "
            "purges what it has processed: set retention.ms=-1 and retention.bytes=-1 "
            "(kafka-configs.sh --bootstrap-server %s --alter --entity-type topics "
            "--entity-name NAME --add-config retention.ms=-1,retention.bytes=-1)",
            "; ".join(layout.expiring),
            settings.bootstrap_servers,
        )
    return refusals


def _cleanup_policy(config: Mapping[str, str], policy: str) -> str | None:
    """A topic's ``cleanup.policy`` when it includes ``policy`` (``delete`` or
    ``compact``; Kafka takes both, comma-separated), else None."""
    policies = config.get("cleanup.policy")
    if policies is None or policy not in {p.strip() for p in policies.split(",")}:
        return None
    return policies


def deletes_records(config: Mapping[str, str]) -> str | None:
    """What in a topic's ``config`` deletes records by time or size, or None
    (compacted, retained for ever, or the config unreadable)."""
    policy = _cleanup_policy(config, "delete")
    if policy is None:
        return None
    for name in ("retention.ms", "retention.bytes"):
        value = config.get(name, "-1")
        if not _for_ever(value):
            return f"cleanup.policy={policy}, {name}={value}"
    return None


def compacts(config: Mapping[str, str]) -> str | None:
    """What in a topic's ``config`` compacts it (``cleanup.policy=compact`` or
    ``compact,delete``), or None."""
    policy = _cleanup_policy(config, "compact")
    return None if policy is None else f"cleanup.policy={policy}"


def _for_ever(retention: str) -> bool:
    """Whether a retention.ms or retention.bytes value deletes nothing: -1 (or
    any negative), or Java's Long.MAX_VALUE, which some tools write for it."""
    try:
        value = int(retention)
    except ValueError:
        return False
    return value < 0 or value == 2**63 - 1


#: DescribeConfigs' answer for a topic the broker does not know yet.
_UNKNOWN_TOPIC: Final = 3


async def _topic_configs(
    admin: AIOKafkaAdminClient, names: list[str]
) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The configs of those of ``names`` the broker describes (a topic's config
    inherits the broker's, e.g. ``max.message.bytes`` its ``message.max.bytes``),
    and those it would not describe, each with the error (a refusal: no
    DescribeConfigs). One it does not know yet (just created, a broker behind
    the controller) is in neither."""
    described = await admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name) for name in names]
    )
    # A resource: (error code, message, type, name, [(config, value, ...), ...]).
    resources = [resource for response in described for resource in response.resources]
    configs = {
        resource[3]: {entry[0]: entry[1] for entry in resource[4] if entry[1] is not None}
        for resource in resources
        if not resource[0]
    }
    errors = [
        f"{resource[3]} ({for_code(resource[0]).__name__})"
        for resource in resources
        if resource[0] and resource[0] != _UNKNOWN_TOPIC
    ]
    return configs, errors
