"""The Quix Streams contender of ``bench/pipeline_bench.py``: the session
work of the stream-app worker, written the idiomatic Quix way, exactly-once.

    .venv-bench/bin/python bench/quix_contender.py BOOTSTRAP SOURCE SINK GROUP STATE_DIR

Runs from its own virtualenv (``.venv-bench``, ``bench/requirements-quix.txt``):
quixstreams 3.28 needs pydantic < 2.14, which the project's constraints pin
higher. It imports nothing of this repository.

What it does per command, keyed by integrationId (the record key):

* JSON in through Quix's deserializer (orjson), JSON out through its serializer;
* RocksDB state per key (Quix's default store, changelogged, exactly-once):
  the session's cart, costs, attributes, state, and its last 64 event ids;
* a command whose eventId was already applied is dropped (a duplicate);
* ``update``: fields replace the stored ones, attributes merge; a move to
  ``closed`` emits the session with its cart total (integer cents, exact);
  a move to ``cancelled`` emits the cancelled session;
* ``return``: returned quantities are recorded and the returned amount is
  emitted; the session becomes ``partially_returned``;
* every output goes to SINK.

Less than the worker does: no schema validation or rejection records, no
limits, no per-profile stage, no application settings, no session query.

Settings: ``processing_guarantee="exactly-once"``, ``commit_interval``
(``--commit-interval``, default 1 s; Quix's own default is 5 s), a 32 MiB
RocksDB block cache (the worker's default) and otherwise Quix's defaults.
Prints ``FIRST_CONSUMED <unix time>`` when it processes its first record.
Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from quixstreams import Application, State
from quixstreams.state.rocksdb import RocksDBOptions

_SESSION_FIELDS = ("profileId", "storeIntegrationId", "couponCodes", "referralCode",
                   "loyaltyCards", "identifiers")
_first = [True]


def _cents(value: Any) -> int:
    return round(float(value) * 100)


def _total(session: dict[str, Any]) -> int:
    items = sum(_cents(i["price"]) * int(i["quantity"]) for i in session["cartItems"])
    costs = sum(_cents(c["price"]) for c in session["additionalCosts"].values())
    return items + costs


def process(cmd: dict[str, Any], state: State) -> dict[str, Any] | None:
    if _first[0]:
        _first[0] = False
        print(f"FIRST_CONSUMED {time.time():.6f}", flush=True)
    session: dict[str, Any] | None = state.get("session")
    event = cmd.get("eventId")
    if session is not None and event and event in session["events"]:
        return None  # a duplicate
    iid = cmd["integrationId"]
    out: dict[str, Any] | None = None
    if cmd["type"] == "update":
        body = cmd.get("session") or {}
        if session is None:
            session = {"integrationId": iid, "state": "open", "cartItems": [],
                       "additionalCosts": {}, "attributes": {}, "returned": {}, "events": []}
        before = session["state"]
        for name in _SESSION_FIELDS:
            if body.get(name) is not None:
                session[name] = body[name]
        if body.get("cartItems") is not None:
            session["cartItems"] = body["cartItems"]
        if body.get("additionalCosts") is not None:
            session["additionalCosts"] = body["additionalCosts"]
        if body.get("attributes"):
            attributes = session["attributes"]
            for k, v in body["attributes"].items():
                if v is None:
                    attributes.pop(k, None)
                else:
                    attributes[k] = v
        after = body.get("state") or before
        session["state"] = after
        if after == "closed" and before == "open":
            total = _total(session)
            out = {"kind": "closed", "integrationId": iid, "total": total / 100,
                   "session": {k: v for k, v in session.items() if k != "events"}}
        elif after == "cancelled" and before != "cancelled":
            out = {"kind": "cancelled", "integrationId": iid,
                   "session": {k: v for k, v in session.items() if k != "events"}}
    elif cmd["type"] == "return" and session is not None:
        returned = session["returned"]
        amount = 0
        for item in cmd.get("returnedCartItems") or ():
            position = str(item["position"])
            returned[position] = returned.get(position, 0) + int(item["quantity"])
            line = session["cartItems"][int(item["position"])]
            amount += _cents(line["price"]) * int(item["quantity"])
        session["state"] = "partially_returned"
        out = {"kind": "returned", "integrationId": iid, "returnedAmount": amount / 100,
               "returnedCartItems": cmd.get("returnedCartItems"), "returned": returned}
    else:
        return None
    if event:
        events = session["events"]
        events.append(event)
        del events[:-64]
    state.set("session", session)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bootstrap")
    parser.add_argument("source")
    parser.add_argument("sink")
    parser.add_argument("group")
    parser.add_argument("state_dir")
    parser.add_argument("--commit-interval", type=float, default=1.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        processing_guarantee="exactly-once",
        commit_interval=args.commit_interval,
        state_dir=args.state_dir,
        rocksdb_options=RocksDBOptions(block_cache_size=32 * 1024 * 1024),
        loglevel="WARNING",
    )
    source = app.topic(args.source, value_deserializer="json")
    sink = app.topic(args.sink, value_serializer="json")
    sdf = app.dataframe(source)
    sdf = sdf.apply(process, stateful=True).filter(lambda out: out is not None)
    sdf.to_topic(sink)
    app.run()


if __name__ == "__main__":
    main()
