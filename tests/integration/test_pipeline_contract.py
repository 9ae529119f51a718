"""Every row of the spec's transition table, and every rejected case, driven
through Kafka: commands in on the command topic, records out on the right
downstream topic, read as a read_committed analytics consumer would."""

from __future__ import annotations

import base64
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from stream_app import json
from tests.integration.harness import Deployment, Output, Worker, command, consume, produce

CART = [
    {"sku": "shoe", "quantity": 2, "price": 0.1, "name": "Shoe"},
    {"sku": "sock", "quantity": 3, "price": 0.2},
]
OPEN = {"profileId": "", "cartItems": CART}


def update(iid: str, eid: str, **session: Any) -> tuple[bytes, bytes]:
    return iid.encode(), command("update", iid, eventId=eid, session=session)


def ret(iid: str, eid: str, *lines: dict[str, Any]) -> tuple[bytes, bytes]:
    return iid.encode(), command("return", iid, eventId=eid, returnedCartItems=list(lines))


def reopen(iid: str, eid: str) -> tuple[bytes, bytes]:
    return iid.encode(), command("reopen", iid, eventId=eid)


SCRIPT: list[tuple[bytes | None, bytes | None]] = [
    # (none) -> open, then open -> open (updated), then open -> closed
    update("t-open", "o1", **OPEN),
    update("t-open", "o2", couponCodes=["SAVE10"]),
    update("t-open", "o3", state="closed"),
    # (none) -> closed in one command
    update("t-created-closed", "cc1", state="closed", **OPEN),
    # open -> cancelled
    update("t-cancel-open", "co1", **OPEN),
    update("t-cancel-open", "co2", state="cancelled"),
    # closed -> cancelled (revoked)
    update("t-revoke", "rv1", state="closed", **OPEN),
    update("t-revoke", "rv2", state="cancelled"),
    # closed -> partially_returned -> partially_returned -> cancelled
    update("t-return", "r1", state="closed", **OPEN),
    ret("t-return", "r2", {"position": 1, "quantity": 1}),
    ret("t-return", "r3", {"sku": "shoe"}),
    update("t-return", "r4", state="cancelled"),
    # closed -> open (reopened) -> closed again
    update("t-reopen", "ro1", state="closed", **OPEN),
    reopen("t-reopen", "ro2"),
    update("t-reopen", "ro3", state="closed", couponCodes=["AGAIN"]),
    # duplicate eventId: the second close is recognised, nothing emitted twice
    update("t-dup", "d1", state="closed", **OPEN),
    update("t-dup", "d1", state="closed", **OPEN),
    # rejected: created cancelled, update of a closed session, return of an open
    # one, reopen of an open one, anything on a cancelled one, unknown sessions
    update("x-create-cancelled", "x1", state="cancelled", **OPEN),
    update("x-closed", "x2", state="closed", **OPEN),
    update("x-closed", "x3", couponCodes=["LATE"]),
    update("x-open", "x4", **OPEN),
    ret("x-open", "x5", {"position": 0}),
    reopen("x-open", "x6"),
    update("x-cancelled", "x7", state="cancelled", **OPEN),
    update("x-open", "x8", state="cancelled"),
    reopen("x-open", "x9"),
    ret("x-unknown", "x10", {"position": 0}),
    reopen("x-unknown", "x11"),
    # rejected: too much returned
    update("x-over", "x12", state="closed", **OPEN),
    ret("x-over", "x13", {"position": 0, "quantity": 3}),
    # malformed and wrong-typed records, a tombstone, a limit
    (b"x-garbage", b"\x00\xffnot json at all"),
    (
        b"x-typed",
        command(
            "update",
            "x-typed",
            session={"cartItems": [{"sku": "a", "quantity": "two", "price": 1}]},
        ),
    ),
    (b"x-typed2", b"[1, 2, 3]"),
    (b"x-tombstone", None),
    (b"x-limit", command("update", "x-limit", session={"couponCodes": ["C" * 101]})),
    # wrong key and no key: re-keyed through the repartition topic, then applied
    (b"not-the-id", command("update", "t-rekeyed", eventId="rk1", session={"state": "closed"})),
    (None, command("update", "t-nokey", eventId="nk1", session={"state": "closed"})),
]


def _script_position(doc: dict[str, Any]) -> int:
    """Where the command that caused ``doc`` stands in SCRIPT (outputs of one
    session are on several topics, so their order comes from their cause)."""
    event_id = doc.get("eventId")
    if event_id is None and isinstance(doc.get("command"), dict):
        event_id = doc["command"].get("eventId")
    order = {
        json.loads(v)["eventId"]: i
        for i, (_, v) in enumerate(SCRIPT)
        if v and v.startswith(b"{") and b'"eventId"' in v
    }
    return order.get(event_id, len(SCRIPT))


def by_integration_id(outputs: list[Output]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    docs = [(out, out.doc()) for out in outputs]
    for out, doc in sorted(docs, key=lambda pair: _script_position(pair[1])):
        grouped[doc.get("integrationId") or (out.key or b"").decode(errors="replace")].append(
            {**doc, "_topic": out.topic}
        )
    return grouped


async def test_every_transition_and_rejection_through_kafka(
    deployment: Deployment, workers: Callable[..., Worker]
) -> None:
    t = deployment.topics
    await produce(deployment.bootstrap, t.commands, SCRIPT)
    workers(deployment)
    outputs = await consume(
        deployment.bootstrap, deployment.output_topics(), expect=32, timeout=120, settle=3
    )
    topic_of = {
        t.closed: "closed",
        t.returned: "returned",
        t.cancelled: "cancelled",
        t.reopened: "reopened",
        t.rejected: "rejected",
    }
    events = {
        iid: [(topic_of[d["_topic"]], d.get("event") or d.get("reason")) for d in docs]
        for iid, docs in by_integration_id(outputs).items()
    }
    closed = ("closed", "talon_session_closed")
    assert events["t-open"] == [closed]
    assert events["t-created-closed"] == [closed]
    assert events["t-cancel-open"] == [("cancelled", "talon_session_cancelled")]
    assert events["t-revoke"] == [closed, ("cancelled", "talon_session_revoked")]
    returned = ("returned", "talon_session_partially_returned")
    assert events["t-return"] == [
        closed,
        returned,
        returned,
        ("cancelled", "talon_session_cancelled"),
    ]
    assert events["t-reopen"] == [closed, ("reopened", "talon_session_reopened"), closed]
    assert events["t-dup"] == [closed]
    assert events["t-rekeyed"] == [closed]
    assert events["t-nokey"] == [closed]
    rejected = "rejected"
    assert events["x-create-cancelled"] == [(rejected, "INVALID_TRANSITION")]
    assert events["x-closed"] == [closed, (rejected, "INVALID_TRANSITION")]
    assert events["x-open"] == [
        (rejected, "INVALID_TRANSITION"),  # return of an open session
        (rejected, "INVALID_TRANSITION"),  # reopen of an open session
        ("cancelled", "talon_session_cancelled"),
        (rejected, "INVALID_TRANSITION"),  # reopen of a cancelled session
    ]
    assert events["x-cancelled"] == [(rejected, "INVALID_TRANSITION")]
    assert events["x-unknown"] == [(rejected, "UNKNOWN_SESSION")] * 2
    assert events["x-over"] == [closed, (rejected, "RETURN_EXCEEDS_REMAINING")]
    assert events["x-garbage"] == [(rejected, "MALFORMED_JSON")]
    assert events["x-typed"] == [(rejected, "SCHEMA_VIOLATION")]
    assert events["x-typed2"] == [(rejected, "SCHEMA_VIOLATION")]  # JSON, not an object
    assert events["x-tombstone"] == [(rejected, "MALFORMED_JSON")]  # no value at all
    assert events["x-limit"] == [(rejected, "LIMIT_EXCEEDED")]
    # Every output was checked above: no session but these had any, and all
    # their lists together are the 32 outputs the script makes.
    assert sorted(events) == sorted(
        ["t-open", "t-created-closed", "t-cancel-open", "t-revoke", "t-return", "t-reopen",
         "t-dup", "t-rekeyed", "t-nokey", "x-create-cancelled", "x-closed", "x-open",
         "x-cancelled", "x-unknown", "x-over", "x-garbage", "x-typed", "x-typed2",
         "x-tombstone", "x-limit"]
    )  # fmt: skip
    assert len(outputs) == 32

    docs = by_integration_id(outputs)
    # The session content: exact totals, state, counters, the caused-by eventId.
    t_open = docs["t-open"][0]
    assert t_open["eventId"] == "o3"
    session = t_open["session"]
    assert session["state"] == "closed"
    assert session["couponCodes"] == ["SAVE10"]
    assert session["cartItemTotal"] == 0.8  # 2 x 0.1 + 3 x 0.2, exactly
    assert session["total"] == 0.8
    assert session["updateCount"] == 3
    assert session["firstSession"] is True  # anonymous
    assert isinstance(session["id"], int)
    assert session["id"] > 0
    assert b'"cartItemTotal":0.8' in json.dumps(session)

    second_return = docs["t-return"][2]
    assert second_return["session"]["state"] == "partially_returned"
    assert second_return["return"]["lines"] == [
        {"position": 0, "sku": "shoe", "quantity": 2, "value": 0.2}
    ]
    items = second_return["session"]["cartItems"]
    assert [(i["returnedQuantity"], i["remainingQuantity"]) for i in items] == [(2, 0), (1, 2)]

    reclosed = docs["t-reopen"][2]["session"]
    assert reclosed["couponCodes"] == ["AGAIN"]
    assert reclosed["id"] == docs["t-reopen"][0]["session"]["id"]

    # Rejections keep where the record came from and the original command.
    garbage = docs["x-garbage"][0]
    assert garbage["source"]["topic"] == t.commands
    assert isinstance(garbage["source"]["offset"], int)
    assert base64.b64decode(garbage["valueBase64"]) == b"\x00\xffnot json at all"
    assert garbage["valueLength"] == len(b"\x00\xffnot json at all")
    assert garbage["valueTruncated"] is False
    assert "command" not in garbage
    typed = docs["x-typed"][0]
    assert base64.b64decode(typed["keyBase64"]) == b"x-typed"
    assert typed["command"]["session"]["cartItems"][0]["quantity"] == "two"
    assert typed["errors"][0]["source"]["pointer"] == "/session/cartItems/0/quantity"
    over = docs["x-over"][1]
    assert over["errors"][0]["source"]["pointer"].startswith("/returnedCartItems/0")
    # A re-keyed record reports where it first arrived, not the repartition topic.
    assert docs["t-rekeyed"][0]["eventId"] == "rk1"
    nokey = docs["t-nokey"][0]
    assert nokey["eventId"] == "nk1"
