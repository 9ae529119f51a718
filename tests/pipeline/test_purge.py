"""What the purger deletes from the internal topics, and what it does when
Kafka refuses or fails (no broker: a stand-in admin client)."""

from __future__ import annotations

import logging

import pytest
from aiokafka.admin import RecordsToDelete
from aiokafka.errors import NotLeaderForPartitionError, TopicAuthorizationFailedError
from aiokafka.structs import TopicPartition

from stream_app.pipeline.purge import Purger

REKEYED = TopicPartition("app-sessions.rekeyed", 0)
BY_PROFILE = TopicPartition("app-sessions.by-profile", 3)


class Admin:
    """Records each DeleteRecords; raises the next of ``failures`` first."""

    def __init__(self) -> None:
        self.deleted: list[dict[TopicPartition, int]] = []
        self.failures: list[BaseException] = []
        self.started = 0
        self.closed = 0

    async def start(self) -> None:
        self.started += 1

    async def close(self) -> None:
        self.closed += 1

    async def delete_records(
        self, records_to_delete: dict[TopicPartition, RecordsToDelete]
    ) -> dict[TopicPartition, int]:
        if self.failures:
            raise self.failures.pop(0)
        asked = {tp: r.before_offset for tp, r in records_to_delete.items()}
        self.deleted.append(asked)
        return asked


@pytest.fixture
def admin() -> Admin:
    return Admin()


@pytest.fixture
def purger(admin: Admin) -> Purger:
    return Purger(lambda: admin)


async def test_it_deletes_below_each_committed_offset_that_moved(
    admin: Admin, purger: Purger
) -> None:
    await purger.purge({REKEYED: 10, BY_PROFILE: 4})
    await purger.purge({REKEYED: 10, BY_PROFILE: 9})
    await purger.purge({REKEYED: 10, BY_PROFILE: 9})  # nothing new: no request
    await purger.purge({})
    assert admin.deleted == [{REKEYED: 10, BY_PROFILE: 4}, {BY_PROFILE: 9}]
    assert purger.purged == {REKEYED: 10, BY_PROFILE: 9}
    assert admin.started == 1
    await purger.close()
    await purger.close()
    assert admin.closed == 1


async def test_nothing_is_asked_before_anything_is_committed(admin: Admin, purger: Purger) -> None:
    await purger.purge({REKEYED: 0})
    assert admin.deleted == []
    assert admin.started == 0


async def test_a_failed_purge_is_tried_again_and_never_raised(
    admin: Admin, purger: Purger, caplog: pytest.LogCaptureFixture
) -> None:
    admin.failures = [NotLeaderForPartitionError(), RuntimeError("a bug in the client")]
    with caplog.at_level(logging.INFO, "stream_app.pipeline.purge"):
        await purger.purge({REKEYED: 10})
        await purger.purge({REKEYED: 10})
        assert admin.deleted == []
        assert purger.purged == {}
        await purger.purge({REKEYED: 12})
    assert admin.deleted == [{REKEYED: 12}]
    levels = [(r.levelname, "to be retried" in r.getMessage()) for r in caplog.records]
    assert levels[:2] == [("INFO", True), ("WARNING", True)]


async def test_a_refusal_is_one_warning_until_the_acl_is_granted(
    admin: Admin, purger: Purger, caplog: pytest.LogCaptureFixture
) -> None:
    admin.failures = [TopicAuthorizationFailedError(), TopicAuthorizationFailedError()]
    with caplog.at_level(logging.INFO, "stream_app.pipeline.purge"):
        await purger.purge({REKEYED: 10, BY_PROFILE: 2})
        await purger.purge({REKEYED: 11, BY_PROFILE: 2})
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1
        assert "app-sessions.by-profile, app-sessions.rekeyed" in warnings[0]
        assert "TopicAuthorizationFailedError" in warnings[0]
        assert "Delete" in warnings[0]
        await purger.purge({REKEYED: 11, BY_PROFILE: 2})  # granted
    assert admin.deleted == [{REKEYED: 11, BY_PROFILE: 2}]
    assert "purging the internal topics again" in caplog.records[-1].getMessage()
