#!/usr/bin/env python3
"""``make demo``: the whole pipeline on this machine, end to end.

1. starts the project's own Kafka broker (tools/kafka_broker.py) in
   ``var/demo/kafka`` and creates the topics;
2. starts one worker, ``python -m stream_app worker``, with its state in
   ``var/demo/state`` (everything under ``var/demo`` is fresh each run; the
   worker's log is ``var/demo/worker.log``);
3. produces deterministic sample checkout traffic (``--sessions``, ``--seed``);
4. shows the output topics live until the counts settle (at most
   ``--timeout`` seconds), then prints a summary with sample records;
5. stops the worker (SIGTERM, SIGKILL to its process group after 30 s) and
   the broker, also on Ctrl-C, SIGTERM or any error, so no process is left.

Exit status: 0 when every output a correct processor gives arrived downstream,
no other, and the worker ran until stopped and stopped cleanly; 1 otherwise
(saying why), or when the demo failed; 130 when interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python tools/demo.py` puts tools/ on sys.path, not the repository root.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import errno  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from types import FrameType  # noqa: E402
from typing import IO, Any  # noqa: E402

from stream_app.demo.traffic import OUTPUT_KINDS, TrafficSummary, produce_traffic  # noqa: E402
from stream_app.demo.view import ViewResult, pretty, watch  # noqa: E402
from stream_app.pipeline.topics import ensure_topics  # noqa: E402
from stream_app.settings import Settings  # noqa: E402
from tools.kafka_broker import (  # noqa: E402
    KafkaCluster,
    stop_from_state,
    tied_to_this_process,
)

DEMO_DIR = ROOT / "var" / "demo"
WORKER_STOP_GRACE_S = 30.0
_HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def say(message: str) -> None:
    show(f"==> {message}")


def show(text: str) -> None:
    """Print ``text``, or nothing once the output is gone: a pipe whose reader
    went away (``make demo | tee log`` and Ctrl-C, which ends ``tee`` too; a
    pager quit) or a terminal that hung up. Before, the failed write of the
    clean-up's first line skipped the clean-up, and the demo exited 1 with a
    traceback rather than 130."""
    try:
        print(text, flush=True)
    except OSError as exc:
        if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EIO:
            raise  # not gone (a full non-blocking pipe, say)
        output_gone()


def output_gone() -> None:
    """Send the rest of the demo's standard output nowhere (its standard
    error may still be read: ``make demo | head``)."""
    with contextlib.suppress(OSError, ValueError):
        nowhere = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(nowhere, sys.stdout.fileno())
        finally:
            os.close(nowhere)


# --------------------------------------------------------------------------- worker


class Worker:
    """One ``python -m stream_app worker`` in its own process group."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(
            tied_to_this_process([sys.executable, "-m", "stream_app", "worker"]),
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us only; we stop it in order
        )
        (log_path.parent / "worker.pid").write_text(str(self.proc.pid))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> str | None:
        code = self.proc.poll()
        return None if code is None else f"the worker exited with status {code}"

    def stop(self, grace: float = WORKER_STOP_GRACE_S) -> None:
        began = time.monotonic()
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
                say(
                    f"worker {self.pid} stopped on SIGTERM in {time.monotonic() - began:.1f}s "
                    f"(exit status {self.proc.returncode})"
                )
            except subprocess.TimeoutExpired:
                say(f"worker {self.pid} still running {grace:.0f}s after SIGTERM: SIGKILL")
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        else:
            say(f"worker {self.pid} had already exited (status {self.proc.returncode})")
        # Anything the worker left in its process group goes too.
        _signal_group(self.proc.pid, signal.SIGKILL)
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            (self.log_path.parent / "worker.pid").unlink()

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop_leftovers() -> None:
    """Stop what a previous demo run that was killed outright left behind
    (only the processes its own state files name)."""
    pid_file = DEMO_DIR / "worker.pid"
    if pid_file.exists():
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"stream_app\x00worker" in cmdline:
                say(f"stopping worker {pid} left by an earlier demo run")
                _signal_group(pid, signal.SIGKILL)
    kafka_dir = DEMO_DIR / "kafka"
    if (kafka_dir / "cluster.json").exists():
        say("stopping the broker left by an earlier demo run")
        stop_from_state(kafka_dir, grace=10.0)


# --------------------------------------------------------------------------- settings


def demo_environment(bootstrap: str, data_dir: Path) -> dict[str, str]:
    """The environment of the worker, and of this process's own Settings:
    inherited STREAM_APP_* (in any case) and KAFKA_* variables are dropped, so
    both see the same, and another client's KAFKA_SASL_* from the user's shell
    is not refused."""
    env = {
        k: v for k, v in os.environ.items() if not k.upper().startswith(("STREAM_APP_", "KAFKA_"))
    }
    env.update(
        {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "STREAM_APP_APP_ID": "stream-app-demo",
            "STREAM_APP_DATA_DIR": str(data_dir),
            "STREAM_APP_PROCESSING_GUARANTEE": "exactly_once",
            "STREAM_APP_LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@contextlib.contextmanager
def environment(env: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------- the run


async def produce_and_watch(
    settings: Settings, worker: Worker, sessions: int, seed: int, watch_s: float
) -> tuple[TrafficSummary, ViewResult]:
    say(f"producing {sessions} sessions of sample traffic (seed {seed})")
    summary = await produce_traffic(settings, sessions, seed)
    show(summary.describe())
    say("live view of the output topics (counts are received/expected)")
    result = await watch(
        settings,
        seconds=watch_s,
        settle=15.0,
        expected=summary.expected,
        out=show,
        should_stop=worker.exited,
    )
    return summary, result


def print_summary(summary: TrafficSummary, result: ViewResult) -> None:
    say(f"summary after {result.elapsed:.1f}s of watching ({result.stopped_because})")
    for kind in OUTPUT_KINDS:
        got, want = result.counts.get(kind, 0), summary.expected.get(kind, 0)
        mark = "ok" if got == want else ("MISSING" if got < want else "EXTRA")
        show(f"    {kind:<10} {got:>5}  expected {want:>5}  {mark}")
    total, want = result.total, sum(summary.expected.values())
    show(f"    {'total':<10} {total:>5}  expected {want:>5}")
    for kind in ("closed", "returned", "rejected"):
        samples = result.samples.get(kind) or []
        if not samples:
            continue
        sample = min(samples, key=lambda doc: len(pretty(doc)))  # the shortest is easiest to read
        say(f"a sample record from the {kind} topic")
        show(pretty(sample))


def shortfalls(summary: TrafficSummary, result: ViewResult) -> list[str]:
    """What differs from the outputs a correct processor gives, one line each."""
    return [
        f"{kind}: {result.counts.get(kind, 0)} arrived, {summary.expected.get(kind, 0)} expected"
        for kind in OUTPUT_KINDS
        if result.counts.get(kind, 0) != summary.expected.get(kind, 0)
    ]


def run(args: argparse.Namespace) -> int:
    """The demo; raises on failure. Cleans up in its own ``finally``."""
    _stop_leftovers()
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    DEMO_DIR.mkdir(parents=True)
    cluster = KafkaCluster(DEMO_DIR / "kafka")
    worker: Worker | None = None
    try:
        say(f"starting the Kafka broker in {cluster.workdir.relative_to(ROOT)}")
        began = time.monotonic()
        cluster.start()  # raises, saying why (no Java 17+, a format that failed)
        pids = ", ".join(str(n.pid) for n in cluster.members)
        say(
            f"broker up at {cluster.bootstrap_servers} in {time.monotonic() - began:.1f}s "
            f"(pid {pids})"
        )
        env = demo_environment(cluster.bootstrap_servers, DEMO_DIR / "state")
        with environment(env):
            settings = Settings.from_env()
        partitions = asyncio.run(ensure_topics(settings)).partitions
        say(f"topics ready ({partitions} partitions each)")
        worker = Worker(env, DEMO_DIR / "worker.log")
        say(f"started worker pid {worker.pid} (log: {worker.log_path.relative_to(ROOT)})")
        summary, result = asyncio.run(
            produce_and_watch(settings, worker, args.sessions, args.seed, args.timeout)
        )
        print_summary(summary, result)
        failures = shortfalls(summary, result)
        if worker.exited():
            failures.append(f"{worker.exited()} before it was stopped")
            say(f"{worker.exited()}; the end of its log:\n{worker.log_tail()}")
        elif failures:
            show(worker.log_tail())
    finally:
        # A second Ctrl-C must not cut the clean-up short.
        for sig in _HANDLED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        say("stopping")
        try:
            if worker is not None:
                worker.stop()
        finally:
            cluster.stop()
            pids = ", ".join(str(n.pid) for n in cluster.members if n.pid is not None)
            say(f"broker {pids} stopped" if pids else "no broker was running")
    if worker.proc.returncode != 0 and not failures:
        failures.append(f"the worker stopped with status {worker.proc.returncode}")
    if failures:
        say("the demo FAILED: " + "; ".join(failures))
        return 1
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> Any:
    """SIGTERM/SIGHUP take the Ctrl-C path (which asyncio.run handles cleanly)."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        # SIGINT is ignored (a background job of a non-interactive shell).
        raise KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=300, help="default: 300")
    parser.add_argument("--seed", type=int, default=2024, help="default: 2024")
    parser.add_argument(
        "--timeout", type=float, default=90.0, help="longest live view in seconds (default: 90)"
    )
    args = parser.parse_args(argv)
    # Before the broker starts: --sessions 0 failed after it and the worker
    # had, and --timeout 0 blamed Kafka for not answering in time.
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")
    if not args.timeout > 0:
        parser.error("--timeout must be more than 0 seconds")
    os.chdir(ROOT)
    signal.signal(signal.SIGTERM, _interrupt)
    # Not under nohup: the terminal's hang-up is what it asked to ignore.
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, _interrupt)
    try:
        return run(args)
    except KeyboardInterrupt:
        say("interrupted; everything the demo started is stopped")
        return 130
    except Exception:
        with contextlib.suppress(OSError):
            traceback.print_exc()
        say("the demo failed; everything it started is stopped")
        return 1


if __name__ == "__main__":
    sys.exit(main())
