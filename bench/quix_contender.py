"""The Quix Streams contender of ``bench/pipeline_bench.py``: the session
work of the stream-app worker, written the idiomatic Quix way, exactly-once.

    .venv-bench/bin/python bench/quix_contender.py BOOTSTRAP SOURCE SINK GROUP STATE_DIR

Runs from its own virtualenv (``.venv-bench``, ``bench/requirements-quix.txt``):
quixstreams 3.28 needs pydantic < 2.14, which the project's constraints pin
higher. It imports nothing of this repository but ``bench/quix_work.py``.

What it does per command, keyed by integrationId (the record key): JSON in
through Quix's deserializer (orjson), the session work of ``bench/quix_work.py``
over the session in Quix's RocksDB state per key (changelogged, exactly-once),
the output JSON out through Quix's serializer to SINK. Less than the worker
does: see ``bench/quix_work.py``.

Settings: ``processing_guarantee="exactly-once"``, ``commit_interval``
(``--commit-interval``, default 1 s; Quix's own default is 5 s), a 32 MiB
RocksDB block cache (the worker's default) and otherwise Quix's defaults.
Prints ``FIRST_CONSUMED <unix time>`` when it processes its first record.
Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from quix_work import step
from quixstreams import Application, State
from quixstreams.state.rocksdb import RocksDBOptions

_first = [True]


def process(cmd: dict[str, Any], state: State) -> dict[str, Any] | None:
    if _first[0]:
        _first[0] = False
        print(f"FIRST_CONSUMED {time.time():.6f}", flush=True)
    session, out = step(cmd, state.get("session"))
    if session is not None:
        state.set("session", session)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bootstrap")
    parser.add_argument("source")
    parser.add_argument("sink")
    parser.add_argument("group")
    parser.add_argument("state_dir")
    parser.add_argument("--commit-interval", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        commit_interval=args.commit_interval,
        # Its default, 1 s, held the last commit (checked after a poll returns)
        # up to a second past the last record: inside its measured window.
        consumer_poll_timeout=0.1,
        state_dir=args.state_dir,
        rocksdb_options=RocksDBOptions(block_cache_size=32 * 1024 * 1024),
        loglevel="WARNING",
    )
    source = app.topic(args.source, value_deserializer="json")
    sink = app.topic(args.sink, value_serializer="json")
    sdf = app.dataframe(source)
    sdf = sdf.apply(process, stateful=True).filter(lambda out: out is not None)
    sdf.to_topic(sink)
    app.run()


if __name__ == "__main__":
    main()
