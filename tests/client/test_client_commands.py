"""The producer client without a broker: the commands it builds and the mistakes
it refuses, with the reason codes and pointers the workers would give."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from decimal import Decimal
from enum import Enum
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaTimeoutError, OutOfOrderSequenceNumber

from stream_app import json
from stream_app.client import (
    CommandRejectedError,
    SentCommand,
    SessionClient,
    cancel_command,
    cart_item,
    close_command,
    new_event_id,
    reopen_command,
    return_command,
    returned_item,
    update_command,
    validate_command,
)
from stream_app.domain import (
    ApplicationSettings,
    Reason,
    ReopenCommand,
    ReturnCommand,
    SessionState,
    UpdateCommand,
    decode_command,
)
from stream_app.settings import Settings


def test_builders_use_the_contract_field_names_and_decode_as_the_workers_do() -> None:
    update = update_command(
        "cart-1",
        event_id="e-1",
        application_id=7,
        profile_id="alice",
        store_integration_id="store-1",
        coupon_codes=["SAVE10"],
        referral_code="REF",
        loyalty_cards=["LC-1234"],
        cart_items=[
            cart_item(
                "SKU-1",
                2,
                Decimal("19.99"),
                name="Shirt",
                attributes={"color": "navy"},
                additional_costs={"giftWrap": Decimal("2.5")},
                product={"name": "Shirt"},
            )
        ],
        additional_costs={"shipping": 4.99},
        identifiers=["device-1"],
        attributes={"channel": "web", "old": None},
    )
    assert update == {
        "type": "update",
        "integrationId": "cart-1",
        "eventId": "e-1",
        "applicationId": 7,
        "session": {
            "profileId": "alice",
            "storeIntegrationId": "store-1",
            "couponCodes": ["SAVE10"],
            "referralCode": "REF",
            "loyaltyCards": ["LC-1234"],
            "cartItems": [
                {
                    "sku": "SKU-1",
                    "quantity": 2,
                    "price": 19.99,
                    "name": "Shirt",
                    "attributes": {"color": "navy"},
                    "additionalCosts": {"giftWrap": {"price": 2.5}},
                    "product": {"name": "Shirt"},
                }
            ],
            "additionalCosts": {"shipping": {"price": 4.99}},
            "identifiers": ["device-1"],
            "attributes": {"channel": "web", "old": None},
        },
    }
    decoded = decode_command(validate_command(update))
    assert isinstance(decoded, UpdateCommand)
    assert decoded.session.cart_items is not None
    assert decoded.session.cart_items[0].price == Decimal("19.99")  # exact, not a binary float

    closed = decode_command(validate_command(close_command("cart-1", cart_items=[])))
    assert isinstance(closed, UpdateCommand)
    assert closed.session.state is SessionState.CLOSED
    cancelled = decode_command(validate_command(cancel_command("cart-1")))
    assert isinstance(cancelled, UpdateCommand)
    assert cancelled.session.state is SessionState.CANCELLED
    returned = decode_command(
        validate_command(
            return_command("cart-1", [returned_item(0, quantity=1), returned_item(sku="SKU-1")])
        )
    )
    assert isinstance(returned, ReturnCommand)
    assert [(i.position, i.sku, i.quantity) for i in returned.returned_cart_items] == [
        (0, None, 1),
        (None, "SKU-1", None),
    ]
    assert isinstance(decode_command(validate_command(reopen_command("cart-1"))), ReopenCommand)


def test_every_command_gets_its_own_event_id_unless_one_is_given() -> None:
    ids = {reopen_command("cart-1")["eventId"] for _ in range(100)}
    assert len(ids) == 100
    assert all(isinstance(i, str) and 1 <= len(i) <= 255 for i in ids)
    assert cancel_command("cart-1", event_id="mine")["eventId"] == "mine"


def test_an_empty_event_id_is_refused_not_replaced() -> None:
    """`--event-id "$ID"` with $ID unset got a new id on every retry, so a
    retried return could apply twice; the contract refuses "" as an eventId."""
    command = reopen_command("cart-1", event_id="")
    assert command["eventId"] == ""
    with pytest.raises(CommandRejectedError) as refused:
        validate_command(command)
    assert refused.value.pointer == "/eventId"


@pytest.mark.parametrize("field", ["coupon_codes", "loyalty_cards", "identifiers"])
def test_a_string_where_a_list_of_strings_goes_is_refused(field: str) -> None:
    """update_command(coupon_codes="SUMMER24") sent eight one-letter coupons."""
    with pytest.raises(TypeError, match=f"{field} is a list of strings, not a string"):
        update_command("cart-1", **{field: "SUMMER24"})
    assert update_command("cart-1", **{field: ["SUMMER24"]})["session"]


def _session(**fields: Any) -> dict[str, Any]:
    return {"type": "update", "integrationId": "cart-1", "eventId": "e", "session": fields}


#: (command, reason, pointer): content mistakes the decoder finds, for every application.
INVALID: list[tuple[dict[str, Any], Reason, str]] = [
    (
        _session(cartItems=[{"sku": "a", "quantity": "two", "price": 1}]),
        Reason.SCHEMA_VIOLATION,
        "/session/cartItems/0/quantity",
    ),
    (
        _session(cartItems=[{"sku": "a", "quantity": 1}]),
        Reason.SCHEMA_VIOLATION,
        "/session/cartItems/0/price",
    ),
    (_session(couponCodes=["C" * 101]), Reason.LIMIT_EXCEEDED, "/session/couponCodes/0"),
    (_session(loyaltyCards=["no spaces"]), Reason.SCHEMA_VIOLATION, "/session/loyaltyCards/0"),
    (_session(identifiers=["i"] * 6), Reason.LIMIT_EXCEEDED, "/session/identifiers"),
    (_session(state="shipped"), Reason.SCHEMA_VIOLATION, "/session/state"),
    ({"type": "delete", "integrationId": "cart-1"}, Reason.SCHEMA_VIOLATION, "/type"),
    ({"type": "reopen", "integrationId": ""}, Reason.SCHEMA_VIOLATION, "/integrationId"),
    ({"type": "reopen", "integrationId": "c", "eventId": ""}, Reason.SCHEMA_VIOLATION, "/eventId"),
    (
        {"type": "reopen", "integrationId": "c", "applicationId": 0},
        Reason.SCHEMA_VIOLATION,
        "/applicationId",
    ),
    (
        return_command("cart-1", [], event_id="e"),
        Reason.SCHEMA_VIOLATION,
        "/returnedCartItems",
    ),
    (
        return_command("cart-1", [{"quantity": 1}], event_id="e"),
        Reason.SCHEMA_VIOLATION,
        "/returnedCartItems/0",
    ),
]


@pytest.mark.parametrize(("command", "reason", "pointer"), INVALID)
def test_a_mistake_raises_with_the_reason_and_pointer_of_the_rejection_topic(
    command: dict[str, Any], reason: Reason, pointer: str
) -> None:
    with pytest.raises(CommandRejectedError) as caught:
        validate_command(command)
    assert caught.value.reason is reason
    assert caught.value.pointer == pointer
    assert caught.value.command is command
    # The same rejection the worker's decoder builds for the same bytes.
    assert caught.value.rejection == decode_command(json.dumps(command))
    assert str(reason) in str(caught.value)


def test_settings_dependent_rules_are_checked_when_the_settings_are_given() -> None:
    big_cart = _session(cartItems=[{"sku": "a", "quantity": 10_001, "price": 1}])
    validate_command(big_cart)  # unknown settings: flattening might be off
    with pytest.raises(CommandRejectedError) as caught:
        validate_command(big_cart, ApplicationSettings())
    assert (caught.value.reason, caught.value.pointer) == (
        Reason.LIMIT_EXCEEDED,
        "/session/cartItems",
    )
    validate_command(big_cart, ApplicationSettings(flattening=False))

    strict = {7: ApplicationSettings(attributes=frozenset({"city"}), additional_costs=frozenset())}
    attribute = {**_session(attributes={"city": "Berlin", "color": None}), "applicationId": 7}
    with pytest.raises(CommandRejectedError) as caught:
        validate_command(attribute, strict.__getitem__)
    assert (caught.value.reason, caught.value.pointer) == (
        Reason.UNKNOWN_ATTRIBUTE,
        "/session/attributes/color",
    )
    cost = {**_session(additionalCosts={"shipping": {"price": 1}}), "applicationId": 7}
    with pytest.raises(CommandRejectedError) as caught:
        validate_command(cost, strict.__getitem__)
    assert caught.value.reason is Reason.UNKNOWN_ADDITIONAL_COST
    # A cancellation only changes the state of a closed session: not checked.
    validate_command(
        {**_session(state="cancelled", attributes={"x": 1}), "applicationId": 7},
        strict.__getitem__,
    )


def test_a_command_over_the_size_limit_is_refused() -> None:
    command = _session(attributes={"blob": "x" * 2000})
    validate_command(command, max_command_bytes=4096)
    with pytest.raises(CommandRejectedError) as caught:
        validate_command(command, max_command_bytes=1024)
    assert (caught.value.reason, caught.value.pointer) == (Reason.LIMIT_EXCEEDED, "")


def test_money_beyond_64_bits_is_a_rejection_and_infinity_a_value_error() -> None:
    """Before, a Decimal of 1e20 became an int orjson cannot write (TypeError),
    and Infinity raised OverflowError from the builder."""
    command = close_command("c-1", cart_items=[cart_item("A", 1, Decimal("1e20"))])
    with pytest.raises(CommandRejectedError) as caught:
        validate_command(command)
    assert (caught.value.reason, caught.value.pointer) == (
        Reason.LIMIT_EXCEEDED,
        "/session/cartItems/0/price",
    )
    for value in ("Infinity", "-Infinity", "NaN", "sNaN", "1e400", "-1e400"):
        with pytest.raises(ValueError, match="not a number JSON can hold"):
            cart_item("A", 1, Decimal(value))
    # A float NaN or infinity became JSON null: as an attribute, a deletion.
    for number in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="not a number a command can carry"):
            update_command("c-1", attributes={"score": number})
        with pytest.raises(ValueError, match="not a number a command can carry"):
            cart_item("A", 1, number)


class _FlakyProducer:
    """Fails its first send after the broker has the record (a timeout), then
    works; ``values`` may be shared with the producer that replaces it."""

    def __init__(self, values: list[bytes] | None = None) -> None:
        self.values: list[bytes] = [] if values is None else values
        self.stopped = False

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[object]:
        self.values.append(value)
        acknowledged: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if len(self.values) == 1:
            acknowledged.set_exception(KafkaTimeoutError())
        else:
            where = SimpleNamespace(topic=topic, partition=0, offset=len(self.values))
            acknowledged.set_result(where)
        return acknowledged

    async def stop(self) -> None:
        self.stopped = True


def _renewed_by(client: SessionClient, values: list[bytes]) -> list[_FlakyProducer]:
    """Have ``client`` replace a failed producer with a working one writing to
    ``values``; returns the replacements made."""
    made: list[_FlakyProducer] = []

    async def open_producer() -> _FlakyProducer:
        made.append(_FlakyProducer(values))
        return made[-1]

    client._open_producer = open_producer  # type: ignore[method-assign]
    return made


async def test_a_retried_send_carries_the_same_event_id() -> None:
    """'Send the same document again' holds for built documents (each has an
    eventId); a helper builds a new one each call, so it is retried with the
    same event_id. A hand-written document is not changed by send()."""
    client = SessionClient(Settings())
    client._producer = producer = _FlakyProducer()
    _renewed_by(client, producer.values)
    command = reopen_command("c-1")
    with pytest.raises(KafkaTimeoutError):
        await client.send(command)
    sent = await client.send(command)
    first, second = (json.loads(value)["eventId"] for value in producer.values)
    assert first == second == sent.event_id == command["eventId"]
    client._producer = producer = _FlakyProducer()
    _renewed_by(client, producer.values)
    event_id = new_event_id()
    with pytest.raises(KafkaTimeoutError):
        await client.return_items("c-1", [returned_item(0)], event_id=event_id)
    await client.return_items("c-1", [returned_item(0)], event_id=event_id)
    assert [json.loads(value)["eventId"] for value in producer.values] == [event_id] * 2
    # A template reused for several commands must not carry the first one's id.
    client._producer = SimpleNamespace(send=producer.send)
    template: dict[str, Any] = {"type": "reopen", "integrationId": "c-1"}
    await client.send(template)
    assert "eventId" not in template


async def test_a_producer_whose_send_failed_is_replaced() -> None:
    """aiokafka's idempotent producer keeps the sequence numbers of a batch it
    gave up (no leader past its request timeout): every later batch of that
    partition was refused as out of order, not retried, so the retry the
    docs ask for never succeeded while the client lived."""
    client = SessionClient(Settings())
    failed = _FlakyProducer()
    made = _renewed_by(client, [b"earlier"])  # whose sends all work
    client._producer = failed

    async def failing_send(topic: str, value: bytes, key: bytes) -> asyncio.Future[object]:
        acknowledged: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        acknowledged.set_exception(OutOfOrderSequenceNumber())
        return acknowledged

    failed.send = failing_send  # type: ignore[method-assign]
    command = reopen_command("c-1")
    # Two sends failing at once replace the producer once.
    outcomes = await asyncio.gather(
        client.send(command), client.send(reopen_command("c-2")), return_exceptions=True
    )
    assert all(isinstance(o, OutOfOrderSequenceNumber) for o in outcomes)
    if client._renewing is not None:  # in the background: maybe still running
        await client._renewing
    assert len(made) == 1
    assert client._producer is made[0]
    sent = await client.send(command)  # the retry goes through
    assert sent.event_id == command["eventId"]
    await client.stop()
    assert failed.stopped
    assert made[0].stopped


async def test_a_send_that_failed_does_not_wait_for_the_replacement_nor_does_stop() -> None:
    """A replacement against brokers that do not answer took up to a request
    timeout per address, and each failed send waited for one, one after
    another; a stop meanwhile left the new producer running."""
    client = SessionClient(Settings())
    client._producer = failed = _FlakyProducer()
    opening = asyncio.Event()

    async def open_producer() -> _FlakyProducer:
        opening.set()
        await asyncio.Event().wait()  # Kafka does not answer
        raise AssertionError("never reached")

    client._open_producer = open_producer  # type: ignore[method-assign]
    with pytest.raises(KafkaTimeoutError):
        await asyncio.wait_for(client.send(reopen_command("c-1")), 5)
    await asyncio.wait_for(opening.wait(), 5)
    # Sends go on through the failed producer meanwhile (its other partitions work).
    assert (await client.send(reopen_command("c-2"))).offset == 2
    await asyncio.wait_for(client.stop(), 5)
    assert client._renewing is None
    assert failed.stopped
    with pytest.raises(RuntimeError, match="not started"):
        await client.send(reopen_command("c-3"))


async def test_a_replaced_producer_holding_a_command_is_stopped_within_the_bound_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A producer replaced after a failed send was stopped with a bound of
    its own, from its replacement: stop() waited past the commands' delivery
    timeout, and said nothing of the command it still held."""
    client = SessionClient(Settings(), delivery_timeout_s=1.0)
    old = _OutageProducer()  # holds what it is given, and never stops

    async def send(topic: str, value: bytes, key: bytes) -> asyncio.Future[object]:
        acknowledged: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if key == b"c-2":
            acknowledged.set_exception(OutOfOrderSequenceNumber())
        return acknowledged

    old.send = send  # type: ignore[method-assign]
    client._producer = old
    _renewed_by(client, [b"earlier"])
    held = asyncio.ensure_future(client.send(reopen_command("c-1")))
    await asyncio.sleep(0.1)
    with pytest.raises(OutOfOrderSequenceNumber):
        await client.send(reopen_command("c-2"))
    with pytest.raises(KafkaTimeoutError):
        await held
    with caplog.at_level(logging.WARNING, logger="stream_app.client"):
        await asyncio.wait_for(client.stop(), 10)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("stopped with 1 command(s) Kafka at 127.0.0.1:9092 has not")
    # Said once: a second stop() has nothing more to say.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stream_app.client"):
        await asyncio.wait_for(client.stop(), 10)
    assert caplog.records == []


class _SlowLeaderProducer:
    """Holds what it is given for the keys in ``held`` (their partition's
    leader slow to answer) until it is stopped; writes the rest at once to
    ``written``, shared with the producer that replaces it."""

    def __init__(self, written: list[str], held: set[bytes] = frozenset()) -> None:
        self.written = written
        self.held = held
        self.holding: list[tuple[asyncio.Future[object], str]] = []

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[object]:
        acknowledged: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        event_id = json.loads(value)["eventId"]
        if key == b"refused":
            acknowledged.set_exception(OutOfOrderSequenceNumber())
        elif key in self.held:
            self.holding.append((acknowledged, event_id))
        else:
            self._write(acknowledged, event_id)
        return acknowledged

    def _write(self, acknowledged: asyncio.Future[object], event_id: str) -> None:
        self.written.append(event_id)
        acknowledged.set_result(SimpleNamespace(topic="t", partition=0, offset=len(self.written)))

    async def stop(self) -> None:
        await asyncio.sleep(0.2)  # the leader answers at last
        for acknowledged, event_id in self.holding:
            self._write(acknowledged, event_id)


async def _replaced_holding_cart_1(
    client: SessionClient, written: list[str], *, stops: bool = True
) -> asyncio.Future[SentCommand]:
    """Have ``client``'s producer hold a command of cart-1 (eventId "first"),
    then be replaced after a failed send of another session; returns the
    send of "first". The old producer delivers it when it stops (or, without
    ``stops``, never stops); its replacement writes at once to ``written``."""
    old = _SlowLeaderProducer(written, held={b"cart-1"})
    client._producer = old
    if not stops:

        async def never_stops() -> None:
            await asyncio.Event().wait()

        old.stop = never_stops  # type: ignore[method-assign]

    async def open_producer() -> _SlowLeaderProducer:
        return _SlowLeaderProducer(written)

    client._open_producer = open_producer  # type: ignore[method-assign]
    first = asyncio.ensure_future(client.send(reopen_command("cart-1", event_id="first")))
    await asyncio.sleep(0.01)
    with pytest.raises(OutOfOrderSequenceNumber):
        await client.send(reopen_command("refused"))
    await asyncio.sleep(0.01)  # replaced
    assert client._producer is not old
    return first


async def test_a_session_s_commands_keep_their_order_across_a_producer_replacement() -> None:
    """A failed send (of any session) replaces the producer; the old one
    went on delivering what it held while new sends went out through the
    new one: a close overtook its session's update, which the worker then
    rejected on a closed session, and both sends had succeeded."""
    written: list[str] = []
    client = SessionClient(Settings(), delivery_timeout_s=5)
    update = await _replaced_holding_cart_1(client, written)
    close = asyncio.ensure_future(client.send(reopen_command("cart-1", event_id="second")))
    # Another session's command does not wait for the old producer.
    await asyncio.wait_for(client.send(reopen_command("cart-2", event_id="other")), 5)
    assert written == ["other"]
    await asyncio.wait_for(asyncio.gather(update, close), 5)
    assert written == ["other", "first", "second"]
    await client.stop()


async def test_a_command_behind_one_a_replaced_producer_still_holds_is_not_sent() -> None:
    """Within its one delivery timeout, waiting included: the wait for the
    old producer's stop took a timeout of its own before the send's."""
    written: list[str] = []
    client = SessionClient(Settings(), delivery_timeout_s=60)
    update = await _replaced_holding_cart_1(client, written, stops=False)  # stop bound: 60 s
    client.delivery_timeout_s = 0.5  # this send's bound ends before the old stop's
    with pytest.raises(KafkaTimeoutError, match="not sent: an earlier command of this session"):
        await client.send(reopen_command("cart-1", event_id="second"))
    assert written == []
    update.cancel()
    await asyncio.gather(update, return_exceptions=True)
    await asyncio.wait_for(client.stop(giving_up=True), 10)


async def test_a_stop_ends_a_send_waiting_behind_a_replaced_producer() -> None:
    """The stop gives up on the old producer's commands, which then never
    end: the send waiting for them slept out its whole delivery timeout (120 s
    by default), holding a service's shutdown."""
    written: list[str] = []
    client = SessionClient(Settings(), delivery_timeout_s=60)
    update = await _replaced_holding_cart_1(client, written, stops=False)
    waiting = asyncio.ensure_future(client.send(reopen_command("cart-1", event_id="second")))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(client.stop(giving_up=True), 10)
    with pytest.raises(RuntimeError, match="stopped"):
        await asyncio.wait_for(waiting, 10)
    assert written == []
    update.cancel()
    await asyncio.gather(update, return_exceptions=True)


async def test_a_client_stopped_while_it_starts_is_not_left_started(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stop found nothing started and returned; the start then went on
    and left a client running with the stop's signal set, on which a send
    waiting behind a replaced producer spun the event loop."""
    from stream_app.pipeline import kafka

    async def slow_count(*args: object) -> int:
        await asyncio.sleep(0.05)
        return 6

    monkeypatch.setattr(kafka, "partition_count", slow_count)
    client = SessionClient(Settings())
    opened = _FlakyProducer()

    async def open_producer() -> _FlakyProducer:
        return opened

    client._open_producer = open_producer  # type: ignore[method-assign]
    starting = asyncio.ensure_future(client.start())
    await asyncio.sleep(0.01)
    await client.stop()
    with pytest.raises(RuntimeError, match="stopped while it started"):
        await asyncio.wait_for(starting, 5)
    assert opened.stopped
    assert client._producer is None


async def test_a_command_is_keyed_by_the_integration_id_the_workers_read() -> None:
    """``str()`` of a str enum member is its name: a command for ``Cart.A``
    went to the partition of the key "Cart.A", and the worker re-keyed it
    to "cart-1"'s, out of order with the session's other commands."""

    class Cart(str, Enum):  # noqa: UP042 - not StrEnum: the str() of this kind is its name
        A = "cart-1"

    written: list[bytes] = []

    async def send(topic: str, value: bytes, key: bytes) -> asyncio.Future[object]:
        written.append(key)
        acknowledged: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        acknowledged.set_result(SimpleNamespace(topic=topic, partition=3, offset=0))
        return acknowledged

    client = SessionClient(Settings())
    client._producer = SimpleNamespace(send=send)
    sent = await client.send(reopen_command(Cart.A))
    assert written == [b"cart-1"]
    assert sent.integration_id == "cart-1"


class _OutageProducer:
    """A broker gone after the client connected: aiokafka's idempotent
    producer retries the command's batch for as long as the outage lasts, and
    its stop waits for it."""

    def __init__(self) -> None:
        self.stopped = False

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[object]:
        return asyncio.get_running_loop().create_future()  # never acknowledged

    async def stop(self) -> None:
        await asyncio.Event().wait()
        self.stopped = True


async def test_a_send_kafka_never_acknowledges_raises_and_the_stop_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before, send() and then the client's stop waited as long as the outage
    lasted: a checkout's request, or `stream-app send`, hung until Ctrl-C."""
    client = SessionClient(Settings(), delivery_timeout_s=0.2)
    client._producer = _OutageProducer()
    command = reopen_command("c-1")
    began = time.monotonic()
    with pytest.raises(KafkaTimeoutError, match=f"eventId {command['eventId']}"):
        await client.send(command)
    assert time.monotonic() - began < 10
    with caplog.at_level(logging.WARNING, logger="stream_app.client"):
        await asyncio.wait_for(client.stop(), 10)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("stopped with 1 command(s) Kafka at 127.0.0.1:9092 has not")


async def test_a_stop_with_nothing_pending_waits_for_the_producer() -> None:
    """A stop with every command acknowledged is the producer's own, unbounded:
    it has nothing left to deliver."""
    client = SessionClient(Settings())
    producer = _FlakyProducer()
    producer.values.append(b"")  # no failure
    stops: list[bool] = []

    async def stop() -> None:
        await asyncio.sleep(0.05)
        stops.append(True)

    client._producer = SimpleNamespace(send=producer.send, stop=stop)
    await client.send(reopen_command("c-1"))
    await client.stop()
    assert stops == [True]


def test_a_line_or_total_refused_in_every_application_is_refused_without_settings() -> None:
    """Before, without application_settings nothing ran apply: a close whose
    line value overflows, or whose total cannot be written exactly, was sent
    and landed on the rejection topic."""
    overflow = close_command("c-1", cart_items=[cart_item("A", 2, 5 * 10**18)])
    with pytest.raises(CommandRejectedError) as caught:
        validate_command(overflow)
    assert (caught.value.reason, caught.value.pointer) == (
        Reason.LIMIT_EXCEEDED,
        "/session/cartItems/0",
    )
    inexact = update_command(
        "c-1",
        cart_items=[cart_item("A", 1, 1)],
        additional_costs={"rounding": {"price": 1e-20}},
    )
    with pytest.raises(CommandRejectedError) as caught:
        validate_command(inexact)
    assert caught.value.reason is Reason.LIMIT_EXCEEDED
    # Only a return makes a session partially returned, whatever it was.
    with pytest.raises(CommandRejectedError) as caught:
        validate_command(_session(state="partially_returned"))
    assert (caught.value.reason, caught.value.pointer) == (
        Reason.INVALID_TRANSITION,
        "/session/state",
    )


def test_a_decimal_a_json_number_cannot_carry_is_refused_not_rounded() -> None:
    """Before, Decimal("0.1000000000000000001") went out as 0.1, and the
    workers applied another amount than the one given."""
    for value in ("0.1000000000000000001", "12345678901234567.89", "1E-400"):
        with pytest.raises(ValueError, match="cannot travel exactly"):
            cart_item("A", 1, Decimal(value))
    assert cart_item("A", 1, Decimal("19.99"))["price"] == 19.99
    assert cart_item("A", 1, Decimal("12345678901234567"))["price"] == 12345678901234567
    # Past 2^63 too: an attribute's Decimal went out as 1.2345678901234569e+23.
    with pytest.raises(ValueError, match="cannot travel exactly"):
        update_command("c-1", attributes={"ref": Decimal("123456789012345678901234")})
    assert update_command("c-1", attributes={"big": Decimal("1e20")})["session"]["attributes"]
    for same in ("-0", "1E+2", "5E-324", "9223372036854775807"):
        assert cart_item("A", 1, Decimal(same))
    # 2^63..2^64-1 travel as integers (orjson writes them exactly).
    big = update_command("c-1", attributes={"n": Decimal(2**64 - 1)})
    assert big["session"]["attributes"] == {"n": 2**64 - 1}
    # A hand-written document: refused as the builders refuse, not a bare ValueError.
    for number in (Decimal("0.1000000000000000001"), math.nan):
        with pytest.raises(CommandRejectedError) as caught:
            validate_command(_session(attributes={"score": number}))
        assert caught.value.reason is Reason.SCHEMA_VIOLATION


async def test_every_helper_takes_the_clients_application_when_given_none() -> None:
    """Before, update_session and close_session kept an explicit None (the
    workers' default application) where the other helpers took the client's:
    a session created in one application was returned in another."""
    client = SessionClient(Settings(), application_id=7)
    producer = _FlakyProducer()
    producer.values.append(b"")  # no failure
    client._producer = producer
    await client.update_session("c-1", application_id=None, cart_items=[cart_item("A", 1, 1)])
    await client.close_session("c-1", application_id=None)
    await client.return_items("c-1", [returned_item(0)], application_id=None)
    await client.cancel_session("c-1", application_id=None)
    await client.reopen_session("c-1", application_id=None)
    await client.reopen_session("c-1", application_id=3)
    sent = [json.loads(value)["applicationId"] for value in producer.values[1:]]
    assert sent == [7, 7, 7, 7, 7, 3]


async def test_a_start_that_fails_stops_its_producer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, a failed start left the producer open: each retry of start()
    kept another one's connections, and asyncio warned of it at exit."""
    import aiokafka

    from stream_app.pipeline import kafka

    stopped: list[bool] = []

    class _Producer:
        def __init__(self, **options: object) -> None:
            pass

        async def start(self) -> None:
            raise KafkaTimeoutError

        async def stop(self) -> None:
            stopped.append(True)

    async def one_partition(options: object, topic: str) -> int:
        return 1

    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", _Producer)
    monkeypatch.setattr(kafka, "partition_count", one_partition)
    with pytest.raises(KafkaTimeoutError):
        await SessionClient(Settings()).start()
    assert stopped == [True]


@pytest.mark.parametrize(
    ("max_command_bytes", "at_least"), [(256 * 1024, 1_048_576), (4 << 20, 4 << 20)]
)
async def test_the_producer_takes_any_command_validate_takes(
    monkeypatch: pytest.MonkeyPatch, max_command_bytes: int, at_least: int
) -> None:
    """aiokafka's 1 MiB request limit refused, for good, a command that a
    raised STREAM_APP_MAX_COMMAND_BYTES let validate() take."""
    import aiokafka

    from stream_app.pipeline import kafka

    made: list[dict[str, object]] = []

    class _Producer:
        def __init__(self, **options: object) -> None:
            made.append(options)

        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            pass

    async def one_partition(options: object, topic: str) -> int:
        return 1

    monkeypatch.setattr(aiokafka, "AIOKafkaProducer", _Producer)
    monkeypatch.setattr(kafka, "partition_count", one_partition)
    client = SessionClient(Settings(max_command_bytes=max_command_bytes))
    await client.start()
    await client.stop()
    [options] = made
    assert isinstance(options["max_request_size"], int)
    assert options["max_request_size"] >= max(at_least, max_command_bytes + 4096)


def test_a_total_the_stored_session_decides_is_left_to_the_worker() -> None:
    """An update that replaces the cart but not the costs: the workers add the
    stored session's costs to its total, and a negative one can make it exact
    where the cart's alone is not. The probe refused what the worker applies."""
    items = [
        cart_item("A", 1, Decimal("12345678901234.5")),
        cart_item("FEE", 1, 0, additional_costs={"handling": Decimal("0.0025")}),
    ]
    create = update_command(
        "c-1", cart_items=items, additional_costs={"rounding": Decimal("-0.0025")}
    )
    validate_command(create)
    items_only = update_command("c-1", cart_items=items)
    validate_command(items_only)
    # Both given, the total is the command's own: refused here.
    inexact = update_command("c-1", cart_items=items, additional_costs={})
    with pytest.raises(CommandRejectedError) as caught:
        validate_command(inexact)
    assert (caught.value.reason, caught.value.pointer) == (
        Reason.LIMIT_EXCEEDED,
        "/session/total",
    )


class _SlowToAcknowledge:
    """Acknowledges each command after ``delay`` seconds (a leader election)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.pending: set[asyncio.Future[Any]] = set()

    async def send(self, topic: str, value: bytes, key: bytes) -> asyncio.Future[Any]:
        acknowledged: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        where = SimpleNamespace(topic=topic, partition=0, offset=7)
        asyncio.get_running_loop().call_later(
            self.delay, lambda: acknowledged.done() or acknowledged.set_result(where)
        )
        self.pending.add(acknowledged)
        return acknowledged

    async def stop(self) -> None:
        await asyncio.wait(self.pending)


@pytest.mark.parametrize("give_up", [False, True])
async def test_a_cancelled_block_gives_up_on_delivery_only_when_asked_to(
    monkeypatch: pytest.MonkeyPatch, give_up: bool
) -> None:
    """A service's handler cancelled by its caller still wants its command
    delivered: leaving ``async with`` by any cancellation gave it up after a
    second. ``stream-app send`` asks to give up: a Ctrl-C ends it at once."""
    from stream_app import client as client_module

    monkeypatch.setattr(client_module, "STOP_AFTER_GIVING_UP_S", 0.05)
    producer = _SlowToAcknowledge(0.5)

    async def start(self: SessionClient) -> None:
        self._producer = producer

    monkeypatch.setattr(SessionClient, "start", start)
    sent: list[asyncio.Future[Any]] = []

    async def serve() -> None:
        async with SessionClient(Settings(), give_up_when_cancelled=give_up) as client:
            sent.append(asyncio.ensure_future(client.send(reopen_command("c-1"))))
            await asyncio.sleep(0.01)  # handed to the producer
            await asyncio.Event().wait()  # until cancelled

    serving = asyncio.ensure_future(serve())
    await asyncio.sleep(0.05)
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    acknowledged = all(f.done() for f in producer.pending)
    assert acknowledged is not give_up
    await asyncio.gather(*sent, return_exceptions=True)
