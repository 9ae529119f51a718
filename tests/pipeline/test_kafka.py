"""Telling a broker that refuses the worker from one that cannot be reached
(no broker: aiokafka's connection is faked; tests/integration/test_security.py
meets the real refusals)."""

from __future__ import annotations

import asyncio
import ssl
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed

from stream_app.pipeline import kafka
from stream_app.pipeline.kafka import Probe, probe, refusal
from stream_app.settings import Settings
from tests.pipeline.fakes import IdleKafkaClient


class _Closed:
    closed = False

    def close(self) -> None:
        self.closed = True


def _connecting(monkeypatch: pytest.MonkeyPatch, *answers: BaseException | None) -> list[str]:
    """Fake aiokafka's ``create_conn``: the n-th server answers ``answers[n]`` (an
    exception to raise, or None to let the client in). Returns the servers tried."""
    tried: list[str] = []

    async def create_conn(host: str, port: int, **options: Any) -> _Closed:
        answer = answers[len(tried)]
        tried.append(f"{host}:{port}")
        if answer is not None:
            raise answer
        return _Closed()

    monkeypatch.setattr("aiokafka.conn.create_conn", create_conn)
    return tried


def _closed_by(cause: BaseException) -> KafkaConnectionError:
    """What aiokafka raises when the broker closed the connection, with its cause."""
    closed = KafkaConnectionError("Connection at 127.0.0.1:9093 closed")
    closed.__cause__ = cause
    return closed


def _refusal(servers: str) -> str | None:
    return asyncio.run(refusal({"bootstrap_servers": servers, "security_protocol": "SSL"}))


def test_rejected_credentials_are_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    _connecting(monkeypatch, SaslAuthenticationFailed("Invalid username or password"))
    why = _refusal("k1:9093")
    assert why == "[Error 58] SaslAuthenticationFailed: Invalid username or password"


def test_a_broker_certificate_the_ca_does_not_sign_is_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failed = ssl.SSLCertVerificationError(1, "certificate verify failed")
    _connecting(monkeypatch, failed)
    assert (_refusal("k1:9093") or "").startswith("SSLCertVerificationError: ")


def test_a_tls_alert_about_the_client_certificate_is_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alert = ssl.SSLError(1, "[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate")
    alert.reason = "SSLV3_ALERT_BAD_CERTIFICATE"
    _connecting(monkeypatch, _closed_by(alert))
    why = _refusal("k1:9093")
    assert why == "the broker refused this client's TLS certificate (SSLV3_ALERT_BAD_CERTIFICATE)"


def test_a_tls_12_alert_in_the_handshake_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under TLS 1.2 the broker's alert ends the handshake: the SSLError itself."""
    alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"
    _connecting(monkeypatch, alert)
    why = _refusal("k1:9093")
    assert why == "the broker refused this client's TLS certificate (TLSV1_ALERT_UNKNOWN_CA)"


def test_a_tls_listener_answering_a_plaintext_client_is_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first four bytes of a TLS alert record, 15 03 03 00, read as a length.
    _connecting(monkeypatch, _closed_by(asyncio.IncompleteReadError(b"\x02", 0x15030300)))
    assert "answered with TLS" in (_refusal("k1:9093") or "")


def test_a_broker_that_cannot_be_reached_is_not_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connection refused, reset or closed for another cause: worth retrying.
    Every bootstrap server is tried."""
    tried = _connecting(
        monkeypatch,
        ConnectionRefusedError(111, "Connect call failed"),
        _closed_by(asyncio.IncompleteReadError(b"", 4)),
        KafkaConnectionError("Connection at k3:9093 closed"),
        None,
    )
    assert _refusal("k1:9093,k2:9093,k3:9093,k4:9093") is None
    assert tried == ["k1:9093", "k2:9093", "k3:9093", "k4:9093"]


def test_a_tls_client_at_a_plaintext_listener_gets_a_hint_not_a_refusal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker reads the ClientHello as a request over its bound and drops
    the connection: the worker said only that Kafka was not reachable, for
    ever, and the runbook sent the operator to the network. A hint now; not
    a refusal, as a proxy whose brokers are away may drop connections too."""
    reset = ConnectionResetError()
    eof = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
    eof.reason = "UNEXPECTED_EOF_WHILE_READING"
    _connecting(monkeypatch, reset, eof)
    found = asyncio.run(probe({"bootstrap_servers": "k1:9093,k2:9093", "security_protocol": "SSL"}))
    assert found.refused is None
    assert "PLAINTEXT" in (found.hint or "")
    # Not when one server failed otherwise, nor without TLS.
    _connecting(monkeypatch, reset, ConnectionRefusedError(111, "Connect call failed"))
    mixed = {"bootstrap_servers": "k1:9093,k2:9093", "security_protocol": "SASL_SSL"}
    assert asyncio.run(probe(mixed)) == Probe()
    _connecting(monkeypatch, reset)
    assert asyncio.run(probe({"bootstrap_servers": "k1:9092"})) == Probe()


def test_a_refusing_server_decides_when_none_lets_the_client_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tried = _connecting(
        monkeypatch,
        ConnectionRefusedError(111, "Connect call failed"),
        SaslAuthenticationFailed("Invalid username or password"),
        ConnectionRefusedError(111, "Connect call failed"),
    )
    assert "Invalid username or password" in (_refusal("k1:9093,k2:9093,k3:9093") or "")
    assert tried == ["k1:9093", "k2:9093", "k3:9093"]


def test_a_broker_that_lets_the_client_in_outweighs_one_that_does_not_yet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new user's SCRAM credentials reach each broker in turn: one broker that
    refuses them while another accepts is not a mistake to stop for."""
    refused = SaslAuthenticationFailed("Invalid username or password")
    tried = _connecting(monkeypatch, None, refused)
    assert _refusal("k1:9093,k2:9093") is None
    assert tried == ["k1:9093"]
    _connecting(monkeypatch, refused, None)
    assert _refusal("k1:9093,k2:9093") is None


def test_servers_that_never_answer_leave_what_the_others_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tried: list[str] = []

    async def create_conn(host: str, port: int, **options: Any) -> _Closed:
        tried.append(host)
        if host == "k1":
            raise SaslAuthenticationFailed("Invalid username or password")
        await asyncio.sleep(3600)  # a blackholed address
        return _Closed()

    monkeypatch.setattr("aiokafka.conn.create_conn", create_conn)
    options = {"bootstrap_servers": "k1:9093,k2:9093", "security_protocol": "SASL_SSL"}
    why = asyncio.run(refusal(options, timeout_s=0.2))
    assert why is not None
    assert "Invalid username or password" in why
    assert tried == ["k1", "k2"]
    tried.clear()
    options["bootstrap_servers"] = "k2:9093,k1:9093"
    assert asyncio.run(refusal(options, timeout_s=0.2)) is None  # k1 never asked
    assert tried == ["k2"]


class _MetadataClient(IdleKafkaClient):
    """aiokafka's client, answering a metadata request with ``error_code``:
    the requests it was sent."""

    error_code = 0
    sent: ClassVar[list[Any]] = []

    def get_random_node(self) -> int:
        return 1

    async def send(self, node_id: int, request: Any) -> Any:
        self.sent.append(request)
        code = self.error_code
        partitions = [] if code else [{"partition": 0}, {"partition": 1}]
        topics = [{"topic": t, "error_code": code, "partitions": partitions} for t in ["t"]]
        return SimpleNamespace(to_object=lambda: {"topics": topics})


@pytest.mark.parametrize(("error_code", "expected"), [(0, 2), (3, 0), (5, 0), (29, None)])
def test_a_topic_the_principal_may_not_describe_is_no_missing_topic(
    monkeypatch: pytest.MonkeyPatch, error_code: int, expected: int | None
) -> None:
    """Before, TOPIC_AUTHORIZATION_FAILED read as 0 partitions: the settings
    reader went on with file settings only, and `tail` said the topic did not
    exist. UNKNOWN_TOPIC (3) and LEADER_NOT_AVAILABLE (5) are still 0."""
    import aiokafka.client
    from aiokafka.errors import TopicAuthorizationFailedError

    from stream_app.pipeline.kafka import partition_count

    monkeypatch.setattr(_MetadataClient, "error_code", error_code)
    monkeypatch.setattr(aiokafka.client, "AIOKafkaClient", _MetadataClient)
    if expected is None:
        with pytest.raises(TopicAuthorizationFailedError):
            asyncio.run(partition_count({}, "t"))
    else:
        assert asyncio.run(partition_count({}, "t")) == expected


def test_a_topic_is_looked_up_without_creating_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """aiokafka's describe_topics asks with auto-creation on: on a broker with
    auto.create.topics.enable (Kafka's default), `stream-app tail`, `send` or
    a checkout's SessionClient created a missing command topic, with the
    broker's one partition, for good."""
    import aiokafka.client
    from aiokafka.protocol.metadata import MetadataRequest_v5

    from stream_app.pipeline.kafka import partition_count

    monkeypatch.setattr(aiokafka.client, "AIOKafkaClient", _MetadataClient)
    _MetadataClient.sent.clear()
    asyncio.run(partition_count({}, "t"))
    (request,) = _MetadataClient.sent
    assert request.build(MetadataRequest_v5).allow_auto_topic_creation is False


class _OffsetsClient(IdleKafkaClient):
    """aiokafka's client, whose group coordinator answers an OffsetFetch with
    ``error_code`` for the whole request, or with ``topics``."""

    error_code = 0
    topics: ClassVar[list[Any]] = []
    lookup_error: ClassVar[Exception | None] = None

    async def coordinator_lookup(self, coordinator_type: int, key: str) -> int:
        if self.lookup_error is not None:
            raise self.lookup_error
        return 2

    async def send(self, node_id: int, request: Any) -> Any:
        assert node_id == 2
        return SimpleNamespace(error_code=self.error_code, topics=self.topics)


@pytest.mark.parametrize(
    ("error_code", "raised"),
    [(14, "GroupLoadInProgressError"), (16, "NotCoordinatorForGroupError"), (30, None)],
)
def test_a_group_s_offsets_the_coordinator_cannot_give_are_an_error_not_none(
    monkeypatch: pytest.MonkeyPatch, error_code: int, raised: str | None
) -> None:
    """aiokafka's list_consumer_group_offsets reads only the partitions'
    errors: a coordinator still loading the group's offsets answered with no
    partition, read as a group with no offsets, and the worker's check of
    the partition count it records passed."""
    import aiokafka.client
    from aiokafka.errors import GroupAuthorizationFailedError, KafkaError

    from stream_app.pipeline.kafka import committed_offsets, not_authorized

    monkeypatch.setattr(aiokafka.client, "AIOKafkaClient", _OffsetsClient)
    monkeypatch.setattr(_OffsetsClient, "error_code", error_code)
    with pytest.raises(KafkaError) as caught:
        asyncio.run(committed_offsets({}, "app"))
    if raised is None:  # no Describe on the group: stops the worker (exit 2)
        assert isinstance(caught.value, GroupAuthorizationFailedError)
        assert not_authorized(caught.value) is not None
    else:  # retried, as any Kafka error of the start
        assert type(caught.value).__name__ == raised
        assert caught.value.retriable
    assert str(caught.value).endswith(": app")  # the group, as the consumer's join names it
    # Refused at the coordinator's lookup, which aiokafka raises naming nothing.
    monkeypatch.setattr(_OffsetsClient, "lookup_error", GroupAuthorizationFailedError())
    with pytest.raises(GroupAuthorizationFailedError, match=r": app$"):
        asyncio.run(committed_offsets({}, "app"))


def test_a_group_s_committed_offsets_come_with_their_metadata(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import aiokafka.client
    from aiokafka.errors import UnknownTopicOrPartitionError
    from aiokafka.structs import TopicPartition

    from stream_app.pipeline.kafka import committed_offsets

    monkeypatch.setattr(aiokafka.client, "AIOKafkaClient", _OffsetsClient)
    answer = [("c", [(0, 10, '{"partitions":6}', 0), (1, -1, "", 0), (2, 4, None, 0)])]
    monkeypatch.setattr(_OffsetsClient, "topics", answer)
    assert asyncio.run(committed_offsets({}, "app")) == {
        TopicPartition("c", 0): (10, '{"partitions":6}'),
        TopicPartition("c", 2): (4, ""),
    }
    monkeypatch.setattr(_OffsetsClient, "topics", [("c", [(0, -1, "", 3)])])
    with pytest.raises(UnknownTopicOrPartitionError, match=r"for c\[0\]"):
        asyncio.run(committed_offsets({}, "app"))


async def test_the_worker_s_group_offsets_are_read_on_one_client_kept_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each task whose re-key partition never had a record asks on every
    start: a client each was a burst of connections, and SCRAM handshakes,
    at every rebalance."""
    import aiokafka.client
    from aiokafka.errors import GroupLoadInProgressError
    from aiokafka.structs import TopicPartition

    from stream_app.pipeline.kafka import GroupOffsets

    class Client(_OffsetsClient):
        made = closed = 0

        async def bootstrap(self) -> None:
            await asyncio.sleep(0.01)  # the first reads come together, as task starts do

    monkeypatch.setattr(aiokafka.client, "AIOKafkaClient", Client)
    monkeypatch.setattr(Client, "topics", [("c", [(0, 10, "", 0)])])
    reader = GroupOffsets({})
    answers = await asyncio.gather(*(reader.read("app") for _ in range(12)))
    assert answers == [{TopicPartition("c", 0): (10, "")}] * 12
    monkeypatch.setattr(Client, "error_code", 14)  # loading: raised, asked again later
    with pytest.raises(GroupLoadInProgressError):
        await reader.read("app")
    monkeypatch.setattr(Client, "error_code", 0)
    assert await reader.read("app") == {TopicPartition("c", 0): (10, "")}
    assert (Client.made, Client.closed) == (1, 0)
    await reader.close()
    assert Client.closed == 1


async def test_a_read_given_up_during_its_bootstrap_closes_the_client_once_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiokafka's bootstrap, cancelled, leaves its connection open: the look
    at a new group's outputs, cut at its bound, was an ERROR at exit."""
    import aiokafka.client

    from stream_app.pipeline.kafka import GroupOffsets

    answered = asyncio.Event()

    class Client(_OffsetsClient):
        made = closed = 0

        async def bootstrap(self) -> None:
            await answered.wait()  # a slow broker

    monkeypatch.setattr(aiokafka.client, "AIOKafkaClient", Client)
    reader = GroupOffsets({})
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read("app"), 0.05)
    assert (Client.made, Client.closed) == (1, 0)  # its bootstrap goes on
    answered.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert Client.closed == 1


def test_a_tls_file_that_stopped_loading_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Checked with the settings at start; a file replaced since by one that
    does not load (a rotation gone wrong) raised a ValueError from the next
    client, which nothing above took for a configuration error."""
    from stream_app.errors import ConfigurationError
    from stream_app.pipeline.kafka import client_options
    from stream_app.settings import KafkaSecurity, Settings

    def no_longer(_self: object) -> None:
        raise ValueError("STREAM_APP_SECURITY__SSL_CAFILE: /ca.pem holds no PEM certificate")

    monkeypatch.setattr(KafkaSecurity, "ssl_context", no_longer)
    with pytest.raises(ConfigurationError, match="holds no PEM certificate"):
        client_options(Settings())


async def test_a_refusal_is_a_configuration_error_naming_the_brokers_and_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the worker's start and its join's retry stop with (exit 2)."""

    async def refused(options: dict[str, object]) -> Probe:
        return Probe("SSLCertVerificationError: certificate verify failed")

    monkeypatch.setattr(kafka, "probe", refused)
    error = await kafka.refused_worker(Settings(bootstrap_servers="k1:9093"), asyncio.Event())
    assert str(error) == (
        "Kafka at k1:9093 refuses this worker: SSLCertVerificationError: certificate verify "
        "failed (see STREAM_APP_SECURITY__*)"
    )

    async def never_answered(options: dict[str, object]) -> Probe:
        await asyncio.Event().wait()  # a broker that accepts and never answers
        return Probe()

    monkeypatch.setattr(kafka, "probe", never_answered)
    stopped = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stopped.set)
    assert await asyncio.wait_for(kafka.refused_worker(Settings(), stopped), timeout=5) is None
