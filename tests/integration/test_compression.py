"""Checkout systems' producers may compress their batches with any of Kafka's
codecs (Java clients often use lz4, snappy or zstd): the worker reads them
all. Without the codecs' library the consumer cannot unpack such a batch, and
the worker stopped ("the worker failed", UnsupportedCodecError), again on
every restart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.integration.harness import Deployment, Worker, command, consume, produce

CODECS = ("gzip", "snappy", "lz4", "zstd")


async def test_commands_compressed_with_every_codec_are_applied(
    deployment: Deployment, workers: Callable[..., Worker], tmp_path: Path
) -> None:
    cart = [{"sku": "lamp", "quantity": 2, "price": 12.5}]
    for codec in CODECS:
        records = []
        for i in range(5):
            iid = f"{codec}-{i}"
            records.append((iid.encode(), command("update", iid, session={"cartItems": cart})))
            records.append((iid.encode(), command("update", iid, session={"state": "closed"})))
        await produce(deployment.bootstrap, deployment.topics.commands, records, compression=codec)
    worker = workers(deployment, data_dir=tmp_path / "state")
    t = deployment.topics
    outputs = await consume(
        deployment.bootstrap, [t.closed, t.rejected], expect=5 * len(CODECS), timeout=120, settle=1
    )
    closed = sorted(o.doc()["integrationId"] for o in outputs if o.topic == t.closed)
    assert closed == sorted(f"{codec}-{i}" for codec in CODECS for i in range(5)), worker.log_tail()
    assert [o for o in outputs if o.topic == t.rejected] == []
    assert worker.stop() == 0
