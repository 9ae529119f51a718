"""A contender of ``bench/pipeline_bench.py``: the worker's engine doing the
Quix contender's work.

    .venv/bin/python bench/engine_contender.py     # with the worker's environment

This is ``stream-app worker`` (its settings, topics, tasks, transactions,
RocksDB stores and changelogs, HTTP and signals) with one change: the
command stage's processor is ``bench/quix_work.py``'s ``step`` over the
session stored as orjson, in place of the worker's session contract. Its
outputs go to the worker's output topic of their kind (closed, cancelled,
returned). Set against ``bench/quix_contender.py``, which runs the same
``step`` on Quix Streams, it compares the two engines on equal work; set
against the worker, it shows what the session contract costs.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping

import orjson
from quix_work import step

import stream_app.worker
from stream_app.cli import main
from stream_app.pipeline.engine import Engine
from stream_app.pipeline.processor import Outgoing, SourceRecord
from stream_app.pipeline.store import StoreOverlay
from stream_app.pipeline.tasks import Process, Stage
from stream_app.pipeline.topics import SESSIONS_STORE


class QuixWorkEngine(Engine):
    """The engine, with ``step`` as the command stage's processor."""

    def _stages(self) -> tuple[Stage, Stage]:
        commands, profiles = super()._stages()
        topics = self.settings.topics
        topic_of = {"closed": topics.closed, "cancelled": topics.cancelled,
                    "returned": topics.returned}

        def build(_partition: int, stores: Mapping[str, StoreOverlay]) -> Process:
            sessions = stores[SESSIONS_STORE]

            def process(record: SourceRecord) -> list[Outgoing]:
                key = record.key or b""
                stored = sessions.get(key)
                session, out = step(orjson.loads(record.value or b"null"),
                                    None if stored is None else orjson.loads(stored))
                if session is None:
                    return []
                sessions[key] = orjson.dumps(session)
                if out is None:
                    return []
                return [Outgoing(topic_of[out["kind"]], key, orjson.dumps(out))]

            return process

        return dataclasses.replace(commands, build=build), profiles


if __name__ == "__main__":
    stream_app.worker.Engine = QuixWorkEngine  # type: ignore[misc]
    sys.exit(main(["worker"]))
