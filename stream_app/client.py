"""A producer client for checkout systems: build, check and send session commands.

Commands are plain documents with the contract's v2 field names (what you
would send to Talon.One's customer-session API), built by
:func:`update_command`, :func:`close_command`, :func:`cancel_command`,
:func:`return_command` and :func:`reopen_command`, then sent by
:class:`SessionClient`::

    async with SessionClient(Settings.from_env()) as client:
        await client.update_session("cart-1", cart_items=[cart_item("SKU-1", 2, 19.99)])
        await client.close_session("cart-1")
        await client.return_items("cart-1", [returned_item(0, quantity=1)])

What the client guarantees:

* **Mistakes raise here, not on the rejection topic.** Every command goes
  through the workers' own decoder (:func:`stream_app.domain.decode_command`)
  before it is sent (and a record larger than the workers'
  ``max_command_bytes`` is refused); a command the workers would reject for
  its content raises :class:`CommandRejectedError` with the same reason code and JSON
  pointer, and nothing is sent. The domain's ``apply`` checks an update's
  lines and totals too (an amount that cannot be written exactly), and, with
  ``application_settings`` given, the rules that depend on them (total
  quantity with flattening, allowed additional costs and attributes). Rules
  that depend on the stored session (the state machine, return quantities,
  unknown sessions, and the session total of an update that replaces only
  one of ``cartItems`` and ``additionalCosts``, which adds the stored other)
  can only be checked by the worker: those rejections still land on the
  rejection topic.
* **Keyed by integrationId**, so the commands of one session are applied in
  the order they were sent.
* **Idempotent retries.** Every command carries an ``eventId``: yours, or a
  random one generated when the command is built. The producer is idempotent
  with ``acks=all``, so its own retries never duplicate a record; if
  :meth:`SessionClient.send` still raises (Kafka could not be reached, or
  did not acknowledge the command within ``delivery_timeout_s``, 120 s by
  default, as Kafka's Java producer), send *the same command document* again:
  the worker recognises its ``eventId`` and applies it once. The helpers
  (``update_session``, ``return_items``, ...) build a new command each call:
  retry them with the same ``event_id=``.
* Money may be given as ``int``, ``float`` or ``Decimal``; it travels as a
  JSON number (``Decimal("19.99")`` is 19.99 in the worker's totals). A
  ``Decimal`` that a JSON number cannot carry exactly (more significant
  digits than a double keeps, such as ``Decimal("0.1000000000000000001")``)
  raises ``ValueError`` rather than being rounded.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any, Literal

import msgspec

from stream_app import json
from stream_app.domain import (
    ApplicationSettings,
    Command,
    CommandContext,
    Reason,
    Rejected,
    Rejection,
    SessionState,
    UpdateCommand,
    apply,
    decode_command,
)
from stream_app.domain.numbers import json_number, to_decimal
from stream_app.domain.rejections import make_rejection
from stream_app.errors import StreamAppError
from stream_app.settings import Settings

__all__ = [
    "CommandDocument",
    "CommandRejectedError",
    "CommandTopicMissingError",
    "SentCommand",
    "SessionClient",
    "cancel_command",
    "cart_item",
    "close_command",
    "new_event_id",
    "reopen_command",
    "return_command",
    "returned_item",
    "update_command",
    "validate_command",
]

log = logging.getLogger(__name__)

#: A command as sent: a JSON object with the contract's field names.
CommandDocument = dict[str, Any]
Money = int | float | Decimal
SettingsLookup = ApplicationSettings | Callable[[int], ApplicationSettings]


class CommandRejectedError(StreamAppError):
    """The command would be rejected by the workers; it was not sent.

    ``reason`` is the rejection topic's reason code, ``pointer`` the JSON
    pointer to the offending field (``/session/cartItems/3/quantity``),
    ``details`` the human explanation and ``rejection`` the whole domain
    rejection (``rejection.to_document()`` is its rejection-topic form).
    """

    def __init__(self, rejection: Rejection, command: object) -> None:
        first = rejection.errors[0] if rejection.errors else None
        self.rejection = rejection
        self.reason: Reason = rejection.reason
        self.pointer = first.pointer if first else ""
        self.details = first.details if first else rejection.message
        self.command = command
        super().__init__(f"{self.reason} at {self.pointer or '/'}: {self.details}")


class CommandTopicMissingError(StreamAppError):
    """The command topic does not exist (the cluster does not create topics on use)."""


@dataclass(frozen=True, slots=True)
class SentCommand:
    """Where a command was written. ``event_id`` is the one to reuse on a retry."""

    integration_id: str
    event_id: str
    topic: str
    partition: int
    offset: int


# --------------------------------------------------------------------------- building


def new_event_id() -> str:
    """A fresh idempotency key."""
    return uuid.uuid4().hex


#: Seconds a command may wait for the broker's acknowledgement, as Kafka's
#: Java producer waits (``delivery.timeout.ms``). aiokafka's idempotent
#: producer retries a batch it could not deliver for ever while its partition
#: has a leader (one without a leader past the request timeout, 40 s, fails
#: with NotLeaderForPartitionError): without this bound a send, and the
#: client's stop, waited as long as an outage lasted.
DELIVERY_TIMEOUT_S = 120.0
#: Seconds a producer's stop still waits for records whose send gave up.
STOP_AFTER_GIVING_UP_S = 1.0


async def stop_producer(producer: Any, bound: float | None) -> bool:
    """``producer.stop()``, given up after ``bound`` seconds (None: no bound);
    whether it ended. aiokafka's stop waits for every record it holds, and its
    idempotent producer retries one it could not deliver for ever: given up,
    the producer is left to the event loop's end."""
    stopping = asyncio.ensure_future(producer.stop())
    done, _ = await asyncio.wait({stopping}, timeout=bound)
    if done:
        stopping.result()
        return True
    stopping.cancel()
    await asyncio.gather(stopping, return_exceptions=True)
    return False


#: aiokafka's default max_request_size.
_KAFKA_MAX_REQUEST = 1_048_576
#: Past it a Decimal is no double: the workers read such a number as infinite.
_LARGEST_DOUBLE = Decimal(sys.float_info.max)
_U64 = 2**64


def command_number(value: Decimal) -> int | float:
    """The JSON number a command carries for ``value``, as the workers write
    amounts (:func:`stream_app.domain.numbers.json_number`: an integer while
    it fits 64 bits, else a float, which the workers' limits then judge).
    Raises ValueError for NaN, an infinity, a number past the largest double
    (1e400), which JSON cannot hold, and a number the workers would read as
    another (more significant digits than a double keeps): nothing is
    rounded on its way."""
    if not value.is_finite() or abs(value) > _LARGEST_DOUBLE:
        raise ValueError(f"{value} is not a number JSON can hold")
    number = json_number(value)
    if type(number) is float and 0 <= value < _U64 and value == value.to_integral_value():
        number = int(value)  # 2^63..2^64-1: orjson writes them exactly (the limits judge)
    if to_decimal(number) != value:
        raise ValueError(
            f"{value} cannot travel exactly as a JSON number: the workers would read "
            f"{number!r}; round it first"
        )
    return number


def _plain(value: Any) -> Any:
    """JSON-ready: Decimals become JSON numbers (:func:`command_number`),
    tuples and sets lists. Raises ValueError for what a command cannot carry."""
    try:
        return _json_ready(value)
    except RecursionError:  # the workers refuse more than 29 levels anyway
        raise ValueError("nested deeper than a command can carry") from None


def _json_ready(value: Any) -> Any:
    if isinstance(value, Decimal):
        return command_number(value)
    if isinstance(value, float) and not math.isfinite(value):
        # orjson writes null for them: an attribute of NaN deleted the stored one.
        raise ValueError(f"{value} is not a number a command can carry")
    if isinstance(value, Mapping):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_ready(item) for item in value]
    return value


def _costs(costs: Mapping[str, Money | Mapping[str, Any]]) -> dict[str, Any]:
    """``{"shipping": 4.99}`` or ``{"shipping": {"price": 4.99}}`` -> the wire form."""
    return {
        name: _plain(cost) if isinstance(cost, Mapping) else {"price": _plain(cost)}
        for name, cost in costs.items()
    }


def cart_item(
    sku: str,
    quantity: int,
    price: Money,
    *,
    name: str | None = None,
    category: str | None = None,
    attributes: Mapping[str, Any] | None = None,
    additional_costs: Mapping[str, Money | Mapping[str, Any]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One cart item. ``extra`` takes the other v2 fields as they are spelled on
    the wire (``product={"name": ...}``, ``weight``, ``height``, ...)."""
    item: dict[str, Any] = {"sku": sku, "quantity": quantity, "price": _plain(price)}
    if name is not None:
        item["name"] = name
    if category is not None:
        item["category"] = category
    if attributes is not None:
        item["attributes"] = _plain(attributes)
    if additional_costs is not None:
        item["additionalCosts"] = _costs(additional_costs)
    item.update(_plain(extra))
    return item


def returned_item(
    position: int | None = None, *, sku: str | None = None, quantity: int | None = None
) -> dict[str, Any]:
    """One entry of a return: a cart position, a sku, or both (they must agree).
    No ``quantity`` returns all that is left of the line."""
    item: dict[str, Any] = {}
    if position is not None:
        item["position"] = position
    if sku is not None:
        item["sku"] = sku
    if quantity is not None:
        item["quantity"] = quantity
    return item


def _strings(values: Iterable[str], name: str) -> list[str]:
    """A list of strings; a string itself (a list of its characters) refused."""
    if isinstance(values, str):
        raise TypeError(f"{name} is a list of strings, not a string: [{values!r}]?")
    return list(values)


def _envelope(
    kind: str, integration_id: str, event_id: str | None, application_id: int | None
) -> CommandDocument:
    doc: CommandDocument = {
        "type": kind,
        "integrationId": integration_id,
        # "" is kept, for the check to refuse: a generated id in its place would
        # make every retry of the command another command.
        "eventId": new_event_id() if event_id is None else event_id,
    }
    if application_id is not None:
        doc["applicationId"] = application_id
    return doc


def update_command(
    integration_id: str,
    *,
    event_id: str | None = None,
    application_id: int | None = None,
    state: Literal["open", "closed", "cancelled"] | None = None,
    profile_id: str | None = None,
    store_integration_id: str | None = None,
    coupon_codes: Iterable[str] | None = None,
    referral_code: str | None = None,
    loyalty_cards: Iterable[str] | None = None,
    cart_items: Iterable[Mapping[str, Any]] | None = None,
    additional_costs: Mapping[str, Money | Mapping[str, Any]] | None = None,
    identifiers: Iterable[str] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> CommandDocument:
    """An ``update``: creates the session or changes it (PUT semantics per field).

    ``None`` leaves a field out (the stored value stays); an empty list clears
    coupons, ``""`` clears the referral code; ``cart_items`` replaces the whole
    cart; ``attributes`` are merged key by key and a ``None`` value removes a key.
    """
    session: dict[str, Any] = {}
    if profile_id is not None:
        session["profileId"] = profile_id
    if store_integration_id is not None:
        session["storeIntegrationId"] = store_integration_id
    if coupon_codes is not None:
        session["couponCodes"] = _strings(coupon_codes, "coupon_codes")
    if referral_code is not None:
        session["referralCode"] = referral_code
    if loyalty_cards is not None:
        session["loyaltyCards"] = _strings(loyalty_cards, "loyalty_cards")
    if state is not None:
        session["state"] = state
    if cart_items is not None:
        session["cartItems"] = [_plain(item) for item in cart_items]
    if additional_costs is not None:
        session["additionalCosts"] = _costs(additional_costs)
    if identifiers is not None:
        session["identifiers"] = _strings(identifiers, "identifiers")
    if attributes is not None:
        session["attributes"] = _plain(attributes)
    doc = _envelope("update", integration_id, event_id, application_id)
    doc["session"] = session
    return doc


def close_command(
    integration_id: str,
    *,
    event_id: str | None = None,
    application_id: int | None = None,
    **session: Any,
) -> CommandDocument:
    """Close the session (checkout done); may carry the final cart and other
    fields of :func:`update_command`. A close of an unknown session creates it
    closed."""
    return update_command(
        integration_id, event_id=event_id, application_id=application_id, state="closed", **session
    )


def cancel_command(
    integration_id: str, *, event_id: str | None = None, application_id: int | None = None
) -> CommandDocument:
    """Cancel an open session, or revoke a closed or partially returned one."""
    doc = _envelope("update", integration_id, event_id, application_id)
    doc["session"] = {"state": "cancelled"}
    return doc


def return_command(
    integration_id: str,
    items: Iterable[Mapping[str, Any]],
    *,
    event_id: str | None = None,
    application_id: int | None = None,
) -> CommandDocument:
    """Return cart items of a closed (or partially returned) session; ``items``
    from :func:`returned_item`."""
    doc = _envelope("return", integration_id, event_id, application_id)
    doc["returnedCartItems"] = [_plain(item) for item in items]
    return doc


def reopen_command(
    integration_id: str, *, event_id: str | None = None, application_id: int | None = None
) -> CommandDocument:
    """Reopen a closed session (it can then be changed and closed again)."""
    return _envelope("reopen", integration_id, event_id, application_id)


# --------------------------------------------------------------------------- checking


#: The settings under which ``apply`` refuses least.
_ANY_APPLICATION = ApplicationSettings(flattening=False)


class _ProbeIds:
    """Session ids for the local settings check, which creates a throwaway session."""

    def next_id(self) -> int:
        return 1


def _settings_rejection(
    command: UpdateCommand, settings: ApplicationSettings, application_id: int
) -> Rejection | None:
    """The rejection the settings-dependent rules give, if any.

    ``apply`` checks them on every update it applies; applied to no session
    with the state left out, it checks nothing else. A cancellation is
    skipped: on a closed session its other fields are ignored, unchecked.
    """
    if command.session.state is SessionState.CANCELLED:
        return None
    probe = UpdateCommand(
        command.integration_id, msgspec.structs.replace(command.session, state=None)
    )
    context = CommandContext(
        timestamp_ms=0,
        source_event_id="local-check",
        application_id=application_id,
        settings=settings,
        ids=_ProbeIds(),
    )
    outcome = apply(None, probe, context)
    if not isinstance(outcome, Rejected):
        return None
    rejection = outcome.rejection
    patch = command.session
    if (
        rejection.errors
        and rejection.errors[0].pointer == "/session/total"
        and (patch.cart_items is None or patch.additional_costs is None)
    ):
        # The session's total adds what the stored session keeps of the cart
        # or of its costs, unknown here: a stored negative cost can make it
        # exact where the probe's is not.
        return None
    return rejection


def validate_command(
    command: Mapping[str, Any] | bytes,
    application_settings: SettingsLookup | None = None,
    *,
    default_application_id: int = 1,
    max_command_bytes: int | None = None,
) -> bytes:
    """The record value to send for ``command``; raises :class:`CommandRejectedError`
    when the workers would reject it for its content (see the module docstring).

    ``application_settings``: the settings of the command's application (or a
    lookup by applicationId); ``None`` checks only the rules that hold for
    every application. ``default_application_id`` is the workers' default,
    for commands without ``applicationId``; ``max_command_bytes`` their limit
    on the size of a command record.
    """
    return _checked(
        command,
        application_settings,
        default_application_id=default_application_id,
        max_command_bytes=max_command_bytes,
    )[0]


def _checked(
    command: Mapping[str, Any] | bytes,
    application_settings: SettingsLookup | None,
    *,
    default_application_id: int,
    max_command_bytes: int | None,
) -> tuple[bytes, Command]:
    """:func:`validate_command`'s record value, and the command the workers read in it."""
    try:
        raw = command if isinstance(command, bytes) else json.dumps(_plain(command))
    except (json.JSONEncodeError, ValueError) as exc:
        # An integer past 64 bits, a string with surrogates, NaN, an inexact Decimal.
        unwritable = make_rejection(Reason.SCHEMA_VIOLATION, "", f"not writable as JSON: {exc}")
        raise CommandRejectedError(unwritable, command) from None
    if max_command_bytes is not None and len(raw) > max_command_bytes:
        too_large = make_rejection(
            Reason.LIMIT_EXCEEDED,
            "",
            f"the command is {len(raw)} bytes; at most {max_command_bytes}",
        )
        raise CommandRejectedError(too_large, command)
    decoded = decode_command(raw)
    if isinstance(decoded, Rejection):
        raise CommandRejectedError(decoded, command)
    if isinstance(decoded, UpdateCommand):
        if decoded.session.state is SessionState.PARTIALLY_RETURNED:
            # Refused whatever the stored session is: only a return makes one.
            never = make_rejection(
                Reason.INVALID_TRANSITION,
                "/session/state",
                "only a return makes a session partially_returned",
            )
            raise CommandRejectedError(never, command)
        application_id = decoded.application_id or default_application_id
        if application_settings is None:
            # Every name allowed and no flattening limit: what is refused then
            # (a line or total that cannot be written exactly) is refused in
            # every application.
            settings = _ANY_APPLICATION
        elif isinstance(application_settings, ApplicationSettings):
            settings = application_settings
        else:
            settings = application_settings(application_id)
        rejection = _settings_rejection(decoded, settings, application_id)
        if rejection is not None:
            raise CommandRejectedError(rejection, command)
    return raw, decoded


# --------------------------------------------------------------------------- sending


class SessionClient:
    """Sends session commands to the command topic of ``settings``.

    Connection and security come from ``settings`` (as for the workers), the
    topic from ``settings.topics.commands``. Use it as an async context
    manager, or call :meth:`start` and :meth:`stop`. ``application_id`` is
    put on commands built by the ``*_session`` methods when they give none;
    ``application_settings`` enables the settings-dependent checks.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        application_id: int | None = None,
        application_settings: SettingsLookup | None = None,
        delivery_timeout_s: float = DELIVERY_TIMEOUT_S,
        give_up_when_cancelled: bool = False,
    ) -> None:
        self.settings = settings
        self.topic = settings.topics.commands
        self.application_id = application_id
        self.application_settings = application_settings
        self.delivery_timeout_s = delivery_timeout_s
        #: ``async with`` left by a cancellation stops as :meth:`stop` with
        #: ``giving_up`` does, rather than waiting for what is pending.
        self.give_up_when_cancelled = give_up_when_cancelled
        self._producer: Any = None
        #: Commands handed to a producer and not yet acknowledged: by when,
        #: their key, and the producer.
        self._unacknowledged: dict[asyncio.Future[Any], tuple[float, bytes, Any]] = {}
        #: The replacement of a producer whose send failed (_renew), if one runs.
        self._renewing: asyncio.Task[None] | None = None
        #: The stops of producers replaced, each bounded as :meth:`stop` is,
        #: by producer, while they run.
        self._retiring: dict[Any, asyncio.Task[bool]] = {}
        #: Set by :meth:`stop`: sends waiting for a replaced producer end.
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        """Connect; raises :class:`CommandTopicMissingError` when the topic is
        absent, and RuntimeError when :meth:`stop` was called meanwhile."""
        from stream_app.pipeline.kafka import client_options, partition_count, stop_fully

        self._stopping.clear()
        if not await partition_count(client_options(self.settings), self.topic):
            raise CommandTopicMissingError(
                f"the command topic {self.topic} does not exist at "
                f"{self.settings.bootstrap_servers}: create it with `stream-app topics create` "
                "(or start a worker, which creates it)"
            )
        producer = await self._open_producer()
        if self._stopping.is_set():
            # Started after all, the client ran with the stop's signal set: a
            # send waiting behind a replaced producer spun the event loop.
            await stop_fully(producer)
            raise RuntimeError("the client was stopped while it started")
        self._producer = producer

    async def _open_producer(self) -> Any:
        """A started idempotent producer of this client's settings."""
        from aiokafka import AIOKafkaProducer

        from stream_app.pipeline.kafka import client_options, stop_fully

        producer = AIOKafkaProducer(
            **client_options(self.settings),
            enable_idempotence=True,
            acks="all",
            linger_ms=self.settings.producer_linger_ms,
            # A command validate() takes must fit a request: aiokafka's default
            # (1 MiB) refused one under a raised STREAM_APP_MAX_COMMAND_BYTES,
            # and for good. Room for its key (an integrationId) and framing.
            max_request_size=max(_KAFKA_MAX_REQUEST, self.settings.max_command_bytes + 16_384),
        )
        try:
            await producer.start()
        except BaseException:
            # Its connections, and no "Unclosed" at exit; carried to its end
            # when this start was cancelled (a stop) and is cancelled again.
            await stop_fully(producer)
            raise
        return producer

    def _renew(self, failed: Any) -> None:
        """Have ``failed``, a producer a send of which failed, replaced.

        aiokafka's idempotent producer numbers a partition's batches; one it
        gives up (no leader past the request timeout) or the broker refuses
        keeps its numbers, so every later batch of that partition was
        refused as out of order, not retried, for the client's life
        (aio-libs/aiokafka#1017), and a retry never succeeded. A new
        producer has a new producer id and numbers from 0.

        In the background: the failed send raises at once, and sends failing
        meanwhile start no second replacement (against brokers that do not
        answer, each took up to a request timeout per address, one after
        another). Sends go on through ``failed`` until it is replaced."""
        if self._producer is not failed or self._renewing is not None:
            return
        self._renewing = asyncio.create_task(self._replace(failed))

    async def _replace(self, failed: Any) -> None:
        from stream_app.pipeline.kafka import stop_fully

        try:
            producer = await self._open_producer()
        except Exception as exc:  # a later failed send tries again
            log.warning("could not replace the producer after a failed send: %r", exc)
            return
        finally:
            self._renewing = None
        if self._producer is not failed:  # stopped meanwhile
            await stop_fully(producer)
            return
        self._producer = producer
        # Bounded as stop() bounds a stop: its sends may still be pending.
        retiring = asyncio.create_task(stop_producer(failed, self.delivery_timeout_s))
        self._retiring[failed] = retiring
        retiring.add_done_callback(lambda _: self._retiring.pop(failed, None))

    async def stop(self, *, giving_up: bool = False) -> None:
        """Deliver what is pending, then disconnect. Bounded by the delivery
        timeout of the commands still pending, or, ``giving_up``, by
        ``STOP_AFTER_GIVING_UP_S``; past it, the producer is left to the event
        loop's end, with a warning: those commands may or may not have been
        written (send them again, with the same eventIds). Producers replaced
        after a failed send (:meth:`_renew`) are stopped within the same
        bound. ``async with`` left by a cancellation stops so, giving up,
        when the client was made with ``give_up_when_cancelled``."""
        from stream_app.pipeline.kafka import stop_fully

        producer, self._producer = self._producer, None
        self._stopping.set()
        renewing, self._renewing = self._renewing, None
        if renewing is not None:  # cancelled once: it stops what it was starting
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
        if producer is None and not self._retiring:  # never started, or stopped already
            return
        pending = [deadline for f, (deadline, _, _) in self._unacknowledged.items() if not f.done()]
        if not pending:  # nothing left to deliver: their own stops
            await asyncio.gather(*self._retiring.values())
            if producer is not None:
                await stop_fully(producer)  # a cancelled stop() does not cut it short
            return
        bound = (
            STOP_AFTER_GIVING_UP_S
            if giving_up
            else max(max(pending) - time.monotonic(), STOP_AFTER_GIVING_UP_S)
        )
        stops = set(self._retiring.values())
        if producer is not None:
            stops.add(asyncio.ensure_future(stop_producer(producer, bound)))
        _, unfinished = await asyncio.wait(stops, timeout=bound) if stops else (set(), set())
        for stopping in unfinished:  # its producer left to the event loop's end
            stopping.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        left = sum(not f.done() for f in self._unacknowledged)
        self._unacknowledged.clear()  # said once: not again by a later stop()
        if left:
            log.warning(
                "stopped with %d command(s) Kafka at %s has not acknowledged: they may "
                "still be written; send them again, with the same eventIds",
                left,
                self.settings.bootstrap_servers,
            )

    async def __aenter__(self) -> SessionClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Cancelled (a Ctrl-C or SIGTERM under asyncio.run): a command-line
        # tool wants to end now (waiting out the delivery timeout held
        # `stream-app send` for up to 120 s after one Ctrl-C, and `docker
        # stop` killed it meanwhile); a service's handler cancelled by its
        # caller still wants its commands delivered, so it is asked for.
        cancelled = exc_type is not None and issubclass(
            exc_type, (asyncio.CancelledError, KeyboardInterrupt)
        )
        await self.stop(giving_up=cancelled and self.give_up_when_cancelled)

    def _application(self, application_id: int | None) -> int | None:
        return self.application_id if application_id is None else application_id

    def validate(self, command: Mapping[str, Any]) -> bytes:
        """:func:`validate_command` with this client's settings."""
        return self._checked(command)[0]

    def _checked(self, command: Mapping[str, Any]) -> tuple[bytes, Command]:
        return _checked(
            command,
            self.application_settings,
            default_application_id=self.settings.default_application_id,
            max_command_bytes=self.settings.max_command_bytes,
        )

    async def send(self, command: Mapping[str, Any]) -> SentCommand:
        """Check ``command`` and send it, keyed by its integrationId; returns once
        the broker has it (``acks=all``). An ``eventId`` is added when missing.

        Raises :class:`CommandRejectedError` (nothing sent) or an aiokafka
        ``KafkaError`` (send the same document again to retry):
        ``KafkaTimeoutError`` when the broker has not acknowledged the command
        within ``delivery_timeout_s``. The builders
        give every command an ``eventId``; a document written by hand without
        one gets a new one on each send, so give it one (:func:`new_event_id`)
        before the first try if it may be retried. After a failed send, the
        producer is replaced; a send waits (within its delivery timeout) until
        the old one has delivered or given up what it held of the same
        session, so that a session's commands stay in the order they were sent.

        The helpers below build a new command, with a new ``eventId``, on every
        call: to retry one of them, pass the same ``event_id`` each time (chosen
        with :func:`new_event_id` before the first try), or build the command
        (:func:`update_command`, ...) and send that document again.
        """
        doc = dict(command)
        if doc.get("eventId") is None:
            doc["eventId"] = new_event_id()
        value, decoded = self._checked(doc)
        # As the workers read it: ``str()`` of a str enum member is its name.
        integration_id = decoded.integration_id
        key = integration_id.encode()
        deadline = time.monotonic() + self.delivery_timeout_s
        producer = await self._after_earlier(key, deadline, doc["eventId"])
        acknowledged = await producer.send(self.topic, value=value, key=key)
        self._unacknowledged[acknowledged] = (deadline, key, producer)
        acknowledged.add_done_callback(lambda done: self._unacknowledged.pop(done, None))
        # Waited for, not cancelled past the bound: aiokafka goes on trying.
        done, _ = await asyncio.wait({acknowledged}, timeout=max(deadline - time.monotonic(), 0))
        if not done:
            from aiokafka.errors import KafkaTimeoutError

            raise KafkaTimeoutError(
                f"{integration_id}: Kafka at {self.settings.bootstrap_servers} did not "
                f"acknowledge the command within {self.delivery_timeout_s:g} s; it may "
                f"still be written: send the same document again (eventId {doc['eventId']})"
            )
        failure = acknowledged.exception()
        if failure is not None:
            self._renew(producer)
            raise failure
        metadata = acknowledged.result()
        log.debug(
            "sent %s %s to %s[%d]@%d",
            doc.get("type"),
            integration_id,
            metadata.topic,
            metadata.partition,
            metadata.offset,
        )
        return SentCommand(
            integration_id, str(doc["eventId"]), metadata.topic, metadata.partition, metadata.offset
        )

    async def _after_earlier(self, key: bytes, deadline: float, event_id: object) -> Any:
        """The producer to send a command of ``key`` through, once no producer
        replaced after a failed send (:meth:`_renew`) and still stopping holds
        an earlier command of that session: sent through the new producer
        meanwhile, a close overtook an update of its session held in the old
        one, which the worker then rejected on a closed session. (A stop that
        gave up leaves its commands to the event loop's end: their sends have
        raised, "it may still be written".) Raises ``KafkaTimeoutError``
        (nothing sent) past ``deadline``, and RuntimeError once stopped."""
        while True:
            producer = self._producer
            if producer is None:
                raise RuntimeError("the client is not started, or stopped")
            if not self._retiring:  # no replaced producer holds anything
                return producer
            # Its earlier commands still held by a replaced producer, and those
            # producers' stops.
            earlier: list[asyncio.Future[Any]] = []
            stops: set[asyncio.Task[bool]] = set()
            for f, (_, held, by) in self._unacknowledged.items():
                if held == key and not f.done() and (stop := self._retiring.get(by)) is not None:
                    earlier.append(f)
                    stops.add(stop)
            if not earlier:
                return producer
            left = deadline - time.monotonic()
            if left <= 0:
                from aiokafka.errors import KafkaTimeoutError

                raise KafkaTimeoutError(
                    f"{key.decode()}: not sent: an earlier command of this session, held by "
                    f"a producer replaced after a failed send, was not acknowledged within "
                    f"{self.delivery_timeout_s:g} s; send the same document again "
                    f"(eventId {event_id})"
                )
            # Until one of them ends, or a stop of theirs, or the client's (which
            # gives up on them).
            stopping = asyncio.ensure_future(self._stopping.wait())
            try:
                await asyncio.wait(
                    [*earlier, *stops, stopping],
                    timeout=left,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                stopping.cancel()

    async def update_session(
        self, integration_id: str, *, event_id: str | None = None, **session: Any
    ) -> SentCommand:
        """Send :func:`update_command` (same keyword arguments)."""
        if session.get("application_id") is None:
            session["application_id"] = self.application_id
        return await self.send(update_command(integration_id, event_id=event_id, **session))

    async def close_session(
        self, integration_id: str, *, event_id: str | None = None, **session: Any
    ) -> SentCommand:
        """Send :func:`close_command`."""
        if session.get("application_id") is None:
            session["application_id"] = self.application_id
        return await self.send(close_command(integration_id, event_id=event_id, **session))

    async def cancel_session(
        self,
        integration_id: str,
        *,
        event_id: str | None = None,
        application_id: int | None = None,
    ) -> SentCommand:
        """Send :func:`cancel_command` (cancels an open session, revokes a closed one)."""
        return await self.send(
            cancel_command(
                integration_id,
                event_id=event_id,
                application_id=self._application(application_id),
            )
        )

    async def return_items(
        self,
        integration_id: str,
        items: Iterable[Mapping[str, Any]],
        *,
        event_id: str | None = None,
        application_id: int | None = None,
    ) -> SentCommand:
        """Send :func:`return_command`."""
        return await self.send(
            return_command(
                integration_id,
                items,
                event_id=event_id,
                application_id=self._application(application_id),
            )
        )

    async def reopen_session(
        self,
        integration_id: str,
        *,
        event_id: str | None = None,
        application_id: int | None = None,
    ) -> SentCommand:
        """Send :func:`reopen_command`."""
        return await self.send(
            reopen_command(
                integration_id,
                event_id=event_id,
                application_id=self._application(application_id),
            )
        )
