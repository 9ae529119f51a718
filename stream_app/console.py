"""The ``stream-app`` console script and ``python -m stream_app``: as little as
can run before :mod:`stream_app.cli` and its imports (pydantic's alone take a
fifth of a second)."""

from __future__ import annotations

import signal
import sys


def main() -> int:
    if sys.argv[1:2] == ["worker"]:
        # Until the worker's own handlers are in place (its imports take about
        # a second), SIGTERM ends it as they would: exit 0, nothing having
        # started that needs stopping, rather than the signal's 143.
        signal.signal(signal.SIGTERM, stop_before_start)
    from stream_app.cli import main as run

    return run()


def stop_before_start(_signum: int, _frame: object) -> None:
    raise SystemExit(0)
