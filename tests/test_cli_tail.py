"""`stream-app tail` over a record the Kafka client cannot read."""

from __future__ import annotations

import pytest

from stream_app import cli


async def _unreadable(*args: object, **kwargs: object) -> None:
    # What aiokafka raises for a record whose header name is not UTF-8.
    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def test_tail_over_an_unreadable_record_says_so_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, a traceback: operators could not look at the topic holding the
    record the workers rejected as UNREADABLE_RECORD."""
    monkeypatch.setattr(cli, "tail", _unreadable)
    assert cli.main(["tail", "commands"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert "cannot read" in err
    assert "UNREADABLE_RECORD" in err
    assert "Traceback" not in err
