"""Which topic configs would delete records the worker needs (no broker)."""

from __future__ import annotations

import pytest

from stream_app.errors import ConfigurationError
from stream_app.pipeline.topics import TopicLayout, check_retention, deletes_records
from stream_app.settings import Settings

WEEK_MS = "604800000"


@pytest.mark.parametrize(
    "config",
    [
        {"cleanup.policy": "compact", "retention.ms": WEEK_MS, "retention.bytes": "-1"},
        {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
        {"cleanup.policy": "compact,delete", "retention.ms": "-1"},
        {"cleanup.policy": "delete", "retention.ms": "9223372036854775807"},
        # Unreadable (no DescribeConfigs): nothing to go on.
        {},
    ],
)
def test_configs_that_keep_every_key(config: dict[str, str]) -> None:
    assert deletes_records(config) is None


@pytest.mark.parametrize(
    ("config", "why"),
    [
        # What kafka-topics.sh --create gives a topic on a broker's defaults.
        (
            {"cleanup.policy": "delete", "retention.ms": WEEK_MS, "retention.bytes": "-1"},
            f"cleanup.policy=delete, retention.ms={WEEK_MS}",
        ),
        (
            {"cleanup.policy": "compact, delete", "retention.ms": WEEK_MS},
            f"cleanup.policy=compact, delete, retention.ms={WEEK_MS}",
        ),
        (
            {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "1073741824"},
            "cleanup.policy=delete, retention.bytes=1073741824",
        ),
    ],
)
def test_configs_that_delete_by_time_or_size(config: dict[str, str], why: str) -> None:
    assert deletes_records(config) == why


def test_the_check_names_each_topic_and_the_fix() -> None:
    settings = Settings(bootstrap_servers="kafka:9092")
    check_retention(settings, TopicLayout(6, 1_048_588))
    layout = TopicLayout(
        6,
        1_048_588,
        (
            "app-sessions-changelog (cleanup.policy=delete, retention.ms=604800000)",
            "sessions.application-settings (cleanup.policy=delete, retention.bytes=10)",
        ),
    )
    with pytest.raises(ConfigurationError) as raised:
        check_retention(settings, layout)
    message = str(raised.value)
    assert "app-sessions-changelog (cleanup.policy=delete, retention.ms=604800000)" in message
    assert "sessions.application-settings (cleanup.policy=delete, retention.bytes=10)" in message
    assert "--bootstrap-server kafka:9092" in message
    assert "cleanup.policy=compact" in message
