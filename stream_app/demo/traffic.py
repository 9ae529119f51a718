"""Deterministic sample checkout traffic for the demo.

:func:`generate_traffic` builds, from a seed, the command records a checkout
system would send for ``sessions`` customer sessions, interleaved the way
they arrive from many shoppers at once, together with what the processor is
expected to make of each record. :func:`generate` is the plain
``(key, value)`` list; :func:`produce_traffic` sends it to the command topic.

What is in it:

* sessions ``cart-000000`` ... (after an optional prefix, so that another run
  against the same topics makes new sessions) with 1-8 cart lines (sku, name,
  category, quantity, prices like ``19.99``, sometimes item attributes and
  item-level costs), coupons, referral codes, loyalty cards, session
  attributes and session-level costs such as shipping;
* about two thirds belong to a profile from a pool smaller than the number of
  sessions, so many profiles have several sessions (``firstSession`` is true
  only for the first); the rest are anonymous;
* scenarios: abandoned open carts, closed carts, cancelled open carts,
  closed then partially returned (once or twice), closed then reopened,
  changed and closed again, closed then revoked (cancelled), created already
  closed, and created closed but sent with a wrong Kafka key (one with no key
  at all; the processor re-keys those, so they are applied, not rejected);
* duplicate resends of a command with the same ``eventId`` (no output), and a
  few commands without an ``eventId``;
* bad records, each rejected with a reason: non-JSON bytes, a quantity sent
  as ``"two"``, a coupon code over 100 characters, a return of an unknown
  session, an update of a closed session and a reopen of an open one.

Commands of one session appear in their order, keyed by ``integrationId``
(except the deliberately mis-keyed ones, which are single-record sessions so
that re-keying cannot reorder them).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum, StrEnum
from typing import Any, Final, TypeVar

from stream_app import json
from stream_app.errors import ConfigurationError
from stream_app.settings import Settings

__all__ = [
    "OUTPUT_KINDS",
    "Expect",
    "Traffic",
    "TrafficRecord",
    "TrafficSummary",
    "generate",
    "generate_traffic",
    "produce_traffic",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The output topics, by their field name in ``settings.topics``.
OUTPUT_KINDS: Final = ("closed", "returned", "cancelled", "reopened", "rejected")
#: Longest id prefix: ids and the eventIds made from them stay far inside their limits.
MAX_PREFIX: Final = 100

# sku, name, category, unit price
_CATALOG: Final = (
    ("TSHIRT-ORG-01", "Organic cotton T-shirt", "apparel", "19.99"),
    ("HOODIE-GRY-02", "Grey zip hoodie", "apparel", "49.90"),
    ("SOCKS-3PK-03", "Sports socks, 3 pack", "apparel", "9.95"),
    ("JEANS-SLM-04", "Slim fit jeans", "apparel", "59.00"),
    ("MUG-CER-05", "Ceramic mug", "home", "12.50"),
    ("CANDLE-SOY-06", "Soy wax candle", "home", "14.99"),
    ("TOWEL-BTH-07", "Bath towel", "home", "24.00"),
    ("LAMP-DSK-08", "Desk lamp", "home", "39.99"),
    ("COFFEE-1KG-09", "Espresso beans 1 kg", "grocery", "21.49"),
    ("TEA-GRN-10", "Green tea, 50 bags", "grocery", "6.79"),
    ("CHOC-DRK-11", "Dark chocolate 85%", "grocery", "3.29"),
    ("EARBUD-BT-12", "Bluetooth earbuds", "electronics", "79.00"),
    ("CABLE-USBC-13", "USB-C cable 2 m", "electronics", "11.99"),
    ("CHARGER-65W-14", "65 W charger", "electronics", "34.95"),
    ("BOOK-PY-15", "Fluent Python", "books", "54.99"),
    ("BOOK-KAFKA-16", "Kafka: The Definitive Guide", "books", "44.50"),
)
_COLORS: Final = ("black", "white", "navy", "olive", "sand")
_COUPONS: Final = ("WELCOME10", "SUMMER24", "FREESHIP", "VIP-15", "BUNDLE3")
_CHANNELS: Final = ("web", "ios", "android", "pos")
_PAYMENT: Final = ("card", "paypal", "invoice", "applepay")
_STORES: Final = ("store-berlin-01", "store-munich-02", "store-hamburg-03")
_SHIPPING: Final = ("4.99", "0", "6.90", "12.00")

# scenario name, weight
_SCENARIOS: Final = (
    ("abandoned", 10),
    ("closed", 42),
    ("cancelled", 10),
    ("returned", 13),
    ("reopened", 9),
    ("revoked", 5),
    ("instant", 6),
)
_DUPLICATE_RATE: Final = 0.05
_NO_EVENT_ID_RATE: Final = 0.03
#: Sessions in flight at once: the interleaving window of the merge.
_IN_FLIGHT: Final = 24


class _Key(Enum):
    """The record key is the session's integrationId (the normal case)."""

    OWN = "own"


class Expect(StrEnum):
    """What the processor should do with a record."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class TrafficRecord:
    """One command record and what it is expected to cause."""

    key: bytes | None
    value: bytes
    #: The session the record is about (its intended key).
    integration_id: str
    #: update, close, cancel, revoke, return, reopen, duplicate, mis_keyed,
    #: malformed_json, wrong_type, coupon_too_long, unknown_session,
    #: update_closed, reopen_open
    kind: str
    expect: Expect
    #: Output kinds (see :data:`OUTPUT_KINDS`) it should produce, in order.
    outputs: tuple[str, ...] = ()

    @property
    def mis_keyed(self) -> bool:
        return self.key != self.integration_id.encode()


@dataclass(frozen=True)
class TrafficSummary:
    """What was generated, and the output counts a correct processor gives."""

    sessions: int
    seed: int
    prefix: str
    records: int
    profiles: int
    profile_sessions: int
    anonymous_sessions: int
    repeat_profiles: int
    scenarios: Mapping[str, int]
    kinds: Mapping[str, int]
    expected: Mapping[str, int]

    def describe(self) -> str:
        scenarios = ", ".join(f"{k} {v}" for k, v in sorted(self.scenarios.items()))
        special = ("duplicate", "mis_keyed", *_BAD_KINDS)
        kinds = ", ".join(f"{k} {self.kinds[k]}" for k in special if self.kinds.get(k))
        expected = ", ".join(f"{k} {self.expected.get(k, 0)}" for k in OUTPUT_KINDS)
        return (
            f"{self.records} records for {self.sessions} sessions (seed {self.seed}"
            f"{f', ids prefixed {self.prefix!r}' if self.prefix else ''}); "
            f"{self.profile_sessions} sessions of {self.profiles} profiles "
            f"({self.repeat_profiles} with several sessions), "
            f"{self.anonymous_sessions} anonymous\n"
            f"  scenarios: {scenarios}\n"
            f"  special records: {kinds}\n"
            f"  expected outputs (application 1, default settings): {expected}"
        )


@dataclass(frozen=True)
class Traffic:
    records: list[TrafficRecord]
    summary: TrafficSummary

    def pairs(self) -> list[tuple[bytes | None, bytes]]:
        return [(r.key, r.value) for r in self.records]


_BAD_KINDS: Final = (
    "malformed_json",
    "wrong_type",
    "coupon_too_long",
    "unknown_session",
    "update_closed",
    "reopen_open",
)


def _money(value: str) -> float | int:
    """A price as JSON would carry it: 19.99, or 12 when integral."""
    number = Decimal(value)
    return int(number) if number == number.to_integral_value() else float(number)


@dataclass
class _Line:
    sku: str
    name: str
    category: str
    price: str
    quantity: int
    attributes: dict[str, Any] | None = None
    gift_wrap: bool = False
    returned: int = 0

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "sku": self.sku,
            "name": self.name,
            "category": self.category,
            "quantity": self.quantity,
            "price": _money(self.price),
        }
        if self.attributes:
            doc["attributes"] = self.attributes
        if self.gift_wrap:
            doc["additionalCosts"] = {"giftWrap": {"price": 2.5}}
        return doc


@dataclass
class _Script:
    """The records of one session, built in order."""

    rng: random.Random
    integration_id: str
    profile: str | None
    explicit_application: bool
    records: list[TrafficRecord] = field(default_factory=list)
    lines: list[_Line] = field(default_factory=list)
    events: int = 0

    # ------------------------------------------------------------------ plumbing

    def command(
        self, kind: str, body: Mapping[str, Any], *, event_id: bool = True
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {"type": kind, "integrationId": self.integration_id}
        if event_id:
            self.events += 1
            doc["eventId"] = f"{self.integration_id}-evt-{self.events:02d}"
        if self.explicit_application:
            doc["applicationId"] = 1
        doc.update(body)
        return doc

    def emit(
        self,
        kind: str,
        doc: Mapping[str, Any] | bytes,
        expect: Expect = Expect.APPLIED,
        outputs: tuple[str, ...] = (),
        *,
        key: bytes | _Key | None = _Key.OWN,
        duplicable: bool = True,
    ) -> None:
        # An exact-size copy: orjson's bytes keep about 8 KB of memory for a
        # 1 KB command, and every record is held until sending starts (100k
        # sessions took 1.8 GB; the allowed million ran out of memory).
        value = doc if isinstance(doc, bytes) else bytes(memoryview(json.dumps(doc)))
        record_key = self.integration_id.encode() if key is _Key.OWN else key
        self.records.append(
            TrafficRecord(record_key, value, self.integration_id, kind, expect, outputs)
        )
        has_id = not isinstance(doc, bytes) and "eventId" in doc
        if duplicable and has_id and self.rng.random() < _DUPLICATE_RATE:
            self.records.append(
                TrafficRecord(record_key, value, self.integration_id, "duplicate", Expect.DUPLICATE)
            )

    def event_id_wanted(self) -> bool:
        return self.rng.random() >= _NO_EVENT_ID_RATE

    # ------------------------------------------------------------------ cart

    def new_line(self, taken: set[str]) -> _Line:
        choices = [c for c in _CATALOG if c[0] not in taken]
        sku, name, category, price = self.rng.choice(choices)
        quantity = self.rng.choices((1, 2, 3, 4, 5), weights=(60, 20, 10, 6, 4))[0]
        attributes = None
        if category == "apparel":
            attributes = {"color": self.rng.choice(_COLORS), "size": self.rng.choice("SMLX")}
        gift_wrap = self.rng.random() < 0.08
        return _Line(sku, name, category, price, quantity, attributes, gift_wrap)

    def fresh_cart(self) -> None:
        taken: set[str] = set()
        self.lines = []
        for _ in range(self.rng.randint(1, 8)):
            line = self.new_line(taken)
            taken.add(line.sku)
            self.lines.append(line)

    def change_cart(self) -> None:
        roll = self.rng.random()
        if roll < 0.45 and len(self.lines) < 8:
            self.lines.append(self.new_line({line.sku for line in self.lines}))
        elif roll < 0.7 and len(self.lines) > 1:
            self.lines.pop(self.rng.randrange(len(self.lines)))
        else:
            line = self.rng.choice(self.lines)
            line.quantity = max(1, line.quantity + self.rng.choice((-1, 1, 2)))

    def cart(self) -> list[dict[str, Any]]:
        return [line.document() for line in self.lines]

    # ------------------------------------------------------------------ commands

    def first_session_fields(self, state: str | None = None) -> dict[str, Any]:
        rng = self.rng
        session: dict[str, Any] = {"cartItems": self.cart()}
        if self.profile is not None:
            session["profileId"] = self.profile
            if rng.random() < 0.3:
                session["loyaltyCards"] = [f"LC-{self.profile[-5:]}-{rng.randint(100, 999)}"]
        if rng.random() < 0.3:
            session["storeIntegrationId"] = rng.choice(_STORES)
        if rng.random() < 0.35:
            session["couponCodes"] = [rng.choice(_COUPONS)]
        if rng.random() < 0.1:
            session["referralCode"] = f"REF-{rng.randint(10000, 99999)}"
        if rng.random() < 0.2:
            session["identifiers"] = [f"device-{rng.getrandbits(32):08x}"]
        session["attributes"] = {"channel": rng.choice(_CHANNELS)}
        if state is not None:
            session["state"] = state
        return session

    def open_cart(self) -> None:
        self.fresh_cart()
        doc = self.command("update", {"session": self.first_session_fields()})
        self.emit("update", doc)
        for _ in range(self.rng.randint(0, 3)):
            self.update_cart()

    def update_cart(self) -> None:
        rng = self.rng
        self.change_cart()
        session: dict[str, Any] = {"cartItems": self.cart()}
        if rng.random() < 0.4:
            session["additionalCosts"] = {"shipping": {"price": _money(rng.choice(_SHIPPING))}}
        if rng.random() < 0.15:
            session["couponCodes"] = [rng.choice(_COUPONS)] if rng.random() < 0.7 else []
        if rng.random() < 0.2:
            session["attributes"] = {"paymentMethod": rng.choice(_PAYMENT)}
        doc = self.command("update", {"session": session}, event_id=self.event_id_wanted())
        self.emit("update", doc)

    def close(self) -> None:
        session: dict[str, Any] = {"state": "closed"}
        if self.rng.random() < 0.5:
            # Checkouts often send the final cart with the close.
            session["cartItems"] = self.cart()
            session["additionalCosts"] = {"shipping": {"price": _money(self.rng.choice(_SHIPPING))}}
        doc = self.command("update", {"session": session}, event_id=self.event_id_wanted())
        self.emit("close", doc, outputs=("closed",))

    def cancel(self, kind: str) -> None:
        doc = self.command("update", {"session": {"state": "cancelled"}})
        self.emit(kind, doc, outputs=("cancelled",))

    def partial_return(self) -> bool:
        """Return part of what is left; False when a partial return is impossible."""
        rng = self.rng
        remaining = sum(line.quantity - line.returned for line in self.lines)
        if remaining < 2:
            return False
        budget = rng.randint(1, remaining - 1)  # always leave something unreturned
        candidates = [i for i, line in enumerate(self.lines) if line.quantity > line.returned]
        rng.shuffle(candidates)
        items: list[dict[str, Any]] = []
        for position in candidates[: rng.randint(1, 2)]:
            if budget == 0:
                break
            line = self.lines[position]
            quantity = min(budget, rng.randint(1, line.quantity - line.returned))
            budget -= quantity
            line.returned += quantity
            item: dict[str, Any] = {"position": position, "quantity": quantity}
            if rng.random() < 0.3:
                item["sku"] = line.sku
            items.append(item)
        doc = self.command("return", {"returnedCartItems": items})
        self.emit("return", doc, outputs=("returned",))
        return True

    def reopen(self) -> None:
        doc = self.command("reopen", {})
        self.emit("reopen", doc, outputs=("reopened",))
        for line in self.lines:
            line.returned = 0

    def created_closed(self, *, key: bytes | _Key | None = _Key.OWN) -> None:
        self.fresh_cart()
        session = self.first_session_fields(state="closed")
        doc = self.command("update", {"session": session})
        kind = "instant" if key is _Key.OWN else "mis_keyed"
        self.emit(kind, doc, outputs=("closed",), key=key, duplicable=key is _Key.OWN)

    # ------------------------------------------------------------------ bad records

    def bad_record(self, kind: str) -> None:
        """Insert a rejected record at a random point (it must not change the session)."""
        rng = self.rng
        if kind == "malformed_json":
            if rng.random() < 0.5:
                value = json.dumps(self.command("update", {"session": {"cartItems": self.cart()}}))
                value = value[: max(10, len(value) // 2)]  # truncated in flight
            else:
                value = b"\xff\xfeCHECKOUT-V1|" + self.integration_id.encode() + b"|\x00\x01"
            record = TrafficRecord(
                self.integration_id.encode(),
                value,
                self.integration_id,
                kind,
                Expect.REJECTED,
                ("rejected",),
            )
        else:
            cart = self.cart() or [{"sku": "MUG-CER-05", "quantity": 1, "price": 12.5}]
            if kind == "wrong_type":
                cart[rng.randrange(len(cart))]["quantity"] = "two"
                session: dict[str, Any] = {"cartItems": cart}
            else:  # coupon_too_long
                session = {"couponCodes": ["WELCOME-" + "X" * rng.randint(95, 140)]}
            doc = self.command("update", {"session": session})
            record = TrafficRecord(
                self.integration_id.encode(),
                json.dumps(doc),
                self.integration_id,
                kind,
                Expect.REJECTED,
                ("rejected",),
            )
        # Any point of the session's stream will do: decoding rejects the
        # record before the stored session is even read.
        self.records.insert(rng.randint(0, len(self.records)), record)


def _scenario(rng: random.Random) -> str:
    names = [name for name, _ in _SCENARIOS]
    weights = [weight for _, weight in _SCENARIOS]
    return rng.choices(names, weights=weights)[0]


def _play(script: _Script, scenario: str) -> None:
    rng = script.rng
    if scenario == "instant":
        script.created_closed()
        return
    script.open_cart()
    if scenario == "abandoned":
        return
    if scenario == "cancelled":
        script.cancel("cancel")
        return
    script.close()
    if scenario == "returned":
        script.partial_return()
        if rng.random() < 0.35:
            script.partial_return()
    elif scenario == "revoked":
        script.cancel("revoke")
    elif scenario == "reopened":
        script.reopen()
        script.update_cart()
        script.close()


def generate_traffic(sessions: int, seed: int, prefix: str = "") -> Traffic:
    """The records for ``sessions`` sessions, reproducible for a given ``seed``.

    ``prefix`` begins every integration id and profile id: the same records,
    for sessions and profiles no earlier run with another prefix touched.
    """
    if sessions < 1:
        raise ValueError("sessions must be at least 1")
    if len(prefix) > MAX_PREFIX:
        raise ValueError(f"the prefix may have at most {MAX_PREFIX} characters")
    rng = random.Random(seed)  # noqa: S311 - sample data, not secrets
    pool = [f"{prefix}customer-{n:05d}" for n in range(max(1, sessions // 4))]
    # A checkout bug: a few records keyed by something else than their
    # integrationId (the first by nothing at all). Single-record sessions.
    step = max(1, sessions // max(1, sessions // 60))
    mis_keyed = {index: n for n, index in enumerate(range(min(1, sessions - 1), sessions, step))}
    scripts: list[_Script] = []
    scenarios: Counter[str] = Counter()
    for index in range(sessions):
        integration_id = f"{prefix}cart-{index:06d}"
        profile = rng.choice(pool) if rng.random() < 0.65 else None
        script = _Script(rng, integration_id, profile, rng.random() < 0.5)
        if index in mis_keyed:
            key = None if mis_keyed[index] == 0 else f"{prefix}CART-{index:06d}".encode()
            script.created_closed(key=key)
            scenarios["mis_keyed"] += 1
        else:
            scenario = _scenario(rng)
            _play(script, scenario)
            scenarios[scenario] += 1
        scripts.append(script)
    profiles = Counter(s.profile for s in scripts if s.profile is not None)

    bad_each = max(1, sessions // 60)
    keyed = [s for s in scripts if not s.records[0].mis_keyed]
    for kind in ("malformed_json", "wrong_type", "coupon_too_long"):
        for script in rng.sample(keyed, min(bad_each, len(keyed))):
            script.bad_record(kind)
    ended_closed = [s for s in scripts if s.records[-1].kind == "close"]
    for script in rng.sample(ended_closed, min(bad_each, len(ended_closed))):
        # Not allowed: a closed session cannot be modified unless reopened.
        script.change_cart()
        doc = script.command("update", {"session": {"cartItems": script.cart()}})
        script.emit("update_closed", doc, Expect.REJECTED, ("rejected",), duplicable=False)
    still_open = [s for s in scripts if s.records[-1].kind == "update"]
    for script in rng.sample(still_open, min(bad_each, len(still_open))):
        doc = script.command("reopen", {})
        script.emit("reopen_open", doc, Expect.REJECTED, ("rejected",), duplicable=False)
    for n in range(bad_each):
        # A return for a session that never existed, somewhere in the traffic.
        ghost = _Script(rng, f"{prefix}cart-{sessions + n:06d}", None, False)
        doc = ghost.command("return", {"returnedCartItems": [{"position": 0, "quantity": 1}]})
        ghost.emit("unknown_session", doc, Expect.REJECTED, ("rejected",), duplicable=False)
        scripts.insert(rng.randint(0, len(scripts)), ghost)

    records = interleave(rng, [s.records for s in scripts])
    expected: Counter[str] = Counter(dict.fromkeys(OUTPUT_KINDS, 0))
    for record in records:
        expected.update(record.outputs)
    summary = TrafficSummary(
        sessions=sessions,
        seed=seed,
        prefix=prefix,
        records=len(records),
        profiles=len(profiles),
        profile_sessions=profiles.total(),
        anonymous_sessions=sessions - profiles.total(),
        repeat_profiles=sum(1 for n in profiles.values() if n > 1),
        scenarios=dict(scenarios),
        kinds=dict(Counter(r.kind for r in records)),
        expected=dict(expected),
    )
    return Traffic(records, summary)


def interleave(rng: random.Random, streams: list[list[T]], window: int = _IN_FLIGHT) -> list[T]:
    """Merge per-session streams, keeping each one's order: ``window`` sessions
    are in flight at once, the next starts when one finishes."""
    pending = [list(reversed(s)) for s in streams if s]
    pending.reverse()
    active: list[list[T]] = []
    merged: list[T] = []
    while pending or active:
        while pending and len(active) < window:
            active.append(pending.pop())
        index = rng.randrange(len(active))
        stream = active[index]
        merged.append(stream.pop())
        if not stream:
            active[index] = active[-1]
            active.pop()
    return merged


def generate(sessions: int, seed: int, prefix: str = "") -> list[tuple[bytes | None, bytes]]:
    """``(key, value)`` command records for ``sessions`` sessions, reproducible per ``seed``."""
    return generate_traffic(sessions, seed, prefix).pairs()


async def _acknowledged(futures: list[asyncio.Future[Any]], servers: str) -> None:
    """Wait for every record's acknowledgement; raise the first failure, or
    ``KafkaTimeoutError`` past the client's delivery timeout (aiokafka's
    idempotent producer retries through an outage for ever)."""
    from aiokafka.errors import KafkaTimeoutError

    from stream_app.client import DELIVERY_TIMEOUT_S

    if not futures:
        return
    done, pending = await asyncio.wait(
        futures, timeout=DELIVERY_TIMEOUT_S, return_when=asyncio.FIRST_EXCEPTION
    )
    for future in done:
        future.result()
    if pending:
        raise KafkaTimeoutError(
            f"Kafka at {servers} did not acknowledge {len(pending)} of {len(futures)} "
            f"records within {DELIVERY_TIMEOUT_S:g} s"
        )


async def records_held(settings: Settings, topic: str) -> int:
    """Offsets between the start and the end of ``topic``'s partitions."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from stream_app.pipeline.kafka import client_options, partition_count, stop_fully

    options = client_options(settings)
    tps = [TopicPartition(topic, p) for p in range(await partition_count(options, topic))]
    consumer = AIOKafkaConsumer(**options, enable_auto_commit=False)
    await consumer.start()
    try:
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
    finally:
        await stop_fully(consumer)
    return sum(ends[tp] - starts[tp] for tp in tps)


def _observe(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def produce_traffic(
    settings: Settings,
    sessions: int,
    seed: int,
    rate: float | None = None,
    prefix: str = "",
    *,
    to_an_empty_topic_only: bool = False,
) -> TrafficSummary:
    """Send the traffic to ``settings.topics.commands`` (created if missing).

    ``rate`` is records per second; ``None`` sends as fast as the broker takes
    them. Per-key order holds: one idempotent producer, ``acks=all``. With
    ``to_an_empty_topic_only``, a command topic that holds records is
    refused (ConfigurationError): sample orders there are applied and
    published like real ones.
    """
    from aiokafka import AIOKafkaProducer

    from stream_app.client import STOP_AFTER_GIVING_UP_S, stop_producer
    from stream_app.pipeline.kafka import client_options
    from stream_app.pipeline.topics import ensure_topics

    traffic = generate_traffic(sessions, seed, prefix)
    await ensure_topics(settings)
    topic = settings.topics.commands
    if to_an_empty_topic_only and (held := await records_held(settings, topic)):
        raise ConfigurationError(
            f"{topic} at {settings.bootstrap_servers} already holds {held:,} records. "
            "This sends sample orders (closes, returns, cancels, bad records) that the "
            "workers apply and publish like real ones: give --yes to send them to a topic "
            "in use, with a --prefix so that their ids meet none of its sessions"
        )
    producer = AIOKafkaProducer(
        **client_options(settings), acks="all", enable_idempotence=True, linger_ms=5
    )
    await producer.start()
    loop = asyncio.get_running_loop()
    began = loop.time()
    futures: list[asyncio.Future[Any]] = []
    try:
        for index, record in enumerate(traffic.records):
            if rate is not None and rate > 0:
                delay = began + index / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            futures.append(await producer.send(topic, value=record.value, key=record.key))
        await _acknowledged(futures, settings.bootstrap_servers)
    except BaseException:
        # The first failure ends the run and is reported; the sends still in
        # flight fail with it (a broker outage fails hundreds at once), and
        # each would otherwise log "Future exception was never retrieved".
        for future in futures:
            future.add_done_callback(_observe)
        raise
    finally:
        # With records Kafka never acknowledged, the stop would wait for them.
        bound = None if all(f.done() for f in futures) else STOP_AFTER_GIVING_UP_S
        await stop_producer(producer, bound)
    log.info(
        "produced %d records for %d sessions to %s in %.1fs",
        len(traffic.records),
        sessions,
        topic,
        loop.time() - began,
    )
    return traffic.summary
