"""`stream-app inspect` against a fake worker: 503 with Retry-After is asked again."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from stream_app.cli import main


class _Worker(BaseHTTPRequestHandler):
    answers: ClassVar[list[tuple[int, bytes]]] = []
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        status, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.send_response(status)
        if status == 503:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def worker() -> Iterator[str]:
    _Worker.paths = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Worker)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


BUSY = (503, b'{"status":503,"detail":"the group is rebalancing or restoring"}')
FOUND = (200, b'{"integrationId":"a/b","state":"open"}')


def test_inspect_asks_again_while_the_group_rebalances(
    worker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _Worker.answers = [BUSY, BUSY, FOUND]
    assert main(["inspect", "a/b", "--url", worker]) == 0
    assert '"state": "open"' in capsys.readouterr().out
    assert _Worker.paths == ["/v2/customer_sessions/a%2Fb"] * 3


def test_inspect_leaves_the_application_to_the_worker_unless_given(
    worker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It sent this environment's default application id (1 when unset): from
    a machine without the workers' environment, a session of a worker whose
    default is 7 read as "no session in application 1"."""
    _Worker.answers = [FOUND]
    monkeypatch.setenv("STREAM_APP_DEFAULT_APPLICATION_ID", "3")
    assert main(["inspect", "a", "--url", worker]) == 0
    assert main(["inspect", "a", "--url", worker, "--application-id", "7"]) == 0
    assert _Worker.paths == ["/v2/customer_sessions/a", "/v2/customer_sessions/a?applicationId=7"]


def test_a_request_the_worker_refuses_is_a_usage_error(
    worker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 400 (an id over 1,000 characters) exited 1, which means no such session
    or no worker answered."""
    _Worker.answers = [(400, b'{"status":400,"detail":"the integrationId is too long"}')]
    assert main(["inspect", "x" * 1001, "--url", worker]) == 2
    assert "400" in capsys.readouterr().err


def test_inspect_with_no_wait_reports_the_503(
    worker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _Worker.answers = [BUSY, FOUND]
    assert main(["inspect", "a/b", "--url", worker, "--wait", "0"]) == 1
    assert "503" in capsys.readouterr().err
    assert len(_Worker.paths) == 1


def test_inspect_does_not_retry_a_404(worker: str, capsys: pytest.CaptureFixture[str]) -> None:
    _Worker.answers = [(404, b'{"status":404}'), FOUND]
    assert main(["inspect", "nobody", "--url", worker]) == 1
    assert "404" in capsys.readouterr().err
    assert len(_Worker.paths) == 1


@pytest.mark.parametrize(
    "url", ["http://[::1", "http://127.0.0.1:x", "http://a b", "http://h\x01:1"]
)
def test_inspect_refuses_a_url_it_cannot_read(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """urlopen raised ValueError for these: a traceback and exit 1."""
    assert main(["inspect", "cart-1", "--url", url]) == 2
    assert f"stream-app inspect: error: not a URL: {url}" in capsys.readouterr().err


@pytest.mark.parametrize("application_id", ["0", "2147483648", "x"])
def test_inspect_refuses_an_application_id_out_of_range(
    application_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """3000000000 was sent, the worker answered 400, and inspect exited 1."""
    with pytest.raises(SystemExit) as usage:
        main(["inspect", "cart-1", "--application-id", application_id])
    assert usage.value.code == 2
    assert "--application-id" in capsys.readouterr().err


def test_inspect_of_something_that_is_no_worker_is_one_line(
    worker: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A --url of another service that answers 200: a JSONDecodeError traceback."""
    for body in (b"<html>welcome</html>", b"[" * 300 + b"]" * 300):
        _Worker.answers = [(200, body)]
        assert main(["inspect", "cart-1", "--url", worker]) == 1
        assert capsys.readouterr().err == (
            f"stream-app inspect: {worker} answered, but not as a worker does\n"
        )


def test_inspect_of_an_id_that_is_not_utf8_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A command-line argument of bytes that are not UTF-8 (Python hands it on
    as surrogates): a UnicodeEncodeError traceback."""
    not_utf8 = b"\xff".decode("utf-8", "surrogateescape")
    assert main(["inspect", not_utf8, "--url", "http://127.0.0.1:1"]) == 2
    assert "is not UTF-8" in capsys.readouterr().err


def test_a_worker_on_this_machine_is_not_asked_through_a_proxy(
    worker: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """urllib sent the query for 127.0.0.1 to $http_proxy: on a machine with a
    corporate proxy, its 502 was the answer."""
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # urlopen keeps the opener it first built, with the proxies of that time.
    monkeypatch.setattr(urllib.request, "_opener", None)
    _Worker.answers = [FOUND]
    assert main(["inspect", "a/b", "--url", worker]) == 0
    assert _Worker.paths == ["/v2/customer_sessions/a%2Fb"]


@pytest.mark.parametrize("wait", ["nan", "inf", "-1"])
def test_a_wait_that_never_ends_or_is_none_is_a_usage_error(
    wait: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """inf retried a 503 for ever."""
    with pytest.raises(SystemExit) as stopped:
        main(["inspect", "a", "--wait", wait])
    assert stopped.value.code == 2
    assert ">= 0 and finite" in capsys.readouterr().err


class _IPv6Server(ThreadingHTTPServer):
    """Bound as asyncio (so the worker) binds ``::``: IPv6 only."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


def test_inspect_finds_this_machine_s_worker_where_it_listens(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A worker serving on ``::`` (README: IPv6 clusters) is IPv6 only:
    inspect asked 127.0.0.1 and said no worker answered."""
    server = _IPv6Server(("::", 0), _Worker)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("STREAM_APP_HTTP_HOST", "::")
        monkeypatch.setenv("STREAM_APP_HTTP_PORT", str(server.server_address[1]))
        _Worker.answers = [FOUND]
        assert main(["inspect", "a/b"]) == 0
        assert '"state": "open"' in capsys.readouterr().out
    finally:
        server.shutdown()
        server.server_close()


class _Answer(socketserver.StreamRequestHandler):
    """Reads the request's head and answers the next of :attr:`answers` (the
    last, again and again), as it is, then closes."""

    answers: ClassVar[list[bytes]] = []

    def handle(self) -> None:
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        # OSError: the client stopped reading (a line too long).
        with contextlib.suppress(OSError):
            self.wfile.write(answer)


def _inspect_answered(answers: list[bytes], wait: str) -> tuple[int, str]:
    """``stream-app inspect cart-1 --wait WAIT`` of a server answering
    ``answers`` (see _Answer); its exit status and URL."""
    _Answer.answers = answers
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Answer) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        try:
            return main(["inspect", "cart-1", "--url", url, "--wait", wait]), url
        finally:
            server.shutdown()


_CUT_SHORT = b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"in'


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + _CUT_SHORT, id="cut-short"),
        pytest.param(b"HTTP/1.1 404 Not Found\r\n" + _CUT_SHORT, id="error-cut-short"),
        pytest.param(b"HTTP/1.1 503 Busy\r\nRetry-After: 0\r\n" + _CUT_SHORT, id="503-cut-short"),
        pytest.param(b"HTTP/1.1 200 " + b"x" * 70_000 + b"\r\n\r\n", id="line-too-long"),
        pytest.param(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 101 + b"\r\n", id="headers"),
    ],
)
def test_inspect_of_an_answer_that_is_not_http_is_one_line(
    answer: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    """An address that answers something else than HTTP (an SSH banner), or
    cuts its answer short: an http.client traceback (BadStatusLine,
    IncompleteRead, LineTooLong), from the body of an error answer too."""
    # An answer cut short is asked again within --wait (below), then said.
    status, url = _inspect_answered([answer], "1")
    assert status == 1
    err = capsys.readouterr().err
    if answer.endswith(_CUT_SHORT):  # a worker stopping mid-reply, not another server
        assert err.startswith(f"stream-app inspect: the answer from {url} was cut short ")
    else:
        assert err.startswith(f"stream-app inspect: {url} answered, but not as a worker does: ")
    assert err.count("\n") == 1
    assert len(err) < 400


def test_inspect_asks_again_after_an_answer_cut_short(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A worker stopping mid-reply in a rolling restart: --wait asked again
    for a 503 but gave up at once on an answer cut short."""
    found = FOUND[1]
    whole = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(found), found)
    # A worker stopping cuts its first answer short; then it answers.
    assert _inspect_answered([b"HTTP/1.1 200 OK\r\n" + _CUT_SHORT, whole], "5")[0] == 0
    assert '"state": "open"' in capsys.readouterr().out
