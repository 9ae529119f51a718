"""Memory and restore at scale, on the real broker: N sessions stored, served,
then restored onto an empty disk by a fresh worker.

    python bench/memory_bench.py [--sessions 1000000]

Uses KAFKA_BOOTSTRAP_SERVERS when set, otherwise starts the project's broker.
Issue 8's targets: 1M sessions stored and then served with peak RSS <= 300 MB,
and a restore of at least 100k changelog records/s.

1. N sessions, one opening update each (a cart of 1-10 lines from the bench
   catalog, checkout attributes, a device identifier; about 0.5 KB), are
   produced to a 6-partition command topic.
2. One exactly_once worker (``python -m stream_app worker``, default
   settings) applies them; done when its group's committed offsets reach the
   end of the topic. Its peak RSS (VmHWM of the process tree) is sampled
   every 0.2 s.
3. Served: 2,000 random sessions are read through the worker's query API
   (GET /v2/customer_sessions/ID), each checked.
4. The worker is stopped, its state directory deleted, and a new worker of
   the same group started: the time until /readyz answers 200 (all its tasks
   restored from the changelogs) and the restore rates it logs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402
from aiokafka.errors import GroupCoordinatorNotAvailableError  # noqa: E402
from aiokafka.structs import TopicPartition  # noqa: E402
from pipeline_bench import (  # noqa: E402
    _spawn,
    _stop,
    machine,
    peak_rss_mb,
    versions,
    with_broker,
)
from workload import CATALOG  # noqa: E402

from stream_app.settings import Settings  # noqa: E402
from tests.integration.harness import Deployment, create_topics  # noqa: E402
from tools.kafka_broker import free_port  # noqa: E402

PARTITIONS = 6
SERVED = 2000


def opening(i: int, rng: random.Random) -> tuple[bytes, bytes]:
    iid = f"m-{i:07d}"
    lines = rng.sample(range(len(CATALOG)), rng.randint(1, 10))
    doc = {
        "type": "update",
        "integrationId": iid,
        "eventId": f"{iid}-e01",
        "applicationId": 1,
        "session": {
            "cartItems": [
                {"sku": CATALOG[n][0], "name": CATALOG[n][1], "quantity": rng.randint(1, 3),
                 "price": CATALOG[n][3]}
                for n in lines
            ],
            "attributes": {"channel": rng.choice(("web", "ios")), "locale": "de-DE"},
            "identifiers": [f"device-{rng.getrandbits(32):08x}"],
        },
    }
    return iid.encode(), orjson.dumps(doc)


async def produce(bootstrap: str, topic: str, sessions: int) -> int:
    rng = random.Random(8)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all",
                                max_batch_size=256 * 1024)
    await producer.start()
    size = 0
    try:
        pending = []
        for i in range(sessions):
            key, value = opening(i, rng)
            size += len(value)
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return size


async def lag(bootstrap: str, group: str, topic: str) -> int | None:
    """Records of ``topic`` not yet committed by ``group``; None while the group
    coordinator is not there yet (a fresh broker creates it on first use)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = await consumer.end_offsets(tps)
        try:
            committed = await admin.list_consumer_group_offsets(group)
        except GroupCoordinatorNotAvailableError:
            return None
        return sum(ends[tp] - (committed[tp].offset if tp in committed else 0) for tp in tps)
    finally:
        await consumer.stop()
        await admin.close()


async def sample_peak(
    proc: subprocess.Popen[bytes], peak: list[float], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], peak_rss_mb(proc.pid))
        await asyncio.sleep(0.2)


async def wait_ready(url: str, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with {proc.returncode}")
            try:
                async with http.get(f"{url}/readyz") as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError("the worker never became ready")


async def run(bootstrap: str, kafka: str, workdir: Path, sessions: int) -> None:
    print(machine())
    print(versions(kafka))
    s = Settings()
    print(f"stream-app worker: RocksDB block cache {s.rocksdb.block_cache_mb} MB, write buffers "
          f"{s.rocksdb.write_buffer_mb} MB x {s.rocksdb.max_write_buffers}; batch size "
          f"{s.batch_size}, checkpoint interval {s.checkpoint_interval_s}s")
    name = f"mem{int(time.time())}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    d = Deployment(bootstrap, name, workdir / "state", PARTITIONS, "exactly_once",
                   extra_env={"STREAM_APP_HTTP_PORT": str(port)})
    await create_topics(bootstrap, [d.topics.commands], PARTITIONS)
    began = time.monotonic()
    size = await produce(bootstrap, d.topics.commands, sessions)
    print(f"produced {sessions:,} opening commands ({size / sessions:.0f} bytes on average) "
          f"in {time.monotonic() - began:.1f}s", flush=True)

    # 2. stored
    log = workdir / "worker.log"
    started = time.monotonic()
    proc = _spawn([sys.executable, "-m", "stream_app", "worker"], d.env(), ROOT, log)
    peak, stop = [0.0], asyncio.Event()
    sampler = asyncio.create_task(sample_peak(proc, peak, stop))
    group = d.env()["STREAM_APP_APP_ID"]
    try:
        while await lag(bootstrap, group, d.topics.commands) != 0:
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited: {log.read_text()[-2000:]}")
            await asyncio.sleep(1.0)
        applied_s = time.monotonic() - started
        stored_peak = peak[0]
        print(f"stored: {sessions:,} sessions applied {applied_s:.1f}s after the worker "
              f"started ({sessions / applied_s:,.0f}/s, start-up included); peak RSS "
              f"{stored_peak:.0f} MB", flush=True)

        # 3. served
        rng = random.Random(9)
        latencies = []
        async with aiohttp.ClientSession() as http:
            for i in rng.sample(range(sessions), min(SERVED, sessions)):
                iid = f"m-{i:07d}"
                t0 = time.perf_counter()
                async with http.get(f"{url}/v2/customer_sessions/{iid}?applicationId=1") as a:
                    doc = await a.json()
                    assert a.status == 200, (a.status, doc)
                    assert doc["integrationId"] == iid, doc
                latencies.append(time.perf_counter() - t0)
        latencies.sort()
        served_peak = max(peak[0], peak_rss_mb(proc.pid))
        print(f"served: {len(latencies):,} random sessions through the query API, each found; "
              f"p50 {statistics.median(latencies) * 1e3:.1f} ms, "
              f"p99 {latencies[len(latencies) * 99 // 100] * 1e3:.1f} ms; peak RSS "
              f"{served_peak:.0f} MB", flush=True)
    finally:
        stop.set()
        await sampler
        _stop(proc)
    on_disk = sum(f.stat().st_size for f in (workdir / "state").rglob("*") if f.is_file())
    print(f"state on disk: {on_disk / 2**20:.0f} MB", flush=True)

    # 4. restored onto an empty disk
    shutil.rmtree(workdir / "state")
    log2 = workdir / "restore.log"
    started = time.monotonic()
    proc = _spawn([sys.executable, "-m", "stream_app", "worker"], d.env(), ROOT, log2)
    peak, stop = [0.0], asyncio.Event()
    sampler = asyncio.create_task(sample_peak(proc, peak, stop))
    try:
        await wait_ready(url, proc, seconds=600)
        ready_s = time.monotonic() - started
    finally:
        stop.set()
        await sampler
        _stop(proc)
    text = log2.read_text(errors="replace")
    restored = [(int(n), float(secs)) for n, secs in
                re.findall(r"restored (\d+) records in ([\d.]+) s", text)]
    total = sum(n for n, _ in restored)
    longest = max((secs for _, secs in restored), default=0.0)
    print(f"restore: {total:,} changelog records in {len(restored)} task(s); ready "
          f"{ready_s:.1f}s after start; the longest task restore {longest:.1f}s; "
          f"{total / longest if longest else 0:,.0f} records/s over the longest, "
          f"{total / ready_s:,.0f}/s over the whole start; peak RSS {peak[0]:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    with_broker("stream-app-memory-",
                lambda bootstrap, kafka, workdir: run(bootstrap, kafka, workdir, args.sessions))


if __name__ == "__main__":
    main()
