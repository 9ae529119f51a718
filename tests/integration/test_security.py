"""The worker over SASL_SSL with SCRAM-SHA-512, as a Strimzi KafkaUser gives it,
against a real broker with a TLS listener of its own CA that authorizes with
Kafka's StandardAuthorizer, the user granted exactly the ACLs of
deploy/base/kafka-user.yaml; and the refusals a retry cannot mend (a wrong
password, no CA, TLS spoken to by a plaintext client, a missing ACL) each stop
the worker at once with one error saying which.

The module starts its own secure broker (``tools/kafka_broker.py --secure``),
whatever ``STREAM_APP_TEST_BOOTSTRAP_SERVERS`` says: the test's own clients use its
PLAINTEXT listener (a super user, as an operator), the worker only the
SASL_SSL one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.admin import CreateAclsRequest

from stream_app.demo.traffic import generate_traffic
from stream_app.pipeline.topics import profile_topic, rekey_topic, topic_specs
from stream_app.settings import Settings, TopicNames
from tests.integration.harness import Deployment, Worker, purged_offsets
from tests.integration.workload import (
    OutputReader,
    configuration_error,
    describe_workers,
    exactly_once_problems,
    expected_outcome,
    produce_traffic_records,
)
from tools.kafka_broker import SCRAM_PASSWORD, SCRAM_USER, KafkaCluster

StartWorker = Callable[..., Worker]


ROOT = Path(__file__).resolve().parents[2]
#: The principal Strimzi's User Operator makes of the KafkaUser.
PRINCIPAL = f"User:{SCRAM_USER}"
#: Kafka's codes for ACL resource types, pattern types and operations.
_RESOURCE_TYPES = {"topic": 2, "group": 3, "cluster": 4, "transactionalId": 5}
_PATTERN_TYPES = {"literal": 3, "prefix": 4}
_OPERATIONS = {
    "All": 2, "Read": 3, "Write": 4, "Create": 5, "Delete": 6, "Alter": 7, "Describe": 8,
    "ClusterAction": 9, "DescribeConfigs": 10, "AlterConfigs": 11, "IdempotentWrite": 12,
}  # fmt: skip
_ALLOW = 3

#: (resource type, name, pattern type, operation), as in the KafkaUser.
Acl = tuple[str, str, str, str]


def manifest_acls() -> list[Acl]:
    """The ACLs deploy/base/kafka-user.yaml grants the worker's principal."""
    user = yaml.safe_load((ROOT / "deploy" / "base" / "kafka-user.yaml").read_text())
    assert user["metadata"]["name"] == SCRAM_USER
    return [
        (r["type"], r.get("name", "kafka-cluster"), r.get("patternType", "literal"), operation)
        for acl in user["spec"]["authorization"]["acls"]
        for r in [acl["resource"]]
        for operation in acl["operations"]
    ]


def manifest_env() -> dict[str, str]:
    """The app id and topic names the StatefulSet gives the worker."""
    statefulset = yaml.safe_load((ROOT / "deploy" / "base" / "statefulset.yaml").read_text())
    [container] = [
        c for c in statefulset["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"
    ]
    return {
        e["name"]: e["value"]
        for e in container["env"]
        if e["name"] == "STREAM_APP_APP_ID" or e["name"].startswith("STREAM_APP_TOPICS__")
    }


async def grant(bootstrap: str, acls: list[Acl]) -> None:
    """Create ``acls`` for the worker's principal, as Strimzi's User Operator does
    (aiokafka's admin client has no ACL calls: its CreateAcls request does)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        node = next(iter(client.cluster.brokers())).nodeId
        for rtype, name, pattern, operation in acls:
            request = CreateAclsRequest(
                _RESOURCE_TYPES[rtype],
                name,
                _PATTERN_TYPES[pattern],
                PRINCIPAL,
                "*",
                _OPERATIONS[operation],
                _ALLOW,
            )
            answer = await client.send(node, request)
            assert all(code == 0 for code, *_ in answer.creation_responses), answer
    finally:
        await client.close()


async def create_every_topic(bootstrap: str, settings: Settings, partitions: int) -> None:
    """Every topic of ``settings``, as the Topic Operator creates them (the worker
    may not: it has no Create)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(s.name, s.partitions, 1, topic_configs=s.config)
                for s in topic_specs(settings, partitions)
            ]
        )
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    with KafkaCluster(tmp_path_factory.mktemp("secure-kafka"), secure=True) as cluster:
        yield cluster


def _secure_env(d: Deployment, cluster: KafkaCluster, **security: str) -> dict[str, str]:
    """The deployment's environment, the worker pointed at the SASL_SSL listener."""
    env = d.env()
    env["KAFKA_BOOTSTRAP_SERVERS"] = cluster.secure_bootstrap_servers
    env.update(
        {
            "STREAM_APP_SECURITY__PROTOCOL": "SASL_SSL",
            "STREAM_APP_SECURITY__SASL_MECHANISM": "SCRAM-SHA-512",
            "STREAM_APP_SECURITY__SASL_USERNAME": SCRAM_USER,
            "STREAM_APP_SECURITY__SASL_PASSWORD": SCRAM_PASSWORD,
            "STREAM_APP_SECURITY__SSL_CAFILE": str(cluster.ca_file),
        }
    )
    for name, value in security.items():
        variable = f"STREAM_APP_SECURITY__{name.upper()}"
        if value:
            env[variable] = value
        else:
            env.pop(variable, None)
    return env


@pytest.mark.timeout(240)
async def test_the_manifests_acls_are_enough_for_a_worker_over_sasl_ssl(
    secure_cluster: KafkaCluster,
    tmp_path: Path,
    workers: StartWorker,
) -> None:
    """The worker's principal with exactly the KafkaUser's ACLs, the app id and
    topic names of the StatefulSet, every topic created beforehand by an
    operator: it processes commands exactly once."""
    plain = secure_cluster.bootstrap_servers
    named = manifest_env()
    d = Deployment(plain, "sessions", tmp_path / "state")
    env = _secure_env(d, secure_cluster)
    env.update(named)
    env["STREAM_APP_PURGE_INTERVAL_S"] = "0.5"
    # The harness's names for a deployment called "sessions" are the manifest's.
    assert {k: v for k, v in d.env(named["STREAM_APP_APP_ID"]).items() if k in named} == named
    await create_every_topic(plain, d.settings(named["STREAM_APP_APP_ID"]), d.partitions)
    await grant(plain, manifest_acls())
    traffic = generate_traffic(300, seed=5)
    positions = await produce_traffic_records(plain, d.topics.commands, traffic)
    expected = expected_outcome(traffic, positions)
    worker = workers(d, env=env)
    async with OutputReader(plain, d.topics) as reader:
        await reader.wait_for(expected.total, timeout=150, alive=[worker])
        await reader.poll(2.0, alive=[worker])
    problems = exactly_once_problems(reader.outputs, expected, d.topics, d.topics.commands)
    assert not problems, "\n".join(problems) + "\n" + describe_workers([worker])
    # What it processed is deleted from the internal topics: Delete is granted.
    settings = d.settings(named["STREAM_APP_APP_ID"])
    internal = [rekey_topic(settings), profile_topic(settings)]
    offsets = await purged_offsets(plain, settings.app_id, internal, timeout=30)
    assert any(first > 0 for first, _, _ in offsets.values()), offsets
    assert all(first == (committed or 0) for first, committed, _ in offsets.values()), offsets
    assert worker.stop(timeout=30) == 0, worker.log_tail()
    log = worker.log_path.read_text(errors="replace")
    assert SCRAM_PASSWORD not in log
    assert "does not let this worker delete" not in log


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("case", "security", "says"),
    [
        ("wrong password", {"sasl_password": "not the password"}, "SaslAuthenticationFailed"),
        ("no CA", {"ssl_cafile": ""}, "CERTIFICATE_VERIFY_FAILED"),
        (
            "plaintext client",
            {
                "protocol": "PLAINTEXT",
                "sasl_mechanism": "",
                "sasl_username": "",
                "sasl_password": "",
                "ssl_cafile": "",
            },
            "answered with TLS",
        ),
    ],
)
async def test_a_refusing_broker_stops_the_worker_with_one_error_saying_why(
    secure_cluster: KafkaCluster,
    unique_name: Callable[[str], str],
    tmp_path: Path,
    workers: StartWorker,
    case: str,
    security: dict[str, str],
    says: str,
) -> None:
    """Before, the worker retried for ever, logging that Kafka was not reachable."""
    d = Deployment(secure_cluster.bootstrap_servers, unique_name("refused"), tmp_path / "state")
    worker = workers(d, env=_secure_env(d, secure_cluster, **security))
    error = await configuration_error(worker)
    assert "refuses this worker" in error, case
    assert says in error, case
    log = worker.log_tail(200_000)
    assert "not reachable" not in log, log[-3000:]
    assert SCRAM_PASSWORD not in log


@pytest.mark.timeout(120)
async def test_a_missing_acl_stops_the_worker_naming_the_refusal(
    secure_cluster: KafkaCluster,
    tmp_path: Path,
    workers: StartWorker,
) -> None:
    """Another app id, granted the KafkaUser's ACLs for its own names but not
    Read on its consumer group. Before, the poll's GroupAuthorizationFailedError
    ended the worker with a traceback (exit 1); a missing transactional-id ACL
    was retried for ever (tests/pipeline/test_engine_state.py)."""
    plain = secure_cluster.bootstrap_servers
    app_id = "other-app"
    d = Deployment(plain, "other", tmp_path / "state")
    await create_every_topic(plain, d.settings(app_id), d.partitions)
    named = manifest_env()
    renamed = {named["STREAM_APP_APP_ID"]: app_id}
    renamed |= {named[f"STREAM_APP_TOPICS__{field.upper()}"]: getattr(d.topics, field)
                for field in TopicNames.model_fields}  # fmt: skip
    acls = [
        (rtype, _renamed(name, renamed), pattern, operation)
        for rtype, name, pattern, operation in manifest_acls()
        if rtype != "group"
    ]
    await grant(plain, acls)
    env = _secure_env(d, secure_cluster)
    env["STREAM_APP_APP_ID"] = app_id
    worker = workers(d, env=env)
    error = await configuration_error(worker)
    assert "does not authorize this worker's principal" in error
    assert f"GroupAuthorizationFailedError: {app_id}" in error
    assert "Traceback" not in worker.log_tail(200_000)


def _renamed(name: str, renamed: dict[str, str]) -> str:
    """``name`` with the manifest's app id or topic name in it replaced."""
    if name in renamed:
        return renamed[name]
    app_id = next(iter(renamed))  # the app id, first
    return renamed[app_id] + name[len(app_id) :] if name.startswith(app_id) else name
