"""Hostile input (issue 11), thrown at one running worker on the real broker.

Every case of the issue is a regression test here, and each one checks three
things after its hostile records were produced:

(a) the worker process is still alive;
(b) a canary command sent after the hostile records, through the same
    partitions they went through (the command topic, or the re-key or
    by-profile topic), still comes out;
(c) each hostile record is accounted for: on the rejection topic, matched by
    its own position (topic, partition, offset), with the asserted reason and
    its exact bytes (``keyBase64``/``valueBase64`` decoded and compared; past
    the cap: the prefix, ``valueLength``, ``valueSha256``, ``valueTruncated``),
    keyed by its original key; or, where the contract says so, applied (its
    output is there, or the session shows its effect).

The cases share one worker (a module-scoped deployment) but never a session:
each case has its own integrationIds and its own canaries, and rejections are
matched by position, so no case can mask another. A property-based fuzz test
(hypothesis) then sends generated malformed, deeply nested, huge and
unicode-edge records with random keys and headers, and accounts for every one
of them (``HOSTILE_FUZZ_SEED`` replays a run). The unreadable-header case runs
after it, as a worker that fails it is gone for the tests behind it. The last
test restarts the worker on its state: nothing seen here may make it fail on
restart (the issue's poison loops).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import os
import random
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from stream_app import json
from stream_app.pipeline.processor import ORIGIN_HEADER, partition_for, profile_key
from stream_app.pipeline.topics import profile_topic, rekey_topic
from tests.integration.harness import (
    Deployment,
    Output,
    Sent,
    ToSend,
    Worker,
    command,
    consume_until,
    create_topics,
    deployment_settings,
    produce_raw_batch,
    produce_tracked,
    topic_configs,
)
from tests.pipeline.record_batches import GZIP, BatchRecord, recrc

pytestmark = pytest.mark.timeout(240)

PARTITIONS = 3
APPLICATION_ID = 1  # the worker's default application
#: How long a case waits for its canaries and its hostile records' outcomes.
WAIT_S = 60.0
MONEY_FIELDS = ("total", "cartItemTotal", "additionalCostTotal", "cartItemAdditionalCostTotal")


# --------------------------------------------------------------------------- the live worker


class Seen:
    """What came out so far, indexed: rejections by the position of the record
    they reject, downstream outputs by integrationId."""

    def __init__(self, live: Live) -> None:
        self._live = live
        self._done = 0
        self.outputs: list[Output] = []
        self.rejections: dict[tuple[str, int, int], list[tuple[Output, dict[str, Any]]]] = (
            defaultdict(list)
        )
        self.emitted: dict[str, list[tuple[Output, dict[str, Any]]]] = defaultdict(list)
        self.settings_records: list[Output] = []

    def update(self, outputs: list[Output]) -> None:
        t = self._live.d.topics
        for out in outputs[self._done :]:
            self.outputs.append(out)
            if out.topic == t.application_settings:
                self.settings_records.append(out)
                continue
            doc = out.doc()
            if out.topic == t.rejected:
                s = doc["source"]
                self.rejections[s["topic"], s["partition"], s["offset"]].append((out, doc))
            else:
                self.emitted[doc["integrationId"]].append((out, doc))
        self._done = len(outputs)

    def rejection(self, sent: Sent) -> dict[str, Any] | None:
        found = self.rejections.get(sent.position)
        return found[0][1] if found else None

    def closed(self, iid: str) -> list[dict[str, Any]]:
        closed_topic = self._live.d.topics.closed
        return [doc for out, doc in self.emitted.get(iid, []) if out.topic == closed_topic]

    def has_closed(self, *iids: str) -> bool:
        return all(self.closed(i) for i in iids)

    def has_rejections(self, *sent: Sent) -> bool:
        return all(s.position in self.rejections for s in sent)


@dataclass
class Live:
    """The module's deployment and its one worker."""

    d: Deployment
    worker: Worker
    log_path: Path
    #: How many bytes of the original value a rejection keeps.
    cap: int
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    _ids: Iterator[int] = field(default_factory=itertools.count)

    @property
    def commands(self) -> str:
        return self.d.topics.commands

    @property
    def rekeyed(self) -> str:
        return rekey_topic(deployment_settings(self.d))

    @property
    def by_profile(self) -> str:
        return profile_topic(deployment_settings(self.d))

    def iid(self, label: str, partition: int | None = None) -> str:
        """A fresh integrationId, whose key hashes to ``partition`` when given."""
        while True:
            candidate = f"{label}-{self.token}-{next(self._ids)}"
            if partition is None or partition_for(candidate.encode(), PARTITIONS) == partition:
                return candidate

    def profile(self, label: str, partition: int) -> str:
        """A fresh profileId whose by-profile key hashes to ``partition``."""
        while True:
            candidate = f"{label}-{self.token}-{next(self._ids)}"
            key = profile_key(APPLICATION_ID, candidate)
            if partition_for(key, PARTITIONS) == partition:
                return candidate

    async def send(self, topic: str, records: list[ToSend]) -> list[Sent]:
        return await produce_tracked(self.d.bootstrap, topic, records)

    async def canaries(
        self,
        direct: tuple[int, ...] = (),
        rekeyed: tuple[int, ...] = (),
        profiled: tuple[int, ...] = (),
    ) -> list[str]:
        """Valid closes sent after the hostile records: ``direct`` through those
        command partitions, ``rekeyed`` through those partitions of the re-key
        topic (sent with a wrong key), ``profiled`` through those partitions of
        the by-profile topic. Returns their integrationIds."""
        records: list[ToSend] = []
        iids: list[str] = []
        for p in direct:
            iid = self.iid("canary", p)
            records.append(ToSend(iid.encode(), close(iid), p))
            iids.append(iid)
        for p in rekeyed:
            iid = self.iid("canary-rekeyed", p)
            records.append(ToSend(b"not-" + iid.encode(), close(iid), (p + 1) % PARTITIONS))
            iids.append(iid)
        for p in profiled:
            iid = self.iid("canary-profiled")
            records.append(
                ToSend(iid.encode(), close(iid, profileId=self.profile("canary", p)), None)
            )
            iids.append(iid)
        await self.send(self.commands, records)
        return iids

    async def until(self, done: Callable[[Seen], bool], timeout: float = WAIT_S) -> Seen:  # noqa: ASYNC109
        """Read every output from the beginning until ``done`` holds (or the
        timeout: the caller's assertions then say what is missing)."""
        seen = Seen(self)
        t = self.d.topics

        def check(outputs: list[Output]) -> bool:
            seen.update(outputs)
            return done(seen)

        await consume_until(
            self.d.bootstrap,
            [*self.d.output_topics(), t.application_settings],
            check,
            timeout=timeout,
        )
        return seen

    async def settle(
        self,
        canaries: list[str],
        done: Callable[[Seen], bool],
        *,
        grace: float = 15.0,
        timeout: float = WAIT_S,  # noqa: ASYNC109
    ) -> Seen:
        """Like :meth:`until`, but once the ``canaries`` are out, wait at most
        ``grace`` seconds more for ``done`` (what was sent before a canary on its
        partitions is decided by then), and stop at once if the worker died."""
        canaries_out: list[float] = []

        def check(seen: Seen) -> bool:
            if not self.worker.running or done(seen):
                return True
            if not canaries_out and seen.has_closed(*canaries):
                canaries_out.append(time.monotonic())
            return bool(canaries_out) and time.monotonic() - canaries_out[0] > grace

        return await self.until(check, timeout)

    async def open_sessions(self, keys: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """Those of ``keys`` (integrationId, applicationId) whose session the
        worker holds, open, from its session query, each with its
        ``updateCount`` (how many commands were applied to it). (A closed one
        is held too, for later returns: it is not counted, since its close
        should have come out.)"""
        url = self.worker.http_url()
        found: dict[tuple[str, int], int] = {}
        async with aiohttp.ClientSession() as http:
            for iid, application_id in keys:
                path = f"{url}/v2/customer_sessions/{quote(iid, safe='')}"
                params = {"applicationId": str(application_id)}
                async with http.get(path, params=params) as answer:
                    if answer.status != 200:
                        continue
                    session = await answer.json()
                    if session["state"] == "open":
                        found[iid, application_id] = session["updateCount"]
        return found

    def log(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def assert_alive(self) -> None:
        assert self.worker.running, f"the worker died:\n{self.log()}"

    def assert_canaries(self, seen: Seen, iids: list[str]) -> None:
        missing = [i for i in iids if not seen.closed(i)]
        assert not missing, f"canaries never came out: {missing}\n{self.log()}"

    def assert_rejected(
        self, seen: Seen, sent: Sent, reason: str, pointer: str | None = None
    ) -> dict[str, Any]:
        """``sent`` is on the rejection topic once, for ``reason``, with its exact
        bytes, keyed by its original key. Returns the rejection."""
        found = seen.rejections.get(sent.position, [])
        assert found, (
            f"no rejection of {sent.position} (key {sent.key!r}, "
            f"value {(sent.value or b'')[:120]!r}...)\n{self.log()}"
        )
        assert len(found) == 1, f"{sent.position} rejected {len(found)} times"
        out, doc = found[0]
        assert doc["reason"] == reason, (doc["reason"], doc["errors"], self.log())
        if pointer is not None:
            assert doc["errors"][0]["source"]["pointer"] == pointer, doc["errors"]
        assert_original_bytes(out, doc, sent, self.cap)
        return doc


def assert_original_bytes(out: Output, doc: dict[str, Any], sent: Sent, cap: int) -> None:
    """The rejection carries ``sent``'s key and value byte for byte (past ``cap``:
    a prefix, the length and the SHA-256), and is keyed by the original key."""
    where = sent.position
    assert doc["source"] == {"topic": sent.topic, "partition": sent.partition, "offset": where[2]}
    assert out.key == sent.key, (where, out.key, sent.key)
    if sent.key is None:
        assert doc["keyBase64"] is None, where
    else:
        assert base64.b64decode(doc["keyBase64"], validate=True) == sent.key, where
    value = sent.value
    if value is None:
        assert doc["valueBase64"] is None, where
        assert doc["valueLength"] is None, where
        assert doc["valueSha256"] is None, where
        assert doc["valueTruncated"] is False, where
        return
    kept = base64.b64decode(doc["valueBase64"], validate=True)
    assert doc["valueLength"] == len(value), where
    assert doc["valueSha256"] == hashlib.sha256(value).hexdigest(), where
    if len(value) <= cap:
        assert kept == value, (where, kept[:80], value[:80])
        assert doc["valueTruncated"] is False, where
    else:
        assert kept == value[:cap], (where, len(kept), cap)
        assert doc["valueTruncated"] is True, where
        assert "command" not in doc, where


def money_problems(doc: dict[str, Any]) -> list[str]:
    """Where an output has ``null`` (or a bool) for a total or a price, or a
    float for an integral amount (the contract writes exact integers as integers:
    such a float is a rounded number)."""
    found: list[tuple[str, Any]] = []
    session = doc.get("session", {})
    found += [(f"/session/{name}", session.get(name)) for name in MONEY_FIELDS]
    for i, item in enumerate(session.get("cartItems", [])):
        found.append((f"/session/cartItems/{i}/price", item.get("price")))
        for name, cost in (item.get("additionalCosts") or {}).items():
            found.append((f"/session/cartItems/{i}/additionalCosts/{name}", cost.get("price")))
    for name, cost in (session.get("additionalCosts") or {}).items():
        found.append((f"/session/additionalCosts/{name}", cost.get("price")))
    if "return" in doc:
        found.append(("/return/value", doc["return"].get("value")))
        found += [
            (f"/return/lines/{i}", line.get("value"))
            for i, line in enumerate(doc["return"]["lines"])
        ]
    problems = []
    for pointer, value in found:
        if type(value) not in (int, float):
            problems.append(f"{pointer} is {value!r}")
        elif type(value) is float and value.is_integer():
            problems.append(f"{pointer} is the float {value!r}")
    return problems


def quiet_for(seconds: float) -> Callable[[Seen], bool]:
    """A ``done`` for :meth:`Live.until`: nothing new was read for ``seconds``
    (all is read once the worker is stopped)."""
    last = [0, time.monotonic()]

    def check(seen: Seen) -> bool:
        if len(seen.outputs) != last[0]:
            last[:] = [len(seen.outputs), time.monotonic()]
        return time.monotonic() - last[1] > seconds

    return check


@pytest.fixture(scope="module")
def live(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("hostile")
    d = Deployment(
        kafka_bootstrap, f"hostile.{uuid.uuid4().hex[:8]}", root / "state", partitions=PARTITIONS
    )
    asyncio.run(create_topics(kafka_bootstrap, [d.topics.commands], PARTITIONS))
    log_path = root / "worker.log"
    worker = Worker(d.env(), log_path)
    state = Live(d, worker, log_path, cap=0)
    try:

        async def warm_up() -> None:
            canaries = await state.canaries(direct=(0, 1, 2), rekeyed=(0, 1, 2), profiled=(0, 1, 2))
            seen = await state.until(lambda s: s.has_closed(*canaries), timeout=120)
            state.assert_alive()
            state.assert_canaries(seen, canaries)
            written = [
                *d.output_topics(),
                d.topics.application_settings,
                state.rekeyed,
                state.by_profile,
            ]
            configs = await topic_configs(kafka_bootstrap, written)
            state.cap = min(int(c["max.message.bytes"]) for c in configs.values()) // 4

        asyncio.run(warm_up())
        yield state
    finally:
        state.worker.signal_group(signal.SIGCONT)
        state.worker.stop(timeout=30)


# --------------------------------------------------------------------------- commands


def close(iid: str, **session: Any) -> bytes:
    """A valid close that creates the session (anonymous unless a profileId is given)."""
    body = {"state": "closed", "cartItems": [{"sku": "canary", "quantity": 1, "price": 1}]}
    return command("update", iid, session={**body, **session})


def nested(levels: int, container: str = "list") -> str:
    """``levels`` levels of nested arrays (or objects), innermost empty."""
    if container == "list":
        return "[" * levels + "]" * levels
    return '{"a":' * (levels - 1) + "{}" + "}" * (levels - 1)


# --------------------------------------------------------------------------- 1. nesting


@pytest.mark.parametrize("levels", [255, 300, 1024])
async def test_deep_nesting_is_rejected_not_a_crash(live: Live, levels: int) -> None:
    """The issue's ``{"type":"x","a":[[[...]]]}``, 255..1024 levels in all
    (orjson reads 1024 but writes 254): rejected, with its bytes, no echo that
    cannot be written; a close with the same nesting in an ignored field is
    applied; one with it inside ``attributes`` (a close) is LIMIT_EXCEEDED and
    stores nothing (a later close creates the session)."""
    p = 1
    top, ignored, attributes = (live.iid("deep", p) for _ in range(3))
    inner = levels - 1  # the command object is level 1
    deep_top = f'{{"type":"x","integrationId":"{top}","a":{nested(inner)}}}'.encode()
    deep_ignored = (
        f'{{"type":"update","integrationId":"{ignored}","session":{{"state":"closed"}},'
        f'"a":{nested(inner, "object")}}}'
    ).encode()
    # command (1) > session (2) > attributes (3) > "x" (4...)
    deep_attrs = (
        f'{{"type":"update","integrationId":"{attributes}","eventId":"e1",'
        f'"session":{{"state":"closed","attributes":{{"x":{nested(levels - 3)}}}}}}}'
    ).encode()
    assert deep_attrs.count(b"[") + 3 == levels
    sent = await live.send(
        live.commands,
        [
            ToSend(top.encode(), deep_top, p),
            ToSend(ignored.encode(), deep_ignored, p),
            ToSend(attributes.encode(), deep_attrs, p),
            ToSend(attributes.encode(), close(attributes, couponCodes=["AFTER"]), p),
        ],
    )
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(
        canaries,
        lambda s: (
            s.has_closed(*canaries, ignored, attributes) and s.has_rejections(sent[0], sent[2])
        ),
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    rejected = live.assert_rejected(seen, sent[0], "SCHEMA_VIOLATION", "/type")
    assert "command" not in rejected  # 255+ levels cannot be written again
    deep = live.assert_rejected(seen, sent[2], "LIMIT_EXCEEDED")
    assert deep["errors"][0]["source"]["pointer"].startswith("/session/attributes/x/0/0/")
    assert "command" not in deep
    # Applied: the nesting sits in a field the worker ignores.
    assert [d["session"]["state"] for d in seen.closed(ignored)] == ["closed"]
    assert sent[1].position not in seen.rejections
    # The rejected close stored nothing: the later close created the session.
    [after] = seen.closed(attributes)
    assert after["session"]["updateCount"] == 1
    assert after["session"]["couponCodes"] == ["AFTER"]
    assert after["session"]["attributes"] == {}


async def test_nesting_past_what_the_json_reader_takes(live: Live) -> None:
    """1,025 levels: orjson refuses to read it: MALFORMED_JSON, bytes kept."""
    p = 2
    iid = live.iid("deeper", p)
    value = f'{{"type":"update","integrationId":"{iid}","a":{nested(1024)}}}'.encode()
    [sent] = await live.send(live.commands, [ToSend(iid.encode(), value, p)])
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(canaries, lambda s: s.has_closed(*canaries) and s.has_rejections(sent))
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    live.assert_rejected(seen, sent, "MALFORMED_JSON")


# --------------------------------------------------------------------------- 2. sizes


def padded_close(iid: str, size: int, **fields: Any) -> bytes:
    """A valid close of exactly ``size`` bytes: 1,000 cart items whose item
    attributes carry the bulk, padded with insignificant whitespace."""
    items = [
        {"sku": f"s{i}", "quantity": 1, "price": 1, "attributes": {"note": "n" * 900}}
        for i in range(1000)
    ]
    body = command("update", iid, session={"state": "closed", "cartItems": items}, **fields)
    assert len(body) <= size, len(body)
    return body[:-1] + b" " * (size - len(body)) + b"}"


async def test_commands_near_the_broker_limit(live: Live) -> None:
    """A 1.03 MB command (must be rejected), a 760 KB binary value and a valid
    1.03 MB close: each LIMIT_EXCEEDED (over the 256 KiB command limit) with a
    prefix, the length and the SHA-256 of its value; the close stores nothing."""
    p = 0
    big, binary, valid = (live.iid("size", p) for _ in range(3))
    big_value = command("update", big, session={"state": "closed", "referralCode": "R" * 1_029_000})
    big_value = big_value[:-2] + b" " * (1_030_000 - len(big_value)) + b"}}"
    binary_value = random.Random(11).randbytes(760_000)
    valid_value = padded_close(valid, 1_030_000)
    assert json.loads(valid_value)["session"]["state"] == "closed"
    assert len(big_value) == len(valid_value) == 1_030_000
    sent = await live.send(
        live.commands,
        [
            ToSend(big.encode(), big_value, p),
            ToSend(binary.encode(), binary_value, p),
            ToSend(valid.encode(), valid_value, p),
            ToSend(valid.encode(), close(valid, couponCodes=["SMALL"]), p),
        ],
    )
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries, valid) and s.has_rejections(*sent[:3])
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    for s in sent[:3]:
        doc = live.assert_rejected(seen, s, "LIMIT_EXCEEDED", "")
        assert doc["valueTruncated"] is True
        assert len(base64.b64decode(doc["valueBase64"])) == live.cap
    [after] = seen.closed(valid)
    assert after["session"]["updateCount"] == 1
    assert after["session"]["couponCodes"] == ["SMALL"]
    assert len(after["session"]["cartItems"]) == 1


async def test_records_with_huge_keys_are_rejected_not_a_stalled_partition(live: Live) -> None:
    """A key of 700 KB or 1 MB with a 15-byte value is a record the command
    topic takes. Its rejection is keyed by it and holds it in base64: written
    as it is, it does not fit the rejection topic, and its transaction fails
    again on every retry (the partition stalls for good). The rejection keeps
    the key's first quarter-limit bytes (``keyTruncated``) and is keyed by a
    prefix of it (docs/contract.md, section 11)."""
    p = 0
    value = b'{"type":"nope"}'
    keys = [bytes([n]) * size for n, size in ((1, 700_000), (2, 1_000_000))]
    sent = await live.send(live.commands, [ToSend(key, value, p) for key in keys])
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries) and s.has_rejections(*sent)
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    for s in sent:
        assert s.key is not None
        [(out, doc)] = seen.rejections[s.position]
        assert out.key is not None
        assert s.key.startswith(out.key)
        assert len(out.key) < len(s.key)
        assert base64.b64decode(doc["keyBase64"]) == s.key[: live.cap]
        assert doc["keyTruncated"] is True
        assert base64.b64decode(doc["valueBase64"]) == value
        assert doc["source"]["offset"] == s.position[2]


async def test_a_command_just_over_the_limit_keeps_all_its_bytes(live: Live) -> None:
    """Over the command limit but under what a rejection keeps: rejected, kept
    whole (valueTruncated false)."""
    p = 2
    iid = live.iid("just-over", p)
    value = close(iid)
    value = value[:-1] + b" " * (256 * 1024 + 1 - len(value)) + b"}"
    [sent] = await live.send(live.commands, [ToSend(iid.encode(), value, p)])
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(canaries, lambda s: s.has_closed(*canaries) and s.has_rejections(sent))
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    assert live.cap >= len(value)
    doc = live.assert_rejected(seen, sent, "LIMIT_EXCEEDED", "")
    assert doc["valueTruncated"] is False


async def test_four_updates_of_300_kb_to_one_session(live: Live) -> None:
    """The issue's poison loop: each 300 KB update is over the command limit and
    rejected; the session keeps its cart, and a later close shows it."""
    p = 1
    iid = live.iid("grow", p)
    cart = [{"sku": "kept", "quantity": 2, "price": 5}]
    records = [ToSend(iid.encode(), command("update", iid, session={"cartItems": cart}), p)]
    for n in range(4):
        attrs = {f"a{n}": "x" * 300_000}
        update = command(
            "update",
            iid,
            session={
                "cartItems": [{"sku": f"new{n}", "quantity": 1, "price": 1}],
                "attributes": attrs,
            },
        )
        records.append(ToSend(iid.encode(), update, p))
    records.append(ToSend(iid.encode(), command("update", iid, session={"state": "closed"}), p))
    sent = await live.send(live.commands, records)
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries, iid) and s.has_rejections(*sent[1:5])
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    for s in sent[1:5]:
        live.assert_rejected(seen, s, "LIMIT_EXCEEDED", "")
    [closed] = seen.closed(iid)
    assert [i["sku"] for i in closed["session"]["cartItems"]] == ["kept"]
    assert closed["session"]["attributes"] == {}
    assert closed["session"]["updateCount"] == 2
    assert sent[0].position not in seen.rejections
    assert sent[5].position not in seen.rejections


async def test_an_update_past_the_stored_session_limit_leaves_the_session(live: Live) -> None:
    """Each command under the limit, the second would grow the stored session
    past 256 KiB: LIMIT_EXCEEDED at /session, and the session keeps its cart
    and attributes (the later close shows the old cart)."""
    p = 0
    iid = live.iid("stored", p)
    first = command(
        "update",
        iid,
        session={
            "cartItems": [{"sku": "old", "quantity": 1, "price": 3}],
            "attributes": {"notes": "n" * 150_000},
        },
    )
    second = command(
        "update",
        iid,
        session={
            "cartItems": [{"sku": "new", "quantity": 9, "price": 7}],
            "attributes": {"more": "m" * 150_000},
        },
    )
    closing = command("update", iid, session={"state": "closed"})
    assert len(second) < 256 * 1024
    sent = await live.send(
        live.commands, [ToSend(iid.encode(), v, p) for v in (first, second, closing)]
    )
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries, iid) and s.has_rejections(sent[1])
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    live.assert_rejected(seen, sent[1], "LIMIT_EXCEEDED", "/session")
    [closed] = seen.closed(iid)
    session = closed["session"]
    assert [(i["sku"], i["quantity"]) for i in session["cartItems"]] == [("old", 1)]
    assert set(session["attributes"]) == {"notes"}
    assert session["updateCount"] == 2
    assert session["total"] == 3


# --------------------------------------------------------------------------- 4. forged origin


def origin(topic: str, partition: int, offset: int, timestamp: int, key: bytes | None) -> bytes:
    return json.dumps(
        {
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "timestamp": timestamp,
            "key": None if key is None else base64.b64encode(key).decode(),
        }
    )


async def test_a_forged_origin_header_on_the_command_topic_is_ignored(live: Live) -> None:
    """``stream-app-origin`` on the command topic, garbage, naming another
    source, pointing at an earlier offset of the same session, or with a huge
    timestamp: each record is processed as if the header were not there."""
    p = 1
    garbage, other, earlier, huge, rejected = (live.iid("origin", p) for _ in range(5))
    fake = origin("payments.ledger", 99, 424242, 0, b"someone-else")

    # The earlier offset of the same session: an open update, to be pointed at.
    [opened] = await live.send(
        live.commands,
        [ToSend(earlier.encode(), command("update", earlier, session={"cartItems": []}), p)],
    )
    points_back = origin(live.commands, p, opened.offset, 1_700_000_000_000, earlier.encode())
    huge_timestamp = origin(live.commands, p, 1, 2**62, huge.encode())
    no_event_id_close = {"state": "closed"}
    sent = await live.send(
        live.commands,
        [
            ToSend(
                garbage.encode(),
                close(garbage),
                p,
                ((ORIGIN_HEADER, b"\x00{garbage"),),
            ),
            ToSend(other.encode(), close(other), p, ((ORIGIN_HEADER, fake),)),
            ToSend(
                earlier.encode(),
                command("update", earlier, session=no_event_id_close),
                p,
                ((ORIGIN_HEADER, points_back),),
            ),
            ToSend(
                huge.encode(),
                command("update", huge, session={"cartItems": []}),
                p,
                ((ORIGIN_HEADER, huge_timestamp),),
            ),
            ToSend(huge.encode(), command("update", huge, session=no_event_id_close), p),
            ToSend(
                rejected.encode(),
                command("reopen", rejected),
                p,
                ((ORIGIN_HEADER, fake), (ORIGIN_HEADER, fake)),
            ),
        ],
    )
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(
        canaries,
        lambda s: (
            s.has_closed(*canaries, garbage, other, earlier, huge) and s.has_rejections(sent[5])
        ),
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    for s in (opened, *sent[:5]):
        assert s.position not in seen.rejections, seen.rejection(s)
    # Applied as they arrived: the eventId is the record's own position, the
    # time is its own time (not 1970, not the header's).
    for iid, s in ((garbage, sent[0]), (other, sent[1]), (earlier, sent[2]), (huge, sent[4])):
        [doc] = seen.closed(iid)
        assert doc["eventId"] == f"{live.commands}-{p}-{s.offset}", doc["eventId"]
        assert doc["occurredAt"] >= "2020", doc["occurredAt"]
        assert doc["session"]["created"] >= "2020", doc["session"]["created"]
    # Pointing back at the open update did not make the close a "duplicate".
    assert seen.closed(earlier)[0]["session"]["updateCount"] == 2
    assert seen.closed(huge)[0]["session"]["updateCount"] == 2
    # A rejection names where the record really arrived, and its own key.
    live.assert_rejected(seen, sent[5], "UNKNOWN_SESSION")


# --------------------------------------------------------------------------- 5. exact bytes


async def test_rejections_keep_the_original_bytes(live: Live) -> None:
    """Duplicate keys, a 30-digit integer, a 40-digit decimal, -0, a tombstone
    and an empty value, a null key and an empty key (on the command topic and
    through re-keying): the rejection keeps each byte for byte, and the
    rejection's own Kafka key is the original key."""
    p = 0
    ids = [live.iid("bytes", p) for _ in range(7)]
    literal = [
        '{{"type":"reopen","integrationId":"{0}","integrationId":"{0}"}}',
        '{{"type":"reopen","integrationId":"{0}","n":123456789012345678901234567890}}',
        '{{"type":"reopen","integrationId":"{0}","n":0.1234567890123456789012345678901234567890}}',
        '{{"type":"reopen","integrationId":"{0}","n":-0,"m":-0.0}}',
    ]
    records = [
        ToSend(i.encode(), t.format(i).encode(), p) for i, t in zip(ids, literal, strict=False)
    ]
    records += [
        ToSend(ids[4].encode(), None, p),  # a tombstone
        ToSend(ids[5].encode(), b"", p),  # an empty value
        ToSend(None, b"not json", p),
        ToSend(b"", b"not json", p),
        ToSend(b"\xff\x00\xfe", b"\xff\x00 also not json", p),
        # Valid commands without (or with an empty) key are re-keyed first; the
        # rejection still names the original key and position.
        ToSend(None, command("reopen", live.iid("bytes-rekeyed")), p),
        ToSend(b"", command("reopen", live.iid("bytes-rekeyed")), p),
    ]
    # orjson refuses a number beyond a double: MALFORMED_JSON, bytes kept.
    infinite = f'{{"type":"reopen","integrationId":"{ids[6]}","n":1E400}}'.encode()
    records.append(ToSend(ids[6].encode(), infinite, p))
    sent = await live.send(live.commands, records)
    canaries = await live.canaries(direct=(p,), rekeyed=(0, 1, 2))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries) and s.has_rejections(*sent)
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    for s in sent[:4]:
        doc = live.assert_rejected(seen, s, "UNKNOWN_SESSION")
        assert doc["command"]["integrationId"] == s.key.decode()  # the echo, a convenience
    assert b"123456789012345678901234567890" in base64.b64decode(
        seen.rejection(sent[1])["valueBase64"]
    )
    tombstone = live.assert_rejected(seen, sent[4], "MALFORMED_JSON")
    empty = live.assert_rejected(seen, sent[5], "MALFORMED_JSON")
    assert (tombstone["valueBase64"], tombstone["valueLength"]) == (None, None)
    assert (empty["valueBase64"], empty["valueLength"]) == ("", 0)
    assert empty["valueSha256"] == hashlib.sha256(b"").hexdigest()
    no_key = live.assert_rejected(seen, sent[6], "MALFORMED_JSON")
    empty_key = live.assert_rejected(seen, sent[7], "MALFORMED_JSON")
    assert (no_key["keyBase64"], empty_key["keyBase64"]) == (None, "")
    live.assert_rejected(seen, sent[8], "MALFORMED_JSON")
    rekeyed_no_key = live.assert_rejected(seen, sent[9], "UNKNOWN_SESSION")
    rekeyed_empty_key = live.assert_rejected(seen, sent[10], "UNKNOWN_SESSION")
    assert (rekeyed_no_key["keyBase64"], rekeyed_empty_key["keyBase64"]) == (None, "")
    live.assert_rejected(seen, sent[11], "MALFORMED_JSON")


# --------------------------------------------------------------------------- 6. internal topics


async def test_records_written_straight_to_the_rekey_topic(live: Live) -> None:
    """Closes written to ``<app>-sessions.rekeyed`` by someone else: a wrong key,
    the wrong partition, no origin header, a garbage or a doubled one. Each is
    INVALID_INTERNAL_RECORD (its source: the re-key topic) and never applied:
    the session's one real close creates it (updateCount 1), closed once."""
    p = 2
    iid = live.iid("internal", p)
    key = iid.encode()
    value = close(iid)
    header = ((ORIGIN_HEADER, origin(live.commands, p, 10**12, 1_700_000_000_000, key)),)
    wrong_p = (p + 1) % PARTITIONS
    forged = [
        ToSend(b"wrong-" + key, value, p, header),
        ToSend(key, value, wrong_p, header),
        ToSend(key, value, p),
        ToSend(key, value, p, ((ORIGIN_HEADER, b"{not json"),)),
        ToSend(key, value, p, header + header),
    ]
    sent = await live.send(live.rekeyed, forged)
    [real] = await live.send(live.commands, [ToSend(key, close(iid, couponCodes=["REAL"]), p)])
    canaries = await live.canaries(direct=(p,), rekeyed=(p, wrong_p))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries, iid) and s.has_rejections(*sent)
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    problems = []
    for s, what in zip(sent, FORGED_REKEYED, strict=True):
        try:
            live.assert_rejected(seen, s, "INVALID_INTERNAL_RECORD")
        except AssertionError as exc:
            problems.append(f"{what} at {s.position}: {str(exc)[:300]}")
    forged_source = [
        (pos, doc["reason"])
        for (pos, found) in seen.rejections.items()
        for _, doc in found
        if pos == (live.commands, p, 10**12)
    ]
    assert not problems, "\n".join(
        [*problems, f"rejections naming the forged origin: {forged_source}"]
    )
    assert real.position not in seen.rejections
    [closed] = seen.closed(iid)
    assert closed["session"]["updateCount"] == 1
    assert closed["session"]["couponCodes"] == ["REAL"]


async def test_a_rekey_record_with_a_valid_origin_but_no_command(live: Live) -> None:
    """The worker writes to ``<app>-sessions.rekeyed`` only commands it decoded,
    so a record there with a well-formed origin header but a value that is no
    command (a tombstone, not JSON, not a valid command, over the command size
    limit) is not the worker's: INVALID_INTERNAL_RECORD at its own position,
    never a rejection that names the forged origin as its source."""
    p = 1
    iid = live.iid("internal-value", p)
    key = iid.encode()
    forged_offset = 10**12 + 1
    header = ((ORIGIN_HEADER, origin(live.commands, p, forged_offset, 1_700_000_000_000, key)),)
    oversize = close(iid)
    oversize = oversize[:-1] + b" " * (300_000 - len(oversize)) + b"}"
    values: list[tuple[str, bytes | None]] = [
        ("a tombstone", None),
        ("not JSON", b"not json"),
        ("not a valid command", f'{{"type":"x","integrationId":"{iid}"}}'.encode()),
        ("over the command size limit", oversize),
    ]
    sent = await live.send(live.rekeyed, [ToSend(key, v, p, header) for _, v in values])
    canaries = await live.canaries(direct=(p,), rekeyed=(p,))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries) and s.has_rejections(*sent)
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    problems = []
    for s, (what, _) in zip(sent, values, strict=True):
        try:
            live.assert_rejected(seen, s, "INVALID_INTERNAL_RECORD")
        except AssertionError as exc:
            problems.append(f"{what} at {s.position}: {str(exc).splitlines()[0][:200]}")
    forged_source = [
        doc["reason"] for _, doc in seen.rejections.get((live.commands, p, forged_offset), [])
    ]
    if forged_source:
        problems.append(f"rejections naming the forged origin as their source: {forged_source}")
    assert not problems, "\n".join(problems)
    assert seen.closed(iid) == []


FORGED_REKEYED = [
    "wrong key, valid origin header",
    "wrong partition, valid origin header",
    "no origin header",
    "garbage origin header",
    "two origin headers",
]


def forged_output(iid: str, profile: str) -> dict[str, Any]:
    """An output document, as stage 1 writes it for a profiled session."""
    return {
        "event": "talon_session_closed",
        "eventId": "forged",
        "occurredAt": "2026-01-01T00:00:00.000Z",
        "applicationId": APPLICATION_ID,
        "integrationId": iid,
        "session": {"integrationId": iid, "profileId": profile, "state": "closed", "total": 1},
    }


async def test_forged_envelopes_on_the_by_profile_topic(live: Live) -> None:
    """Envelopes written to ``<app>-sessions.by-profile`` by someone else with
    channel "application_settings" or "__class__", or malformed: each is
    INVALID_INTERNAL_RECORD, nothing is published for it, no application
    settings change, and stage 2 goes on (a profiled canary comes out). (A
    well-formed forged emit cannot be told from the worker's own: ACLs are the
    defence, see docs/operations.md.)"""
    p = 0
    iid = live.iid("forged-emit")
    profile = live.profile("forged", p)
    key = profile_key(APPLICATION_ID, profile)
    output = forged_output(iid, profile)

    def emit(channel: str, out: Any = output, **extra: Any) -> bytes:
        doc = {"kind": "emit", "channel": channel, "integrationId": iid, "output": out}
        return json.dumps({**doc, **extra})

    values: list[tuple[bytes | None, bytes | None]] = [
        (key, emit("application_settings")),
        (key, emit("__class__")),
        (key, emit("__init__")),
        (key, emit("closed", extra="field")),
        (key, emit("closed", out={**output, "session": "not an object"})),
        (key, emit("closed", out=forged_output(iid, "another-profile"))),
        (key, json.dumps({"kind": "emit", "channel": "closed"})),
        (key, json.dumps({"kind": "claim", "integrationId": iid, "extra": 1})),
        (key, json.dumps({"kind": "delete", "integrationId": iid})),
        (key, b"not json"),
        (key, b"[1, 2]"),
        (key, f'{{"kind":"emit","a":{nested(1000)}}}'.encode()),
        (key, None),
        (None, emit("closed")),
        (b"no-separator", emit("closed")),
    ]
    sent = await live.send(live.by_profile, [ToSend(k, v, p) for k, v in values])
    canaries = await live.canaries(direct=(0, 1, 2), profiled=(p,))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries) and s.has_rejections(*sent)
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    for s in sent:
        doc = live.assert_rejected(seen, s, "INVALID_INTERNAL_RECORD")
        assert doc["source"]["topic"] == live.by_profile
    assert seen.emitted.get(iid, []) == []  # no sale that never happened
    assert seen.settings_records == []  # no application's settings rewritten


# --------------------------------------------------------------------------- 7. numbers


async def test_numbers_at_the_edges(live: Live) -> None:
    """1.7e308 x 2, integer prices above 2^64 (and 2^63), totals past 2^63 and
    1 + 1e-20: LIMIT_EXCEEDED with a pointer. Exact totals just below 2^63 come
    out as integers. No output has null or a float where an exact total or
    price is."""
    p = 1

    def priced(iid: str, *lines: tuple[str, int]) -> bytes:
        items = ",".join(
            f'{{"sku":"s{n}","quantity":{quantity},"price":{price}}}'
            for n, (price, quantity) in enumerate(lines)
        )
        return (
            f'{{"type":"update","integrationId":"{iid}",'
            f'"session":{{"state":"closed","cartItems":[{items}]}}}}'
        ).encode()

    rejected_cases = [
        (("1.7e308", 2),),
        (("36893488147419103232", 1),),  # 2^65: orjson reads a float
        (("18446744073709551615", 1),),  # 2^64 - 1: orjson reads an int
        (("9223372036854775808", 1),),  # 2^63
        (("4611686018427387904", 2),),  # 2^62 x 2 = 2^63
        (("9000000000000000000", 1), ("9000000000000000000", 1)),  # the sum only
        (("1", 1), ("1e-20", 1)),  # 1.00000000000000000001
    ]
    accepted_cases = [
        ((("4611686018427387903", 2),), 9_223_372_036_854_775_806),
        ((("9000000000000000", 1000),), 9_000_000_000_000_000_000),
        ((("0.1", 3), ("0.2", 1)), 0.5),
    ]
    bad = [live.iid("number", p) for _ in rejected_cases]
    good = [live.iid("number-ok", p) for _ in accepted_cases]
    records = [
        ToSend(i.encode(), priced(i, *lines), p)
        for i, lines in zip(bad, rejected_cases, strict=True)
    ]
    records += [
        ToSend(i.encode(), priced(i, *lines), p)
        for i, (lines, _) in zip(good, accepted_cases, strict=True)
    ]
    sent = await live.send(live.commands, records)
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries, *good) and s.has_rejections(*sent[: len(bad)])
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    pointers = []
    for s, iid in zip(sent, bad, strict=False):
        doc = live.assert_rejected(seen, s, "LIMIT_EXCEEDED")
        pointers.append(doc["errors"][0]["source"]["pointer"])
        assert seen.closed(iid) == []
    assert all(ptr.startswith("/session/") for ptr in pointers), pointers
    assert pointers[0].startswith("/session/cartItems/0"), pointers
    assert pointers[1].startswith("/session/cartItems/0"), pointers
    for iid, (_, total) in zip(good, accepted_cases, strict=True):
        [doc] = seen.closed(iid)
        assert doc["session"]["total"] == total
        assert type(doc["session"]["total"]) is type(total)
        assert not money_problems(doc), money_problems(doc)
    # The exact integer as written, not 9.223372036854776e18.
    raw = [out.value for out, _ in seen.emitted[good[0]]]
    assert b'"total":9223372036854775806' in raw[0]
    for iid, docs in seen.emitted.items():
        for out, doc in docs:
            assert not money_problems(doc), (iid, out.topic, money_problems(doc))


# --------------------------------------------------------------------------- fuzz

SPECIAL = [
    "\u0000",
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "\u200f",  # RIGHT-TO-LEFT MARK
    "\u200b",
    "\ufeff",
    "\u2028",
    "\uffff",
    "\U0010ffff",
    "e\u0301",
    "\U0001f600",
    "\x7f",
    '"',
    "\\",
    "/",
]
#: JSON text (already escaped) that is not valid Unicode once read.
BAD_ESCAPES = ["\\ud800", "\\udfff", "\\ud800\\u0041", "\\udc00\\ud800"]
#: Bytes that are not valid UTF-8 inside a JSON string.
BAD_BYTES = [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]
MALFORMED = [
    b"",
    b"{",
    b"}",
    b"nul",
    b"NaN",
    b"Infinity",
    b"-",
    b"[1,]",
    b'{"a":1}}',
    b'{"a" 1}',
    b"\xef\xbb\xbf{}",
    b"{'type': 'update'}",
    b'{"type":"update",}',
    b"1e999",
    b'"\\u12"',
    b"\x00",
]

unicode_text = st.one_of(
    st.text(max_size=12),
    st.lists(st.sampled_from(SPECIAL), min_size=1, max_size=4).map("".join),
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Co", "Zl", "Zp", "Mn"]), max_size=8),
)
json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    unicode_text,
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(unicode_text, inner, max_size=4)
    ),
    max_leaves=12,
)


@dataclass(frozen=True)
class FuzzRecord:
    """One generated record. ``build`` makes the value from a fresh integrationId
    (so no two records share a session unless they are a repeat)."""

    kind: str
    build: Callable[[str], bytes | None]
    key: str  # "iid", "none", "empty", "bytes"
    key_bytes: bytes
    partition: int
    headers: tuple[tuple[str, bytes], ...]
    repeat: bool
    event_id: bool

    def __repr__(self) -> str:
        sample = self.build("IID")
        shown = sample[:100] if sample is not None else None
        size = len(sample) if sample is not None else 0
        return (
            f"FuzzRecord({self.kind}, key={self.key}, p={self.partition}, "
            f"headers={self.headers!r}, repeat={self.repeat}, {size} bytes: {shown!r})"
        )


def _envelope(event_id: bool, iid: str, session: bytes, extra: bytes = b"") -> bytes:
    eid = b',"eventId":"ev-' + iid.encode() + b'"' if event_id else b""
    return (
        b'{"type":"update","integrationId":"'
        + iid.encode()
        + b'"'
        + eid
        + b',"session":'
        + session
        + extra
        + b"}"
    )


#: An update that, applied, leaves its session open: no output, so the
#: session's updateCount is what shows it applied (and each copy of a repeat
#: without an eventId, which is a command of its own).
OPENED = b'{"cartItems":[{"sku":"o","quantity":2,"price":3}]}'


@st.composite
def fuzz_values(draw: st.DrawFn) -> tuple[str, Callable[[str, bool], bytes | None]]:
    """(kind, build(iid, with_event_id)): the generated value."""
    kind = draw(
        st.sampled_from(
            [
                "binary",
                "malformed",
                "mutated",
                "nested",
                "huge",
                "unicode",
                "json",
                "numbers",
                "valid",
                "open",
            ]
        )
    )
    closed = b'{"state":"closed","cartItems":[{"sku":"f","quantity":1,"price":1}]}'
    if kind == "binary":
        data = draw(st.binary(max_size=300))
        return kind, lambda iid, e: data
    if kind == "malformed":
        data = draw(st.sampled_from(MALFORMED))
        return kind, lambda iid, e: data
    if kind == "mutated":
        cut = draw(st.integers(0, 200))
        junk = draw(st.binary(min_size=0, max_size=3))

        def mutated(iid: str, e: bool) -> bytes:
            valid = _envelope(e, iid, closed)
            at = cut % len(valid)
            return valid[:at] + junk + valid[at + 1 :]

        return kind, mutated
    if kind == "nested":
        levels = draw(st.integers(1, 1100))
        container = draw(st.sampled_from(["list", "object"]))
        where = draw(st.sampled_from(["top", "ignored", "attribute", "item-attribute"]))
        deep = nested(levels, container).encode()

        def deeply(iid: str, e: bool) -> bytes:
            if where == "top":
                return deep
            if where == "ignored":
                return _envelope(e, iid, closed, b',"x":' + deep)
            if where == "attribute":
                return _envelope(e, iid, b'{"state":"closed","attributes":{"x":' + deep + b"}}")
            item = b'{"sku":"f","quantity":1,"price":1,"attributes":{"x":' + deep + b"}}"
            return _envelope(e, iid, b'{"state":"closed","cartItems":[' + item + b"]}")

        return kind, deeply
    if kind == "huge":
        size = draw(st.sampled_from([50_000, 262_000, 262_200, 300_000, 700_000]))
        char = draw(st.sampled_from(["x", "\u00e9", "\U0001f600", "\\u0000"]))
        where = draw(st.sampled_from(["attribute", "referral", "raw", "whitespace"]))

        def huge(iid: str, e: bool) -> bytes:
            if where == "raw":
                return (char * size).encode()[:size]
            if where == "whitespace":
                valid = _envelope(e, iid, closed)
                return valid[:-1] + b" " * max(0, size - len(valid)) + b"}"
            fill = (char * size).encode()[:size].decode(errors="ignore")
            field_name = '"attributes":{"big":"' if where == "attribute" else '"referralCode":"'
            tail = '"}}' if where == "attribute" else '"}'
            session = ('{"state":"closed",' + field_name + fill + tail).encode()
            return _envelope(e, iid, session)

        return kind, huge
    if kind == "unicode":
        text = draw(unicode_text)
        bad = draw(st.one_of(st.none(), st.sampled_from(BAD_ESCAPES), st.sampled_from(BAD_BYTES)))
        where = draw(
            st.sampled_from(["iid", "eventId", "sku", "name", "attribute-key", "attribute"])
        )

        def odd(iid: str, e: bool) -> bytes:
            piece = json.dumps(text)[1:-1]
            if isinstance(bad, str):
                piece += bad.encode()
            elif isinstance(bad, bytes):
                piece += bad
            if where == "iid":
                return (
                    b'{"type":"update","integrationId":"'
                    + iid.encode()
                    + piece
                    + (b'","session":' + closed + b"}")
                )
            if where == "eventId":
                return (
                    b'{"type":"update","integrationId":"'
                    + iid.encode()
                    + b'","eventId":"'
                    + piece
                    + b'","session":'
                    + closed
                    + b"}"
                )
            if where in ("sku", "name"):
                item = (
                    b'{"sku":"f","quantity":1,"price":1,"'
                    + where.encode()
                    + b'":"x'
                    + piece
                    + b'"}'
                )
                return _envelope(e, iid, b'{"state":"closed","cartItems":[' + item + b"]}")
            attribute = (
                b'{"' + piece + b'":1}' if where == "attribute-key" else b'{"a":"' + piece + b'"}'
            )
            return _envelope(e, iid, b'{"state":"closed","attributes":' + attribute + b"}")

        return kind, odd
    if kind == "json":
        doc = draw(json_value)
        typed = draw(st.booleans())
        command_type = draw(st.sampled_from(["update", "return", "reopen", "x", ""]))

        def anything(iid: str, e: bool) -> bytes:
            if typed:
                # An update that is applied must close its session: a close is
                # how this test sees a record applied (an open session emits
                # nothing). Other states stay, to be rejected.
                session = doc
                if type(doc) is dict and doc.get("state") in (None, "open"):
                    session = {**doc, "state": "closed"}
                return json.dumps(
                    {
                        "type": command_type,
                        "integrationId": iid,
                        "session": session,
                        "returnedCartItems": doc,
                    }
                )
            return json.dumps(doc)

        return kind, anything
    if kind == "numbers":
        price = draw(
            st.one_of(
                st.integers(-(2**64), 2**70).map(str),
                st.floats(allow_nan=False, allow_infinity=False).map(repr),
                st.sampled_from(
                    ["1.7e308", "1e-400", "-0", "0.1", "123456789012345678901234567890"]
                ),
            )
        )
        quantity = draw(st.integers(-1, 10_001))

        def numbers(iid: str, e: bool) -> bytes:
            item = f'{{"sku":"n","quantity":{quantity},"price":{price}}}'.encode()
            return _envelope(e, iid, b'{"state":"closed","cartItems":[' + item + b"]}")

        return kind, numbers
    if kind == "open":
        return kind, lambda iid, e: _envelope(e, iid, OPENED)
    return kind, lambda iid, e: _envelope(e, iid, closed)


@st.composite
def fuzz_records(draw: st.DrawFn) -> FuzzRecord:
    kind, build = draw(fuzz_values())
    tombstone = draw(st.integers(0, 40)) == 0
    event_id = draw(st.booleans())
    key = draw(st.sampled_from(["iid", "iid", "none", "empty", "bytes"]))
    key_bytes = draw(st.binary(max_size=16)) if key == "bytes" else b""
    forged = draw(
        st.sampled_from(
            [
                (),
                ((ORIGIN_HEADER, b"{garbage"),),
                ((ORIGIN_HEADER, origin("payments.ledger", 99, 424242, 2**62, b"x")),),
                (("\u202eheader\u0000", b"\xff\x00"),),
            ]
        )
    )
    return FuzzRecord(
        kind=kind,
        build=(lambda iid: None) if tombstone else (lambda iid: build(iid, event_id)),
        key=key,
        key_bytes=key_bytes,
        partition=draw(st.integers(0, PARTITIONS - 1)),
        headers=forged,
        repeat=draw(st.integers(0, 7)) == 0,
        event_id=event_id,
    )


FUZZ_EXAMPLES = 60
FUZZ_SEED = int(os.environ.get("HOSTILE_FUZZ_SEED", random.randrange(2**32)))


def generated_records() -> list[FuzzRecord]:
    """FUZZ_EXAMPLES examples from hypothesis, each a list of 1..3 records."""
    found: list[FuzzRecord] = []

    @seed(FUZZ_SEED)
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(fuzz_records(), min_size=1, max_size=3))
    def collect(records: list[FuzzRecord]) -> None:
        found.extend(records)

    collect()
    return found


def repeated_opens() -> list[FuzzRecord]:
    """In every run, whatever the seed: a repeat that leaves its session open
    without an eventId (two commands: updateCount 2) and one with an eventId
    (a command and its duplicate: updateCount 1)."""
    return [
        FuzzRecord(
            kind="open",
            build=lambda iid, e=with_event_id: _envelope(e, iid, OPENED),
            key="iid",
            key_bytes=b"",
            partition=0,
            headers=(),
            repeat=True,
            event_id=with_event_id,
        )
        for with_event_id in (False, True)
    ]


@dataclass
class Fuzzed:
    """A sent fuzz record and, when its value is a JSON object with a string
    ``integrationId``, the session and eventId its output would carry."""

    record: FuzzRecord
    sent: Sent
    iid: str | None = None
    event_id: str | None = None
    application_id: int = APPLICATION_ID

    def __post_init__(self) -> None:
        try:
            doc = json.loads(self.sent.value or b"")
        except json.JSONDecodeError:
            return
        if type(doc) is dict and type(doc.get("integrationId")) is str:
            self.iid = doc["integrationId"]
            event_id = doc.get("eventId")
            if type(event_id) is not str:
                s = self.sent
                event_id = f"{s.topic}-{s.partition}-{s.offset}"
            self.event_id = event_id
            application_id = doc.get("applicationId")
            if type(application_id) is int and application_id > 0:
                self.application_id = application_id

    def outputs(self, seen: Seen) -> list[dict[str, Any]]:
        if self.iid is None:
            return []
        return [d for d in seen.closed(self.iid) if d["eventId"] == self.event_id]


async def test_fuzz_every_record_is_applied_a_duplicate_or_rejected(live: Live) -> None:
    """Generated malformed, deeply nested, huge and unicode-edge records with
    random keys (none, empty, bytes, the integrationId) and forged headers, all
    sent at once, then canaries through every partition of the command and the
    re-key topics. The worker stays alive, the canaries come out, and every
    record is accounted for: rejected once (not as INTERNAL_ERROR) with its
    exact bytes, or applied (its close came out once; or, for a valid command
    that leaves its session open, the worker holds the session open, and its
    updateCount counts every such command), or a repeat of an applied one (a
    duplicate: nothing)."""
    records = generated_records() + repeated_opens()
    context = f"HOSTILE_FUZZ_SEED={FUZZ_SEED}, {len(records)} generated records"
    todo: list[tuple[FuzzRecord, ToSend]] = []
    for r in records:
        iid = live.iid(f"fuzz-{r.kind}")
        key = {"iid": iid.encode(), "none": None, "empty": b"", "bytes": r.key_bytes}[r.key]
        item = ToSend(key, r.build(iid), r.partition, r.headers)
        todo += [(r, item)] * (2 if r.repeat else 1)
    # A client producer refuses a record with neither key nor value: those go
    # as raw batches of their own.
    by_client = [(r, item) for r, item in todo if item.key is not None or item.value is not None]
    raw = [(r, item) for r, item in todo if item.key is None and item.value is None]
    sent = await live.send(live.commands, [item for _, item in by_client])
    for _, item in raw:
        assert item.partition is not None
        offset = await produce_raw_batch(
            live.d.bootstrap, live.commands, item.partition, [BatchRecord(None, None)]
        )
        sent.append(Sent(live.commands, item.partition, offset, None, None))
    fuzzed = [Fuzzed(r, s) for (r, _), s in zip(by_client + raw, sent, strict=True)]
    first_of: dict[tuple[str, str], Fuzzed] = {}
    for f in fuzzed:
        if f.iid is not None and f.event_id is not None:
            first_of.setdefault((f.iid, f.event_id), f)
    canaries = await live.canaries(direct=(0, 1, 2), rekeyed=(0, 1, 2))
    #: (integrationId, applicationId) of sessions the worker holds open, with
    #: their updateCount: see below.
    held: dict[tuple[str, int], int] = {}

    def outcome(seen: Seen, f: Fuzzed) -> str | None:
        if f.sent.position in seen.rejections:
            return "rejected"
        if f.iid is None or f.event_id is None:
            return None
        first = first_of[f.iid, f.event_id] is f
        if f.outputs(seen):
            return "applied" if first else "duplicate"
        if (f.iid, f.application_id) in held:
            return "stored" if first else "duplicate"
        return None

    def settled(s: Seen) -> bool:
        # An applied "open" record shows only in the session query below: it is
        # not waited for here.
        return s.has_closed(*canaries) and all(
            outcome(s, f) or f.record.kind == "open" for f in fuzzed
        )

    seen = await live.settle(canaries, settled, timeout=90)
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    # A valid command need not close its session: an "open" record, or a
    # mutation that makes "state" an unknown field (ignored), leaves an update
    # that opens it, with no output. Each record has its own integrationId, so
    # the worker holding that session open is what says such a record was
    # applied, and the session's updateCount how many such commands were.
    stored: dict[tuple[str, int], list[str]] = defaultdict(list)

    def miscounted() -> list[str]:
        """Sessions held open that did not apply exactly the commands said to
        be stored in them: both copies of a repeat without an eventId (two
        commands), one of a repeat with one (the other a duplicate). The loss
        of one of two copies without an eventId shows only here."""
        stored.clear()
        for f in fuzzed:
            if f.iid is not None and outcome(seen, f) == "stored":
                stored[f.iid, f.application_id].append(str(f.sent.position))
        return [
            f"session {key} applied {count} commands, "
            f"but {len(stored[key])} were stored in it: {stored[key]}"
            for key, count in held.items()
            if count != len(stored[key])
        ]

    undecided = {(f.iid, f.application_id) for f in fuzzed if f.iid and outcome(seen, f) is None}
    # A record re-keyed before a canary may be applied after it (the re-key
    # topic has no order across command partitions): asked again for a while.
    deadline = time.monotonic() + 15
    while True:
        held.clear()
        held.update(await live.open_sessions(undecided))
        decided = all(outcome(seen, f) for f in fuzzed if f.iid)
        if (decided and not miscounted()) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
        # Outputs and rejections that came after the canaries count too.
        seen = await live.settle(canaries, settled, grace=1.0)
    problems: list[str] = miscounted()
    counts: dict[str, int] = defaultdict(int)
    for f in fuzzed:
        what = outcome(seen, f)
        counts[f"{f.record.kind}:{what}"] += 1
        where = f"{f.sent.position} {f.record!r}"
        if what is None:
            problems.append(f"vanished: {where}")
        elif what == "rejected":
            [(out, doc)] = seen.rejections[f.sent.position][:1]
            if doc["reason"] == "INTERNAL_ERROR":
                problems.append(f"INTERNAL_ERROR: {where}: {doc['errors']}")
            try:
                assert_original_bytes(out, doc, f.sent, live.cap)
            except AssertionError as exc:
                problems.append(f"bytes not kept: {where}: {exc}")
            if f.outputs(seen) and f.iid is not None and first_of[f.iid, f.event_id or ""] is f:
                problems.append(f"rejected and applied: {where}")
        elif what == "stored" or (what == "duplicate" and not f.outputs(seen)):
            pass  # applied without an output, or a repeat of one: nothing more to check
        else:
            docs = f.outputs(seen)
            if len(docs) != 1:
                problems.append(f"emitted {len(docs)} times: {where}")
            problems += [f"{where}: {p}" for p in money_problems(docs[0])]
    for f in fuzzed:
        found = seen.rejections.get(f.sent.position, [])
        if len(found) > 1:
            problems.append(f"{f.sent.position} rejected {len(found)} times")
    assert not problems, f"{context}\n" + "\n".join(problems[:30]) + f"\n{live.log(3000)}"
    print(f"\n[hostile fuzz] {context}, {len(fuzzed)} sent: {dict(sorted(counts.items()))}")


# ------------------------------------------------- 3. headers (late: a failure kills the worker)


@pytest.mark.parametrize("compression", [0, GZIP], ids=["plain", "gzip"])
async def test_a_header_name_that_is_not_utf8(live: Live, compression: int) -> None:
    """One batch: a valid close, a valid close with the header name b"\\xff\\xfe",
    a valid close. The two around it are applied; the unreadable one is
    UNREADABLE_RECORD by its position, with its key and value, never applied."""
    p = 2
    before, bad, after = (live.iid("header", p) for _ in range(3))
    records = [
        BatchRecord(before.encode(), close(before), ((b"trace", b"1"),)),
        BatchRecord(bad.encode(), close(bad), ((b"\xff\xfe", b"x"), (b"ok", None))),
        BatchRecord(after.encode(), close(after)),
    ]
    base = await produce_raw_batch(
        live.d.bootstrap, live.commands, p, records, compression=compression
    )
    bad_sent = Sent(live.commands, p, base + 1, bad.encode(), close(bad))
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries, before, after) and s.has_rejections(bad_sent)
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    live.assert_rejected(seen, bad_sent, "UNREADABLE_RECORD")
    assert len(seen.closed(before)) == 1
    assert len(seen.closed(after)) == 1
    assert seen.closed(bad) == []
    assert (live.commands, p, base) not in seen.rejections
    assert (live.commands, p, base + 2) not in seen.rejections


async def test_a_batch_whose_payload_has_bytes_after_it(live: Live) -> None:
    """Kafka 4.1 stores a gzip payload followed by other bytes (its own reader
    ignores them); aiokafka's consumer fails on it, and every worker that took
    the partition stopped on it, at every start. Now rejected whole as
    UNREADABLE_RECORD by its base offset, with its bytes; the closes around it
    are applied."""
    p = 1
    before, inside, after = (live.iid("payload", p) for _ in range(3))
    await produce_raw_batch(
        live.d.bootstrap, live.commands, p, [BatchRecord(before.encode(), close(before))]
    )
    base = await produce_raw_batch(
        live.d.bootstrap,
        live.commands,
        p,
        [BatchRecord(inside.encode(), close(inside))],
        compression=GZIP,
        edit=lambda batch: recrc(batch + b"JUNKJUNK"),
    )
    await produce_raw_batch(
        live.d.bootstrap, live.commands, p, [BatchRecord(after.encode(), close(after))]
    )
    bad = Sent(live.commands, p, base, None, None)
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries, before, after) and s.has_rejections(bad)
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    [(_, doc)] = seen.rejections[bad.position]
    assert doc["reason"] == "UNREADABLE_RECORD", doc
    assert "is rejected whole" in doc["errors"][0]["details"], doc["errors"]
    assert doc["keyBase64"] is None
    assert b"JUNKJUNK" in base64.b64decode(doc["valueBase64"])
    assert len(seen.closed(before)) == 1
    assert len(seen.closed(after)) == 1
    assert seen.closed(inside) == []


def _first_record_attributes(batch: bytes, value: int) -> bytes:
    """``batch`` (uncompressed) with its first record's attributes byte, which
    Kafka reads and ignores, set to ``value``, and its CRC made right."""
    at = 61  # the batch header; then the record's length, a varint
    while batch[at] & 0x80:
        at += 1
    return recrc(batch[: at + 1] + bytes([value]) + batch[at + 2 :])


async def test_a_record_whose_attributes_aiokafka_cannot_read(live: Live) -> None:
    """A record attributes byte of 0x80 or more, its batch's CRC right: Kafka
    stores it, and aiokafka's reader fails on it with an error that names no
    partition ("Can't read ... bytes"). Every worker that took the partition
    stopped on it, at every start. The raw read reads it: the command is
    applied, as are the closes around it."""
    p = 0
    before, inside, after = (live.iid("attributes", p) for _ in range(3))
    for iid in (before, inside, after):
        await produce_raw_batch(
            live.d.bootstrap,
            live.commands,
            p,
            [BatchRecord(iid.encode(), close(iid))],
            edit=(lambda batch: _first_record_attributes(batch, 0x80)) if iid == inside else None,
        )
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(canaries, lambda s: s.has_closed(*canaries, before, inside, after))
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    assert [len(seen.closed(iid)) for iid in (before, inside, after)] == [1, 1, 1]


async def test_a_batch_whose_offsets_disagree_with_its_header(live: Live) -> None:
    """Kafka 4.1 stores an uncompressed batch of two records whose second
    claims offset delta 50 while the header says 1. The Kafka client hands it
    over at base + 50, and the worker skipped, unrejected, the commands up to
    it. Now the poll's offsets give it away: the partition is read raw, the
    batch rejected whole by its base offset, and the commands after it
    applied. (A delta that repeats, the client drops unseen: not covered.)"""
    p = 0
    deltas = (0, 50)
    before, first, second, *after = (live.iid("lie", p) for _ in range(6))
    await produce_raw_batch(
        live.d.bootstrap, live.commands, p, [BatchRecord(before.encode(), close(before))]
    )
    base = await produce_raw_batch(
        live.d.bootstrap,
        live.commands,
        p,
        [BatchRecord(iid.encode(), close(iid)) for iid in (first, second)],
        offset_deltas=deltas,
    )
    for iid in after:
        await produce_raw_batch(
            live.d.bootstrap, live.commands, p, [BatchRecord(iid.encode(), close(iid))]
        )
    bad = Sent(live.commands, p, base, None, None)
    canaries = await live.canaries(direct=(p,))
    seen = await live.settle(
        canaries, lambda s: s.has_closed(*canaries, before, *after) and s.has_rejections(bad)
    )
    live.assert_alive()
    live.assert_canaries(seen, canaries)
    [(_, doc)] = seen.rejections[bad.position]
    assert doc["reason"] == "UNREADABLE_RECORD", doc
    assert "is rejected whole" in doc["errors"][0]["details"], doc["errors"]
    for iid in (before, *after):
        assert len(seen.closed(iid)) == 1, iid
    assert seen.closed(first) == seen.closed(second) == []


# --------------------------------------------------------------------------- restart


async def test_the_worker_restarts_after_all_of_it(live: Live) -> None:
    """No record seen above poisons the state or the committed offsets: the
    worker stops cleanly on SIGTERM, a new one restores the same state and
    processes canaries through every partition, and no record was rejected
    twice (nothing was processed again)."""
    code = live.worker.stop(timeout=30)
    stopped = f"the first worker exited {code}" if code else ""
    before = await live.until(quiet_for(3.0), timeout=WAIT_S)
    offset = live.log_path.stat().st_size
    live.worker = Worker(live.d.env(), live.log_path)
    canaries = await live.canaries(direct=(0, 1, 2), rekeyed=(0, 1, 2), profiled=(0, 1, 2))
    seen = await live.settle(canaries, lambda s: s.has_closed(*canaries), timeout=120)
    restarted_log = live.log_path.read_bytes()[offset:].decode(errors="replace")
    assert live.worker.running, (
        f"{stopped}; the restarted worker died too:\n{restarted_log[-4000:]}"
    )
    live.assert_canaries(seen, canaries)
    assert not stopped, f"{stopped} (the restarted one works):\n{live.log()}"
    again = {
        pos: len(found)
        for pos, found in seen.rejections.items()
        if len(found) > len(before.rejections.get(pos, []))
    }
    assert not again, f"rejected again after the restart: {again}"
    assert len(seen.outputs) == len(before.outputs) + len(canaries)
