"""The ``stream-app`` console script: the entry point that builds settings and logging."""

from __future__ import annotations

import argparse
import logging
import sys

from stream_app.settings import Settings

log = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_worker(settings: Settings) -> None:
    """Run one Faust worker until SIGTERM/SIGINT; Faust handles the signals."""
    from stream_app.pipeline.app import create_worker

    create_worker(settings).execute_from_commandline()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stream-app", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="start a Faust worker with the settings from the environment")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if args.command == "worker":
        run_worker(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
