"""The alerting rules (``deploy/components/alerts``): valid PromQL over series
the worker exports, on the Service the ServiceMonitor scrapes, each with a
severity, a summary and a runbook section that exists.

The label names the rules match on are checked against a real worker's
``/metrics`` in ``tests/integration/test_http.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from prometheus_client import Metric

from stream_app.pipeline.engine import Engine
from stream_app.pipeline.topics import TopicLayout
from stream_app.settings import Settings
from stream_app.web.metrics import EngineCollector
from tests.deploy.manifests import (
    PROMETHEUS_SERIES,
    ROOT,
    Doc,
    Rendering,
    alerts,
    heading_anchors,
    selectors,
)

#: Where the runbooks are.
RUNBOOKS = "docs/operations.md"

_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}


def _families() -> list[Metric]:
    """What a worker that has processed nothing yet exports."""
    return list(EngineCollector(Engine(Settings(), TopicLayout(6, 1_048_588))).collect())


def exported_series() -> set[str]:
    """The sample names the worker's ``/metrics`` can have, from its collector."""
    names = set()
    for family in _families():
        names.update(family.name + suffix for suffix in _SAMPLE_SUFFIXES[family.type])
    return names


def problems(rules: Iterable[Doc], exported: set[str], anchors: set[str]) -> list[str]:
    """Every way ``rules`` break what this module checks."""
    found = []
    names = [rule.get("alert") for rule in rules]
    if len(set(names)) != len(names) or None in names:
        found.append(f"alert names missing or repeated: {names}")
    for rule in rules:
        name = rule.get("alert")
        try:
            selected = selectors(str(rule["expr"]))
        except ValueError as exc:
            found.append(f"{name}: not PromQL: {exc}")
            continue
        for metric, _ in selected:
            if metric not in exported | PROMETHEUS_SERIES:
                found.append(f"{name}: the worker exports no {metric}")
        if rule.get("labels", {}).get("severity") not in {"warning", "critical"}:
            found.append(f"{name}: severity is not warning or critical")
        annotations = rule.get("annotations", {})
        if not annotations.get("summary") or not annotations.get("description"):
            found.append(f"{name}: no summary or description")
        document, _, anchor = str(annotations.get("runbook", "")).partition("#")
        if document != RUNBOOKS or anchor not in anchors:
            found.append(f"{name}: runbook {annotations.get('runbook')!r} is no section")
    return found


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_series()


@pytest.fixture(scope="module")
def anchors() -> set[str]:
    return heading_anchors((ROOT / RUNBOOKS).read_text())


def test_the_collector_gives_the_series_the_rules_rely_on(exported: set[str]) -> None:
    # The derivation of sample names itself: a counter's _total, a histogram's
    # _bucket, a gauge as it is.
    assert {
        "stream_app_commands_total",
        "stream_app_commit_seconds_bucket",
        "stream_app_consumer_lag",
    } <= exported
    assert "stream_app_commands" not in exported


def test_every_alert_is_promql_over_series_the_worker_exports_with_a_runbook(
    exported: set[str], anchors: set[str]
) -> None:
    rules = alerts()
    assert len(rules) >= 5
    assert problems(rules, exported, anchors) == []


def test_every_series_an_alert_picks_by_label_is_there_from_the_start() -> None:
    """At 0 before it first moves: an ``increase`` over a series that appears
    at 1 is 0, so the first INTERNAL_ERROR, say, would not fire its alert. This
    also checks the label values the rules match on (``result="committed"``)."""
    samples = [(s.name, s.labels) for family in _families() for s in family.samples]
    picked = [
        (rule["alert"], metric, matchers)
        for rule in alerts()
        for metric, matchers in selectors(str(rule["expr"]))
        if matchers and metric not in PROMETHEUS_SERIES
    ]
    assert len(picked) >= 3
    for alert, metric, matchers in picked:
        found = [
            labels
            for name, labels in samples
            if name == metric and labels.items() >= matchers.items()
        ]
        assert found, f"{alert}: no {metric}{matchers} before anything is processed"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"expr": "sum(rate(stream_app_commands_total[5m]) > 0"}, "not PromQL"),
        ({"expr": "stream_app_comands_total > 0"}, "exports no stream_app_comands_total"),
        ({"expr": "stream_app_commands > 0"}, "exports no stream_app_commands"),
        ({"labels": {"severity": "page"}}, "severity"),
        ({"annotations": {"summary": "s", "description": "d"}}, "is no section"),
        (
            {"annotations": {"summary": "s", "description": "d", "runbook": f"{RUNBOOKS}#nope"}},
            "is no section",
        ),
        ({"annotations": {"runbook": f"{RUNBOOKS}#lag-grows"}}, "no summary"),
        ({"alert": "StreamAppStalled"}, "repeated"),
    ],
)
def test_a_broken_alert_is_caught(
    exported: set[str], anchors: set[str], change: dict[str, Any], problem: str
) -> None:
    rules = alerts()
    rules[0] = {**rules[0], **change}
    found = problems(rules, exported, anchors)
    assert any(problem in p for p in found), found


def test_worker_down_watches_the_service_the_service_monitor_scrapes(
    renderings: dict[str, Rendering],
) -> None:
    prod = renderings["prod"]
    rule = prod.one("PrometheusRule")
    (down,) = [r for r in rule["spec"]["groups"][0]["rules"] if r["alert"] == "StreamAppWorkerDown"]
    ((metric, matchers),) = selectors(down["expr"])
    assert metric == "up"
    # The Prometheus Operator names a ServiceMonitor's job after the Service.
    monitor = prod.one("ServiceMonitor")
    assert "jobLabel" not in monitor["spec"]
    services = [
        s
        for s in prod.of_kind("Service")
        if s["metadata"]["labels"].items() >= monitor["spec"]["selector"]["matchLabels"].items()
    ]
    assert [s["metadata"]["name"] for s in services] == [matchers["job"]]


def test_every_output_and_command_series_is_there_at_0_from_the_start() -> None:
    """An alert on increase() misses the first output of a series that only
    begins with it: the emitted counter had no series before each first output."""
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in _families()
        for sample in family.samples
    }
    for output in ("closed", "returned", "cancelled", "reopened"):
        assert samples[("stream_app_emitted_total", (("output", output),))] == 0
    assert samples[("stream_app_commands_total", (("outcome", "applied"), ("type", "update")))] == 0
