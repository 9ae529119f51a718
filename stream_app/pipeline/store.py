"""Local state: one RocksDB database per store and partition, and the write overlay.

Layout: ``<data_dir>/<app id>/<store>/<partition>/`` is a RocksDB database
(rocksdict, raw bytes). Besides the data it holds one reserved key,
:data:`CHANGELOG_OFFSET_KEY`: the changelog offset from which a restore
continues. Data and that offset are only ever written together, in one
``WriteBatch`` (:meth:`PartitionStore.write`), so the database is always the
state of the changelog up to the offset it records.

Processors never write RocksDB directly: they read and write through a
:class:`StoreOverlay`, whose changes the checkpoint writes to RocksDB after
the Kafka transaction holding the matching changelog records has committed.

Writes skip RocksDB's write-ahead log, as Kafka Streams' stores do: the
changelog is the log. A crash loses the writes not yet flushed to SST files,
and since each batch carries its offset and RocksDB flushes whole batches in
order, what survives is the state of the changelog up to the offset it
records; the restore reads the rest again. A clean close flushes everything,
and :meth:`RocksDBResources.flush_idle` flushes the databases that fell quiet.
Without the log a write costs about half (1.6 -> 0.7 us per 900-byte record
in batches of 2,000).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path
from typing import Final

from rocksdict import (
    BlockBasedOptions,
    Cache,
    Options,
    Rdict,
    WriteBatch,
    WriteBufferManager,
    WriteOptions,
)

from stream_app.errors import StoreError
from stream_app.settings import RocksDBSettings

log = logging.getLogger(__name__)

#: Data keys never start with NUL (they start with an applicationId or a
#: partition tag), so this key cannot collide with one.
CHANGELOG_OFFSET_KEY: Final = b"\x00changelog-offset"
#: Under at_least_once, the input offsets a task had consumed when its last
#: store's changelog was written: in the changelog, so that a restore knows
#: which records its state holds already (see ``Checkpoint.seal``). Reserved
#: as the key above.
CONSUMED_KEY: Final = b"\x00consumed"
_RESERVED: Final = b"\x00"

_MB: Final = 1024 * 1024

#: RocksDB's info logs kept per database, and the size at which one is rolled.
_LOG_FILES_KEPT: Final = 3
_LOG_FILE_BYTES: Final = 4 * _MB
#: What RocksDB answers a write it would hold (``no_slowdown``): Incomplete.
_WRITE_STALL: Final = "Write stall"
#: A write RocksDB may pace: its delay is bounded, the write made after it.
_PACED: Final = WriteOptions()
_PACED.disable_wal = True  # type: ignore[method-assign,assignment]
#: Seconds a write waits out a stop before it fails, and between its tries
#: (doubling from the first to the most). The wait holds up the event loop
#: (the group's heartbeats every 3 s, /livez, the round's other commits): a
#: stop that lasts is left to the task's restart, which waits beside it.
_STALL_LIMIT_S: Final = 5.0
_STALL_PAUSE_S: Final = 0.001
_STALL_PAUSE_MAX_S: Final = 0.05

#: The directories of the databases open in this process (see cleanup.py).
_OPEN: Final[set[Path]] = set()


def open_store_paths() -> frozenset[Path]:
    """The (resolved) directories of the stores open in this process."""
    return frozenset(_OPEN)


class RocksDBResources:
    """Memory shared by every database of one worker, bounded by settings.

    One block cache and one write-buffer budget for all stores and partitions,
    so a worker's RocksDB memory is ``block_cache_mb + write_buffer_mb x
    max_write_buffers`` however many partitions it owns, provided
    :meth:`flush_idle` is called every few seconds.
    """

    def __init__(self, settings: RocksDBSettings) -> None:
        self.settings = settings
        self.cache = Cache(settings.block_cache_mb * _MB)
        self.write_buffers = WriteBufferManager(
            settings.write_buffer_mb * settings.max_write_buffers * _MB, False
        )
        #: The databases open on these resources (weak: one dropped without a
        #: close, by a task whose close was cancelled, is let go of by RocksDB).
        self.stores: weakref.WeakSet[PartitionStore] = weakref.WeakSet()

    def flush_idle(self) -> int:
        """Flush, in RocksDB's background threads, the memtables of the open
        databases not written since the last call; returns how many.

        RocksDB's write-buffer manager makes a database flush only while that
        database is written: one that falls quiet (restored, or a partition
        with little traffic) kept its memtables, up to ``write_buffer_mb``
        each, so the budget held only while every database was busy (twelve
        databases written in turn held 116 MiB of memtables against a budget
        of 32). A quiet database's flush also bounds what a crash loses of it,
        as the stores skip the write-ahead log: its restore reads less again.
        """
        return sum(store.flush_if_idle() for store in list(self.stores))

    def options(self) -> Options:
        s = self.settings
        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.set_write_buffer_size(s.write_buffer_mb * _MB)
        options.set_max_write_buffer_number(s.max_write_buffers)
        options.set_max_open_files(s.max_open_files)
        options.set_write_buffer_manager(self.write_buffers)
        # RocksDB's own log: each open keeps the last as LOG.old.*, up to a
        # thousand, and every rebalance reopens every store.
        options.set_keep_log_file_num(_LOG_FILES_KEPT)
        options.set_max_log_file_size(_LOG_FILE_BYTES)
        table = BlockBasedOptions()
        table.set_block_cache(self.cache)
        options.set_block_based_table_factory(table)
        return options


class _CorruptedStoreError(StoreError):
    """RocksDB found the database's files inconsistent (say, some deleted)."""


#: How RocksDB says that CURRENT names a manifest that is not there (deleted,
#: or CURRENT damaged): an IO error, not a Corruption, but as lasting.
_MISSING_MANIFEST: Final = re.compile(r"^IO error: No such file or directory: .*/MANIFEST-\d+")


def _rocksdb_error(problem: str, exc: Exception) -> StoreError:
    """``problem`` as the StoreError to raise for RocksDB's ``exc``: one that
    marks the database corrupt for RocksDB's Corruption status (files deleted,
    a block's checksum), whose message rocksdict begins with it, and for a
    manifest that is missing."""
    message = str(exc)
    if message.startswith("Corruption") or _MISSING_MANIFEST.match(message):
        return _CorruptedStoreError(problem)
    return StoreError(problem)


#: What a store directory is renamed to before it is deleted: ``<partition>.deleting``,
#: or ``<partition>.deleting.<n>`` while an earlier one could not be deleted.
ASIDE: Final = ".deleting"
_ASIDE_NAME: Final = re.compile(r"([0-9]+)\.deleting(?:\.[0-9]+)?", re.ASCII)
#: Aside directories whose delete failed, said once each.
_UNDELETABLE: set[Path] = set()


def set_aside(path: Path) -> Path | None:
    """Rename the store directory ``path`` aside, for :func:`remove_aside`;
    None when it is gone. Beside an aside directory that could not be
    deleted (a file it may not remove, a failing disk), under a new name:
    the rename onto it failed, and the store's task could never start again."""
    for n in range(1000):
        aside = path.with_name(f"{path.name}{ASIDE}" + (f".{n}" if n else ""))
        try:
            path.rename(aside)
        except FileNotFoundError:
            return None
        except OSError as exc:
            # The name taken by a directory that could not be deleted, or by
            # a file or a link (a store directory that was a link, set aside).
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            continue
        return aside
    raise OSError(errno.EEXIST, f"cannot set {path} aside: 1,000 aside names are taken")


def aside_partition(name: str) -> int | None:
    """The partition of an aside directory's ``name``; None when it is not one."""
    matched = _ASIDE_NAME.fullmatch(name)
    return None if matched is None else int(matched.group(1))


def aside_of(path: Path) -> list[Path]:
    """The aside directories of the store directory ``path``."""
    try:
        siblings = list(path.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(
        s
        for s in siblings
        if s.name.startswith(f"{path.name}{ASIDE}") and aside_partition(s.name) is not None
    )


def remove_aside(aside: Path) -> None:
    """Delete an aside directory, saying once, at WARNING, if it cannot be."""
    if aside.is_symlink() or (aside.exists() and not aside.is_dir()):
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()  # rmtree refuses both; a link's target is not ours
    else:
        shutil.rmtree(aside, ignore_errors=True)
    if not aside.exists() and not aside.is_symlink():
        _UNDELETABLE.discard(aside)  # said again if it sticks again
    elif aside not in _UNDELETABLE:
        _UNDELETABLE.add(aside)
        log.warning(
            "cannot delete %s, a store set aside: its files' permissions, or a "
            "read-only or failing disk? Left on disk, and tried again at each cleanup",
            aside,
        )


def _batch(changes: Mapping[bytes, bytes | None], changelog_offset: int) -> WriteBatch:
    """``changes`` (None deletes) and the changelog offset, as one batch."""
    batch = WriteBatch(raw_mode=True)
    for key, value in changes.items():
        if value is None:
            batch.delete(key)
        else:
            batch.put(key, value)
    batch.put(CHANGELOG_OFFSET_KEY, b"%d" % changelog_offset)
    return batch


def _remove_beside(aside: Path) -> None:
    """:func:`remove_aside` in a thread of its own, as the cleaner deletes: a
    store of gigabytes took seconds to delete on the event loop, its group's
    heartbeats and /livez held up. Cut short by the process's end, what is
    left is removed by the next open of that store or the next cleanup."""
    threading.Thread(target=remove_aside, args=(aside,), name="store-delete", daemon=True).start()


class PartitionStore:
    """One store's RocksDB database for one partition."""

    def __init__(self, path: Path, resources: RocksDBResources) -> None:
        self.path = path
        self._resources = resources
        # What a delete cut short (a kill during wipe) left aside.
        for leftover in aside_of(path):
            _remove_beside(leftover)
        path.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except _CorruptedStoreError as exc:
            # The changelog is the state; these files are a copy of it, and
            # retrying the open would fail for good, its partition never read.
            log.warning("%s: deleting it: the task restores it from its changelog", exc)
            self._delete()
            self._db = self._open()
        self._closed = self._corrupted = False
        #: Written since the last :meth:`flush_if_idle`.
        self._written = False
        _OPEN.add(self.path.resolve())
        resources.stores.add(self)

    def _delete(self) -> None:
        """Delete the database's directory and make it anew, empty. Renamed
        aside first: a delete cut short leaves no half a database behind.
        A disk that refuses (remounted read-only after the errors that
        corrupted the store) raises a StoreError: an OSError escaped a
        task's close, whose other stores stayed open, and the rebalance
        listener."""
        try:
            aside = set_aside(self.path)
            if aside is not None:
                _remove_beside(aside)
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete the store at {self.path}: {exc}") from exc

    def _open(self) -> Rdict:
        options = self._resources.options()
        try:
            # Given for its column family too: an existing database's were read
            # from its OPTIONS file, with a block cache of its own (8 MiB each,
            # outside the shared budget) and the memtable sizes it was made with.
            db = Rdict(str(self.path), options, column_families={"default": options})
        except Exception as exc:  # rocksdict raises Exception itself for RocksDB's errors
            hint = ""
            if "LOCK" in str(exc):  # RocksDB's lock on the directory (its LOCK file)
                hint = (
                    " (another process has it open: a worker with the same data dir and "
                    "app id that owns this partition, or has not yet let go of it)"
                )
            raise _rocksdb_error(f"cannot open the store at {self.path}: {exc}{hint}", exc) from exc
        unlogged = WriteOptions()
        # The changelog is the log (module docstring). A property at run time;
        # rocksdict's stub declares it as a method.
        unlogged.disable_wal = True  # type: ignore[method-assign,assignment]
        # A write RocksDB would hold (its memtables full until a flush ends)
        # fails at once instead: held, it held the GIL, and a flush that never
        # ended (a full disk) froze the whole process, its stop's watchdog too.
        unlogged.no_slowdown = True
        db.set_write_options(unlogged)
        return db

    def get(self, key: bytes) -> bytes | None:
        try:
            value: bytes | None = self._db.get(key)
        except Exception as exc:  # rocksdict raises Exception itself for RocksDB's errors
            error = _rocksdb_error(f"cannot read the store at {self.path}: {exc}", exc)
            # An open checks no data block: a corrupt one is deleted at close, so
            # that the task's next start restores it rather than meets this again.
            if isinstance(error, _CorruptedStoreError):
                self._corrupted = True
            raise error from exc
        return value

    @property
    def corrupted(self) -> bool:
        """A read met RocksDB's ``Corruption``: deleted at close, then restored."""
        return self._corrupted

    def keys(self) -> Iterator[bytes]:
        for key in self._db.keys():  # noqa: SIM118 - Rdict iterates items, keys() iterates keys
            if isinstance(key, bytes) and not key.startswith(_RESERVED):
                yield key

    def sizes(self) -> tuple[int, int]:
        """(estimated keys, bytes in SST files and memtables)."""
        keys = self._db.property_int_value("rocksdb.estimate-num-keys") or 0
        files = self._db.property_int_value("rocksdb.total-sst-files-size") or 0
        memory = self._db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0
        return int(keys), int(files) + int(memory)

    @property
    def changelog_offset(self) -> int | None:
        """The changelog offset to restore from; None for a store never written.
        Read as :meth:`get` reads (a damaged block marks the store corrupt)."""
        raw = self.get(CHANGELOG_OFFSET_KEY)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            self._corrupted = True
            raise _CorruptedStoreError(
                f"the store at {self.path} records changelog offset {raw[:40]!r}"
            ) from None

    def write(self, changes: Mapping[bytes, bytes | None], changelog_offset: int) -> None:
        """Apply ``changes`` (None deletes) and record ``changelog_offset``, atomically."""
        self._written = True
        try:
            self._write(changes, changelog_offset)
        except Exception as exc:  # rocksdict raises Exception itself for RocksDB's errors
            if isinstance(exc, StoreError):
                raise
            error = _rocksdb_error(f"cannot write the store at {self.path}: {exc}", exc)
            # A damaged block that RocksDB's own compaction met (in keys no read
            # asks for) fails every write from then on: deleted at close, as
            # for a read, so that the task's next start restores it.
            if isinstance(error, _CorruptedStoreError):
                self._corrupted = True
            raise error from exc

    def _write(self, changes: Mapping[bytes, bytes | None], changelog_offset: int) -> None:
        """Write the batch. A write RocksDB would hold is refused at once
        (``no_slowdown``). One it paces (its compactions behind) is written
        again, waiting the delay RocksDB sets, as without the option. One it
        has stopped (its memtables full until a flush ends) is tried again
        with the GIL let go, for at most :data:`_STALL_LIMIT_S`, then is a
        StoreError (at once on a full disk, where the flush never ends). (A batch is
        consumed by a write, even one that fails: made again for each try.)"""
        stalled_since: float | None = None
        pause = _STALL_PAUSE_S
        while True:
            try:
                self._db.write(_batch(changes, changelog_offset))
            except Exception as exc:  # rocksdict raises Exception itself for RocksDB's errors
                if _WRITE_STALL not in str(exc):
                    raise
            else:
                return
            if not self._db.property_int_value("rocksdb.is-write-stopped"):
                self._db.write(_batch(changes, changelog_offset), _PACED)
                return
            now = time.monotonic()
            stalled_since = now if stalled_since is None else stalled_since
            free = shutil.disk_usage(self.path).free
            if free < self._resources.settings.write_buffer_mb * _MB:
                raise StoreError(
                    f"cannot write the store at {self.path}: its disk is full ({free} bytes "
                    "free), and RocksDB holds its writes until a flush can be written"
                )
            if now - stalled_since >= _STALL_LIMIT_S:
                raise StoreError(
                    f"cannot write the store at {self.path}: RocksDB has held its writes "
                    f"for {_STALL_LIMIT_S:.0f} s, its flushes not ending (the LOG file in "
                    "that directory says why)"
                )
            time.sleep(pause)
            # A flush catching up ends within milliseconds: tried again soon,
            # then less often (each try makes the batch again).
            pause = min(2 * pause, _STALL_PAUSE_MAX_S)

    def flush_if_idle(self) -> bool:
        """Begin a flush of the memtable if it holds writes and none came since
        the last call (see :meth:`RocksDBResources.flush_idle`); whether it did.
        A flush that fails is logged: the next write says why, and its task
        restarts."""
        written, self._written = self._written, False
        if written or self._closed:
            return False
        db = self._db
        try:
            # One flush in flight: another would wait for it, holding the event loop.
            if db.property_int_value("rocksdb.num-immutable-mem-table") or not (
                db.property_int_value("rocksdb.num-entries-active-mem-table")
            ):
                return False
            db.flush(wait=False)
        except Exception as exc:  # rocksdict raises Exception itself for RocksDB's errors
            log.warning("cannot flush the store at %s: %s", self.path, exc)
            return False
        return True

    def close(self) -> None:
        """Flush and close. A flush that fails (no space left on device) loses
        nothing: the database keeps the changelog offset of what it holds."""
        if self._closed:
            return
        # Closed even when this fails: RocksDB lets go of the database anyway.
        self._closed = True
        self._resources.stores.discard(self)
        try:
            self._db.close()
        except Exception as exc:  # rocksdict raises Exception itself for RocksDB's errors
            error = _rocksdb_error(f"cannot close the store at {self.path}: {exc}", exc)
            if isinstance(error, _CorruptedStoreError):
                self._corrupted = True
            if not self._corrupted:
                raise error from exc
        finally:
            _OPEN.discard(self.path.resolve())
            # Its last use: the cleanup's delay counts from here.
            with contextlib.suppress(OSError):
                os.utime(self.path)
        if self._corrupted:
            self._delete()
            log.warning("%s: corrupt, deleted: the next start restores it", self.path)

    def wipe(self) -> None:
        """Close and delete this one partition's database (it is restored again)."""
        # A flush that fails (no space left) still closes the database; what
        # it could not write is about to be deleted anyway.
        with contextlib.suppress(StoreError):
            self.close()
        self._delete()
        self._db = self._open()
        self._closed = self._corrupted = False
        _OPEN.add(self.path.resolve())
        self._resources.stores.add(self)


class StoreOverlay(MutableMapping[bytes, bytes]):
    """Uncommitted writes over a store: what the processors see and change.

    Two layers over RocksDB: ``changes``, the writes of the open transaction,
    and ``committing``, those of the transaction being committed (set aside by
    :meth:`freeze`, dropped by :meth:`release` once RocksDB holds them). Reads
    see ``changes``, then ``committing``, then RocksDB. Each layer maps a key
    written to its newest value (None: deleted): one changelog record per
    changed key and transaction, whatever the number of writes.
    """

    def __init__(self, store: PartitionStore) -> None:
        self.store = store
        self.changes: dict[bytes, bytes | None] = {}
        self.committing: dict[bytes, bytes | None] = {}
        #: Values the current record replaced (see :meth:`begin_record`).
        self._undo: dict[bytes, bytes | _Absent | None] = {}
        #: Bytes of the values in ``changes`` (each key's newest): what the open
        #: transaction holds of this store. (A key deleted still counts its
        #: last value: an upper bound, never below what ``changes`` holds.)
        self.written = 0

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        changes = self.changes
        if key in changes:
            value = changes[key]
        elif key in self.committing:
            value = self.committing[key]
        else:
            value = self.store.get(key)
        return default if value is None else value

    def __getitem__(self, key: bytes) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and self.get(key) is not None

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self._remember(key)
        changes = self.changes
        # A session updated 5,000 times is one changelog record: counted per
        # write, a transaction of such updates was cut every few dozen records.
        replaced = changes.get(key)
        changes[key] = value
        self.written += len(value) - (0 if replaced is None else len(replaced))

    def __delitem__(self, key: bytes) -> None:
        if key not in self:
            raise KeyError(key)
        self._remember(key)
        self.changes[key] = None

    def _remember(self, key: bytes) -> None:
        if key not in self._undo:
            self._undo[key] = self.changes.get(key, _ABSENT)

    def begin_record(self) -> None:
        """From here, :meth:`undo_record` can take back what one record wrote."""
        self._undo.clear()

    def undo_record(self) -> None:
        """Take back the writes since :meth:`begin_record` (a record that failed)."""
        changes = self.changes
        for key, previous in self._undo.items():
            taken_back = changes.get(key)
            if isinstance(previous, _Absent):
                changes.pop(key, None)
                restored = None
            else:
                changes[key] = restored = previous
            # As __setitem__ counts: the value back in place of the one undone.
            self.written += (0 if restored is None else len(restored)) - (
                0 if taken_back is None else len(taken_back)
            )
        self._undo.clear()

    def freeze(self) -> dict[bytes, bytes | None]:
        """Set the open transaction's changes aside as ``committing`` (and return
        them); later writes start a new layer. One transaction commits at a time."""
        if self.committing:
            raise RuntimeError("the previous transaction's changes are still committing")
        frozen, self.changes = self.changes, {}
        self.committing = frozen
        self._undo.clear()
        self.written = 0
        return frozen

    def release(self) -> None:
        """RocksDB now holds the ``committing`` changes: stop keeping them here."""
        self.committing = {}

    def __iter__(self) -> Iterator[bytes]:
        pending = {**self.committing, **self.changes}
        for key in self.store.keys():  # noqa: SIM118 - a store, not a dict
            if key not in pending:
                yield key
        for key, value in pending.items():
            if value is not None and not key.startswith(_RESERVED):
                yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def discard(self) -> None:
        """Forget every uncommitted write (the transaction, and any on top of it, failed)."""
        self.changes.clear()
        self.committing = {}
        self._undo.clear()
        self.written = 0


class _Absent:
    """The overlay had no entry for a key (distinct from an entry deleting it)."""


_ABSENT: Final = _Absent()
