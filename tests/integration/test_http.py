"""The worker's HTTP surface against a real worker and broker: readiness through
a restore, Prometheus metrics that move, and the session query API across two
workers and a rebalance."""

from __future__ import annotations

import asyncio
import http.client
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaProducer
from yarl import URL

from stream_app import json
from stream_app.pipeline.processor import partition_for
from stream_app.pipeline.topics import profile_topic, rekey_topic
from tests.deploy.manifests import PROMETHEUS_SERIES, alerts, selectors
from tests.integration.harness import (
    ROOT,
    Deployment,
    Worker,
    command,
    consume,
    metric_samples,
    produce,
)

StartWorker = Callable[..., Worker]


async def get(url: str, *, raw: bool = False) -> tuple[int, Any]:
    """``raw``: send the URL's escapes as they are, not normalised."""
    target = URL(url, encoded=True) if raw else url
    async with aiohttp.ClientSession() as client, client.get(target) as answer:
        body = await answer.read()
        return answer.status, json.loads(body) if body.startswith((b"{", b"[")) else body


def closing(n: int, prefix: str) -> list[tuple[bytes, bytes]]:
    cart = [{"sku": "lamp", "quantity": 2, "price": 12.5}]
    records = []
    for i in range(n):
        iid = f"{prefix}-{i:05d}"
        records.append((iid.encode(), command("update", iid, session={"cartItems": cart})))
        records.append((iid.encode(), command("update", iid, session={"state": "closed"})))
    return records


async def test_readyz_is_false_while_stores_restore_and_true_after(
    deployment: Deployment, workers: StartWorker, tmp_path: Path
) -> None:
    t = deployment.topics
    n = 15_000
    await produce(deployment.bootstrap, t.commands, closing(n, "r"))
    first = workers(deployment)
    closed = await consume(deployment.bootstrap, [t.closed], expect=n, timeout=180)
    assert len(closed) == n, f"{len(closed)} of {n} closed\n{first.log_tail()}"
    assert first.stop() == 0, first.log_tail()

    # A worker with an empty disk must restore every session before it is ready.
    second = workers(deployment, data_dir=tmp_path / "empty")
    url = second.http_url()
    seen: list[tuple[int, Any]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        live, _ = await get(f"{url}/livez")
        assert live == 200
        status, body = await get(f"{url}/readyz")
        seen.append((status, body))
        if status == 200:
            break
        await asyncio.sleep(0.01)
    restoring = [b for s, b in seen if s == 503 and b["joined"] and b["starting"]]
    assert restoring, f"never seen not-ready during the restore: {seen[:5]}"
    assert seen[-1][0] == 200, seen[-1]
    assert seen[-1][1]["ready"] is True
    assert not seen[-1][1]["starting"]
    log = second.log_tail(200_000)
    restored = [line for line in log.splitlines() if "restored" in line and "records in" in line]
    assert restored, log[-3000:]
    assert second.stop() == 0, second.log_tail()


async def test_metrics_parse_and_move_as_commands_are_processed(
    deployment: Deployment, workers: StartWorker
) -> None:
    t = deployment.topics
    worker = workers(deployment)
    url = worker.http_url()
    status, before_text = await get(f"{url}/metrics")
    assert status == 200
    before = metric_samples(before_text.decode())
    assert before[("stream_app_transactions_total", (("result", "committed"),))] == 0

    records = closing(20, "m")
    records += [(b"m-bad", b"not json"), (b"m-bad", command("update", "m-bad", session=[]))]
    await produce(deployment.bootstrap, t.commands, records)
    closed = await consume(deployment.bootstrap, [t.closed], expect=20, timeout=90)
    assert len(closed) == 20, worker.log_tail()
    rejected = await consume(deployment.bootstrap, [t.rejected], expect=2, timeout=30)
    assert len(rejected) == 2, worker.log_tail()
    deadline = time.monotonic() + 30
    while True:
        _, text = await get(f"{url}/metrics")
        after = metric_samples(text.decode())
        applied = after.get(
            ("stream_app_commands_total", (("outcome", "applied"), ("type", "update")))
        )
        # A round's duration is observed when all its transactions have ended;
        # each transaction is counted as it ends: a scrape may fall between.
        rounds = after.get(("stream_app_commit_seconds_count", ()), 0)
        if (applied == 40 and rounds >= 1) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert applied == 40
    assert after[("stream_app_rejections_total", (("reason", "MALFORMED_JSON"),))] == 1
    assert after[("stream_app_rejections_total", (("reason", "SCHEMA_VIOLATION"),))] == 1
    assert after[("stream_app_commands_total", (("outcome", "rejected"), ("type", "unknown")))] == 2
    assert after[("stream_app_emitted_total", (("output", "closed"),))] == 20
    assert after[("stream_app_transactions_total", (("result", "committed"),))] > 0
    assert after[("stream_app_processing_seconds_count", ())] >= 42
    assert after[("stream_app_commit_seconds_count", ())] >= 1
    # Each committed transaction went through every phase, in order (a scrape
    # may catch one between two phases).
    phases = {
        phase: after[("stream_app_transaction_phase_seconds_count", (("phase", phase),))]
        for phase in ("produce", "offsets", "commit", "store")
    }
    committed = after[("stream_app_transactions_total", (("result", "committed"),))]
    assert phases["produce"] >= phases["commit"] >= phases["store"] >= committed >= 1
    assert phases["offsets"] >= 1
    lag = {k: v for k, v in after.items() if k[0] == "stream_app_consumer_lag"}
    assert lag
    assert all(v >= 0 for v in lag.values())
    keys = sum(v for k, v in after.items() if k[0] == "stream_app_store_keys")
    assert keys >= 20
    assert after[("stream_app_ready", ())] == 1
    # The alerting rules (deploy/components/alerts) match on labels these series have.
    for rule in alerts():
        for metric, matchers in selectors(str(rule["expr"])):
            if metric in PROMETHEUS_SERIES:
                continue
            labels = {label for name, pairs in after if name == metric for label, _ in pairs}
            assert any(name == metric for name, _ in after), (rule["alert"], metric)
            assert set(matchers) <= labels, (rule["alert"], metric, matchers, labels)
    assert worker.stop() == 0


async def test_an_idle_worker_shows_no_lag_on_inputs_written_in_transactions(
    deployment: Deployment, workers: StartWorker
) -> None:
    """Every input ends in a commit marker here: the commands come from a
    transactional producer, and the re-key and by-profile topics are the
    worker's own transactional writes. Before, each such partition showed a
    lag of 1 at rest, for good (the marker), and StreamAppStalled paged."""
    t = deployment.topics
    worker = workers(deployment)
    cart = [{"sku": "lamp", "quantity": 1, "price": 3}]
    records = []
    for i in range(12):
        iid = f"idle-{i:03d}"
        session = {"profileId": f"p-{i % 3}", "cartItems": cart}
        records.append((iid.encode(), command("update", iid, session=session)))
        records.append((iid.encode(), command("update", iid, session={"state": "closed"})))
    records.append((b"wrong-key", command("update", "idle-rekeyed", session={"state": "closed"})))
    producer = AIOKafkaProducer(
        bootstrap_servers=deployment.bootstrap, transactional_id=f"{t.commands}-checkout"
    )
    await producer.start()
    try:
        async with producer.transaction():
            for key, value in records:
                await producer.send(t.commands, value=value, key=key)
    finally:
        await producer.stop()
    closed = await consume(deployment.bootstrap, [t.closed], expect=13, timeout=90)
    assert len(closed) == 13, worker.log_tail()

    settings = deployment.settings()
    inputs = {t.commands, rekey_topic(settings), profile_topic(settings)}
    url = worker.http_url()
    deadline = time.monotonic() + 30
    while True:
        _, text = await get(f"{url}/metrics")
        lags = [
            (dict(labels)["topic"], dict(labels)["partition"], value)
            for (name, labels), value in metric_samples(text.decode()).items()
            if name == "stream_app_consumer_lag"
        ]
        lagging = [lag for lag in lags if lag[2]]
        topics = {topic for topic, _, _ in lags}
        if (not lagging and inputs <= topics) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert inputs <= topics
    assert lagging == []
    assert worker.stop() == 0


async def test_any_worker_answers_a_session_query_and_a_rebalance_gives_503_never_a_wrong_one(
    deployment: Deployment, workers: StartWorker, tmp_path: Path
) -> None:
    t = deployment.topics
    n = 60
    await produce(deployment.bootstrap, t.commands, closing(n, "q"))
    a = workers(deployment, data_dir=tmp_path / "a")
    b = workers(deployment, data_dir=tmp_path / "b")
    closed = await consume(deployment.bootstrap, [t.closed], expect=n, timeout=120)
    assert len(closed) == n, f"{len(closed)} of {n} closed\n{a.log_tail()}\n{b.log_tail()}"
    urls = [a.http_url(), b.http_url()]
    deadline = time.monotonic() + 60
    while not all([(await get(f"{u}/readyz"))[0] == 200 for u in urls]):
        assert time.monotonic() < deadline, "the two workers never became ready"
        await asyncio.sleep(0.1)
    owned = {u: set((await get(f"{u}/readyz"))[1]["active"]) for u in urls}
    assert all(owned.values()), owned  # both workers own tasks

    partitions = deployment.partitions
    for i in range(n):
        iid = f"q-{i:05d}"
        owner = next(
            u for u in urls if f"commands[{partition_for(iid.encode(), partitions)}]" in owned[u]
        )
        for url in urls:  # the owner, and the other one (which forwards)
            status, doc = await get(f"{url}/v2/customer_sessions/{iid}?applicationId=1")
            assert status == 200, (url, owner, doc)
            assert doc["integrationId"] == iid
            assert doc["state"] == "closed"
            assert doc["cartItems"][0]["quantity"] == 2
            assert doc["total"] == 25
    assert (await get(f"{urls[0]}/v2/customer_sessions/nobody?applicationId=1"))[0] == 404
    assert (await get(f"{urls[0]}/v2/customer_sessions/q-00001?applicationId=x"))[0] == 400
    assert (await get(f"{urls[1]}/v2/customer_sessions/q-00001?applicationId=7"))[0] == 404
    # Escapes as sent, in lower case: the worker that forwards and the owner
    # read the same id (re-encoded as "%C3%BF" it would be the same, but an
    # escape the forwarder rewrote could be another). One that is not UTF-8
    # names no session: each worker says so itself.
    odd = {f"%c3%bf{i}": f"\u00ff{i}" for i in range(8)}
    owners = {
        u
        for iid in odd.values()
        for u in urls
        if f"commands[{partition_for(iid.encode(), partitions)}]" in owned[u]
    }
    assert owners == set(urls)  # each worker answers for some itself, forwards the others
    for escaped, iid in odd.items():
        for url in urls:
            status, doc = await get(f"{url}/v2/customer_sessions/{escaped}", raw=True)
            assert (status, doc["detail"]) == (404, f"no session {iid!r} in application 1")
    for url in urls:
        status, doc = await get(f"{url}/v2/customer_sessions/%ff%fe", raw=True)
        assert (status, doc["detail"]) == (404, "no session has an integrationId that is not UTF-8")
    # A request target in absolute form is answered (and forwarded) by its path.
    for url in urls:
        host, port = url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("GET", "http://elsewhere.example/v2/customer_sessions/q-00002")
        answer = connection.getresponse()
        assert answer.status == 200, (url, answer.read())
        assert json.loads(answer.read())["integrationId"] == "q-00002"
        connection.close()

    # A third worker joins: every answer during the rebalance is right or a 503.
    c = workers(deployment, data_dir=tmp_path / "c")
    answers: list[int] = []
    deadline = time.monotonic() + 60
    joined = False
    while time.monotonic() < deadline:
        for i in (1, 2, 3):
            status, doc = await get(f"{urls[0]}/v2/customer_sessions/q-0000{i}?applicationId=1")
            assert status in (200, 503), (status, doc)
            if status == 200:
                assert doc["integrationId"] == f"q-0000{i}"
                assert doc["total"] == 25
            answers.append(status)
        if not joined:
            try:
                status, _body = await get(f"{c.http_url(timeout=0.1)}/readyz")
                joined = status == 200
            except AssertionError:
                pass
        elif answers[-1] == 200:
            break
        await asyncio.sleep(0.01)
    assert joined, c.log_tail()
    assert 503 in answers, "no 503 seen during the rebalance"
    assert answers[-1] == 200

    # stream-app inspect asks the query API.
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "stream_app", "inspect", "q-00007", "--url", urls[1]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert '"integrationId": "q-00007"' in done.stdout
    missing = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "stream_app", "inspect", "nobody", "--url", urls[1]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        check=False,
    )
    assert missing.returncode == 1
    assert "404" in missing.stderr
    for w in (a, b, c):
        assert w.stop() == 0, w.log_tail()
