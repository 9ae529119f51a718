"""Purging what the worker has processed from its re-key and by-profile topics.

Those topics keep their records for ever (``retention.ms=-1``, see
``topics.py``), so that no retention shorter than an outage deletes a record
before a worker has processed it. What has been processed is deleted instead,
as Kafka Streams purges its repartition topics: every ``purge_interval_s``,
each partition is truncated (DeleteRecords) below the offset its task last
committed. A committed offset is never taken back, whichever worker owns the
partition later, so deleting below it loses nothing.

A purge that fails is not a fault of the processing: it is logged and tried
again at the next interval. A refusal (no ``Delete`` ACL on the topics), or
:data:`FAILURES_WARNED` failures in a row, is one warning, as the topics then
grow until an operator acts; the purge that succeeds again says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.structs import TopicPartition

from stream_app.pipeline.kafka import client_options, not_authorized
from stream_app.settings import Settings

log = logging.getLogger(__name__)


class Admin(Protocol):
    """What the purger needs of ``AIOKafkaAdminClient``."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def delete_records(
        self, records_to_delete: dict[TopicPartition, RecordsToDelete]
    ) -> dict[TopicPartition, int]: ...


#: Purges failed in a row after which the failure is a warning: 5 minutes at
#: the default interval. (A refusal is a warning at once.)
FAILURES_WARNED: Final = 10


class Purger:
    """Deletes records below committed offsets; one purge at a time."""

    def __init__(self, make_admin: Callable[[], Admin]) -> None:
        self._make_admin = make_admin
        self._admin: Admin | None = None
        #: The offset each partition was last truncated below.
        self.purged: dict[TopicPartition, int] = {}
        #: Purges failed since the last that did not.
        self.failures = 0
        #: Purges that deleted, and that failed, since the start (for /metrics).
        self.succeeded = 0
        self.failed = 0
        self._warned = False

    async def purge(self, committed: Mapping[TopicPartition, int]) -> None:
        """Delete the records below ``committed`` of each partition, where that
        is more than the last purge deleted. Never raises but a cancellation."""
        wanted = {
            tp: RecordsToDelete(before_offset=offset)
            for tp, offset in committed.items()
            if offset > self.purged.get(tp, 0)
        }
        if not wanted:
            return
        try:
            admin = await self._started()
            await admin.delete_records(wanted)
        except Exception as exc:  # a best effort: never a reason to stop processing
            self._failed(wanted, exc)
            return
        if self._warned:
            log.warning("purging the internal topics again")
        self.succeeded += 1
        self.failures = 0
        self._warned = False
        for tp, records in wanted.items():
            self.purged[tp] = records.before_offset
        log.debug("purged %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in wanted))

    async def _started(self) -> Admin:
        if self._admin is None:
            admin = self._make_admin()
            try:
                await admin.start()
            except BaseException:  # a failed or cancelled start leaves no connection open
                await _close(admin)
                raise
            self._admin = admin
        return self._admin

    def _failed(self, wanted: Mapping[TopicPartition, RecordsToDelete], exc: Exception) -> None:
        self.failed += 1
        self.failures += 1
        refused = not_authorized(exc) is not None
        if self._warned:
            log.debug("purging processed records failed again: %r", exc)
            return
        if not refused and self.failures < FAILURES_WARNED:
            # Leadership moved, the broker is busy: the next interval tries again.
            log.info("purging processed records failed, to be retried: %r", exc)
            return
        self._warned = True
        topics = ", ".join(sorted({tp.topic for tp in wanted}))
        if refused:
            log.warning(
                "Kafka does not let this worker delete the records it has processed from "
                "%s (%s): they are kept for ever and the topics grow until the worker's "
                "principal is granted Delete on them",
                topics,
                type(exc).__name__,
            )
        else:
            log.warning(
                "deleting the records this worker has processed from %s has failed %d "
                "times in a row, last with %r: the topics grow until it succeeds",
                topics,
                self.failures,
                exc,
            )

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            await _close(admin)


async def _close(admin: Admin) -> None:
    try:
        await admin.close()
    except Exception as exc:  # closing: it is gone either way
        log.debug("purge admin client close failed: %r", exc)


def purger(settings: Settings) -> Purger:
    """The worker's purger, with an admin client of its own."""
    return Purger(lambda: AIOKafkaAdminClient(**client_options(settings)))
