#!/usr/bin/env python3
"""Revenue per application, from the outputs of the customer-session workers.

An analytics consumer as a downstream team would write it: it reads the
closed, returned, cancelled and reopened topics ``read_committed`` (so it
sees exactly the outputs the workers committed, once each), keeps a revenue
figure per ``applicationId``, and prints it. Only ``aiokafka`` and the
standard library; copy it and change what you need.

What "revenue" means here
-------------------------
Revenue is what closed sessions are worth now: for each session, its
``total`` once it is closed, minus what was returned since, and nothing for a
session that was cancelled or is open again. ``total`` is the workers' own
figure, before any discounts: cart items (price x quantity), item-level
additional costs (per unit) and session-level additional costs such as
shipping. Per output record (``event``, on the topic in brackets):

==================================  ===========  ==========================================
event                               topic        revenue change
==================================  ===========  ==========================================
talon_session_closed                closed       + ``session.total``
talon_session_partially_returned    returned     - ``return.value`` (the lines returned by
                                                 this return: quantity x (price + item
                                                 costs); session-level costs stay)
talon_session_revoked               cancelled    - ``session.total`` (a closed session
                                                 cancelled: nothing was returned yet)
talon_session_cancelled             cancelled    a partially returned session cancelled:
                                                 - (``session.total`` - what its returns
                                                 took back already), so it counts 0; an
                                                 open session cancelled: 0 (never counted)
talon_session_reopened              reopened     - ``session.total`` (the closed total; it
                                                 counts again when it is closed again,
                                                 with the total it has then)
==================================  ===========  ==========================================

Why these hold (docs/contract.md: section 10, "Outputs"; sections 5 and 6,
"Returns" and "Totals and numbers"; section 4, "The state machine"): every
output carries the whole session after the command; a return does not
rewrite the totals; a closed session cannot change until it is reopened, and
a cancellation of a closed or partially returned session changes only its
state, so ``session.total`` on a revoke, a cancel or a reopen is the total
that was counted at the close. Only a closed session can be reopened, so a
reopened session has no returns. A cancelled record with ``returnedQuantity``
on any cart item came from a partially returned session; an open session has
none. What its returns took back is the sum over cart items of
``returnedQuantity x (price + item-level cost prices)``, exactly what the
return records subtracted.

Each change depends on its own record only, so the figure is the same in
whatever order the four topics are read (a reopen may be read before the
close it undoes). Outputs may share a topic, and rejections too: a record
without an ``event`` is no output, and is skipped.

Duplicates: with ``exactly_once`` workers and ``read_committed`` there are
none; under ``at_least_once`` a crash can write an output again, so records
are counted once per (applicationId, integrationId, event,
``session.updateCount``). Every applied command raises its session's
``updateCount`` by one and publishes at most one output, which carries the
whole session, ``updateCount`` included (docs/contract.md, sections 3, 4
and 10), so that identifies one applied command's output. The ``eventId`` does
not: the workers remember only the last 64 eventIds of a session (section
9), so a command that reuses an older one is applied again, and its output
is new revenue, not a duplicate. (Under ``at_least_once`` a replay can
also apply a re-keyed command and the commands around it in another order,
docs/contract.md section 9: those outputs come again with other
``updateCount`` values, and are counted again. Run the workers with
``exactly_once`` for revenue.) These keys are remembered for the last
``--dedupe-window`` outputs (100,000) of each partition read. A crash of a
worker writes again what followed its last commit, but not only right away:
the outputs of profiled sessions are written by the second stage, whose
task for one by-profile partition writes to every output partition, and
that task comes back only after the group's session timeout and its
restore, while the other workers go on writing to the same partitions. So
the window must hold what an output partition receives during the longest
outage of a worker you expect (session timeout plus restore): about its
output rate times that time. 0 remembers every output. Each key takes about
300 bytes: a full window, 30 MB per partition read. Numbers are
parsed as ``Decimal`` and summed exactly (no 28-digit rounding, no binary
float drift).

This example keeps everything in memory and reads from the beginning each
time, without a consumer group, so it needs the whole history: it refuses to
run on a topic whose first records are gone (retention or a deletion; the
workers create the output topics with the cluster's default retention, so
set ``retention.ms=-1`` and ``retention.bytes=-1`` on them for this
example), and stops if records are deleted while it reads. Compaction
deletes records without that sign: an output topic must not compact.
Several copies each count everything. A figure is each topic read to its
end as found at the start, not one snapshot of all four: a reopen committed
just after its close can be counted without it; ``--follow`` prints figures
along the way, with the same caveat, and stops (exit 1, with a message)
when the topics gain partitions, whose records it would not read. A
long-running job would keep the
figures, the seen output keys and the offsets together in its own store,
per partition, and resume from them.

Run::

    python examples/revenue_consumer.py               # read what is there, print, exit
    python examples/revenue_consumer.py --follow      # and keep printing updates
    python examples/revenue_consumer.py --json        # {"<applicationId>": "<revenue>"}

Brokers: ``--bootstrap-servers`` or ``KAFKA_BOOTSTRAP_SERVERS`` (plaintext;
add aiokafka's SASL/SSL options for a secured cluster). Topics: the
``--*-topic`` options, or the workers' ``STREAM_APP_TOPICS__*`` variables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from decimal import MAX_PREC, Context, Decimal, Inexact, InvalidOperation, localcontext
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import OffsetOutOfRangeError

#: How often ``--follow`` looks for partitions added to the topics it reads.
PARTITIONS_CHECKED_EVERY_S = 10.0

CLOSED = "talon_session_closed"
RETURNED = "talon_session_partially_returned"
REVOKED = "talon_session_revoked"
CANCELLED = "talon_session_cancelled"
REOPENED = "talon_session_reopened"

ZERO = Decimal(0)
#: Sums as exact as their terms: the default context keeps 28 digits, so a
#: figure of 1e11 plus a total of 0.30000000000000004 would be rounded (and
#: depend on the order the topics are read in).
EXACT = Context(prec=MAX_PREC, traps=[Inexact, InvalidOperation])
#: Output keys remembered per partition read (see the module doc).
DEDUPE_WINDOW = 100_000


def parse(value: bytes) -> Any:
    """JSON with numbers as Decimal, exactly as written."""
    return json.loads(value, parse_float=Decimal, parse_int=Decimal)


def returned_value(session: dict[str, Any]) -> Decimal:
    """What the returns of ``session`` took back so far."""
    total = ZERO
    for item in session.get("cartItems", ()):
        returned = item.get("returnedQuantity") or ZERO
        if returned:
            unit = item["price"] + sum(
                (cost["price"] for cost in (item.get("additionalCosts") or {}).values()), ZERO
            )
            total += returned * unit
    return total


def revenue_change(doc: dict[str, Any]) -> Decimal:
    """How one output record changes its application's revenue (see the module doc)."""
    event = doc.get("event")
    session = doc.get("session") or {}
    if event == CLOSED:
        return Decimal(session["total"])
    if event == RETURNED:
        return -Decimal(doc["return"]["value"])
    if event in (REVOKED, REOPENED):
        return -Decimal(session["total"])
    if event == CANCELLED:
        # Partially returned (counted when it closed): take back what is left.
        # By the quantities, not the value: a free gift returned is worth 0.
        if any(item.get("returnedQuantity") for item in session.get("cartItems", ())):
            return -(Decimal(session["total"]) - returned_value(session))
        return ZERO  # it was open: never counted
    return ZERO  # not a revenue event


@dataclass
class RevenueLedger:
    """Revenue per applicationId; :meth:`record` counts each output once."""

    revenue: dict[int, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    #: Outputs counted per applicationId.
    counted: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    #: How many output keys to remember per partition read; 0: every one.
    window: int = DEDUPE_WINDOW
    #: (applicationId, integrationId, event, session.updateCount) of the last
    #: ``window`` outputs counted, per partition read: one applied command's
    #: output (the module doc says why not eventId, and why a window).
    seen: dict[Any, OrderedDict[tuple[int, str, str, int], None]] = field(default_factory=dict)
    records: int = 0
    duplicates: int = 0

    def record(self, doc: dict[str, Any], source: Any = None) -> bool:
        """Count one output document read from ``source`` (its topic
        partition); False when it was counted before."""
        application_id = int(doc["applicationId"])
        integration_id = str(doc["integrationId"])
        update_count = int(doc["session"]["updateCount"])
        key = (application_id, integration_id, str(doc.get("event")), update_count)
        recent = self.seen.setdefault(source, OrderedDict())
        if key in recent:
            self.duplicates += 1
            return False
        recent[key] = None
        if self.window and len(recent) > self.window:
            recent.popitem(last=False)
        self.records += 1
        with localcontext(EXACT):
            self.revenue[application_id] += revenue_change(doc)
        self.counted[application_id] += 1
        return True

    def figures(self) -> dict[int, Decimal]:
        with localcontext(EXACT):
            return {app: self.revenue[app].normalize() for app in sorted(self.revenue)}

    def report(self) -> str:
        lines = [
            f"revenue per application ({self.records} records, "
            f"{self.duplicates} duplicates ignored):"
        ]
        for app, figure in self.figures().items():
            lines.append(f"  application {app}: {figure:f} from {self.counted[app]} outputs")
        if not self.revenue:
            lines.append("  (no sessions yet)")
        return "\n".join(lines)


async def consume(
    bootstrap_servers: str, topics: list[str], ledger: RevenueLedger, *, follow: bool, out: Any
) -> bool:
    """Read ``topics`` from the beginning into ``ledger``: to their current end,
    or (``follow``) until SIGINT/SIGTERM, printing each change. Whether it
    read to the end (False: stopped before, the figure is partial)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",  # only what the workers committed
        # Records deleted while they are read: stop, rather than jump to the
        # end (aiokafka's default) and print a figure without them.
        auto_offset_reset="none",
    )
    await consumer.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        partitions = await _partitions(bootstrap_servers, topics)
        consumer.assign(partitions)
        gone = {tp: n for tp, n in (await consumer.beginning_offsets(partitions)).items() if n}
        if gone:
            first = ", ".join(f"{tp.topic}[{tp.partition}] from {n}" for tp, n in gone.items())
            raise SystemExit(
                f"revenue_consumer: the first records are gone ({first}): a figure "
                "without them would be wrong. This example needs the whole history "
                "(retention.ms=-1 and retention.bytes=-1 on the output topics; see its "
                "docstring)."
            )
        for tp in partitions:
            # Offset 0, not "the beginning": records deleted after the check
            # above make the first fetch out of range, not silently skipped.
            consumer.seek(tp, 0)
        # read_committed: the end is the last stable offset (no open transaction).
        ends = None if follow else await consumer.end_offsets(partitions)
        checked = time.monotonic()
        while not stop.is_set():
            if follow and time.monotonic() - checked >= PARTITIONS_CHECKED_EVERY_S:
                # Partitions added to an output topic (a KafkaTopic raised,
                # kafka-topics --alter) take the sessions whose keys hash to
                # them: a figure without them would be too low, silently.
                checked = time.monotonic()
                now = await _partitions(bootstrap_servers, topics)
                if set(now) != set(partitions):
                    raise SystemExit(
                        f"revenue_consumer: {', '.join(topics)} now have {len(now)} "
                        f"partitions, not {len(partitions)}: the figure would miss the new "
                        "ones; run it again (it reads from the beginning)"
                    )
            if ends is not None and all(
                [await consumer.position(tp) >= ends[tp] for tp in partitions]
            ):
                return True
            changed = False
            try:
                batches = await consumer.getmany(timeout_ms=200)
            except OffsetOutOfRangeError as exc:
                raise SystemExit(
                    f"revenue_consumer: records were deleted while being read ({exc}): no figure"
                ) from None
            for tp, records in batches.items():
                for record in records:
                    if ends is not None and record.offset >= ends[tp]:
                        continue
                    if record.value is None:
                        continue
                    doc = parse(record.value)
                    # Outputs and rejections may share a topic: a rejection
                    # (no event, no applicationId) is no revenue.
                    if isinstance(doc, dict) and "event" in doc:
                        changed |= ledger.record(doc, tp)
            if follow and changed:
                out(ledger.report())
        return follow  # stopped: the end of a follow, or a one-shot cut short
    finally:
        await consumer.stop()


async def _partitions(bootstrap_servers: str, topics: list[str]) -> list[TopicPartition]:
    """Every partition of ``topics``; each topic must exist. (Looked for among
    all topics first: a request naming a missing topic would have a broker
    with auto.create.topics.enable, Kafka's default, create it.)"""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        for topic in topics:
            if topic not in existing:
                raise SystemExit(
                    f"revenue_consumer: topic {topic} does not exist (or this principal "
                    "may not describe it)"
                )
        described = {entry["topic"]: entry for entry in await admin.describe_topics(topics)}
    finally:
        await admin.close()
    partitions = []
    for topic in topics:
        entry = described.get(topic) or {}
        if entry.get("error_code") or not entry.get("partitions"):
            raise SystemExit(f"revenue_consumer: Kafka does not describe topic {topic}")
        partitions += [TopicPartition(topic, p["partition"]) for p in entry["partitions"]]
    return partitions


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Print revenue per applicationId from the session output topics."
    )
    parser.add_argument(
        "--bootstrap-servers", default=env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    )
    for name in ("closed", "returned", "cancelled", "reopened"):
        parser.add_argument(
            f"--{name}-topic",
            default=env(f"STREAM_APP_TOPICS__{name.upper()}", f"sessions.{name}"),
            help="default: %(default)s",
        )
    parser.add_argument("--follow", action="store_true", help="keep reading until Ctrl-C")
    parser.add_argument(
        "--dedupe-window",
        type=int,
        default=DEDUPE_WINDOW,
        help="output keys remembered per partition to drop at_least_once "
        "duplicates; 0: every one (default: %(default)s; see the module doc)",
    )
    parser.add_argument(
        "--json", action="store_true", help='print {"<applicationId>": "<revenue>"} at the end'
    )
    args = parser.parse_args(argv)
    topics = [args.closed_topic, args.returned_topic, args.cancelled_topic, args.reopened_topic]
    if args.dedupe_window < 0:
        parser.error("--dedupe-window must be 0 or more")
    ledger = RevenueLedger(window=args.dedupe_window)

    def out(text: str) -> None:
        print(text, flush=True)

    whole = asyncio.run(
        consume(args.bootstrap_servers, topics, ledger, follow=args.follow, out=out)
    )
    if not whole:
        print("revenue_consumer: stopped before the end: no figure", file=sys.stderr)
        return 130
    if args.json:
        out(json.dumps({str(app): f"{figure:f}" for app, figure in ledger.figures().items()}))
    else:
        out(ledger.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
