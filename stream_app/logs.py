"""Logging, configured once at the entry point: text or JSON lines.

JSON lines carry ``time``, ``level``, ``logger`` and ``message`` (and
``exception`` when there is one). Nothing the worker logs contains a secret:
settings are never logged whole (``stream-app config`` masks them).

The Kafka client logs its warnings and errors, and at ``DEBUG`` all but
its connections' dumps of each request (a SASL password is in one).
Its warnings and errors are let through once per
:data:`CLIENT_REPEAT_WINDOW_S` for each kind of line (see
:class:`RepeatedClientLines`): while a broker is down, each of a worker's
clients retries every 100 ms and aiokafka logs every attempt.

The worker's own lines that a flood of input could repeat thousands of
times a second (a rejection, a re-keyed command, a failed record's
traceback, a forward to a worker that does not answer, a query of a store
or session that cannot be read) are held back where they are made, once per
:data:`HELD_BACK_WINDOW_S` for each kind (:class:`HeldBack`), the next one
saying how many were.

A malformed HTTP request (a request line over 16 KiB, say), which the HTTP
server has already answered with 400, is logged as one warning line without a
traceback (:class:`BadHttpRequests`), held back the same way: aiohttp logs
each one as an error with its traceback. A group coordinator that is not
ready yet, which aiokafka retries, is a warning, not an error
(:class:`CoordinatorNotReady`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Hashable
from datetime import UTC, datetime
from typing import Final

from stream_app import json
from stream_app.settings import LogFormat

#: Seconds for which a repeated line of the Kafka client is held back.
CLIENT_REPEAT_WINDOW_S: Final = 10.0
#: Kinds of client lines remembered at most (then forgotten all at once).
_KINDS_REMEMBERED: Final = 1000


#: Seconds for which a repeated line of the worker's own is held back.
HELD_BACK_WINDOW_S: Final = 10.0


class HeldBack:
    """One line of each kind per ``window_s``, asked where the line is made,
    so that a line held back costs no log record. A kind is what its caller
    says (a rejection's reason, a worker's URL); they should be few."""

    def __init__(
        self, window_s: float = HELD_BACK_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window_s = window_s
        self.clock = clock
        self._kinds: dict[Hashable, tuple[float, int]] = {}

    def due(self, kind: Hashable) -> int | None:
        """None when this line of ``kind`` is to be held back; otherwise how
        many of its kind were held back since the last one said."""
        now = self.clock()
        last = self._kinds.get(kind)
        if last is not None and now - last[0] < self.window_s:
            self._kinds[kind] = (last[0], last[1] + 1)
            return None
        if len(self._kinds) >= _KINDS_REMEMBERED:
            self._kinds.clear()
        self._kinds[kind] = (now, 0)
        return 0 if last is None else last[1]


def held_back(count: int, what: str) -> str:
    """`` (N more WHAT since the last such line)``, or nothing for none."""
    return f" ({count} more {what} since the last such line)" if count else ""


class RepeatedClientLines(logging.Filter):
    """Lets each kind of the Kafka client's lines (its logger, level and message
    template) through once per ``window_s``; the next one let through says how
    many were held back.

    One worker, its broker killed for ten minutes, logged 162,000 lines of
    aiokafka's (``Unable connect to node``, ``Unable to update metadata``,
    ``Failed fetch messages``...): about 270 per second. The worker's own lines
    are never held back.
    """

    def __init__(
        self,
        window_s: float = CLIENT_REPEAT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self._clock = clock
        #: Kind of line -> (when one was last let through, how many held back since).
        self._kinds: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name != "aiokafka"
            and not record.name.startswith("aiokafka.")
            and not getattr(record, BadHttpRequests.MARK, False)
        ) or record.levelno < logging.WARNING:  # the client's INFO and DEBUG come only at DEBUG
            return True
        template = record.msg if isinstance(record.msg, str) else repr(type(record.msg))
        kind = (record.name, record.levelno, template)
        now = self._clock()
        last = self._kinds.get(kind)
        if last is not None and now - last[0] < self.window_s:
            self._kinds[kind] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            held, since = last[1], now - last[0]
            record.msg = f"{record.getMessage()} ({held} like it held back in {since:.0f} s)"
            record.args = None
        if len(self._kinds) >= _KINDS_REMEMBERED:
            self._kinds.clear()
        self._kinds[kind] = (now, 0)
        return True


class BadHttpRequests(logging.Filter):
    """Turns the HTTP server's error for a request it could not parse, already
    answered with 400, into one warning line: the client's fault, not the
    worker's. Errors of the worker's own handlers keep their traceback."""

    #: Set on a rewritten record, so :class:`RepeatedClientLines` holds it back too.
    MARK: Final = "stream_app_bad_http_request"

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "aiohttp.server" or not record.exc_info:
            return True
        # Imported here: aiohttp is loaded by now, and the CLI's other commands
        # need not load it.
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1]
        if not isinstance(exc, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        detail = " ".join(str(exc.message).split())[:200]
        record.msg = "bad HTTP request from %s, answered %s: %s: %s"
        record.args = (remote, exc.code, type(exc).__name__, detail)
        record.exc_info = record.exc_text = None
        setattr(record, self.MARK, True)
        # aiohttp's own DEBUG line for a bad first request stays one.
        return _at_most_warning(record)


class CoordinatorNotReady(logging.Filter):
    """Lowers aiokafka's error for a group coordinator lookup that the broker
    answered "not available yet", "loading" or "moved" to a warning: aiokafka
    retries it, and it is what every new cluster answers the first group (its
    offsets topic is being created) and a restarted broker answers while it
    loads. Kafka's Java client logs these at DEBUG. Any other failure of the
    lookup (authorization, connection) stays an error."""

    #: COORDINATOR_LOAD_IN_PROGRESS, COORDINATOR_NOT_AVAILABLE, NOT_COORDINATOR.
    CODES: Final = frozenset({14, 15, 16})

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name != "aiokafka.consumer.group_coordinator"
            or record.msg != "Group Coordinator Request failed: %s"
            or not isinstance(record.args, tuple)
            or len(record.args) != 1
            or getattr(record.args[0], "errno", None) not in self.CODES
        ):
            return True
        return _at_most_warning(record)


def _at_most_warning(record: logging.LogRecord) -> bool:
    """Lowers ``record`` to WARNING if it is above; whether it is still logged."""
    if record.levelno <= logging.WARNING:
        return True
    record.levelno, record.levelname = logging.WARNING, "WARNING"
    # Lowered after the logger's level check: at LOG_LEVEL=ERROR it goes.
    return logging.getLogger(record.name).isEnabledFor(logging.WARNING)


#: Bytes of a record's key or value that a log line shows.
EXCERPT_BYTES: Final = 100


def excerpt(data: bytes | None) -> str:
    """``data`` for a log line: its repr, past :data:`EXCERPT_BYTES` only the
    start and the length (a record's key can be 1 MB)."""
    if data is None or len(data) <= EXCERPT_BYTES:
        return repr(data)
    return f"{data[:EXCERPT_BYTES]!r}... ({len(data)} bytes)"


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        try:
            return json.dumps(doc).decode()
        except TypeError:  # orjson refuses a lone surrogate (a path, a name not UTF-8)
            # Before: Python's "--- Logging error ---" block, in place of the line.
            fixed = {k: v.encode("utf-8", "backslashreplace").decode() for k, v in doc.items()}
            return json.dumps(fixed).decode()


def configure_logging(level: str, fmt: LogFormat = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonLinesFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(BadHttpRequests())
    handler.addFilter(CoordinatorNotReady())
    handler.addFilter(RepeatedClientLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python's warnings as log lines too: as JSON, not plain text among JSON lines.
    logging.captureWarnings(True)
    # The Kafka client's own INFO lines would drown the worker's; at DEBUG,
    # asked for to see into the client too, they are let through.
    client = root.level if root.level <= logging.DEBUG else max(logging.WARNING, root.level)
    logging.getLogger("aiokafka").setLevel(client)
    # But never the connections' DEBUG lines: each request written out whole,
    # a SASL PLAIN authentication's password among them.
    logging.getLogger("aiokafka.conn").setLevel(max(logging.INFO, client))
