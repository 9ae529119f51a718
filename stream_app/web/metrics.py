"""Prometheus metrics of one worker, read at scrape time.

The hot path only increments plain integers (:class:`stream_app.pipeline.
processor.Metrics`) and fills a bucket array (:class:`~stream_app.pipeline.
processor.LatencyHistogram`);
this collector turns them into Prometheus families when ``/metrics`` is
scraped, so processing never takes a metrics lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from stream_app.domain import Reason
from stream_app.pipeline.processor import COMMAND_SERIES, EVENT_CHANNEL

if TYPE_CHECKING:
    from stream_app.pipeline.engine import Engine


class EngineCollector(Collector):
    """Every metric of the engine, as the issue's operators asked for them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        m = engine.metrics
        commands = CounterMetricFamily(
            "stream_app_commands",
            "Commands processed, by type and outcome (a command re-keyed is counted "
            "rekeyed, then again with its outcome once its re-keyed copy is processed)",
            labels=["type", "outcome"],
        )
        # Every series from the start, at 0 until it moves: an alert on an
        # increase would miss the first one if the series began at 1.
        for kind, outcome in sorted(set(COMMAND_SERIES) | m.commands.keys()):
            commands.add_metric([kind, outcome], m.commands.get((kind, outcome), 0))
        yield commands
        rejections = CounterMetricFamily(
            "stream_app_rejections", "Records rejected, by reason", labels=["reason"]
        )
        for reason in sorted({r.value for r in Reason} | m.rejections.keys()):
            rejections.add_metric([reason], m.rejections.get(reason, 0))
        yield rejections
        yield CounterMetricFamily(
            "stream_app_duplicates", "Commands recognised as duplicates", value=m.duplicates
        )
        yield CounterMetricFamily(
            "stream_app_rekeyed", "Commands re-keyed to their integrationId", value=m.rekeyed
        )
        emitted = CounterMetricFamily(
            "stream_app_emitted", "Downstream records, by output", labels=["output"]
        )
        # Every output from the start, at 0, as the commands above.
        for channel in sorted(set(EVENT_CHANNEL.values()) | m.emitted.keys()):
            emitted.add_metric([channel], m.emitted.get(channel, 0))
        yield emitted
        latency = HistogramMetricFamily(
            "stream_app_processing_seconds", "Time to process one record (decode, apply, encode)"
        )
        latency.add_metric([], engine.latency.cumulative(), sum_value=engine.latency.total)
        yield latency
        commit = HistogramMetricFamily(
            "stream_app_commit_seconds",
            "Time per commit round: every task's transaction committed together, "
            "while processing goes on",
        )
        commit.add_metric(
            [], engine.commit_latency.cumulative(), sum_value=engine.commit_latency.total
        )
        yield commit
        phases = HistogramMetricFamily(
            "stream_app_transaction_phase_seconds",
            "Time per phase of a task transaction's commit: produce (its batches sent "
            "and confirmed), offsets (the consumed offsets sent to it), commit, and "
            "store (RocksDB written after the commit)",
            labels=["phase"],
        )
        for phase, histogram in engine.phase_latency.items():
            phases.add_metric([phase], histogram.cumulative(), sum_value=histogram.total)
        yield phases
        transactions = CounterMetricFamily(
            "stream_app_transactions", "Task transactions, by result", labels=["result"]
        )
        transactions.add_metric(["committed"], engine.commits)
        transactions.add_metric(["aborted"], engine.aborts)
        # Sent but unanswered: the restarted task read from Kafka which it was.
        transactions.add_metric(["unknown"], engine.commits_unknown)
        yield transactions
        purger = engine.purger
        purges = CounterMetricFamily(
            "stream_app_purges",
            "Deletions of processed records from the re-key and by-profile topics, by result",
            labels=["result"],
        )
        purges.add_metric(["succeeded"], purger.succeeded)
        purges.add_metric(["failed"], purger.failed)
        yield purges
        yield GaugeMetricFamily(
            "stream_app_purge_failures_in_a_row",
            "Purges failed since the last that succeeded: while above 0, the re-key and "
            "by-profile topics keep records the worker has processed",
            value=purger.failures,
        )
        rebalances = CounterMetricFamily(
            "stream_app_rebalances",
            "Consumer-group rebalances this worker took part in; each stops and restarts "
            "its tasks: a steady rise is a rebalance storm",
        )
        rebalances.add_metric([], engine.rebalances)
        yield rebalances
        restarts = CounterMetricFamily(
            "stream_app_task_restarts",
            "Tasks restarted after a failure (a failed commit, a store error); a fenced "
            "task is dropped, not restarted: the worker is unready until the group moves it",
        )
        restarts.add_metric([], engine.task_restarts)
        yield restarts
        lag = GaugeMetricFamily(
            "stream_app_consumer_lag",
            "Records not yet processed, per input partition (to the last stable offset)",
            labels=["topic", "partition"],
        )
        for (topic, partition), records in sorted(engine.lag().items()):
            lag.add_metric([topic, str(partition)], records)
        yield lag
        keys = GaugeMetricFamily(
            "stream_app_store_keys",
            "Estimated keys per store partition",
            labels=["store", "partition"],
        )
        size = GaugeMetricFamily(
            "stream_app_store_bytes",
            "SST files and memtables per store partition",
            labels=["store", "partition"],
        )
        for (store, partition), (estimate, used) in sorted(engine.store_sizes().items()):
            keys.add_metric([store, str(partition)], estimate)
            size.add_metric([store, str(partition)], used)
        yield keys
        yield size
        restored = CounterMetricFamily(
            "stream_app_restored_records", "Changelog records restored into the stores"
        )
        restored.add_metric([], engine.restored_records)
        yield restored
        restoring = GaugeMetricFamily(
            "stream_app_restore_remaining",
            "Changelog offsets left to restore, per restoring task (compacted "
            "changelogs have fewer records than offsets)",
            labels=["task"],
        )
        for task, remaining in sorted(engine.restore_remaining.items()):
            restoring.add_metric([task], remaining)
        yield restoring
        yield GaugeMetricFamily(
            "stream_app_kafka_unheard_seconds",
            "Seconds since Kafka last answered a fetch of the worker's partitions, once "
            "that is longer than the session timeout (it then answers 503 for the sessions "
            "it owns); else 0",
            value=engine.unheard_s() or 0.0,
        )
        yield GaugeMetricFamily(
            "stream_app_ready",
            "1 when joined, not rebalancing, no task restoring, waiting or fenced, "
            "and not stopping (/readyz)",
            value=1.0 if engine.ready else 0.0,
        )
