"""The checkout workload of ``bench/pipeline_bench.py``: deterministic command
records for N customer sessions, interleaved the way many shoppers' traffic
arrives, with what each record is expected to produce.

Per session: an opening update with a cart of 1-20 lines (fewer lines are
likelier), then 1-4 further updates that change the cart and resend it whole,
then one ending: abandoned (left open), closed, cancelled while open, closed
then partially returned once or twice, or closed then revoked (cancelled).
About 5% of records carrying an ``eventId`` are resent as duplicates. Two
thirds of sessions belong to a customer profile. Commands are 0.3-1.5 KB.

``WINDOW`` sessions are in flight at once, so closes, returns and cancels
are spread through the whole topic: outputs appear throughout a run.

Only the standard library and orjson: the Quix contender does not import it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson

from stream_app.demo.traffic import interleave

#: Sessions in flight at once: the interleaving window.
WINDOW = 200
DUPLICATE_RATE = 0.05

_NOUNS = ("T-shirt", "hoodie", "mug", "candle", "towel", "lamp", "earbuds", "cable",
          "charger", "socks", "pen", "bag")
_CATEGORIES = ("apparel", "home", "grocery", "electronics", "books")
CATALOG: tuple[tuple[str, str, str, float], ...] = tuple(
    (
        f"S{n:05d}",
        _NOUNS[(n * 7) % len(_NOUNS)],
        _CATEGORIES[n % len(_CATEGORIES)],
        round(1.99 + (n * 37 % 900) / 10, 2),
    )
    for n in range(120)
)
_COUPONS = ("WELCOME10", "SUMMER24", "FREESHIP", "VIP-15", "BUNDLE3")
_CHANNELS = ("web", "ios", "android", "pos")
_PAYMENT = ("card", "paypal", "invoice", "applepay")
_CITIES = ("Berlin", "Munich", "Hamburg", "Cologne", "Leipzig")
#: Cart sizes 1..20, smaller ones likelier (mean about 6 lines).
_SIZES = tuple(range(1, 21))
_SIZE_WEIGHTS = tuple(21 - n for n in _SIZES)
_ENDINGS = (("abandoned", 10), ("closed", 50), ("cancelled", 10), ("returned", 20),
            ("revoked", 10))


@dataclass(frozen=True, slots=True)
class Rec:
    key: bytes
    value: bytes
    #: What a correct session processor emits for it: closed, returned,
    #: cancelled, or None (an update, an abandoned cart, a duplicate).
    output: str | None
    #: Whether a stateless loop forwards it (a close, cancel or return,
    #: duplicates included): the raw contenders' output count.
    forwarded: bool


@dataclass
class Workload:
    records: list[Rec]
    sessions: int

    @property
    def expected_outputs(self) -> int:
        return sum(1 for r in self.records if r.output)

    @property
    def forwarded(self) -> int:
        return sum(1 for r in self.records if r.forwarded)

    def describe(self) -> str:
        sizes = sorted(len(r.value) for r in self.records)
        kinds = Counter(r.output for r in self.records if r.output)
        dups = sum(1 for r in self.records if r.output is None and r.forwarded)
        n = len(sizes)
        return (
            f"{n} commands for {self.sessions} sessions ({n / self.sessions:.2f} per session); "
            f"command bytes min {sizes[0]}, median {sizes[n // 2]}, p99 {sizes[n * 99 // 100]}, "
            f"max {sizes[-1]}; expected outputs {sum(kinds.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}); "
            f"duplicate closes/cancels/returns {dups}"
        )


@dataclass
class _Session:
    rng: random.Random
    iid: str
    profile: str | None
    lines: list[list[Any]] = field(default_factory=list)  # [catalog index, quantity]
    returned: list[int] = field(default_factory=list)
    events: int = 0
    out: list[Rec] = field(default_factory=list)

    def emit(self, doc: dict[str, Any], output: str | None) -> None:
        self.events += 1
        doc["eventId"] = f"{self.iid}-e{self.events:02d}"
        value = orjson.dumps(doc)
        key = self.iid.encode()
        forwarded = output is not None
        self.out.append(Rec(key, value, output, forwarded))
        if self.rng.random() < DUPLICATE_RATE:
            self.out.append(Rec(key, value, None, forwarded))

    def cart(self) -> list[dict[str, Any]]:
        items = []
        for index, quantity in self.lines:
            sku, name, _, price = CATALOG[index]
            items.append({"sku": sku, "name": name, "quantity": quantity, "price": price})
        return items

    def fresh_cart(self) -> None:
        size = self.rng.choices(_SIZES, _SIZE_WEIGHTS)[0]
        picks = self.rng.sample(range(len(CATALOG)), size)
        self.lines = [[i, self.rng.choice((1, 1, 1, 2, 2, 3, 5))] for i in picks]

    def change_cart(self) -> None:
        roll = self.rng.random()
        if roll < 0.4 and len(self.lines) < 20:
            taken = {i for i, _ in self.lines}
            free = [i for i in range(len(CATALOG)) if i not in taken]
            self.lines.append([self.rng.choice(free), 1])
        elif roll < 0.65 and len(self.lines) > 1:
            self.lines.pop(self.rng.randrange(len(self.lines)))
        else:
            line = self.rng.choice(self.lines)
            line[1] = max(1, line[1] + self.rng.choice((-1, 1, 2)))

    def context(self, full: bool = False) -> dict[str, Any]:
        """Checkout context sent along with updates (what pads small commands to 0.3 KB)."""
        rng = self.rng
        context = {
            "channel": rng.choice(_CHANNELS),
            "paymentMethod": rng.choice(_PAYMENT),
            "shippingCity": rng.choice(_CITIES),
            "locale": "de-DE",
        }
        if full:
            context["userAgent"] = "Mozilla/5.0 (X11; Linux x86_64) Checkout/4.2"
            context["checkoutStep"] = "confirmation"
        return context

    def command(self, session: dict[str, Any]) -> dict[str, Any]:
        return {"type": "update", "integrationId": self.iid, "applicationId": 1,
                "session": session}

    def open(self) -> None:
        self.fresh_cart()
        session: dict[str, Any] = {"cartItems": self.cart(), "attributes": self.context(),
                                   "identifiers": [f"device-{self.rng.getrandbits(32):08x}"]}
        if self.profile:
            session["profileId"] = self.profile
        if self.rng.random() < 0.35:
            session["couponCodes"] = [self.rng.choice(_COUPONS)]
        self.emit(self.command(session), None)

    def update(self) -> None:
        self.change_cart()
        session = {"cartItems": self.cart(), "attributes": self.context(),
                   "additionalCosts": {"shipping": {"price": self.rng.choice((0, 4.99, 6.9))}}}
        self.emit(self.command(session), None)

    def close(self) -> None:
        self.returned = [0] * len(self.lines)
        session: dict[str, Any] = {"state": "closed"}
        if self.rng.random() < 0.5:  # the final cart, sent with the close
            session["cartItems"] = self.cart()
            session["attributes"] = {**self.context(), "checkoutStep": "confirmation"}
        else:
            session["attributes"] = self.context(True)
        self.emit(self.command(session), "closed")

    def cancel(self) -> None:
        session = {"state": "cancelled", "attributes": self.context(True)}
        self.emit(self.command(session), "cancelled")

    def give_back(self) -> bool:
        left = [(p, q - r) for p, ((_, q), r) in enumerate(zip(self.lines, self.returned,
                                                                 strict=True)) if q > r]
        if sum(q for _, q in left) < 2:
            return False
        position, _ = self.rng.choice(left)
        quantity = 1
        self.returned[position] += quantity
        doc = {"type": "return", "integrationId": self.iid, "applicationId": 1,
               "returnedCartItems": [{"position": position, "quantity": quantity,
                                      "sku": CATALOG[self.lines[position][0]][0]}],
               "reason": "customer return", "returnedAt": "2026-11-26T01:00:00Z",
               "note": "parcel received at the central warehouse, items checked and restocked"}
        self.emit(doc, "returned")
        return True


def generate(sessions: int, seed: int = 8) -> Workload:
    """Command records for ``sessions`` sessions, reproducible for a ``seed``."""
    rng = random.Random(seed)
    profiles = [f"customer-{n:06d}" for n in range(max(1, sessions // 4))]
    names = [name for name, _ in _ENDINGS]
    weights = [weight for _, weight in _ENDINGS]
    streams: list[list[Rec]] = []
    for n in range(sessions):
        profile = rng.choice(profiles) if rng.random() < 0.65 else None
        s = _Session(rng, f"cart-{n:07d}", profile)
        s.open()
        for _ in range(rng.randint(1, 4)):
            s.update()
        ending = rng.choices(names, weights)[0]
        if ending == "cancelled":
            s.cancel()
        elif ending != "abandoned":
            s.close()
            if ending == "returned" and s.give_back() and rng.random() < 0.35:
                s.give_back()
            elif ending == "revoked":
                s.cancel()
        streams.append(s.out)
    return Workload(interleave(rng, streams, WINDOW), sessions)


if __name__ == "__main__":
    import sys
    import time

    start = time.perf_counter()
    w = generate(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
    print(w.describe(), f"({time.perf_counter() - start:.1f}s)")
