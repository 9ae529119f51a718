"""The raw aiokafka contenders of ``bench/pipeline_bench.py``, one process each.

    python bench/raw_contender.py {plain,transactional} BOOTSTRAP SOURCE SINK GROUP

Both read SOURCE from the beginning in consumer group GROUP, decode each
command with ``orjson.loads`` and forward to SINK, unchanged, every close,
cancel and return (duplicates included: they keep no state, so this is the
ceiling of consume + decode + produce, not a session processor).

* ``plain``: offsets auto-committed, no transactions;
* ``transactional``: a transaction per ``--records`` consumed records
  (default 500; fewer when a poll comes back empty or the transaction is
  ``--max-ms`` old, default 100 ms, the worker's checkpoint interval), with
  the consumed offsets sent to the transaction: exactly-once with no state.

Prints ``FIRST_CONSUMED <unix time>`` when its first records arrive. Runs
until it is sent SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition


def _forwarded(value: bytes) -> bool:
    doc = orjson.loads(value)
    if doc.get("type") == "return":
        return True
    state = (doc.get("session") or {}).get("state")
    return state in ("closed", "cancelled")


def _first(seen: bool) -> bool:
    if not seen:
        print(f"FIRST_CONSUMED {time.time():.6f}", flush=True)
    return True


async def plain(bootstrap: str, source: str, sink: str, group: str) -> None:
    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest", max_poll_records=1000)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await consumer.start()
    await producer.start()
    seen = False
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            for records in batches.values():
                seen = _first(seen)
                for r in records:
                    if _forwarded(r.value):
                        await producer.send(sink, r.value, key=r.key)
    finally:
        await producer.stop()
        await consumer.stop()


async def transactional(bootstrap: str, source: str, sink: str, group: str, size: int,
                        max_age: float) -> None:
    consumer = AIOKafkaConsumer(source, bootstrap_servers=bootstrap, group_id=group,
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                isolation_level="read_committed", max_poll_records=size)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                transactional_id=f"{group}-txn")
    await consumer.start()
    await producer.start()
    seen = False
    try:
        while True:
            pending = 0
            offsets: dict[TopicPartition, int] = {}
            await producer.begin_transaction()
            began = 0.0
            while pending < size and not (pending and time.monotonic() - began > max_age):
                batches = await consumer.getmany(timeout_ms=100, max_records=size - pending)
                if not batches:
                    if pending:
                        break
                    continue
                seen = _first(seen)
                if not pending:
                    began = time.monotonic()
                for tp, records in batches.items():
                    for r in records:
                        if _forwarded(r.value):
                            await producer.send(sink, r.value, key=r.key)
                    offsets[tp] = records[-1].offset + 1
                    pending += len(records)
            await producer.send_offsets_to_transaction(offsets, group)
            await producer.commit_transaction()
    finally:
        await producer.stop()
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("plain", "transactional"))
    parser.add_argument("bootstrap")
    parser.add_argument("source")
    parser.add_argument("sink")
    parser.add_argument("group")
    parser.add_argument("--records", type=int, default=500,
                        help="records per transaction (transactional)")
    parser.add_argument("--max-ms", type=float, default=100.0,
                        help="a transaction's longest life, ms (transactional)")
    args = parser.parse_args()
    if args.mode == "plain":
        job = plain(args.bootstrap, args.source, args.sink, args.group)
    else:
        job = transactional(args.bootstrap, args.source, args.sink, args.group, args.records,
                            args.max_ms / 1000)
    try:
        asyncio.run(job)
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
