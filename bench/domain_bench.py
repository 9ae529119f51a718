"""Cost of the domain hot path against ``orjson.loads`` of the same bytes.

Run: ``python bench/domain_bench.py``. For a typical command (10 cart items)
and a 1000-item cart it measures, per operation:

- ``orjson.loads`` (baseline, same bytes, same run);
- ``decode_command`` (parse + validate);
- ``decode + apply`` (update of an open session);
- ``decode + apply + encode_session``: issue 8's domain cost (target 15 us);
- the whole step: decode + apply + ``encode_session`` + ``stream_app.json.dumps``
  of every output document;
- ``decode_session`` of the stored form;
- ``encode_session`` (msgspec) against the orjson alternative of dumping the
  emitted document, which motivated msgspec for the stored form.

Each figure is the min and the median over repeats of ``timeit``, in
microseconds, with its ratio to the baseline minimum.

Last, both stages' processors run over the pipeline bench's workload with
dict tables: the per-command cost that is ours before Kafka and RocksDB;
then the Quix contender's session work (``bench/quix_work.py``) over the same
commands, for comparison.
"""

from __future__ import annotations

import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stream_app.domain import (
    ApplicationSettings,
    Applied,
    CommandContext,
    Rejection,
    Session,
    UpdateCommand,
    apply,
    decode_command,
    decode_session,
    encode_session,
    output_document,
    session_document,
)
from stream_app.json import dumps

REPEAT = 9
#: Runs of both stages' processors over the whole workload (about 3 s each).
REPEAT_PROCESSORS = 3


class _Counter:
    def __init__(self) -> None:
        self.value = 0

    def next_id(self) -> int:
        self.value += 1
        return self.value


def command_bytes(items: int, event_id: str = "evt-2") -> bytes:
    cart = [
        {
            "sku": f"SKU-{i:05d}",
            "name": f"Product {i}",
            "category": "groceries",
            "quantity": i % 3 + 1,
            "price": round(1.99 + i * 0.25, 2),
            "attributes": {"color": "red"},
        }
        for i in range(items)
    ]
    doc = {
        "type": "update",
        "integrationId": "session-0001",
        "eventId": event_id,
        "applicationId": 1,
        "session": {
            "profileId": "customer-42",
            "couponCodes": ["SUMMER10"],
            "cartItems": cart,
            "additionalCosts": {"shipping": {"price": 4.95}},
            "attributes": {"ShippingCity": "Berlin"},
            "state": "open",
        },
    }
    return orjson.dumps(doc)


def measure(func: Callable[[], object], number: int) -> tuple[float, float]:
    runs = timeit.repeat(func, number=number, repeat=REPEAT)
    per_op = [run / number * 1e6 for run in runs]
    return min(per_op), statistics.median(per_op)


def scenario(label: str, items: int, number: int) -> None:
    raw = command_bytes(items)
    ctx = CommandContext(1_764_100_000_000, "commands[0]@1", 1, ApplicationSettings(), _Counter())
    create = decode_command(command_bytes(1, "evt-1"))
    assert isinstance(create, UpdateCommand)
    created = apply(
        None, create, CommandContext(1_764_000_000_000, "evt-1", 1, ctx.settings, _Counter())
    )
    assert isinstance(created, Applied)
    stored: Session = created.session

    def decode() -> object:
        return decode_command(raw)

    def decode_apply() -> object:
        command = decode_command(raw)
        assert not isinstance(command, Rejection)
        return apply(stored, command, ctx)

    def decode_apply_encode() -> object:
        command = decode_command(raw)
        assert not isinstance(command, Rejection)
        outcome = apply(stored, command, ctx)
        assert isinstance(outcome, Applied)
        return encode_session(outcome.session)

    def full_step() -> object:
        command = decode_command(raw)
        assert not isinstance(command, Rejection)
        outcome = apply(stored, command, ctx)
        assert isinstance(outcome, Applied)
        encode_session(outcome.session)
        return [dumps(output_document(event, outcome.session)) for event in outcome.events]

    command = decode_command(raw)
    assert not isinstance(command, Rejection)
    check = apply(stored, command, ctx)
    assert isinstance(check, Applied)
    stored_bytes = encode_session(check.session)

    baseline, baseline_median = measure(lambda: orjson.loads(raw), number)
    print(f"\n{label}: {len(raw)} bytes, {items} cart items")
    print(f"  {'operation':<44}{'min us':>10}{'median us':>11}{'x loads':>9}")
    print(f"  {'orjson.loads (baseline)':<44}{baseline:>10.2f}{baseline_median:>11.2f}{1:>9.1f}")
    for name, func in (
        ("decode_command (parse + validate)", decode),
        ("decode + validate + apply", decode_apply),
        ("decode + apply + encode_session", decode_apply_encode),
        ("decode + apply + encode_session + outputs", full_step),
        ("decode_session (stored form)", lambda: decode_session(stored_bytes)),
        ("encode_session (msgspec, stored form)", lambda: encode_session(check.session)),
        (
            "json.dumps(session_document) (orjson alt.)",
            lambda: dumps(session_document(check.session)),
        ),
    ):
        best, median = measure(func, number)
        print(f"  {name:<44}{best:>10.2f}{median:>11.2f}{best / baseline:>9.1f}")


def processors(sessions: int) -> None:
    """Both stages' processors over the pipeline bench's workload, with dict
    tables: everything the worker does per command except Kafka and RocksDB."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from workload import generate

    from stream_app.pipeline.processor import (
        CommandProcessor,
        PartitionSequenceAllocator,
        ProfileProcessor,
        SourceRecord,
        partition_for,
    )
    from stream_app.settings import TopicNames

    topics = TopicNames()
    records = generate(sessions).records
    partitions = 6
    sources = [
        SourceRecord(topics.commands, partition_for(r.key, partitions), n, 1_764_000_000_000 + n,
                     r.key, r.value)
        for n, r in enumerate(records)
    ]
    per_command = []
    for _ in range(REPEAT_PROCESSORS):  # each over empty tables, as the first run
        stage1 = CommandProcessor(
            topics=topics,
            rekey_topic="rekeyed",
            profile_topic="by-profile",
            sessions={},
            allocator=PartitionSequenceAllocator({}, partitions),
            settings_for=lambda _app: ApplicationSettings(),
            default_application_id=1,
        )
        stage2 = ProfileProcessor(topics=topics, first_sessions={})
        began = time.perf_counter()
        for source in sources:
            for out in stage1.process(source):
                if out.topic == "by-profile":
                    stage2.process(SourceRecord("by-profile", 0, 0, source.timestamp_ms, out.key,
                                                out.value))
        per_command.append((time.perf_counter() - began) / len(sources) * 1e6)
    print(f"\nboth stages' processors, dict tables, the pipeline bench's workload "
          f"({len(sources):,} commands of {sessions:,} sessions): "
          f"{min(per_command):.1f} us per command "
          f"(min of {REPEAT_PROCESSORS} runs; median {statistics.median(per_command):.1f})")
    quix_work(records)


def quix_work(records: list[Any]) -> None:
    """The Quix contender's work (``bench/quix_work.py``) over the same
    commands, its session and its outputs in orjson: what both the Quix and
    the engine contenders of the pipeline bench spend on the session."""
    from quix_work import step

    per_command = []
    for _ in range(REPEAT_PROCESSORS):
        stored: dict[bytes | None, bytes] = {}
        began = time.perf_counter()
        for record in records:
            before = stored.get(record.key)
            session, out = step(orjson.loads(record.value),
                                None if before is None else orjson.loads(before))
            if session is not None:
                stored[record.key] = orjson.dumps(session)
                if out is not None:
                    orjson.dumps(out)
        per_command.append((time.perf_counter() - began) / len(records) * 1e6)
    print(f"the Quix contender's session work (bench/quix_work.py, orjson), the same commands: "
          f"{min(per_command):.1f} us per command "
          f"(min of {REPEAT_PROCESSORS} runs; median {statistics.median(per_command):.1f})")


def main() -> None:
    print(f"python {sys.version.split()[0]}, orjson {orjson.__version__}")
    scenario("typical command", 10, 5000)
    scenario("large cart", 1000, 50)
    processors(20_000)


if __name__ == "__main__":
    main()
