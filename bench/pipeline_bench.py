"""End-to-end throughput of exactly-once session processing on the real broker:
the stream-app worker against Quix Streams and two raw aiokafka loops, in one run.

    python bench/pipeline_bench.py [--sessions 100000] [--latency] [--contenders ...]

``make bench`` runs it (after ``bench/domain_bench.py``). It uses
KAFKA_BOOTSTRAP_SERVERS when set, otherwise starts the project's broker.
See docs/performance.md for what the numbers mean.

One workload (``bench/workload.py``: checkout sessions, 0.3-1.5 KB commands,
closes, returns, cancels and duplicates interleaved through the whole topic)
is produced once to a command topic of 6 partitions. Then each contender runs
in its own process, one after another, each in its own consumer group and
with its own output topics, all reading that same topic from the beginning:

1. ``raw aiokafka loop``: consume, decode, forward closes/cancels/returns;
2. ``raw aiokafka txn loop``: the same in transactions of 500 records
   (or 100 ms);
3. ``quix-streams eos``: ``bench/quix_contender.py``, from ``.venv-bench``;
4. ``stream-app engine, Quix's work``: ``bench/engine_contender.py``, the
   worker exactly_once with the Quix contender's work (``bench/quix_work.py``)
   as its processor: the two engines on equal work;
5. ``stream-app eos``: ``python -m stream_app worker``, exactly_once;
6. ``stream-app alo``: the same, at_least_once;
7. two exactly_once workers in one group (the scale-out).

For each the bench reads the contender's output topics from outside:

* rate = commands / (last output read with read_committed - the first record
  consumed, as the contender logs it; or else its first output seen by a
  read_uncommitted reader). Start-up, topic creation and restore are excluded;
* CPU us per command = utime + stime of the contender's process tree
  (``/proc/<pid>/stat``) over that same window, divided by the commands;
* peak RSS = the largest ``VmHWM`` (``/proc/<pid>/status``) of its tree,
  sampled every 0.2 s.

The last line is ``ratio stream-app-eos/quix-eos: R`` (the rates' ratio); when
both ran, ``ratio engine-quix/quix-eos: R`` before it compares the engines on
equal work.
``--latency`` adds the p99 from produce to read_committed output of the
exactly_once worker at half of its measured rate, with a paced producer;
``--latency-control`` measures the raw transactional loop the same way, at
the same rate: what the method itself adds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import aiokafka  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer  # noqa: E402
from outputs_check import EXPECTED_KINDS, expected_amounts, wrong_outputs  # noqa: E402
from quix_work import step  # noqa: E402
from workload import Rec, Workload, generate  # noqa: E402

from stream_app.pipeline.checkpoint import PHASES  # noqa: E402
from stream_app.pipeline.kafka import wait_for_partitions  # noqa: E402
from stream_app.settings import Settings  # noqa: E402
from tests.integration.harness import (  # noqa: E402
    Deployment,
    create_topics,
    logged_http_url,
    metric_samples,
)
from tools.kafka_broker import KAFKA_VERSION, KafkaCluster  # noqa: E402

PARTITIONS = 6
CONTENDERS = ("raw", "raw-txn", "quix-eos", "engine-quix", "stream-app-eos", "stream-app-alo",
              "stream-app-eos-x2")
LABELS = {
    "raw": "raw aiokafka loop",
    "raw-txn": "raw aiokafka txn loop",
    "quix-eos": "quix-streams exactly-once",
    "engine-quix": "stream-app engine, Quix's work",
    "stream-app-eos": "stream-app exactly_once",
    "stream-app-alo": "stream-app at_least_once",
    "stream-app-eos-x2": "stream-app exactly_once, 2 workers",
}
BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: A contender that has read nothing new for this long has failed.
STALL_S = 120.0


# ---------------------------------------------------------------- /proc


def _tree(root: int) -> list[int]:
    """``root`` and its live descendants."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(root: int) -> float:
    """utime + stime of ``root``'s process tree, plus its reaped children's."""
    total = 0
    for pid in _tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the ")": state is field 3, utime 14, stime 15, cutime 16, cstime 17
        total += sum(int(f) for f in fields[11:15])
    return total / CLK_TCK


def peak_rss_mb(root: int) -> float:
    """The largest VmHWM in ``root``'s process tree, in MiB."""
    peak = 0
    for pid in _tree(root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            peak = max(peak, int(match.group(1)))
    return peak / 1024


# ---------------------------------------------------------------- machine


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text()
    mem = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    return (f"machine: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), "
            f"{model.group(1).strip() if model else platform.processor()}, "
            f"{int(mem.group(1)) / 1024 / 1024:.1f} GiB memory" if mem else "")


def versions(kafka: str) -> str:
    quix = "not installed"
    if BENCH_PYTHON.exists():
        probe = subprocess.run(
            [str(BENCH_PYTHON), "-W", "ignore", "-c",
             "import platform, quixstreams, confluent_kafka;"
             "print(quixstreams.__version__, confluent_kafka.libversion()[0],"
             " platform.python_version())"],
            capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            q, rd, py = probe.stdout.split()
            quix = f"{q} (librdkafka {rd}, python {py})"
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return (f"versions: stream-app {commit or 'unknown'}, python {platform.python_version()}, "
            f"aiokafka {aiokafka.__version__}, orjson {version('orjson')}, "
            f"msgspec {version('msgspec')}, rocksdict {version('rocksdict')}, "
            f"quixstreams {quix}, kafka {kafka}")


def load() -> str:
    busy = subprocess.run(["pgrep", "-fc", "pytest"], capture_output=True, text=True,
                          check=False).stdout.strip()
    note = f", {busy} pytest processes running" if busy and busy != "0" else ""
    return f"load average {Path('/proc/loadavg').read_text().split()[0]}{note}"


# ---------------------------------------------------------------- measuring


@dataclass
class Result:
    label: str
    commands: int
    expected: int
    outputs: int = 0
    start: float = 0.0  # process start (unix time)
    first: float = 0.0  # first output seen, read_uncommitted
    last: float = 0.0  # last expected output read, read_committed
    cpu: float = 0.0  # CPU seconds of the tree at last
    rss_mb: float = 0.0
    logged_first: float | None = None  # FIRST_CONSUMED from the contender's log
    error: str = ""
    notes: list[str] = field(default_factory=list)
    #: The (key, kind) of every output the contender must write, checked once its
    #: window has ended; None for the raw loops, which forward duplicates too.
    kinds: Counter[tuple[bytes, str]] | None = None
    #: The amount of each (key, kind)'s closes and returns, in order (with kinds).
    amounts: dict[tuple[bytes, str], list[Decimal]] | None = None
    #: How long to look for outputs past the expected count: longer than the
    #: contender's commit interval, or a surplus committed later goes unseen.
    settle_s: float = 1.0

    #: (unix time, CPU seconds of the tree), sampled until the first output.
    cpu_samples: list[tuple[float, float]] = field(default_factory=list)

    @property
    def begin(self) -> float:
        """Where the window starts: the first consumed record, as the contender
        logged it, or else the first output seen."""
        if self.logged_first is not None and 0 < self.logged_first <= self.first:
            return self.logged_first
        return self.first

    @property
    def rate(self) -> float:
        return self.commands / (self.last - self.begin) if self.ok else 0.0

    @property
    def cpu_us(self) -> float:
        if not self.ok:
            return 0.0
        # The tree's CPU at the last sample taken before the window began (or
        # the first sample, should the window begin before any was taken).
        before = [cpu for at, cpu in self.cpu_samples if at <= self.begin]
        start = before[-1] if before else self.cpu_samples[0][1] if self.cpu_samples else 0.0
        return (self.cpu - start) / self.commands * 1e6

    @property
    def ok(self) -> bool:
        return not self.error and self.last > self.first > 0


async def _assigned(consumer: AIOKafkaConsumer, bootstrap: str, topics: list[str]) -> None:
    """Assign every partition of ``topics`` and read them from the beginning."""
    tps = await wait_for_partitions({"bootstrap_servers": bootstrap}, topics,
                                    time.monotonic() + 60)
    if tps is None:
        raise TimeoutError(f"topics {topics} were never created")
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)


async def observe(bootstrap: str, topics: list[str], procs: list[subprocess.Popen[bytes]],
                  result: Result) -> None:
    """Watch a running contender (one process or more) until its ``expected``
    outputs were read committed. CPU is summed over every process tree, and so
    is peak RSS (each tree's own peak)."""
    first_reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                                    enable_auto_commit=False,
                                    isolation_level="read_uncommitted", fetch_max_wait_ms=50)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                              enable_auto_commit=False, isolation_level="read_committed",
                              fetch_max_wait_ms=50)
    await first_reader.start()
    await reader.start()
    await _assigned(first_reader, bootstrap, topics)
    await _assigned(reader, bootstrap, topics)
    stop = asyncio.Event()

    def sample_cpu() -> None:
        result.cpu_samples.append((time.time(), sum(cpu_seconds(proc.pid) for proc in procs)))

    async def watch_first() -> None:
        while not stop.is_set():
            batches = await first_reader.getmany(timeout_ms=100)
            if any(batches.values()):
                result.first = time.time()
                sample_cpu()
                return

    async def sample_until_first() -> None:
        # Every 20 ms until the first output: the window may begin before it.
        while not result.first and not stop.is_set():
            sample_cpu()
            await asyncio.sleep(0.02)

    peaks = [0.0] * len(procs)

    def sample_rss() -> None:
        for i, proc in enumerate(procs):
            peaks[i] = max(peaks[i], peak_rss_mb(proc.pid))
        result.rss_mb = sum(peaks)

    async def sample() -> None:
        while not stop.is_set():
            sample_rss()
            await asyncio.sleep(0.2)

    tasks = [asyncio.create_task(watch_first()), asyncio.create_task(sample()),
             asyncio.create_task(sample_until_first())]
    #: Every output read, kept (not parsed) until the window has ended: parsing
    #: them meanwhile would take CPU from the contender.
    read: list[tuple[str, bytes | None, bytes | None]] = []
    try:
        progress = time.monotonic()
        while result.outputs < result.expected:
            batches = await reader.getmany(timeout_ms=200)
            for tp, records in batches.items():
                read.extend((tp.topic, r.key, r.value) for r in records)
            got = sum(len(records) for records in batches.values())
            now = time.monotonic()
            if got:
                result.outputs += got
                progress = now
                if result.outputs >= result.expected:
                    result.last = time.time()
                    result.cpu = sum(cpu_seconds(proc.pid) for proc in procs)
                    sample_rss()
            elif any(proc.poll() is not None for proc in procs):
                codes = [proc.returncode for proc in procs]
                result.error = f"exited with {codes}"
                return
            elif now - progress > STALL_S:
                result.error = f"stalled at {result.outputs}/{result.expected} outputs"
                return
        await tasks[0]
        # Anything past the expected count is a correctness problem: look for it.
        deadline = time.monotonic() + result.settle_s
        while time.monotonic() < deadline:
            batches = await reader.getmany(timeout_ms=200)
            for tp, records in batches.items():
                read.extend((tp.topic, r.key, r.value) for r in records)
            result.outputs += sum(len(records) for records in batches.values())
        if result.outputs != result.expected:
            # A wrong count is a wrong answer: no rate, no ratio.
            result.error = f"{result.outputs} outputs, {result.expected} expected"
        elif result.kinds is not None:
            result.error = wrong_outputs(read, topics, result.kinds, result.amounts)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await first_reader.stop()
        await reader.stop()


def _spawn(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _tail(log: Path, chars: int = 1500) -> str:
    return log.read_text(errors="replace")[-chars:]


#: How the contenders log the moment they consumed their first record: the
#: bench's own contenders print the first, the worker logs the second.
_FIRST_CONSUMED = re.compile(
    r"^FIRST_CONSUMED (\S+)$|first records consumed \(unix time (\S+)\)", re.MULTILINE
)


def _first_consumed(log: Path) -> float | None:
    """The earliest first-consumed time in ``log`` (of any of its processes)."""
    times = [float(a or b) for a, b in _FIRST_CONSUMED.findall(log.read_text(errors="replace"))]
    return min(times, default=None)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def run_contender(bootstrap: str, result: Result, argv: list[str], env: dict[str, str],
                        outputs: list[str], log: Path, cwd: Path = ROOT,
                        more: list[dict[str, str]] | None = None) -> Result:
    """Run ``argv`` with ``env`` (and, for each of ``more``, one more process
    with that environment, all in the same consumer group) until done."""
    await create_topics(bootstrap, outputs, PARTITIONS)
    result.start = time.time()
    procs = [_spawn(argv, env, cwd, log)]
    procs += [_spawn(argv, other, cwd, log) for other in more or []]
    try:
        await observe(bootstrap, outputs, procs, result)
    finally:
        for proc in procs:
            _stop(proc)
    result.logged_first = _first_consumed(log)
    if result.error:
        result.notes.append(f"log {log}:\n{_tail(log)}")
    return result


# ---------------------------------------------------------------- the run


async def produce_all(bootstrap: str, topic: str, records: list[Rec]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, acks="all",
                                max_batch_size=256 * 1024)
    await producer.start()
    try:
        futures = [await producer.send(topic, r.value, key=r.key) for r in records]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def worker_env(bootstrap: str, name: str, workdir: Path, guarantee: str, commands: str,
               overrides: dict[str, str]) -> Deployment:
    return Deployment(bootstrap, name, workdir / name, PARTITIONS, guarantee,
                      extra_env={"STREAM_APP_TOPICS__COMMANDS": commands,
                                 # INFO for its "first records consumed" line; the
                                 # worker logs nothing per record at INFO but
                                 # rejections and re-keys, and this workload has none.
                                 "STREAM_APP_LOG_LEVEL": "INFO", **overrides})


def expected_topics(d: Deployment) -> list[str]:
    return [getattr(d.topics, kind) for kind in EXPECTED_KINDS]


def expected_kinds(work: Workload) -> Counter[tuple[bytes, str]]:
    """The (key, kind) of every output the workload expects."""
    return Counter((r.key, r.output) for r in work.records if r.output)


async def main_run(bootstrap: str, work: Workload, workdir: Path, args: argparse.Namespace,
                   overrides: dict[str, str]) -> dict[str, Result]:
    run_id = f"bench{int(time.time())}"
    commands = f"{run_id}.commands"
    await create_topics(bootstrap, [commands], PARTITIONS)
    began = time.monotonic()
    await produce_all(bootstrap, commands, work.records)
    total = len(work.records)
    print(f"produced {total} commands to {commands} ({PARTITIONS} partitions) "
          f"in {time.monotonic() - began:.1f}s", flush=True)
    python = sys.executable
    results: dict[str, Result] = {}
    kinds, amounts = expected_kinds(work), expected_amounts(work.records, step)
    # A surplus may be committed a commit interval after the count is reached.
    worker_settle_s = max(
        1.0, 1.5 * float(overrides.get("STREAM_APP_CHECKPOINT_INTERVAL_S", "0.1")) + 0.5)
    for name in args.contenders:
        more: list[dict[str, str]] = []  # environments of further workers in the group
        label = LABELS[name]
        sink = f"{run_id}.{name}.out"
        if name in ("raw", "raw-txn"):
            mode = "plain" if name == "raw" else "transactional"
            result = Result(label, total, work.forwarded)
            argv = [python, str(ROOT / "bench" / "raw_contender.py"), mode, bootstrap,
                    commands, sink, f"{run_id}-{name}", "--records", str(args.txn_records)]
            env, outputs = dict(os.environ), [sink]
        elif name == "quix-eos":
            if not BENCH_PYTHON.exists():
                print(f"skipping {label}: {BENCH_PYTHON} missing (make bench creates it)")
                continue
            # A surplus may be committed a commit interval after the count is reached.
            result = Result(label, total, work.expected_outputs, kinds=kinds, amounts=amounts,
                            settle_s=max(1.0, 1.5 * args.quix_commit_interval + 0.5))
            argv = [str(BENCH_PYTHON), "-W", "ignore", str(ROOT / "bench" / "quix_contender.py"),
                    bootstrap, commands, sink, f"{run_id}-{name}", str(workdir / name),
                    "--commit-interval", str(args.quix_commit_interval)]
            env, outputs = dict(os.environ), [sink]
        else:
            guarantee = "at_least_once" if name == "stream-app-alo" else "exactly_once"
            d = worker_env(bootstrap, f"{run_id}-{name}", workdir, guarantee, commands,
                           overrides)
            result = Result(label, total, work.expected_outputs, kinds=kinds, amounts=amounts,
                            settle_s=worker_settle_s)
            argv = [python, "-m", "stream_app", "worker"]
            env, outputs = d.env(), expected_topics(d)
            if name == "engine-quix":
                argv = [python, str(ROOT / "bench" / "engine_contender.py")]
            if args.profile:
                argv[1:1] = ["-m", "cProfile", "-o", str(args.profile.resolve() / f"{name}.prof")]
            if name == "stream-app-eos-x2":
                # A second worker of the same group, with its own state directory.
                more = [d.env(data_dir=workdir / f"{run_id}-{name}-second")]
        print(f"running {label} ...", flush=True)
        results[name] = await run_contender(bootstrap, result, argv, env, outputs,
                                            workdir / f"{name}.log", more=more)
        r = results[name]
        print(f"  {'ok' if r.ok else 'FAILED: ' + r.error}; {r.rate:,.0f} commands/s; "
              f"started after {r.begin - r.start:.1f}s; {load()}", flush=True)
    if args.baseline_checkout:
        other: Path = args.baseline_checkout
        d = worker_env(bootstrap, f"{run_id}-other", workdir, "exactly_once", commands, {})
        label = f"stream-app exactly_once ({other.name})"
        print(f"running {label} ...", flush=True)
        results["other"] = await run_contender(
            bootstrap, Result(label, total, work.expected_outputs, kinds=kinds, amounts=amounts,
                              settle_s=worker_settle_s),
            [str(other / ".venv" / "bin" / "python"), "-m", "stream_app", "worker"],
            d.env(), expected_topics(d), workdir / "other.log", cwd=other)
    return results


# ---------------------------------------------------------------- latency


async def latency_run(bootstrap: str, rate: float, seconds: float, workdir: Path,
                      overrides: dict[str, str], *, control: bool = False) -> str:
    """p50/p99/max from produce to read_committed output of the exactly_once
    worker (or, with ``control``, of the raw transactional loop: the floor of
    this method), with commands produced at ``rate`` per second for ``seconds``."""
    total = int(rate * seconds)
    work = generate(max(200, int(total / 5) + 200), seed=88)
    warmup, paced = work.records[:1000], work.records[1000:1000 + total]
    name = f"bench{int(time.time())}-latency{'-control' if control else ''}"
    d = worker_env(bootstrap, name, workdir, "exactly_once", f"{name}.commands", overrides)
    log = workdir / f"{name}.log"
    if control:
        sink = f"{name}.out"
        kinds = {sink: ""}
        argv = [sys.executable, str(ROOT / "bench" / "raw_contender.py"), "transactional",
                bootstrap, d.topics.commands, sink, name]
        env = dict(os.environ)
    else:
        kinds = dict(zip(expected_topics(d), EXPECTED_KINDS, strict=True))
        argv, env = [sys.executable, "-m", "stream_app", "worker"], d.env()
    await create_topics(bootstrap, [d.topics.commands, *kinds], PARTITIONS)

    def tag(key: bytes | None, value: bytes | None, kind: str | None) -> tuple[object, ...]:
        # The raw loop forwards each close/cancel/return (duplicates too) as it is.
        return (key, value) if control else (key, kind)

    sent: dict[tuple[object, ...], deque[float]] = defaultdict(deque)
    profiled = {r.key for r in work.records if b'"profileId"' in r.value}
    latencies: list[float] = []
    by_profile: dict[bool, list[float]] = {True: [], False: []}
    anatomy = ""
    proc = _spawn(argv, env, ROOT, log)
    reader = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                              enable_auto_commit=False, isolation_level="read_committed",
                              fetch_max_wait_ms=10)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=1, acks="all")
    await reader.start()
    await producer.start()
    try:
        await _assigned(reader, bootstrap, list(kinds))
        # Warm up: the contender has joined and processed something before timing starts.
        await asyncio.gather(*[await producer.send(d.topics.commands, r.value, key=r.key)
                               for r in warmup])
        want = sum(1 for r in warmup if (r.forwarded if control else r.output))
        seen = 0
        deadline = time.monotonic() + 180
        while seen < want:
            if time.monotonic() > deadline or proc.poll() is not None:
                return f"latency: the contender did not start:\n{_tail(log)}"
            batches = await reader.getmany(timeout_ms=200)
            seen += sum(len(v) for v in batches.values())
        expect = sum(1 for r in paced if (r.forwarded if control else r.output))

        async def pace() -> None:
            start = time.monotonic()
            i = 0
            while i < len(paced):
                due = min(len(paced), int((time.monotonic() - start) * rate) + 1)
                while i < due:
                    r = paced[i]
                    if r.forwarded if control else r.output:
                        sent[tag(r.key, r.value, r.output)].append(time.monotonic())
                    await producer.send(d.topics.commands, r.value, key=r.key)
                    i += 1
                await asyncio.sleep(0.005)

        scraped = None if control else _worker_metrics(log)
        began = time.monotonic()
        pacer = asyncio.create_task(pace())
        deadline = time.monotonic() + seconds + 120
        while len(latencies) < expect and time.monotonic() < deadline:
            batches = await reader.getmany(timeout_ms=100)
            now = time.monotonic()
            for tp, records in batches.items():
                for rec in records:
                    queue = sent.get(tag(rec.key, rec.value, kinds[tp.topic]))
                    if queue:
                        latencies.append(now - queue.popleft())
                        by_profile[rec.key in profiled].append(latencies[-1])
        await pacer
        if not control:
            anatomy = _commit_anatomy(scraped, _worker_metrics(log), time.monotonic() - began)
    finally:
        await producer.stop()
        await reader.stop()
        _stop(proc)
    if not latencies:
        return "latency: no output read"
    n = len(latencies)
    if control:
        return (f"latency, raw aiokafka txn loop (the method's floor) at {rate:,.0f} commands/s "
                f"for {seconds:.0f}s (transactions of 500 records or 100 ms): "
                f"{n} outputs, {_percentiles(latencies)}")
    settings = Settings()
    interval = overrides.get("STREAM_APP_CHECKPOINT_INTERVAL_S", settings.checkpoint_interval_s)
    batch = overrides.get("STREAM_APP_BATCH_SIZE", settings.batch_size)
    return (f"latency, stream-app exactly_once at {rate:,.0f} commands/s for {seconds:.0f}s "
            f"(checkpoint interval {interval}s, batch size {batch}): {n} outputs, "
            f"{_percentiles(latencies)}\n"
            f"  sessions with a profile (through stage 2): {_percentiles(by_profile[True])}\n"
            f"  anonymous sessions: {_percentiles(by_profile[False])}\n{anatomy}")


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _worker_metrics(log: Path) -> Samples | None:
    """The worker's /metrics now (its address from its log), or None."""
    url = logged_http_url(log)
    if url is None:
        return None
    try:
        # The worker's own loopback address, http://127.0.0.1:<port>, from its log.
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as answer:  # noqa: S310
            return metric_samples(answer.read().decode())
    except OSError:
        return None


def _commit_anatomy(before: Samples | None, after: Samples | None, seconds: float) -> str:
    """What the worker's commits took between two scrapes of its /metrics:
    stream_app_commit_seconds (rounds) and stream_app_transaction_phase_seconds."""
    if before is None or after is None:
        return "  (the worker's /metrics could not be read)"

    def delta(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    rounds = delta("stream_app_commit_seconds_count")
    if not rounds:
        return "  (no commit round in the window)"
    mean = delta("stream_app_commit_seconds_sum") / rounds * 1000
    over = {
        bound: 1 - delta("stream_app_commit_seconds_bucket", (("le", bound),)) / rounds
        for bound in ("0.05", "0.1")
    }
    phases = []
    for phase in PHASES:
        labels = (("phase", phase),)
        n = delta("stream_app_transaction_phase_seconds_count", labels)
        total = delta("stream_app_transaction_phase_seconds_sum", labels)
        phases.append(f"{phase} {total / n * 1000:.1f} ms" if n else f"{phase} -")
    transactions = delta("stream_app_transaction_phase_seconds_count", (("phase", "produce"),))
    return (f"  the worker's commit rounds: {rounds:,.0f} ({rounds / seconds:.1f}/s), mean "
            f"{mean:.1f} ms; {over['0.05']:.0%} took over 50 ms, {over['0.1']:.0%} over 100 ms\n"
            f"  its {transactions:,.0f} task transactions, mean per phase: " + ", ".join(phases))


def _percentiles(values: list[float]) -> str:
    if not values:
        return "none"
    v = sorted(values)
    n = len(v)
    return (f"p50 {v[n // 2] * 1e3:.1f} ms, p99 {v[n * 99 // 100] * 1e3:.1f} ms, "
            f"max {v[-1] * 1e3:.1f} ms ({n})")


# ---------------------------------------------------------------- report


def report(results: dict[str, Result], work: Workload) -> None:
    width = max(34, *(len(r.label) for r in results.values()))
    print()
    print(f"{'contender':{width}} {'commands/s':>11} {'CPU us/cmd':>11} {'peak RSS MB':>12} "
          f"{'window s':>9} {'startup s':>10} {'outputs':>9}")
    for r in results.values():
        if not r.ok:
            print(f"{r.label:{width}} {'FAILED':>11}  {r.error}")
            continue
        print(f"{r.label:{width}} {r.rate:11,.0f} {r.cpu_us:11.1f} {r.rss_mb:12.0f} "
              f"{r.last - r.begin:9.2f} {r.begin - r.start:10.2f} {r.outputs:9}")
    for r in results.values():
        if r.ok and r.begin == r.first:
            print(f"  {r.label}: no first-consumed time in its log: the window begins at "
                  "its first output")
        elif r.ok:
            print(f"  {r.label}: first record consumed {(r.first - r.begin) * 1e3:.0f} ms "
                  "before its first output was seen")
        for note in r.notes:
            print(f"  {r.label}: {note}")


async def main_async(args: argparse.Namespace, bootstrap: str, kafka: str,
                     workdir: Path) -> None:
    overrides = dict(item.split("=", 1) for item in args.set)
    print(machine())
    print(versions(kafka))
    print(load())
    settings = Settings()
    batch = overrides.get("STREAM_APP_BATCH_SIZE", settings.batch_size)
    interval = overrides.get("STREAM_APP_CHECKPOINT_INTERVAL_S", settings.checkpoint_interval_s)
    print(f"stream-app worker: batch size {batch}, checkpoint interval {interval}s; "
          f"quix commit interval {args.quix_commit_interval}s; "
          f"raw txn loop {args.txn_records} records or 100 ms per transaction")
    began = time.monotonic()
    work = generate(args.sessions)
    print(f"workload: {work.describe()} (generated in {time.monotonic() - began:.1f}s)",
          flush=True)
    results = await main_run(bootstrap, work, workdir, args, overrides)
    report(results, work)
    eos = results.get("stream-app-eos")
    if args.latency:
        rate = args.latency_rate or (eos.rate / 2 if eos and eos.ok else 0)
        if rate:
            print(await latency_run(bootstrap, rate, args.latency_seconds, workdir, overrides),
                  flush=True)
            if args.latency_control:
                print(await latency_run(bootstrap, rate, args.latency_seconds, workdir,
                                        overrides, control=True), flush=True)
        else:
            print("latency: skipped (no exactly_once rate; give --latency-rate)")
    print(load())
    print(f"total bench time {time.monotonic() - began:.0f}s")
    two = results.get("stream-app-eos-x2")
    if eos and two and eos.ok and two.ok:
        print(f"scale-out stream-app-eos-x2/stream-app-eos: {two.rate / eos.rate:.3f}")
    quix = results.get("quix-eos")
    engine = results.get("engine-quix")
    if engine and quix and engine.ok and quix.ok:
        print(f"ratio engine-quix/quix-eos: {engine.rate / quix.rate:.3f}")
    if eos and quix and eos.ok and quix.ok:
        print(f"ratio stream-app-eos/quix-eos: {eos.rate / quix.rate:.3f}")
    else:
        print("ratio stream-app-eos/quix-eos: n/a")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=100_000,
                        help="sessions in the workload (about 5 commands each)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS),
                        metavar="NAME", help=f"which to run, in order: {' '.join(CONTENDERS)}")
    parser.add_argument("--txn-records", type=int, default=500,
                        help="records per transaction of the raw txn loop")
    parser.add_argument("--quix-commit-interval", type=float, default=1.0,
                        help="Quix's commit_interval, seconds (its own default is 5)")
    parser.add_argument("--latency", action="store_true",
                        help="also measure the exactly_once worker's produce-to-output latency "
                             "at half of its measured rate")
    parser.add_argument("--latency-rate", type=float, default=0.0,
                        help="commands/s for --latency instead of half the measured rate")
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--latency-control", action="store_true",
                        help="with --latency, also the raw txn loop at the same rate "
                             "(what the method itself adds)")
    parser.add_argument("--baseline-checkout", type=Path, metavar="DIR",
                        help="also run the exactly_once worker of another checkout "
                             "(DIR/.venv/bin/python, from DIR)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="run the workers under cProfile (slower), writing DIR/<name>.prof")
    parser.add_argument("--set", action="append", default=[], metavar="STREAM_APP_X=VALUE",
                        help="a setting for this checkout's workers (repeatable)")
    args = parser.parse_args()
    if len(set(args.contenders)) < len(args.contenders):
        # A contender's consumer group and output topics are named after it:
        # a second run would find the first one's outputs and offsets.
        parser.error("each contender may run once per bench run")
    # aiokafka logs retriable errors (no leader yet for a partition of a topic
    # just created) that it then retries; a real failure shows as a stall.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if args.baseline_checkout:
        args.baseline_checkout = args.baseline_checkout.resolve()
        if not (args.baseline_checkout / ".venv" / "bin" / "python").exists():
            parser.error(f"{args.baseline_checkout}/.venv/bin/python not found")
    # Two workers started together join one group generation (the broker
    # waits 3 s for more members): with no wait, the first took every task,
    # and the rebalance to two fell inside the scale-out window. Every
    # contender's wait falls before its first consumed record. (The memory
    # bench, which times a start, has none.)
    with_broker("stream-app-bench-",
                lambda bootstrap, kafka, workdir: main_async(args, bootstrap, kafka, workdir),
                initial_rebalance_delay_ms=3000)


def with_broker(prefix: str,
                run: Callable[[str, str, Path], Coroutine[Any, Any, None]],
                *, initial_rebalance_delay_ms: int = 0) -> None:
    """``run(bootstrap, kafka description, work directory)`` in a temporary
    directory, against KAFKA_BOOTSTRAP_SERVERS when set, otherwise against the
    project's own broker started there for the run (``initial_rebalance_delay_ms``:
    its group.initial.rebalance.delay.ms)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if external:
            # Said, as it changes what is measured: the broker's version, its
            # configs (group.initial.rebalance.delay.ms among them) and the
            # data it already holds are its own.
            print(f"KAFKA_BOOTSTRAP_SERVERS is set: using the broker at {external}, not one "
                  f"started for this run (its version, configs and load are its own; "
                  f"unset it for the project's broker)", flush=True)
            asyncio.run(run(external, f"external ({external}), version not known", workdir))
            return
        with KafkaCluster(workdir / "kafka",
                          initial_rebalance_delay_ms=initial_rebalance_delay_ms) as cluster:
            asyncio.run(run(cluster.bootstrap_servers,
                            f"{KAFKA_VERSION} (KRaft, one broker, this project's)", workdir))


if __name__ == "__main__":
    main()
