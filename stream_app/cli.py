"""The ``stream-app`` console script: the entry point that builds settings and logging."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from stream_app.settings import Settings

log = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_worker(settings: Settings) -> int:
    """Run one worker until SIGTERM or SIGINT, then stop within ``shutdown_timeout_s``."""
    import asyncio

    from stream_app.worker import run

    configure_logging(settings.log_level)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    return asyncio.run(run(settings))


def run_traffic(settings: Settings, sessions: int, seed: int, rate: float | None) -> int:
    """Produce the demo's sample checkout traffic to the command topic."""
    import asyncio

    from stream_app.demo.traffic import produce_traffic

    summary = asyncio.run(produce_traffic(settings, sessions, seed, rate))
    print(f"produced to {settings.topics.commands}: {summary.describe()}")
    return 0


def run_watch(settings: Settings, seconds: float, settle: float | None) -> int:
    """Print a live view of the output topics; 1 when nothing arrived."""
    import asyncio

    from stream_app.demo.view import watch

    result = asyncio.run(watch(settings, seconds=seconds, settle=settle))
    print(f"stopped: {result.stopped_because}; {result.total} output records")
    return 0 if result.total else 1


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, not {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stream-app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="run a worker with the settings from the environment")
    traffic = sub.add_parser(
        "traffic", help="produce deterministic sample checkout traffic to the command topic"
    )
    traffic.add_argument("--sessions", type=_positive(int), default=200, help="default: 200")
    traffic.add_argument("--seed", type=int, default=1, help="default: 1")
    traffic.add_argument(
        "--rate", type=_positive(float), default=None, help="records per second (default: max)"
    )
    watch = sub.add_parser("watch", help="print a live view of the output topics")
    watch.add_argument("--seconds", type=_positive(float), default=60.0, help="default: 60")
    watch.add_argument(
        "--settle",
        type=_positive(float),
        default=None,
        help="also stop when nothing new arrived for this many seconds",
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if args.command == "worker":
        return run_worker(settings)
    configure_logging(settings.log_level)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    if args.command == "traffic":
        return run_traffic(settings, int(args.sessions), args.seed, args.rate)
    return run_watch(settings, args.seconds, args.settle)


if __name__ == "__main__":
    sys.exit(main())
