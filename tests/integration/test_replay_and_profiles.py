"""Replay determinism, firstSession across partitions, and id uniqueness at scale."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiokafka.partitioner import DefaultPartitioner

from stream_app.pipeline.topics import profile_topic, rekey_topic
from tests.integration.harness import (
    Deployment,
    Output,
    Record,
    Worker,
    command,
    consume,
    create_topics,
    metric_samples,
    produce,
    purged_offsets,
    topic_configs,
)


def replay_traffic(sessions: int, seed: int) -> list[Record]:
    """Mixed, correctly keyed traffic: updates, closes, returns, reopens, cancels,
    duplicates, commands without eventId and bad records. Profiles are unique per
    session, so firstSession cannot race (see the README)."""
    rng = random.Random(seed)
    out: list[Record] = []
    for n in range(sessions):
        iid = f"r-{n:04d}"
        key = iid.encode()
        profile = f"p-{n}" if n % 2 else ""
        items = [
            {"sku": f"sku-{j}", "quantity": rng.randint(1, 4), "price": rng.choice([0.1, 9.99, 20])}
            for j in range(rng.randint(1, 5))
        ]
        out.append(
            (
                key,
                command(
                    "update",
                    iid,
                    eventId=f"{iid}-1",
                    session={"profileId": profile, "cartItems": items},
                ),
            )
        )
        out.append((key, command("update", iid, session={"couponCodes": ["C1"]})))  # no eventId
        kind = n % 5
        if kind == 0:
            out.append(
                (key, command("update", iid, eventId=f"{iid}-2", session={"state": "closed"}))
            )
            out.append(
                (
                    key,
                    command(
                        "return",
                        iid,
                        eventId=f"{iid}-3",
                        returnedCartItems=[{"position": 0, "quantity": 1}],
                    ),
                )
            )
        elif kind == 1:
            out.append(
                (key, command("update", iid, eventId=f"{iid}-2", session={"state": "closed"}))
            )
            out.append((key, command("reopen", iid, eventId=f"{iid}-3")))
            out.append(
                (key, command("update", iid, eventId=f"{iid}-4", session={"state": "closed"}))
            )
        elif kind == 2:
            out.append(
                (key, command("update", iid, eventId=f"{iid}-2", session={"state": "cancelled"}))
            )
        elif kind == 3:
            closing = command("update", iid, eventId=f"{iid}-2", session={"state": "closed"})
            out += [(key, closing), (key, closing)]  # a duplicate
        else:
            out.append((key, command("reopen", iid, eventId=f"{iid}-2")))  # rejected
            out.append((key, b"{broken"))
    return out


def values_by_key(
    outputs: list[Output], topic_kind: dict[str, str]
) -> dict[tuple[str, bytes], list[bytes]]:
    grouped: dict[tuple[str, bytes], list[bytes]] = defaultdict(list)
    for out in sorted(outputs, key=lambda o: (o.topic, o.partition, o.offset)):
        grouped[(topic_kind[out.topic], out.key or b"")].append(out.value)
    return grouped


async def test_replay_into_a_fresh_app_gives_byte_identical_outputs(
    deployment: Deployment,
    workers: Callable[..., Worker],
    kafka_bootstrap: str,
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    traffic = replay_traffic(200, seed=7)
    await produce(kafka_bootstrap, deployment.topics.commands, traffic)
    replay = Deployment(
        kafka_bootstrap,
        unique_name("replay"),
        tmp_path / "replay-state",
        partitions=deployment.partitions,
        extra_env={"STREAM_APP_TOPICS__COMMANDS": deployment.topics.commands},
    )
    first = workers(deployment)
    second = workers(replay)
    expected = 40 * 2 + 40 * 3 + 40 + 40 + 40 * 2  # closed+returned, closed+reopened+closed, ...
    runs = []
    for d in (deployment, replay):
        outputs = await consume(
            kafka_bootstrap, d.output_topics(), expect=expected, timeout=180, settle=2
        )
        t = d.topics
        kinds = {
            t.closed: "closed",
            t.returned: "returned",
            t.cancelled: "cancelled",
            t.reopened: "reopened",
            t.rejected: "rejected",
        }
        runs.append(values_by_key(outputs, kinds))
    assert first.proc.poll() is None
    assert second.proc.poll() is None
    assert sum(len(v) for v in runs[0].values()) == expected
    assert runs[0] == runs[1]


def _partition(key: bytes, partitions: int) -> int:
    return int(DefaultPartitioner()(key, list(range(partitions)), list(range(partitions))))


def _keys_on_distinct_partitions(prefix: str, count: int, partitions: int) -> list[str]:
    chosen: dict[int, str] = {}
    n = 0
    while len(chosen) < count:
        iid = f"{prefix}-{n}"
        chosen.setdefault(_partition(iid.encode(), partitions), iid)
        n += 1
    return list(chosen.values())


async def test_first_session_is_decided_per_profile_across_partitions(
    deployment: Deployment,
    workers: Callable[..., Worker],
) -> None:
    t = deployment.topics
    first, second, third = _keys_on_distinct_partitions("fs", 3, deployment.partitions)
    assert len({_partition(k.encode(), deployment.partitions) for k in (first, second, third)}) == 3
    workers(deployment)

    def close(iid: str, profile: str, app: int = 1) -> Record:
        return iid.encode(), command(
            "update",
            iid,
            applicationId=app,
            eventId=f"{iid}-c",
            session={"profileId": profile, "state": "closed"},
        )

    await produce(deployment.bootstrap, t.commands, [close(first, "alice")])
    await consume(deployment.bootstrap, [t.closed], expect=1, timeout=90)
    late_profile = "late-" + first
    await produce(
        deployment.bootstrap,
        t.commands,
        [
            close(second, "alice"),
            close(third, "alice"),
            close("anon-" + first, ""),
            close("other-app-" + first, "alice", app=2),
            # created anonymous, then given a profile that already has a first session
            (
                late_profile.encode(),
                command("update", late_profile, eventId="l1", session={"profileId": ""}),
            ),
            (
                late_profile.encode(),
                command(
                    "update",
                    late_profile,
                    eventId="l2",
                    session={"profileId": "alice", "state": "closed"},
                ),
            ),
        ],
    )
    outputs = await consume(deployment.bootstrap, [t.closed], expect=6, timeout=90, settle=2)
    flags = {o.doc()["integrationId"]: o.doc()["session"]["firstSession"] for o in outputs}
    assert flags == {
        first: True,
        second: False,
        third: False,
        "anon-" + first: True,
        "other-app-" + first: True,
        late_profile: False,
    }


async def test_session_ids_are_unique_over_100k_sessions(
    deployment: Deployment,
    workers: Callable[..., Worker],
) -> None:
    t = deployment.topics
    n = 100_000
    await produce(
        deployment.bootstrap,
        t.commands,
        [
            (
                f"u{i}".encode(),
                b'{"type":"update","integrationId":"u%d","session":{"state":"closed"}}' % i,
            )
            for i in range(n)
        ],
    )
    workers(deployment)
    outputs = await consume(deployment.bootstrap, [t.closed], expect=n, timeout=600)
    ids = [o.doc()["session"]["id"] for o in outputs]
    assert len(ids) == n
    assert len(set(ids)) == n
    assert all(0 < i < 2**31 for i in ids)


async def test_what_the_workers_processed_is_purged_from_the_internal_topics(
    kafka_bootstrap: str,
    unique_name: Callable[[str], str],
    workers: Callable[..., Worker],
    tmp_path: Path,
) -> None:
    """The re-key and by-profile topics keep records for ever, so no retention
    loses one a worker has not processed; what it has committed is deleted
    (as Kafka Streams purges its repartition topics). Exactly what is below
    the group's committed offset: nothing more, and no output lost."""
    d = Deployment(
        kafka_bootstrap,
        unique_name("purge"),
        tmp_path / "state",
        extra_env={"STREAM_APP_PURGE_INTERVAL_S": "0.5"},
    )
    settings = d.settings()
    internal = [rekey_topic(settings), profile_topic(settings)]
    traffic = replay_traffic(200, seed=11)
    # The odd sessions' commands under a key other than their integrationId:
    # each of those sessions goes through the re-key topic, in order.
    traffic = [
        (b"wrong-" + key if key is not None and int(key[2:]) % 2 else key, value)
        for key, value in traffic
    ]
    await create_topics(kafka_bootstrap, [d.topics.commands], d.partitions)
    await produce(kafka_bootstrap, d.topics.commands, traffic)
    worker = workers(d)
    expected = 40 * 2 + 40 * 3 + 40 + 40 + 40 * 2
    outputs = await consume(
        kafka_bootstrap, d.output_topics(), expect=expected, timeout=180, settle=2
    )
    assert len(outputs) == expected
    configs = await topic_configs(kafka_bootstrap, internal)
    for topic in internal:
        assert configs[topic]["retention.ms"] == "-1", topic
        assert configs[topic]["cleanup.policy"] == "delete", topic

    offsets = await purged_offsets(kafka_bootstrap, settings.app_id, internal, timeout=30)
    for topic in internal:
        written = [v for tp, v in offsets.items() if tp.topic == topic and v[2] > 0]
        assert written, f"nothing was written to {topic}: the test tests nothing"
    for tp, (first, committed, end) in offsets.items():
        # Everything processed, and exactly that deleted. Past the last record
        # are only commit markers: one per stage-1 task that wrote to it last.
        assert committed is not None or end == 0, tp
        assert first == (committed or 0), (tp, offsets[tp])
        assert end - first <= d.partitions, (tp, offsets[tp])
    assert worker.running
    assert "purging processed records failed" not in worker.log_tail(200_000)
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{worker.http_url()}/metrics") as answer,
    ):
        metrics = metric_samples((await answer.read()).decode())
    assert metrics[("stream_app_purges_total", (("result", "succeeded"),))] >= 1
    assert metrics[("stream_app_purges_total", (("result", "failed"),))] == 0
    assert metrics[("stream_app_purge_failures_in_a_row", ())] == 0
