"""The engine's local state directory, checked before any broker call, and a
task start that fails for good."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_app.errors import ConfigurationError
from stream_app.pipeline.engine import Engine
from stream_app.pipeline.tasks import TaskId
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


class _TaskThatCannotStart:
    """Stands for a Task whose start fails for a reason retrying does not mend."""

    def __init__(self) -> None:
        self.id = TaskId("commands", 0)
        self.closed = False

    async def start(self) -> int:
        raise RuntimeError("a bug, say")

    async def close(self) -> None:
        self.closed = True


async def test_a_start_that_fails_for_good_stops_the_engine_instead_of_pausing_it(
    tmp_path: Path,
) -> None:
    """Its partitions would otherwise stay paused for good while the rest runs:
    the engine stops (committing the other tasks) and ``run`` raises it."""
    engine = Engine(Settings(data_dir=tmp_path), TopicLayout(1, 1_048_588))
    engine._consumer = object()  # type: ignore[assignment] - _start only checks it is set
    task = _TaskThatCannotStart()
    await engine._start(task)  # type: ignore[arg-type]
    assert task.closed
    assert engine._stopping.is_set()
    assert isinstance(engine._failure, RuntimeError)


def test_a_data_dir_that_cannot_be_a_directory_is_a_configuration_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    settings = Settings(data_dir=tmp_path / "a-file" / "state", app_id="shop")
    with pytest.raises(ConfigurationError) as refused:
        Engine(settings, TopicLayout(4, 1_048_588)).check_local_state()
    message = str(refused.value)
    assert message.startswith(f"STREAM_APP_DATA_DIR={tmp_path / 'a-file' / 'state'}: ")
    assert "Not a directory" in message
