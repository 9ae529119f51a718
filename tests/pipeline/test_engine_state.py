"""The engine's local state directory, checked before any broker call."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_app.errors import ConfigurationError
from stream_app.pipeline.engine import Engine
from stream_app.pipeline.topics import TopicLayout
from stream_app.settings import Settings


def test_state_directory_is_created_with_its_parents(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "not" / "there" / "yet", app_id="shop")
    Engine(settings, TopicLayout(4, 1_048_588)).check_local_state()
    assert (tmp_path / "not" / "there" / "yet" / "shop").is_dir()


def test_state_built_for_another_partition_count_is_refused(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, app_id="shop")
    Engine(settings, TopicLayout(4, 1_048_588)).check_local_state()
    Engine(settings, TopicLayout(4, 1_048_588)).check_local_state()  # same count: fine
    with pytest.raises(ConfigurationError) as refused:
        Engine(settings, TopicLayout(6, 1_048_588)).check_local_state()
    message = str(refused.value)
    assert "4 partitions" in message
    assert "sessions.commands has 6" in message
    assert str(tmp_path / "shop") in message
