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

import contextlib
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path

from stream_app.pipeline.store import open_store_paths

log = logging.getLogger(__name__)


def unused_stores(
    state_dir: Path,
    store_names: Collection[str],
    in_use: Collection[tuple[str, int]],
    delay_s: float,
    now: float,
) -> Iterator[Path]:
    """The store directories under ``state_dir`` that are neither open nor in
    ``in_use`` (store name, partition) and were last used more than ``delay_s``
    before ``now`` (a Unix time)."""
    opened = open_store_paths()
    for name in store_names:
        try:
            children = sorted((state_dir / name).iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for child in children:
            if not child.name.isdigit() or (name, int(child.name)) in in_use:
                continue
            if child.resolve() in opened:
                continue
            try:
                used = child.stat().st_mtime
            except FileNotFoundError:
                continue
            if now - used > delay_s:
                yield child


def delete_unused_stores(
    state_dir: Path,
    store_names: Collection[str],
    in_use: Collection[tuple[str, int]],
    delay_s: float,
    now: float,
) -> list[Path]:
    """Delete what :func:`unused_stores` finds, unless another process holds
    a store's RocksDB lock. Returns the directories deleted; a directory that
    cannot be deleted is logged and left for the next time."""
    deleted = []
    for path in unused_stores(state_dir, store_names, in_use, delay_s, now):
        try:
            if _delete_unless_locked(path):
                deleted.append(path)
        except OSError as exc:
            log.warning("cannot delete the unused store %s: %s", path, exc)
    if deleted:
        log.info(
            "deleted %d local store(s) of partitions this worker has not owned for %.0f s: %s",
            len(deleted),
            delay_s,
            ", ".join(str(p.relative_to(state_dir)) for p in deleted),
        )
    return deleted


def _delete_unless_locked(path: Path) -> bool:
    """Delete ``path`` holding its RocksDB lock (the LOCK file's POSIX lock,
    the one RocksDB takes), or leave it when another process holds that lock.

    Never called for a store open in this process: POSIX locks belong to the
    process, so this one's would succeed and its close would drop RocksDB's.
    """
    aside = path.with_name(f"{path.name}.deleting")
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
                    return False
                raise
        # Renamed first, as PartitionStore deletes: a delete cut short leaves
        # no half a database under the partition's name (the next open of
        # that partition, or the next cleanup, removes what is aside).
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
    finally:
        if fd is not None:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(aside)
    return True
