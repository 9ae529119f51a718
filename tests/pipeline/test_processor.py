"""The pipeline's per-record logic with dict tables: no broker, no RocksDB."""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import msgspec
import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_app import json
from stream_app.domain import ApplicationSettings, decode_session
from stream_app.logs import HELD_BACK_WINDOW_S
from stream_app.pipeline import processor as processor_module
from stream_app.pipeline.processor import (
    DECODED_BYTES,
    DECODED_SESSIONS,
    ORIGIN_HEADER,
    CommandProcessor,
    Limits,
    Outgoing,
    PartitionSequenceAllocator,
    ProfileProcessor,
    SessionIdSpaceExhaustedError,
    SourceRecord,
    _content,
    murmur2,
    partition_for,
)
from stream_app.settings import TopicNames

TOPICS = TopicNames()
REKEY = "app-sessions.rekeyed"
PROFILES = "app-sessions.by-profile"


def stage1(partitions: int = 4) -> CommandProcessor:
    return CommandProcessor(
        topics=TOPICS,
        rekey_topic=REKEY,
        profile_topic=PROFILES,
        sessions={},
        allocator=PartitionSequenceAllocator({}, partitions),
        settings_for=lambda _app: ApplicationSettings(),
        default_application_id=1,
    )


def record(
    value: bytes | None,
    key: bytes | None,
    *,
    partition: int | None = None,
    offset: int = 0,
    topic: str = TOPICS.commands,
    headers: tuple[tuple[str, bytes], ...] = (),
) -> SourceRecord:
    """A record on the partition its key hashes to (4 partitions), unless told otherwise."""
    if partition is None:
        partition = partition_for(key or b"", 4)
    return SourceRecord(topic, partition, offset, 1_764_000_000_000 + offset, key, value, headers)


def cmd(iid: str, **fields: Any) -> bytes:
    return json.dumps({"type": "update", "integrationId": iid, **fields})


def test_mis_keyed_command_is_re_keyed_with_its_origin_and_applied_from_there() -> None:
    p = stage1()
    out = p.process(record(cmd("s1", session={"state": "closed"}), b"wrong", partition=2, offset=7))
    assert [(o.topic, o.key) for o in out] == [(REKEY, b"s1")]
    assert p.metrics.rekeyed == 1
    assert p.sessions == {}
    # Read back three days later (lag): the session keeps the time the command
    # was first written, not the re-keyed copy's.
    rekeyed = record(out[0].value, out[0].key, offset=0, topic=REKEY, headers=out[0].headers)
    rekeyed = msgspec.structs.replace(rekeyed, timestamp_ms=rekeyed.timestamp_ms + 3 * 86_400_000)
    closed = p.process(rekeyed)
    assert [o.topic for o in closed] == [TOPICS.closed]
    doc = json.loads(closed[0].value)
    assert doc["eventId"] == f"{TOPICS.commands}-2-7"  # where it first arrived
    assert doc["occurredAt"] == doc["session"]["created"] == "2025-11-24T16:00:00.007Z"
    assert out[0].headers[0][0] == ORIGIN_HEADER


def test_a_huge_mis_keyed_key_is_shown_in_part_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """The re-key line names the key: a 500 KB key made a 500 KB log line."""
    p = stage1()
    with caplog.at_level("INFO", logger="stream_app.pipeline.processor"):
        out = p.process(record(cmd("s1", session={}), b"K" * 500_000, partition=2))
    assert [o.key for o in out] == [b"s1"]
    [line] = [r.getMessage() for r in caplog.records if "re-keying" in r.getMessage()]
    assert "(500000 bytes)" in line
    assert len(line) < 400


def test_re_keyed_commands_are_logged_at_most_once_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A producer that partitions by another hash (librdkafka's default) sends
    most commands to another partition: a line each was thousands a second.
    One line per interval, saying how many more; the metric counts each."""
    p = stage1()
    now = [100.0]
    p.told.clock = lambda: now[0]
    wrong = [n for n in range(100) if partition_for(f"s{n}".encode(), 4) != 2][:30]
    with caplog.at_level("INFO", logger="stream_app.pipeline.processor"):
        for offset, n in enumerate(wrong[:20]):
            p.process(
                record(cmd(f"s{n}", session={}), f"s{n}".encode(), partition=2, offset=offset)
            )
        now[0] += HELD_BACK_WINDOW_S
        p.process(record(cmd("s1", session={}), b"other", partition=2, offset=20))
    lines = [r.getMessage() for r in caplog.records if "re-keying" in r.getMessage()]
    assert p.metrics.rekeyed == 21
    first = f"s{wrong[0]}"
    assert lines == [
        f"{TOPICS.commands}[2]@0: key b'{first}' is integrationId, but Kafka's default "
        f"partitioner (murmur2) puts it on partition {partition_for(first.encode(), 4)}: "
        "the producer partitions by another hash (see the contract, section 1), re-keying",
        f"{TOPICS.commands}[2]@20: key b'other' is not integrationId b's1', re-keying "
        "(19 more re-keyed on this partition since the last such line)",
    ]


def test_rejections_are_logged_at_most_once_per_reason_and_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A producer with a schema bug sends nothing but rejections: a line each
    was thousands a second. The rejection topic holds each, the metrics count
    each; the log says one per reason per interval, and how many more."""
    p = stage1()
    now = [100.0]
    p.metrics.told.clock = lambda: now[0]
    with caplog.at_level("INFO", logger="stream_app.pipeline.processor"):
        for offset in range(30):
            p.process(record(b"not json", b"k", offset=offset))
        p.process(record(cmd("s1", session={"cartItems": "x"}), b"s1", partition=0, offset=30))
        now[0] += HELD_BACK_WINDOW_S
        p.process(record(b"not json", b"k", offset=31))
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert p.metrics.rejections == {"MALFORMED_JSON": 31, "SCHEMA_VIOLATION": 1}
    assert [line.split(": rejected ")[0] for line in lines] == [
        f"{TOPICS.commands}[0]@0",
        f"{TOPICS.commands}[0]@30",
        f"{TOPICS.commands}[0]@31",
    ]
    assert lines[2].endswith("(29 more rejected MALFORMED_JSON since the last such line)")


def test_a_command_whose_key_is_too_large_to_re_key_is_rejected_not_re_keyed() -> None:
    """The re-keyed record's origin header holds the key in base64: an 800 KB
    key would make a record over the limit (and, before, a rejection that
    blamed the command's outputs, counted as re-keyed too)."""
    p = stage1()
    key = b"K" * 800_000
    [out] = p.process(record(cmd("s1", session={}), key, partition=2))
    assert out.topic == TOPICS.rejected
    assert out.key is not None
    assert key.startswith(out.key)
    doc = json.loads(out.value)
    assert doc["reason"] == "LIMIT_EXCEEDED"
    assert doc["message"] == "The command is too large to re-key by its integrationId"
    # The details say which part is large: here the key, not the value.
    assert "(the record's key 800000, its value " in doc["errors"][0]["details"]
    assert doc["errors"][0]["source"]["pointer"] == ""
    assert p.metrics.rekeyed == 0
    assert p.metrics.rejected == 1
    # A key that fits is re-keyed as before.
    [rekeyed] = p.process(record(cmd("s1", session={}), b"K" * 300_000, partition=2))
    assert (rekeyed.topic, rekeyed.key) == (REKEY, b"s1")


def test_the_partition_cache_holds_no_huge_key_and_is_bounded_in_bytes() -> None:
    """Rejections are keyed by the rejected record's key (up to 1 MB): a stream
    of them must not pile up in the cache of partitions."""
    huge = b"h" * 700_000
    assert partition_for(huge, 6) == (aiokafka_murmur2(huge) & 0x7FFFFFFF) % 6
    assert (huge, 6) not in processor_module._PARTITIONS
    for n in range(3000):  # 12 MB of 4 KB keys: over the 8 MB the cache may hold
        key = b"%04d" % n * 1024
        assert partition_for(key, 6) == (aiokafka_murmur2(key) & 0x7FFFFFFF) % 6
    held = sum(len(key) for key, _ in processor_module._PARTITIONS)
    assert held <= 8 * 1024 * 1024


def test_ids_interleave_partitions_and_never_collide() -> None:
    allocator = PartitionSequenceAllocator({}, partitions=3)
    ids = []
    for partition in (0, 1, 2, 0, 1, 2, 0):
        allocator.partition = partition
        ids.append(allocator.next_id())
    assert ids == [1, 2, 3, 4, 5, 6, 7]
    assert len(set(ids)) == len(ids)


def test_id_space_exhaustion_is_an_error_not_a_reused_id() -> None:
    allocator = PartitionSequenceAllocator({b"p0": b"%d" % (2**31 // 2)}, partitions=2)
    with pytest.raises(SessionIdSpaceExhaustedError):
        allocator.next_id()


def test_a_partition_out_of_session_ids_rejects_creations_and_updates_its_sessions() -> None:
    """The error went through the task, which does not restart for it: the
    worker stopped, and so did every worker that took the partition next."""
    p = stage1()
    existing = record(cmd("s1", session={}), b"s1", offset=0)
    [] = p.process(existing)
    p.allocator.counters[b"p%d" % existing.partition] = b"%d" % (2**31 // 4)
    new_id = next(
        i
        for i in (f"s{n}" for n in range(2, 99))
        if partition_for(i.encode(), 4) == existing.partition
    )
    [out] = p.process(record(cmd(new_id, session={}), new_id.encode(), offset=1))
    doc = json.loads(out.value)
    assert (out.topic, doc["reason"]) == (TOPICS.rejected, "LIMIT_EXCEEDED")
    assert doc["errors"][0]["source"]["pointer"] == "/integrationId"
    assert "all that int32 session ids allow with 4 partitions" in doc["errors"][0]["details"]
    [closed] = p.process(record(cmd("s1", session={"state": "closed"}), b"s1", offset=2))
    assert closed.topic == TOPICS.closed


def test_anonymous_outputs_go_straight_downstream_profiled_ones_through_stage_2() -> None:
    p = stage1()
    anon = p.process(record(cmd("a", session={"state": "closed"}), b"a"))
    assert [o.topic for o in anon] == [TOPICS.closed]
    assert json.loads(anon[0].value)["session"]["firstSession"] is True
    profiled = p.process(
        record(cmd("b", session={"profileId": "alice", "state": "closed"}), b"b", offset=1)
    )
    assert [o.topic for o in profiled] == [PROFILES, PROFILES]  # claim, then the close
    assert {o.key for o in profiled} == {b"1\x1falice"}
    # A session whose profile is cleared is anonymous from then on: straight
    # downstream, and a first session.
    p.process(record(cmd("c", session={"profileId": "carol"}), b"c", offset=2))
    cleared = p.process(
        record(cmd("c", session={"profileId": "", "state": "closed"}), b"c", offset=3)
    )
    assert [o.topic for o in cleared] == [TOPICS.closed]
    assert json.loads(cleared[0].value)["session"]["firstSession"] is True


def test_stage_2_marks_only_the_first_claimant_of_a_profile_first() -> None:
    p1 = stage1()
    stage2 = ProfileProcessor(topics=TOPICS, first_sessions={})
    sent: list[Outgoing] = []
    for n, iid in enumerate(("s-1", "s-2")):
        for out in p1.process(
            record(
                cmd(iid, session={"profileId": "bob", "state": "closed"}), iid.encode(), offset=n
            )
        ):
            sent += stage2.process(record(out.value, out.key, topic=PROFILES))
    flags = {
        json.loads(o.value)["integrationId"]: json.loads(o.value)["session"]["firstSession"]
        for o in sent
    }
    assert flags == {"s-1": True, "s-2": False}
    assert all(o.topic == TOPICS.closed for o in sent)


def test_a_session_given_its_profile_late_claims_it_and_may_be_its_first() -> None:
    """Created anonymous, then given a profile no session has claimed: its
    claim is sent when the profile is given, so it is the profile's first
    session; a claim sent only at creation left it false, and the test of
    stage 2 across partitions used a profile with a first session already."""
    p1 = stage1()
    stage2 = ProfileProcessor(topics=TOPICS, first_sessions={})
    sent: list[Outgoing] = []
    commands = [
        ("late", {"profileId": ""}),
        ("late", {"profileId": "dana"}),
        ("later", {"profileId": "dana", "state": "closed"}),
        ("late", {"state": "closed"}),
    ]
    for n, (iid, session) in enumerate(commands):
        for out in p1.process(record(cmd(iid, session=session), iid.encode(), offset=n)):
            assert out.topic == PROFILES
            sent += stage2.process(record(out.value, out.key, topic=PROFILES))
    flags = {
        json.loads(o.value)["integrationId"]: json.loads(o.value)["session"]["firstSession"]
        for o in sent
    }
    assert flags == {"late": True, "later": False}


def test_stage_2_writes_stage_1s_output_with_only_first_session_set() -> None:
    """Stage 2 passes on the output bytes stage 1 wrote, a return included,
    changing nothing but the session's firstSession."""
    p1 = stage1()
    stage2 = ProfileProcessor(topics=TOPICS, first_sessions={})
    item = {"sku": "A", "quantity": 2, "price": 1.5, "attributes": {"firstSession": True}}
    commands = [
        cmd(
            "r-1",
            session={
                "profileId": "carol",
                "attributes": {"firstSession": "no"},
                "cartItems": [item],
                "state": "closed",
            },
        ),
        json.dumps(
            {
                "type": "return",
                "integrationId": "r-1",
                "returnedCartItems": [{"position": 0, "quantity": 1}],
            }
        ),
    ]
    written: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for n, value in enumerate(commands):
        for out in p1.process(record(value, b"r-1", offset=n)):
            envelope = json.loads(out.value)
            for emitted in stage2.process(record(out.value, out.key, topic=PROFILES)):
                written.append((envelope["output"], json.loads(emitted.value)))
    assert [doc["event"] for _, doc in written] == [
        "talon_session_closed",
        "talon_session_partially_returned",
    ]
    for stage1_output, emitted in written:
        assert stage1_output["session"]["firstSession"] is False
        assert emitted == {
            **stage1_output,
            "session": {**stage1_output["session"], "firstSession": True},
        }
    assert written[1][1]["return"]["value"] == 1.5


def _profiled_close() -> tuple[bytes, dict[str, Any]]:
    out = stage1().process(
        record(cmd("f-1", session={"profileId": "dave", "state": "closed"}), b"f-1")
    )[-1]
    assert out.key is not None
    return out.key, json.loads(out.value)


def _with_output(envelope: dict[str, Any], text: str) -> bytes:
    """The envelope with its output replaced by raw JSON text."""
    head = json.dumps({k: v for k, v in envelope.items() if k != "output"})
    return head[:-1] + b',"output":' + text.encode() + b"}"


@pytest.mark.parametrize(
    "damage",
    [
        "invalid UTF-8 in a string stage 2 skips",
        "a firstSession after the session's own",
        "firstSession not a boolean",
        "spaces around firstSession",
        "an unknown field next to the session",
        "a return with an unknown field",
    ],
)
def test_stage_2_rejects_an_output_it_cannot_set_first_session_in(damage: str) -> None:
    key, envelope = _profiled_close()
    text = json.dumps(envelope["output"]).decode()
    tail = '"firstSession":false'
    assert text.count(tail) == 1
    value = {
        "invalid UTF-8 in a string stage 2 skips": None,
        "a firstSession after the session's own": text.replace(
            tail, tail + ',"attributes":{"firstSession":"x"}'
        ),
        "firstSession not a boolean": text.replace(tail, '"firstSession":null'),
        "spaces around firstSession": text.replace(tail, '"firstSession": false'),
        "an unknown field next to the session": text[:-1] + ',"firstSession":false}',
        "a return with an unknown field": text[:-1]
        + ',"return":{"lines":[],"value":0,"firstSession":false}}',
    }[damage]
    raw = (
        _with_output(envelope, text).replace(b'"state":"closed"', b'"state":"\xff"')
        if value is None
        else _with_output(envelope, value)
    )
    stage2 = ProfileProcessor(topics=TOPICS, first_sessions={})
    assert stage2.process(record(_with_output(envelope, text), key, topic=PROFILES))  # intact
    out = stage2.process(record(raw, key, topic=PROFILES))
    assert [o.topic for o in out] == [TOPICS.rejected]
    assert json.loads(out[0].value)["reason"] == "INVALID_INTERNAL_RECORD"


def test_a_re_keyed_copy_refused_on_its_second_pass_names_its_origin() -> None:
    """A lower command limit (or stricter decoding after an upgrade) may refuse
    the re-keyed copy of a command the worker decoded. It stays an
    INVALID_INTERNAL_RECORD at its own position (an origin header may be
    forged), but the details now say why and where it first arrived: before,
    only the reason's code, with the re-key topic's record purged later."""
    p = stage1()
    value = cmd("s1", session={"attributes": {"note": "x" * 2000}})
    out = p.process(record(value, b"wrong", partition=2, offset=7))
    assert [o.topic for o in out] == [REKEY]
    p.limits = Limits(max_command_bytes=1024)
    rekeyed = record(out[0].value, out[0].key, topic=REKEY, headers=out[0].headers)
    (rejection,) = p.process(rekeyed)
    doc = json.loads(rejection.value)
    assert doc["reason"] == "INVALID_INTERNAL_RECORD"
    assert doc["source"]["topic"] == REKEY
    (error,) = doc["errors"]
    assert "LIMIT_EXCEEDED: The command exceeds a limit" in error["details"]
    assert f"its origin header names {TOPICS.commands}[2]@7" in error["details"]


def test_duplicates_and_rejections_are_counted_and_rejections_keep_the_bytes() -> None:
    p = stage1()
    first = p.process(record(cmd("d", eventId="e1", session={"state": "closed"}), b"d"))
    again = p.process(record(cmd("d", eventId="e1", session={"state": "closed"}), b"d", offset=1))
    assert len(first) == 1
    assert again == []
    assert p.metrics.duplicates == 1
    bad = p.process(record(b"\xff", b"d", offset=2))
    assert [o.topic for o in bad] == [TOPICS.rejected]
    assert json.loads(bad[0].value)["source"]["offset"] == 2
    assert p.metrics.rejected == 1


def test_a_session_taken_back_after_processing_is_read_again_as_stored() -> None:
    """The decoded-session cache answers only for the bytes it decoded: when a
    transaction is aborted (or a record's writes undone) the processor sees
    the stored session again, not the one it had computed."""
    p = stage1()
    iid = "cache-1"
    item = {"sku": "A", "quantity": 1, "price": 10}
    p.process(record(cmd(iid, session={"cartItems": [item]}), iid.encode(), offset=1))
    (key,) = p.sessions
    committed = p.sessions[key]
    p.process(
        record(cmd(iid, session={"cartItems": [{**item, "quantity": 5}]}), iid.encode(), offset=2)
    )
    p.sessions[key] = committed  # the overlay dropped the second command's write
    out = p.process(record(cmd(iid, session={"state": "closed"}), iid.encode(), offset=3))
    (closed,) = out
    assert json.loads(closed.value)["session"]["total"] == 10
    assert json.loads(closed.value)["session"]["updateCount"] == 2


def test_the_decoded_session_cache_keeps_the_most_recently_used_sessions() -> None:
    p = stage1()
    item = {"sku": "A", "quantity": 1, "price": 10}
    iids = [f"lru-{n}" for n in range(DECODED_SESSIONS + 3)]
    for offset, iid in enumerate(iids):
        p.process(record(cmd(iid, session={"cartItems": [item]}), iid.encode(), offset=offset))
        if offset == 3:  # the first session, used again: now the most recent
            p.process(record(cmd(iids[0], session={}), iids[0].encode(), offset=10_000))
    cached = [key.split(b"\x1f")[1].decode() for key in p._decoded]
    assert len(cached) == DECODED_SESSIONS
    assert cached[-1] == iids[-1]
    assert iids[0] in cached  # used again, so kept
    assert not {iids[1], iids[2], iids[3]} & set(cached)  # the least recently used
    assert iids[4] in cached


def test_the_decoded_session_cache_is_bounded_in_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded by count alone, 512 carts of 400 lines held about 170 MiB per
    partition (a worker's six: past a pod's memory limit, again after each
    restart). The sessions kept come to at most DECODED_BYTES stored bytes;
    one larger than that is not kept at all."""
    p = stage1()
    lines = [{"sku": f"SKU-{n:04d}", "quantity": 1, "price": 10} for n in range(150)]
    stored_size = 0
    for offset in range(160):
        iid = f"big-{offset}"
        p.process(record(cmd(iid, session={"cartItems": lines}), iid.encode(), offset=offset))
        stored_size = max(stored_size, *(len(v) for v in p.sessions.values()))
        held = sum(len(stored) for stored, _ in p._decoded.values())
        assert held <= DECODED_BYTES
    assert stored_size > DECODED_BYTES // 160  # 160 would not fit
    assert 0 < len(p._decoded) < 160
    assert p._decoded_bytes == sum(len(stored) for stored, _ in p._decoded.values())
    # A session past the whole budget (a lower one here: the session limit
    # keeps them under the real one) is decoded from its stored form each time.
    monkeypatch.setattr(processor_module, "DECODED_BYTES", 50_000)
    huge = [{"sku": f"SKU-{n:04d}-{'x' * 60}", "quantity": 1, "price": 10} for n in range(1000)]
    p.process(record(cmd("huge", session={"cartItems": huge}), b"huge", offset=200))
    assert max(len(v) for v in p.sessions.values()) > 50_000
    assert not any(key.endswith(b"huge") for key in p._decoded)
    out = p.process(record(cmd("huge", session={"state": "closed"}), b"huge", offset=201))
    assert json.loads(out[0].value)["session"]["total"] == 10000


def test_a_few_hundred_sessions_in_flight_are_all_kept_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Round-robin updates of 300 sessions of 30 lines (about 2 KB stored
    each) missed the cache every time at a 512 KiB budget: 33 instead of
    15 us per command. And a session of 100 KB, well inside the session
    limit, was never kept."""
    p = stage1()
    lines = [{"sku": f"SKU-{n:04d}", "quantity": 1, "price": 10} for n in range(30)]
    iids = [f"rr-{n}" for n in range(300)]
    for offset, iid in enumerate(iids):
        p.process(record(cmd(iid, session={"cartItems": lines}), iid.encode(), offset=offset))
    decoded = []
    real = processor_module.decode_session

    def counting(stored: bytes) -> Any:
        decoded.append(len(stored))
        return real(stored)

    monkeypatch.setattr(processor_module, "decode_session", counting)
    for offset, iid in enumerate(iids * 2, start=1000):
        p.process(record(cmd(iid, session={"state": "open"}), iid.encode(), offset=offset))
    assert decoded == []
    big = [{"sku": f"SKU-{n:04d}-{'x' * 60}", "quantity": 1, "price": 10} for n in range(1000)]
    p.process(record(cmd("big", session={"cartItems": big}), b"big", offset=5000))
    p.process(record(cmd("big", session={"state": "open"}), b"big", offset=5001))
    assert decoded == []


@settings(deadline=None)  # a loaded machine stalls any example
@given(st.binary(max_size=64))
def test_murmur2_is_aiokafkas(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key) & 0xFFFFFFFF


@pytest.mark.parametrize(
    ("key", "java"),
    [  # Kafka's UtilsTest.testMurmur2: the Java client's signed 32-bit values
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_is_the_java_clients(key: bytes, java: int) -> None:
    assert murmur2(key) == java & 0xFFFFFFFF
    assert partition_for(key, 6) == (java & 0x7FFFFFFF) % 6


class _AtItsLimit:
    """A processor whose one session, c1, is as large as its limit takes."""

    def __init__(self) -> None:
        limits = Limits(max_session_bytes=4096, bookkeeping_bytes=1024)
        self.processor = dataclasses.replace(stage1(), limits=limits)
        self.offset = 0
        cart = [{"sku": "a", "quantity": 2, "price": 1}]
        for n in range(4096, 0, -1):
            if (
                self.reason(cmd("c1", session={"cartItems": cart, "attributes": {"n": "x" * n}}))
                is None
            ):
                break
        [stored] = self.processor.sessions.values()
        assert 4096 - 50 < len(stored) <= 4096

    def reason(self, value: bytes) -> str | None:
        """The rejection's reason, None when applied."""
        self.offset += 1
        out = self.processor.process(record(value, b"c1", offset=self.offset))
        return json.loads(out[0].value).get("reason") if out else None


#: Commands that change no content of c1, only what is recorded of it.
_CLOSE_REOPEN_RETURN_CANCEL: Final = (
    cmd("c1", eventId="e1", session={"state": "closed"}),
    json.dumps({"type": "reopen", "integrationId": "c1", "eventId": "e2"}),
    cmd("c1", eventId="e3", session={"state": "closed"}),
    json.dumps(
        {
            "type": "return",
            "integrationId": "c1",
            "eventId": "e4",
            "returnedCartItems": [{"position": 0, "quantity": 1}],
        }
    ),
    cmd("c1", eventId="e5", session={"state": "cancelled"}),
)


def test_a_session_at_its_size_limit_can_still_be_returned_cancelled_and_reopened() -> None:
    """Each of these adds to the stored session (an eventId remembered, a
    returned quantity), and each was rejected with LIMIT_EXCEEDED: a closed
    session at its limit could never be returned, cancelled or reopened."""
    session = _AtItsLimit()
    assert [session.reason(value) for value in _CLOSE_REOPEN_RETURN_CANCEL] == [None] * 5


def test_past_its_size_limit_a_session_takes_no_content_and_bounded_bookkeeping() -> None:
    session = _AtItsLimit()
    assert session.reason(cmd("c1", session={"attributes": {"m": "y" * 50}})) == "LIMIT_EXCEEDED"
    # eventIds of 255 characters: the 1,024 bytes past the limit take three
    reasons = [
        session.reason(cmd("c1", eventId=f"{n:0255d}", session={"state": "open"})) for n in range(6)
    ]
    assert reasons == [None] * 3 + ["LIMIT_EXCEEDED"] * 3


def test_a_session_stored_under_a_higher_limit_can_still_be_returned_and_cancelled() -> None:
    """An operator lowered the session limit: the allowance was counted from
    the lowered limit, so a closed session stored past it under the old one
    was refused every return, cancel and reopen for good, its revenue never
    corrected. Counted from its content now, up to a third of the record
    limit (``max_stored_bytes``); no content is taken."""
    session = _AtItsLimit()
    lowered = Limits(max_session_bytes=2048, bookkeeping_bytes=512, max_stored_bytes=4096 + 1536)
    session.processor = dataclasses.replace(session.processor, limits=lowered)
    assert [session.reason(value) for value in _CLOSE_REOPEN_RETURN_CANCEL] == [None] * 5
    [stored] = session.processor.sessions.values()
    assert decode_session(stored).state == "cancelled"
    # No content past the lowered limit; bookkeeping up to max_stored_bytes.
    other = _AtItsLimit()
    other.processor = dataclasses.replace(other.processor, limits=lowered)
    assert other.reason(cmd("c1", session={"attributes": {"m": "y"}})) == "LIMIT_EXCEEDED"
    reasons = [
        other.reason(cmd("c1", eventId=f"{n:0255d}", session={"state": "open"})) for n in range(8)
    ]
    # 512 bytes past the content (just under 4,096) take one such eventId.
    assert reasons == [None] + ["LIMIT_EXCEEDED"] * 7
    capped = _AtItsLimit()
    capped.processor = dataclasses.replace(
        capped.processor, limits=dataclasses.replace(lowered, max_stored_bytes=4096)
    )
    assert capped.reason(cmd("c1", eventId="9" * 255, session={"state": "open"})) == (
        "LIMIT_EXCEEDED"
    )


def test_with_the_limit_never_lowered_returned_quantities_take_no_more_allowance() -> None:
    """Returned quantities are recorded, not content: counted as content, the
    returns of a session at its limit raised its allowance past limit +
    bookkeeping_bytes with no limit ever lowered. The same commands are judged
    the same whatever ``max_stored_bytes`` allows."""
    assert _returns_accepted(4096 + 1024) == _returns_accepted(16_384) > 0


def _returns_accepted(max_stored_bytes: int) -> int:
    """How many one-line returns with long eventIds a closed session at its
    limit of 4,096 bytes takes, 10 of its 40 lines of huge quantities returned."""
    limits = Limits(
        max_session_bytes=4096, bookkeeping_bytes=1024, max_stored_bytes=max_stored_bytes
    )
    p = dataclasses.replace(
        stage1(), limits=limits, settings_for=lambda _app: ApplicationSettings(flattening=False)
    )
    offsets = iter(range(1, 10_000))

    def reason(value: bytes) -> str | None:
        out = p.process(record(value, b"c1", offset=next(offsets)))
        return json.loads(out[0].value).get("reason") if out else None

    def returned(event_id: str, *positions: int) -> bytes:
        lines = [{"position": n} for n in positions]
        return json.dumps(
            {
                "type": "return",
                "integrationId": "c1",
                "eventId": event_id,
                "returnedCartItems": lines,
            }
        )

    cart = [{"sku": f"s{n}", "quantity": 2**63 - 2, "price": 0} for n in range(40)]
    assert reason(cmd("c1", session={"cartItems": cart})) is None
    for n in range(4096, 0, -8):  # the largest padding taken: the session at its limit
        if reason(cmd("c1", session={"attributes": {"n": "x" * n}})) is None:
            break
    assert reason(cmd("c1", eventId="e0", session={"state": "closed"})) is None
    assert reason(returned("r", *range(10))) is None
    [stored] = p.sessions.values()
    assert len(_content(decode_session(stored))) > 4096  # returned quantities counted in
    reasons = [reason(returned(f"{n:064d}", 10 + n)) for n in range(30)]
    return reasons.count(None)


@pytest.mark.parametrize("state", ["closed", "partially_returned"])
def test_a_cancel_that_re_sends_the_session_at_its_limit_is_applied(state: str) -> None:
    """Many integrations send the whole session with its new state. On a
    closed or partially returned session the other fields are ignored, so the
    stored session is the same as with the state alone; yet such a cancel was
    refused at the limit while the one with the state alone was applied."""
    session = _AtItsLimit()
    assert session.reason(cmd("c1", eventId="e1", session={"state": "closed"})) is None
    if state == "partially_returned":
        returned = {
            "type": "return",
            "integrationId": "c1",
            "eventId": "e2",
            "returnedCartItems": [{"position": 0, "quantity": 1}],
        }
        assert session.reason(json.dumps(returned)) is None
    whole = {"state": "cancelled", "couponCodes": ["X"], "attributes": {"m": "y" * 50}}
    assert session.reason(cmd("c1", eventId="e3", session=whole)) is None
    [stored] = session.processor.sessions.values()
    assert decode_session(stored).state == "cancelled"
    # An open session's content grows with what it is sent: no allowance then.
    other = _AtItsLimit()
    assert other.reason(cmd("c1", eventId="e1", session=whole)) == "LIMIT_EXCEEDED"


@pytest.mark.parametrize("state", ["closed", "cancelled"])
def test_an_open_session_at_its_limit_closed_by_re_sending_it_whole_is_applied(state: str) -> None:
    """A close or cancel re-sending the session as it is changes its state
    alone, as one with the state alone; yet it was refused at the limit,
    while the one with the state alone was applied."""
    session = _AtItsLimit()
    [stored] = session.processor.sessions.values()
    n = len(decode_session(stored).attributes["n"])
    cart = [{"sku": "a", "quantity": 2, "price": 1}]
    whole = {"state": state, "cartItems": cart, "attributes": {"n": "x" * n}}
    assert session.reason(cmd("c1", eventId="e1", session=whole)) is None
    [stored] = session.processor.sessions.values()
    assert decode_session(stored).state == state
    # The same with any content changed takes no allowance: a price equal to
    # Python but stored otherwise (1.0 for 1) is a change too, and so is a
    # re-send that does not end the session.
    for changed in (
        {**whole, "cartItems": [{"sku": "a", "quantity": 3, "price": 1}]},
        {**whole, "cartItems": [{"sku": "a", "quantity": 2, "price": 1.0}]},
        {key: value for key, value in whole.items() if key != "state"},
    ):
        other = _AtItsLimit()
        assert other.reason(cmd("c1", eventId="e1", session=changed)) == "LIMIT_EXCEEDED"


def test_a_creation_refused_for_its_size_takes_no_session_id() -> None:
    """The refused creation moved the partition's counter on: the next session
    got id 11 instead of 5 (with 4 partitions), and each refusal shrank the
    ids the partition has left."""
    p = dataclasses.replace(stage1(), limits=Limits(max_session_bytes=2048))
    key = b"big"
    refused = p.process(record(cmd("big", session={"attributes": {"n": "x" * 4000}}), key))
    assert json.loads(refused[0].value)["reason"] == "LIMIT_EXCEEDED"
    assert p.process(record(cmd("big", session={}), key, offset=1)) == []
    [stored] = p.sessions.values()
    partition = partition_for(key, 4)
    assert decode_session(stored).id == partition + 1  # the partition's first id
