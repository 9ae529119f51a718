"""Kafka connection options derived from :class:`~stream_app.settings.Settings`."""

from __future__ import annotations

import logging
import ssl
from typing import Any

from stream_app.settings import Settings

log = logging.getLogger(__name__)


def _ssl_context(settings: Settings) -> ssl.SSLContext | None:
    sec = settings.security
    if sec.protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=str(sec.ssl_cafile) if sec.ssl_cafile else None)
    if sec.ssl_certfile:
        context.load_cert_chain(
            str(sec.ssl_certfile), str(sec.ssl_keyfile) if sec.ssl_keyfile else None
        )
    return context


def client_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for aiokafka clients (admin, producer, consumer)."""
    sec = settings.security
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": sec.protocol,
    }
    context = _ssl_context(settings)
    if context is not None:
        options["ssl_context"] = context
    if sec.protocol.startswith("SASL"):
        options["sasl_mechanism"] = sec.sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = sec.sasl_username
        options["sasl_plain_password"] = (
            sec.sasl_password.get_secret_value() if sec.sasl_password else None
        )
    return options


async def partition_count(options: dict[str, Any], topic: str) -> int:
    """How many partitions ``topic`` has (0 when it does not exist)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for entry in described:
        if entry.get("topic") == topic and not entry.get("error_code"):
            return len(entry.get("partitions", ()))
    return 0


async def unreachable(options: dict[str, Any]) -> str | None:
    """Why the brokers in ``options`` cannot be reached; None when they answer."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(**options)
    try:
        await admin.start()
    except (KafkaError, OSError) as exc:
        return (
            f"Kafka at {options.get('bootstrap_servers')} is not reachable ({type(exc).__name__})"
        )
    await admin.close()
    return None


async def wait_for_partitions(
    options: dict[str, Any], topics: list[str], deadline: float
) -> list[Any] | None:
    """Every partition of ``topics``, waiting for the topics to be created (and the
    broker to answer); None when ``deadline`` (``time.monotonic()``) passes first."""
    import asyncio
    import time

    from aiokafka import TopicPartition

    partitions: list[Any] = []
    for topic in topics:
        while True:
            try:
                count = await partition_count(options, topic)
            except Exception as exc:
                log.debug("partition lookup of %s failed: %s", topic, exc)
                count = 0
            if count:
                break
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.2)
        partitions += [TopicPartition(topic, p) for p in range(count)]
    return partitions
