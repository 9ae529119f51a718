"""``make demo``'s verdict, with the broker, the worker and the live view faked:
it fails unless every expected output arrived and the worker stopped cleanly."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_app.demo.traffic import TrafficSummary, generate_traffic
from stream_app.demo.view import ViewResult
from tools import demo


class _Cluster:
    def __init__(self, workdir: Path) -> None:
        self.workdir = demo.ROOT / "var" / "demo" / "kafka"
        self.members: list[Any] = []
        self.bootstrap_servers = "127.0.0.1:9"

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class _Process:
    def __init__(self, running: bool, status: int) -> None:
        self.running, self.status = running, status

    @property
    def returncode(self) -> int | None:
        return None if self.running else self.status

    def poll(self) -> int | None:
        return self.returncode


class _Layout:
    partitions = 6


async def _topics(settings: Any) -> _Layout:
    return _Layout()


@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """demo.main() ignores SIGINT, SIGTERM and SIGHUP while it cleans up, and
    leaves them so (its process ends there). In the test process that outlived
    the test: a later test's subprocess inherited SIGTERM ignored, and
    test_configuration's SIGTERM tests timed out when they ran after these."""
    handlers = {sig: signal.getsignal(sig) for sig in demo._HANDLED_SIGNALS}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


def _fake_demo(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    cluster: type,
    worker: type,
    produce_and_watch: Callable[..., Awaitable[Any]],
) -> None:
    """The demo over these stand-ins for the broker, the worker and the live view."""
    monkeypatch.setattr(demo, "DEMO_DIR", tmp_path / "demo")
    monkeypatch.setattr(demo, "_stop_leftovers", lambda: None)
    monkeypatch.setattr(demo, "KafkaCluster", cluster)
    monkeypatch.setattr(demo, "ensure_topics", _topics)
    monkeypatch.setattr(demo, "Worker", worker)
    monkeypatch.setattr(demo, "produce_and_watch", produce_and_watch)


@pytest.mark.parametrize(
    ("change", "crashed", "stop_status", "exit_status"),
    [
        ({}, False, 0, 0),
        ({"closed": -1}, False, 0, 1),  # one missing
        ({"returned": +1}, False, 0, 1),  # one too many
        ({}, True, 1, 1),  # the worker died during the run
        ({}, False, 1, 1),  # the worker did not stop cleanly
    ],
)
def test_the_demo_fails_unless_every_expected_output_arrived_and_the_worker_stopped_cleanly(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, int],
    crashed: bool,
    stop_status: int,
    exit_status: int,
) -> None:
    class Worker:
        def __init__(self, env: dict[str, str], log_path: Path) -> None:
            self.proc = _Process(running=not crashed, status=stop_status)
            self.pid = 4242
            self.log_path = demo.ROOT / "var" / "demo" / "worker.log"

        def exited(self) -> str | None:
            code = self.proc.poll()
            return None if code is None else f"the worker exited with status {code}"

        def log_tail(self) -> str:
            return "(the worker's log)"

        def stop(self) -> None:
            self.proc.running = False

    async def produce_and_watch(
        settings: Any, worker: Worker, sessions: int, seed: int, watch_s: float
    ) -> tuple[TrafficSummary, ViewResult]:
        summary = generate_traffic(sessions, seed).summary
        counts = {kind: n + change.get(kind, 0) for kind, n in summary.expected.items()}
        return summary, ViewResult(counts, {}, 1.0, "settled")

    _fake_demo(monkeypatch, tmp_path, _Cluster, Worker, produce_and_watch)

    assert demo.run(argparse.Namespace(sessions=50, seed=7, timeout=5.0)) == exit_status
    printed = capsys.readouterr().out
    assert ("the demo FAILED" in printed) == bool(exit_status)


def test_an_interrupted_demo_whose_output_is_gone_still_stops_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make demo | tee log` and Ctrl-C: the interrupt ends `tee` too, and the
    clean-up's first line failed to be written. That skipped the stops of the
    worker and the broker, and the demo exited 1 with a traceback, not 130."""
    stopped: list[str] = []

    class Cluster(_Cluster):
        def stop(self) -> None:
            stopped.append("broker")

    class Worker:
        def __init__(self, env: dict[str, str], log_path: Path) -> None:
            self.proc = _Process(running=True, status=0)
            self.pid = 4242
            self.log_path = demo.ROOT / "var" / "demo" / "worker.log"

        def stop(self) -> None:
            self.proc.running = False
            stopped.append("worker")

    async def produce_and_watch(*args: object) -> None:
        raise KeyboardInterrupt

    def unwritable(*args: object, **kwargs: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    _fake_demo(monkeypatch, tmp_path, Cluster, Worker, produce_and_watch)
    monkeypatch.chdir(tmp_path)  # main() goes to the repository's root
    gone: list[bool] = []
    # Not the real redirect: under `pytest -s` it sent the rest of the run's
    # output to /dev/null.
    monkeypatch.setattr(demo, "output_gone", lambda: gone.append(True))
    with monkeypatch.context() as broken:  # the handlers: _signal_handlers_restored
        broken.setattr("builtins.print", unwritable)
        status = demo.main(["--sessions", "5"])
    assert status == 130
    assert stopped == ["worker", "broker"]
    assert gone


@pytest.mark.parametrize("bad", [["--sessions", "0"], ["--timeout", "0"], ["--timeout", "nan"]])
def test_arguments_that_cannot_work_are_refused_before_anything_starts(
    bad: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "run", lambda args: pytest.fail("the demo ran"))
    with pytest.raises(SystemExit) as refused:
        demo.main(bad)
    assert refused.value.code == 2
