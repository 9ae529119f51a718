from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydantic import ValidationError
from yarl import URL

from stream_app.errors import ConfigurationError
from stream_app.pipeline.topics import topic_specs
from stream_app.settings import (
    APP_ID_MAX,
    RocksDBSettings,
    Settings,
    TopicNames,
    known_variables,
)
from stream_app.worker import advertised_url


def test_defaults_are_the_documented_topics_and_exactly_once() -> None:
    settings = Settings()
    assert settings.topics.commands == "sessions.commands"
    assert settings.topics.rejected == "sessions.rejected"
    assert settings.processing_guarantee == "exactly_once"
    # Faust would reserve 2 GiB of block cache per partition database.
    assert settings.rocksdb.block_cache_mb * 1024 * 1024 < 2 * 1024**3


def test_environment_overrides_with_prefix_and_bootstrap_alias(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "10.0.0.1:9092")
    monkeypatch.setenv("STREAM_APP_TOPICS__CLOSED", "analytics.closed")
    monkeypatch.setenv("STREAM_APP_PROCESSING_GUARANTEE", "at_least_once")
    monkeypatch.setenv("STREAM_APP_SECURITY__PROTOCOL", "sasl_plaintext")
    monkeypatch.setenv("STREAM_APP_SECURITY__SASL_MECHANISM", "scram-sha-512")
    monkeypatch.setenv("STREAM_APP_SECURITY__SASL_USERNAME", "worker")
    monkeypatch.setenv("STREAM_APP_SECURITY__SASL_PASSWORD", "hunter2")
    settings = Settings.from_env()
    assert settings.bootstrap_servers == "10.0.0.1:9092"
    assert settings.topics.closed == "analytics.closed"
    assert settings.topics.commands == "sessions.commands"
    assert settings.processing_guarantee == "at_least_once"
    assert settings.security.sasl_password is not None
    assert "hunter2" not in repr(settings)


def test_invalid_guarantee_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_APP_PROCESSING_GUARANTEE", "maybe_once")
    with pytest.raises(ConfigurationError, match="STREAM_APP_PROCESSING_GUARANTEE=maybe_once"):
        Settings.from_env()


def test_kubernetes_service_links_are_read_past_not_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Service named stream-app-api (or stream-app) in the pod's namespace
    puts these in its environment unless enableServiceLinks is false; they
    made every pod exit 2 as "unknown setting" at its next restart."""
    links = {
        "STREAM_APP_API_SERVICE_HOST": "10.0.0.7",
        "STREAM_APP_API_SERVICE_PORT": "8080",
        "STREAM_APP_API_SERVICE_PORT_HTTP": "8080",
        "STREAM_APP_API_PORT": "tcp://10.0.0.7:8080",
        "STREAM_APP_API_PORT_8080_TCP": "tcp://10.0.0.7:8080",
        "STREAM_APP_API_PORT_8080_TCP_PROTO": "tcp",
        "STREAM_APP_API_PORT_8080_TCP_PORT": "8080",
        "STREAM_APP_API_PORT_8080_TCP_ADDR": "10.0.0.7",
        "STREAM_APP_SERVICE_HOST": "10.0.0.8",
        "STREAM_APP_PORT": "tcp://10.0.0.8:8080",
    }
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    assert Settings.from_env().http_port == 8080
    # A misspelt setting is still refused, also one named like a service link
    # but with a value Kubernetes would not write there.
    for name, value in [
        ("STREAM_APP_HTP_PORT", "8081"),
        ("STREAM_APP_SERVICE_PORT", "http"),
        ("STREAM_APP_HTTP_SERVICE_HOST", "worker-0.example"),
        ("STREAM_APP_API_PORT_8080_TCP_PROTO", "http"),
        # Values Kubernetes writes, but no Service's host beside them: a guess.
        ("STREAM_APP_HTTP_SERVICE_PORT", "9090"),
        ("STREAM_APP_WEB_PORT_9090_TCP_PORT", "9090"),
    ]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigurationError, match=f"unknown setting {name}"):
            Settings.from_env()
        monkeypatch.delenv(name)


def test_a_service_link_over_a_setting_says_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Service named stream-app-http sets STREAM_APP_HTTP_PORT itself."""
    monkeypatch.setenv("STREAM_APP_HTTP_PORT", "tcp://10.0.0.7:8080")
    with pytest.raises(ConfigurationError, match="enableServiceLinks: false") as raised:
        Settings.from_env()
    assert "a Service named stream-app-http" in str(raised.value)
    # Not said of a URL given where Kubernetes writes none.
    monkeypatch.delenv("STREAM_APP_HTTP_PORT")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "tcp://kafka:9092")
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env()
    assert "Service" not in str(raised.value)


def test_the_readme_lists_every_setting() -> None:
    """`stream-app --help` promises it: every variable is in the README's table,
    by its whole name or, in the row of its group, as ``__FIELD``."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    known = known_variables()
    # A group (STREAM_APP_TOPICS) is listed by its fields.
    names = [n for n in known if not any(m.startswith(f"{n}__") for m in known)]
    assert "STREAM_APP_ROCKSDB__MAX_OPEN_FILES" in names
    assert "STREAM_APP_BOOTSTRAP_SERVERS" in names
    missing = []
    for name in names:
        group, _, field = name.rpartition("__")
        listed = any(
            f"`{name}`" in row or (group and f"`{group}__" in row and f"`__{field}`" in row)
            for row in rows
        )
        if not listed:
            missing.append(name)
    assert missing == []


def test_the_bootstrap_list_loses_its_empty_entries() -> None:
    """ "h:9092," from a template is accepted, as aiokafka accepted it, but
    passed on as it was aiokafka tried to reach "" and logged an ERROR."""
    assert Settings(bootstrap_servers="h:9092, ,k:9093,").bootstrap_servers == "h:9092,k:9093"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STREAM_APP_HTTP_HOST", "a..b"),  # IDNA refuses it: aiohttp raised UnicodeError
        ("STREAM_APP_HTTP_HOST", "x" * 64 + ".example"),
        ("STREAM_APP_ADVERTISED_HOST", "stream-app-0.stream-app:8080"),  # a port
        ("STREAM_APP_ADVERTISED_HOST", "http://stream-app-0"),
        ("STREAM_APP_ADVERTISED_HOST", "two words"),
        ("STREAM_APP_ADVERTISED_HOST", "cart$(x)"),
        # The resolver raised UnicodeError: a traceback from every command.
        ("KAFKA_BOOTSTRAP_SERVERS", "kafka..svc:9092"),
        ("KAFKA_BOOTSTRAP_SERVERS", "k:9092," + "x" * 64 + ".example:9092"),
        # Retried for ever as unreachable.
        ("KAFKA_BOOTSTRAP_SERVERS", "PLAINTEXT://kafka:9092"),
        ("KAFKA_BOOTSTRAP_SERVERS", "bad host:9092"),
        # Past CreateTopics' int32 and int16, RocksDB's integers, a timer's range.
        ("STREAM_APP_PARTITIONS", str(2**31)),
        ("STREAM_APP_REPLICATION_FACTOR", "32768"),
        ("STREAM_APP_ROCKSDB__BLOCK_CACHE_MB", "100000000000000"),
        ("STREAM_APP_ROCKSDB__WRITE_BUFFER_MB", "100000000000000"),
        ("STREAM_APP_ROCKSDB__MAX_WRITE_BUFFERS", str(2**31)),
        ("STREAM_APP_ROCKSDB__MAX_OPEN_FILES", str(2**31)),
        ("STREAM_APP_SHUTDOWN_TIMEOUT_S", "1e10"),
        ("STREAM_APP_PURGE_INTERVAL_S", "1e300"),
    ],
)
def test_a_host_that_is_no_host_name_or_address_is_one_line(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Each was accepted: the HTTP server, the Kafka client or the stores then
    failed with a traceback (after Kafka was reached, for most), every query
    forwarded to the worker was a 500, or Kafka was retried for ever."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=f"^{name}="):
        Settings.from_env()


@pytest.mark.parametrize(
    ("advertised", "url"),
    [
        ("stream-app-0.stream-app", "http://stream-app-0.stream-app:8080"),
        ("10.1.2.3", "http://10.1.2.3:8080"),
        ("fd00::1", "http://[fd00::1]:8080"),
        ("[fd00::1]", "http://[fd00::1]:8080"),
    ],
)
def test_the_advertised_url_brackets_an_ipv6_address(advertised: str, url: str) -> None:
    assert advertised_url(Settings(advertised_host=advertised), 8080) == url
    assert URL(url).port == 8080


def test_a_kubernetes_variable_left_unexpanded_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """An overlay patching STREAM_APP_ADVERTISED_HOST moved it before the
    STREAM_APP_GROUP_INSTANCE_ID it names, which Kubernetes then left as it
    was: every pod advertised the same URL, and believed it owned every
    partition of the routing map."""
    monkeypatch.setenv("STREAM_APP_ADVERTISED_HOST", "$(STREAM_APP_GROUP_INSTANCE_ID).stream-app")
    with pytest.raises(ConfigurationError, match=r"\$\(VAR\) that was not expanded"):
        Settings.from_env()
    monkeypatch.setenv("STREAM_APP_ADVERTISED_HOST", "bücher.example")  # IDNA: a name
    assert Settings.from_env().advertised_host == "bücher.example"


def test_an_empty_host_is_every_interface_or_this_machine() -> None:
    settings = Settings(http_host="", advertised_host="")
    assert settings.http_host == ""
    assert advertised_url(settings, 1) == f"http://{socket.gethostname()}:1"


@pytest.mark.parametrize(
    ("variables", "said"),
    [
        # every rejection read back as a command and rejected again, for ever
        ({"STREAM_APP_TOPICS__REJECTED": "sessions.commands"}, "commands and rejected are both"),
        # read back by stage 1 and rejected again, to it, for ever
        ({"STREAM_APP_TOPICS__REJECTED": "stream-app-sessions.rekeyed"}, "the worker names"),
        (
            {"STREAM_APP_APP_ID": "shop", "STREAM_APP_TOPICS__CLOSED": "shop-sessions-changelog"},
            "a topic the worker names itself for app id 'shop'",
        ),
        ({"STREAM_APP_TOPICS": '{"closed": "x", "application_settings": "x"}'}, "are both 'x'"),
        ({"STREAM_APP_TOPICS__CLOSED": ""}, "is not a Kafka topic name"),
        ({"STREAM_APP_TOPICS__CLOSED": "sessions closed"}, "is not a Kafka topic name"),
        ({"STREAM_APP_TOPICS__CLOSED": ".."}, "is not a Kafka topic name"),
        ({"STREAM_APP_TOPICS__CLOSED": "x" * 250}, "is not a Kafka topic name"),
        ({"STREAM_APP_APP_ID": "my app"}, "is not an app id"),
        ({"STREAM_APP_APP_ID": ".."}, "is not an app id"),
        ({"STREAM_APP_APP_ID": "a" * 225}, "is not an app id"),
    ],
)
def test_topic_names_are_kafka_names_one_topic_each(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], said: str
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError, match=said):
        Settings.from_env()


def test_outputs_may_share_a_topic_and_the_longest_app_id_names_kafka_topics() -> None:
    """Each output record says what it is: one topic for all four worked, and
    refusing it would stop such a deployment at its upgrade."""
    shared = TopicNames(closed="s.events", returned="s.events", cancelled="s.events")
    assert Settings(topics=shared).topics.returned == "s.events"
    longest = Settings(app_id="a" * APP_ID_MAX)
    assert max(len(spec.name) for spec in topic_specs(longest, 6)) == 249


def test_a_topic_name_kafka_takes_is_taken() -> None:
    topics = TopicNames(closed="Analytics_closed-v2." + "x" * 229)
    assert len(Settings(topics=topics).topics.closed) == 249


@pytest.mark.parametrize(
    "name",
    [
        "STREAM_APP_APPLICATION_SETTINGS_FILE",
        "STREAM_APP_SECURITY__SSL_CAFILE",
        "STREAM_APP_SECURITY__SSL_CERTFILE",
        "STREAM_APP_SECURITY__SSL_KEYFILE",
        "STREAM_APP_SECURITY__SASL_MECHANISM",
    ],
)
def test_an_empty_path_variable_is_unset(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """As an empty STREAM_APP_ADVERTISED_HOST is: it was the path ".", refused
    as "no such file: ." (or a TLS file without TLS)."""
    monkeypatch.setenv(name, "")
    settings = Settings.from_env()
    assert settings.application_settings_file is None
    assert settings.security.ssl_cafile is None
    assert settings.security.ssl_certfile is None
    assert settings.security.ssl_keyfile is None
    assert settings.security.sasl_mechanism is None


def test_an_empty_data_dir_is_the_default_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """It was the working directory: in a container, not the volume, so
    every restart restored every store from its changelog."""
    monkeypatch.setenv("STREAM_APP_DATA_DIR", "")
    assert Settings.from_env().data_dir == Path("var/stream-app")


@pytest.mark.parametrize("value", [" ", "/var/lib/stream-app ", "/var/lib/stream-app\r", "\tdata"])
def test_a_data_dir_with_white_space_around_it_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """It was taken as given, as no other setting is: the stores were kept in
    a directory beside the mounted volume, and a recreated container restored
    every store from its changelog."""
    monkeypatch.setenv("STREAM_APP_DATA_DIR", value)
    with pytest.raises(ConfigurationError, match=r"STREAM_APP_DATA_DIR=.*white space"):
        Settings.from_env()


def test_the_write_buffer_budget_is_bounded_as_a_product() -> None:
    """Each within its bound, their product overflowed RocksDB's integer in
    the engine's constructor: a traceback, after Kafka was reached."""
    with pytest.raises(ValidationError, match="write-buffer budget"):
        RocksDBSettings(write_buffer_mb=1024 * 1024, max_write_buffers=2**31 - 1)
    RocksDBSettings(write_buffer_mb=1024, max_write_buffers=1024)


@pytest.mark.parametrize(
    ("env", "said"),
    [
        # An overlay adding STREAM_APP_BOOTSTRAP_SERVERS over the base's KAFKA_...:
        # the base's cluster won, with no word.
        (
            {"KAFKA_BOOTSTRAP_SERVERS": "old:9092", "STREAM_APP_BOOTSTRAP_SERVERS": "new:9092"},
            "KAFKA_BOOTSTRAP_SERVERS and STREAM_APP_BOOTSTRAP_SERVERS both set "
            "bootstrap_servers, to different values (old:9092 and new:9092): keep one",
        ),
        # The environment's order decided.
        (
            {"STREAM_APP_BATCH_SIZE": "10", "stream_app_batch_size": "20"},
            "both set batch_size, to different values (10 and 20)",
        ),
        (
            {"STREAM_APP_SECURITY__SASL_PASSWORD": "a", "stream_app_security__sasl_password": "b"},
            "both set security__sasl_password, to different values: keep one",
        ),
        # Confluent's and Quix's images read these; the worker connected without them.
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SECURITY_PROTOCOL is another client's"),
        ({"KAFKA_SASL_USERNAME": "worker"}, "reads its security from STREAM_APP_SECURITY__"),
        # The value shown as the eye would miss it: it was "=INFO : Input should be...".
        ({"STREAM_APP_APP_ID": "shop "}, "STREAM_APP_APP_ID='shop ': "),
        ({"STREAM_APP_TOPICS__CLOSED": "a\rb"}, "STREAM_APP_TOPICS__CLOSED='a\\rb': "),
        # The broker refuses any other at the join; it was retried for ever.
        ({"STREAM_APP_GROUP_INSTANCE_ID": "pod 0"}, "'pod 0' is not a group instance id"),
        # An overlay's group as JSON beside the manifests' per-field variables:
        # the field's variable won, and the worker read another topic.
        (
            {
                "STREAM_APP_TOPICS": '{"commands": "orders.commands"}',
                "STREAM_APP_TOPICS__COMMANDS": "sessions.commands",
            },
            "STREAM_APP_TOPICS and STREAM_APP_TOPICS__COMMANDS both set topics.commands, "
            "to different values (orders.commands and sessions.commands): keep one",
        ),
        (
            {
                "STREAM_APP_ROCKSDB": '{"block_cache_mb": 512}',
                "STREAM_APP_ROCKSDB__BLOCK_CACHE_MB": "32",
            },
            "both set rocksdb.block_cache_mb, to different values (512 and 32)",
        ),
        (
            {
                "STREAM_APP_SECURITY": (
                    '{"protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512", '
                    '"sasl_username": "u", "sasl_password": "a"}'
                ),
                "STREAM_APP_SECURITY__SASL_PASSWORD": "b",
            },
            "both set security.sasl_password, to different values: keep one",
        ),
        # Only a password is hidden, not the rest of the security group.
        (
            {
                "STREAM_APP_SECURITY": '{"protocol": "SSL"}',
                "STREAM_APP_SECURITY__PROTOCOL": "PLAINTEXT",
            },
            "both set security.protocol, to different values (SSL and PLAINTEXT): keep one",
        ),
        # Topic names are read as written: these are two topics.
        (
            {"STREAM_APP_TOPICS": '{"closed": "Orders"}', "STREAM_APP_TOPICS__CLOSED": "orders"},
            "both set topics.closed, to different values (Orders and orders)",
        ),
    ],
)
def test_settings_that_contradict_or_that_the_worker_does_not_read_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], said: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env()
    assert said in str(refused.value)
    assert "\n" not in str(refused.value)
    assert "(a and b)" not in str(refused.value)  # a password is never shown


def test_a_group_as_json_and_its_other_fields_merge(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a field given twice, to different values, is refused: the rest
    of the group's JSON and the other per-field variables both count."""
    monkeypatch.setenv("STREAM_APP_TOPICS", '{"commands": "orders.commands", "rejected": "r"}')
    monkeypatch.setenv("STREAM_APP_TOPICS__COMMANDS", "orders.commands")
    monkeypatch.setenv("STREAM_APP_TOPICS__CLOSED", "orders.closed")
    monkeypatch.setenv("STREAM_APP_ROCKSDB", '{"BLOCK_CACHE_MB": 64.0}')  # keys in any case
    monkeypatch.setenv("STREAM_APP_ROCKSDB__BLOCK_CACHE_MB", "64 ")
    # Two spellings of one setting: a choice in another case, null and "".
    monkeypatch.setenv("STREAM_APP_SECURITY", '{"protocol": "PLAINTEXT", "ssl_cafile": null}')
    monkeypatch.setenv("STREAM_APP_SECURITY__PROTOCOL", "plaintext")
    monkeypatch.setenv("STREAM_APP_SECURITY__SSL_CAFILE", "")
    settings = Settings.from_env()
    topics = settings.topics
    assert (topics.commands, topics.rejected, topics.closed) == (
        "orders.commands",
        "r",
        "orders.closed",
    )
    assert settings.rocksdb.block_cache_mb == 64


def test_a_mistake_beside_a_group_and_its_field_is_named_not_the_pair(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CA file that does not exist, in the JSON beside a protocol given twice
    the same: "both set security.protocol, to different values (SSL and ssl)"
    named the pair, and not the mistake."""
    monkeypatch.setenv(
        "STREAM_APP_SECURITY", '{"protocol": "SSL", "ssl_cafile": "/nowhere/ca.pem"}'
    )
    monkeypatch.setenv("STREAM_APP_SECURITY__PROTOCOL", "ssl")
    with pytest.raises(ConfigurationError, match=r"no such file: /nowhere/ca\.pem"):
        Settings.from_env()
    monkeypatch.setenv("STREAM_APP_SECURITY", '{"protocol": "SSL"}')
    monkeypatch.setenv("STREAM_APP_ROCKSDB", '{"block_cache_mb": 64}')
    monkeypatch.setenv("STREAM_APP_ROCKSDB__BLOCK_CACHE_MB", "lots")
    with pytest.raises(ConfigurationError, match="STREAM_APP_ROCKSDB__BLOCK_CACHE_MB=lots: Input"):
        Settings.from_env()


def test_what_an_operator_writes_loosely_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A choice with a space or a CR around it (an env file written on
    Windows), the same value under two spellings, an empty instance id (a
    template turning static membership off), the worker's security beside
    another client's, and the test suite's own variable."""
    monkeypatch.setenv("STREAM_APP_LOG_LEVEL", " warning ")
    monkeypatch.setenv("STREAM_APP_PROCESSING_GUARANTEE", "at_least_once\r")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "k:9092")
    monkeypatch.setenv("STREAM_APP_BOOTSTRAP_SERVERS", "k:9092")
    monkeypatch.setenv("STREAM_APP_GROUP_INSTANCE_ID", "")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("STREAM_APP_SECURITY__PROTOCOL", "PLAINTEXT")
    monkeypatch.setenv("STREAM_APP_TEST_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    settings = Settings.from_env()
    # Kubernetes' links to a Service named kafka-ssl, with no security of ours.
    monkeypatch.delenv("STREAM_APP_SECURITY__PROTOCOL")
    monkeypatch.delenv("KAFKA_SASL_MECHANISM")
    links = {
        "KAFKA_SSL_SERVICE_HOST": "10.0.0.9",
        "KAFKA_SSL_SERVICE_PORT": "9093",
        "KAFKA_SSL_PORT": "tcp://10.0.0.9:9093",
        "KAFKA_SSL_PORT_9093_TCP": "tcp://10.0.0.9:9093",
        "KAFKA_SSL_PORT_9093_TCP_PROTO": "tcp",
        "KAFKA_SSL_PORT_9093_TCP_PORT": "9093",
        "KAFKA_SSL_PORT_9093_TCP_ADDR": "10.0.0.9",
    }
    for name, value in links.items():
        monkeypatch.setenv(name, value)
    assert Settings.from_env().security.protocol == "PLAINTEXT"
    assert (settings.log_level, settings.processing_guarantee) == ("WARNING", "at_least_once")
    assert settings.bootstrap_servers == "k:9092"
    assert settings.group_instance_id is None
