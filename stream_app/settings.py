"""The one typed settings object.

Built once at the entry point (:func:`Settings.from_env` in the CLI) and
passed down; nothing else in the package reads ``os.environ``.

Environment: ``STREAM_APP_<FIELD>`` (nested with ``__``, e.g.
``STREAM_APP_TOPICS__CLOSED``), plus ``KAFKA_BOOTSTRAP_SERVERS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ProcessingGuarantee = Literal["exactly_once", "at_least_once"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]


class TopicNames(BaseModel):
    """Kafka topic names; every one is configurable."""

    model_config = ConfigDict(frozen=True)

    commands: str = "sessions.commands"
    closed: str = "sessions.closed"
    returned: str = "sessions.returned"
    cancelled: str = "sessions.cancelled"
    reopened: str = "sessions.reopened"
    rejected: str = "sessions.rejected"
    application_settings: str = "sessions.application-settings"


class KafkaSecurity(BaseModel):
    """Broker security. PLAINTEXT today; the fields for SASL/SSL are here for later."""

    model_config = ConfigDict(frozen=True)

    protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None


class RocksDBSettings(BaseModel):
    """Memory bounds of each partition's RocksDB database.

    Faust's defaults reserve a 2 GiB block cache per partition database; these
    are per database too, so the worst case is ``partitions x (block cache +
    write buffers)``.
    """

    model_config = ConfigDict(frozen=True)

    block_cache_mb: int = Field(default=32, ge=1)
    write_buffer_mb: int = Field(default=16, ge=1)
    max_write_buffers: int = Field(default=2, ge=1)
    max_open_files: int = Field(default=256, ge=16)


class Settings(BaseSettings):
    """Everything the worker, the demo and the tools need to know."""

    model_config = SettingsConfigDict(
        env_prefix="STREAM_APP_",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "STREAM_APP_BOOTSTRAP_SERVERS"),
    )
    security: KafkaSecurity = KafkaSecurity()
    app_id: str = "stream-app"
    topics: TopicNames = TopicNames()
    #: Partitions of the command topic when the worker creates it. When the
    #: topic exists, its count is used instead; internal topics always get the
    #: command topic's count. Changing it re-maps keys: see README.
    partitions: int = Field(default=6, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    processing_guarantee: ProcessingGuarantee = "exactly_once"
    data_dir: Path = Path("var/stream-app")
    default_application_id: int = Field(default=1, gt=0, lt=2**31)
    #: A larger command is rejected with LIMIT_EXCEEDED.
    max_command_bytes: int = Field(default=256 * 1024, ge=1024)
    #: An update that would make the stored session larger is rejected.
    max_session_bytes: int = Field(default=256 * 1024, ge=1024)
    #: JSON file of per-application settings: {"<applicationId>": {...}}.
    application_settings_file: Path | None = None
    rocksdb: RocksDBSettings = RocksDBSettings()
    #: A task commits its transaction once it holds this many records ...
    batch_size: int = Field(default=1000, ge=1)
    #: ... or once its transaction is this old, whichever comes first.
    checkpoint_interval_s: float = Field(default=0.1, gt=0, le=60)
    #: How long the producers wait to fill a batch before sending it.
    producer_linger_ms: int = Field(default=5, ge=0, le=1000)
    #: On SIGTERM: commit, close and exit within this bound; past it the worker
    #: exits non-zero (its uncommitted work is redone by the next owner).
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    #: How long the group waits for a silent (crashed) worker before its
    #: partitions move; Kafka's own default is 45 s.
    session_timeout_s: float = Field(default=30.0, ge=6.0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @classmethod
    def from_env(cls) -> Settings:
        """Read the environment (the only place in the package that does)."""
        return cls()
