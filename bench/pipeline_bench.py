"""End-to-end throughput of one worker on the real broker, as ratios to a
baseline measured in the same run.

    python bench/pipeline_bench.py [--sessions 20000] [--baseline-checkout DIR]

Uses KAFKA_BOOTSTRAP_SERVERS when set, otherwise starts the project's broker.
Workload: per session, one update opening a 10-line cart and one closing
update (half the commands emit a downstream record). Each contender reads the
same pre-produced command topic:

* baseline: a plain aiokafka loop (consume, orjson.loads, forward closes)
  with no state, no validation and no transactions;
* stream-app worker, at_least_once and exactly_once;
* with ``--baseline-checkout DIR``, also the exactly_once worker of another
  checkout of this repository (run from DIR with DIR/.venv/bin/python), to
  compare two versions in one run.

Rate = commands per second between the first and the last downstream record,
so worker start-up and recovery are excluded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402

from tests.integration.harness import (  # noqa: E402
    Deployment,
    Worker,
    command,
    create_topics,
    produce,
)
from tools.kafka_broker import KafkaCluster  # noqa: E402

PARTITIONS = 6


def workload(sessions: int) -> list[tuple[bytes, bytes]]:
    items = [{"sku": f"sku-{j}", "quantity": 1 + j % 3, "price": 9.99} for j in range(10)]
    out = []
    for n in range(sessions):
        iid = f"b-{n:07d}"
        out.append((iid.encode(), command("update", iid, eventId=f"{iid}-1",
                                          session={"cartItems": items, "couponCodes": ["X"]})))
    for n in range(sessions):
        iid = f"b-{n:07d}"
        out.append((iid.encode(), command("update", iid, eventId=f"{iid}-2",
                                          session={"state": "closed"})))
    return out


async def _time_outputs(bootstrap: str, topic: str, expect: int) -> tuple[float, float]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None,
                                auto_offset_reset="earliest", isolation_level="read_committed")
    await consumer.start()
    first = last = 0.0
    seen = 0
    try:
        while seen < expect:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                if records and not first:
                    first = time.monotonic()
                seen += len(records)
            if seen:
                last = time.monotonic()
    finally:
        await consumer.stop()
    return first, last


async def baseline(bootstrap: str, source: str, sink: str, total: int) -> None:
    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id="bench-baseline",
                                auto_offset_reset="earliest", max_poll_records=1000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await consumer.start()
    await producer.start()
    done = 0
    try:
        while done < total:
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            for records in batches.values():
                for r in records:
                    doc = orjson.loads(r.value)
                    if doc.get("session", {}).get("state") == "closed":
                        await producer.send(sink, r.value, key=r.key)
                done += len(records)
        await producer.flush()
    finally:
        await consumer.stop()
        await producer.stop()


async def run(
    bootstrap: str, sessions: int, workdir: Path, other: Path | None, overrides: dict[str, str]
) -> None:
    traffic = workload(sessions)
    total = len(traffic)
    source = Deployment(bootstrap, f"bench{int(time.time())}", workdir / "s0", PARTITIONS)
    await create_topics(bootstrap, [source.topics.commands, source.topics.closed + ".baseline"],
                        PARTITIONS)
    await produce(bootstrap, source.topics.commands, traffic)
    print(f"{total} commands ({sessions} sessions), {PARTITIONS} partitions")

    rates: dict[str, float] = {}
    sink = source.topics.closed + ".baseline"
    timing = asyncio.create_task(_time_outputs(bootstrap, sink, sessions))
    await baseline(bootstrap, source.topics.commands, sink, total)
    first, last = await timing
    rates["baseline aiokafka loop"] = total / max(last - first, 1e-9)

    here = " (this checkout)" if other else ""
    contenders: list[tuple[str, str, Path | None]] = [
        ("at_least_once", f"stream-app at_least_once{here}", None),
        ("exactly_once", f"stream-app exactly_once{here}", None),
    ]
    if other:
        contenders.append(("exactly_once", f"stream-app exactly_once ({other})", other))
    for guarantee, label, checkout in contenders:
        tag = f"{guarantee}-checkout" if checkout else guarantee
        d = Deployment(bootstrap, f"{source.name}-{tag}", workdir / tag,
                       PARTITIONS, guarantee,
                       extra_env={"STREAM_APP_TOPICS__COMMANDS": source.topics.commands,
                                  "STREAM_APP_BATCH_SIZE": "1000",
                                  **({} if checkout else overrides)})
        log = workdir / f"{tag}.log"
        worker = Worker(d.env(), log, cwd=checkout,
                        python=checkout / ".venv" / "bin" / "python" if checkout else None)
        try:
            first, last = await _time_outputs(bootstrap, d.topics.closed, sessions)
        finally:
            worker.stop()
        rates[label] = total / max(last - first, 1e-9)

    base = rates["baseline aiokafka loop"]
    width = max(28, *map(len, rates))
    print(f"{'contender':{width}} {'commands/s':>12} {'ratio':>8}")
    for name, rate in rates.items():
        print(f"{name:{width}} {rate:12.0f} {rate / base:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--baseline-checkout", type=Path, metavar="DIR",
                        help="also measure the exactly_once worker of this checkout "
                             "(run with DIR/.venv/bin/python from DIR)")
    parser.add_argument("--set", action="append", default=[], metavar="STREAM_APP_X=VALUE",
                        help="a setting for this checkout's workers (repeatable)")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    other = args.baseline_checkout.resolve() if args.baseline_checkout else None
    if other and not (other / ".venv" / "bin" / "python").exists():
        parser.error(f"{other}/.venv/bin/python not found")
    with tempfile.TemporaryDirectory(prefix="stream-app-bench-") as tmp:
        workdir = Path(tmp)
        external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if external:
            asyncio.run(run(external, args.sessions, workdir, other, overrides))
            return
        with KafkaCluster(workdir / "kafka") as cluster:
            asyncio.run(run(cluster.bootstrap_servers, args.sessions, workdir, other, overrides))


if __name__ == "__main__":
    main()
