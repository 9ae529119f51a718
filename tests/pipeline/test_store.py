"""PartitionStore (real RocksDB) and the StoreOverlay the processors write through."""

from __future__ import annotations

import errno
import gc
import math
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stream_app.errors import StoreError
from stream_app.pipeline import store as store_module
from stream_app.pipeline.store import (
    CHANGELOG_OFFSET_KEY,
    PartitionStore,
    RocksDBResources,
    StoreOverlay,
)
from stream_app.settings import RocksDBSettings
from tests.pipeline.fakes import held_by_another_process, store_deletes_done


@pytest.fixture
def resources() -> RocksDBResources:
    return RocksDBResources(RocksDBSettings())


@pytest.fixture
def store(tmp_path: Path, resources: RocksDBResources) -> Iterator[PartitionStore]:
    store = PartitionStore(tmp_path / "sessions" / "0", resources)
    yield store
    store.close()


def contents(store: PartitionStore) -> dict[bytes, bytes | None]:
    return {key: store.get(key) for key in store.keys()}  # noqa: SIM118 - a store, not a dict


def assert_opens_empty(path: Path, resources: RocksDBResources) -> None:
    """The store at ``path`` opens with no data and no changelog offset: its
    task restores it from its changelog's start."""
    again = PartitionStore(path, resources)
    try:
        assert contents(again) == {}
        assert again.changelog_offset is None
    finally:
        again.close()


# -- PartitionStore ----------------------------------------------------------------------------
def test_a_new_store_is_empty_and_has_no_changelog_offset(store: PartitionStore) -> None:
    assert contents(store) == {}
    assert store.changelog_offset is None


def test_write_applies_puts_and_deletes_with_the_offset_and_survives_reopening(
    tmp_path: Path, resources: RocksDBResources
) -> None:
    store = PartitionStore(tmp_path / "sessions" / "0", resources)
    store.write({b"a": b"1", b"b": b"2"}, 2)
    store.write({b"a": None, b"c": b"3", b"never-written": None}, 7)
    store.close()

    again = PartitionStore(tmp_path / "sessions" / "0", resources)
    assert contents(again) == {b"b": b"2", b"c": b"3"}
    assert again.changelog_offset == 7
    assert again.get(CHANGELOG_OFFSET_KEY) == b"7"  # stored, but never listed as data
    assert CHANGELOG_OFFSET_KEY not in set(again.keys())
    again.close()


_KILLED_WRITER = """
import os, sys
from pathlib import Path
from stream_app.pipeline.store import PartitionStore, RocksDBResources
from stream_app.settings import RocksDBSettings
store = PartitionStore(Path(sys.argv[1]), RocksDBResources(RocksDBSettings()))
for batch in range(int(sys.argv[2])):
    first = batch * 100
    store.write({b"k%07d" % n: b"v" * 900 for n in range(first, first + 100)}, first + 100)
os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("batches", [20, 600])
def test_a_killed_writer_leaves_the_data_of_exactly_the_offset_it_recorded(
    tmp_path: Path, resources: RocksDBResources, batches: int
) -> None:
    # Writes skip RocksDB's write-ahead log: a kill -9 loses what was not yet
    # flushed (600 batches of 90 KB overflow the write buffers, so part of it
    # is), but never splits a batch from its changelog offset.
    path = tmp_path / "sessions" / "0"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(path), str(batches)],
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    store = PartitionStore(path, resources)
    try:
        offset = store.changelog_offset or 0
        assert 0 <= offset <= batches * 100
        assert set(store.keys()) == {b"k%07d" % n for n in range(offset)}
    finally:
        store.close()


_FLUSHED_THEN_KILLED_WRITER = """
import os, sys, time
from pathlib import Path
from stream_app.pipeline.store import PartitionStore, RocksDBResources
from stream_app.settings import RocksDBSettings
resources = RocksDBResources(RocksDBSettings())
store = PartitionStore(Path(sys.argv[1]), resources)
for batch in range(20):
    first = batch * 100
    store.write({b"k%07d" % n: b"v" * 900 for n in range(first, first + 100)}, first + 100)
assert resources.flush_idle() == 0  # written since the last call
assert resources.flush_idle() == 1  # quiet since: flushed in the background
deadline = time.monotonic() + 20
pending = "rocksdb.num-immutable-mem-table"
while store._db.property_int_value(pending) and time.monotonic() < deadline:
    time.sleep(0.05)
os.kill(os.getpid(), 9)
"""


def test_a_quiet_store_flushed_keeps_its_writes_through_a_kill(tmp_path: Path) -> None:
    """Without the write-ahead log, a store that fell quiet lost to a kill -9
    every write since its last flush, which only a full memtable or a close
    made: its restore read it all again."""
    path = tmp_path / "sessions" / "0"
    killed = subprocess.run(
        [sys.executable, "-c", _FLUSHED_THEN_KILLED_WRITER, str(path)],
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    store = PartitionStore(path, RocksDBResources(RocksDBSettings()))
    try:
        assert store.changelog_offset == 2000
        assert len(list(store.keys())) == 2000
    finally:
        store.close()


def _memtables(stores: list[PartitionStore]) -> int:
    return sum(
        store._db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0 for store in stores
    )


def test_quiet_stores_are_flushed_so_the_write_buffer_budget_holds_for_any_number(
    tmp_path: Path,
) -> None:
    """RocksDB's write-buffer manager makes only the database being written
    flush: twelve written in turn, each then quiet, kept about a memtable each,
    six times this budget of 2 MiB."""
    resources = RocksDBResources(RocksDBSettings(write_buffer_mb=1, max_write_buffers=2))
    budget = 2 * 1024 * 1024
    stores = [PartitionStore(tmp_path / "sessions" / str(p), resources) for p in range(12)]
    try:
        offset = 0
        for store in stores:
            for _ in range(100):  # about 0.9 MB: less than a memtable
                store.write({b"k%08d" % (offset + n): b"v" * 900 for n in range(10)}, offset + 10)
                offset += 10
            resources.flush_idle()  # every store before this one is quiet now
        deadline = time.monotonic() + 20
        while _memtables(stores) > budget and time.monotonic() < deadline:
            time.sleep(0.05)
            # As the engine calls it, again and again: a store with a flush in
            # flight is left to the next call.
            resources.flush_idle()
        assert _memtables(stores) <= budget
        assert [store.changelog_offset for store in stores] == [1000 * (p + 1) for p in range(12)]
    finally:
        for store in stores:
            store.close()


def test_only_open_stores_written_and_then_quiet_are_flushed(
    store: PartitionStore, resources: RocksDBResources
) -> None:
    assert set(resources.stores) == {store}
    assert resources.flush_idle() == 0  # nothing in its memtable
    store.write({b"a": b"1"}, 1)
    assert resources.flush_idle() == 0  # written since the last call
    assert resources.flush_idle() == 1
    assert resources.flush_idle() == 0  # flushed: nothing left to flush
    assert contents(store) == {b"a": b"1"}
    store.wipe()
    assert set(resources.stores) == {store}
    store.close()
    assert set(resources.stores) == set()


def test_a_store_dropped_without_a_close_is_let_go_of(
    tmp_path: Path, resources: RocksDBResources
) -> None:
    """A task whose close is cancelled drops its stores unclosed: held by the
    flushes' registry, their databases stayed open, and the task's next start
    found them locked until the process ended."""
    path = tmp_path / "sessions" / "0"
    dropped = PartitionStore(path, resources)
    dropped.write({b"a": b"1"}, 1)
    del dropped
    gc.collect()
    assert set(resources.stores) == set()
    again = PartitionStore(path, resources)
    again.close()


def test_a_clean_close_keeps_every_write(tmp_path: Path, resources: RocksDBResources) -> None:
    path = tmp_path / "sessions" / "0"
    store = PartitionStore(path, resources)
    for batch in range(50):
        store.write({b"k%07d" % (batch * 10 + n): b"v" * 900 for n in range(10)}, batch * 10 + 10)
    store.close()
    again = PartitionStore(path, resources)
    assert again.changelog_offset == 500
    assert len(contents(again)) == 500
    again.close()


def test_a_store_another_process_has_open_is_a_store_error_that_says_so(
    tmp_path: Path, resources: RocksDBResources
) -> None:
    path = tmp_path / "sessions" / "0"
    PartitionStore(path, resources).close()
    with held_by_another_process(path):
        with pytest.raises(StoreError, match="another process has it open") as raised:
            PartitionStore(path, resources)
        assert str(path) in str(raised.value)
    PartitionStore(path, resources).close()  # once it let go


def test_wipe_forgets_data_and_offset(store: PartitionStore) -> None:
    store.write({b"a": b"1"}, 3)
    store.wipe()
    assert contents(store) == {}
    assert store.changelog_offset is None
    store.write({b"b": b"2"}, 1)
    assert contents(store) == {b"b": b"2"}


def _half_deleted(path: Path) -> None:
    """What ``shutil.rmtree`` cut short by a kill can leave: RocksDB's table
    files gone, its CURRENT, MANIFEST and log still there."""
    for sst in path.glob("*.sst"):
        sst.unlink()


def test_a_store_whose_files_were_half_deleted_is_deleted_and_opens_empty(
    tmp_path: Path, resources: RocksDBResources, caplog: pytest.LogCaptureFixture
) -> None:
    """Before, every open raised a StoreError, which a task start retries: the
    task never started, its partition was never read, the worker never ready.
    The changelog holds the state, so the database is deleted and restored."""
    path = tmp_path / "sessions" / "0"
    first = PartitionStore(path, resources)
    first.write({b"k%d" % n: b"v" * 100 for n in range(5_000)}, 7)
    first.close()  # flushed to a table file
    _half_deleted(path)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.store"):
        assert_opens_empty(path, resources)
    [warning] = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"cannot open the store at {path}: Corruption")
    assert warning.endswith("deleting it: the task restores it from its changelog")


def _manifest_deleted(path: Path) -> None:
    for manifest in path.glob("MANIFEST-*"):
        manifest.unlink()


def _current_names_another_manifest(path: Path) -> None:
    (path / "CURRENT").write_text("MANIFEST-999999\n")


@pytest.mark.parametrize("damage", [_manifest_deleted, _current_names_another_manifest])
def test_a_store_whose_manifest_is_missing_is_deleted_and_opens_empty(
    tmp_path: Path,
    resources: RocksDBResources,
    caplog: pytest.LogCaptureFixture,
    damage: Callable[[Path], None],
) -> None:
    """RocksDB says "IO error: No such file or directory" for it, not
    Corruption: every start of the task retried the open, every 10 s, for good."""
    path = tmp_path / "sessions" / "0"
    first = PartitionStore(path, resources)
    first.write({b"k%d" % n: b"v" * 100 for n in range(5_000)}, 7)
    first.close()
    damage(path)
    with caplog.at_level("WARNING", logger="stream_app.pipeline.store"):
        assert_opens_empty(path, resources)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "No such file or directory" in warning
    assert warning.endswith("deleting it: the task restores it from its changelog")


def test_a_store_another_process_has_open_is_not_deleted(
    tmp_path: Path, resources: RocksDBResources
) -> None:
    """Only RocksDB's Corruption status deletes: a lock held is no reason to."""
    path = tmp_path / "sessions" / "0"
    held = PartitionStore(path, resources)
    held.write({b"a": b"1"}, 3)
    try:
        with pytest.raises(StoreError, match="another process has it open"):
            PartitionStore(path, resources)
        assert held.get(b"a") == b"1"
    finally:
        held.close()


def test_a_wipe_cut_short_leaves_no_half_database(
    tmp_path: Path, resources: RocksDBResources, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database is renamed aside before it is deleted: a kill during the
    delete leaves the partition's directory whole or absent, and what was set
    aside is removed when the store is next opened."""
    path = tmp_path / "sessions" / "0"
    store = PartitionStore(path, resources)
    store.write({b"a": b"1"}, 3)
    with monkeypatch.context() as killed:
        killed.setattr("stream_app.pipeline.store.shutil.rmtree", lambda *_, **__: None)
        store.wipe()
        store_deletes_done()  # in a thread of their own
    store.close()
    aside = path.with_name("0.deleting")
    assert aside.is_dir()
    again = PartitionStore(path, resources)
    try:
        store_deletes_done()
        assert not aside.exists()
        assert contents(again) == {}
        assert again.changelog_offset is None
    finally:
        again.close()


class _FullDisk:
    """Stands for a database on a full disk, as RocksDB behaves there (seen on a
    3 MB tmpfs): a write refuses with a bare Exception; a close fails to flush,
    with a bare Exception, yet closes the database and lets go of its lock."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def write(self, batch: object) -> None:
        raise Exception("IO error: No space left on device")  # as rocksdict does

    def close(self) -> None:
        self.db.close()
        raise Exception("IO error: No space left on device: While appending to file")


def test_a_write_that_rocksdb_refuses_is_a_store_error(
    store: PartitionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task start retries a StoreError, as it retries an open that fails."""
    monkeypatch.setattr(store, "_db", _FullDisk(store._db))
    with pytest.raises(StoreError, match=r"cannot write the store at .*: IO error: No space"):
        store.write({b"a": b"1"}, 1)
    with pytest.raises(StoreError, match=r"cannot close the store at .*: IO error: No space"):
        store.close()
    store.close()  # closed already: nothing to do


class _Stalled:
    """A database whose writes RocksDB would hold: with ``no_slowdown`` it
    answers Incomplete, ``stalls`` times, while it has stopped writes (its
    memtables full until a flush ends; for ever on a full disk) or, with
    ``stopped`` false, while it paces them (its compactions behind)."""

    def __init__(self, db: Any, stalls: float, *, stopped: bool = True) -> None:
        self.db = db
        self.stalls = stalls
        self.stopped = stopped
        self.paced = 0

    def write(self, batch: object, write_opt: object = None) -> None:
        if write_opt is not None:  # waits out RocksDB's delay, then writes
            self.paced += 1
            self.db.write(batch, write_opt)
            return
        if self.stalls > 0:
            self.stalls -= 1
            raise Exception("Result incomplete: Write stall")
        self.db.write(batch)

    def property_int_value(self, name: str) -> int:
        assert name == "rocksdb.is-write-stopped"
        return int(self.stopped)

    def get(self, key: bytes) -> bytes | None:
        value: bytes | None = self.db.get(key)
        return value

    def close(self) -> None:
        self.db.close()


def test_a_stopped_write_is_waited_out_with_the_gil_let_go(
    store: PartitionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RocksDB held a stopped write inside the call, the GIL with it: a flush
    that never ended (a full disk) froze the process, its stop's watchdog too."""
    stalled = _Stalled(store._db, stalls=3)
    monkeypatch.setattr(store, "_db", stalled)
    store.write({b"a": b"1", b"gone": None}, 7)
    assert (store.get(b"a"), store.changelog_offset) == (b"1", 7)  # the whole batch, once
    assert stalled.paced == 0
    # Paced, not stopped: written again, waiting RocksDB's delay in the call,
    # as without no_slowdown (tried again and again, its delay only grew).
    paced = _Stalled(stalled.db, stalls=1, stopped=False)
    monkeypatch.setattr(store, "_db", paced)
    store.write({b"b": b"2"}, 8)
    assert (store.get(b"b"), store.changelog_offset, paced.paced) == (b"2", 8, 1)


def test_a_write_stopped_on_a_full_disk_or_for_long_is_a_store_error(
    store: PartitionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "_db", _Stalled(store._db, stalls=math.inf))
    full = shutil.disk_usage(store.path)._replace(free=4096)
    monkeypatch.setattr(store_module.shutil, "disk_usage", lambda path: full)
    with pytest.raises(StoreError, match=r"its disk is full \(4096 bytes free\)"):
        store.write({b"b": b"2"}, 8)
    monkeypatch.undo()
    monkeypatch.setattr(store, "_db", _Stalled(store._db, stalls=math.inf))
    monkeypatch.setattr(store_module, "_STALL_LIMIT_S", 0.05)
    with pytest.raises(StoreError, match="RocksDB has held its writes for 0 s"):
        store.write({b"b": b"2"}, 8)


def test_a_reopened_store_uses_the_workers_shared_cache_and_buffers(tmp_path: Path) -> None:
    """An existing database's options were read from its files: each reopened
    store (after every rebalance and restart) had a block cache of its own,
    8 MiB outside the shared budget, and the memtable sizes it was made with."""
    path = tmp_path / "sessions" / "0"
    first = PartitionStore(path, RocksDBResources(RocksDBSettings()))
    first.write({b"a": b"1"}, 1)
    first.close()
    settings = RocksDBSettings(block_cache_mb=48, write_buffer_mb=4, max_write_buffers=3)
    for _ in range(5):  # and RocksDB's own logs do not pile up, one per open
        again = PartitionStore(path, RocksDBResources(settings))
        assert again.get(b"a") == b"1"
        assert again._db.property_int_value("rocksdb.block-cache-capacity") == 48 * 1024 * 1024
        again.close()
    options = next(path.glob("OPTIONS-*")).read_text()
    assert "write_buffer_size=4194304" in options
    assert "max_write_buffer_number=3" in options
    assert len(list(path.glob("LOG*"))) <= 3


class _CorruptCompaction:
    """A database whose background compaction met a damaged block, in keys no
    read asks for: RocksDB then refuses every write, and its close, with the
    Corruption it found (seen with a flipped SST block and restore-sized writes)."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def write(self, batch: object) -> None:
        raise Exception("Corruption: block checksum mismatch: stored = 1, computed = 2")

    def close(self) -> None:
        self.db.close()
        raise Exception("Corruption: block checksum mismatch: stored = 1, computed = 2")


def test_a_store_found_corrupt_by_a_write_is_deleted_when_closed(
    tmp_path: Path, resources: RocksDBResources
) -> None:
    """The close raised a StoreError, which stopped the worker (a task's
    store that cannot be closed); at its next start the store opened, the
    restore's first write failed again, and the task retried for good."""
    path = tmp_path / "sessions" / "0"
    store = PartitionStore(path, resources)
    store.write({b"a": b"1"}, 3)
    store._db = _CorruptCompaction(store._db)  # type: ignore[assignment]
    with pytest.raises(StoreError, match=r"cannot write the store at .*: Corruption: block"):
        store.write({b"b": b"2"}, 4)
    store.close()  # no error: deleted
    assert_opens_empty(path, resources)


def test_a_store_whose_close_finds_it_corrupt_is_deleted(
    tmp_path: Path, resources: RocksDBResources
) -> None:
    path = tmp_path / "sessions" / "0"
    store = PartitionStore(path, resources)
    store.write({b"a": b"1"}, 3)
    store._db = _CorruptCompaction(store._db)  # type: ignore[assignment]
    store.close()
    assert_opens_empty(path, resources)


def test_a_corrupt_store_on_a_disk_that_refuses_its_delete_is_a_store_error(
    tmp_path: Path,
    resources: RocksDBResources,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A disk remounted read-only after the errors that corrupted the store:
    its delete raised an OSError, which escaped the task's close (whose
    other stores stayed open) and the rebalance listener; and the log said
    "deleted" first."""
    path = tmp_path / "sessions" / "0"
    store = PartitionStore(path, resources)
    store.write({b"a": b"1"}, 3)
    store._db = _CorruptCompaction(store._db)  # type: ignore[assignment]

    def read_only(self: Path, target: Path) -> Path:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "rename", read_only)
    with pytest.raises(StoreError, match=r"cannot delete the store at .*: .*Read-only file system"):
        store.close()
    assert "deleted" not in caplog.text
    store.close()  # closed once: nothing more to do


class _UnreadableDisk:
    def __init__(self, db: Any) -> None:
        self.db = db

    def get(self, key: bytes) -> bytes | None:
        raise Exception("IO error: Input/output error: While pread")  # as rocksdict does

    def close(self) -> None:  # the store's teardown may come before monkeypatch's undo
        self.db.close()


def test_a_read_that_rocksdb_refuses_is_a_store_error(
    store: PartitionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A StoreError restarts the task (engine); a bare Exception, caught as a
    bug in the processor, rejected a valid command as INTERNAL_ERROR."""
    monkeypatch.setattr(store, "_db", _UnreadableDisk(store._db))
    with pytest.raises(StoreError, match=r"cannot read the store at .*: IO error: Input/output"):
        store.get(b"a")


class _CorruptBlock:
    """A database whose open went well (an open checks no data block) and
    whose read meets a damaged one."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def get(self, key: bytes) -> bytes | None:
        raise Exception("Corruption: block checksum mismatch: stored = 1, computed = 2")

    def close(self) -> None:
        self.db.close()


def test_a_store_found_corrupt_by_a_read_is_deleted_when_closed(
    tmp_path: Path, resources: RocksDBResources
) -> None:
    """The task restarts on the read's StoreError; without the delete, its
    next start would restore onto the same damaged files and meet the same
    error, restarting for good."""
    path = tmp_path / "sessions" / "0"
    store = PartitionStore(path, resources)
    store.write({b"a": b"1"}, 3)
    store._db = _CorruptBlock(store._db)  # type: ignore[assignment]
    with pytest.raises(StoreError, match=r"cannot read the store at .*: Corruption: block"):
        store.get(b"a")
    store.close()
    assert_opens_empty(path, resources)


def test_a_changelog_offset_that_cannot_be_read_marks_the_store_corrupt(
    tmp_path: Path, resources: RocksDBResources
) -> None:
    """The restore reads the offset first. Read past get's handling, a damaged
    block there raised a bare Exception, which a task start does not retry:
    the worker stopped, and stopped again at every start."""
    path = tmp_path / "sessions" / "0"
    store = PartitionStore(path, resources)
    store.write({b"a": b"1"}, 3)
    store._db = _CorruptBlock(store._db)  # type: ignore[assignment]
    with pytest.raises(StoreError, match=r"cannot read the store at .*: Corruption: block"):
        _ = store.changelog_offset
    store.close()
    assert_opens_empty(path, resources)


def test_a_changelog_offset_that_is_not_a_number_marks_the_store_corrupt(
    store: PartitionStore,
) -> None:
    store._db.put(CHANGELOG_OFFSET_KEY, b"\xff\x00")
    with pytest.raises(StoreError, match="records changelog offset"):
        _ = store.changelog_offset


def test_a_wipe_goes_on_when_the_close_before_it_cannot_flush(store: PartitionStore) -> None:
    """What the close could not write is deleted next anyway."""
    store.write({b"a": b"1"}, 3)
    store._db = _FullDisk(store._db)  # type: ignore[assignment]
    store.wipe()
    assert contents(store) == {}
    assert store.changelog_offset is None
    store.write({b"b": b"2"}, 1)
    assert contents(store) == {b"b": b"2"}


# -- StoreOverlay ------------------------------------------------------------------------------
@pytest.fixture
def overlay(store: PartitionStore) -> StoreOverlay:
    store.write({b"stored": b"s1", b"other": b"o1"}, 10)
    return StoreOverlay(store)


def test_reads_see_the_overlay_first_then_rocksdb_and_writes_stay_in_the_overlay(
    store: PartitionStore, overlay: StoreOverlay
) -> None:
    overlay[b"stored"] = b"s2"
    overlay[b"new"] = b"n1"
    del overlay[b"other"]

    assert overlay[b"stored"] == b"s2"
    assert overlay.get(b"new") == b"n1"
    assert overlay.get(b"other") is None
    assert overlay.get(b"other", b"default") == b"default"
    with pytest.raises(KeyError):
        overlay[b"other"]
    assert dict(overlay) == {b"stored": b"s2", b"new": b"n1"}
    assert len(overlay) == 2
    assert overlay.changes == {b"stored": b"s2", b"new": b"n1", b"other": None}
    # RocksDB untouched until the checkpoint writes the overlay
    assert contents(store) == {b"stored": b"s1", b"other": b"o1"}
    assert store.changelog_offset == 10


def test_membership(overlay: StoreOverlay) -> None:
    overlay[b"new"] = b""  # an empty value is a value
    del overlay[b"other"]
    assert b"stored" in overlay
    assert b"new" in overlay
    assert b"other" not in overlay
    assert b"missing" not in overlay
    text_key: object = "stored"
    assert text_key not in overlay  # keys are bytes
    assert CHANGELOG_OFFSET_KEY not in list(overlay)


def test_deleting_a_missing_key_raises_and_changes_nothing(overlay: StoreOverlay) -> None:
    with pytest.raises(KeyError):
        del overlay[b"missing"]
    del overlay[b"other"]
    with pytest.raises(KeyError):
        del overlay[b"other"]
    assert overlay.changes == {b"other": None}


def test_several_writes_to_a_key_leave_one_change_with_the_newest_value(
    overlay: StoreOverlay,
) -> None:
    overlay[b"stored"] = b"s2"
    overlay[b"stored"] = b"s3"
    del overlay[b"stored"]
    overlay[b"new"] = b"n1"
    del overlay[b"new"]
    overlay[b"new"] = b"n2"
    assert overlay.changes == {b"stored": None, b"new": b"n2"}


def test_undo_record_takes_back_exactly_one_records_writes(
    store: PartitionStore, overlay: StoreOverlay
) -> None:
    # An earlier record of the same transaction: kept.
    overlay.begin_record()
    overlay[b"earlier"] = b"e1"
    overlay[b"stored"] = b"s2"
    del overlay[b"other"]

    overlay.begin_record()
    overlay[b"first-time"] = b"f1"  # a key first written in this record
    overlay[b"first-time"] = b"f2"
    overlay[b"earlier"] = b"e2"  # overwrites the earlier record's value
    overlay[b"stored"] = b"s3"
    overlay[b"other"] = b"o2"  # re-creates what the earlier record deleted
    overlay.undo_record()

    assert overlay.changes == {b"earlier": b"e1", b"stored": b"s2", b"other": None}
    assert b"first-time" not in overlay
    assert dict(overlay) == {b"stored": b"s2", b"earlier": b"e1"}
    assert contents(store) == {b"stored": b"s1", b"other": b"o1"}


def test_the_bytes_written_follow_each_keys_newest_value_through_undo(
    overlay: StoreOverlay,
) -> None:
    """The transaction's byte bound reads ``written``. Counted per write, one
    key updated 5,000 times cut transactions every few dozen records; then a
    failed record that shrank a key, taken back, left the count below what
    the overlay held (negative, after a few), and the bound never cut."""
    overlay[b"a"] = b"x" * 300
    overlay[b"a"] = b"x" * 200
    overlay[b"b"] = b"y" * 50
    assert overlay.written == 250
    for _ in range(5):
        overlay.begin_record()
        overlay[b"a"] = b"z"  # a record that fails, after shrinking a
        overlay[b"c"] = b"w" * 10
        overlay.undo_record()
    assert overlay.written == 250
    assert overlay.written >= sum(len(v or b"") for v in overlay.changes.values())
    overlay.freeze()
    assert overlay.written == 0


def test_undo_record_of_a_record_that_only_touched_rocksdb_keys(overlay: StoreOverlay) -> None:
    overlay.begin_record()
    overlay[b"stored"] = b"s2"
    del overlay[b"other"]
    overlay.undo_record()

    assert overlay.changes == {}
    assert dict(overlay) == {b"stored": b"s1", b"other": b"o1"}


def test_undo_record_is_a_no_op_when_the_record_wrote_nothing_or_was_undone(
    overlay: StoreOverlay,
) -> None:
    overlay[b"kept"] = b"k1"
    overlay.begin_record()
    overlay.undo_record()
    overlay.undo_record()
    assert overlay.changes == {b"kept": b"k1"}


def test_begin_record_commits_the_previous_records_writes_to_the_transaction(
    overlay: StoreOverlay,
) -> None:
    overlay.begin_record()
    overlay[b"a"] = b"1"
    overlay.begin_record()
    overlay[b"b"] = b"2"
    overlay.undo_record()
    assert overlay.changes == {b"a": b"1"}


def test_discard_forgets_the_changes_and_what_undo_would_restore(
    overlay: StoreOverlay,
) -> None:
    overlay[b"stored"] = b"s2"
    overlay.begin_record()
    overlay[b"stored"] = b"s3"
    overlay.discard()  # the transaction aborted
    overlay[b"stored"] = b"s4"
    overlay.undo_record()  # back to RocksDB's value, not to the discarded s2
    assert overlay.changes == {}
    assert overlay[b"stored"] == b"s1"


def test_frozen_changes_stay_readable_under_new_ones_until_released(
    store: PartitionStore, overlay: StoreOverlay
) -> None:
    """A sealed transaction commits while the next one is processed on top of it."""
    overlay[b"stored"] = b"s2"
    overlay[b"new"] = b"n1"
    del overlay[b"other"]
    frozen = overlay.freeze()

    assert frozen == {b"stored": b"s2", b"new": b"n1", b"other": None}
    assert overlay.changes == {}
    overlay[b"new"] = b"n2"  # the next transaction
    overlay[b"later"] = b"l1"
    assert overlay[b"stored"] == b"s2"  # the committing layer, not RocksDB's s1
    assert b"other" not in overlay  # its delete too
    assert dict(overlay) == {b"stored": b"s2", b"new": b"n2", b"later": b"l1"}
    assert overlay.changes == {b"new": b"n2", b"later": b"l1"}  # its own changelog records
    assert frozen == {b"stored": b"s2", b"new": b"n1", b"other": None}  # not touched

    store.write(frozen, 11)  # what the checkpoint does once the transaction committed
    overlay.release()
    assert overlay.committing == {}
    assert dict(overlay) == {b"stored": b"s2", b"new": b"n2", b"later": b"l1"}


def test_undo_after_a_freeze_restores_the_committing_value(overlay: StoreOverlay) -> None:
    overlay[b"stored"] = b"s2"
    overlay.freeze()
    overlay.begin_record()
    overlay[b"stored"] = b"s3"
    overlay.undo_record()
    assert overlay.changes == {}
    assert overlay[b"stored"] == b"s2"


def test_one_transaction_commits_at_a_time(overlay: StoreOverlay) -> None:
    overlay[b"a"] = b"1"
    overlay.freeze()
    overlay[b"b"] = b"2"
    with pytest.raises(RuntimeError, match="still committing"):
        overlay.freeze()
    overlay.release()
    assert overlay.freeze() == {b"b": b"2"}


def test_discard_forgets_the_committing_layer_too(overlay: StoreOverlay) -> None:
    """A failed commit drops the transaction processed on top of it as well."""
    overlay[b"stored"] = b"s2"
    overlay.freeze()
    overlay[b"new"] = b"n1"
    overlay.discard()
    assert overlay.changes == {} == overlay.committing
    assert dict(overlay) == {b"stored": b"s1", b"other": b"o1"}
