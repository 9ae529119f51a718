"""The one typed settings object.

Built once at the entry point (:func:`Settings.from_env` in the CLI) and
passed down; nothing else in the package reads ``os.environ``.

Environment: ``STREAM_APP_<FIELD>`` (nested with ``__``, e.g.
``STREAM_APP_TOPICS__CLOSED``), plus ``KAFKA_BOOTSTRAP_SERVERS``.

Mistakes are refused, each as one :class:`ConfigurationError` line naming
the variable: an unknown ``STREAM_APP_*`` variable (with the closest valid
name), a value of the wrong type or out of range, SASL without credentials,
TLS or settings files that do not exist. Choices (log level, guarantee,
security protocol, ...) ignore case.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal, get_args

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from stream_app import json
from stream_app.errors import ConfigurationError

ENV_PREFIX = "STREAM_APP_"

ProcessingGuarantee = Literal["exactly_once", "at_least_once"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]


def _case(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """``value`` spelled as the choice of the field's Literal it matches, ignoring case."""
    if isinstance(value, str) and info.field_name is not None:
        annotation = model.model_fields[info.field_name].annotation
        given = value.strip().lower()  # "INFO " or a CRLF env file's "SSL\r" too
        for kind in (annotation, *get_args(annotation)):  # Literal, or Literal | None
            for choice in get_args(kind):
                if isinstance(choice, str) and choice.lower() == given:
                    return choice
    return value


_TOPIC_NAME: Final = re.compile(r"[A-Za-z0-9._-]+")
#: What Kubernetes puts in a pod's environment for each Service of its
#: namespace ("service links"): a Service named stream-app-api gives
#: STREAM_APP_API_SERVICE_HOST, STREAM_APP_API_PORT=tcp://10.0.0.7:8080 and
#: STREAM_APP_API_PORT_8080_TCP_ADDR, among others.
_LINK_PORT: Final = re.compile(r"(.+)_PORT_\d+_(?:TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?")
_LINK_URL: Final = re.compile(r"(tcp|udp|sctp)://\S+")
#: The longest app id: "<app id>-first-sessions-changelog", the longest name
#: of an internal topic, must be a Kafka name too (249 characters).
APP_ID_MAX: Final = 224


class TopicNames(BaseModel):
    """Kafka topic names; every one is configurable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    commands: str = "sessions.commands"
    closed: str = "sessions.closed"
    returned: str = "sessions.returned"
    cancelled: str = "sessions.cancelled"
    reopened: str = "sessions.reopened"
    rejected: str = "sessions.rejected"
    application_settings: str = "sessions.application-settings"

    @field_validator("*")
    @classmethod
    def _kafka_name(cls, value: str) -> str:
        if not is_kafka_name(value):
            raise ValueError(
                f"{value!r} is not a Kafka topic name (1 to 249 of ASCII letters, "
                "digits, '.', '_' and '-')"
            )
        return value

    @model_validator(mode="after")
    def _inputs_apart(self) -> TopicNames:
        # The rejection topic as the command topic: every rejection read back
        # as a command and rejected again, for ever. (Outputs may share a
        # topic: each record says what it is.)
        for read in ("commands", "application_settings"):
            for field, name in self:
                if field != read and name == getattr(self, read):
                    raise ValueError(
                        f"{read} and {field} are both {name!r}: the worker reads {read}, "
                        "so no other may be written to it"
                    )
        return self


class KafkaSecurity(BaseModel):
    """Broker security: PLAINTEXT, TLS (``SSL``), SASL, or SASL over TLS.

    Checked together: a SASL protocol needs a mechanism, a user name and a
    password; TLS files must exist; a client key needs its certificate.
    A Strimzi ``KafkaUser`` secret works as it is: ``password`` for SCRAM,
    ``user.crt``/``user.key`` for TLS client authentication.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @field_validator("protocol", "sasl_mechanism", mode="before")
    @classmethod
    def _choice_case(cls, value: Any, info: ValidationInfo) -> Any:
        return _case(cls, value, info)

    @field_validator("ssl_cafile", "ssl_certfile", "ssl_keyfile", "sasl_mechanism", mode="before")
    @classmethod
    def _empty_unset(cls, value: Any) -> Any:
        # sasl_mechanism too: "" was refused as no mechanism, while an empty
        # username or password passed (a template that blanks them all).
        return _unset_if_empty(value)

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecurity:
        sasl = self.protocol.startswith("SASL")
        tls = self.protocol in ("SSL", "SASL_SSL")
        if sasl:
            missing = [
                name
                for name, value in (
                    ("SASL_MECHANISM", self.sasl_mechanism),
                    ("SASL_USERNAME", self.sasl_username),
                    ("SASL_PASSWORD", self.sasl_password),
                )
                if not value
            ]
            if missing:
                names = ", ".join(f"{ENV_PREFIX}SECURITY__{m}" for m in missing)
                raise ValueError(f"protocol {self.protocol} needs {names}")
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise ValueError(f"SASL settings are given but the protocol is {self.protocol}")
        files = (
            ("SSL_CAFILE", self.ssl_cafile),
            ("SSL_CERTFILE", self.ssl_certfile),
            ("SSL_KEYFILE", self.ssl_keyfile),
        )
        if not tls and any(path for _, path in files):
            raise ValueError(f"TLS files are given but the protocol is {self.protocol}")
        for name, path in files:
            problem = None if path is None else _not_a_readable_file(path)
            if problem is not None:
                raise ValueError(f"{ENV_PREFIX}SECURITY__{name}: {problem}")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError(f"{ENV_PREFIX}SECURITY__SSL_KEYFILE needs SSL_CERTFILE")
        if tls:
            self.ssl_context()  # files that are not PEM: here, not in a client's traceback
        return self

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of every Kafka client (None without TLS). Raises
        ValueError naming the file that does not load."""
        if self.protocol not in ("SSL", "SASL_SSL"):
            return None
        try:
            context = ssl.create_default_context(
                cafile=str(self.ssl_cafile) if self.ssl_cafile else None
            )
        except (ssl.SSLError, OSError) as exc:
            raise ValueError(
                f"{ENV_PREFIX}SECURITY__SSL_CAFILE: {self.ssl_cafile} holds no PEM "
                f"certificate that loads ({exc})"
            ) from None
        if self.ssl_certfile:
            try:
                context.load_cert_chain(
                    str(self.ssl_certfile),
                    str(self.ssl_keyfile) if self.ssl_keyfile else None,
                    # An encrypted key fails here; without a password OpenSSL
                    # asked for one on the terminal, and every command waited.
                    password=lambda: b"",
                )
            except (ssl.SSLError, OSError) as exc:
                # Without a key file the key must be in the certificate's file:
                # a certificate alone read as a key that does not load.
                where = (
                    ""
                    if self.ssl_keyfile
                    else f"; no {ENV_PREFIX}SECURITY__SSL_KEYFILE is set, so the key must be "
                    "in that file: set it to the key's file"
                )
                raise ValueError(
                    f"{ENV_PREFIX}SECURITY__SSL_CERTFILE and SSL_KEYFILE: {self.ssl_certfile} "
                    "and its key do not load as a PEM certificate with an unencrypted "
                    f"private key ({exc}){where}"
                ) from None
        return context


class RocksDBSettings(BaseModel):
    """Memory bounds of the worker's RocksDB databases (one per store and partition).

    The block cache and the write-buffer budget are shared by all of a
    worker's databases, so its RocksDB memory is about ``block_cache_mb +
    write_buffer_mb x max_write_buffers`` however many partitions it owns.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Upper bounds that RocksDB's own integers take (1 TiB, int32): past them
    # the stores failed to open with an OverflowError, after Kafka was reached.
    block_cache_mb: int = Field(default=32, ge=1, le=1024 * 1024)
    write_buffer_mb: int = Field(default=16, ge=1, le=1024 * 1024)
    max_write_buffers: int = Field(default=2, ge=1, le=2**31 - 1)
    max_open_files: int = Field(default=256, ge=16, le=2**31 - 1)

    @model_validator(mode="after")
    def _budget(self) -> RocksDBSettings:
        if self.write_buffer_mb * self.max_write_buffers > 1024 * 1024:
            raise ValueError(
                "write_buffer_mb x max_write_buffers, the write-buffer budget, may be at "
                "most 1048576 MB (1 TiB)"
            )
        return self


#: Where the stores live when STREAM_APP_DATA_DIR is unset (or empty).
DEFAULT_DATA_DIR: Final = Path("var/stream-app")


class Settings(BaseSettings):
    """Everything the worker, the demo and the tools need to know."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",  # unknown variables are refused by from_env, with a suggestion
        populate_by_name=True,  # Settings(bootstrap_servers=...) in code and tests
    )

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "STREAM_APP_BOOTSTRAP_SERVERS"),
    )
    security: KafkaSecurity = KafkaSecurity()
    #: The consumer group, the prefix of the internal topics and transactional
    #: ids, and the state directory's name: a Kafka name short enough for
    #: "<app id>-first-sessions-changelog".
    app_id: str = "stream-app"
    topics: TopicNames = TopicNames()
    #: Partitions of the command topic when the worker creates it. When the
    #: topic exists, its count is used instead; internal topics always get the
    #: command topic's count. Changing it re-maps keys: see README.
    #: (Bounded by CreateTopics' int32 and int16: past them, a traceback.)
    partitions: int = Field(default=6, ge=1, le=2**31 - 1)
    replication_factor: int = Field(default=1, ge=1, le=2**15 - 1)
    processing_guarantee: ProcessingGuarantee = "exactly_once"
    data_dir: Path = DEFAULT_DATA_DIR
    default_application_id: int = Field(default=1, gt=0, lt=2**31)
    #: A larger command is rejected with LIMIT_EXCEEDED.
    max_command_bytes: int = Field(default=256 * 1024, ge=1024)
    #: An update that would make the stored session larger is rejected.
    max_session_bytes: int = Field(default=256 * 1024, ge=1024)
    #: JSON file of per-application settings: {"<applicationId>": {...}}.
    application_settings_file: Path | None = None
    rocksdb: RocksDBSettings = RocksDBSettings()
    #: The tasks commit their transactions (in one round) once one of them
    #: holds this many records (also the most records one poll returns) ...
    batch_size: int = Field(default=5000, ge=1)
    #: ... or once one's transaction is this old, whichever comes first.
    checkpoint_interval_s: float = Field(default=0.1, gt=0, le=60, allow_inf_nan=False)
    #: How often the records the worker has processed are deleted from its
    #: re-key and by-profile topics (Kafka Streams' repartition.purge.interval.ms).
    purge_interval_s: float = Field(default=30.0, gt=0, le=86_400, allow_inf_nan=False)
    #: How long the local store of a partition this worker no longer owns is
    #: kept before it is deleted (Kafka Streams' state.cleanup.delay.ms: 10 min).
    #: Kept, a partition coming back restores only what it missed.
    state_cleanup_delay_s: float = Field(default=600.0, ge=0, le=2_592_000, allow_inf_nan=False)
    #: How long the client's producers (``stream-app send``, the Python client)
    #: wait to fill a batch. The worker's send each transaction's batches whole
    #: at its commit (``checkpoint``), so no linger applies to them.
    producer_linger_ms: int = Field(default=5, ge=0, le=1000)
    #: On SIGTERM: commit, close and exit within this bound; past it the worker
    #: exits non-zero (its uncommitted work is redone by the next owner). At
    #: least 5 s: the last commits, the stores' flush, and 1 s to leave the group.
    #: (At most a day: a timer of 1e10 s failed, leaving the stop unbounded.)
    shutdown_timeout_s: float = Field(default=10.0, ge=5.0, le=86_400, allow_inf_nan=False)
    #: How long the group waits for a silent (crashed) worker before its
    #: partitions move; Kafka's own default is 45 s. Brokers take 6 s to 30 min
    #: by default (group.min/max.session.timeout.ms).
    session_timeout_s: float = Field(default=30.0, ge=6.0, le=1800.0, allow_inf_nan=False)
    log_level: LogLevel = "INFO"
    #: ``json``: one JSON object per log line.
    log_format: LogFormat = "text"
    #: The worker's HTTP server: /livez, /readyz, /metrics.
    http_host: str = "0.0.0.0"  # noqa: S104 - a pod's probes and scrapes come from outside
    #: 0 picks a free port (tests run several workers on one machine).
    http_port: int = Field(default=8080, ge=0, le=65535)
    #: Host name other workers use to reach this one's HTTP server (session
    #: queries are forwarded to the owner of the key's partition, as Kafka
    #: Streams' application.server); default: this machine's host name.
    advertised_host: str | None = None
    #: Static group membership (Kafka's group.instance.id), e.g. the pod name:
    #: a restarted worker gets its partitions back without a rebalance.
    group_instance_id: str | None = None

    @field_validator("log_level", "log_format", "processing_guarantee", mode="before")
    @classmethod
    def _choice_case(cls, value: Any, info: ValidationInfo) -> Any:
        return _case(cls, value, info)

    @field_validator("bootstrap_servers")
    @classmethod
    def _bootstrap_list(cls, value: str) -> str:
        # aiokafka reads it only when the first client starts, and a bad port
        # ended there in a traceback.
        # Empty entries are skipped, as aiokafka's bootstrap skips what it cannot
        # reach ("h:9092," from a template); at least one must be there.
        entries = [entry.strip() for entry in value.split(",") if entry.strip()]
        for entry in entries or [""]:
            problem = _address_problem(entry)
            if problem is not None:
                raise ValueError(f"expected host:port, comma-separated: {problem}")
        # Without the empty entries: aiokafka would try to reach "" and log an ERROR.
        return ",".join(entries)

    @field_validator("app_id")
    @classmethod
    def _app_id(cls, value: str) -> str:
        if not is_kafka_name(value, APP_ID_MAX):
            raise ValueError(
                f"{value!r} is not an app id (1 to {APP_ID_MAX} of ASCII letters, digits, "
                "'.', '_' and '-'): it names the group, internal topics and state directory"
            )
        return value

    @model_validator(mode="after")
    def _topics_apart_from_the_internal_ones(self) -> Settings:
        from stream_app.pipeline.topics import internal_topics  # it names them from settings

        internal = set(internal_topics(self))
        for field, name in self.topics:
            if name in internal:
                # Read back by the worker: a rejection on the re-key topic is
                # rejected again, to it, for ever.
                raise ValueError(
                    f"topics.{field} is {name!r}, a topic the worker names itself for "
                    f"app id {self.app_id!r} and reads"
                )
        return self

    @field_validator("application_settings_file", "group_instance_id", mode="before")
    @classmethod
    def _empty_path(cls, value: Any) -> Any:
        return _unset_if_empty(value)

    @field_validator("group_instance_id")
    @classmethod
    def _instance_id(cls, value: str | None) -> str | None:
        # The broker refuses any other at the join, as Kafka's Java client does
        # before it: the worker retried the join for ever.
        if value is not None and not is_kafka_name(value):
            raise ValueError(
                f"{value!r} is not a group instance id (1 to 249 of ASCII letters, digits, "
                "'.', '_' and '-')"
            )
        return value

    @field_validator("data_dir", mode="before")
    @classmethod
    def _empty_data_dir(cls, value: Any) -> Any:
        # "" was the working directory: in a container, not the volume.
        if value == "":
            return DEFAULT_DATA_DIR
        # "/var/lib/stream-app " or a CRLF env file's "...\r" was taken as
        # given: the stores were kept beside the volume, lost with the container.
        if isinstance(value, str) and (value != value.strip() or not value.isprintable()):
            raise ValueError(
                "begins or ends with white space, or holds a control character (a line "
                "of an env file written on Windows?): the stores would be kept in "
                "another directory than the one meant"
            )
        return value

    @field_validator("http_host", "advertised_host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        # "": every interface for http_host (aiohttp's host=""), this machine's
        # host name for advertised_host, as unset.
        if not value:
            return value
        if value.startswith("[") and value.endswith("]"):
            value = value[1:-1]  # an IPv6 address as URLs write it
        problem = _host_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("application_settings_file")
    @classmethod
    def _settings_file_exists(cls, value: Path | None) -> Path | None:
        problem = None if value is None else _not_a_readable_file(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @classmethod
    def from_env(cls) -> Settings:
        """Read the environment (the only place in the package that does).

        Raises :class:`ConfigurationError`, one line, for any mistake.
        """
        env = os.environ
        given = {name.upper(): value for name, value in env.items()}
        _refuse_undecodable(env)
        _refuse_two_spellings(env)
        _refuse_a_group_and_its_field(env)
        _refuse_other_clients_names(given)
        unknown = sorted(
            name
            for name in set(_our_variables(env)) - set(known_variables()) - NOT_SETTINGS
            if not _service_link(name, given[name], given)
        )
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, known_variables(), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigurationError(f"unknown setting {name}{hint}")
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigurationError(_one_line(exc, env)) from None
        except SettingsError as exc:  # a nested setting's value that is not JSON
            field = re.search(r'field "(\w+)"', str(exc))
            name = _env_name((field.group(1),)) if field else "a STREAM_APP_ setting"
            raise ConfigurationError(
                f"{name}{_shown(name, env)}: not a JSON object; or set its fields one by "
                f"one, as {name}__<FIELD>"
            ) from None


def _refuse_undecodable(env: Mapping[str, str]) -> None:
    """A setting whose bytes are not UTF-8 (``\\xff`` in a data directory's
    name, a SASL user name in Latin-1): Python hands it over with lone
    surrogates, which no Kafka request, RocksDB path or JSON line can carry,
    so it failed later, with a traceback (``stream-app config``) or on the
    first connection."""
    for name, value in sorted(env.items()):
        upper = name.upper()
        if not (upper.startswith(ENV_PREFIX) or upper == "KAFKA_BOOTSTRAP_SERVERS"):
            continue
        raw = value.encode(errors="surrogateescape")
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            shown = raw[:80].decode(errors="backslashreplace")
            shown = "" if _may_hold_a_secret(upper) else f"={shown}"
            raise ConfigurationError(
                f"{name}{shown}: not UTF-8 (byte {raw[exc.start]:#04x} at offset "
                f"{exc.start}); settings are read as UTF-8 text"
            ) from None


def _refuse_a_group_and_its_field(env: Mapping[str, str]) -> None:
    """A group set whole as JSON (``STREAM_APP_TOPICS``) and one of its fields
    by its own variable (``STREAM_APP_TOPICS__COMMANDS``), to another setting:
    the field's variable won, whatever the order, so an overlay's JSON lost
    silently to the manifests' per-field variables. Fields set in one place
    only merge, as before; two spellings of one setting (``PLAINTEXT`` and
    ``plaintext``, ``null`` and ``""``, ``64`` and ``"64 "``) are one."""
    given = {name.upper(): (name, value) for name, value in env.items()}
    for field_name, info in Settings.model_fields.items():
        model = info.annotation
        group = f"{ENV_PREFIX}{field_name.upper()}"
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or group not in given:
            continue
        try:
            whole = json.loads(given[group][1])
        except json.JSONDecodeError:
            continue  # refused by the settings themselves, as not a JSON object
        if not isinstance(whole, dict):
            continue
        prefix = f"{group}__"
        # Keys in any case, as the settings read them.
        whole = {str(key).lower(): value for key, value in whole.items()}
        merged = {
            **whole,
            **{
                name.removeprefix(prefix).lower(): value
                for name, (_, value) in given.items()
                if name.startswith(prefix)
            },
        }
        for key, value in whole.items():
            field = given.get(f"{prefix}{key.upper()}")
            if field is None or _same_setting(model, merged, key, value, field[1]):
                continue
            as_text = value if isinstance(value, str) else json.dumps(value).decode()
            shown = (
                ""
                if "PASSWORD" in key.upper()
                else f" ({_shown_value(as_text)} and {_shown_value(field[1])})"
            )
            raise ConfigurationError(
                f"{given[group][0]} and {field[0]} both set {field_name}.{key}, "
                f"to different values{shown}: keep one"
            )


def _same_setting(
    model: type[BaseModel], merged: dict[str, Any], key: str, one: Any, other: str
) -> bool:
    """Whether the group ``model``'s field ``key`` reads the same with ``one``
    (from the JSON) and ``other`` (its own variable). Each is read beside the
    rest of ``merged``, or alone when the rest does not validate (another
    field's mistake, which the settings then name). A variable whose value
    does not validate either way is left to the settings to name; a JSON
    value that does not, beside one that does, is another setting."""
    second = _field_read(model, merged, key, other)
    if second is None:
        return True
    first = _field_read(model, merged, key, one)
    return first is not None and first[0] == second[0]


def _field_read(
    model: type[BaseModel], merged: dict[str, Any], key: str, value: Any
) -> tuple[Any] | None:
    """The group ``model``'s field ``key`` as ``value`` sets it (in a
    1-tuple: it may read as None), or None when it does not validate."""
    for candidate in ({**merged, key: value}, {key: value}):
        try:
            return (getattr(model.model_validate(candidate), key),)
        except (ValidationError, TypeError, ValueError):
            continue
    return None


#: ``STREAM_APP_`` variables that are not the worker's settings: the test
#: suite's (README: a broker of your own for the tests).
NOT_SETTINGS: Final = frozenset({f"{ENV_PREFIX}TEST_BOOTSTRAP_SERVERS"})
#: Settings other Kafka clients' images read (Confluent's, Quix's), which the
#: worker does not: with its own unset, it would connect without them.
_OTHER_CLIENTS_SECURITY: Final = re.compile(r"KAFKA_(SECURITY_PROTOCOL|SASL_\w+|SSL_\w+)")


def _refuse_two_spellings(env: Mapping[str, str]) -> None:
    """Two variables that set one setting to different values: which one wins
    depended on the environment's order, or on a rule no one reads."""
    seen: dict[str, tuple[str, str]] = {}
    for name, value in env.items():
        upper = name.upper()
        if not (upper.startswith(ENV_PREFIX) or upper == "KAFKA_BOOTSTRAP_SERVERS"):
            continue
        setting = f"{ENV_PREFIX}BOOTSTRAP_SERVERS" if upper == "KAFKA_BOOTSTRAP_SERVERS" else upper
        if setting in seen and seen[setting][1] != value:
            first = seen[setting][0]
            shown = (
                ""
                if _may_hold_a_secret(setting)
                else (f" ({_shown_value(seen[setting][1])} and {_shown_value(value)})")
            )
            raise ConfigurationError(
                f"{first} and {name} both set {setting.removeprefix(ENV_PREFIX).lower()}, "
                f"to different values{shown}: keep one"
            )
        seen[setting] = (name, value)


def _refuse_other_clients_names(given: Mapping[str, str]) -> None:
    """``KAFKA_SECURITY_PROTOCOL`` and the like with none of the worker's own
    security settings: the worker would connect in plain text, and retry."""
    if any(name.startswith(f"{ENV_PREFIX}SECURITY") for name in given):
        return  # set both ways on purpose (an image's environment shared)
    other = sorted(
        name
        for name, value in given.items()
        if _OTHER_CLIENTS_SECURITY.fullmatch(name) and not _service_link(name, value, given)
    )
    if other:
        raise ConfigurationError(
            f"{other[0]} is another client's setting; the worker reads its security from "
            f"{ENV_PREFIX}SECURITY__PROTOCOL, {ENV_PREFIX}SECURITY__SASL_MECHANISM and the "
            f"others of README's Configuration (set {ENV_PREFIX}SECURITY__PROTOCOL, to "
            "PLAINTEXT too, to say which it uses)"
        )


def is_kafka_name(value: str, longest: int = 249) -> bool:
    """Whether Kafka takes ``value`` as a topic name (or as a part of one of
    ``longest`` characters at most)."""
    return len(value) <= longest and bool(_TOPIC_NAME.fullmatch(value)) and value not in {".", ".."}


def _unset_if_empty(value: Any) -> Any:
    """An optional variable set to "" (a template's empty value) as unset: a
    path was read as ".", and refused as "no such file: ."."""
    return None if value == "" else value


def _not_a_readable_file(path: Path) -> str | None:
    """Why ``path`` is no file to read, or None. ``Path.is_file`` raises what
    is not a missing file (a directory the process may not enter, a name too
    long) on Python 3.11: every command ended in a traceback, exit 1, rather
    than this one line and exit 2."""
    try:
        if path.is_file():
            return None
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return f"no such file: {path}"


def _host_problem(host: str) -> str | None:
    """Why ``host`` is neither an IP address nor a host name, or None. (A name
    that does not resolve is found when it is used.)"""
    if _is_ip(host):
        return None
    if "$(" in host:
        # Kubernetes expands $(VAR) only for a VAR defined earlier in the env
        # list; an overlay's patch moves the entries it patches to its front.
        return (
            f"{host!r} holds a $(VAR) that was not expanded: define the variable it "
            "names before this one in the container's env"
        )
    if not host or any(c.isascii() and not (c.isalnum() or c in "-._") for c in host):
        return f"{host!r} is not a host name or an IP address"
    try:
        host.encode("idna")
    except UnicodeError as exc:
        return f"{host!r} is not a host name ({exc})"
    return None


def _address_problem(entry: str) -> str | None:
    """What is wrong with one bootstrap address, read as aiokafka reads it
    (``host``, ``host:port``, ``[ipv6]``, ``[ipv6]:port`` or a bare IPv6
    literal), or None."""
    if not entry:
        return "no address"
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return f"{entry!r} is not [ipv6] or [ipv6]:port"
        port = rest[1:] if rest else None
    elif ":" not in entry:
        host, port = entry, None
    else:
        try:
            socket.inet_pton(socket.AF_INET6, entry)
        except OSError:
            host, _, port = entry.rpartition(":")
        else:
            return None
    if not host:
        return f"{entry!r} has no host"
    # "kafka..svc" (an empty label) ended in a traceback from the resolver;
    # "PLAINTEXT://kafka:9092" (a listener) and "bad host" were retried for ever.
    problem = _host_problem(host)
    if problem is not None:
        return problem
    if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        return f"{entry!r} has no port in 1..65535"
    return None


def _service_link(name: str, value: str, given: Mapping[str, str]) -> bool:
    """Whether ``name=value`` is one of Kubernetes' service-link variables, as
    Kubernetes writes them for a Service ``X`` with a cluster IP: always
    ``X_SERVICE_HOST`` (the IP) beside the others (a port number,
    ``tcp://ip:port``, a protocol), so a lone ``STREAM_APP_SERVICE_PORT=9090``
    is a setting guessed, refused. Links are read past, as every other
    variable outside the settings is. (``enableServiceLinks: false`` in the
    pod spec avoids them.)"""
    if name.endswith("_SERVICE_HOST"):
        return _is_ip(value)
    service = re.fullmatch(r"(.+)_SERVICE_PORT(?:_\w+)?", name)
    link = _LINK_PORT.fullmatch(name)
    if service is not None:
        prefix, fits = service.group(1), value.isdigit()
    elif link is not None:
        suffix = link.group(2)
        prefix = link.group(1)
        if suffix == "_PROTO":
            fits = value in ("tcp", "udp", "sctp")
        elif suffix == "_PORT":
            fits = value.isdigit()
        elif suffix == "_ADDR":
            fits = _is_ip(value)
        else:
            fits = bool(_LINK_URL.fullmatch(value))
    elif name.endswith("_PORT"):
        prefix, fits = name.removesuffix("_PORT"), bool(_LINK_URL.fullmatch(value))
    else:
        return False
    return fits and _is_ip(given.get(f"{prefix}_SERVICE_HOST", ""))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _our_variables(env: Mapping[str, str]) -> Iterator[str]:
    for name in env:
        if name.upper().startswith(ENV_PREFIX):
            yield name.upper()


def known_variables() -> list[str]:
    """Every ``STREAM_APP_*`` name the settings understand."""
    names = [f"{ENV_PREFIX}BOOTSTRAP_SERVERS"]
    for field_name, info in Settings.model_fields.items():
        if field_name == "bootstrap_servers":
            continue
        top = f"{ENV_PREFIX}{field_name.upper()}"
        names.append(top)
        model = info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):
            names += [f"{top}__{sub.upper()}" for sub in model.model_fields]
    return names


def _env_name(loc: tuple[int | str, ...]) -> str:
    if loc and loc[0] == "bootstrap_servers":
        return "KAFKA_BOOTSTRAP_SERVERS"
    if loc and loc[0] in ("KAFKA_BOOTSTRAP_SERVERS", f"{ENV_PREFIX}BOOTSTRAP_SERVERS"):
        return str(loc[0])  # read from the environment: named by the alias that held it
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def _one_line(exc: ValidationError, env: Mapping[str, str]) -> str:
    """The first problem, as ``NAME=value: message``."""
    error = exc.errors()[0]
    loc = tuple(error.get("loc", ()))
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if not loc or ENV_PREFIX in message:  # a check that names its variables itself
        return message + more
    name = _env_name(loc)
    other = f"{ENV_PREFIX}BOOTSTRAP_SERVERS"  # the alias that also sets it
    if name == "KAFKA_BOOTSTRAP_SERVERS" and not _shown(name, env) and _shown(other, env):
        name = other
    link = ""
    given = {k.upper(): v for k, v in env.items()}.get(name, "")
    if name.startswith(ENV_PREFIX) and name.endswith("_PORT") and _LINK_URL.fullmatch(given):
        link = (
            f" ({given.partition(':')[0]}://... is what Kubernetes sets for a Service named "
            f"{name.removesuffix('_PORT').lower().replace('_', '-')}: set enableServiceLinks: "
            "false in the pod spec)"
        )
    return f"{name}{_shown(name, env)}: {message}{more}{link}"


def _shown(name: str, env: Mapping[str, str]) -> str:
    """``=value`` of the variable ``name`` for an error line (its first 80
    characters), or nothing when it is not set or may hold a secret: a SASL
    password, alone or inside the whole of STREAM_APP_SECURITY given as JSON."""
    given = {k.upper(): v for k, v in env.items()}.get(name)
    if given is None or _may_hold_a_secret(name):
        return ""
    return f"={_shown_value(given)}"


def _may_hold_a_secret(name: str) -> bool:
    """Whether the variable ``name`` may hold a secret: a SASL password, alone
    or inside the whole of STREAM_APP_SECURITY given as JSON."""
    return "PASSWORD" in name or name == f"{ENV_PREFIX}SECURITY"


def _shown_value(value: str) -> str:
    """``value`` for an error line: its first 80 characters, quoted when the
    eye would miss something in it (a trailing space, a CR from an env file
    written on Windows, which also broke the line in two)."""
    cut = value[:80]
    if cut != cut.strip() or not cut.isprintable():
        return repr(cut)
    return cut
