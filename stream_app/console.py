"""The ``stream-app`` console script and ``python -m stream_app``: as little as
can run before :mod:`stream_app.cli` and its imports (pydantic's alone take a
fifth of a second)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
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


#: The SIGTERMs a command other than the worker took as a Ctrl-C
#: (:func:`take_sigterm_as_ctrl_c`): its exit status is then 143, not 130.
terminated: list[int] = []


def main() -> int:
    worker = sys.argv[1:2] == ["worker"]
    if worker:
        remember_signals()
    elif signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # Only noted while the imports run: a KeyboardInterrupt raised inside
        # an extension module's initialisation (orjson's) crashed the process
        # with a segmentation fault.
        signal.signal(signal.SIGTERM, _note_sigterm)
    try:
        from stream_app.cli import main as run

        if not worker:
            take_sigterm_as_ctrl_c()
            if terminated:  # a SIGTERM while the imports ran: nothing started
                return interrupted_exit()
        return run()
    except KeyboardInterrupt:  # a Ctrl-C while the imports ran: no traceback
        return interrupted_exit()


def _note_sigterm(signum: int, _frame: object) -> None:
    terminated.append(signum)


def take_sigterm_as_ctrl_c() -> Callable[[], None]:
    """For every command but the worker: a SIGTERM (``docker stop``, a CI
    job's timeout) takes the Ctrl-C path, and the exit status is 143. As a
    container's PID 1, with no handler, the process ignored it, and
    ``docker stop`` waited out its grace period. The signal is passed on as a
    SIGINT, which ``asyncio.run`` answers by cancelling its main task: a
    KeyboardInterrupt raised from the handler itself could land inside the
    event loop's own code, where it hung the loop's shutdown or was lost.
    Returns what puts the default back (for :func:`stream_app.cli.main`
    called in a process that goes on)."""
    current = signal.getsignal(signal.SIGTERM)
    if current is _note_sigterm:  # console.main's, while the imports ran
        signal.signal(signal.SIGTERM, _as_ctrl_c)
        return _as_it_is
    if current is not signal.SIG_DFL:
        return _as_it_is  # taken so already, or the caller's own handler
    terminated.clear()
    signal.signal(signal.SIGTERM, _as_ctrl_c)
    return _sigterm_default


def _sigterm_default() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _as_it_is() -> None:
    pass


def _as_ctrl_c(signum: int, _frame: object) -> None:
    terminated.append(signum)
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        # SIGINT ignored (a background job of a non-interactive shell).
        raise KeyboardInterrupt
    os.kill(os.getpid(), signal.SIGINT)


def interrupted_exit() -> int:
    """The exit status of a command interrupted: 143 for a SIGTERM, else 130."""
    return 128 + terminated[0] if terminated else 130


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
