"""The ``stream-app`` console script: the entry point that builds settings and logging.

Subcommands: ``worker`` (see ``stream_app.worker``), ``traffic`` and ``watch``
(the demo), ``send`` (through :mod:`stream_app.client`), ``tail`` and
``topics create``. Exit codes: 0 done; 1 Kafka could not be reached or did not
do it (retrying may help); 2 bad input (usage, an invalid command, a
configuration error, credentials or certificates Kafka refuses: fix it first).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import math
import os
import re
import select
import shlex
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, NamedTuple, TextIO

from stream_app.console import interrupted_exit, remember_signals, take_sigterm_as_ctrl_c
from stream_app.errors import ConfigurationError
from stream_app.logs import configure_logging
from stream_app.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)

EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2

DESCRIPTION: Final = """\
Customer sessions on Kafka. Checkout systems send session commands (update,
return, reopen; an update also closes or cancels; Talon.One's v2 field names)
to the command topic; workers apply them, keep every session, and publish
closed, returned, cancelled and reopened sessions for analytics. A command
that cannot be applied goes to the rejection topic with a reason code and a
pointer to the offending field."""

EPILOG: Final = """\
examples:
  stream-app topics create                  declare every topic (once per cluster)
  stream-app worker                         run a worker (start as many as you need)
  stream-app send --type close --integration-id cart-1 --item SKU-1:2:19.99
  echo '{"type":"reopen","integrationId":"cart-1"}' | stream-app send
  stream-app tail closed --follow           watch closed sessions arrive
  stream-app tail rejected                  what was rejected, and why
  stream-app inspect cart-1                 a session's current state (any worker's URL)
  stream-app config                         the effective settings, secrets masked

configuration comes from the environment:
  KAFKA_BOOTSTRAP_SERVERS                   brokers (default 127.0.0.1:9092)
  STREAM_APP_APP_ID                         consumer group and internal topic prefix
  STREAM_APP_TOPICS__COMMANDS ... __REJECTED  topic names (default sessions.*)
  STREAM_APP_SECURITY__PROTOCOL, STREAM_APP_SECURITY__SASL_*, __SSL_*  broker security
  (every setting is listed in the README's Configuration section)

exit status: 0 done; 1 Kafka could not be reached or failed (retrying may
help); 2 bad input: usage, an invalid command, a configuration error, or
credentials, certificates or ACLs a broker refuses; 130 interrupted (Ctrl-C) and
143 stopped (SIGTERM), but for worker, and tail once it reads, which stop cleanly
on them (0)."""

#: ``tail`` accepts these short names for the configured topics.
TOPIC_ALIASES: Final = {
    "commands": "commands",
    "closed": "closed",
    "returned": "returned",
    "cancelled": "cancelled",
    "reopened": "reopened",
    "rejected": "rejected",
    "application-settings": "application_settings",
}


def _wrap(text: str) -> str:
    """A help paragraph, wrapped for the raw formatter (which keeps line breaks)."""
    return textwrap.fill(text, width=79)


def package_version() -> str:
    try:
        return version("stream-app")
    except PackageNotFoundError:  # running from a source tree that is not installed
        from stream_app import __version__

        return __version__


# --------------------------------------------------------------------------- worker, demo


def run_worker(settings: Settings) -> int:
    """Run one worker until SIGTERM, SIGINT or SIGHUP, then stop within ``shutdown_timeout_s``."""
    import threading

    from stream_app.worker import run

    configure_logging(settings.log_level, settings.log_format)
    # The stop's bound covers asyncio.run's end too, which waits for the
    # loop's executor threads (a DNS lookup of 25 s held the exit that long).
    watchdog: list[threading.Timer] = []
    try:
        return asyncio.run(run(settings, watchdog))
    finally:
        for timer in watchdog:
            timer.cancel()


def run_traffic(
    settings: Settings,
    sessions: int,
    seed: int,
    rate: float | None,
    prefix: str = "",
    *,
    yes: bool = False,
) -> int:
    """Produce the demo's sample checkout traffic to the command topic: one
    that holds records only with ``yes``."""
    from aiokafka.errors import KafkaError

    from stream_app.demo.traffic import produce_traffic
    from stream_app.errors import ConfigurationError

    try:
        summary = asyncio.run(
            produce_traffic(settings, sessions, seed, rate, prefix, to_an_empty_topic_only=not yes)
        )
    except ConfigurationError as exc:
        print(f"stream-app traffic: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KafkaError as exc:
        return _kafka_failed(
            "traffic", settings, exc, "; stopped before every record was acknowledged"
        )
    print(f"produced to {settings.topics.commands}: {summary.describe()}")
    return 0


def run_watch(settings: Settings, seconds: float, settle: float | None) -> int:
    """Print a live view of the output topics; 1 when nothing arrived."""
    from aiokafka.errors import KafkaError

    from stream_app.demo.view import watch

    try:
        result = asyncio.run(watch(settings, seconds=seconds, settle=settle))
    except KafkaError as exc:
        return _kafka_failed("watch", settings, exc)
    print(
        f"stopped: {result.stopped_because}; {result.total} output records",
        file=sys.stdout if result.total else sys.stderr,
    )
    if result.refused:
        return EXIT_USAGE
    return 0 if result.total else 1


# --------------------------------------------------------------------------- send


class UsageError(Exception):
    """Bad command-line input; main prints it with the usage line and exits 2."""


#: Numbers as JSON writes them, in ASCII: int() and Decimal() also take
#: "1_000" and other scripts' digits (Arabic-Indic ones, say), which no one means on a command line.
_INTEGER: Final = re.compile(r"[+-]?[0-9]+")
#: Infinity and NaN pass, for the message that says JSON cannot hold them.
_NUMBER: Final = re.compile(
    r"[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?|inf(?:inity)?|s?nan)", re.I
)


def _integer(text: str) -> int:
    if _INTEGER.fullmatch(text) is None:
        raise ValueError(f"not an integer: {text!r}")
    return int(text)


def _decimal(text: str) -> Decimal:
    if _NUMBER.fullmatch(text) is None:
        raise ValueError(f"not a number: {text!r}")
    return Decimal(text)


def _item(text: str) -> dict[str, Any]:
    """``SKU:QUANTITY:PRICE`` (the sku may itself contain colons)."""
    from stream_app.client import cart_item

    sku, sep, rest = text.rpartition(":")
    sku, sep2, quantity = sku.rpartition(":")
    if not sep or not sep2 or not sku:
        raise argparse.ArgumentTypeError(f"expected SKU:QUANTITY:PRICE, not {text!r}")
    try:
        count, price = _integer(quantity), _decimal(rest)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected SKU:QUANTITY:PRICE with an integer quantity and a number price, not {text!r}"
        ) from None
    try:
        return cart_item(sku, count, price)
    except ValueError as exc:  # NaN, or a price JSON cannot carry exactly
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, not {text!r}")
    return name, value


def _cost(text: str) -> tuple[str, Decimal]:
    from stream_app.client import command_number

    name, value = _name_value(text)
    try:
        price = _decimal(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=PRICE, not {text!r}") from None
    try:
        command_number(price)  # one JSON carries exactly: not NaN, infinite, 1e400 or 0.1000…01
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return name, price


def _attribute(text: str) -> tuple[str, Any]:
    """``NAME=VALUE``; VALUE is read as JSON when it is JSON (42, true, null,
    "x", [1]), otherwise taken as a string. A number in it that a command
    cannot carry exactly (24 digits, 1e400) is refused, not changed."""
    from stream_app import json

    name, value = _name_value(text)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        if _beyond_a_double(value):
            raise argparse.ArgumentTypeError(_inexact(text, name, value)) from None
        return name, value  # not JSON: text
    exact = _exactly(value)
    if exact is not _UNREADABLE and not _same_numbers(parsed, exact):
        raise argparse.ArgumentTypeError(_inexact(text, name, value))
    return name, parsed


def _inexact(text: str, name: str, value: str) -> str:
    return (
        f"{text!r}: a number in {value.strip()} cannot travel exactly as a JSON number; "
        f"to send it as text, quote it: {name}='\"{value.strip()}\"'"
    )


def _exactly(value: str | bytes) -> Any:
    """``value`` read as JSON with its numbers as Decimal; _UNREADABLE when the
    standard library cannot (NaN, nesting deeper than it reads)."""
    import json as exact_json

    try:
        return exact_json.loads(
            value, parse_float=Decimal, parse_int=Decimal, parse_constant=_not_json
        )
    except (ValueError, RecursionError):
        return _UNREADABLE


def _beyond_a_double(value: str) -> bool:
    """Whether ``value`` is JSON that orjson refused for a number past the
    largest double (1e400), not for what it is (text, say)."""
    exact = _exactly(value)
    if exact is _UNREADABLE:
        return False
    try:
        return _any_number(exact, lambda n: abs(n) > _LARGEST_DOUBLE)
    except RecursionError:
        return False


def _any_number(value: Any, test: Callable[[Decimal], bool]) -> bool:
    if isinstance(value, Decimal):
        return test(value)
    if isinstance(value, list):
        return any(_any_number(item, test) for item in value)
    if isinstance(value, dict):
        return any(_any_number(item, test) for item in value.values())
    return False


_LARGEST_DOUBLE = Decimal(sys.float_info.max)
_UNREADABLE = object()


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def _same_numbers(parsed: Any, exact: Any) -> bool:
    """Whether ``parsed`` (as a command carries it) holds the numbers of
    ``exact`` (the same JSON, its numbers as Decimal) exactly."""
    return _changed_number(parsed, exact) is None


class _Changed(NamedTuple):
    """A number of a command's JSON that the command, as read, carries as another."""

    #: JSON pointer to it.
    pointer: str
    #: As written (a Decimal).
    written: Any
    #: As the command carries it, and the workers read it.
    read: Any


def _changed_number(parsed: Any, exact: Any) -> _Changed | None:
    """The first number of ``exact`` (a JSON document, its numbers as Decimal)
    that ``parsed`` (the same document as a command carries it) does not hold
    exactly, if any. (Nested too deep to compare: the workers refuse it past
    29 levels anyway.)"""
    try:
        return _changed(parsed, exact, "")
    except RecursionError:
        return None


def _changed(parsed: Any, exact: Any, pointer: str) -> _Changed | None:
    if isinstance(exact, Decimal):
        from stream_app.domain.numbers import to_decimal

        if type(parsed) in (int, float) and to_decimal(parsed) == exact:
            return None
        return _Changed(pointer, exact, parsed)
    if isinstance(exact, list):
        if not isinstance(parsed, list) or len(parsed) != len(exact):
            return _Changed(pointer, exact, parsed)
        for index, (p, e) in enumerate(zip(parsed, exact, strict=True)):
            if (changed := _changed(p, e, f"{pointer}/{index}")) is not None:
                return changed
        return None
    if isinstance(exact, dict):
        if not isinstance(parsed, dict) or parsed.keys() != exact.keys():
            return _Changed(pointer, exact, parsed)
        from stream_app.domain.rejections import pointer_token

        for key, value in exact.items():
            step = pointer_token(key)
            if (changed := _changed(parsed[key], value, f"{pointer}/{step}")) is not None:
                return changed
        return None
    return None


#: The fields of a cart item holding numbers the workers read.
_ITEM_NUMBERS: Final = ("quantity", "price", "weight", "height", "width", "length")


def _read(doc: Any) -> Any:
    """What of a command's numbers the workers read (every other field they
    pass over, so it may hold any number), in the command's own shape, so
    that a JSON pointer into it points into the command."""
    if not isinstance(doc, dict):
        return doc
    read: dict[str, Any] = {key: doc[key] for key in ("applicationId",) if key in doc}
    session = doc.get("session")
    if doc.get("type") == "update" and isinstance(session, dict):
        kept = _with_costs(
            {key: session[key] for key in ("attributes",) if key in session}, session
        )
        items = session.get("cartItems")
        if isinstance(items, list):
            kept["cartItems"] = [_read_item(item) for item in items]
        read["session"] = kept
    returned = doc.get("returnedCartItems")
    if doc.get("type") == "return" and isinstance(returned, list):
        read["returnedCartItems"] = [
            {k: entry[k] for k in ("position", "quantity") if k in entry}
            if isinstance(entry, dict)
            else entry
            for entry in returned
        ]
    return read


def _read_item(item: Any) -> Any:
    if not isinstance(item, dict):
        return item
    kept = {key: item[key] for key in (*_ITEM_NUMBERS, "attributes") if key in item}
    return _with_costs(kept, item)


def _with_costs(kept: dict[str, Any], owner: dict[str, Any]) -> dict[str, Any]:
    """``kept`` with ``owner``'s additional costs, of which only the price is read."""
    costs = owner.get("additionalCosts")
    if isinstance(costs, dict):
        kept["additionalCosts"] = {
            name: {"price": cost["price"]} if isinstance(cost, dict) and "price" in cost else cost
            for name, cost in costs.items()
        }
    elif "additionalCosts" in owner:
        kept["additionalCosts"] = costs
    return kept


def _returned(text: str) -> dict[str, Any]:
    """``POSITION[:QUANTITY]`` or ``SKU[:QUANTITY]``: digits name a position."""
    from stream_app.client import returned_item

    ref, sep, quantity_text = text.rpartition(":")
    if not sep:
        ref, quantity_text = text, ""
    try:
        quantity = _integer(quantity_text) if quantity_text else None
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected POSITION[:QUANTITY] or SKU[:QUANTITY], not {text!r}"
        ) from None
    if not ref:
        raise argparse.ArgumentTypeError(
            f"expected POSITION[:QUANTITY] or SKU[:QUANTITY]: {text!r}"
        )
    # "sku=" names a sku made of digits (an EAN, say), which would read as a position.
    if ref.startswith("sku="):
        return returned_item(sku=ref.removeprefix("sku="), quantity=quantity)
    if ref.isascii() and ref.isdigit():
        return returned_item(int(ref), quantity=quantity)
    return returned_item(sku=ref, quantity=quantity)


#: send's flags that describe session fields (update and close only).
_SESSION_FLAGS: Final = (
    "profile_id",
    "store",
    "coupon",
    "referral_code",
    "loyalty_card",
    "identifier",
    "item",
    "cost",
    "attribute",
)


def _flag_command(args: argparse.Namespace) -> dict[str, Any]:
    from stream_app import client

    kind: str = args.type
    iid: str | None = args.integration_id
    if not iid:
        raise UsageError("--integration-id is required with --type")
    common: dict[str, Any] = {"event_id": args.event_id, "application_id": args.application_id}
    given = [
        f"--{flag.replace('_', '-')}"
        for flag in _SESSION_FLAGS
        if getattr(args, flag) is not None  # also --profile-id '' (anonymous)
    ]
    if kind not in ("update", "close") and given:
        raise UsageError(f"{', '.join(given)} cannot be used with --type {kind}")
    if kind != "return" and args.return_item:
        raise UsageError("--return-item needs --type return")
    if kind == "return":
        if not args.return_item:
            raise UsageError("--type return needs at least one --return-item")
        return client.return_command(iid, args.return_item, **common)
    if kind == "cancel":
        return client.cancel_command(iid, **common)
    if kind == "reopen":
        return client.reopen_command(iid, **common)
    session: dict[str, Any] = {
        "profile_id": args.profile_id,
        "store_integration_id": args.store,
        "coupon_codes": args.coupon,
        "referral_code": args.referral_code,
        "loyalty_cards": args.loyalty_card,
        "identifiers": args.identifier,
        "cart_items": args.item,
        "additional_costs": dict(args.cost) if args.cost else None,
        "attributes": dict(args.attribute) if args.attribute else None,
    }
    if kind == "close":
        return client.close_command(iid, **common, **session)
    return client.update_command(iid, **common, **session)


def _json_command(text: str | bytes) -> dict[str, Any]:
    from stream_app import json

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"the command is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UsageError("the command must be a JSON object")
    # Refused, as the flags refuse them: orjson reads 24 digits, or
    # 0.1000000000000000000001, as the nearest double, and the command
    # carried that number in silence.
    exact = _exactly(text)
    changed = None if exact is _UNREADABLE else _changed_number(_read(doc), _read(exact))
    if changed is not None:
        # An attribute may be text; an amount or a quantity may not.
        attribute = "/attributes/" in changed.pointer
        raise UsageError(
            f"{changed.written} at {changed.pointer or '/'} cannot travel exactly as a JSON "
            f"number: the workers would read {changed.read!r}; round it first"
            + (" (or, to send it as text, quote it)" if attribute else "")
        )
    passed_over = None if exact is _UNREADABLE else _changed_number(doc, exact)
    if passed_over is not None:
        # The command goes out written again: a field no worker reads keeps
        # the number as read, which the commands topic then shows.
        print(
            f"stream-app send: note: {passed_over.written} at {passed_over.pointer} goes out "
            f"as {passed_over.read!r}, as JSON numbers are read (the workers do not read it)",
            file=sys.stderr,
        )
    return doc


def _send_command(
    args: argparse.Namespace, stdin: TextIO | None, max_command_bytes: int
) -> dict[str, Any]:
    building = ("type", "integration_id", "event_id", "application_id", "return_item")
    flags_used = any(getattr(args, flag) is not None for flag in (*building, *_SESSION_FLAGS))
    if args.command_json is not None and flags_used:
        raise UsageError("give the command either as JSON or with flags, not both")
    if flags_used:
        if args.type is None:
            raise UsageError("building a command from flags needs --type")
        try:
            return _flag_command(args)
        except ValueError as exc:  # what the builders refuse (nested too deep)
            raise UsageError(str(exc)) from None
    if args.command_json is not None and args.command_json != "-":
        return _json_command(args.command_json)
    if stdin is None:  # started with stdin closed
        raise UsageError("no stdin: give the command as an argument or with --type")
    if args.command_json is None and stdin.isatty():
        raise UsageError("give a command: as JSON (argument or stdin) or with --type")
    # As bytes where there are (a pipe): JSON that is not UTF-8 is then a JSON
    # error, not a UnicodeDecodeError of the locale's decoder.
    buffer = getattr(stdin, "buffer", None)
    # Read up to a bound: `yes | stream-app send` grew until memory ran out.
    # Generous, as a command written with indentation is larger than sent.
    most = max(16 * max_command_bytes, 16 * 1024 * 1024)
    text = stdin.read(most + 1) if buffer is None else buffer.read(most + 1)
    if len(text) > most:
        raise UsageError(f"stdin holds more than {most} bytes: no command is that large")
    return _json_command(text)


def run_send(settings: Settings, args: argparse.Namespace, stdin: TextIO | None = None) -> int:
    """Check a command with the client and send it (or only print it, ``--dry-run``)."""
    from aiokafka.errors import KafkaError, MessageSizeTooLargeError

    from stream_app import json
    from stream_app.client import (
        CommandRejectedError,
        CommandTopicMissingError,
        SessionClient,
        new_event_id,
        validate_command,
    )
    from stream_app.demo.view import pretty
    from stream_app.pipeline.kafka import not_authorized

    command = _send_command(args, stdin or sys.stdin, settings.max_command_bytes)
    # Generated here or by the flags' builders: the user does not know it yet.
    generated = args.event_id is None if args.type is not None else command.get("eventId") is None
    command.setdefault("eventId", None)
    if command["eventId"] is None:
        command["eventId"] = new_event_id()
    # How to send it again with the same eventId, as it was given.
    same_id = (
        # Quoted, and with "=": an eventId may hold spaces or begin with "-".
        f"--event-id={shlex.quote(str(command['eventId']))}"
        if args.type is not None
        else f'"eventId": {json.dumps(command["eventId"]).decode()} in the document'
    )
    sending = False  # set once connected: from then on the command may go out
    try:
        # Checked before connecting: a mistake needs no broker to be found.
        validate_command(
            command,
            default_application_id=settings.default_application_id,
            max_command_bytes=settings.max_command_bytes,
        )
        if args.dry_run:
            print(pretty(command))
            return 0

        async def send() -> Any:
            nonlocal sending
            async with SessionClient(settings, give_up_when_cancelled=True) as client:
                sending = True
                if generated:
                    # Said before the command can go out: a process killed
                    # (`docker stop` past its grace period) says nothing more,
                    # and a rerun with a new eventId would apply it twice.
                    print(
                        f"stream-app send: sending it with a new eventId; to send it again "
                        f"without a second effect, give it its eventId: {same_id}",
                        file=sys.stderr,
                        flush=True,
                    )
                return await client.send(command)

        # A SIGTERM (a timeout, a CI job, kubectl exec ending) as a Ctrl-C
        # (main takes it so): the eventId is said, so a retry cannot apply the
        # command twice.
        sent = asyncio.run(send())
    except CommandRejectedError as exc:
        print(f"stream-app send: not sent, the command is invalid: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandTopicMissingError as exc:
        print(f"stream-app send: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        if sending:
            print(
                "stream-app send: interrupted; the command may have been sent: to send it "
                f"again without a second effect, give it its eventId: {same_id}",
                file=sys.stderr,
            )
        else:
            print(
                f"stream-app send: interrupted before connecting: not sent; retry with the "
                f"same eventId: {same_id}",
                file=sys.stderr,
            )
        return interrupted_exit()
    except MessageSizeTooLargeError as exc:  # a retry meets the same refusal
        print(
            f"stream-app send: not sent, Kafka refuses a record this large: {exc!r} (see "
            "STREAM_APP_MAX_COMMAND_BYTES and the command topic's max.message.bytes)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KafkaError as exc:
        why = _refused(settings, exc) if not sending or not_authorized(exc) else None
        if why is not None:  # refused, not lost: a retry meets the same refusal
            print(
                f"stream-app send: not sent, Kafka at {settings.bootstrap_servers} refuses "
                f"this client: {why}",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if not sending:  # connecting failed: nothing went out
            print(
                f"stream-app send: not sent to Kafka at {settings.bootstrap_servers}: "
                f"{exc!r}; retry with the same eventId: {same_id}",
                file=sys.stderr,
            )
            return EXIT_FAILED
        # The broker may have written it and the answer been lost: a retry
        # with a new eventId (the same flags again) would apply it twice.
        print(
            f"stream-app send: the command may have been sent to Kafka at "
            f"{settings.bootstrap_servers}: {exc!r}; to send it again without a second "
            f"effect, give it its eventId: {same_id}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(
        f"sent {command.get('type')} of {sent.integration_id} (eventId {sent.event_id}) "
        f"to {sent.topic}[{sent.partition}]@{sent.offset}"
    )
    return 0


# --------------------------------------------------------------------------- tail


def resolve_topic(settings: Settings, name: str) -> str:
    """A short name (``closed``, ``rejected``, ...) names the configured topic;
    anything else is a topic name."""
    field = TOPIC_ALIASES.get(name)
    return str(getattr(settings.topics, field)) if field else name


def _shown_record(record: Any, *, metadata: bool) -> str:
    """A record as tail prints it: its value as JSON, or in base64 when it is
    not JSON or JSON that cannot be written again (nested past what Python
    writes: a traceback before, and at every rerun, on that record)."""
    from stream_app.demo.view import pretty

    document = _record_document(record, metadata=metadata)
    try:
        return pretty(document)
    except TypeError:  # orjson.JSONEncodeError: past 64 bits, a lone surrogate, 254 levels
        pass
    try:
        return _pretty_exactly(document)
    except (ValueError, RecursionError):
        return pretty(_record_document(record, metadata=metadata, raw=True))


def _pretty_exactly(document: Any) -> str:
    """``document`` indented as :func:`~stream_app.demo.view.pretty` does, by
    Python's own writer, which takes what orjson does not: integers of any
    size, lone surrogates (escaped, as no terminal can show one) and deeper
    nesting."""
    import json as exact_json

    text = exact_json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        return exact_json.dumps(document, indent=2, allow_nan=False)
    return text


#: An integer of 19 digits or more (or a string of them: read again exactly,
#: that costs nothing but time): below -2**63 or past 2**64 - 1, where orjson
#: reads a double; -9223372036854775809 has 19 digits.
_LONG_INTEGER: Final = re.compile(rb"\d{19}")


def _json_value(raw: bytes) -> Any:
    """``raw`` read as JSON, exactly as it was written: by orjson, unless it
    would change it (an integer past 64 bits, read as a double: what the
    producer wrote looked changed) or refuses JSON that Python's reader takes
    (a lone surrogate escape, ``"\\ud800"``). _UNREADABLE when it is not JSON."""
    from stream_app import json

    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        pass
    else:
        if not _LONG_INTEGER.search(raw):
            return value
    import json as exact_json

    try:
        return exact_json.loads(raw.decode(), parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return _UNREADABLE


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text} is past the largest double")
    return number


def _record_document(record: Any, *, metadata: bool, raw: bool = False) -> Any:
    value: Any
    if record.value is None:
        value = None
    elif raw or (value := _json_value(record.value)) is _UNREADABLE:
        value = {"valueBase64": base64.b64encode(record.value).decode("ascii")}
    if not metadata:
        return value
    shown: dict[str, Any] = {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "timestamp": record.timestamp,
    }
    try:
        shown["key"] = record.key.decode() if record.key is not None else None
    except UnicodeDecodeError:
        # Decoded with replacement characters, two such keys looked the same.
        shown["keyBase64"] = base64.b64encode(record.key).decode("ascii")
    shown["value"] = value
    return shown


async def tail(
    settings: Settings,
    topic: str,
    *,
    follow: bool = False,
    from_end: bool = False,
    limit: int | None = None,
    metadata: bool = False,
    out: Callable[[str], None] = print,
) -> int:
    """Print the records of ``topic`` as indented JSON, read_committed, without a
    consumer group (nothing is committed). Without ``follow`` it stops at the
    end the topic had when it started; with it, or ``from_end`` (which would
    stop at once, having printed nothing), at SIGINT or SIGTERM. Returns
    how many records it printed; raises LookupError when the topic does not exist."""
    from stream_app.pipeline.kafka import client_options

    options = client_options(settings)
    stop = asyncio.Event()
    closing = asyncio.Event()
    loop = asyncio.get_running_loop()
    this = asyncio.current_task()

    def stopped() -> None:
        # Whatever is awaited ends now: a broker that does not answer held
        # the connection, and Ctrl-C did nothing for 40 s, or killed it. Once
        # only, and not the consumer's close.
        if stop.is_set():
            return
        stop.set()
        if this is not None and not closing.is_set():
            this.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopped)
    printed = [0]

    def shown(text: str) -> None:
        out(text)
        printed[0] += 1

    try:
        await _tail(
            settings, options, topic, follow, from_end, limit, metadata, shown, printed, closing
        )
    except asyncio.CancelledError:
        # Ours, from the signal, unless the caller's came too.
        if not stop.is_set() or this is None or this.uncancel() > 0:
            raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    return printed[0]


async def _tail(
    settings: Settings,
    options: dict[str, Any],
    topic: str,
    follow: bool,
    from_end: bool,
    limit: int | None,
    metadata: bool,
    out: Callable[[str], None],
    printed: list[int],
    closing: asyncio.Event,
) -> None:
    """:func:`tail`'s reading, ``printed[0]`` counting what ``out`` printed;
    ``closing`` set once it closes its consumer."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from stream_app.pipeline.kafka import partition_count

    count = await partition_count(options, topic)
    if not count:
        raise LookupError(f"topic {topic} does not exist at {settings.bootstrap_servers}")
    consumer = AIOKafkaConsumer(
        **options,
        group_id=None,
        enable_auto_commit=False,
        isolation_level="read_committed",
        # Records deleted under it (retention, the workers' purge of their
        # internal topics): on from the first left, not silently to the end.
        auto_offset_reset="earliest",
    )
    try:
        await consumer.start()  # in the try: a start cut short closes it too
        partitions = [TopicPartition(topic, p) for p in range(count)]
        consumer.assign(partitions)
        if from_end:
            await consumer.seek_to_end(*partitions)
        else:
            await consumer.seek_to_beginning(*partitions)
        ends = None if follow or from_end else await consumer.end_offsets(partitions)
        while True:
            if ends is not None and all(
                [await consumer.position(tp) >= ends[tp] for tp in partitions]
            ):
                break
            batches = await consumer.getmany(timeout_ms=200)
            for tp in sorted(batches, key=lambda tp: tp.partition):
                for record in batches[tp]:
                    if ends is not None and record.offset >= ends[tp]:
                        continue
                    out(_shown_record(record, metadata=metadata))
                    if limit is not None and printed[0] >= limit:
                        return
    finally:
        closing.set()
        await consumer.stop()


def _kafka_failed(command: str, settings: Settings, exc: BaseException, then: str = "") -> int:
    """Say why Kafka failed ``command`` (and ``then``, what that left undone);
    the exit status. Brokers that refuse this client (credentials, a SASL
    mechanism, a CA, an ACL) are a configuration mistake, exit 2, as the
    worker says; aiokafka reports most of them only as "Unable to
    bootstrap", which reads as an outage to retry."""
    servers = settings.bootstrap_servers
    why = _refused(settings, exc)
    if why is not None:
        print(
            f"stream-app {command}: Kafka at {servers} refuses this client: {why}{then}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    print(f"stream-app {command}: Kafka at {servers}: {exc!r}{then}", file=sys.stderr)
    return EXIT_FAILED


def _refused(settings: Settings, exc: BaseException) -> str | None:
    """What of this client Kafka refuses, when that is why ``exc`` was raised."""
    from aiokafka.errors import KafkaConnectionError

    from stream_app.pipeline.kafka import client_options, not_authorized, refusal

    if not_authorized(exc) is not None:
        # Not the worker's advice (to grant the worker's ACLs): this client
        # needs only what it does.
        return f"{exc} (grant this client's principal that access)"
    if isinstance(exc, KafkaConnectionError):
        return asyncio.run(refusal(client_options(settings), timeout_s=5.0))
    return None


def run_tail(settings: Settings, args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from stream_app.pipeline.unreadable import empty_control_batch
    from stream_app.settings import is_kafka_name

    topic = resolve_topic(settings, args.topic)
    if not is_kafka_name(topic):
        shown = topic.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        print(
            f"stream-app tail: '{shown}' is no topic name and no short name "
            f"({', '.join(TOPIC_ALIASES)})",
            file=sys.stderr,
        )
        return EXIT_USAGE

    def out(text: str) -> None:
        print(text, flush=True)

    try:
        asyncio.run(
            tail(
                settings,
                topic,
                follow=args.follow,
                from_end=args.from_end,
                limit=args.max_records,
                metadata=args.metadata,
                out=out,
            )
        )
    except LookupError as exc:
        print(f"stream-app tail: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KafkaError as exc:
        if empty_control_batch(exc):
            print(
                f"stream-app tail: {topic} holds a control batch of no records, which Kafka's "
                "log cleaner leaves in a compacted topic written in transactions (KAFKA-7467), "
                "and which the Kafka client cannot read past (the workers read past it). "
                "Kafka's kafka-console-consumer.sh reads the whole topic; --from-end shows "
                "only the records written from now on.",
                file=sys.stderr,
            )
            return EXIT_FAILED
        return _kafka_failed("tail", settings, exc)
    except UnicodeDecodeError as exc:  # aiokafka's, for a header name that is not UTF-8
        print(
            f"stream-app tail: {topic} holds a record the Kafka client cannot read "
            f"(a header name that is not UTF-8: {exc.reason}). The workers reject such a "
            "command as UNREADABLE_RECORD, with its key and value: see "
            "`stream-app tail rejected`.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except BrokenPipeError:
        # The reader went away (`| head`): done, quietly, as cat and grep are.
        # Python's flush of stdout at exit would fail again: it writes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


# --------------------------------------------------------------------------- topics


class DeclaredTopic(NamedTuple):
    """What ``stream-app topics create`` says of one topic."""

    name: str
    created: bool
    #: 0 when the broker would not describe the topic.
    partitions: int
    #: The topic's values of the configs this app sets on it ("?": not
    #: described); None when the broker would not describe its configs (no
    #: DescribeConfigs, or a topic it does not know yet).
    config: dict[str, str] | None
    #: Those of the app's configs that the topic does not have.
    differs: dict[str, str]


async def create_topics(
    settings: Settings,
) -> tuple[list[DeclaredTopic], ConfigurationError | None]:
    """Declare every topic of ``settings`` (as a worker would on start): each
    as it is now, and why a worker would refuse to start on them, if it would."""
    from aiokafka.admin import AIOKafkaAdminClient

    from stream_app.pipeline.kafka import client_options
    from stream_app.pipeline.topics import (
        check_topics,
        ensure_topics,
        topic_specs,
    )

    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        before = set(await admin.list_topics())
        layout = await ensure_topics(settings, declaring=True)
        # Created either way; said now rather than by the first worker, after
        # the table that shows the topics' configs.
        refused = None
        try:
            check_topics(settings, layout)
        except ConfigurationError as exc:
            refused = exc
        specs = topic_specs(settings, layout.partitions)
        counts = {
            entry["topic"]: len(entry.get("partitions") or ())
            for entry in await admin.describe_topics([spec.name for spec in specs])
            if not entry.get("error_code")
        }
    finally:
        await admin.close()
    declared = []
    for spec in specs:
        created = spec.name not in before
        partitions = counts.get(spec.name, 0)
        actual = layout.configs.get(spec.name)
        if created and (actual is None or not partitions):
            # Not known yet to the broker asked: as it was created just now.
            actual = actual or spec.config
            partitions = partitions or spec.partitions
        if not spec.config:
            config: dict[str, str] | None = {}  # nothing of it to read
        elif actual is None:
            config = None
        else:
            config = {k: actual.get(k, "?") for k in spec.config}
        differs = (
            {}
            if config is None
            else {k: v for k, v in spec.config.items() if config[k] not in (v, "?")}
        )
        declared.append(DeclaredTopic(spec.name, created, partitions, config, differs))
    return declared, refused


def run_topics_create(settings: Settings, partitions: int | None) -> int:
    from aiokafka.errors import KafkaError

    if partitions is not None:
        settings = settings.model_copy(update={"partitions": partitions})
    try:
        topics, refused = asyncio.run(create_topics(settings))
    except ConfigurationError as exc:
        print(f"stream-app topics create: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KafkaError as exc:
        return _kafka_failed("topics create", settings, exc)
    width = max(len(topic.name) for topic in topics)
    print(f"topics of app {settings.app_id} at {settings.bootstrap_servers}:")
    for topic in topics:
        if topic.config is None:
            configs = "(configs not readable)"
        else:
            configs = " ".join(f"{k}={v}" for k, v in sorted(topic.config.items()))
        if topic.differs:
            wanted = " ".join(f"{k}={v}" for k, v in sorted(topic.differs.items()))
            configs += f" (the worker creates it with {wanted})"
        unit = "partition" if topic.partitions == 1 else "partitions"
        status = "created" if topic.created else "exists"
        line = f"  {status:<8} {topic.name:<{width}}  {topic.partitions:>3} {unit:<10} {configs}"
        print(line.rstrip())
    if refused is not None:
        print(f"stream-app topics create: {refused}", file=sys.stderr)
        return EXIT_USAGE
    return 0


# --------------------------------------------------------------------------- parser


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:  # argparse said "invalid parse value", this function's name
            article = "an" if kind is int else "a"
            raise argparse.ArgumentTypeError(f"not {article} {kind.__name__}: {text!r}") from None
        if not 0 < value < math.inf:  # nan is neither; inf never ends a wait
            raise argparse.ArgumentTypeError(f"must be > 0 and finite, not {text}")
        return value

    return parse


#: The largest applicationId (the contract's int32 range).
APPLICATION_ID_MAX: Final = 2_147_483_647
#: Sessions of `traffic` at most: their records are built in memory before the first is sent.
MAX_TRAFFIC_SESSIONS: Final = 1_000_000


def _seconds(text: str) -> float:
    """A wait: 0 or more seconds, finite (``inf`` never ends one, ``nan`` none)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, not {text}")
    return value


def _at_most(bound: int) -> Callable[[str], int]:
    """An integer in 1..``bound``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not 0 < value <= bound:
            raise argparse.ArgumentTypeError(f"must be in 1..{bound}, not {text}")
        return value

    return parse


def _id_prefix(text: str) -> str:
    from stream_app.demo.traffic import MAX_PREFIX

    if len(text) > MAX_PREFIX:
        raise argparse.ArgumentTypeError(f"at most {MAX_PREFIX} characters, not {len(text)}")
    try:
        text.encode()
    except UnicodeEncodeError:  # bytes of the command line that are not UTF-8
        raise argparse.ArgumentTypeError("not UTF-8") from None
    return text


def _add_send(sub: Any) -> None:
    send = sub.add_parser(
        "send",
        help="check a session command and send it to the command topic",
        description=_wrap(
            "Send one session command to the command topic, keyed by its integrationId, "
            "with an eventId (generated when the command has none; reuse it to retry "
            "safely). The command is checked first with the workers' rules that hold "
            "for every application: an invalid command is not sent, and the error names "
            "the reason code and the offending field, as the rejection topic would. The "
            "rules an application's settings decide (allowed attributes and costs, the "
            "quantity limit of flattening) are the workers' to apply: a command they "
            "refuse is sent, and rejected on the rejection topic. Give the command as JSON "
            "(an argument, or stdin) or build it with --type and the flags below."
        ),
        epilog=(
            "examples:\n"
            '  stream-app send \'{"type":"update","integrationId":"cart-1",\n'
            '                   "session":{"cartItems":[{"sku":"SKU-1","quantity":1,'
            '"price":9.5}]}}\'\n'
            "  stream-app send < command.json\n"
            "  stream-app send --type update --integration-id cart-1 --profile-id alice \\\n"
            "      --item SKU-1:2:19.99 --item SKU-2:1:5 --cost shipping=4.99 "
            "--attribute channel=web\n"
            "  stream-app send --type close --integration-id cart-1\n"
            "  stream-app send --type return --integration-id cart-1 --return-item 0:1\n"
            "  stream-app send --type cancel --integration-id cart-1\n"
            "\n"
            "exit status: 0 sent; 1 Kafka could not be reached (retry with the printed\n"
            "eventId); 2 bad input (an invalid command is not sent, a record larger\n"
            "than Kafka takes, or credentials, certificates or ACLs Kafka refuses);\n"
            "130 interrupted, 143 stopped by SIGTERM (retry with the printed eventId)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    send.add_argument(
        "command_json",
        nargs="?",
        metavar="JSON",
        help="the command as a JSON object; '-' or nothing reads it from stdin",
    )
    send.add_argument(
        "--dry-run", action="store_true", help="check and print the command, send nothing"
    )
    built = send.add_argument_group("building the command from flags")
    built.add_argument(
        "--type",
        choices=("update", "close", "cancel", "return", "reopen"),
        help="the command; close and cancel send an update that sets the state",
    )
    built.add_argument("--integration-id", metavar="ID", help="the session (required with --type)")
    built.add_argument("--event-id", metavar="ID", help="idempotency key (default: generated)")
    built.add_argument(
        "--application-id", type=int, metavar="N", help="default: the workers' default application"
    )
    built.add_argument("--profile-id", metavar="ID", help="the customer profile ('' = anonymous)")
    built.add_argument("--store", metavar="ID", help="storeIntegrationId")
    built.add_argument("--coupon", action="append", metavar="CODE", help="a coupon code (repeat)")
    built.add_argument("--referral-code", metavar="CODE")
    built.add_argument("--loyalty-card", action="append", metavar="CARD")
    built.add_argument("--identifier", action="append", metavar="ID", help="repeat for more")
    built.add_argument(
        "--item",
        action="append",
        type=_item,
        metavar="SKU:QTY:PRICE",
        help="a cart item (repeat; the items replace the whole cart)",
    )
    built.add_argument(
        "--cost",
        action="append",
        type=_cost,
        metavar="NAME=PRICE",
        help="a session-level additional cost, e.g. shipping=4.99 (repeat)",
    )
    built.add_argument(
        "--attribute",
        action="append",
        type=_attribute,
        metavar="NAME=VALUE",
        help="a session attribute; VALUE is JSON when it parses (42, true, null removes; a "
        "number in it that a double cannot hold exactly is refused: quote it)",
    )
    built.add_argument(
        "--return-item",
        action="append",
        type=_returned,
        metavar="POS[:QTY]",
        help="with --type return: a cart position (or a sku; sku=DIGITS for a sku of "
        "digits; a sku with colons ends with ':' or ':QTY') and the quantity (default: "
        "all that is left); repeat for more lines",
    )


def _add_inspect(sub: Any) -> None:
    inspect = sub.add_parser(
        "inspect",
        help="show one session's current state, from a worker",
        description=_wrap(
            "Ask a worker for the stored state of one session (the query API, "
            "GET /v2/customer_sessions/ID): any worker answers, forwarding to the one "
            "that owns the session. Shows what has been committed; a command still in "
            "an open transaction is not shown yet."
        ),
        epilog="exit status: 0 found; 1 unknown session or no worker could answer; 2 usage.",
    )
    inspect.add_argument("integration_id", metavar="INTEGRATION_ID")
    inspect.add_argument(
        "--wait",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="while the group rebalances or restores the worker answers 503 with "
        "Retry-After (and a worker stopping may cut its answer short); ask again for up "
        "to this long (default: 10; 0 asks once)",
    )
    inspect.add_argument(
        "--application-id",
        type=_at_most(APPLICATION_ID_MAX),
        default=None,
        help="default: the workers' default application (their STREAM_APP_DEFAULT_APPLICATION_ID)",
    )
    inspect.add_argument(
        "--url",
        default=None,
        help="a worker's HTTP address (default: this machine's worker, at "
        "STREAM_APP_HTTP_HOST and STREAM_APP_HTTP_PORT)",
    )


def _local_worker_url(settings: Settings) -> str:
    """The worker of this machine (a pod's own), where it listens: loopback
    for every interface, of the address family it serves (``::`` is IPv6
    only, so 127.0.0.1 was refused there)."""
    host = settings.http_host
    if host in ("", "0.0.0.0"):  # noqa: S104 - matched, not bound
        host = "127.0.0.1"
    elif host == "::":
        host = "[::1]"
    elif ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{settings.http_port}"


def run_inspect(settings: Settings, args: argparse.Namespace) -> int:
    """GET the session from a worker and print it as indented JSON."""
    from http.client import HTTPException, IncompleteRead, InvalidURL
    from ipaddress import ip_address
    from urllib.error import HTTPError, URLError
    from urllib.parse import quote, urlsplit
    from urllib.request import ProxyHandler, build_opener, urlopen

    base = args.url or _local_worker_url(settings)
    try:
        segment = quote(args.integration_id, safe="")
    except UnicodeEncodeError:  # bytes of the command line that are not UTF-8
        print(
            f"stream-app inspect: error: the integrationId {args.integration_id!r} is not UTF-8",
            file=sys.stderr,
        )
        return EXIT_USAGE
    url = f"{base.rstrip('/')}/v2/customer_sessions/{segment}"
    if args.application_id is not None:
        # Otherwise the worker's own default application id, as for `send`:
        # this environment's may not be the workers' (a `--url` from elsewhere).
        url += f"?applicationId={int(args.application_id)}"
    if not url.startswith(("http://", "https://")):
        print(f"stream-app inspect: error: not an http URL: {base}", file=sys.stderr)
        return EXIT_USAGE
    try:
        urlsplit(url).port  # noqa: B018 - raises ValueError for "http://[::1", a port of "x"
    except ValueError as exc:
        print(f"stream-app inspect: error: not a URL: {base} ({exc})", file=sys.stderr)
        return EXIT_USAGE
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ip_address(host).is_loopback
    except ValueError:
        loopback = False
    # A worker on this machine is never asked through $http_proxy, which
    # answered for it (a corporate proxy's 502); others as urllib does.
    get = build_opener(ProxyHandler({})).open if loopback else urlopen
    deadline = time.monotonic() + args.wait

    def again(pause: float | None) -> bool:
        """Whether to ask again after ``pause`` seconds (slept), within --wait."""
        if pause is None or args.wait <= 0 or time.monotonic() + pause > deadline:
            return False
        time.sleep(pause)
        return True

    while True:
        try:
            try:
                with get(url, timeout=10) as answer:
                    body = answer.read()
                break
            except HTTPError as exc:
                # Its body read as a 200's is: cut short, or lost, as below.
                status, detail = exc.code, exc.read().decode("utf-8", "replace")
                retry_after = exc.headers.get("Retry-After")
        except (URLError, OSError) as exc:
            print(f"stream-app inspect: no worker answered at {base}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except (ValueError, InvalidURL) as exc:  # a space, a control character
            print(f"stream-app inspect: error: not a URL: {base} ({exc})", file=sys.stderr)
            return EXIT_USAGE
        except HTTPException as exc:  # not HTTP (an SSH banner), or an answer cut short
            # A worker stopping mid-reply (a rolling restart): asked again, as
            # a 503 is, within --wait.
            if again(_CUT_SHORT_PAUSE_S if isinstance(exc, IncompleteRead) else None):
                continue
            return _not_a_worker(base, exc)
        if again(_retry_after(retry_after) if status == 503 else None):
            continue
        print(f"stream-app inspect: {status}: {detail}", file=sys.stderr)
        # 400: the request itself (an id the worker refuses), as documented.
        return EXIT_USAGE if status == 400 else EXIT_FAILED
    from stream_app import json
    from stream_app.demo.view import pretty

    try:
        shown = pretty(json.loads(body))
    except (json.JSONDecodeError, TypeError):  # not JSON, or nested past orjson's limit
        print(f"stream-app inspect: {base} answered, but not as a worker does", file=sys.stderr)
        return EXIT_FAILED
    print(shown)
    return 0


#: The pause before asking again after an answer cut short (``inspect --wait``).
_CUT_SHORT_PAUSE_S: Final = 0.5


def _not_a_worker(base: str, exc: BaseException) -> int:
    """Say that what answered at ``base`` is no worker, as ``exc`` shows (one
    line: a status line that is not HTTP holds its CR LF, and may be 64 KiB),
    or that its answer was cut short (a worker stopping mid-reply)."""
    from http.client import IncompleteRead

    if isinstance(exc, IncompleteRead):
        print(
            f"stream-app inspect: the answer from {base} was cut short (the worker stopped?): "
            f"{len(exc.partial)} bytes read; ask again",
            file=sys.stderr,
        )
        return EXIT_FAILED
    shown = repr(exc)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    print(
        f"stream-app inspect: {base} answered, but not as a worker does: {shown}", file=sys.stderr
    )
    return EXIT_FAILED


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header in seconds; None when absent or a date."""
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


def _add_tail(sub: Any) -> None:
    tail_parser = sub.add_parser(
        "tail",
        help="print the records of a topic as JSON",
        description=_wrap(
            "Print the records of a topic as indented JSON, as a downstream consumer "
            "sees them (read_committed: only committed outputs). Reads from the "
            "beginning and stops at the current end, unless --follow. Uses no consumer "
            "group and commits nothing. A value that is not JSON is printed as "
            '{"valueBase64": "..."}; a tombstone as null.'
        ),
        epilog=(
            "TOPIC is a topic name, or one of: " + ", ".join(TOPIC_ALIASES) + "\n"
            "(the topics configured by STREAM_APP_TOPICS__*).\n\n"
            "exit status: 0 done (or stopped by Ctrl-C); 1 no such topic, or Kafka\n"
            "out of reach or failing; 2 usage, or Kafka refuses this client's\n"
            "credentials.\n\n"
            "examples:\n"
            "  stream-app tail rejected\n"
            "  stream-app tail closed --from-end\n"
            "  stream-app tail returned | jq '.return.value'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tail_parser.add_argument("topic", metavar="TOPIC")
    tail_parser.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new records until Ctrl-C"
    )
    tail_parser.add_argument(
        "--from-end",
        action="store_true",
        help="skip what is there now; print new records as they come (implies --follow)",
    )
    tail_parser.add_argument(
        "-n",
        "--max-records",
        type=_positive(int),
        metavar="N",
        help="stop after N records: the first N from where it starts (the start of the "
        "topic, or with --from-end the next N to come), not the last N as tail(1)",
    )
    tail_parser.add_argument(
        "--metadata",
        action="store_true",
        help=(
            "wrap each record: topic, partition, offset, timestamp, key (keyBase64 when "
            "it is not UTF-8), value"
        ),
    )


def _add_topics(sub: Any) -> None:
    topics = sub.add_parser(
        "topics",
        help="manage the topics the app uses",
        description="Manage the topics the app uses.",
    )
    actions = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="declare every topic with its partitions and configs",
        description=_wrap(
            "Create every topic the app needs, with the right partition counts and "
            "configs (compaction for the settings topic and the state changelogs), for "
            "clusters where applications may not create topics. Topics that exist are "
            "kept; an internal topic whose partition count disagrees with the command "
            "topic's is an error. Run it with the same environment as the workers "
            "(app id and topic names decide the names). Prints every topic: created "
            "or already there, with its partitions and the configs the app sets (and, "
            "where they differ, what the worker would have created it with)."
        ),
        epilog=_wrap(
            "exit status: 0 every topic is as the workers need it; 1 Kafka out of "
            "reach or failing; 2 usage, Kafka refusing this client's credentials, "
            "an internal topic with another partition count, topics the broker "
            "would not create, or (after the table) topics a worker would refuse "
            "to start on."
        ),
    )
    create.add_argument(
        "--partitions",
        type=_at_most(2**31 - 1),  # CreateTopics' int32: past it, a traceback
        metavar="N",
        help="partitions of the command topic when it is created "
        "(default: STREAM_APP_PARTITIONS, 6); an existing command topic's count wins",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-app",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"stream-app {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "worker",
        help="run a worker: apply commands, publish outcomes (until Ctrl-C or SIGTERM)",
        description=_wrap(
            "Run one worker with the settings from the environment. Workers of one "
            "app id share the work; start more for throughput or availability. It "
            "creates missing topics, restores its state, and on SIGTERM or Ctrl-C "
            "commits and stops within STREAM_APP_SHUTDOWN_TIMEOUT_S."
        ),
        epilog="exit status: 0 clean stop; 1 the stop timed out or the worker failed; "
        "2 configuration error.",
    )
    traffic = sub.add_parser(
        "traffic",
        help="produce deterministic sample checkout traffic to the command topic",
        description=_wrap(
            "Produce sample checkout traffic (the demo's): sessions that are updated, "
            "closed, cancelled, returned, reopened, plus duplicates and bad records. "
            "The same seed gives the same records."
        ),
    )
    traffic.add_argument(
        "--sessions",
        type=_at_most(MAX_TRAFFIC_SESSIONS),
        default=200,
        help=f"default: 200; at most {MAX_TRAFFIC_SESSIONS:,} (built in memory first)",
    )
    traffic.add_argument("--seed", type=int, default=1, help="default: 1")
    traffic.add_argument(
        "--rate", type=_positive(float), default=None, help="records per second (default: max)"
    )
    traffic.add_argument(
        "--prefix",
        type=_id_prefix,
        default="",
        help="begins every integration and profile id, so that another run against the same "
        "topics makes new sessions rather than commands for the first run's (default: none)",
    )
    traffic.add_argument(
        "--yes",
        action="store_true",
        help="send to a command topic that already holds records (refused otherwise: the "
        "workers apply sample orders and publish them like real ones)",
    )
    watch = sub.add_parser(
        "watch",
        help="print a live view of the output topics",
        description="Print counts and the newest records of the output topics, every second.",
    )
    watch.add_argument("--seconds", type=_positive(float), default=60.0, help="default: 60")
    watch.add_argument(
        "--settle",
        type=_positive(float),
        default=None,
        help="also stop when nothing new arrived for this many seconds",
    )
    _add_send(sub)
    _add_tail(sub)
    _add_topics(sub)
    _add_inspect(sub)
    sub.add_parser(
        "config",
        help="print the effective settings (secrets masked) and exit",
        description=_wrap(
            "Print the settings the worker would use, from the environment and the "
            "defaults, as JSON with secrets masked. A configuration mistake is reported "
            "as one line, with exit status 2, exactly as the worker would report it."
        ),
    )
    return parser


def run_config(settings: Settings) -> int:
    """The effective settings as JSON; SecretStr values print as ``**********``.
    The application settings file is read as the worker reads it, and the
    data directory checked (not created)."""
    from stream_app.pipeline.application_settings import ApplicationSettingsRegistry
    from stream_app.pipeline.engine import usable_state_dir
    from stream_app.worker import usable_http_address

    try:
        ApplicationSettingsRegistry.load(settings.application_settings_file)
        usable_state_dir(settings, create=False)
        usable_http_address(settings)
    except ConfigurationError as exc:
        print(f"stream-app: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(settings.model_dump_json(indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # As stream_app.console does, for a call of main itself.
    if args.command == "worker":
        remember_signals()
        return _main(args)
    restore = take_sigterm_as_ctrl_c()
    try:
        return _main(args)
    finally:
        restore()


def _main(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_env()
    except ConfigurationError as exc:
        if args.command == "worker" and _json_logs_asked():
            # One JSON line among the worker's others, for a log pipeline that
            # parses them (the worker's later configuration errors are logged).
            configure_logging("INFO", "json")
            logging.getLogger("stream_app.worker").error("configuration error: %s", exc)  # noqa: TRY400 - one line
        else:
            print(f"stream-app: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        code = _run(settings, args)
        sys.stdout.flush()  # here, not at exit: a pipe's reader may be gone
    except KeyboardInterrupt:  # Ctrl-C: the worker handles it; the others just end
        return interrupted_exit()
    except BrokenPipeError:
        # Python's flush at exit would fail again: the stream writes nowhere.
        gone = _reader_gone(sys.stdout)
        stream = sys.stdout if gone else sys.stderr
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
        # stdout's reader went away (`config | head`; `send` once Kafka took
        # the command): done, quietly, as cat and grep are. stderr's: a
        # failure that could not be said is still a failure.
        return 0 if gone else EXIT_FAILED
    return code


def _json_logs_asked() -> bool:
    """Whether the environment asks for JSON logs, whatever else is wrong in it."""
    return any(
        name.upper() == f"{ENV_PREFIX}LOG_FORMAT" and value.strip().lower() == "json"
        for name, value in os.environ.items()
    )


def _reader_gone(stream: TextIO) -> bool:
    """Whether ``stream`` is a pipe whose reader has closed it."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _run(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "worker":
        return run_worker(settings)
    if args.command == "config":
        return run_config(settings)
    if args.command == "inspect":
        return run_inspect(settings, args)
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "traffic":
        return run_traffic(
            settings, int(args.sessions), args.seed, args.rate, args.prefix, yes=args.yes
        )
    if args.command == "watch":
        return run_watch(settings, args.seconds, args.settle)
    if args.command == "tail":
        return run_tail(settings, args)
    if args.command == "topics":
        return run_topics_create(settings, args.partitions)
    try:
        return run_send(settings, args)
    except UsageError as exc:
        print(f"stream-app send: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
