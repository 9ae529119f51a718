"""A live view of the five output topics, in plain printed lines.

:func:`watch` reads closed, returned, cancelled, reopened and rejected from
the beginning, ``read_committed`` like a downstream analytics consumer (no
consumer group, nothing committed), and prints a refresh every ``interval``
seconds: the count per topic and the newest records of each topic that grew,
shortened to one line. No terminal control codes, so it reads the same in a
CI log. It stops after ``seconds``, when the counts have not changed for
``settle`` seconds, shortly after every ``expected`` count is reached, or
when ``should_stop`` says so.
"""

from __future__ import annotations

import asyncio
import logging
import reprlib
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from stream_app import json
from stream_app.demo.traffic import OUTPUT_KINDS
from stream_app.pipeline.kafka import wait_for_partitions
from stream_app.settings import Settings

__all__ = ["ViewResult", "pretty", "shorten", "watch"]

log = logging.getLogger(__name__)

#: Once every expected count is reached, keep reading this long for extras.
_AFTER_EXPECTED_S: Final = 2.0
_SAMPLES: Final = 2


@dataclass
class _Topic:
    kind: str
    name: str
    count: int = 0
    shown: int = 0
    latest: deque[bytes] = field(default_factory=lambda: deque(maxlen=_SAMPLES))


@dataclass(frozen=True)
class ViewResult:
    """Counts per output kind and the newest records of each (parsed)."""

    counts: Mapping[str, int]
    samples: Mapping[str, list[Any]]
    elapsed: float
    stopped_because: str
    #: Kafka refuses this client (credentials, certificates, an ACL): a
    #: configuration mistake, which waiting longer does not mend.
    refused: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _parse(value: bytes) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return {"unparsable": value[:80].decode("utf-8", "replace")}


def pretty(doc: Any) -> str:
    """Indented JSON for people."""
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()


def shorten(kind: str, doc: Any) -> str:
    """One line about an output record; any record, also one of another
    producer on these topics (``watch`` reads them from their start: such a
    record ended the view with a traceback)."""
    try:
        return _shorten(kind, doc)
    except Exception:  # any shape: a line, never the view's end
        return f"(not as the worker writes it) {_SHORT.repr(doc)}"


def _short_repr() -> reprlib.Repr:
    """A record's repr, bounded: orjson reads 1,024 levels, more than repr()
    can. (Python 3.11's Repr takes no arguments.)"""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 4, 100, 100
    return short


_SHORT: Final = _short_repr()


def _shorten(kind: str, doc: Any) -> str:
    if not isinstance(doc, dict):
        return _SHORT.repr(doc)
    if kind == "rejected":
        errors = doc.get("errors")
        first = errors[0] if isinstance(errors, list) and errors else {}
        pointer = (first.get("source") or {}).get("pointer", "")
        command = doc.get("command")
        # The command is kept parsed only when it was JSON, kept whole.
        if isinstance(command, dict):
            about = str(command.get("integrationId", "?"))
        else:
            about = "(command not kept)" if command is None else "(no command object)"
        source = doc.get("source") or {}
        where = f"{source.get('topic')}[{source.get('partition')}]@{source.get('offset')}"
        return f"{doc.get('reason')} {pointer or '/'} {about} from {where}"
    session = doc.get("session") or {}
    parts = [
        str(doc.get("event")),
        str(doc.get("integrationId")),
        f"state={session.get('state')}",
        f"total={session.get('total')}",
        f"firstSession={str(session.get('firstSession')).lower()}",
    ]
    if session.get("profileId"):
        parts.append(f"profile={session['profileId']}")
    returned = doc.get("return")
    if isinstance(returned, dict):
        units = sum(line.get("quantity", 0) for line in returned.get("lines", ()))
        parts.append(f"returned={units} unit(s) worth {returned.get('value')}")
    return " ".join(parts)


def _kind_of(value: bytes | None, kinds: list[_Topic]) -> _Topic:
    """Which of the kinds sharing a topic a record is, by its content: a
    rejection has a reason, an output its event (unknown: the first kind)."""
    from stream_app.pipeline.processor import EVENT_CHANNEL

    try:
        doc = json.loads(value or b"")
    except json.JSONDecodeError:
        return kinds[0]
    if isinstance(doc, dict):
        kind = "rejected" if "reason" in doc else None
        for event, channel in EVENT_CHANNEL.items():
            if doc.get("event") == event.value:
                kind = channel
        for topic in kinds:
            if topic.kind == kind:
                return topic
    return kinds[0]


async def watch(
    settings: Settings,
    *,
    seconds: float,
    settle: float | None = None,
    expected: Mapping[str, int] | None = None,
    interval: float = 1.0,
    out: Callable[[str], None] = print,
    should_stop: Callable[[], str | None] | None = None,
) -> ViewResult:
    """Show the output topics until a stop condition holds (see the module doc)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import TopicAuthorizationFailedError

    from stream_app.pipeline.kafka import Unreachable, client_options, unreachable

    t = settings.topics
    topics = {kind: _Topic(kind, getattr(t, kind)) for kind in OUTPUT_KINDS}
    #: The kinds written to each topic: several when outputs share a topic.
    by_name: dict[str, list[_Topic]] = {}
    for topic in topics.values():
        by_name.setdefault(topic.name, []).append(topic)
    began = time.monotonic()
    deadline = began + seconds
    options = client_options(settings)

    def result(reason: str, *, refused: bool = False) -> ViewResult:
        return ViewResult(
            counts={k: v.count for k, v in topics.items()},
            samples={k: [_parse(raw) for raw in v.latest] for k, v in topics.items()},
            elapsed=time.monotonic() - began,
            stopped_because=reason,
            refused=refused,
        )

    try:  # a broker that accepts connections and never answers: 40 s per probe
        problem = await asyncio.wait_for(unreachable(options), timeout=seconds)
    except TimeoutError:
        problem = Unreachable(
            f"Kafka at {settings.bootstrap_servers} did not answer within {seconds:.0f}s"
        )
    if problem is not None:
        return result(problem.why, refused=problem.refused)
    out(f"watching {', '.join(by_name)} (read_committed) for at most {seconds:.0f}s")
    try:
        partitions = await wait_for_partitions(options, list(by_name), deadline)
    except TopicAuthorizationFailedError as exc:
        return result(
            f"Kafka does not authorize this principal to describe the output topics ({exc})",
            refused=True,
        )
    if partitions is None:
        return result("the output topics do not exist")
    consumer = AIOKafkaConsumer(
        **options,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        last_total = 0
        last_change = time.monotonic()
        quiet_after: float | None = settle
        while True:
            refresh_at = min(time.monotonic() + interval, deadline)
            while (wait := refresh_at - time.monotonic()) > 0:
                batches = await consumer.getmany(timeout_ms=max(1, int(wait * 1000)))
                for tp, records in batches.items():
                    kinds = by_name[tp.topic]
                    for record in records:
                        topic = kinds[0] if len(kinds) == 1 else _kind_of(record.value, kinds)
                        topic.count += 1
                        if record.value is not None:
                            topic.latest.append(record.value)
            now = time.monotonic()
            total = sum(topic.count for topic in topics.values())
            _print_refresh(out, now - began, topics, expected, total - last_total)
            if total != last_total:
                last_total, last_change = total, now
            if expected and all(topics[k].count >= n for k, n in expected.items()):
                quiet_after = min(quiet_after or _AFTER_EXPECTED_S, _AFTER_EXPECTED_S)
            if now >= deadline:
                return result(f"{seconds:.0f}s passed")
            if quiet_after is not None and total > 0 and now - last_change >= quiet_after:
                return result(f"no new output for {quiet_after:.0f}s")
            reason = should_stop() if should_stop is not None else None
            if reason is not None:
                return result(reason)
    finally:
        await consumer.stop()


def _print_refresh(
    out: Callable[[str], None],
    elapsed: float,
    topics: Mapping[str, _Topic],
    expected: Mapping[str, int] | None,
    new: int,
) -> None:
    def count(topic: _Topic) -> str:
        if expected is not None and topic.kind in expected:
            return f"{topic.kind} {topic.count}/{expected[topic.kind]}"
        return f"{topic.kind} {topic.count}"

    total = sum(topic.count for topic in topics.values())
    counts = "  ".join(count(topic) for topic in topics.values())
    out(f"[{elapsed:5.1f}s] {counts}  | total {total} (+{new})")
    for topic in topics.values():
        fresh = min(topic.count - topic.shown, len(topic.latest))
        for raw in list(topic.latest)[len(topic.latest) - fresh :]:
            out(f"    {topic.kind:<9} {shorten(topic.kind, _parse(raw))}")
        topic.shown = topic.count
