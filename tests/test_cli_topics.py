"""What ``stream-app topics create`` prints of each topic when the broker
describes it, will not describe it, or does not know it yet (no broker: a
stand-in admin client)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiokafka.admin
import pytest
from aiokafka.admin import NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.protocol.admin import CreateTopicsResponse_v3

from stream_app import cli
from stream_app.errors import ConfigurationError
from stream_app.pipeline import topics as topics_module
from stream_app.pipeline.topics import changelog_topic, profile_topic, rekey_topic
from stream_app.settings import Settings

SETTINGS = Settings(bootstrap_servers="kafka:9092", app_id="shop", partitions=6)
REKEYED = rekey_topic(SETTINGS)
BY_PROFILE = profile_topic(SETTINGS)
#: Created by the command, and not yet known to the broker asked about it.
NEW_CHANGELOG = changelog_topic(SETTINGS, "first-sessions")
#: Described with only some of the configs the app sets.
OLD_REKEYED = {
    "cleanup.policy": "delete",
    "retention.ms": "86400000",
    "segment.bytes": "1073741824",
}


class _Cluster:
    """Every topic exists but :data:`NEW_CHANGELOG`; the by-profile topic's
    configs may not be described (TOPIC_AUTHORIZATION_FAILED)."""

    def __init__(self, **options: object) -> None:
        self.names = [s.name for s in topics_module.topic_specs(SETTINGS, 6)]

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def list_topics(self) -> list[str]:
        return [name for name in self.names if name != NEW_CHANGELOG]

    async def describe_topics(self, names: list[str]) -> list[object]:
        return [
            {"topic": n, "error_code": 3, "partitions": []}
            if n == NEW_CHANGELOG
            else {"topic": n, "error_code": 0, "partitions": [{}] * 6}
            for n in names
        ]

    async def create_topics(self, new: list[NewTopic]) -> object:
        return CreateTopicsResponse_v3(throttle_time_ms=0, topic_errors=[(new[0].name, 0, None)])

    async def describe_cluster(self) -> dict[str, object]:
        return {"brokers": [{"node_id": 1}]}

    async def describe_configs(self, resources: list[ConfigResource]) -> list[object]:
        specs = {s.name: s.config for s in topics_module.topic_specs(SETTINGS, 6)}
        described = []
        for resource in resources:
            name = resource.name
            if resource.resource_type is ConfigResourceType.BROKER:
                continue  # the broker's min.insync.replicas: not said
            if name == BY_PROFILE:
                described.append((29, "denied", 2, name, []))
            elif name == NEW_CHANGELOG:
                described.append((3, "unknown", 2, name, []))
            else:
                config = OLD_REKEYED if name == REKEYED else specs[name]
                entries = [(k, v) for k, v in config.items()]
                described.append((0, None, 2, name, [*entries, ("max.message.bytes", "1048588")]))
        return [SimpleNamespace(resources=described)]


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _Cluster)
    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", _Cluster)


@pytest.mark.usefixtures("cluster")
def test_each_topic_is_shown_as_it_is(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run_topics_create(SETTINGS, None) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert len(lines) == 12
    # Its own values; "?" for one not described; then what the worker would set.
    assert lines[REKEYED].split()[:2] == ["exists", REKEYED]
    assert lines[REKEYED].endswith(
        "6 partitions cleanup.policy=delete retention.bytes=? retention.ms=86400000 "
        "segment.bytes=1073741824 (the worker creates it with retention.ms=-1 "
        "segment.bytes=52428800)"
    )
    assert lines[BY_PROFILE].endswith("6 partitions (configs not readable)")
    # Created just now, not known yet to the broker asked: as it was created.
    assert lines[NEW_CHANGELOG].split() == [
        "created",
        NEW_CHANGELOG,
        "6",
        "partitions",
        "cleanup.policy=compact",
    ]
    # The app sets no config on the command topic: nothing to read or say.
    assert lines[SETTINGS.topics.commands].split() == [
        "exists",
        SETTINGS.topics.commands,
        "6",
        "partitions",
    ]
    compacted = lines[changelog_topic(SETTINGS, "sessions")]
    assert compacted.split()[-1] == "cleanup.policy=compact"


class _DeletingChangelog(_Cluster):
    """The sessions changelog made on a broker's defaults: deletes after 7 days."""

    async def describe_configs(self, resources: list[ConfigResource]) -> list[object]:
        [answer] = await super().describe_configs(resources)
        changelog = changelog_topic(SETTINGS, "sessions")
        resources_ = [
            (*r[:4], [("cleanup.policy", "delete"), ("retention.ms", "604800000")])
            if r[3] == changelog
            else r
            for r in answer.resources
        ]
        return [SimpleNamespace(resources=resources_)]


def test_a_topic_a_worker_would_refuse_is_shown_then_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, the refusal was the only output: the table of the topics'
    configs, which says what to change, was not printed."""
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _DeletingChangelog)
    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", _DeletingChangelog)
    assert cli.run_topics_create(SETTINGS, None) == 2
    out, err = capsys.readouterr()
    changelog = changelog_topic(SETTINGS, "sessions")
    [line] = [line for line in out.splitlines() if changelog in line]
    assert line.endswith(
        "cleanup.policy=delete (the worker creates it with cleanup.policy=compact)"
    )
    # its last line: a logging handler an earlier test left may write before it
    assert err.splitlines()[-1].startswith("stream-app topics create: ")
    assert changelog in err.splitlines()[-1]


def test_every_refusal_is_named_in_one_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The session limit, checked first, was said alone: the changelog's
    retention only in a second run (docs/operations.md, Upgrade)."""
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _DeletingChangelog)
    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", _DeletingChangelog)
    settings = SETTINGS.model_copy(update={"max_session_bytes": 400_000})
    assert cli.run_topics_create(settings, None) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert "(1) max_session_bytes 400000 is too large" in last
    assert f"(2) {changelog_topic(SETTINGS, 'sessions')} (cleanup.policy=delete" in last


class _Refusing(_Cluster):
    """CreateTopics answers :attr:`error` (its code) for the topic to create."""

    error = 29

    async def create_topics(self, new: list[NewTopic]) -> object:
        return CreateTopicsResponse_v3(
            throttle_time_ms=0, topic_errors=[(new[0].name, self.error, "refused")]
        )


@pytest.mark.parametrize(
    ("error", "name"),
    [(29, "TopicAuthorizationFailedError"), (31, "ClusterAuthorizationFailedError")],
)
def test_topics_create_refused_creation_says_what_its_principal_lacks(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: int, name: str
) -> None:
    """It told the operator to run `stream-app topics create` with a principal
    that may (the command just refused), and spoke of "this worker's
    principal"."""
    monkeypatch.setattr(_Refusing, "error", error)
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _Refusing)
    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", _Refusing)
    assert cli.run_topics_create(SETTINGS, None) == 2
    out, err = capsys.readouterr()
    assert out == ""
    said = err.splitlines()[-1]
    assert said.startswith(
        f"stream-app topics create: cannot create the topics: {NEW_CHANGELOG}: {name} (refused). "
        "This principal may not create topics: grant it Create (on the cluster, or on these "
        "topics), or run `stream-app topics create` with a principal that has it."
    )
    assert "worker" not in said
    assert "with a principal that may" not in said


def test_topics_create_refused_for_a_setting_says_to_fix_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_Refusing, "error", 38)  # INVALID_REPLICATION_FACTOR
    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _Refusing)
    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", _Refusing)
    assert cli.run_topics_create(SETTINGS, None) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"stream-app topics create: cannot create the topics: {NEW_CHANGELOG}: "
        "InvalidReplicationFactorError (refused). Fix the setting the broker names."
    )


def test_a_worker_refused_creation_is_told_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's principal has no Create, by design: an operator creates
    the topics (docs/operations.md, The worker's principal)."""

    async def no_offsets(settings: Settings, partitions: int) -> None:
        pass

    monkeypatch.setattr(topics_module, "AIOKafkaAdminClient", _Refusing)
    monkeypatch.setattr(topics_module, "_refuse_a_changed_partition_count", no_offsets)
    with pytest.raises(ConfigurationError) as refused:
        asyncio.run(topics_module.ensure_topics(SETTINGS, worker=True))
    assert str(refused.value) == (
        f"cannot create the topics: {NEW_CHANGELOG}: TopicAuthorizationFailedError (refused). "
        "Have an operator create them (stream-app topics create, with a principal that may), "
        "or fix the setting the broker names. (A topic that exists, but that this worker's "
        "principal may not see, is refused the same way: grant it the ACLs docs/operations.md "
        "lists.)"
    )
