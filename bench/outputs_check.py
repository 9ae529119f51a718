"""What the pipeline bench checks of a contender's outputs once its window
has ended: every output a JSON document of its key's session, of the kind
its topic holds, and together the (key, kind) of every output the workload
expects. Counting them alone passed outputs of the wrong kind, for the wrong
session, or not JSON at all, and their rate counted."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson

#: The outputs the workload expects, and only those: a rejection or a reopen
#: counted in their place would end a window early, and a close rejected
#: instead of written would pass unseen.
EXPECTED_KINDS = ("closed", "returned", "cancelled")

#: The event of the worker's output on each kind's topic.
_EVENTS = {
    "closed": {"talon_session_closed"},
    "returned": {"talon_session_partially_returned"},
    "cancelled": {"talon_session_cancelled", "talon_session_revoked"},
}


def expected_amounts(
    records: list[Any], step: Callable[..., tuple[Any, Any]]
) -> dict[tuple[bytes, str], list[Decimal]]:
    """The amount of each (key, kind)'s outputs, in order: a close's total, a
    return's returned value, computed by ``step``, the Quix contender's session
    work (``quix_work.step``, integer cents), over the workload's records. A
    contender that lost a session's state, or summed wrongly, made outputs
    of the right kinds for the right keys with other amounts."""
    stored: dict[bytes, dict[str, Any]] = {}
    amounts: dict[tuple[bytes, str], list[Decimal]] = {}
    for record in records:
        session, out = step(orjson.loads(record.value), stored.get(record.key))
        if session is None:
            continue
        stored[record.key] = session
        if out is not None and out["kind"] in _AMOUNT_IN:
            value = out["total"] if out["kind"] == "closed" else out["returnedAmount"]
            amounts.setdefault((record.key, out["kind"]), []).append(Decimal(str(value)))
    return amounts


#: Where each kind's amount is, in the worker's documents and in the Quix
#: work's ({"kind": ..., "total" or "returnedAmount": ...}).
_AMOUNT_IN = {
    "closed": (("session", "total"), ("total",)),
    "returned": (("return", "value"), ("returnedAmount",)),
}


def _amount(doc: dict[str, Any], kind: str) -> Decimal | None:
    for path in _AMOUNT_IN[kind]:
        value: Any = doc
        for name in path:
            value = value.get(name) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            return Decimal(str(value))
    return None


def wrong_outputs(
    read: list[tuple[str, bytes | None, bytes | None]],
    topics: list[str],
    expected: Counter[tuple[bytes, str]],
    amounts: dict[tuple[bytes, str], list[Decimal]] | None = None,
) -> str:
    """What is wrong with the outputs ``read`` (topic, key, value), or "".

    Each must be a JSON object of its key's session, of the kind its topic
    holds (``topics`` in the order of EXPECTED_KINDS; one topic for all: the
    kind is the document's own ``kind``), and the (key, kind) of all of them
    must be what the workload expects. The count alone passed outputs of the
    wrong kind, for the wrong session, or not JSON at all. With ``amounts``
    (:func:`expected_amounts`), the n-th close or return of each key must
    carry the n-th amount: a session whose state was lost passed, total 0."""
    kind_of_topic = dict(zip(topics, EXPECTED_KINDS, strict=True)) if len(topics) > 1 else {}
    got: Counter[tuple[bytes, str]] = Counter()
    for topic, key, value in read:
        shown = (value or b"")[:80]
        try:
            doc = orjson.loads(value or b"")
        except orjson.JSONDecodeError:
            return f"an output on {topic} is not JSON: {shown!r}"
        if not isinstance(doc, dict) or key is None:
            return f"an output on {topic} is no document of a keyed session: {shown!r}"
        kind = kind_of_topic.get(topic) or str(doc.get("kind"))
        if "event" in doc and doc["event"] not in _EVENTS.get(kind, ()):
            return f"a {doc['event']} output on the {kind} topic"
        if "kind" in doc and doc["kind"] != kind:
            return f"a {doc['kind']} output on the {kind} topic"
        if doc.get("integrationId") != key.decode(errors="replace"):
            return f"an output keyed {key!r} of session {doc.get('integrationId')!r}"
        if amounts is not None and kind in _AMOUNT_IN:
            wanted = amounts.get((key, kind), [])
            n = got[key, kind]
            amount = _amount(doc, kind)
            if n < len(wanted) and amount != wanted[n]:
                return f"the {kind} output {n + 1} of {key!r} carries {amount}, not {wanted[n]}"
        got[key, kind] += 1
    if got != expected:
        missing, extra = expected - got, got - expected
        return (
            f"outputs of other sessions or kinds than expected: {sum(missing.values())} "
            f"missing (e.g. {list(missing)[:3]}), {sum(extra.values())} not expected "
            f"(e.g. {list(extra)[:3]})"
        )
    return ""
