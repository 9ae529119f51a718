"""The demo's traffic generator, without a broker: deterministic, keyed and
ordered as promised, and its expectations agree with the domain core."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import Counter, defaultdict
from itertools import count, pairwise
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, LeaderNotAvailableError

from stream_app import json
from stream_app.demo.traffic import (
    MAX_PREFIX,
    OUTPUT_KINDS,
    Expect,
    Traffic,
    TrafficRecord,
    generate,
    generate_traffic,
    produce_traffic,
)
from stream_app.domain import (
    ApplicationSettings,
    Applied,
    CommandContext,
    Duplicate,
    EventName,
    Reason,
    Rejected,
    Rejection,
    Session,
    apply,
    decode_command,
)
from stream_app.settings import Settings

_TOPIC_OF = {
    EventName.CLOSED: "closed",
    EventName.PARTIALLY_RETURNED: "returned",
    EventName.CANCELLED: "cancelled",
    EventName.REVOKED: "cancelled",
    EventName.REOPENED: "reopened",
}
_DECODE_REJECTED = {"malformed_json", "wrong_type", "coupon_too_long"}


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return generate_traffic(300, seed=42)


def _event_id(record: TrafficRecord) -> str | None:
    try:
        doc = json.loads(record.value)
    except json.JSONDecodeError:
        return None
    event_id = doc.get("eventId")
    return event_id if isinstance(event_id, str) else None


def test_same_seed_same_records() -> None:
    assert generate(120, seed=7) == generate(120, seed=7)
    assert generate_traffic(120, seed=7).summary == generate_traffic(120, seed=7).summary


def test_other_seed_other_records() -> None:
    assert generate(120, seed=7) != generate(120, seed=8)


def test_a_prefix_gives_the_same_records_for_other_sessions_and_profiles() -> None:
    """A second run with a prefix touches none of the first run's sessions or
    profiles, and a correct processor makes of it what it made of the first."""
    plain = generate_traffic(120, seed=7)
    prefixed = generate_traffic(120, seed=7, prefix="run2-")
    assert prefixed.summary.expected == plain.summary.expected
    assert "ids prefixed 'run2-'" in prefixed.summary.describe()
    assert "prefixed" not in plain.summary.describe()
    assert len(prefixed.records) == len(plain.records)
    for before, after in zip(plain.records, prefixed.records, strict=True):
        assert after.integration_id == "run2-" + before.integration_id
        assert after.key == (None if before.key is None else b"run2-" + before.key)
        assert (after.kind, after.expect, after.outputs) == (
            before.kind,
            before.expect,
            before.outputs,
        )
        if before.kind == "malformed_json":
            continue
        doc = json.loads(after.value)
        assert doc["integrationId"].startswith("run2-cart-")
        profile = doc.get("session", {}).get("profileId")
        assert profile is None or profile.startswith("run2-customer-")
        event_id = doc.get("eventId")
        assert event_id is None or event_id.startswith("run2-cart-")


def test_a_prefix_longer_than_the_ids_allow_room_for_is_refused() -> None:
    generate(3, seed=1, prefix="p" * MAX_PREFIX)
    with pytest.raises(ValueError, match=f"at most {MAX_PREFIX}"):
        generate(3, seed=1, prefix="p" * (MAX_PREFIX + 1))


def test_generate_is_the_pairs_of_the_records(traffic: Traffic) -> None:
    assert generate(300, seed=42) == [(r.key, r.value) for r in traffic.records]


def test_sessions_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        generate(0, seed=1)


@pytest.mark.parametrize("sessions", [1, 2, 3, 10])
def test_tiny_traffic_still_works(sessions: int) -> None:
    traffic = generate_traffic(sessions, seed=3)
    assert traffic.records
    assert traffic.summary.sessions == sessions


def test_keys_are_the_integration_id_except_the_deliberately_mis_keyed(
    traffic: Traffic,
) -> None:
    mis_keyed = [r for r in traffic.records if r.mis_keyed]
    assert mis_keyed, "the traffic must hold mis-keyed records"
    assert all(r.kind == "mis_keyed" for r in mis_keyed)
    assert any(r.key is None for r in mis_keyed)
    for record in traffic.records:
        if record.kind == "malformed_json":
            assert record.key == record.integration_id.encode()
            continue
        doc = json.loads(record.value)
        assert doc["integrationId"] == record.integration_id
        if record.kind != "mis_keyed":
            assert record.key == doc["integrationId"].encode()
    # A mis-keyed record is a session's only record, so re-keying cannot reorder it.
    per_session = Counter(r.integration_id for r in traffic.records)
    assert all(per_session[r.integration_id] == 1 for r in mis_keyed)


def test_valid_commands_decode_and_bad_ones_are_rejected(traffic: Traffic) -> None:
    for record in traffic.records:
        decoded = decode_command(record.value)
        if record.kind in _DECODE_REJECTED:
            assert isinstance(decoded, Rejection), record
        else:
            assert not isinstance(decoded, Rejection), (record, decoded)
            assert decoded.integration_id == record.integration_id


def test_bad_records_carry_the_reasons_they_are_meant_to(traffic: Traffic) -> None:
    reasons: dict[str, set[tuple[Reason, str]]] = defaultdict(set)
    for record in traffic.records:
        decoded = decode_command(record.value)
        if isinstance(decoded, Rejection):
            reasons[record.kind].add((decoded.reason, decoded.errors[0].pointer))
    assert {reason for reason, _ in reasons["malformed_json"]} == {Reason.MALFORMED_JSON}
    assert all(
        reason is Reason.SCHEMA_VIOLATION and pointer.endswith("/quantity")
        for reason, pointer in reasons["wrong_type"]
    )
    assert all(
        reason is Reason.LIMIT_EXCEEDED and pointer.startswith("/session/couponCodes/")
        for reason, pointer in reasons["coupon_too_long"]
    )
    kinds = Counter(r.kind for r in traffic.records)
    for kind in (*_DECODE_REJECTED, "unknown_session", "update_closed", "reopen_open"):
        assert kinds[kind] >= 1, kind
    assert kinds["duplicate"] >= 1


def test_most_commands_have_an_event_id_and_a_few_do_not(traffic: Traffic) -> None:
    valid = [r for r in traffic.records if r.kind not in _DECODE_REJECTED]
    without = [r for r in valid if _event_id(r) is None]
    assert without
    assert len(without) < len(valid) * 0.1
    # Duplicates are resends of the same bytes, so they carry the same eventId.
    assert all(_event_id(r) for r in traffic.records if r.kind == "duplicate")


def test_per_session_order_is_kept(traffic: Traffic) -> None:
    """Each session's eventIds appear in the order they were issued, and its
    records follow its life: created first, closes before returns and reopens."""
    seen: dict[str, list[TrafficRecord]] = defaultdict(list)
    for record in traffic.records:
        seen[record.integration_id].append(record)
    for integration_id, records in seen.items():
        valid = [r for r in records if r.kind not in _DECODE_REJECTED]
        kinds = [r.kind for r in valid if r.kind != "duplicate"]
        if kinds[0] == "unknown_session":
            assert kinds == ["unknown_session"]
            continue
        assert kinds[0] in {"update", "instant", "mis_keyed"}, integration_id
        if "return" in kinds:
            assert kinds.index("close") < kinds.index("return")
        if "reopen" in kinds:
            assert kinds.index("close") < kinds.index("reopen") < len(kinds) - 1
        numbers = [int(e.rsplit("-", 1)[1]) for r in valid if (e := _event_id(r))]
        assert numbers == sorted(numbers), integration_id


def test_interleaved_like_real_traffic(traffic: Traffic) -> None:
    """Sessions overlap in time: the records of one are not all adjacent."""
    ids = [r.integration_id for r in traffic.records]
    switches = sum(1 for a, b in pairwise(ids) if a != b)
    assert switches > len(ids) * 0.7


def test_profiles_are_shared_and_some_sessions_are_anonymous(traffic: Traffic) -> None:
    summary = traffic.summary
    assert summary.repeat_profiles > 0
    assert summary.anonymous_sessions > 0
    assert summary.profile_sessions + summary.anonymous_sessions == summary.sessions


class _Ids:
    def __init__(self) -> None:
        self._next = count(1)

    def next_id(self) -> int:
        return next(self._next)


@pytest.mark.parametrize(
    ("sessions", "seed", "prefix"),
    [(300, 42, ""), (57, 1, ""), (1000, 9, ""), (5, 2, ""), (300, 42, "x" * MAX_PREFIX)],
)
def test_expectations_agree_with_the_domain_core(sessions: int, seed: int, prefix: str) -> None:
    """Replaying the records through decode + apply (re-keyed records go to
    their integrationId, as the pipeline does) gives exactly the expected
    outcome of every record and the summary's output counts."""
    traffic = generate_traffic(sessions, seed, prefix)
    stored: dict[str, Session] = {}
    ids = _Ids()
    outputs: Counter[str] = Counter(dict.fromkeys(OUTPUT_KINDS, 0))
    for offset, record in enumerate(traffic.records):
        command = decode_command(record.value)
        if isinstance(command, Rejection):
            outcome: object = Rejected(command)
        else:
            ctx = CommandContext(
                timestamp_ms=1_700_000_000_000 + offset,
                source_event_id=f"sessions.commands-0@{offset}",
                application_id=command.application_id or 1,
                settings=ApplicationSettings(),
                ids=ids,
            )
            outcome = apply(stored.get(command.integration_id), command, ctx)
        produced: tuple[str, ...]
        if isinstance(outcome, Applied):
            stored[outcome.session.integration_id] = outcome.session
            produced = tuple(_TOPIC_OF[e.name] for e in outcome.events if e.name in _TOPIC_OF)
            assert record.expect is Expect.APPLIED, (record, produced)
        elif isinstance(outcome, Duplicate):
            produced = ()
            assert record.expect is Expect.DUPLICATE, record
        else:
            assert isinstance(outcome, Rejected)
            produced = ("rejected",)
            assert record.expect is Expect.REJECTED, (record, outcome.rejection)
        assert produced == record.outputs, record
        outputs.update(produced)
    assert dict(outputs) == dict(traffic.summary.expected)
    if sessions >= 50:
        assert all(outputs[kind] > 0 for kind in OUTPUT_KINDS)


class _OutageProducer:
    """A broker outage: sends queue until the buffer's wait times out, then
    every queued send fails too, as the producer gives up on them."""

    def __init__(self, **_: object) -> None:
        self.queued: list[asyncio.Future[Any]] = []

    async def start(self) -> None:
        pass

    async def send(self, topic: str, value: bytes, key: bytes | None) -> asyncio.Future[Any]:
        if len(self.queued) == 10:
            raise KafkaTimeoutError
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queued.append(future)
        return future

    async def stop(self) -> None:
        for future in self.queued:
            future.set_exception(LeaderNotAvailableError())
        await asyncio.sleep(0)


def test_a_failed_run_reports_one_error_not_one_per_send_in_flight(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def no_topics(settings: Settings) -> None:
        pass

    monkeypatch.setattr("aiokafka.AIOKafkaProducer", _OutageProducer)
    monkeypatch.setattr("stream_app.pipeline.topics.ensure_topics", no_topics)
    failed = False
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        try:
            asyncio.run(produce_traffic(Settings(), sessions=20, seed=1))
        except KafkaTimeoutError:
            failed = True  # no traceback kept: it would keep the failed sends alive
        gc.collect()
    assert failed
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


class _SilentProducer(_OutageProducer):
    """A broker gone after the producer connected: aiokafka's idempotent
    producer retries every batch for as long as the outage lasts, and its
    stop waits for them."""

    async def send(self, topic: str, value: bytes, key: bytes | None) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()  # never acknowledged

    async def stop(self) -> None:
        await asyncio.Event().wait()


def test_records_kafka_never_acknowledges_fail_the_run_rather_than_hang_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, `stream-app traffic` waited out an outage that began after it
    connected, and then its producer's stop did."""

    async def no_topics(settings: Settings) -> None:
        pass

    monkeypatch.setattr("aiokafka.AIOKafkaProducer", _SilentProducer)
    monkeypatch.setattr("stream_app.pipeline.topics.ensure_topics", no_topics)
    monkeypatch.setattr("stream_app.client.DELIVERY_TIMEOUT_S", 0.2)
    with pytest.raises(KafkaTimeoutError, match=r"did not acknowledge \d+ of \d+ records"):
        asyncio.run(asyncio.wait_for(produce_traffic(Settings(), sessions=5, seed=1), 20))
