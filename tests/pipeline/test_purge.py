"""What the purger deletes from the internal topics, and what it does when
Kafka refuses or fails (no broker: a stand-in admin client)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiokafka.admin import RecordsToDelete
from aiokafka.errors import NotLeaderForPartitionError, TopicAuthorizationFailedError
from aiokafka.structs import TopicPartition

from stream_app.pipeline.purge import FAILURES_WARNED, Purger

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
    assert (purger.succeeded, purger.failed, purger.failures) == (1, 2, 0)
    assert [(r.levelname, "to be retried" in r.getMessage()) for r in caplog.records] == [
        ("INFO", True),
        ("INFO", True),
    ]


async def test_purges_failing_for_minutes_are_one_warning(
    admin: Admin, purger: Purger, caplog: pytest.LogCaptureFixture
) -> None:
    """One partition without a leader fails every purge (aiokafka asks none
    then): the topics would grow unnoticed behind INFO lines."""
    admin.failures = [NotLeaderForPartitionError() for _ in range(FAILURES_WARNED + 5)]
    with caplog.at_level(logging.INFO, "stream_app.pipeline.purge"):
        for _ in range(FAILURES_WARNED + 5):
            await purger.purge({REKEYED: 10, BY_PROFILE: 3})
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1
        assert f"failed {FAILURES_WARNED} times in a row" in warnings[0]
        assert "app-sessions.by-profile, app-sessions.rekeyed" in warnings[0]
        assert "NotLeaderForPartitionError" in warnings[0]
        assert purger.failures == FAILURES_WARNED + 5  # /metrics: failures in a row
        await purger.purge({REKEYED: 10, BY_PROFILE: 3})
    assert admin.deleted == [{REKEYED: 10, BY_PROFILE: 3}]
    assert caplog.records[-1].getMessage() == "purging the internal topics again"


async def test_a_purge_cancelled_while_connecting_leaves_no_client_open(
    admin: Admin, purger: Purger
) -> None:
    """The worker cancels a purge in flight when it stops."""
    connecting = asyncio.Event()

    async def slow_start() -> None:
        connecting.set()
        await asyncio.sleep(60)

    admin.start = slow_start  # type: ignore[method-assign]
    purge = asyncio.create_task(purger.purge({REKEYED: 10}))
    await connecting.wait()
    purge.cancel()
    with pytest.raises(asyncio.CancelledError):
        await purge
    assert admin.closed == 1
    await purger.close()
    assert admin.closed == 1


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
