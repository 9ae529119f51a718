from __future__ import annotations

from pathlib import Path

import pytest

from stream_app.errors import ConfigurationError
from stream_app.settings import Settings, known_variables


def test_defaults_are_the_documented_topics_and_exactly_once() -> None:
    settings = Settings()
    assert settings.topics.commands == "sessions.commands"
    assert settings.topics.rejected == "sessions.rejected"
    assert settings.processing_guarantee == "exactly_once"
    # Faust would reserve 2 GiB of block cache per partition database.
    assert settings.rocksdb.block_cache_mb * 1024 * 1024 < 2 * 1024**3


def test_environment_overrides_with_prefix_and_bootstrap_alias(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "10.0.0.1:9092")
    monkeypatch.setenv("STREAM_APP_TOPICS__CLOSED", "analytics.closed")
    monkeypatch.setenv("STREAM_APP_PROCESSING_GUARANTEE", "at_least_once")
    monkeypatch.setenv("STREAM_APP_SECURITY__PROTOCOL", "sasl_plaintext")
    monkeypatch.setenv("STREAM_APP_SECURITY__SASL_MECHANISM", "scram-sha-512")
    monkeypatch.setenv("STREAM_APP_SECURITY__SASL_USERNAME", "worker")
    monkeypatch.setenv("STREAM_APP_SECURITY__SASL_PASSWORD", "hunter2")
    settings = Settings.from_env()
    assert settings.bootstrap_servers == "10.0.0.1:9092"
    assert settings.topics.closed == "analytics.closed"
    assert settings.topics.commands == "sessions.commands"
    assert settings.processing_guarantee == "at_least_once"
    assert settings.security.sasl_password is not None
    assert "hunter2" not in repr(settings)


def test_invalid_guarantee_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_APP_PROCESSING_GUARANTEE", "maybe_once")
    with pytest.raises(ConfigurationError, match="STREAM_APP_PROCESSING_GUARANTEE=maybe_once"):
        Settings.from_env()


def test_the_readme_lists_every_setting() -> None:
    """`stream-app --help` promises it: every variable is in the README's table,
    by its whole name or, in the row of its group, as ``__FIELD``."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    known = known_variables()
    # A group (STREAM_APP_TOPICS) is listed by its fields.
    names = [n for n in known if not any(m.startswith(f"{n}__") for m in known)]
    assert "STREAM_APP_ROCKSDB__MAX_OPEN_FILES" in names
    assert "STREAM_APP_BOOTSTRAP_SERVERS" in names
    missing = []
    for name in names:
        group, _, field = name.rpartition("__")
        listed = any(
            f"`{name}`" in row or (group and f"`{group}__" in row and f"`__{field}`" in row)
            for row in rows
        )
        if not listed:
            missing.append(name)
    assert missing == []


def test_the_bootstrap_list_loses_its_empty_entries() -> None:
    """ "h:9092," from a template is accepted, as aiokafka accepted it, but
    passed on as it was aiokafka tried to reach "" and logged an ERROR."""
    assert Settings(bootstrap_servers="h:9092, ,k:9093,").bootstrap_servers == "h:9092,k:9093"
