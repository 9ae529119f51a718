"""prod and prod-v2, a second app id, run side by side in one namespace
(docs/operations.md, "Migrate: a new app id"): each as kustomize renders it
alone, checked together, as both are applied to the namespace.

Every check is a function returning the problems it finds; the last tests run
them on a naive second deployment (the prod overlay with a name prefix, other
selector labels and another app id, as the docs once said) and on broken
copies of the two, which each must catch.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import promql_parser
import pytest

from stream_app.pipeline.engine import Engine
from stream_app.pipeline.topics import TopicLayout, internal_topics, profile_topic, rekey_topic
from tests.deploy.manifests import (
    DEPLOY,
    Doc,
    Rendering,
    acl_allows,
    kustomize,
    labels_match,
    selectors,
)

PROD, V2 = "prod", "prod-v2"

# --- reading the renderings ---------------------------------------------------


def namespace(doc: Doc) -> str:
    ns: str = doc["metadata"]["namespace"]
    return ns


def name(doc: Doc) -> str:
    found: str = doc["metadata"]["name"]
    return found


def replicas(r: Rendering) -> int:
    """The most pods the StatefulSet may have: KEDA's maximum, else its replicas."""
    scaled = [int(s["spec"]["maxReplicaCount"]) for s in r.of_kind("ScaledObject")]
    return max([*scaled, int(r.statefulset["spec"].get("replicas", 1))])


def objects(r: Rendering) -> Iterator[tuple[str, str, str]]:
    """(kind, namespace, name) of what applying ``r`` makes in the cluster: its
    own resources and those the operators create from them, named after them."""
    for doc in r.docs:
        ns, own = namespace(doc), name(doc)
        yield doc["kind"], ns, own
        if doc["kind"] == "KafkaUser":  # Strimzi's User Operator: the credentials
            yield "Secret", ns, own
        elif doc["kind"] == "ScaledObject":  # KEDA
            yield "HorizontalPodAutoscaler", ns, f"keda-hpa-{own}"
        elif doc["kind"] == "StatefulSet":
            for ordinal in range(replicas(r)):
                yield "Pod", ns, f"{own}-{ordinal}"
                for claim in doc["spec"].get("volumeClaimTemplates", []):
                    yield "PersistentVolumeClaim", ns, f"{name(claim)}-{own}-{ordinal}"


def matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector against a label set. An empty selector ({}) selects
    everything, as it does for a PodDisruptionBudget (policy/v1) and a
    ServiceMonitor; an absent one (None) selects nothing."""
    if selector is None:
        return False
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return True
    return labels_match(selector, labels)


def service_selector(service: Doc) -> dict[str, Any] | None:
    """A Service's selector as a LabelSelector; one without a selector selects
    no pod (its endpoints are someone else's to manage)."""
    plain = service["spec"].get("selector")
    return {"matchLabels": plain} if plain else None


def in_scope(monitor: Doc, service: Doc) -> bool:
    """Whether a ServiceMonitor looks at the namespace of ``service``."""
    scope = monitor["spec"].get("namespaceSelector", {})
    if scope.get("any"):
        return True
    return namespace(service) in scope.get("matchNames", [namespace(monitor)])


def pods(renders: list[Rendering]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(name of its StatefulSet, namespace, labels) of every pod template."""
    for r in renders:
        for sts in r.of_kind("StatefulSet"):
            yield name(sts), namespace(sts), sts["spec"]["template"]["metadata"]["labels"]


def worker_user(r: Rendering) -> Doc | None:
    """The KafkaUser the worker logs in as (its SASL user name), if it is in ``r``."""
    username = r.env_value("STREAM_APP_SECURITY__SASL_USERNAME")
    users = {name(u): u for u in r.of_kind("KafkaUser")}
    return users.get(username or "")


def transactional_ids(r: Rendering) -> list[str]:
    """Every task's transactional id, as the worker names them
    (stream_app/pipeline/tasks.py, Task.transactional_id)."""
    settings = r.settings()
    partitions = int(r.env_value("STREAM_APP_PARTITIONS") or 1)
    engine = Engine(settings, TopicLayout(partitions, 1_048_588))
    return [
        f"{settings.app_id}-{stage.inputs[0]}-{partition}"
        for stage in engine.stages
        for partition in range(partitions)
    ]


def job(r: Rendering) -> str:
    """The job label of the worker's series: the Prometheus Operator names it
    after the Service the ServiceMonitor scrapes."""
    (monitor,) = r.of_kind("ServiceMonitor")
    assert "jobLabel" not in monitor["spec"]
    services = [
        s
        for s in r.of_kind("Service")
        if in_scope(monitor, s) and matches(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert len(services) == 1, f"{r.name}: its ServiceMonitor scrapes {len(services)} Services"
    return name(services[0])


def rules(r: Rendering) -> list[Doc]:
    return [
        rule
        for doc in r.of_kind("PrometheusRule")
        for group in doc["spec"]["groups"]
        for rule in group["rules"]
    ]


# --- the checks: each returns what it finds wrong -------------------------------


def name_clashes(renders: list[Rendering]) -> list[str]:
    """Objects of the same kind and name in one namespace (the second apply
    would overwrite the first's), and a consumer group used twice."""
    seen = Counter(obj for r in renders for obj in set(objects(r)))
    found = [f"{kind} {ns}/{n} is in both" for (kind, ns, n), count in seen.items() if count > 1]
    groups = Counter(r.settings().app_id for r in renders)
    found += [f"both are group {group}" for group, count in groups.items() if count > 1]
    return sorted(found)


def topics_owned_twice(renders: list[Rendering]) -> list[str]:
    """Kafka topics with a KafkaTopic in more than one rendering: Strimzi marks
    the newer a conflict, and deleting either deletes the topic."""
    owners = Counter(topic for r in renders for topic in r.kafka_topics())
    return sorted(f"{topic} has {n} KafkaTopics" for topic, n in owners.items() if n > 1)


#: What selects a pod, by kind: the selector of each such object.
POD_SELECTORS: dict[str, Callable[[Doc], Mapping[str, Any] | None]] = {
    "StatefulSet": lambda d: d["spec"]["selector"],
    "PodDisruptionBudget": lambda d: d["spec"]["selector"],
    "Service": service_selector,
}


def selection_problems(renders: list[Rendering]) -> list[str]:
    """Each worker pod is selected by exactly one StatefulSet, PDB, Service and
    ServiceMonitor (through a Service), and counts in the topology spread of
    its own StatefulSet only."""
    docs = [d for r in renders for d in r.docs]

    def of_kind(kind: str, ns: str) -> list[Doc]:
        return [d for d in docs if d["kind"] == kind and namespace(d) == ns]

    found = []
    for owner, ns, labels in pods(renders):
        selecting = {
            kind: [name(d) for d in of_kind(kind, ns) if matches(selector(d), labels)]
            for kind, selector in POD_SELECTORS.items()
        }
        selecting["ServiceMonitor"] = [
            f"{name(m)} through {name(s)}"
            for m in docs
            if m["kind"] == "ServiceMonitor"
            for s in of_kind("Service", ns)
            if in_scope(m, s)
            and matches(m["spec"]["selector"], s["metadata"]["labels"])
            and matches(service_selector(s), labels)
        ]
        for kind, names in selecting.items():
            if len(names) != 1:
                found.append(f"pods of {owner}: {len(names)} {kind}s select them {names}")
        for sts in of_kind("StatefulSet", ns):
            spread = sts["spec"]["template"]["spec"].get("topologySpreadConstraints", [])
            if name(sts) != owner and any(matches(c.get("labelSelector"), labels) for c in spread):
                found.append(f"pods of {owner} count in the spread of {name(sts)}")
    return found


def advertised_host_problems(r: Rendering) -> list[str]:
    """Other pods forward session queries to the advertised host: the pod's
    name under its own headless Service, the StatefulSet's serviceName."""
    service = r.statefulset["spec"]["serviceName"]
    advertised = r.env_value("STREAM_APP_ADVERTISED_HOST") or ""
    found = []
    if advertised != f"$(STREAM_APP_GROUP_INSTANCE_ID).{service}":
        found.append(f"{r.name}: advertises {advertised}, its pods are under {service}")
    services = {name(s): s for s in r.of_kind("Service")}
    if service not in services:
        found.append(f"{r.name}: its Service {service} is not its own")
    elif not matches(service_selector(services[service]), r.pod["metadata"]["labels"]):
        found.append(f"{r.name}: its Service {service} does not select its pods")
    return found


def credential_problems(r: Rendering) -> list[str]:
    """The worker logs in as its own KafkaUser, with the password of the
    Secret Strimzi creates under that user's name."""
    username = r.env_value("STREAM_APP_SECURITY__SASL_USERNAME")
    ref = r.env["STREAM_APP_SECURITY__SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    found = []
    if worker_user(r) is None:
        found.append(f"{r.name}: logs in as {username}, which is no KafkaUser of its own")
    if ref != {"name": username, "key": "password"}:
        found.append(f"{r.name}: logs in as {username} with the password of secret {ref['name']}")
    return found


def keda_problems(r: Rendering) -> list[str]:
    """Its ScaledObject scales its StatefulSet on its group's lag, read by its
    own lag reader: the TriggerAuthentication's Secrets are those of a
    KafkaUser of its own, which may describe that group and those topics."""
    settings = r.settings()
    statefulset = name(r.statefulset)
    auths = {name(a): a for a in r.of_kind("TriggerAuthentication")}
    users = {name(u): u for u in r.of_kind("KafkaUser")}
    secrets = {name(s): s for s in r.of_kind("Secret")}
    found = []
    for obj in r.of_kind("ScaledObject"):
        target = obj["spec"]["scaleTargetRef"]["name"]
        if target != statefulset:
            found.append(f"{r.name}: {name(obj)} scales {target}, not {statefulset}")
        for trigger in obj["spec"]["triggers"]:
            meta = trigger["metadata"]
            if meta["consumerGroup"] != settings.app_id:
                found.append(f"{r.name}: a trigger reads the lag of group {meta['consumerGroup']}")
            auth = auths.get(trigger["authenticationRef"]["name"])
            if auth is None:
                found.append(f"{r.name}: {trigger['authenticationRef']['name']} is not its own")
                continue
            refs = {t["parameter"]: t["name"] for t in auth["spec"]["secretTargetRef"]}
            user = users.get(refs["password"])
            if user is None:
                found.append(f"{r.name}: the lag reader's password is {refs['password']}'s")
                continue
            data = secrets.get(refs["username"], {}).get("data", {})
            username = base64.b64decode(data.get("username", "")).decode()
            if username != name(user):
                found.append(f"{r.name}: the lag reader logs in as {username!r}, not {name(user)}")
            if not acl_allows(user, "group", settings.app_id, "Describe"):
                found.append(f"{r.name}: {name(user)} may not describe group {settings.app_id}")
            if not acl_allows(user, "topic", meta["topic"], "Describe"):
                found.append(f"{r.name}: {name(user)} may not describe {meta['topic']}")
    return found


def acl_problems(r: Rendering) -> list[str]:
    """The worker's KafkaUser may use its app id's group, internal topics and
    changelogs, and transactional ids, named as the worker names them."""
    settings = r.settings()
    user = worker_user(r)
    if user is None:
        return [f"{r.name}: the worker has no KafkaUser"]
    wanted = [("group", settings.app_id, op) for op in ("Read", "Describe")]
    for topic in internal_topics(settings):
        wanted += [("topic", topic, op) for op in ("Read", "Write", "Describe", "DescribeConfigs")]
    wanted += [("topic", t, "Delete") for t in (rekey_topic(settings), profile_topic(settings))]
    wanted += [
        ("transactionalId", t, op) for t in transactional_ids(r) for op in ("Write", "Describe")
    ]
    missing = [w for w in wanted if not acl_allows(user, *w)]
    return [f"{r.name}: {name(user)} may not {op} {kind} {n}" for kind, n, op in missing]


def foreign_acl_problems(renders: list[Rendering]) -> list[str]:
    """No worker principal may use another's group, internal topics or outputs,
    nor v2's principal the transactional ids of prod's workers. (The other way
    round it may: the base's prefix ACL stream-app- covers stream-app-v2-.)"""
    found = []
    for mine in renders:
        user = worker_user(mine)
        for other in renders:
            if other is mine or user is None:
                continue
            theirs = other.settings()
            t = theirs.topics
            forbidden = [("group", theirs.app_id, "Read")]
            forbidden += [("topic", n, "Write") for n in internal_topics(theirs)]
            forbidden += [("topic", n, "Read") for n in internal_topics(theirs)]
            outputs = (t.closed, t.returned, t.cancelled, t.reopened, t.rejected)
            forbidden += [("topic", n, "Write") for n in outputs]
            if mine.name != PROD:
                forbidden += [("transactionalId", i, "Write") for i in transactional_ids(other)]
            found += [
                f"{name(user)} may {op} {other.name}'s {kind} {n}"
                for kind, n, op in forbidden
                if acl_allows(user, kind, n, op)
            ]
    return found


def alert_job_problems(r: Rendering, *, every_selector: bool) -> list[str]:
    """Every job an alert selects is its own; with ``every_selector``, every
    series it selects is pinned to it (else it sees the other deployment's)."""
    own = job(r)
    found = []
    for rule in rules(r):
        for metric, matchers in selectors(str(rule["expr"])):
            selected = matchers.get("job")
            if selected is not None and selected != own:
                found.append(f"{r.name}: {rule['alert']} selects {metric} of job {selected}")
            elif selected is None and every_selector:
                found.append(f"{r.name}: {rule['alert']} selects {metric} of every job")
    return found


def without_job(expr: str) -> str:
    """A rule's expression without its job matchers and job grouping, prettified."""
    text = re.sub(r'job="[^"]*",?', "", expr)
    text = re.sub(r"\{\s*\}", "", text)
    text = re.sub(
        r"\bby \(([^)]*)\)",
        lambda m: "by (" + ", ".join(x for x in m.group(1).split(", ") if x != "job") + ")",
        text,
    )
    return str(promql_parser.parse(text).prettify())


def alert_drift(prod: Rendering, v2: Rendering) -> list[str]:
    """v2's rules are prod's but for the job: a threshold tuned in the
    component reaches both."""
    theirs = {rule["alert"]: rule for rule in rules(prod)}
    mine = {rule["alert"]: rule for rule in rules(v2)}
    found = [f"{a} is in one only" for a in sorted(theirs.keys() ^ mine.keys())]
    for alert in sorted(theirs.keys() & mine.keys()):
        a, b = theirs[alert], mine[alert]
        if without_job(a["expr"]) != without_job(b["expr"]):
            found.append(f"{alert}: {b['expr']!r} is not {a['expr']!r} for another job")
        for key in ("for", "labels", "annotations"):
            if a.get(key) != b.get(key):
                found.append(f"{alert}: its {key} differ")
    return found


# --- the two deployments --------------------------------------------------------


@pytest.fixture
def pair(overlay_renderings: dict[str, Rendering]) -> list[Rendering]:
    return [overlay_renderings[PROD], overlay_renderings[V2]]


@pytest.fixture(params=[PROD, V2])
def each(request: pytest.FixtureRequest, overlay_renderings: dict[str, Rendering]) -> Rendering:
    return overlay_renderings[request.param]


def test_no_two_objects_share_a_name(pair: list[Rendering]) -> None:
    assert {ns for r in pair for _, ns, _ in objects(r)} == {"stream-app"}
    assert name_clashes(pair) == []


def test_no_topic_is_owned_twice(pair: list[Rendering]) -> None:
    assert topics_owned_twice(pair) == []


def test_v2_reads_the_inputs_prod_owns_and_writes_outputs_of_its_own(
    pair: list[Rendering],
) -> None:
    prod, v2 = pair
    p, t = prod.settings().topics, v2.settings().topics
    assert (t.commands, t.application_settings) == (p.commands, p.application_settings)
    assert {t.commands, t.application_settings} <= prod.kafka_topics().keys()
    outputs = {t.closed, t.returned, t.cancelled, t.reopened, t.rejected}
    assert not outputs & {p.closed, p.returned, p.cancelled, p.reopened, p.rejected}
    assert outputs <= v2.kafka_topics().keys()


def test_every_worker_pod_is_selected_once(pair: list[Rendering]) -> None:
    assert len(list(pods(pair))) == 2
    assert selection_problems(pair) == []


def test_each_worker_advertises_its_pods_under_its_own_service(each: Rendering) -> None:
    assert advertised_host_problems(each) == []


def test_each_worker_logs_in_as_its_own_kafka_user(each: Rendering) -> None:
    assert credential_problems(each) == []


def test_keda_scales_each_statefulset_on_its_own_lag(each: Rendering) -> None:
    assert len(each.of_kind("ScaledObject")) == 1
    assert keda_problems(each) == []


def test_each_principal_covers_its_app_id(each: Rendering) -> None:
    assert len(transactional_ids(each)) == 2 * 12
    assert acl_problems(each) == []


@pytest.mark.parametrize(
    ("component", "kinds"),
    [("keda", {"ScaledObject", "TriggerAuthentication"}), ("service-monitor", {"ServiceMonitor"})],
)
def test_a_copy_builds_on_prod_without_an_optional_component(
    tmp_path: Path, component: str, kinds: set[str]
) -> None:
    """Operations says to drop a component line without KEDA or the Prometheus
    Operator; prod-v2 then failed to build on prod: its untargeted patches of
    the component's resources found nothing to patch."""
    copied = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copied)
    prod = copied / "overlays" / PROD / "kustomization.yaml"
    text = prod.read_text()
    assert f"  - ../../components/{component}\n" in text
    prod.write_text(text.replace(f"  - ../../components/{component}\n", ""))
    if component == "keda":  # as docs/operations.md (Migrate, KEDA) says
        v2 = copied / "overlays" / V2 / "kustomization.yaml"
        text = v2.read_text()
        block = re.search(r"\nsecretGenerator:\n(  .*\n|    .*\n)*", text)
        assert block is not None
        v2.write_text(text.replace(block.group(0), "\n"))
    pair = [Rendering(name, kustomize(copied / "overlays" / name)) for name in (PROD, V2)]
    assert not any(r.of_kind(kind) for r in pair for kind in kinds)
    assert name_clashes(pair) == []
    unselected = "0 ServiceMonitors select them"
    assert [p for p in selection_problems(pair) if unselected not in p] == []
    for each in pair:
        assert credential_problems(each) == []


def test_no_principal_covers_the_others_app_id(pair: list[Rendering]) -> None:
    assert foreign_acl_problems(pair) == []


def test_alerts_select_their_own_job(pair: list[Rendering]) -> None:
    prod, v2 = pair
    assert (job(prod), job(v2)) == ("stream-app", "stream-app-v2")
    # prod's rules are the alerts component's: only its `up` rules name a job.
    # (The others see v2's series too; pinning them is the component's to do.)
    assert alert_job_problems(prod, every_selector=False) == []
    assert alert_job_problems(v2, every_selector=True) == []
    assert alert_drift(prod, v2) == []


# --- the checks catch what they are for ------------------------------------------


#: The second deployment the docs once described: the prod overlay again with
#: a name prefix, an instance label in every selector and another app id.
NAIVE = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {prod}
namePrefix: v2-
labels:
  - pairs:
      app.kubernetes.io/instance: stream-app-v2
    includeSelectors: true
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: StatefulSet
      metadata:
        name: stream-app
      spec:
        template:
          spec:
            containers:
              - name: worker
                env:
                  - name: STREAM_APP_APP_ID
                    value: stream-app-v2
"""


@pytest.fixture(scope="module")
def naive(tmp_path_factory: pytest.TempPathFactory) -> Rendering:
    tmp: Path = tmp_path_factory.mktemp("naive-v2")
    prod = os.path.relpath(DEPLOY / "overlays" / PROD, tmp)  # kustomize wants it relative
    (tmp / "kustomization.yaml").write_text(NAIVE.format(prod=prod))
    return Rendering("naive", kustomize(tmp))


NAIVE_CHECKS: dict[str, tuple[Callable[[list[Rendering]], list[str]], str]] = {
    "topics": (topics_owned_twice, "sessions.commands has 2 KafkaTopics"),
    "selection": (selection_problems, "2 PodDisruptionBudgets select them"),
    "advertised host": (
        lambda rs: advertised_host_problems(rs[1]),
        "advertises $(STREAM_APP_GROUP_INSTANCE_ID).stream-app, its pods are under v2-stream-app",
    ),
    "credentials": (
        lambda rs: credential_problems(rs[1]),
        "logs in as stream-app, which is no KafkaUser of its own",
    ),
    "keda": (lambda rs: keda_problems(rs[1]), "v2-stream-app scales stream-app, not v2-stream-app"),
    "acls": (lambda rs: acl_problems(rs[1]), "the worker has no KafkaUser"),
    "foreign acls": (foreign_acl_problems, "stream-app may Write naive's topic sessions.closed"),
    "alerts": (
        lambda rs: alert_job_problems(rs[1], every_selector=True),
        "StreamAppWorkerDown selects up of job stream-app",
    ),
}


@pytest.mark.parametrize("check", NAIVE_CHECKS)
def test_the_naive_second_deployment_is_caught(
    overlay_renderings: dict[str, Rendering], naive: Rendering, check: str
) -> None:
    function, expected = NAIVE_CHECKS[check]
    found = function([overlay_renderings[PROD], naive])
    assert any(expected in problem for problem in found), found


def broken(r: Rendering, change: Callable[[Callable[[str, str], Doc]], object]) -> Rendering:
    """A copy of ``r`` that ``change`` alters, given a lookup (kind, name) -> doc."""
    docs = copy.deepcopy(r.docs)
    change(lambda kind, n: next(d for d in docs if d["kind"] == kind and name(d) == n))
    return Rendering(r.name, docs)


def test_its_password_and_acls_are_caught_with_its_user_name_right(naive: Rendering) -> None:
    """The naive worker's password is still the old principal's, and its
    KafkaUser's ACLs still the old app id's."""

    def username(doc: Callable[[str, str], Doc]) -> None:
        env = doc("StatefulSet", "v2-stream-app")["spec"]["template"]["spec"]["containers"][0]
        user = next(e for e in env["env"] if e["name"] == "STREAM_APP_SECURITY__SASL_USERNAME")
        user["value"] = "v2-stream-app"

    fixed = broken(naive, username)
    assert credential_problems(fixed) == [
        "naive: logs in as v2-stream-app with the password of secret stream-app"
    ]
    found = acl_problems(fixed)
    assert "naive: v2-stream-app may not Read group stream-app-v2" in found
    assert "naive: v2-stream-app may not Write topic stream-app-v2-sessions.rekeyed" in found
    assert not any("transactionalId" in f for f in found)  # its prefix stream-app- covers them


def test_a_name_clash_is_caught(pair: list[Rendering]) -> None:
    prod, v2 = pair
    clash = broken(
        v2, lambda doc: doc("ServiceAccount", "stream-app-v2")["metadata"].update(name="stream-app")
    )
    assert name_clashes([prod, clash]) == ["ServiceAccount stream-app/stream-app is in both"]
    reader = broken(
        v2,
        lambda doc: doc("KafkaUser", "stream-app-lag-reader-v2")["metadata"].update(
            name="stream-app-lag-reader"
        ),
    )
    assert name_clashes([prod, reader]) == [
        "KafkaUser stream-app/stream-app-lag-reader is in both",
        "Secret stream-app/stream-app-lag-reader is in both",  # Strimzi's, of each
    ]


def test_a_selector_of_both_deployments_is_caught(pair: list[Rendering]) -> None:
    prod, v2 = pair
    wide = broken(
        v2,
        lambda doc: doc("ServiceMonitor", "stream-app-v2")["spec"].update(
            selector={"matchLabels": {"app.kubernetes.io/component": "worker"}}
        ),
    )
    # prod's pods are scraped twice, through their Service.
    assert selection_problems([prod, wide]) == [
        "pods of stream-app: 2 ServiceMonitors select them "
        "['stream-app through stream-app', 'stream-app-v2 through stream-app']"
    ]
    # An empty selector selects every pod of the namespace.
    every = broken(
        v2, lambda doc: doc("PodDisruptionBudget", "stream-app-v2")["spec"].update(selector={})
    )
    assert selection_problems([prod, every]) == [
        "pods of stream-app: 2 PodDisruptionBudgets select them ['stream-app', 'stream-app-v2']"
    ]


def test_a_lag_reader_logging_in_as_another_is_caught(pair: list[Rendering]) -> None:
    def username(doc: Callable[[str, str], Doc]) -> None:
        secret = doc("Secret", "stream-app-lag-reader-username-v2")
        secret["data"]["username"] = base64.b64encode(b"stream-app-lag-reader").decode()

    wrong = "prod-v2: the lag reader logs in as 'stream-app-lag-reader', not "
    assert keda_problems(broken(pair[1], username)) == [f"{wrong}stream-app-lag-reader-v2"] * 2


def set_expr(doc: Callable[[str, str], Doc], rule: str, alert: str, expr: str) -> None:
    rules = doc("PrometheusRule", rule)["spec"]["groups"][0]["rules"]
    next(r for r in rules if r["alert"] == alert)["expr"] = expr


def test_an_alert_on_another_job_or_drifted_is_caught(pair: list[Rendering]) -> None:
    prod, v2 = pair
    down = 'avg_over_time(up{job="stream-app-v2"}[10m]) < 0.5'
    other = broken(prod, lambda doc: set_expr(doc, "stream-app", "StreamAppWorkerDown", down))
    assert alert_job_problems(other, every_selector=False) == [
        "prod: StreamAppWorkerDown selects up of job stream-app-v2"
    ]
    ready = "stream_app_ready == 0"
    unpinned = broken(v2, lambda doc: set_expr(doc, "stream-app-v2", "StreamAppNotReady", ready))
    assert alert_job_problems(unpinned, every_selector=True) == [
        "prod-v2: StreamAppNotReady selects stream_app_ready of every job"
    ]
    assert alert_drift(prod, unpinned) == []
    ready = 'stream_app_ready{job="stream-app-v2"} == 1'
    drifted = broken(v2, lambda doc: set_expr(doc, "stream-app-v2", "StreamAppNotReady", ready))
    assert alert_drift(prod, drifted) == [
        f"StreamAppNotReady: {ready!r} is not 'stream_app_ready == 0' for another job"
    ]
