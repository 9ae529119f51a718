"""Every overlay renders, validates offline against the Kubernetes schemas
(``kubernetes-validate --strict``) and its custom resources against the
hand-written CRD schemas; a broken manifest fails both."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import EXTRA_COMPONENTS, OVERLAYS
from tests.deploy.manifests import (
    CUSTOM_KINDS,
    DEPLOY,
    KUBERNETES_VERSIONS,
    Rendering,
    crd_errors,
    kubernetes_validate,
)


def test_every_overlay_and_component_is_rendered() -> None:
    overlays = {p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir()}
    assert overlays == set(OVERLAYS)
    components = {p.name for p in (DEPLOY / "components").iterdir() if p.is_dir()}
    included: set[str] = set()
    for overlay in overlays:
        doc = yaml.safe_load((DEPLOY / "overlays" / overlay / "kustomization.yaml").read_text())
        included |= {Path(c).name for c in doc.get("components", [])}
    included |= {component for _, component in EXTRA_COMPONENTS.values()}
    assert components == included, "a component that no test renders"


def test_old_single_manifest_is_gone() -> None:
    assert not (DEPLOY / "kubernetes").exists()


def test_core_resources_pass_strict_validation(rendering: Rendering, tmp_path: Path) -> None:
    path = tmp_path / f"{rendering.name}.yaml"
    path.write_text(yaml.safe_dump_all(rendering.docs))
    run = kubernetes_validate(path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ERROR" not in run.stdout
    # The only resources without a Kubernetes schema are the custom ones.
    unknown = [
        line
        for line in run.stdout.splitlines()
        if line.startswith("WARN") and not any(f"kind {k} " in line for k in CUSTOM_KINDS)
    ]
    assert unknown == []
    validated = {d["kind"] for d in rendering.docs} - CUSTOM_KINDS
    assert {"StatefulSet", "Service", "PodDisruptionBudget", "ConfigMap"} <= validated


def test_kubernetes_validate_knows_the_versions() -> None:
    from kubernetes_validate.utils import all_versions

    for version in KUBERNETES_VERSIONS:
        assert version in all_versions()


def test_custom_resources_match_their_crd_schemas(rendering: Rendering) -> None:
    custom = [d for d in rendering.docs if d["kind"] in CUSTOM_KINDS]
    assert {d["kind"] for d in custom} >= {"KafkaTopic", "KafkaUser"}
    errors = [e for d in custom for e in crd_errors(d)]
    assert errors == []


def test_prod_has_the_optional_components(renderings: dict[str, Rendering]) -> None:
    kinds = {d["kind"] for d in renderings["prod"].docs}
    assert {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"} <= kinds
    optional = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}
    assert not optional & {d["kind"] for d in renderings["dev"].docs}


def test_a_broken_manifest_fails_strict_validation(
    renderings: dict[str, Rendering], tmp_path: Path
) -> None:
    statefulset = copy.deepcopy(renderings["prod"].statefulset)
    worker = statefulset["spec"]["template"]["spec"]["containers"][0]
    worker["livenessProbe"]["httpGet"]["paht"] = worker["livenessProbe"]["httpGet"].pop("path")
    worker["resources"]["limits"]["memory"] = {"MiB": 1536}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(statefulset))
    run = kubernetes_validate(path)
    assert run.returncode != 0
    assert "ERROR" in run.stdout
    assert "statefulset/stream-app" in run.stdout


@pytest.mark.parametrize(
    ("kind", "breakage", "expected"),
    [
        ("KafkaTopic", lambda d: d["spec"].update(partitions="12"), "is not of type 'integer'"),
        ("KafkaTopic", lambda d: d["spec"].update(partitons=12), "Additional properties"),
        ("KafkaTopic", lambda d: d["metadata"]["labels"].clear(), "strimzi.io/cluster"),
        (
            "KafkaUser",
            lambda d: d["spec"]["authorization"]["acls"][0].update(operations=["Reed"]),
            "is not one of",
        ),
        (
            "KafkaUser",
            lambda d: d["spec"]["authorization"]["acls"][0].update(operation="Read"),
            "Additional properties",
        ),
        ("ScaledObject", lambda d: d["spec"].update(maxReplicaCount="12"), "'integer'"),
        (
            "ScaledObject",
            lambda d: d["spec"]["triggers"][0]["metadata"].update(lagThreshold=5000),
            "is not of type 'string'",
        ),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(path="metrics"), "match"),
        (
            "PrometheusRule",
            lambda d: d["spec"]["groups"][0]["rules"][0].update({"for": "5 minutes"}),
            "match",
        ),
        (
            "PrometheusRule",
            lambda d: d["spec"]["groups"][0]["rules"][0].update(runbook_url="x"),
            "Additional properties",
        ),
    ],
)
def test_a_broken_custom_resource_fails_its_schema(
    renderings: dict[str, Rendering], kind: str, breakage: object, expected: str
) -> None:
    doc = copy.deepcopy(renderings["prod"].of_kind(kind)[0])
    assert crd_errors(doc) == []
    assert callable(breakage)
    breakage(doc)
    errors = crd_errors(doc)
    assert errors, f"the broken {kind} passed"
    assert any(expected in e for e in errors), errors


def test_an_unknown_custom_kind_has_no_schema(renderings: dict[str, Rendering]) -> None:
    doc = copy.deepcopy(renderings["prod"].one("ServiceMonitor"))
    doc["kind"] = "PodMonitor"
    assert crd_errors(doc)[0].startswith("no schema")
