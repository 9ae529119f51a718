"""Per-application settings: file, topic overrides, tombstones, bad records."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_app.errors import ConfigurationError
from stream_app.pipeline.application_settings import DEFAULT, ApplicationSettingsRegistry


def test_file_settings_apply_per_application_and_others_get_defaults(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    path.write_text('{"7": {"flattening": false, "additionalCosts": ["shipping"]}}')
    registry = ApplicationSettingsRegistry.load(path)
    seven = registry.settings_for(7)
    assert seven.flattening is False
    assert seven.additional_costs == frozenset({"shipping"})
    assert registry.settings_for(8) == DEFAULT
    assert DEFAULT.flattening is True


def test_topic_records_override_the_file_and_tombstones_restore_it(tmp_path: Path) -> None:
    path = tmp_path / "apps.json"
    path.write_text('{"7": {"flattening": false}}')
    registry = ApplicationSettingsRegistry.load(path)
    registry.apply_record(b"7", b'{"flattening": true, "attributes": ["city"]}')
    assert registry.settings_for(7).flattening is True
    assert registry.settings_for(7).attributes == frozenset({"city"})
    registry.apply_record(b"7", None)
    assert registry.settings_for(7).flattening is False


def test_a_bad_settings_record_is_ignored_and_the_previous_one_kept() -> None:
    registry = ApplicationSettingsRegistry()
    registry.apply_record(b"3", b'{"flattening": false}')
    registry.apply_record(b"3", b'{"flattening": "no"}')
    registry.apply_record(b"not-a-number", b"{}")
    registry.apply_record(b"3", b"{broken")
    assert registry.settings_for(3).flattening is False


@pytest.mark.parametrize("content", ["[1]", '{"x": {}}', '{"1": {"attributes": "city"}}', "{"])
def test_an_unusable_settings_file_stops_the_worker_at_start(tmp_path: Path, content: str) -> None:
    path = tmp_path / "apps.json"
    path.write_text(content)
    with pytest.raises(ConfigurationError):
        ApplicationSettingsRegistry.load(path)
