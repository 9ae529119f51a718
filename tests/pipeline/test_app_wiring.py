"""The Faust app is built from Settings alone (no broker needed to inspect it)."""

from __future__ import annotations

from pathlib import Path

from stream_app.pipeline.app import SessionPipeline
from stream_app.settings import RocksDBSettings, Settings


def test_tables_use_rocksdb_with_the_configured_memory_bounds(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        partitions=4,
        rocksdb=RocksDBSettings(block_cache_mb=8, write_buffer_mb=4, max_write_buffers=3),
    )
    pipeline = SessionPipeline(settings)
    for table in (pipeline.sessions, pipeline.session_ids, pipeline.first_sessions):
        options = table.data.rocksdb_options
        assert type(table.data).__module__ == "faust.stores.rocksdb"
        assert options.block_cache_size == 8 * 1024 * 1024
        assert options.write_buffer_size == 4 * 1024 * 1024
        assert options.max_write_buffer_number == 3
        assert table.partitions == 4


def test_guarantee_and_topics_follow_settings(tmp_path: Path) -> None:
    eos = SessionPipeline(Settings(data_dir=tmp_path / "a"))
    assert eos.app.conf.processing_guarantee.value == "exactly_once"
    alo = SessionPipeline(Settings(data_dir=tmp_path / "b", processing_guarantee="at_least_once"))
    assert alo.app.conf.processing_guarantee.value == "at_least_once"
    assert eos.commands.topics == ("sessions.commands", "stream-app-sessions.rekeyed")
    assert eos.app.conf.web_enabled is False
