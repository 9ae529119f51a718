"""Which topic configs would delete records the worker needs, and what the
worker makes of the broker's answer to each topic it creates (no broker)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    KafkaError,
    LeaderNotAvailableError,
    NotControllerError,
    RequestTimedOutError,
)
from aiokafka.protocol.admin import CreateTopicsResponse_v0, CreateTopicsResponse_v3
from aiokafka.structs import TopicPartition

from stream_app.errors import ConfigurationError
from stream_app.pipeline import topics as topics_module
from stream_app.pipeline.checkpoint import offset_metadata
from stream_app.pipeline.topics import TopicLayout, check_retention, deletes_records
from stream_app.settings import Settings, TopicNames
from tests.pipeline.fakes import EmptyCluster

WEEK_MS = "604800000"


@pytest.fixture(autouse=True)
def _no_pause_between_attempts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topics_module, "RACE_PAUSE_S", 0.0)


@pytest.mark.parametrize(
    "config",
    [
        {"cleanup.policy": "compact", "retention.ms": WEEK_MS, "retention.bytes": "-1"},
        {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
        {"cleanup.policy": "compact,delete", "retention.ms": "-1"},
        {"cleanup.policy": "delete", "retention.ms": "9223372036854775807"},
        # Unreadable (no DescribeConfigs): nothing to go on.
        {},
    ],
)
def test_configs_that_keep_every_key(config: dict[str, str]) -> None:
    assert deletes_records(config) is None


@pytest.mark.parametrize(
    ("config", "why"),
    [
        # What kafka-topics.sh --create gives a topic on a broker's defaults.
        (
            {"cleanup.policy": "delete", "retention.ms": WEEK_MS, "retention.bytes": "-1"},
            f"cleanup.policy=delete, retention.ms={WEEK_MS}",
        ),
        (
            {"cleanup.policy": "compact, delete", "retention.ms": WEEK_MS},
            f"cleanup.policy=compact, delete, retention.ms={WEEK_MS}",
        ),
        (
            {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "1073741824"},
            "cleanup.policy=delete, retention.bytes=1073741824",
        ),
    ],
)
def test_configs_that_delete_by_time_or_size(config: dict[str, str], why: str) -> None:
    assert deletes_records(config) == why


def test_the_check_names_each_topic_and_the_fix() -> None:
    settings = Settings(bootstrap_servers="kafka:9092")
    check_retention(settings, TopicLayout(6, 1_048_588))
    layout = TopicLayout(
        6,
        1_048_588,
        (
            "app-sessions-changelog (cleanup.policy=delete, retention.ms=604800000)",
            "sessions.application-settings (cleanup.policy=delete, retention.bytes=10)",
        ),
    )
    with pytest.raises(ConfigurationError) as raised:
        check_retention(settings, layout)
    message = str(raised.value)
    assert "app-sessions-changelog (cleanup.policy=delete, retention.ms=604800000)" in message
    assert "sessions.application-settings (cleanup.policy=delete, retention.bytes=10)" in message
    assert "--bootstrap-server kafka:9092" in message
    assert "cleanup.policy=compact" in message


def _admin_answering(code: int, version: int) -> type:
    """An admin client whose CreateTopics answers ``code`` for every topic, in
    the shape of response ``version`` (v0: no message)."""

    class Admin(EmptyCluster):
        async def create_topics(self, new: list[NewTopic]) -> object:
            if version == 0:
                return CreateTopicsResponse_v0(topic_errors=[(new[0].name, code)])
            return CreateTopicsResponse_v3(
                throttle_time_ms=0, topic_errors=[(new[0].name, code, "the broker's words")]
            )

    return Admin


@pytest.mark.parametrize("version", [0, 3])
@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0, None),  # created
        (36, ConfigurationError),  # TOPIC_ALREADY_EXISTS, never listed: see below
        (38, ConfigurationError),  # INVALID_REPLICATION_FACTOR
        (29, ConfigurationError),  # TOPIC_AUTHORIZATION_FAILED (no Create)
        (41, NotControllerError),  # the controller moved: retried
        (7, RequestTimedOutError),  # timed out, the topic may exist: retried
        (89, KafkaError),  # THROTTLING_QUOTA_EXCEEDED: retried
    ],
)
async def test_what_the_broker_answers_each_topic_it_creates(
    monkeypatch: pytest.MonkeyPatch, code: int, outcome: type[Exception] | None, version: int
) -> None:
    """aiokafka's create_topics raises none of these: the worker reads them."""
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _admin_answering(code, version))
    if outcome is None:
        layout = await topics_module.ensure_topics(Settings())
        assert layout.partitions == Settings().partitions
        return
    with pytest.raises(outcome) as raised:
        await topics_module.ensure_topics(Settings())
    if outcome is ConfigurationError and code == 36:
        assert "grant it Describe" in str(raised.value)
    elif outcome is ConfigurationError:
        assert "cannot create the topics: sessions.commands: " in str(raised.value)
    else:  # worker._wait_for_kafka retries a KafkaError with backoff
        assert isinstance(raised.value, KafkaError)
        assert not isinstance(raised.value, ConfigurationError)


@pytest.mark.parametrize(
    ("brokers", "replication_factor", "warned"), [(3, 1, True), (1, 1, False), (3, 3, False)]
)
async def test_topics_created_with_one_replica_on_a_cluster_of_several_are_warned_of(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    brokers: int,
    replication_factor: int,
    warned: bool,
) -> None:
    """The default of 1 made changelogs and outputs on a 3-broker cluster that
    one lost disk destroys, without a word (Kafka Streams takes the broker's
    default.replication.factor, which aiokafka's CreateTopics cannot ask for).
    Said from the replicas the topics have, so also of topics created before."""

    class Cluster(_admin_answering(0, 3)):  # type: ignore[misc]
        async def describe_topics(self, names: list[str]) -> list[object]:
            replicas = list(range(replication_factor))
            partitions = [{"partition": p, "replicas": replicas} for p in range(6)]
            return [{"topic": n, "error_code": 0, "partitions": partitions} for n in names]

        async def describe_cluster(self) -> dict[str, object]:
            return {"brokers": [{"node_id": n} for n in range(brokers)]}

    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", Cluster)
    settings = Settings(replication_factor=replication_factor)
    with caplog.at_level(logging.WARNING, logger=topics_module.__name__):
        await topics_module.ensure_topics(settings)
    lines = [r.getMessage() for r in caplog.records if "one replica" in r.getMessage()]
    if warned:
        assert len(lines) == 1
        assert f"cluster of {brokers} brokers" in lines[0]
        assert settings.topics.closed in lines[0]
        assert "STREAM_APP_REPLICATION_FACTOR" in lines[0]
    else:
        assert lines == []


async def test_the_layout_has_each_downstream_topic_s_partition_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """For the engine's look at outputs already there (_tell_reprocessing)."""
    settings = Settings()
    closed = settings.topics.closed

    class Cluster(_admin_answering(0, 3)):  # type: ignore[misc]
        async def describe_topics(self, names: list[str]) -> list[object]:
            def partitions(name: str) -> list[dict[str, object]]:
                count = 3 if name == closed else 6
                return [{"partition": p, "replicas": [1]} for p in range(count)]

            return [{"topic": n, "error_code": 0, "partitions": partitions(n)} for n in names]

    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", Cluster)
    layout = await topics_module.ensure_topics(settings)
    t = settings.topics
    assert layout.output_partitions == {closed: 3, t.returned: 6, t.cancelled: 6, t.reopened: 6}


def test_the_internal_topics_are_created_to_keep_what_is_not_yet_processed() -> None:
    """As Kafka Streams creates its repartition topics: records are kept for
    ever, and the worker purges what it has processed (see purge.py)."""
    settings = Settings()
    specs = {spec.name: spec for spec in topics_module.topic_specs(settings, 6)}
    for name in (topics_module.rekey_topic(settings), topics_module.profile_topic(settings)):
        config = specs[name].config
        assert config["cleanup.policy"] == "delete"
        assert config["retention.ms"] == config["retention.bytes"] == "-1"
        # Whatever the broker's log.retention.* defaults are.
        for broker_default in ({}, {"retention.ms": WEEK_MS, "retention.bytes": "1073741824"}):
            assert deletes_records({**broker_default, **config}) is None


@pytest.fixture(autouse=True)
def _no_committed_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker's start reads its group's offsets (kafka.committed_offsets):
    these clusters have none."""

    async def none(options: object, group_id: str) -> dict[TopicPartition, tuple[int, str]]:
        return {}

    monkeypatch.setattr(topics_module, "committed_offsets", none)


def _admin_with_configs(configs: dict[str, dict[str, str]]) -> type:
    """An admin client of a cluster where every topic exists with 6 partitions,
    and ``configs`` are the configs it describes (others: none readable)."""

    class Admin(EmptyCluster):
        async def list_topics(self) -> list[str]:
            return [spec.name for spec in topics_module.topic_specs(Settings(), 6)]

        async def describe_topics(self, names: list[str]) -> list[object]:
            return [{"topic": name, "error_code": 0, "partitions": [{}] * 6} for name in names]

        async def describe_configs(self, resources: list[ConfigResource]) -> list[object]:
            described = [
                (0, "", 2, resource.name, [(k, v) for k, v in configs[resource.name].items()])
                for resource in resources
                if resource.name in configs
            ]
            return [SimpleNamespace(resources=described)]

    return Admin


async def test_internal_topics_that_expire_records_are_named_and_only_warned_of(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A re-key or by-profile topic an older worker or an operator created with
    the cluster's retention loses records only in an outage longer than it:
    the worker starts, and says so (a changelog like it is refused, above)."""
    settings = Settings(bootstrap_servers="kafka:9092")
    rekeyed = topics_module.rekey_topic(settings)
    week = {"cleanup.policy": "delete", "retention.ms": WEEK_MS, "retention.bytes": "-1"}
    configs = {
        rekeyed: week,
        topics_module.profile_topic(settings): {
            "cleanup.policy": "delete",
            "retention.ms": "-1",
            "retention.bytes": "-1",
        },
        settings.topics.closed: week,  # an output: kept as the operator likes
    }
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _admin_with_configs(configs))
    layout = await topics_module.ensure_topics(settings)
    assert layout.deleting == ()
    assert layout.expiring == (f"{rekeyed} (cleanup.policy=delete, retention.ms={WEEK_MS})",)
    caplog.clear()  # the topics whose configs this cluster does not describe
    with caplog.at_level("WARNING"):
        check_retention(settings, layout)
    [record] = caplog.records
    assert record.levelname == "WARNING"
    message = record.getMessage()
    assert f"{rekeyed} (cleanup.policy=delete, retention.ms={WEEK_MS})" in message
    assert "retention.ms=-1" in message
    assert "--bootstrap-server kafka:9092" in message


@pytest.mark.parametrize("policy", ["compact", "compact,delete", "delete, compact"])
async def test_internal_topics_of_records_in_flight_that_compact_are_refused(
    monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """Compaction keeps each key's newest record: in a backlog the re-key topic
    would lose a session's earlier commands, the by-profile topic a profile's
    earlier outputs, before any worker processed them."""
    settings = Settings(bootstrap_servers="kafka:9092")
    rekeyed = topics_module.rekey_topic(settings)
    forever = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
    configs = {
        rekeyed: {**forever, "cleanup.policy": policy},
        topics_module.profile_topic(settings): forever,
    }
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _admin_with_configs(configs))
    layout = await topics_module.ensure_topics(settings)
    assert layout.compacting == (f"{rekeyed} (cleanup.policy={policy})",)
    with pytest.raises(ConfigurationError) as refused:
        check_retention(settings, layout)
    message = str(refused.value)
    assert message.startswith(f"{rekeyed} (cleanup.policy={policy}): compaction keeps")
    assert "cleanup.policy=delete,retention.ms=-1,retention.bytes=-1" in message


async def test_a_command_topic_created_meanwhile_gives_its_count_to_the_internal_topics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two workers started at once on an empty cluster, with different
    STREAM_APP_PARTITIONS: the one that lost the race to create the command
    topic took the other's topics as created, and ran with its own count (its
    session ids, and where it expects keys, disagreeing with the other's).
    Then it refused, but having created the internal topics to its own
    count: every later start was refused too. Now it starts over, and takes
    the command topic's count for every topic it creates."""
    settings = Settings(partitions=6)
    topics: dict[str, int] = {}

    class Raced(EmptyCluster):
        async def list_topics(self) -> list[str]:
            return list(topics)

        async def create_topics(self, new: list[NewTopic]) -> object:
            [topic] = new
            if topic.name == settings.topics.commands:
                topics[topic.name] = 12  # the other worker's
                code = 36
            else:
                topics[topic.name] = topic.num_partitions
                code = 0
            return CreateTopicsResponse_v3(
                throttle_time_ms=0, topic_errors=[(topic.name, code, "")]
            )

        async def describe_topics(self, names: list[str]) -> list[object]:
            return [
                {"topic": name, "error_code": 0, "partitions": [{"replicas": [1]}] * topics[name]}
                for name in names
                if name in topics
            ]

    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", Raced)
    layout = await topics_module.ensure_topics(settings)  # looked again
    assert layout.partitions == 12
    co_partitioned = [s.name for s in topics_module.topic_specs(settings, 12) if s.co_partitioned]
    assert {topics[name] for name in co_partitioned} == {12}


async def test_internal_topics_another_worker_created_meanwhile_are_checked_for_their_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command topic existed; another worker, of another
    STREAM_APP_PARTITIONS then, created an internal topic first."""
    settings = Settings(partitions=6)

    class Raced(EmptyCluster):
        async def list_topics(self) -> list[str]:
            return [settings.topics.commands]

        async def create_topics(self, new: list[NewTopic]) -> object:
            return CreateTopicsResponse_v3(
                throttle_time_ms=0, topic_errors=[(new[0].name, 36, "already exists")]
            )

        async def describe_topics(self, names: list[str]) -> list[object]:
            return [
                {"topic": name, "error_code": 0, "partitions": [{}] * (6 if i else 12)}
                for name in names
                for i in [name == settings.topics.commands]
            ]

    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", Raced)
    with pytest.raises(ConfigurationError) as refused:
        await topics_module.ensure_topics(settings)
    message = str(refused.value)
    assert message.startswith("partition counts disagree: this worker created topics for 6")
    assert f"{topics_module.rekey_topic(settings)} has 12" in message


def _cluster(
    partitions: dict[str, list[dict[str, object]]],
    configs: dict[str, dict[str, str]],
    errors: dict[str, int] | None = None,
) -> type:
    """An admin client of a cluster where the topics of ``partitions`` exist,
    described with those partitions (or the error code of ``errors``), and
    with ``configs``."""

    class Admin(EmptyCluster):
        async def list_topics(self) -> list[str]:
            return list(partitions)

        async def describe_topics(self, names: list[str]) -> list[object]:
            return [
                {
                    "topic": name,
                    "error_code": (errors or {}).get(name, 0),
                    "partitions": [] if name in (errors or {}) else partitions[name],
                }
                for name in names
            ]

        async def describe_configs(self, resources: list[ConfigResource]) -> list[object]:
            described = [
                (0, "", 2, r.name, list(configs[r.name].items()))
                for r in resources
                if r.name in configs
            ]
            return [SimpleNamespace(resources=described)]

    return Admin


def _every_topic(replicas: int = 1, count: int = 6) -> dict[str, list[dict[str, object]]]:
    return {
        spec.name: [{"replicas": list(range(replicas))}] * count
        for spec in topics_module.topic_specs(Settings(), count)
    }


@pytest.mark.parametrize(("code", "raised"), [(5, LeaderNotAvailableError), (3, KafkaError)])
async def test_a_command_topic_listed_but_not_described_is_retried_not_given_a_default_count(
    monkeypatch: pytest.MonkeyPatch, code: int, raised: type[Exception]
) -> None:
    """Just after an operator created it with 12 partitions, one broker listed
    the command topic while another did not describe it yet: the worker took
    STREAM_APP_PARTITIONS (6) for it and created every internal topic with 6,
    and every later start was refused."""
    settings = Settings()
    cluster = _cluster(_every_topic(), {}, errors={settings.topics.commands: code})
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", cluster)
    with pytest.raises(raised) as caught:  # worker._wait_for_kafka retries it
        await topics_module.ensure_topics(settings)
    assert not isinstance(caught.value, ConfigurationError)


async def test_a_command_topic_described_a_moment_later_is_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not only the worker's own start, which retries, but `stream-app
    traffic` and `topics create` too, started beside a worker creating the
    topics (docker-compose.yml starts them together)."""
    settings = Settings()
    answers = [5, 5, 0]

    class Later(_cluster(_every_topic(count=12), {})):  # type: ignore[misc]
        async def describe_topics(self, names: list[str]) -> list[object]:
            described = await super().describe_topics(names)
            if settings.topics.commands in names:
                code = answers.pop(0) if answers else 0  # then its replicas are asked
                for entry in described:
                    if entry["topic"] == settings.topics.commands and code:
                        entry["error_code"], entry["partitions"] = code, []
            return described

    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", Later)
    assert (await topics_module.ensure_topics(settings)).partitions == 12
    assert answers == []


async def test_a_command_topic_the_worker_may_not_describe_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings()
    cluster = _cluster(_every_topic(), {}, errors={settings.topics.commands: 29})
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", cluster)
    with pytest.raises(ConfigurationError, match=r"not authorize .* describe sessions.commands"):
        await topics_module.ensure_topics(settings)


async def test_the_record_limit_is_that_of_the_topics_the_worker_writes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The settings topic, which the worker only reads, set the record limit
    of its outputs: an operator's 64 KB settings topic refused the start."""
    settings = Settings()
    configs = {name: {"max.message.bytes": "1048588"} for name in _every_topic()}
    configs[settings.topics.application_settings] = {"max.message.bytes": "65536"}
    configs[settings.topics.commands] = {"max.message.bytes": "1000"}
    configs[settings.topics.closed] = {"max.message.bytes": "2000000"}
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _cluster(_every_topic(), configs))
    layout = await topics_module.ensure_topics(settings)
    assert layout.max_record_bytes == 1_048_588
    configs[topics_module.profile_topic(settings)] = {"max.message.bytes": "900000"}
    assert (await topics_module.ensure_topics(settings)).max_record_bytes == 900_000


async def test_a_session_limit_the_topics_cannot_take_names_the_topic_that_limits_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The refusal named the smallest limit and not the topic that has it:
    an operator had to describe every topic the worker writes to find it."""
    settings = Settings(max_session_bytes=262_144)
    configs = {name: {"max.message.bytes": "1048588"} for name in _every_topic()}
    configs[settings.topics.returned] = {"max.message.bytes": "100000"}
    configs[settings.topics.cancelled] = {"max.message.bytes": "100000"}
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _cluster(_every_topic(), configs))
    layout = await topics_module.ensure_topics(settings)
    with pytest.raises(ConfigurationError) as raised:
        topics_module.check_topics(settings, layout)
    assert "record limit of 100000 bytes (max.message.bytes of " in str(raised.value)
    named = str(raised.value).split("(max.message.bytes of ")[1].split(")")[0]
    assert sorted(named.split(", ")) == sorted(
        [settings.topics.returned, settings.topics.cancelled]
    )


def _creating_cluster(
    replicas: int,
    *,
    topic_insync: str | None,
    broker_insync: str | None,
    brokers: int = 1,
) -> type:
    """An admin client of a cluster with no topic, which creates them with
    ``replicas`` each; it describes their min.insync.replicas as
    ``topic_insync`` (None: not yet, as a broker behind the controller), and
    the broker's as ``broker_insync``."""

    class Admin(EmptyCluster):
        def __init__(self, **options: object) -> None:
            self.topics: list[str] = []

        async def list_topics(self) -> list[str]:
            return list(self.topics)

        async def create_topics(self, new: list[NewTopic]) -> object:
            self.topics.extend(topic.name for topic in new)
            return CreateTopicsResponse_v3(
                throttle_time_ms=0, topic_errors=[(topic.name, 0, None) for topic in new]
            )

        async def describe_topics(self, names: list[str]) -> list[object]:
            partitions = [{"partition": p, "replicas": list(range(replicas))} for p in range(6)]
            if topic_insync is None and len(names) > 1:  # the replica check's ask: not yet
                return [{"topic": n, "error_code": 3, "partitions": []} for n in names]
            return [
                {"topic": name, "error_code": 0, "partitions": partitions}
                for name in names
                if name in self.topics
            ]

        async def describe_configs(self, resources: list[ConfigResource]) -> list[object]:
            described = []
            for r in resources:
                if r.resource_type is ConfigResourceType.BROKER and broker_insync is not None:
                    described.append((0, "", 4, r.name, [("min.insync.replicas", broker_insync)]))
                elif r.resource_type is ConfigResourceType.TOPIC and topic_insync is not None:
                    described.append((0, "", 2, r.name, [("min.insync.replicas", topic_insync)]))
            return [SimpleNamespace(resources=described)]

        async def describe_cluster(self) -> dict[str, object]:
            return {"brokers": [{"node_id": n} for n in range(brokers)]}

    return Admin


async def test_the_command_and_settings_topics_the_worker_created_are_checked_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Created by the worker with its replication factor of 1 on a cluster
    whose min.insync.replicas is 2, they were left out as topics it only
    reads: the operator recreated the topics the refusal named, and checkout
    systems then had every write to the command topic refused. (Here the
    broker does not say its own min.insync.replicas, only the topics'.)"""
    settings = Settings()
    cluster = _creating_cluster(1, topic_insync="2", broker_insync=None)
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", cluster)
    layout = await topics_module.ensure_topics(settings)
    for name in (
        settings.topics.commands,
        settings.topics.application_settings,
        topics_module.changelog_topic(settings, "sessions"),
    ):
        assert f"{name} (1 replica, min.insync.replicas=2)" in layout.unwritable
    with pytest.raises(ConfigurationError, match=settings.topics.commands):
        check_retention(settings, layout)


@pytest.mark.parametrize("topic_insync", ["2", None], ids=["described", "not-yet"])
async def test_topics_the_broker_s_min_insync_replicas_would_make_unwritable_are_not_created(
    monkeypatch: pytest.MonkeyPatch, topic_insync: str | None
) -> None:
    """Refused only after creating them, the worker (and `topics create`)
    left the topics behind, and every later start refused them again until
    an operator deleted them. And a broker that did not know the topics just
    created yet described no min.insync.replicas for them: the worker
    started, and wrote nothing."""
    admins: list[Any] = []

    def recorded(replicas: int) -> Callable[..., Any]:
        cluster = _creating_cluster(replicas, topic_insync=topic_insync, broker_insync="2")
        return lambda **options: admins.append(cluster(**options)) or admins[-1]

    settings = Settings()
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", recorded(1))
    with pytest.raises(ConfigurationError) as refused:
        await topics_module.ensure_topics(settings)
    assert [admin.topics for admin in admins] == [[]]
    message = str(refused.value)
    assert message.startswith("the broker's min.insync.replicas is 2, more than ")
    assert settings.topics.commands in message
    assert "STREAM_APP_REPLICATION_FACTOR to at least 2" in message
    # Enough replicas: created.
    admins.clear()
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", recorded(2))
    layout = await topics_module.ensure_topics(Settings(replication_factor=2))
    assert len(admins[0].topics) == len(_every_topic())
    assert layout.unwritable == ()


async def test_the_command_topic_the_worker_created_is_warned_of_with_one_replica(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings()
    cluster = _creating_cluster(1, topic_insync="1", broker_insync="1", brokers=3)
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", cluster)
    with caplog.at_level(logging.WARNING, logger=topics_module.__name__):
        await topics_module.ensure_topics(settings)
    [line] = [r.getMessage() for r in caplog.records if "one replica" in r.getMessage()]
    assert settings.topics.commands in line
    assert settings.topics.application_settings in line


async def test_topics_with_fewer_replicas_than_min_insync_replicas_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A cluster whose default min.insync.replicas is 2, and the worker's
    default replication factor of 1: Kafka refused every write with
    NOT_ENOUGH_REPLICAS, which a transactional producer retries for ever.
    The worker stayed up and ready and wrote nothing, saying only that its
    commits waited."""
    settings = Settings(bootstrap_servers="kafka:9092")
    configs = {name: {"min.insync.replicas": "2"} for name in _every_topic()}
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _cluster(_every_topic(1), configs))
    layout = await topics_module.ensure_topics(settings)
    changelog = topics_module.changelog_topic(settings, "sessions")
    assert f"{changelog} (1 replica, min.insync.replicas=2)" in layout.unwritable
    # Those it only reads, an operator made: not the worker's to refuse (warned
    # of: see below).
    assert not any(settings.topics.commands in t for t in layout.unwritable)
    assert not any(settings.topics.application_settings in t for t in layout.unwritable)
    with pytest.raises(ConfigurationError) as refused:
        check_retention(settings, layout)
    message = str(refused.value)
    assert f"{changelog} (1 replica, min.insync.replicas=2)" in message
    assert "STREAM_APP_REPLICATION_FACTOR" in message
    # Enough replicas: nothing to say.
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _cluster(_every_topic(2), configs))
    layout = await topics_module.ensure_topics(settings)
    assert layout.unwritable == ()
    check_retention(settings, layout)


async def test_a_compacted_command_topic_is_warned_of(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Compaction keeps each integrationId's newest command: in a backlog a
    session's earlier commands vanished, without a word, as the compacted
    re-key topic (refused) would lose them."""
    settings = Settings()
    configs = {settings.topics.commands: {"cleanup.policy": "compact"}}
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _cluster(_every_topic(), configs))
    layout = await topics_module.ensure_topics(settings)
    assert layout.commands_compacted == "cleanup.policy=compact"
    caplog.clear()  # the topics whose configs this cluster does not describe
    with caplog.at_level("WARNING"):
        check_retention(settings, layout)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "the command topic sessions.commands is compacted (cleanup.policy=compact)" in warning
    configs[settings.topics.commands] = {"cleanup.policy": "delete"}
    assert (await topics_module.ensure_topics(settings)).commands_compacted is None


async def test_a_compacted_rejection_topic_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka refuses a record without a key on a compacted topic: the
    rejection of a command sent without one failed its transaction at every
    replay, and the partition stalled for good. Compaction also kept only
    each key's newest rejection."""
    settings = Settings()
    configs = {settings.topics.rejected: {"cleanup.policy": "compact,delete"}}
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _cluster(_every_topic(), configs))
    layout = await topics_module.ensure_topics(settings)
    with pytest.raises(
        ConfigurationError,
        match="the rejection topic sessions.rejected is "
        r"compacted \(cleanup.policy=compact,delete\)",
    ):
        check_retention(settings, layout)
    configs[settings.topics.rejected] = {"cleanup.policy": "delete"}
    check_retention(settings, await topics_module.ensure_topics(settings))


async def test_every_refusal_and_warning_of_the_topics_is_said_in_one_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The Upgrade section has an operator run `topics create` to learn what a
    release refuses: it named one refusal per run, and no warning until the
    last refusal was fixed."""
    settings = Settings()
    t = settings.topics
    by_profile, rekeyed = topics_module.profile_topic(settings), topics_module.rekey_topic(settings)
    configs = {
        by_profile: {"cleanup.policy": "compact"},
        rekeyed: {"cleanup.policy": "delete", "retention.ms": "604800000"},
        t.rejected: {"cleanup.policy": "compact"},
        t.commands: {"cleanup.policy": "compact"},
    }
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _cluster(_every_topic(), configs))
    layout = await topics_module.ensure_topics(settings)
    caplog.clear()
    with caplog.at_level("WARNING"), pytest.raises(ConfigurationError) as raised:
        check_retention(settings, layout)
    message = str(raised.value)
    assert message.startswith(f"(1) {by_profile} (cleanup.policy=compact): ")
    assert f"(2) the rejection topic {t.rejected} is compacted" in message
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"the command topic {t.commands} is compacted" in w for w in warnings)
    assert any(w.startswith(f"{rekeyed} (cleanup.policy=delete") for w in warnings)


def test_a_session_limit_the_topics_cannot_take_is_named_with_the_other_refusals() -> None:
    """Checked first and raised alone, it hid every retention refusal and
    warning of the same run."""
    settings = Settings(max_session_bytes=200_000)
    layout = TopicLayout(6, 262_144, rejections_compacted="cleanup.policy=compact")
    with pytest.raises(ConfigurationError) as raised:
        topics_module.check_topics(settings, layout)
    message = str(raised.value)
    assert message.startswith("(1) max_session_bytes 200000 is too large")
    assert f"(2) the rejection topic {settings.topics.rejected} is compacted" in message


async def test_a_command_topic_the_worker_may_create_but_not_see_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A principal with Create on the cluster and no Describe on the command
    topic: it is never listed, and CreateTopics answers that it exists. The
    worker retried for ever, saying that another client was creating it."""
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _admin_answering(36, 3))
    with pytest.raises(ConfigurationError, match="grant it Describe"):
        await topics_module.ensure_topics(Settings())


async def test_topics_whose_configs_may_not_be_read_are_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without DescribeConfigs every check of this module was skipped, and
    nothing said so. A topic the broker does not know yet (just created) is
    no refusal: nothing is said of it."""
    settings = Settings()
    configs = {name: {"cleanup.policy": "delete"} for name in _every_topic()}
    del configs[settings.topics.closed]  # unknown yet: not described
    del configs[settings.topics.returned]  # refused, below

    class Refusing(_cluster(_every_topic(), configs)):  # type: ignore[misc]
        async def describe_configs(self, resources: list[ConfigResource]) -> list[object]:
            [answer] = await super().describe_configs(resources)
            refused = (29, "", 2, settings.topics.returned, [])
            unknown = (3, "", 2, settings.topics.closed, [])
            return [SimpleNamespace(resources=[*answer.resources, refused, unknown])]

    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", Refusing)
    with caplog.at_level("WARNING"):
        await topics_module.ensure_topics(settings)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"describe the configs of {settings.topics.returned} " in warning
    assert "TopicAuthorizationFailedError" in warning
    assert settings.topics.closed not in warning


async def test_a_command_topic_the_worker_creates_is_said_at_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Said at INFO among the other topics created, a mistyped
    STREAM_APP_TOPICS__COMMANDS gave a worker that ran, ready, and read
    nothing (Kafka Streams refuses a missing source topic)."""
    settings = Settings()
    cluster = _creating_cluster(1, topic_insync="1", broker_insync="1")
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", cluster)
    with caplog.at_level(logging.WARNING, logger=topics_module.__name__):
        await topics_module.ensure_topics(settings)  # stream-app topics create, traffic
    assert not [r for r in caplog.records if "did not exist" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger=topics_module.__name__):
        await topics_module.ensure_topics(settings, worker=True)
    [line] = [r.getMessage() for r in caplog.records if "did not exist" in r.getMessage()]
    assert line.startswith(f"the command topic {settings.topics.commands} did not exist")
    assert "STREAM_APP_TOPICS__COMMANDS" in line
    caplog.clear()
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _cluster(_every_topic(), {}))
    with caplog.at_level(logging.WARNING, logger=topics_module.__name__):
        await topics_module.ensure_topics(settings, worker=True)
    assert not [r for r in caplog.records if "did not exist" in r.getMessage()]


async def test_command_and_settings_topics_an_operator_made_unwritable_are_warned_of(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Checked only on the start that created them: the next start (the
    first refused, and restarted) said nothing of them, and the operator,
    recreating the topics the refusal named, left the command topic
    refusing every write of the checkout systems."""
    settings = Settings()
    configs = {name: {"min.insync.replicas": "2"} for name in _every_topic()}
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _cluster(_every_topic(1), configs))
    with caplog.at_level(logging.WARNING, logger=topics_module.__name__):
        await topics_module.ensure_topics(settings)
    [line] = [r.getMessage() for r in caplog.records if "checkout systems" in r.getMessage()]
    assert line.startswith(f"{settings.topics.commands} (1 replica, min.insync.replicas=2)")
    assert settings.topics.application_settings in line


async def test_operator_made_topics_with_one_replica_are_not_the_worker_s_to_warn_of(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its advice, to set STREAM_APP_REPLICATION_FACTOR before the topics are
    created, does nothing for topics an operator made (Kafka Streams says
    nothing of its source topics' replicas either)."""
    settings = Settings(replication_factor=3)
    topics = _every_topic(3)
    for name in (settings.topics.commands, settings.topics.application_settings):
        topics[name] = [{"replicas": [0]}] * 6

    class ThreeBrokers(_cluster(topics, {})):  # type: ignore[misc]
        async def describe_cluster(self) -> dict[str, object]:
            return {"brokers": [{"node_id": n} for n in range(3)]}

    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", ThreeBrokers)
    with caplog.at_level(logging.WARNING, logger=topics_module.__name__):
        await topics_module.ensure_topics(settings, worker=True)
    assert [r.getMessage() for r in caplog.records if "one replica" in r.getMessage()] == []


@pytest.mark.parametrize(
    "theirs",
    [["shop-sessions.rekeyed", "shop-sessions.by-profile"], ["shop-session-ids-changelog"]],
    ids=["running", "changelogs-left"],
)
async def test_an_app_id_whose_changelog_is_another_app_s_is_refused(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, theirs: list[str]
) -> None:
    """App shop-first's sessions changelog is app shop's first-sessions
    changelog: each restored the other's records into its store, and the
    compaction and tombstones of one overwrote the other's sessions. The
    newcomer is refused; shop, there first, is told at ERROR and goes on."""
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _cluster(theirs, {}))
    with pytest.raises(ConfigurationError, match="shares the topic shop-first-sessions-changelog"):
        await topics_module.ensure_topics(Settings(app_id="shop-first"))
    newcomer = {"shop-first-sessions.rekeyed", "shop-first-session-ids-changelog"}
    with caplog.at_level(logging.WARNING, logger=topics_module.__name__):
        topics_module._refuse_a_shared_changelog(
            Settings(app_id="shop"), {*newcomer, "shop-session-ids-changelog"}
        )
    [error] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "Stop app shop-first and give it another id" in error.getMessage()
    # Shop with no topic of its own yet is the newcomer: refused.
    with pytest.raises(ConfigurationError, match="with app shop-first \\(its sessions changelog"):
        topics_module._refuse_a_shared_changelog(Settings(app_id="shop"), newcomer)
    # Alone, an app id ending in -first is warned of.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=topics_module.__name__):
        topics_module._refuse_a_shared_changelog(Settings(app_id="shop-first"), set())
    assert any("never run one on this cluster" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("metadata", "refused"),
    [
        (offset_metadata(6), True),  # the state was built for 6: now 12
        (offset_metadata(12), False),
        ("", False),  # committed by a worker before the count was recorded, or by hand
        ("not ours", False),
    ],
)
async def test_a_group_whose_offsets_record_another_partition_count_is_refused(
    monkeypatch: pytest.MonkeyPatch, metadata: str, refused: bool
) -> None:
    """Every co-partitioned topic raised from 6 to 12 partitions together
    passes the check of the counts; a worker on an empty disk restored the
    6-partition changelogs into the 12-partition layout and gave session ids
    twice. The group's offsets say what the state was built for."""
    settings = Settings()
    commands = TopicPartition(settings.topics.commands, 3)

    class Admin(_admin_with_configs({})):  # type: ignore[misc]
        async def describe_topics(self, names: list[str]) -> list[object]:
            return [{"topic": name, "error_code": 0, "partitions": [{}] * 12} for name in names]

    async def committed(options: object, group_id: str) -> dict[TopicPartition, tuple[int, str]]:
        assert group_id == settings.app_id
        return {
            TopicPartition(topics_module.rekey_topic(settings), 0): (5, metadata),
            commands: (10, metadata),
            # A topic the worker no longer reads (a former command topic).
            TopicPartition("sessions.commands-old", 0): (7, offset_metadata(3)),
        }

    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", Admin)
    monkeypatch.setattr(topics_module, "committed_offsets", committed)
    # Commands that create or list topics do not restore state: not refused.
    assert (await topics_module.ensure_topics(settings)).partitions == 12
    if not refused:
        assert (await topics_module.ensure_topics(settings, worker=True)).partitions == 12
        return
    with pytest.raises(ConfigurationError) as raised:
        await topics_module.ensure_topics(settings, worker=True)
    assert str(raised.value) == (
        f"group {settings.app_id} committed offsets for state built for 6 partitions "
        f"({settings.topics.commands}[3] and 1 more), but the command topic "
        f"{settings.topics.commands} has 12: partitions were added to the deployment's "
        "topics. The stores and the session ids depend on the count: re-partitioning is a "
        "migration to a new app id (docs/operations.md, Migrate)"
    )


async def test_a_mistyped_command_topic_is_named_rather_than_partition_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the deployment's topics at 12 partitions, a command topic name that
    does not exist said "partition counts disagree: command topic ... has 6"
    (STREAM_APP_PARTITIONS), pointing at a migration rather than the typo."""
    settings = Settings(topics=TopicNames(commands="sessions.command"))
    existing = [s.name for s in topics_module.topic_specs(Settings(), 12)]

    class Admin(EmptyCluster):
        async def list_topics(self) -> list[str]:
            return existing

        async def describe_topics(self, names: list[str]) -> list[object]:
            return [{"topic": name, "error_code": 0, "partitions": [{}] * 12} for name in names]

    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", Admin)
    with pytest.raises(ConfigurationError) as raised:
        await topics_module.ensure_topics(settings, worker=True)
    message = str(raised.value)
    assert message.startswith(
        "the command topic sessions.command does not exist, but topics of this deployment "
        f"do: {topics_module.rekey_topic(settings)} has 12"
    )
    assert message.endswith("Is STREAM_APP_TOPICS__COMMANDS the topic the checkout systems write?")


async def test_an_app_id_ending_in_first_is_checked_against_both_neighbours() -> None:
    """App a-first was checked against app a only: started after app
    a-first-first, whose sessions changelog is its first-sessions changelog,
    it ran with a warning about app a, and each restored the other's records."""
    theirs = {"a-first-first-sessions.rekeyed", "a-first-first-session-ids-changelog"}
    with pytest.raises(ConfigurationError) as raised:
        topics_module._refuse_a_shared_changelog(Settings(app_id="a-first"), theirs)
    assert str(raised.value).startswith(
        "app id a-first shares the topic a-first-first-sessions-changelog with app "
        "a-first-first (its sessions changelog), whose topics exist on this cluster"
    )
    # App a shares nothing with a running a-first-first, whose sessions
    # changelog is named as app a-first's first-sessions changelog would be.
    running = {
        *theirs,
        "a-first-first-sessions-changelog",
        "a-first-first-first-sessions-changelog",
    }
    topics_module._refuse_a_shared_changelog(Settings(app_id="a"), running)


async def test_a_coordinator_not_yet_available_is_asked_again_quietly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A new cluster makes its offsets topic at the first group lookup and
    answers "not available" meanwhile: every first start of a worker on a
    fresh broker (the demo's) logged a retry at WARNING."""
    from aiokafka.errors import (
        CoordinatorNotAvailableError,
        GroupAuthorizationFailedError,
        KafkaConnectionError,
    )

    answers: list[Exception | None] = [CoordinatorNotAvailableError(), None]

    async def committed(options: object, group_id: str) -> dict[TopicPartition, tuple[int, str]]:
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return {}

    monkeypatch.setattr(topics_module, "committed_offsets", committed)
    monkeypatch.setattr(topics_module, "_COORDINATOR_PAUSE_S", 0.0)
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _admin_with_configs({}))
    with caplog.at_level(logging.INFO, logger=topics_module.__name__):
        await topics_module.ensure_topics(Settings(), worker=True)
    assert answers == []
    assert "Coordinator" not in caplog.text
    # Not retried here: a refusal (exit 2); a timeout or a lost connection
    # (each attempt can take a request timeout: the start's backoff says so at
    # once); a coordinator still unavailable past a few seconds.
    answers[:] = [GroupAuthorizationFailedError()]
    with pytest.raises(ConfigurationError, match="does not authorize"):
        await topics_module.ensure_topics(Settings(), worker=True)
    for error in (RequestTimedOutError(), KafkaConnectionError()):
        answers[:] = [error, None]
        with pytest.raises(type(error)):
            await topics_module.ensure_topics(Settings(), worker=True)
    monkeypatch.setattr(topics_module, "_COORDINATOR_QUIET_S", 0.0)
    answers[:] = [CoordinatorNotAvailableError(), None]
    with pytest.raises(CoordinatorNotAvailableError):
        await topics_module.ensure_topics(Settings(), worker=True)


async def test_a_topic_this_principal_may_not_describe_says_what_to_grant() -> None:
    """It spoke of "this worker's principal" to `stream-app topics create`."""

    class Refusing:
        async def describe_topics(self, names: list[str]) -> list[object]:
            return [{"topic": name, "error_code": 29, "partitions": []} for name in names]

    with pytest.raises(ConfigurationError) as refused:
        await topics_module._described(Refusing(), ["sessions.closed"])  # type: ignore[arg-type]
    assert str(refused.value) == (
        "Kafka does not authorize this principal to describe sessions.closed: grant it "
        "Describe on the topic"
    )
