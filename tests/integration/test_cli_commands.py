"""``stream-app topics create``, ``send`` and ``tail`` as a user runs them, against
the real broker and a real worker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from stream_app.demo.traffic import generate_traffic
from tests.integration.harness import Deployment, Worker, consume, topic_configs
from tests.integration.workload import OutputReader


def stream_app(
    env: Mapping[str, str], *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_app", *args],
        env=dict(env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def started(env: Mapping[str, str], *args: str) -> subprocess.Popen[str]:
    """``stream-app *args`` running, its output piped (a follower, stopped with SIGINT)."""
    return subprocess.Popen(
        [sys.executable, "-m", "stream_app", *args],
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def documents(text: str) -> list[Any]:
    """The JSON documents printed one after another (indented, as tail prints them)."""
    decoder = json.JSONDecoder()
    docs, index = [], 0
    while (index := _skip_space(text, index)) < len(text):
        doc, index = decoder.raw_decode(text, index)
        docs.append(doc)
    return docs


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index].isspace():
        index += 1
    return index


async def test_topics_create_then_send_and_tail_through_a_worker(
    deployment: Deployment, workers: Callable[..., Worker]
) -> None:
    env = deployment.env()
    t = deployment.topics
    app_id = env["STREAM_APP_APP_ID"]

    # The re-key topic as an older worker created it: what the output says is
    # its config, not the one the worker would give it.
    rekeyed = f"{app_id}-sessions.rekeyed"
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(rekeyed, 3, 1, topic_configs={"retention.ms": "86400000"})]
        )
    finally:
        await admin.close()

    created = await asyncio.to_thread(stream_app, env, "topics", "create")
    assert created.returncode == 0, created.stderr
    lines = {line.split()[1]: line.split() for line in created.stdout.splitlines()[1:]}
    assert lines[t.commands][:4] == ["exists", t.commands, "3", "partitions"]  # made by fixture
    assert lines[rekeyed] == [
        "exists",
        rekeyed,
        "3",
        "partitions",
        "cleanup.policy=delete",
        "retention.bytes=-1",
        "retention.ms=86400000",
        "segment.bytes=1073741824",
        "(the",
        "worker",
        "creates",
        "it",
        "with",
        "retention.ms=-1",
        "segment.bytes=52428800)",
    ]
    assert "records the workers have not processed yet are deleted" in created.stderr
    profiles = f"{app_id}-sessions.by-profile"
    assert lines[profiles][0] == "created"
    assert "retention.ms=-1" in lines[profiles]
    assert lines[t.closed][:4] == ["created", t.closed, "3", "partitions"]
    assert lines[t.application_settings] == [
        "created",
        t.application_settings,
        "1",
        "partition",
        "cleanup.policy=compact",
    ]
    changelog = f"{app_id}-sessions-changelog"
    assert lines[changelog][0] == "created"
    assert len(lines) == 12
    configs = await topic_configs(deployment.bootstrap, [t.application_settings, changelog])
    assert configs[t.application_settings]["cleanup.policy"] == "compact"
    assert configs[changelog]["cleanup.policy"] == "compact"
    again = await asyncio.to_thread(stream_app, env, "topics", "create")
    assert [line.split()[0] for line in again.stdout.splitlines()[1:]] == ["exists"] * 12

    # Follow the (new, empty) rejection topic before anything is sent.
    follower = await asyncio.to_thread(started, env, "tail", "rejected", "--follow")
    try:
        sent = await asyncio.to_thread(
            stream_app,
            env,
            "send",
            "--type=close",
            "--integration-id=cart-1",
            "--event-id=close-1",
            "--item=SKU-1:2:0.1",
            "--cost=shipping=4.9",
        )
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.startswith(f"sent update of cart-1 (eventId close-1) to {t.commands}[")
        # A command the workers reject for the session's state (not the client's to know).
        reopen = '{"type":"reopen","integrationId":"cart-2","eventId":"r-1"}'
        sent = await asyncio.to_thread(stream_app, env, "send", stdin=reopen)
        assert sent.returncode == 0, sent.stderr

        workers(deployment)
        processed = await consume(
            deployment.bootstrap, [t.closed, t.rejected], expect=2, timeout=25
        )
        assert sorted(o.topic for o in processed) == sorted([t.closed, t.rejected]), processed

        closed = await asyncio.to_thread(stream_app, env, "tail", "closed")
        assert closed.returncode == 0, closed.stderr
        [output] = documents(closed.stdout)
        assert output["event"] == "talon_session_closed"
        assert output["eventId"] == "close-1"
        assert output["session"]["total"] == 5.1
        assert closed.stdout.startswith("{\n  ")  # indented for people

        commands = await asyncio.to_thread(stream_app, env, "tail", t.commands, "--metadata")
        records = documents(commands.stdout)
        assert [(r["key"], r["value"]["eventId"]) for r in records] == [
            ("cart-1", "close-1"),
            ("cart-2", "r-1"),
        ]
        assert {"topic", "partition", "offset", "timestamp"} <= set(records[0])
        limited = await asyncio.to_thread(stream_app, env, "tail", "commands", "-n", "1")
        assert len(documents(limited.stdout)) == 1

        # Only what comes later: before, it stopped at once, having printed nothing.
        skipping = await asyncio.to_thread(started, env, "tail", "rejected", "--from-end")
        await asyncio.sleep(3)  # started, past the rejection there; the follower polls every 0.2 s
        assert skipping.poll() is None, "tail --from-end stopped instead of following"
        skipping.send_signal(signal.SIGINT)
        skipped, err = await asyncio.to_thread(skipping.communicate, timeout=15)
        assert (skipping.returncode, skipped) == (0, ""), err
    finally:
        follower.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(follower.communicate, timeout=15)
    assert follower.returncode == 0, err
    [rejection] = documents(out)
    assert rejection["reason"] == "UNKNOWN_SESSION"
    assert rejection["command"]["eventId"] == "r-1"


async def test_tail_and_send_to_a_missing_topic_exit_1(
    deployment: Deployment, unique_name: Callable[[str], str]
) -> None:
    env = {**deployment.env(), "STREAM_APP_TOPICS__COMMANDS": unique_name("nothing")}
    tail = await asyncio.to_thread(stream_app, env, "tail", "commands")
    assert tail.returncode == 1
    assert "does not exist" in tail.stderr
    send = await asyncio.to_thread(stream_app, env, "send", '{"type":"reopen","integrationId":"c"}')
    assert send.returncode == 1
    assert "stream-app topics create" in send.stderr


async def test_a_small_record_limit_stops_the_worker_but_not_the_traffic(
    deployment: Deployment, workers: Callable[..., Worker]
) -> None:
    """An operator gave the rejection topic a record limit of 100,000 bytes, too
    small for the default 256 KiB sessions. The worker and ``topics create``
    refuse the configuration (exit 2); ``traffic``, which only sends commands,
    does not care. With the session limit the message names, the worker runs."""
    env = deployment.env()
    t = deployment.topics
    admin = AIOKafkaAdminClient(bootstrap_servers=deployment.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t.rejected, 1, 1, topic_configs={"max.message.bytes": "100000"})]
        )
    finally:
        await admin.close()

    sent = await asyncio.to_thread(stream_app, env, "traffic", "--sessions", "20")
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.startswith(f"produced to {t.commands}: ")
    # Sample orders go to a topic in use only with --yes: an operator's smoke
    # test in a pod sent them to production, where they are applied as real.
    again = await asyncio.to_thread(stream_app, env, "traffic", "--sessions", "20")
    assert again.returncode == 2, again.stderr
    assert f"{t.commands} at {deployment.bootstrap} already holds " in again.stderr
    assert "give --yes" in again.stderr
    limit = "max_session_bytes 262144 is too large for the topics' record limit of 100000 bytes"
    created = await asyncio.to_thread(stream_app, env, "topics", "create")
    assert created.returncode == 2
    assert limit in created.stderr
    assert "so it may be at most 26666" in created.stderr
    assert f"(max.message.bytes of {t.rejected})" in created.stderr

    refused = workers(deployment)
    refused.expect_exit(2)
    assert await asyncio.to_thread(refused.proc.wait, 60) == 2
    assert f"configuration error: {limit}" in refused.log_tail()

    expected = generate_traffic(20, seed=1).summary.expected
    worker = workers(deployment, env={**env, "STREAM_APP_MAX_SESSION_BYTES": "26666"})
    async with OutputReader(deployment.bootstrap, t) as reader:
        await reader.wait_for(sum(expected.values()), timeout=120, alive=[worker])
        await reader.poll(1.0, alive=[worker])
    assert reader.progress() == ", ".join(f"{k} {n}" for k, n in expected.items())
    assert worker.stop(timeout=30) == 0, worker.log_tail()
