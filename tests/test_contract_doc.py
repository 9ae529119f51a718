"""docs/contract.md stays true: every example in it is run and its outcome checked.

The document marks its examples with HTML comments, each followed by a fenced
block:

* ``<!-- example: {...} -->`` then the command record's value. The JSON in the
  comment gives the ``scenario`` (examples of one scenario run in document
  order against one deployment; scenarios are independent), the expected
  outcome (``expect``: applied, duplicate or rejected, with ``reason`` and
  ``pointer``), the output topics it writes to (``emits``, in order), and
  optionally the record's ``key`` (default: the command's integrationId),
  ``timestamp`` (ms; default: 2026-11-25T10:00:00Z plus one minute per record
  of the scenario), ``topic`` (``rekeyed`` for the internal re-key topic),
  ``tombstone``, ``valueBytes`` (the value is padded with spaces to that
  size), ``fill`` (a pointer whose value is replaced by ``bytes`` characters
  or ``levels`` nested lists), ``rekeyed`` (the record goes through the re-key
  topic first).
* ``<!-- output: {"scenario": ..., "topic": ...} -->`` then a part of the
  record the preceding example wrote to that topic: every field shown must be
  there with that value (a ``"..."`` key stands for the fields left out).
* ``<!-- settings: {"scenario": ..., "applicationId": N} -->`` then an
  application settings document, in force from there on in the scenario.

The deployment is the real per-record pipeline (``CommandProcessor`` and
``ProfileProcessor``) over dict stores, with 6 partitions and the default
limits of a worker whose topics take Kafka's default 1,048,588-byte records.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from stream_app import json
from stream_app.domain import ApplicationSettings, Reason, Rejection, decode_command
from stream_app.domain.decoding import (
    MAX_CART_ITEMS,
    MAX_CART_QUANTITY,
    MAX_COMMAND_DEPTH,
    MAX_IDENTIFIERS,
    MAX_LOYALTY_CARDS,
    MAX_RETURN_ITEMS,
)
from stream_app.domain.model import RECENT_EVENT_IDS
from stream_app.pipeline.processor import (
    MAX_SESSION_ID,
    MAX_TIMESTAMP_MS,
    CommandProcessor,
    Limits,
    Outgoing,
    PartitionSequenceAllocator,
    ProfileProcessor,
    SourceRecord,
    partition_for,
)
from stream_app.settings import Settings, TopicNames

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "contract.md"
COMMAND_SCHEMA = ROOT / "schemas" / "command.schema.json"

PARTITIONS = 6
#: Kafka's default max.message.bytes; the worker keeps a quarter of it.
MAX_MESSAGE_BYTES = 1_048_588
START_MS = 1_795_600_800_000  # 2026-11-25T10:00:00.000Z
MINUTE_MS = 60_000
REKEY_TOPIC = "stream-app-sessions.rekeyed"
PROFILE_TOPIC = "stream-app-sessions.by-profile"
TOPICS = TopicNames()
KIND_OF_TOPIC = {
    getattr(TOPICS, kind): kind for kind in ("closed", "returned", "cancelled", "reopened")
}
KIND_OF_TOPIC[TOPICS.rejected] = "rejected"

_BLOCK = re.compile(
    r"<!--\s*(example|output|settings):\s*(\{.*?\})\s*-->\s*\n```[a-z]*\n(.*?)\n?```",
    re.DOTALL,
)


@dataclass(frozen=True)
class Block:
    kind: str
    meta: dict[str, Any]
    body: str
    line: int

    @property
    def label(self) -> str:
        return f"contract.md:{self.line} ({self.meta.get('scenario')})"


def blocks(text: str | None = None) -> list[Block]:
    text = DOC.read_text(encoding="utf-8") if text is None else text
    return [
        Block(m.group(1), json.loads(m.group(2)), m.group(3), text.count("\n", 0, m.start()) + 1)
        for m in _BLOCK.finditer(text)
    ]


def scenarios() -> dict[str, list[Block]]:
    grouped: dict[str, list[Block]] = defaultdict(list)
    for block in blocks():
        grouped[block.meta["scenario"]].append(block)
    return dict(grouped)


def examples() -> list[Block]:
    return [b for b in blocks() if b.kind == "example"]


# --------------------------------------------------------------------------- the deployment


@dataclass
class Sent:
    """What one example record led to."""

    outcome: str
    outputs: list[tuple[str, bytes | None, dict[str, Any]]]
    rekeyed: bool
    rejection: dict[str, Any] | None = None


@dataclass
class Deployment:
    settings: dict[int, ApplicationSettings] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=lambda: defaultdict(int))

    def __post_init__(self) -> None:
        limits = Limits(max_original_bytes=MAX_MESSAGE_BYTES // 4)
        self.stage1 = CommandProcessor(
            topics=TOPICS,
            rekey_topic=REKEY_TOPIC,
            profile_topic=PROFILE_TOPIC,
            sessions={},
            allocator=PartitionSequenceAllocator({}, PARTITIONS),
            settings_for=lambda app: self.settings.get(app, ApplicationSettings()),
            default_application_id=1,
            limits=limits,
        )
        self.stage2 = ProfileProcessor(topics=TOPICS, first_sessions={}, limits=limits)

    def _record(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        timestamp_ms: int,
        headers: tuple[tuple[str, bytes], ...] = (),
    ) -> SourceRecord:
        partition = partition_for(key or b"", PARTITIONS)
        offset = self.offsets[(topic, partition)]
        self.offsets[(topic, partition)] += 1
        return SourceRecord(topic, partition, offset, timestamp_ms, key, value, headers)

    def send(self, topic: str, key: bytes | None, value: bytes | None, timestamp_ms: int) -> Sent:
        m1, m2 = self.stage1.metrics, self.stage2.metrics
        before = (m1.applied, m1.duplicates, m1.rejected + m2.rejected, m1.rekeyed)
        pending: list[tuple[str, SourceRecord]] = [
            ("stage1", self._record(topic, key, value, timestamp_ms))
        ]
        outputs: list[tuple[str, bytes | None, dict[str, Any]]] = []
        while pending:
            stage, record = pending.pop(0)
            processor = self.stage1 if stage == "stage1" else self.stage2
            for out in processor.process(record):
                pending.extend(self._route(out, timestamp_ms, outputs))
        applied, duplicates, rejected, rekeyed = (
            m1.applied - before[0],
            m1.duplicates - before[1],
            m1.rejected + m2.rejected - before[2],
            m1.rekeyed - before[3],
        )
        rejections = [doc for kind, _, doc in outputs if kind == "rejected"]
        if rejected:
            assert (applied, duplicates, len(rejections)) == (0, 0, 1)
            return Sent("rejected", outputs, bool(rekeyed), rejections[0])
        assert applied + duplicates == 1, (applied, duplicates)
        return Sent("applied" if applied else "duplicate", outputs, bool(rekeyed))

    def _route(
        self,
        out: Outgoing,
        timestamp_ms: int,
        outputs: list[tuple[str, bytes | None, dict[str, Any]]],
    ) -> Iterator[tuple[str, SourceRecord]]:
        if out.topic == REKEY_TOPIC:
            yield "stage1", self._record(out.topic, out.key, out.value, timestamp_ms, out.headers)
        elif out.topic == PROFILE_TOPIC:
            yield "stage2", self._record(out.topic, out.key, out.value, timestamp_ms)
        else:
            outputs.append((KIND_OF_TOPIC[out.topic], out.key, json.loads(out.value)))


# --------------------------------------------------------------------------- examples


def _set_at(doc: Any, pointer: str, value: Any) -> None:
    *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    for token in parents:
        doc = doc[int(token)] if isinstance(doc, list) else doc[token]
    if isinstance(doc, list):
        doc[int(last)] = value
    else:
        doc[last] = value


def record_value(block: Block) -> bytes | None:
    """The bytes an example sends: the block as written, or as the comment says."""
    meta = block.meta
    if meta.get("tombstone"):
        return None
    value = block.body.encode()
    fill = meta.get("fill")
    if fill is not None:
        doc = json.loads(value)
        if "levels" in fill:
            # Deeper than the JSON library writes: spliced in as text.
            _set_at(doc, fill["pointer"], "@DEEP@")
            levels = fill["levels"]
            value = json.dumps(doc).replace(b'"@DEEP@"', b"[" * levels + b"]" * levels)
        else:
            _set_at(doc, fill["pointer"], "x" * fill["bytes"])
            value = json.dumps(doc)
    if "valueBytes" in meta:
        assert len(value) <= meta["valueBytes"], block.label
        value += b" " * (meta["valueBytes"] - len(value))
    return value


def record_key(block: Block, value: bytes | None) -> bytes | None:
    if "key" in block.meta:
        key = block.meta["key"]
        return None if key is None else str(key).encode()
    assert value is not None, f"{block.label}: a tombstone needs a key in its comment"
    return str(json.loads(value)["integrationId"]).encode()


def matches(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where ``actual`` differs from the documented part ``expected``."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path or '/'}: expected an object, got {actual!r}"]
        problems = []
        for name, value in expected.items():
            if name == "...":
                continue
            if name not in actual:
                problems.append(f"{path}/{name}: missing")
            else:
                problems += matches(value, actual[name], f"{path}/{name}")
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: expected {len(expected)} items, got {actual!r}"]
        return [p for i, e in enumerate(expected) for p in matches(e, actual[i], f"{path}/{i}")]
    # 20 and 20.0 differ: the contract promises integers for integral amounts.
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: documented {expected!r}, got {actual!r}"]
    return []


def run_scenario(name: str, steps: list[Block]) -> None:
    deployment = Deployment()
    clock = START_MS
    last: Sent | None = None
    for block in steps:
        meta = block.meta
        if block.kind == "settings":
            doc = json.loads(block.body)
            deployment.settings[meta["applicationId"]] = ApplicationSettings.from_document(doc)
            continue
        if block.kind == "output":
            assert last is not None, f"{block.label}: an output needs an example before it"
            written = [doc for kind, _, doc in last.outputs if kind == meta["topic"]]
            assert len(written) == 1, f"{block.label}: {len(written)} records on {meta['topic']}"
            problems = matches(json.loads(block.body), written[0])
            assert not problems, f"{block.label}: " + "; ".join(problems)
            continue
        value = record_value(block)
        topic = REKEY_TOPIC if meta.get("topic") == "rekeyed" else TOPICS.commands
        timestamp = int(meta.get("timestamp", clock))
        clock += MINUTE_MS
        last = deployment.send(topic, record_key(block, value), value, timestamp)
        check_outcome(block, last)


def check_outcome(block: Block, sent: Sent) -> None:
    meta = block.meta
    got = sent.outcome
    if sent.rejection is not None:
        error = sent.rejection["errors"][0]
        got += f" {sent.rejection['reason']} at {error['source']['pointer']!r} ({error['details']})"
    assert sent.outcome == meta["expect"], f"{block.label}: expected {meta['expect']}, got {got}"
    if meta["expect"] == "rejected":
        assert sent.rejection is not None
        assert sent.rejection["reason"] == meta["reason"], f"{block.label}: got {got}"
        if "pointer" in meta:
            pointer = sent.rejection["errors"][0]["source"]["pointer"]
            assert pointer == meta["pointer"], f"{block.label}: got {got}"
    emitted = [kind for kind, _, _ in sent.outputs if kind != "rejected"]
    assert emitted == meta.get("emits", []), f"{block.label}: emitted {emitted}"
    assert sent.rekeyed == bool(meta.get("rekeyed")), f"{block.label}: re-keyed {sent.rekeyed}"
    for kind, key, doc in sent.outputs:
        if kind != "rejected":
            assert key == str(doc["integrationId"]).encode(), f"{block.label}: key {key!r}"


SCENARIOS = scenarios()


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_documented_scenario(name: str) -> None:
    run_scenario(name, SCENARIOS[name])


# --------------------------------------------------------------------------- the document itself


def test_the_document_has_examples_of_every_outcome() -> None:
    found = examples()
    assert len(found) >= 40
    assert {b.meta["expect"] for b in found} == {"applied", "duplicate", "rejected"}
    outputs = {b.meta["topic"] for b in blocks() if b.kind == "output"}
    assert outputs == {"closed", "returned", "cancelled", "reopened", "rejected"}


def test_every_reason_code_is_documented_and_exemplified() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = set(re.findall(r"^\| `([A-Z_]+)` \|", text, flags=re.MULTILINE))
    assert table == {reason.value for reason in Reason}
    exemplified = {b.meta["reason"] for b in examples() if b.meta["expect"] == "rejected"}
    # Not reachable through the per-record pipeline: a store keyed by
    # (applicationId, integrationId) never holds another application's session,
    # and the other two are faults of the Kafka client and of the worker.
    unreachable = {"APPLICATION_MISMATCH", "INTERNAL_ERROR", "UNREADABLE_RECORD"}
    assert exemplified == {reason.value for reason in Reason} - unreachable


def test_the_limits_table_states_the_code_s_limits() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text.split("<!-- limits -->", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| ([^|]+?) \| ([0-9,]+)\b", section, flags=re.MULTILINE)
    documented = {name.strip(): int(value.replace(",", "")) for name, value in rows}
    limits = Limits()
    settings = Settings()
    assert documented == {
        "cart items per command": MAX_CART_ITEMS,
        "sum of quantities per command, flattening on": MAX_CART_QUANTITY,
        "loyalty cards": MAX_LOYALTY_CARDS,
        "identifiers": MAX_IDENTIFIERS,
        "returned items per return": MAX_RETURN_ITEMS,
        "remembered eventIds per session": RECENT_EVENT_IDS,
        "command size (bytes)": limits.max_command_bytes,
        "stored session size (bytes)": limits.max_session_bytes,
        "original bytes kept in a rejection": MAX_MESSAGE_BYTES // 4,
        "rejection or re-keyed record": limits.max_record_bytes,
        "nesting depth of a command": MAX_COMMAND_DEPTH,
        "session ids in a deployment": MAX_SESSION_ID,
        "record timestamp (ms since the epoch)": MAX_TIMESTAMP_MS,
    }
    assert settings.max_command_bytes == limits.max_command_bytes
    assert settings.max_session_bytes == limits.max_session_bytes


def test_the_documented_topic_names_are_the_defaults() -> None:
    text = DOC.read_text(encoding="utf-8")
    for name in TOPICS.model_dump().values():
        assert f"`{name}`" in text
    assert "`{appId}-sessions.rekeyed`" in text
    assert f"{Settings().app_id}-sessions.rekeyed" == REKEY_TOPIC


def test_examples_agree_with_the_command_schema() -> None:
    """A command the decoder accepts validates against schemas/command.schema.json;
    one it rejects for its shape does not (unless the comment says JSON Schema
    cannot tell, e.g. 2.0 is an integer to JSON Schema)."""
    validator = jsonschema.Draft202012Validator(json.loads(COMMAND_SCHEMA.read_bytes()))
    checked = 0
    for block in examples():
        if block.meta.get("tombstone") or block.meta.get("topic") == "rekeyed":
            continue
        value = record_value(block)
        assert value is not None
        try:
            doc = json.loads(value)
        except json.JSONDecodeError:
            continue
        decoded = decode_command(value)
        if not isinstance(decoded, Rejection):
            errors = [e.message for e in validator.iter_errors(doc)]
            assert not errors, f"{block.label}: the schema refuses a valid command: {errors}"
            checked += 1
        elif decoded.reason is Reason.SCHEMA_VIOLATION and not block.meta.get("schemaCannotTell"):
            assert not validator.is_valid(doc), f"{block.label}: the schema accepts it"
            checked += 1
    assert checked >= 30
