"""Policies an SRE checks by hand, checked on every rendered overlay, against
the code where the code decides (topic names, counts, settings defaults)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from stream_app.pipeline.application_settings import ApplicationSettingsRegistry
from stream_app.pipeline.topics import profile_topic, rekey_topic, topic_specs
from stream_app.settings import Settings
from tests.deploy.manifests import (
    Rendering,
    acl_allows,
    iter_probes,
    labels_match,
    mebibytes,
    resolve_port,
)
from tests.deploy.test_dockerfile import dockerfile_user, dockerfile_volumes

# --- topics -----------------------------------------------------------------


def command_partitions(r: Rendering) -> int:
    topics = r.kafka_topics()
    command = r.settings().topics.commands
    assert command in topics, f"{r.name}: no KafkaTopic for the command topic {command}"
    partitions: int = topics[command]["spec"]["partitions"]
    return partitions


def topic_problems(r: Rendering) -> list[str]:
    """Every topic the worker uses has a KafkaTopic, as the worker would create
    it, and no KafkaTopic is unused."""
    settings = r.settings()
    topics = r.kafka_topics()
    specs = {s.name: s for s in topic_specs(settings, command_partitions(r))}
    problems = [f"no KafkaTopic for {name}" for name in sorted(specs.keys() - topics.keys())]
    problems += [f"KafkaTopic {name} is unused" for name in sorted(topics.keys() - specs.keys())]
    for name in sorted(specs.keys() & topics.keys()):
        spec, kt = specs[name], topics[name]["spec"]
        if kt.get("partitions") != spec.partitions:
            problems.append(
                f"{name}: {kt.get('partitions')} partitions, the worker expects {spec.partitions}"
            )
        config = kt.get("config", {})
        for key, wanted in {"cleanup.policy": "delete", **spec.config}.items():
            actual = str(config.get(key, "delete" if key == "cleanup.policy" else "unset"))
            if wanted != actual:
                problems.append(f"{name}: {key} {actual}, the worker expects {wanted}")
    return problems


def test_every_topic_the_worker_uses_has_a_kafka_topic_and_none_is_unused(
    rendering: Rendering,
) -> None:
    assert topic_problems(rendering) == []


def test_a_missing_unused_or_misconfigured_kafka_topic_is_caught(rendering: Rendering) -> None:
    changelog = f"{rendering.settings().app_id}-sessions-changelog"
    docs = [
        d
        for d in rendering.docs
        if not (d["kind"] == "KafkaTopic" and d["spec"].get("topicName") == changelog)
    ]
    extra = copy.deepcopy(rendering.of_kind("KafkaTopic")[0])
    extra["spec"]["topicName"] = "sessions.forgotten"
    rekeyed = rekey_topic(rendering.settings())
    docs = copy.deepcopy(docs)
    for doc in docs:
        if doc["kind"] == "KafkaTopic" and doc["spec"]["topicName"] == rekeyed:
            del doc["spec"]["config"]["retention.ms"]
    broken = Rendering(rendering.name, [*docs, extra])
    assert topic_problems(broken) == [
        f"no KafkaTopic for {changelog}",
        "KafkaTopic sessions.forgotten is unused",
        f"{rekeyed}: retention.ms unset, the worker expects -1",
    ]


def test_worker_creates_topics_as_the_topic_operator_does(rendering: Rendering) -> None:
    env = rendering.env_value
    assert env("STREAM_APP_PARTITIONS") == str(command_partitions(rendering))
    replication = {t["spec"]["replicas"] for t in rendering.of_kind("KafkaTopic")}
    assert replication == {int(env("STREAM_APP_REPLICATION_FACTOR") or 1)}
    for topic in rendering.of_kind("KafkaTopic"):
        min_isr = int(topic["spec"].get("config", {}).get("min.insync.replicas", 1))
        assert min_isr <= topic["spec"]["replicas"]
        # One broker may go down without stopping exactly-once writes.
        assert min_isr < topic["spec"]["replicas"] or topic["spec"]["replicas"] == 1


def test_partitions_bound_the_replicas(rendering: Rendering) -> None:
    partitions = command_partitions(rendering)
    statefulset = rendering.statefulset
    scaled = [
        s
        for s in rendering.of_kind("ScaledObject")
        if s["spec"]["scaleTargetRef"]["name"] == statefulset["metadata"]["name"]
    ]
    if scaled:
        (obj,) = scaled
        assert obj["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"
        assert 1 <= obj["spec"]["minReplicaCount"] <= obj["spec"]["maxReplicaCount"] <= partitions
        # KEDA owns the count: a replicas field would reset it on every apply.
        assert "replicas" not in statefulset["spec"]
    else:
        assert 1 <= statefulset["spec"]["replicas"] <= partitions


def test_keda_reads_the_workers_group_and_topics(rendering: Rendering) -> None:
    settings = rendering.settings()
    topics = rendering.kafka_topics()
    users = {u["metadata"]["name"]: u for u in rendering.of_kind("KafkaUser")}
    secrets = {s["metadata"]["name"] for s in rendering.of_kind("Secret")}
    auths = {a["metadata"]["name"]: a for a in rendering.of_kind("TriggerAuthentication")}
    for obj in rendering.of_kind("ScaledObject"):
        for trigger in obj["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert meta["consumerGroup"] == settings.app_id
            assert meta["topic"] in topics
            # The worker's service, named so that it resolves in KEDA's own
            # namespace (a short name failed there: no autoscaling, one pod).
            worker = rendering.env_value("KAFKA_BOOTSTRAP_SERVERS")
            for mine, keda in zip(
                worker.split(","), meta["bootstrapServers"].split(","), strict=True
            ):
                host, port = keda.rsplit(":", 1)
                assert host.endswith(".svc"), keda
                assert (host.split(".")[0], port) == (
                    mine.rsplit(":", 1)[0].split(".")[0],
                    mine.rsplit(":", 1)[1],
                )
            assert meta.get("allowIdleConsumers", "false") == "false"
            auth = auths[trigger["authenticationRef"]["name"]]
            refs = {t["parameter"]: t for t in auth["spec"]["secretTargetRef"]}
            user = users[refs["password"]["name"]]
            assert refs["password"]["key"] == "password"
            assert refs["username"]["name"] in secrets
            assert acl_allows(user, "group", settings.app_id, "Describe")
            assert acl_allows(user, "topic", meta["topic"], "Describe")


# --- the worker's principal -------------------------------------------------


def worker_user(r: Rendering) -> dict[str, object]:
    """The KafkaUser whose Strimzi secret the worker uses."""
    users = {u["metadata"]["name"]: u for u in r.of_kind("KafkaUser")}
    password = r.env.get("STREAM_APP_SECURITY__SASL_PASSWORD")
    if password is not None:
        name = password["valueFrom"]["secretKeyRef"]["name"]
    else:
        certfile = r.env_value("STREAM_APP_SECURITY__SSL_CERTFILE")
        assert certfile is not None, f"{r.name}: neither SASL nor TLS client authentication"
        name = r.mounted_file(certfile)[0]["secret"]["secretName"]
    assert name in users, f"{r.name}: the worker's secret {name} belongs to no KafkaUser"
    user: dict[str, object] = users[name]
    return user


def test_worker_principal_has_exactly_what_the_worker_needs(rendering: Rendering) -> None:
    settings = rendering.settings()
    user = worker_user(rendering)
    t = settings.topics
    specs = topic_specs(settings, command_partitions(rendering))
    internal = {s.name for s in specs if s.co_partitioned} - {t.commands}
    outputs = {t.closed, t.returned, t.cancelled, t.reopened, t.rejected}
    for name in {t.commands, t.application_settings} | internal:
        assert acl_allows(user, "topic", name, "Read"), name
    for name in outputs | internal:
        assert acl_allows(user, "topic", name, "Write"), name
    purged = {s.name for s in specs if s.config.get("retention.ms") == "-1"}
    assert purged == {rekey_topic(settings), profile_topic(settings)}
    for name in purged:  # what it has processed (stream_app/pipeline/purge.py)
        assert acl_allows(user, "topic", name, "Delete"), name
    for name in {s.name for s in specs} - purged:
        assert not acl_allows(user, "topic", name, "Delete"), name
    for spec in specs:
        assert acl_allows(user, "topic", spec.name, "Describe"), spec.name
        assert acl_allows(user, "topic", spec.name, "DescribeConfigs"), spec.name
    for name in (t.commands, t.application_settings):
        assert not acl_allows(user, "topic", name, "Write"), f"the worker may write {name}"
    assert acl_allows(user, "group", settings.app_id, "Read")
    for partition in (0, 11):
        assert acl_allows(
            user, "transactionalId", f"{settings.app_id}-{t.commands}-{partition}", "Write"
        )
    assert not acl_allows(user, "transactionalId", "other-app-0", "Write")
    assert not any(acl_allows(user, "topic", s.name, "Create") for s in specs)


def test_only_the_worker_principal_may_write_internal_topics(rendering: Rendering) -> None:
    settings = rendering.settings()
    internal = [
        s.name
        for s in topic_specs(settings, command_partitions(rendering))
        if s.co_partitioned and s.name != settings.topics.commands
    ]
    assert len(internal) == 5
    worker = worker_user(rendering)
    for user in rendering.of_kind("KafkaUser"):
        if user is worker:
            continue
        for name in internal:
            for op in ("Write", "Delete", "Alter", "AlterConfigs", "Read"):
                assert not acl_allows(user, "topic", name, op), (user["metadata"]["name"], name, op)


def test_strimzi_secrets_are_used_as_they_are(rendering: Rendering) -> None:
    user = worker_user(rendering)
    name = user["metadata"]["name"]  # type: ignore[index]
    auth = user["spec"]["authentication"]["type"]  # type: ignore[index]
    protocol = rendering.env_value("STREAM_APP_SECURITY__PROTOCOL")
    ca = rendering.env_value("STREAM_APP_SECURITY__SSL_CAFILE")
    assert ca is not None
    volume, key = rendering.mounted_file(ca)
    assert volume["secret"]["secretName"].endswith("-cluster-ca-cert")
    assert key == "ca.crt"
    assert {i["key"]: i["path"] for i in volume["secret"].get("items", [])}.get(key, key) == key
    if auth == "scram-sha-512":
        assert protocol == "SASL_SSL"
        assert rendering.env_value("STREAM_APP_SECURITY__SASL_MECHANISM") == "SCRAM-SHA-512"
        assert rendering.env_value("STREAM_APP_SECURITY__SASL_USERNAME") == name
        ref = rendering.env["STREAM_APP_SECURITY__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": name, "key": "password"}
    else:
        assert auth == "tls"
        assert protocol == "SSL"
        assert not any(k.startswith("STREAM_APP_SECURITY__SASL") for k in rendering.env)
        for env, secret_key in (("SSL_CERTFILE", "user.crt"), ("SSL_KEYFILE", "user.key")):
            path = rendering.env_value(f"STREAM_APP_SECURITY__{env}")
            assert path is not None
            volume, key = rendering.mounted_file(path)
            assert volume["secret"]["secretName"] == name
            assert key == secret_key
    # No secret value is ever written into the manifest.
    for entry in rendering.env.values():
        if "PASSWORD" in entry["name"]:
            assert "value" not in entry


# --- pods, probes and shutdown -----------------------------------------------


def test_pdb_selects_exactly_the_workers(rendering: Rendering) -> None:
    pdb = rendering.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "minAvailable" not in pdb["spec"]
    pod_labels = rendering.pod["metadata"]["labels"]
    assert labels_match(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"]["selector"] == rendering.statefulset["spec"]["selector"]


def test_pdb_selector_mismatch_is_caught(rendering: Rendering) -> None:
    selector = copy.deepcopy(rendering.one("PodDisruptionBudget")["spec"]["selector"])
    selector["matchLabels"]["app.kubernetes.io/name"] = "stream-ap"
    assert not labels_match(selector, rendering.pod["metadata"]["labels"])


def test_headless_service_backs_the_statefulset(rendering: Rendering) -> None:
    statefulset = rendering.statefulset
    services = {s["metadata"]["name"]: s for s in rendering.of_kind("Service")}
    service = services[statefulset["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    assert labels_match(
        {"matchLabels": service["spec"]["selector"]}, rendering.pod["metadata"]["labels"]
    )
    for port in service["spec"]["ports"]:
        assert resolve_port(rendering.worker, port["targetPort"]) == port["port"]
    for monitor in rendering.of_kind("ServiceMonitor"):
        assert labels_match(monitor["spec"]["selector"], service["metadata"]["labels"])
        names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in names
            assert endpoint["path"] == "/metrics"


def http_port(r: Rendering) -> int:
    configured = r.env_value("STREAM_APP_HTTP_PORT")
    return int(configured) if configured is not None else 8080


def test_probes_hit_the_workers_endpoints(rendering: Rendering) -> None:
    worker = rendering.worker
    probes = dict(iter_probes(worker))
    assert set(probes) == {"startupProbe", "livenessProbe", "readinessProbe"}
    expected = {"startupProbe": "/readyz", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for kind, probe in probes.items():
        get = probe["httpGet"]
        assert get["path"] == expected[kind], kind
        assert resolve_port(worker, get["port"]) == http_port(rendering), kind
        assert get.get("scheme", "HTTP") == "HTTP"
    assert {p["containerPort"] for p in worker["ports"] if p["name"] == "http"} == {
        http_port(rendering)
    }


def test_startup_probe_leaves_time_for_a_restore(rendering: Rendering) -> None:
    startup = rendering.worker["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= 30 * 60
    liveness = rendering.worker["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] <= 60


def test_grace_period_exceeds_the_shutdown_bound(rendering: Rendering) -> None:
    configured = rendering.env_value("STREAM_APP_SHUTDOWN_TIMEOUT_S")
    bound = float(configured) if configured is not None else Settings().shutdown_timeout_s
    grace = rendering.pod["spec"]["terminationGracePeriodSeconds"]
    # A few seconds beyond the bound for the worker's own exit after it.
    assert grace >= bound + 5


def test_queries_are_forwarded_to_a_name_other_pods_resolve(rendering: Rendering) -> None:
    """Without it a worker advertised its host name, stream-app-0, which the
    other pods cannot resolve: every forwarded query failed with a 503."""
    env = list(rendering.env)
    advertised = rendering.env_value("STREAM_APP_ADVERTISED_HOST")
    service = rendering.statefulset["spec"]["serviceName"]
    assert advertised == f"$(STREAM_APP_GROUP_INSTANCE_ID).{service}"
    # Kubernetes expands $(NAME) only from variables defined before it.
    assert env.index("STREAM_APP_GROUP_INSTANCE_ID") < env.index("STREAM_APP_ADVERTISED_HOST")
    instance = rendering.env["STREAM_APP_GROUP_INSTANCE_ID"]
    assert instance["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_static_membership_from_the_pod_name(rendering: Rendering) -> None:
    entry = rendering.env["STREAM_APP_GROUP_INSTANCE_ID"]
    assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    session = float(rendering.env_value("STREAM_APP_SESSION_TIMEOUT_S") or 30)
    assert session >= Settings().shutdown_timeout_s


def test_statefulset_shape(rendering: Rendering) -> None:
    spec = rendering.statefulset["spec"]
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    data_dir = rendering.env_value("STREAM_APP_DATA_DIR")
    mounts = {m["mountPath"]: m["name"] for m in rendering.worker["volumeMounts"]}
    assert mounts[data_dir] == claim["metadata"]["name"]
    assert data_dir in dockerfile_volumes()
    assert rendering.env_value("STREAM_APP_LOG_FORMAT") == "json"
    image = rendering.worker["image"]
    assert ":" in image.rsplit("/", 1)[-1]
    assert not image.endswith(":latest")


def test_security_context(rendering: Rendering) -> None:
    pod = rendering.pod["spec"]
    uid, gid = dockerfile_user()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["runAsGroup"] == gid
    assert pod["securityContext"]["fsGroup"] == gid
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    # No STREAM_APP_* service-link variables from Services named stream-app-*.
    assert pod["enableServiceLinks"] is False
    for container in pod["containers"]:
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx.get("privileged", False) is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}


def required_memory_mib(r: Rendering) -> float:
    """docs/operations.md, "Memory": RocksDB + Python + fetch buffers + indexes, +25 %."""
    defaults = Settings().rocksdb

    def setting(name: str, default: int) -> int:
        return int(r.env_value(f"STREAM_APP_ROCKSDB__{name}") or default)

    rocksdb = setting("BLOCK_CACHE_MB", defaults.block_cache_mb) + setting(
        "WRITE_BUFFER_MB", defaults.write_buffer_mb
    ) * setting("MAX_WRITE_BUFFERS", defaults.max_write_buffers)
    partitions = command_partitions(r)
    (claim,) = r.statefulset["spec"]["volumeClaimTemplates"]
    state = mebibytes(claim["spec"]["resources"]["requests"]["storage"])
    return 1.25 * (rocksdb + 128 + 18 * partitions + state / 100)


def test_memory_is_guaranteed_and_sized_from_rocksdb(rendering: Rendering) -> None:
    resources = rendering.worker["resources"]
    request = mebibytes(resources["requests"]["memory"])
    limit = mebibytes(resources["limits"]["memory"])
    assert request == limit
    assert limit >= required_memory_mib(rendering)
    # The budget is the point: not a multiple of what it needs.
    assert limit <= 2 * required_memory_mib(rendering)


def test_settings_file_comes_from_a_config_map(rendering: Rendering, tmp_path: Path) -> None:
    path = rendering.env_value("STREAM_APP_APPLICATION_SETTINGS_FILE")
    assert path is not None
    volume, key = rendering.mounted_file(path)
    maps = {m["metadata"]["name"]: m for m in rendering.of_kind("ConfigMap")}
    content = maps[volume["configMap"]["name"]]["data"][key]
    local = tmp_path / key
    local.write_text(content)
    registry = ApplicationSettingsRegistry.load(local)
    for application_id in json.loads(content):
        registry.settings_for(int(application_id))


def test_one_namespace_for_everything(rendering: Rendering) -> None:
    namespaces = {d["metadata"].get("namespace") for d in rendering.docs}
    assert len(namespaces) == 1
    assert None not in namespaces
