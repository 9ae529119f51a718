"""Purging what the worker has processed from its re-key and by-profile topics.

Those topics keep their records for ever (``retention.ms=-1``, see
``topics.py``), so that no retention shorter than an outage deletes a record
before a worker has processed it. What has been processed is deleted instead,
as Kafka Streams purges its repartition topics: every ``purge_interval_s``,
each partition is truncated (DeleteRecords) below the offset its task last
committed. A committed offset is never taken back, whichever worker owns the
partition later, so deleting below it loses nothing.

A purge that fails is not a fault of the processing: it is logged and tried
again at the next interval. The first refusal (no ``Delete`` ACL on the
topics) is a warning, as the topics then grow until an operator grants it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from aiokafka.errors import KafkaError
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


class Purger:
    """Deletes records below committed offsets; one purge at a time."""

    def __init__(self, make_admin: Callable[[], Admin]) -> None:
        self._make_admin = make_admin
        self._admin: Admin | None = None
        #: The offset each partition was last truncated below.
        self.purged: dict[TopicPartition, int] = {}
        self._refused = False

    async def purge(self, committed: Mapping[TopicPartition, int]) -> None:
        """Delete the records below ``committed`` of each partition, where that
        is more than the last purge deleted. Never raises a Kafka error."""
        wanted = {
            tp: RecordsToDelete(before_offset=offset)
            for tp, offset in committed.items()
            if offset > self.purged.get(tp, 0)
        }
        if not wanted:
            return
        try:
            if self._admin is None:
                admin = self._make_admin()
                await admin.start()
                self._admin = admin
            await self._admin.delete_records(wanted)
        except (KafkaError, OSError) as exc:
            self._failed(wanted, exc)
            return
        except Exception as exc:  # a best effort: never a reason to stop processing
            log.warning("purging processed records failed, to be retried: %r", exc)
            return
        if self._refused:
            log.info("purging the internal topics again")
            self._refused = False
        for tp, records in wanted.items():
            self.purged[tp] = records.before_offset
        log.debug("purged %s", ", ".join(f"{tp.topic}[{tp.partition}]" for tp in wanted))

    def _failed(self, wanted: Mapping[TopicPartition, RecordsToDelete], exc: BaseException) -> None:
        if not_authorized(exc) is None:
            # Leadership moved, the broker is busy: the next interval tries again.
            log.info("purging processed records failed, to be retried: %r", exc)
            return
        if not self._refused:
            self._refused = True
            topics = ", ".join(sorted({tp.topic for tp in wanted}))
            log.warning(
                "Kafka does not let this worker delete the records it has processed from "
                "%s (%s): they are kept for ever and the topics grow until the worker's "
                "principal is granted Delete on them",
                topics,
                type(exc).__name__,
            )

    async def close(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            try:
                await admin.close()
            except Exception as exc:  # closing: it is gone either way
                log.debug("purge admin client close failed: %r", exc)


def purger(settings: Settings) -> Purger:
    """The worker's purger, with an admin client of its own."""
    return Purger(lambda: AIOKafkaAdminClient(**client_options(settings)))
