"""The cleanup of local stores of partitions no longer owned (real RocksDB,
real files, another real process holding a lock; the clock is passed in)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from stream_app.pipeline.cleanup import StoreCleaner
from stream_app.pipeline.engine import Engine
from stream_app.pipeline.store import PartitionStore, RocksDBResources
from stream_app.pipeline.topics import TopicLayout
from stream_app.settings import RocksDBSettings, Settings
from tests.pipeline.fakes import held_by_another_process, store_deletes_done

DELAY_S = 600.0
STORES = ("sessions", "session-ids")


@pytest.fixture
def resources() -> RocksDBResources:
    return RocksDBResources(RocksDBSettings())


@pytest.fixture
def cleaner(tmp_path: Path) -> StoreCleaner:
    return StoreCleaner(tmp_path, STORES, DELAY_S)


def used_at(path: Path, when: float) -> None:
    os.utime(path, (when, when))


def make_store(path: Path, resources: RocksDBResources, *, when: float | None = None) -> None:
    store = PartitionStore(path, resources)
    store.write({b"k": b"v"}, 7)
    store.close()
    if when is not None:
        used_at(path, when)


def test_only_stores_unused_for_longer_than_the_delay_are_deleted(
    tmp_path: Path, resources: RocksDBResources, cleaner: StoreCleaner
) -> None:
    now = time.time()
    old = now - DELAY_S - 60
    make_store(tmp_path / "sessions" / "0", resources, when=old)  # unowned, old: deleted
    make_store(tmp_path / "session-ids" / "0", resources, when=old)  # the same
    make_store(tmp_path / "sessions" / "1", resources, when=now - 60)  # recently used: kept
    make_store(tmp_path / "sessions" / "2", resources, when=old)  # assigned: kept
    (tmp_path / "sessions" / "notes").mkdir()  # not a partition's: never touched
    used_at(tmp_path / "sessions" / "notes", old)
    make_store(tmp_path / "other-store" / "3", resources, when=old)  # not a store we have

    deleted = cleaner.delete({("sessions", 2)}, now)

    assert sorted(deleted) == [tmp_path / "session-ids" / "0", tmp_path / "sessions" / "0"]
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*"))
    assert left == ["other-store/3", "sessions/1", "sessions/2", "sessions/notes"]


def test_a_store_open_in_this_process_is_never_deleted(
    tmp_path: Path, resources: RocksDBResources, cleaner: StoreCleaner
) -> None:
    """Also when its task is no longer assigned (a dropped task still closing)
    and its files have not changed for long."""
    path = tmp_path / "sessions" / "4"
    make_store(path, resources)
    store = PartitionStore(path, resources)  # only read: its close writes no file
    try:
        used_at(path, time.time() - DELAY_S - 60)
        assert cleaner.delete(set(), time.time()) == []
        assert store.get(b"k") == b"v"
    finally:
        store.close()
    # Its close is its last use: the delay starts again.
    assert cleaner.delete(set(), time.time()) == []
    assert path.is_dir()
    later = time.time() + DELAY_S + 1
    assert cleaner.delete(set(), later) == [path]
    assert not path.exists()


def test_a_store_another_process_holds_is_left_in_place(
    tmp_path: Path, resources: RocksDBResources, cleaner: StoreCleaner
) -> None:
    """A second worker given the same data dir by mistake keeps its store."""
    path = tmp_path / "sessions" / "5"
    make_store(path, resources)
    with held_by_another_process(path):
        used_at(path, time.time() - DELAY_S - 60)
        assert cleaner.delete(set(), time.time()) == []
        assert (path / "CURRENT").exists()
    used_at(path, time.time() - DELAY_S - 60)
    assert cleaner.delete(set(), time.time()) == [path]


def test_a_deleted_store_opens_empty_so_its_partition_restores_from_the_start(
    tmp_path: Path, resources: RocksDBResources, cleaner: StoreCleaner
) -> None:
    path = tmp_path / "sessions" / "6"
    make_store(path, resources, when=time.time() - DELAY_S - 60)
    assert cleaner.delete(set(), time.time()) == [path]
    again = PartitionStore(path, resources)
    try:
        assert again.changelog_offset is None
        assert again.get(b"k") is None
    finally:
        again.close()


def test_the_engine_keeps_the_stores_of_its_tasks_and_deletes_the_others(
    tmp_path: Path, resources: RocksDBResources
) -> None:
    settings = Settings(data_dir=tmp_path)
    engine = Engine(settings, TopicLayout(2, 1_048_588))
    old = time.time() - settings.state_cleanup_delay_s - 60
    stores = [name for stage in engine.stages for name in stage.stores]
    for name in stores:
        for partition in (0, 1):
            make_store(engine.state_dir / name / str(partition), resources, when=old)
    # A task assigned (as _begin_start registers it), its stores not open yet.
    mine = SimpleNamespace(stage=engine.stages[0], partition=1)
    engine._tasks["commands[1]"] = mine
    # Not joined yet (a restart in a Kafka incident): the worker owns nothing,
    # but what it had is likely to come back.
    engine._clean_up()
    assert engine._removing is None
    assert len(list(engine.state_dir.glob("*/*"))) == 2 * len(stores)
    engine._joined = True
    engine._rebalancing = True  # a rebalance: what it closed may come back at once
    engine._clean_up()
    assert engine._removing is None
    assert len(list(engine.state_dir.glob("*/*"))) == 2 * len(stores)
    engine._rebalancing = False
    engine._clean_up()  # renamed aside at once, deleted in a thread
    left = sorted(str(p.relative_to(engine.state_dir)) for p in engine.state_dir.glob("*/[0-9]"))
    assert left == sorted(f"{name}/1" for name in engine.stages[0].stores)
    assert engine._removing is not None
    engine._removing.join(30)
    left = sorted(str(p.relative_to(engine.state_dir)) for p in engine.state_dir.glob("*/*"))
    assert left == sorted(f"{name}/1" for name in engine.stages[0].stores)


async def test_the_cleanup_delay_counts_from_the_first_assignment(tmp_path: Path) -> None:
    """With the delay counted from the engine's creation, a worker whose join
    took longer (Kafka lost, the group coordinator not found) deleted every
    store at its first poll after the join, its own among them."""
    settings = Settings(data_dir=tmp_path, state_cleanup_delay_s=600)
    engine = Engine(settings, TopicLayout(2, 1_048_588))
    engine._cleanup_at = time.monotonic() - 1  # the delay passed while it tried to join
    await engine.on_partitions_assigned(set())
    assert engine._cleanup_at > time.monotonic() + 590
    engine._cleanup_at = due = time.monotonic() + 5
    await engine.on_partitions_assigned(set())  # a later assignment changes nothing
    assert engine._cleanup_at == due


def test_what_a_delete_cut_short_left_aside_is_deleted(
    tmp_path: Path, resources: RocksDBResources, cleaner: StoreCleaner
) -> None:
    """A kill during a delete left ``<partition>.deleting``, which only the
    next open of that partition removed: on a pod that no longer owns it, never."""
    make_store(tmp_path / "sessions" / "7", resources)
    (tmp_path / "sessions" / "7").rename(tmp_path / "sessions" / "7.deleting")
    assert cleaner.delete(set(), time.time()) == [tmp_path / "sessions" / "7"]
    assert list((tmp_path / "sessions").iterdir()) == []


def test_names_of_other_digits_are_no_partitions(
    tmp_path: Path, resources: RocksDBResources, cleaner: StoreCleaner
) -> None:
    """str.isdigit() takes "²" and "٣" (Arabic-Indic three): int() refused the
    first, and the ValueError stopped the worker at every cleanup; the second
    was read as partition 3, and deleted."""
    old = time.time() - DELAY_S - 60
    for name in ("\u00b2", "\u0663"):
        (tmp_path / "sessions" / name).mkdir(parents=True)
        used_at(tmp_path / "sessions" / name, old)
    assert cleaner.delete(set(), time.time()) == []
    assert sorted(p.name for p in (tmp_path / "sessions").iterdir()) == ["\u00b2", "\u0663"]


def test_a_store_set_aside_that_cannot_be_deleted_is_said_and_blocks_nothing(
    tmp_path: Path,
    resources: RocksDBResources,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """rmtree failing (a file it may not remove, a failing disk) was silent,
    and left <partition>.deleting behind: the next rename onto it failed, and
    a corrupt store of that partition could never be deleted, so its task
    never started."""
    from stream_app.pipeline import store as store_module

    cleaner = StoreCleaner(tmp_path, STORES, DELAY_S)
    make_store(tmp_path / "sessions" / "3", resources, when=time.time() - DELAY_S - 60)
    real_rmtree = store_module.shutil.rmtree
    monkeypatch.setattr(store_module.shutil, "rmtree", lambda *a, **k: None)  # deletes nothing
    with caplog.at_level("WARNING"):
        assert cleaner.delete(set(), time.time()) == [tmp_path / "sessions" / "3"]
        assert cleaner.delete(set(), time.time()) == [tmp_path / "sessions" / "3"]
    [warning] = [r.getMessage() for r in caplog.records if "cannot delete" in r.getMessage()]
    assert "sessions/3.deleting, a store set aside" in warning  # once, not at each cleanup
    # The partition's store comes back, is deleted again, and is set aside
    # beside what is stuck: its task starts.
    make_store(tmp_path / "sessions" / "3", resources)
    again = store_module.set_aside(tmp_path / "sessions" / "3")
    assert again == tmp_path / "sessions" / "3.deleting.1"
    monkeypatch.setattr(store_module.shutil, "rmtree", real_rmtree)
    PartitionStore(tmp_path / "sessions" / "3", resources).close()  # removes what is aside
    store_deletes_done()  # in a thread of its own
    assert sorted(p.name for p in (tmp_path / "sessions").iterdir()) == ["3"]


def test_a_file_or_link_with_an_aside_name_blocks_no_delete(
    tmp_path: Path, resources: RocksDBResources
) -> None:
    """Renaming a store's directory onto a file or a link of its aside name
    failed with ENOTDIR, which was raised: a corrupt store of that partition
    could never be deleted, its task retried for ever. (A store directory that
    was itself a link, set aside, leaves such a name.)"""
    from stream_app.pipeline import store as store_module

    sessions = tmp_path / "sessions"
    make_store(sessions / "3", resources)
    (sessions / "3.deleting").write_text("not a directory")
    assert store_module.set_aside(sessions / "3") == sessions / "3.deleting.1"
    make_store(sessions / "4", resources)
    (sessions / "4.deleting").symlink_to(tmp_path / "elsewhere")  # dangling
    assert store_module.set_aside(sessions / "4") == sessions / "4.deleting.1"
    for partition in ("3", "4"):
        for leftover in store_module.aside_of(sessions / partition):
            store_module.remove_aside(leftover)
    assert sorted(p.name for p in sessions.iterdir()) == []
