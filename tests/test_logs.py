"""The worker's logging: the Kafka client's repeated lines are held back,
requests the HTTP server could not parse are one warning line each, and a
group coordinator that is not ready yet is a warning."""

from __future__ import annotations

import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiokafka.errors import GroupCoordinatorNotAvailableError, KafkaConnectionError

from stream_app.logs import BadHttpRequests, RepeatedClientLines, configure_logging, excerpt


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_repeated_client_line_passes_once_per_window_and_then_says_how_many() -> None:
    clock = Clock()
    lines = RepeatedClientLines(window_s=10.0, clock=clock)
    template = "Unable connect to node with id %s: %s"
    passed = []
    for attempt in range(300):  # a client retrying every 100 ms for 30 s
        clock.now = 1000.0 + attempt * 0.1
        r = record("aiokafka", template, 1, f"refused {attempt}")
        if lines.filter(r):
            passed.append(r.getMessage())
    assert passed == [
        "Unable connect to node with id 1: refused 0",
        "Unable connect to node with id 1: refused 100 (99 like it held back in 10 s)",
        "Unable connect to node with id 1: refused 200 (99 like it held back in 10 s)",
    ]


def test_kinds_of_client_lines_are_held_back_each_on_its_own() -> None:
    lines = RepeatedClientLines(window_s=10.0, clock=Clock())
    kinds = [
        record("aiokafka", "Unable to update metadata from %s", [1]),
        record("aiokafka.consumer.fetcher", "Unable to update metadata from %s", [1]),
        record("aiokafka", "Unable to update metadata from %s", [1], level=logging.WARNING),
        record("aiokafka", "Unable connect to node with id %s: %s", 1, "refused"),
    ]
    assert [lines.filter(r) for r in kinds] == [True, True, True, True]
    assert [lines.filter(r) for r in kinds] == [False, False, False, False]


def test_the_workers_own_lines_are_never_held_back() -> None:
    lines = RepeatedClientLines(window_s=10.0, clock=Clock())
    for name in ("stream_app.pipeline.processor", "aiokafkaesque", "root"):
        assert all(lines.filter(record(name, "rejected %s", n)) for n in range(50))


def test_a_line_whose_message_is_not_text_is_grouped_too() -> None:
    lines = RepeatedClientLines(window_s=10.0, clock=Clock())
    first = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, {"not": "text"}, None, None)
    again = logging.LogRecord("aiokafka", logging.ERROR, __file__, 1, {"not": "text"}, None, None)
    assert lines.filter(first)
    assert not lines.filter(again)


def test_configured_logging_holds_back_an_outages_client_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("INFO")
    client = logging.getLogger("aiokafka.consumer.fetcher")
    ours = logging.getLogger("stream_app.pipeline.engine")
    for attempt in range(1000):
        client.error("Failed fetch messages from %s: %s", 1, f"NodeNotReadyError {attempt}")
        ours.info("still here %d", attempt)
    err = capsys.readouterr().err
    assert err.count("Failed fetch messages") == 1
    assert err.count("still here") == 1000


def _aiohttp_error(exc: BaseException) -> logging.LogRecord:
    """What aiohttp's server logs for a request that failed (``log_exception``)."""
    r = record("aiohttp.server", "Error handling request from %s", "10.0.0.7")
    r.exc_info = (type(exc), exc, None)
    return r


def test_a_request_the_http_server_could_not_parse_is_one_warning_line() -> None:
    bad, lines = BadHttpRequests(), RepeatedClientLines(window_s=10.0, clock=Clock())
    r = _aiohttp_error(LineTooLong("/v2/customer_sessions/" + "a" * 9000, "8190"))
    assert bad.filter(r)
    assert lines.filter(r)
    assert r.levelno == logging.WARNING
    assert r.exc_info is None
    message = r.getMessage()
    assert message.startswith("bad HTTP request from 10.0.0.7, answered 400: LineTooLong: ")
    assert len(message) < 300
    assert "\n" not in message
    # A client sending them over and over is held back like a client line.
    again = _aiohttp_error(BadHttpMessage("Invalid header value char"))
    assert bad.filter(again)
    assert not lines.filter(again)


def test_an_error_of_a_request_handler_keeps_its_traceback() -> None:
    bad, lines = BadHttpRequests(), RepeatedClientLines(window_s=10.0, clock=Clock())
    for _ in range(3):
        r = _aiohttp_error(KeyError("a bug in a handler"))
        assert bad.filter(r)
        assert lines.filter(r)
        assert r.levelno == logging.ERROR
        assert r.exc_info is not None


def test_an_excerpt_shows_a_short_key_whole_and_a_long_one_in_part() -> None:
    assert excerpt(None) == "None"
    assert excerpt(b"cart-1") == "b'cart-1'"
    assert excerpt(b"k" * 100) == repr(b"k" * 100)
    assert excerpt(b"k" * 1_000_000) == f"{b'k' * 100!r}... (1000000 bytes)"


def test_a_bad_request_line_is_lowered_to_warning_never_raised() -> None:
    configure_logging("ERROR")
    r = _aiohttp_error(LineTooLong("/" + "a" * 9000, "8190"))
    assert not BadHttpRequests().filter(r)  # a warning, below ERROR
    configure_logging("DEBUG")
    debug = _aiohttp_error(BadHttpMessage("not HTTP"))
    debug.levelno, debug.levelname = logging.DEBUG, "DEBUG"
    assert BadHttpRequests().filter(debug)
    assert debug.levelno == logging.DEBUG


def test_a_coordinator_not_ready_yet_is_a_warning_and_other_lookup_failures_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """What aiokafka logs, as it logs it, when the first group of a new cluster
    looks up its coordinator (the offsets topic is still being created)."""
    configure_logging("INFO")
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    coordinator.error("Group Coordinator Request failed: %s", KafkaConnectionError("refused"))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert " WARNING aiokafka.consumer.group_coordinator: " in lines[0]
    assert "GroupCoordinatorNotAvailableError" in lines[0]
    assert " ERROR aiokafka.consumer.group_coordinator: " in lines[1]
    assert "KafkaConnectionError" in lines[1]


def test_at_log_level_error_the_client_says_no_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("ERROR")
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    coordinator.warning("Heartbeat failed: %s", "the group is rebalancing")
    coordinator.error("Group Coordinator Request failed: %s", KafkaConnectionError("refused"))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "KafkaConnectionError" in lines[0]


def test_json_lines_hold_what_orjson_refuses_and_python_s_warnings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A lone surrogate (a path or name that is not UTF-8) made orjson refuse
    the record: Python's '--- Logging error ---' block in its place, the
    exception's traceback lost. warnings.warn wrote plain text among the JSON."""
    import json
    import warnings

    configure_logging("INFO", "json")
    logging.getLogger("stream_app.test").error("cannot read %s", "/etc/r\udce9glages.json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("something old", DeprecationWarning, stacklevel=1)
    lines = capsys.readouterr().err.splitlines()
    docs = [json.loads(line) for line in lines]  # every line one JSON object
    assert docs[0]["message"] == "cannot read /etc/r\\udce9glages.json"
    assert "something old" in docs[1]["message"]
    assert docs[1]["logger"] == "py.warnings"


def test_at_log_level_debug_the_client_says_everything(capsys: pytest.CaptureFixture[str]) -> None:
    """STREAM_APP_LOG_LEVEL=DEBUG, set to see what the Kafka client does,
    left aiokafka at WARNING; its DEBUG lines, many alike, are not held back."""
    configure_logging("DEBUG")
    fetcher = logging.getLogger("aiokafka.consumer.fetcher")
    for offset in range(3):
        fetcher.debug("Fetch offset %s is out of range", offset)
    fetcher.info("Fetch offset %s reset", 3)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 4, lines
    assert " DEBUG aiokafka.consumer.fetcher: Fetch offset 2 is out of range" in lines[2]
    # Not the connections' request dumps: a SASL PLAIN password is in one.
    logging.getLogger("aiokafka.conn").debug(
        "Request to %s:%d %d: %s", "broker", 9093, 3, "SaslAuthenticateRequest_v1(b'alice...')"
    )
    assert capsys.readouterr().err == ""
    configure_logging("INFO")
    fetcher.info("Fetch offset %s reset", 4)
    assert capsys.readouterr().err == ""
