"""Check the alerting rules of ``deploy/components/alerts`` with Prometheus' own
promtool: ``promtool check rules`` on them, then ``promtool test rules`` on
``deploy/components/alerts/tests.yaml``, which feeds series to the rules and
says when each alert fires and with what text.

Prometheus publishes no ``go install``-able promtool (its go.mod has replace
directives), so the first run downloads Prometheus' module from the Go module
proxy and builds ``cmd/promtool`` in it (Go needed; about 5 minutes and 150 MB
on the 2-core machine) into ``~/.cache/stream-app/promtool-<version>``. That
build time keeps this out of ``make test``, where ``tests/deploy/test_alerts.py``
checks the rules offline (PromQL syntax, the worker's series, runbooks).

    python tools/check_alerts.py        # or: make check-alerts
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "components" / "alerts"
#: Prometheus 3.5 (LTS), as its Go module numbers it.
PROMETHEUS_MODULE = "github.com/prometheus/prometheus@v0.305.0"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stream-app"


def promtool() -> Path:
    """The cached promtool, built first if need be."""
    built = CACHE / f"promtool-{PROMETHEUS_MODULE.rpartition('@')[2]}"
    if built.is_file():
        return built
    go = shutil.which("go")
    if go is None:
        sys.exit("check_alerts: Go is needed to build promtool once (https://go.dev/dl/)")
    print(f"building promtool from {PROMETHEUS_MODULE} (once; a few minutes)", flush=True)
    download = subprocess.run(
        [go, "mod", "download", "-json", PROMETHEUS_MODULE],
        capture_output=True,
        text=True,
        check=True,
    )
    source = json.loads(download.stdout)["Dir"]
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = built.with_suffix(".partial")
    subprocess.run([go, "build", "-o", str(partial), "./cmd/promtool"], cwd=source, check=True)
    partial.rename(built)
    return built


def main() -> int:
    tool = str(promtool())
    spec = yaml.safe_load((ALERTS / "prometheusrule.yaml").read_text())["spec"]
    with tempfile.TemporaryDirectory() as tmp:
        # promtool reads a plain rule file: the PrometheusRule's spec.
        (Path(tmp) / "rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        shutil.copy(ALERTS / "tests.yaml", Path(tmp) / "tests.yaml")
        for args in (["check", "rules", "rules.yaml"], ["test", "rules", "tests.yaml"]):
            if subprocess.run([tool, *args], cwd=tmp, check=False).returncode != 0:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
