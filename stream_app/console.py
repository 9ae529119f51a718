"""The ``stream-app`` console script and ``python -m stream_app``: as little as
can run before :mod:`stream_app.cli` and its imports (pydantic's alone take a
fifth of a second)."""

from __future__ import annotations

import signal
import sys
from typing import Final

#: SIGHUP, where there is one, unless the process started with it ignored:
#: ``nohup`` (or ``trap '' HUP``) asked that a closed terminal not stop it.
_HUP: Final[tuple[signal.Signals, ...]] = tuple(
    hup
    for hup in (getattr(signal, "SIGHUP", None),)
    if isinstance(hup, signal.Signals) and signal.getsignal(hup) is not signal.SIG_IGN
)
#: The signals that stop a worker cleanly. SIGHUP too: the terminal of a
#: worker run in the foreground closed (an ssh session ended), where Python's
#: default ended it with no commit; a JVM (Kafka Streams) runs its shutdown
#: hooks on it. SIGQUIT keeps its default, a core dump asked for.
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT, *_HUP)

#: Signals that came before the worker's own handlers were in place; the
#: worker acts on them as soon as they are (stream_app.worker.run).
early_signals: list[int] = []


def main() -> int:
    if sys.argv[1:2] == ["worker"]:
        remember_signals()
    try:
        from stream_app.cli import main as run

        return run()
    except KeyboardInterrupt:  # a Ctrl-C while the imports ran: no traceback
        return 130


def remember_signals() -> None:
    """Until the worker's own handlers are in place (its imports take about a
    second), the stop signals are noted rather than fatal: the worker then
    stops at once with exit 0, nothing having started that needs stopping,
    rather than dying of the signal (143), or of a KeyboardInterrupt traceback
    (130) for a Ctrl-C. Noted only: an exception raised wherever the signal
    finds the process (inside a C extension's start, say) could crash it."""
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not _note:
            signal.signal(signum, _note)


def _note(signum: int, _frame: object) -> None:
    early_signals.append(signum)
