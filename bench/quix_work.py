"""The Quix contender's session work, with no Kafka and no Quix: one command
applied to the stored session (plain JSON dicts), and the output it makes.

Two contenders of ``bench/pipeline_bench.py`` run it: Quix Streams
(``bench/quix_contender.py``, from ``.venv-bench``) and the worker's own
engine (``bench/engine_contender.py``). The same work on both measures the
two engines against each other, apart from the worker's session contract.
It imports nothing but the standard library, so that both virtualenvs can.

Per command, keyed by integrationId:

* a command whose eventId was already applied is dropped (a duplicate);
* ``update``: fields replace the stored ones, attributes merge; a move to
  ``closed`` emits the session with its cart total (integer cents, exact);
  a move to ``cancelled`` emits the cancelled session;
* ``return``: returned quantities are recorded and the returned amount is
  emitted; the session becomes ``partially_returned``;
* the session keeps its last 64 event ids.

Less than the worker does: no schema validation or rejection records, no
limits, no per-profile stage, no application settings, float prices.
"""

from __future__ import annotations

from typing import Any

_SESSION_FIELDS = ("profileId", "storeIntegrationId", "couponCodes", "referralCode",
                   "loyaltyCards", "identifiers")


def _cents(value: Any) -> int:
    return round(float(value) * 100)


def _total(session: dict[str, Any]) -> int:
    items = sum(_cents(i["price"]) * int(i["quantity"]) for i in session["cartItems"])
    costs = sum(_cents(c["price"]) for c in session["additionalCosts"].values())
    return items + costs


def step(cmd: dict[str, Any], session: dict[str, Any] | None
         ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the session to store, or None to store nothing; the output, or None)."""
    event = cmd.get("eventId")
    if session is not None and event and event in session["events"]:
        return None, None  # a duplicate
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
        return None, None
    if event:
        events = session["events"]
        events.append(event)
        del events[:-64]
    return session, out
