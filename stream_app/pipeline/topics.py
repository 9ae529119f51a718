"""The topics the app owns, and their creation.

The broker runs with automatic topic creation off, so the app declares every
topic it reads or writes before the worker starts. Faust itself creates the
changelog topics of its tables (compacted, never time-retained) and its
assignor's leader topic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from stream_app.pipeline.kafka import client_options
from stream_app.settings import Settings

log = logging.getLogger(__name__)

_COMPACTED = {"cleanup.policy": "compact"}
# Outputs are analytics history, kept by the cluster's default retention.
_DEFAULT: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def rekey_topic(settings: Settings) -> str:
    """Commands that arrived with a key other than their integrationId."""
    return f"{settings.app_id}-sessions.rekeyed"


def profile_topic(settings: Settings) -> str:
    """Stage 2 input: claims and outputs keyed by (applicationId, profileId)."""
    return f"{settings.app_id}-sessions.by-profile"


def topic_specs(settings: Settings) -> list[TopicSpec]:
    t = settings.topics
    p = settings.partitions
    # Internal topics are co-partitioned with the command topic (same count).
    specs = [TopicSpec(t.commands, p, _DEFAULT)]
    specs += [
        TopicSpec(name, p, _DEFAULT)
        for name in (t.closed, t.returned, t.cancelled, t.reopened, t.rejected)
    ]
    specs.append(TopicSpec(t.application_settings, 1, _COMPACTED))
    specs.append(TopicSpec(rekey_topic(settings), p, _DEFAULT))
    specs.append(TopicSpec(profile_topic(settings), p, _DEFAULT))
    return specs


async def ensure_topics(settings: Settings) -> list[str]:
    """Create the topics that are missing; return the names created."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    created: list[str] = []
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in topic_specs(settings) if s.name not in existing]
        for spec in missing:
            try:
                await admin.create_topics(
                    [
                        NewTopic(
                            spec.name,
                            num_partitions=spec.partitions,
                            replication_factor=settings.replication_factor,
                            topic_configs=spec.config,
                        )
                    ]
                )
                created.append(spec.name)
            except TopicAlreadyExistsError:
                pass  # another worker won the race
    finally:
        await admin.close()
    if created:
        log.info("created topics: %s", ", ".join(created))
    return created
