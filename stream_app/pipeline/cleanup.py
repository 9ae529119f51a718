"""Local stores of partitions this worker no longer owns, deleted once unused
for a while: Kafka Streams' ``state.cleanup.delay.ms``.

A task's stores stay on disk when the task is dropped (a rebalance moved its
partition, the group shrank or grew), so that a partition coming back soon
restores only what it missed. Without a cleaner they stayed for ever: after a
few scale-outs and scale-ins, every PVC held most of the deployment's state,
and a full disk stops RocksDB's writes.

A store's directory is deleted when all of these hold:

* it is not open in this process (:func:`~stream_app.pipeline.store.open_store_paths`)
  and its partition is not assigned to this worker (``in_use``);
* it was last used more than the delay ago: the directory's modification
  time, which RocksDB's writes move and a close sets
  (:meth:`~stream_app.pipeline.store.PartitionStore.close`);
* no other process holds its RocksDB lock (a second worker given the same
  data directory by mistake).

A partition assigned again after its store was deleted is restored from the
beginning of its changelog: slower, never wrong.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from stream_app.pipeline.store import (
    aside_partition,
    open_store_paths,
    remove_aside,
    set_aside,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreCleaner:
    """The cleanup of one worker's stores: ``store_names`` under ``state_dir``,
    deleted once unused for ``delay_s``."""

    state_dir: Path
    store_names: tuple[str, ...]
    delay_s: float

    def unused(self, in_use: Collection[tuple[str, int]], now: float) -> Iterator[Path]:
        """The store directories that are neither open nor in ``in_use`` (store
        name, partition) and were last used more than the delay before ``now``
        (a Unix time)."""
        opened = open_store_paths()
        for name in self.store_names:
            for child in _children(self.state_dir / name):
                # ASCII digits: "٣" is a digit to str.isdigit(), and int() reads 3.
                if not (child.name.isascii() and child.name.isdigit()):
                    continue
                if (name, int(child.name)) in in_use:
                    continue
                if child.resolve() in opened:
                    continue
                try:
                    used = child.stat().st_mtime
                except FileNotFoundError:
                    continue
                if now - used > self.delay_s:
                    yield child

    def set_aside(self, in_use: Collection[tuple[str, int]], now: float) -> list[Path]:
        """Rename what :meth:`unused` finds aside (``<partition>.deleting``),
        unless another process holds a store's RocksDB lock; and return those
        and the aside directories a delete cut short left behind, for
        :func:`remove` to delete. Renaming is quick, deleting a large store is
        not: the engine renames between two awaits and deletes in a thread. A
        directory that cannot be renamed is logged and left for the next time."""
        aside = [
            child
            for name in self.store_names
            for child in _children(self.state_dir / name)
            if aside_partition(child.name) is not None
        ]
        moved: list[Path] = []
        renamed: list[Path] = []
        for path in self.unused(in_use, now):
            try:
                target = _set_aside_unless_locked(path)
            except OSError as exc:
                log.warning("cannot delete the unused store %s: %s", path, exc)
                continue
            if target is not None:
                moved.append(path)
                renamed.append(target)
        if moved:
            log.info(
                "deleting %d local store(s) of partitions this worker has not owned for %.0f s: %s",
                len(moved),
                self.delay_s,
                ", ".join(str(p.relative_to(self.state_dir)) for p in moved),
            )
        return aside + renamed

    def delete(self, in_use: Collection[tuple[str, int]], now: float) -> list[Path]:
        """:meth:`set_aside`, then :func:`remove`, at once. Returns the store
        directories deleted (by their partitions' names)."""
        aside = self.set_aside(in_use, now)
        remove(aside)
        return sorted({path.with_name(str(aside_partition(path.name))) for path in aside})


def remove(paths: Collection[Path]) -> None:
    """Delete the directories :meth:`StoreCleaner.set_aside` returned."""
    for path in paths:
        remove_aside(path)


def _children(directory: Path) -> list[Path]:
    try:
        return sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _set_aside_unless_locked(path: Path) -> Path | None:
    """Rename ``path`` aside holding its RocksDB lock (the LOCK file's POSIX
    lock, the one RocksDB takes), or leave it when another process holds that
    lock (None). The aside directory's path.

    Never called for a store open in this process: POSIX locks belong to the
    process, so this one's would succeed and its close would drop RocksDB's.
    """
    try:
        fd = os.open(path / "LOCK", os.O_RDWR)
    except FileNotFoundError:  # never opened as a database, or half deleted
        fd = None
    try:
        if fd is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    log.info("%s is open in another process: left in place", path)
                    return None
                raise
        # Renamed, as PartitionStore deletes: a delete cut short leaves no
        # half a database under the partition's name (the next open of that
        # partition, or the next cleanup, removes what is aside).
        return set_aside(path)
    finally:
        if fd is not None:
            os.close(fd)
