"""What /metrics exposes of an engine (no broker: the engine's own counts)."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from stream_app.pipeline.engine import Engine
from stream_app.pipeline.tasks import TaskId
from stream_app.pipeline.topics import TopicLayout
from stream_app.settings import Settings
from stream_app.web.metrics import EngineCollector


def exposition(engine: Engine) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(EngineCollector(engine))
    samples = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


async def test_rebalances_and_task_restarts_are_counted(tmp_path: Path) -> None:
    """An SRE told rebalance storms from readiness flapping alone: the engine
    counted rebalances, and exposed none."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    before = exposition(engine)
    assert before["stream_app_rebalances_total"] == 0
    assert before["stream_app_task_restarts_total"] == 0
    await engine.on_partitions_revoked(set())  # a rebalance that took nothing of ours
    await engine.on_partitions_revoked(set())
    engine._restart_delay(TaskId("commands", 0))
    after = exposition(engine)
    assert after["stream_app_rebalances_total"] == 2
    assert after["stream_app_task_restarts_total"] == 1
