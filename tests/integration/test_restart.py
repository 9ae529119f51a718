"""State survives restarts: from the local RocksDB store, from the changelog
alone, and across a hard crash mid-stream with exactly-once outputs."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from stream_app.pipeline.topics import topic_specs
from tests.integration.harness import (
    Deployment,
    Worker,
    command,
    consume,
    produce,
    topic_configs,
)
from tests.integration.workload import configuration_error


def _rocksdb_files(data_dir: Path) -> list[Path]:
    return [*data_dir.rglob("*.sst"), *data_dir.rglob("CURRENT")]


def _restored(worker: Worker) -> list[int]:
    """Changelog records each of ``worker``'s task starts restored (its log says)."""
    log = worker.log_path.read_text(errors="replace")
    return [int(n) for n in re.findall(r"\(restored (\d+) changelog records\)", log)]


async def test_worker_continues_from_table_state_local_and_from_changelog(
    deployment: Deployment, workers: Callable[..., Worker], tmp_path: Path
) -> None:
    t = deployment.topics
    cart = [{"sku": "lamp", "quantity": 1, "price": 25.5}]
    await produce(
        deployment.bootstrap,
        t.commands,
        [
            (b"cart-1", command("update", "cart-1", eventId="a1", session={"cartItems": cart})),
            (b"cart-1", command("update", "cart-1", eventId="a2", session={"couponCodes": ["X"]})),
        ],
    )
    first = workers(deployment)
    # The two updates emit nothing downstream; a marker session tells us run 1 is done.
    await produce(
        deployment.bootstrap,
        t.commands,
        [
            (b"marker-1", command("update", "marker-1", session={"state": "closed"})),
        ],
    )
    marker = await consume(deployment.bootstrap, [t.closed], expect=1, timeout=90)
    assert [o.doc()["integrationId"] for o in marker] == ["marker-1"], first.log_tail()
    assert first.stop() == 0, first.log_tail()
    assert _rocksdb_files(deployment.data_dir), "the session table is not in RocksDB"
    app_id = deployment.env()["STREAM_APP_APP_ID"]
    changelogs = [
        f"{app_id}-{table}-changelog" for table in ("sessions", "session-ids", "first-sessions")
    ]
    configs = await topic_configs(deployment.bootstrap, changelogs)
    assert {name: c["cleanup.policy"] for name, c in configs.items()} == dict.fromkeys(
        changelogs, "compact"
    )

    # Run 2, same data directory: RocksDB state continues.
    second = workers(deployment)
    await produce(
        deployment.bootstrap,
        t.commands,
        [
            (b"cart-1", command("update", "cart-1", eventId="a3", session={"state": "closed"})),
        ],
    )
    outputs = await consume(deployment.bootstrap, [t.closed], expect=2, timeout=90)
    closed = {o.doc()["integrationId"]: o.doc() for o in outputs}
    session = closed["cart-1"]["session"]
    assert session["updateCount"] == 3
    assert session["cartItems"][0]["sku"] == "lamp"
    assert session["couponCodes"] == ["X"]
    assert second.stop() == 0, second.log_tail()
    # From RocksDB, not the changelog: every task started restoring nothing.
    restored = _restored(second)
    assert restored, second.log_tail()
    assert not any(restored), second.log_tail()

    # Run 3, empty data directory: the table is rebuilt from its changelog.
    third = workers(deployment, data_dir=tmp_path / "fresh-state")
    await produce(
        deployment.bootstrap,
        t.commands,
        [
            (b"cart-1", command("reopen", "cart-1", eventId="a4")),
        ],
    )
    reopened = await consume(deployment.bootstrap, [t.reopened], expect=1, timeout=90)
    again = reopened[0].doc()["session"]
    assert again["updateCount"] == 4
    assert again["id"] == session["id"]
    assert again["total"] == 25.5
    assert third.stop() == 0, third.log_tail()
    assert sum(_restored(third)) > 0, third.log_tail()  # from the changelog, this time

    # Run 4: partitions added to every co-partitioned topic together (what a
    # changed KafkaTopic label does) pass the check of the counts, and an
    # empty data directory has no layout file to refuse them: the group's
    # committed offsets still say what the state was built for.
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

    co_partitioned = [
        spec.name for spec in topic_specs(deployment.settings(), 3) if spec.co_partitioned
    ]
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.bootstrap)
    await admin.start()
    try:
        await admin.create_partitions(dict.fromkeys(co_partitioned, NewPartitions(4)))
    finally:
        await admin.close()
    line = await configuration_error(workers(deployment, data_dir=tmp_path / "fresh-again"))
    assert f"committed offsets for state built for 3 partitions ({t.commands}[0] and " in line
    assert "re-partitioning is a migration to a new app id" in line


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
async def test_stop_mid_stream_loses_and_duplicates_nothing(
    deployment: Deployment, workers: Callable[..., Worker], stop: str
) -> None:
    """Kill (or gracefully stop) the worker while it works through 4,000 sessions
    (open, then close), start another: every session is closed exactly once for a
    read_committed consumer, and the closes carry the state the opens left."""
    t = deployment.topics
    n = 4000
    records = []
    for i in range(n):
        iid = f"s-{i:05d}"
        records.append(
            (
                iid.encode(),
                command(
                    "update",
                    iid,
                    eventId=f"{iid}-open",
                    session={"cartItems": [{"sku": "book", "quantity": 1 + i % 3, "price": 12.25}]},
                ),
            )
        )
    for i in range(n):
        iid = f"s-{i:05d}"
        records.append(
            (
                iid.encode(),
                command("update", iid, eventId=f"{iid}-close", session={"state": "closed"}),
            )
        )
    await produce(deployment.bootstrap, t.commands, records)

    # Small transactions, so that the work spans many commits: with the
    # default batch (5,000), one commit could hold every close, and the
    # worker was done before the test saw its first 200.
    deployment.extra_env["STREAM_APP_BATCH_SIZE"] = "100"
    victim = workers(deployment)
    seen = await consume(deployment.bootstrap, [t.closed], expect=200, timeout=120)
    assert len(seen) >= 200, f"only {len(seen)} closed before the stop\n{victim.log_tail()}"
    assert victim.running, f"the worker exited before the stop\n{victim.log_tail()}"
    if stop == "sigkill":
        victim.kill()
    else:
        assert victim.stop() == 0, victim.log_tail()
    # What the stopped worker committed: fewer than every close, or the stop
    # came after the work (the count read above says nothing of that: it
    # returns at 200).
    committed = await consume(deployment.bootstrap, [t.closed], expect=n, timeout=5)
    assert len(committed) < n, "the worker finished before it was stopped"

    workers(deployment)
    outputs = await consume(deployment.bootstrap, [t.closed], expect=n, timeout=240, settle=3)
    counts = Counter(o.doc()["integrationId"] for o in outputs)
    assert len(counts) == n
    duplicated = {iid: c for iid, c in counts.items() if c > 1}
    assert not duplicated
    for out in outputs:
        doc = out.doc()
        i = int(doc["integrationId"][2:])
        assert doc["session"]["cartItemTotal"] == 12.25 * (1 + i % 3)
        assert doc["session"]["updateCount"] == 2
    ids = [o.doc()["session"]["id"] for o in outputs]
    assert len(set(ids)) == n
