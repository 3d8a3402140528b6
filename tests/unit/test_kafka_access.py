"""Kafka access problems without a broker: missing ACLs and refused logins are named, never crash the worker,
and every command that talks to Kafka takes the same security flags.

The same on a real SASL_SSL broker with ACLs: tests/integration/test_secured_broker.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from kafka.errors import GroupAuthorizationFailedError
from kafka.structs import ConsumerGroupMetadata, MemberState

from training.contract import Reason
from worker.config import KafkaSecurity, Secret, Settings
from worker.errors import BrokerUnavailable, DeliveryError
from worker.kafka import core as access
from worker.kafka.confluent import ConfluentSink, ConfluentSource
from worker.kafka.kafka_python import KafkaSource
from worker.records import DeadLetter, Record

PASSWORD = "s3cret-for-unit-tests"
SECURITY = KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                         sasl_password=Secret(PASSWORD), ssl_cafile="/ca.pem")
FLAGS = ["--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", "svc",
         "--ssl-cafile", "/ca.pem"]


def settings(**overrides: Any) -> Settings:
    return Settings(model=Path("m"), bootstrap_servers="127.0.0.1:1", input_topic="in", alert_topic="al",
                    dead_letter_topic="dl", group_id="g", security=SECURITY, **{"max_wait_ms": 0, **overrides})


def test_messages_name_principal_operation_and_resource_and_never_the_password() -> None:
    denied = access.denied(SECURITY, "WRITE", "TOPIC", "al")
    assert denied.startswith("not authorized: User:svc needs WRITE on TOPIC 'al'")
    refused = access.authentication_failed(SECURITY, "k:9093", "invalid credentials")
    assert refused.startswith("authentication failed: SCRAM-SHA-512 login as 'svc' at k:9093")
    assert PASSWORD not in denied + refused


def test_throttled_logs_a_repeated_problem_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttled = access.Throttled(logging.getLogger("t"), 30.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="t"):
        for t in (0.0, 10.0, 29.0, 30.0, 31.0):
            now[0] = t
            throttled.error("same problem")
        throttled.error("other detail", key="k")
        throttled.error("other detail, again", key="k")
    assert [r.getMessage() for r in caplog.records] == ["same problem", "same problem", "other detail"]


# -- kafka-python --------------------------------------------------------------------------------

class UnauthorizedConsumer:
    """A kafka-python consumer whose poll fails as it does without READ on the group."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0}

    def subscribe(self, topics: list[str], listener: Any) -> None:
        pass

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        raise GroupAuthorizationFailedError("g")

    def group_metadata(self) -> ConsumerGroupMetadata:
        return ConsumerGroupMetadata(group_id="g", state=MemberState.REBALANCING)

    def assignment(self) -> set:
        return set()  # never joined


def test_kafka_python_without_group_read_names_the_acl_instead_of_crashing(caplog: pytest.LogCaptureFixture) -> None:
    made: list[UnauthorizedConsumer] = []

    def factory(**kwargs: Any) -> UnauthorizedConsumer:
        made.append(UnauthorizedConsumer(**kwargs))
        return made[-1]

    source = KafkaSource(settings(), consumer_factory=factory)
    with caplog.at_level(logging.ERROR, logger="worker.kafka.kafka_python"):
        assert source.poll_batch() == [] and source.poll_batch() == []
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "not authorized: User:svc needs READ on GROUP 'g'"]  # once: the repeat is throttled
    assert made[0].kwargs["sasl_plain_password"] == PASSWORD  # handed to the client, and only there


# -- confluent-kafka -----------------------------------------------------------------------------

class Message:
    def __init__(self, topic: str) -> None:
        self.name = topic

    def topic(self) -> str:
        return self.name


class UnauthorizedProducer:
    """Refuses every record to `refuse` as the broker does without WRITE on it."""

    def __init__(self, refuse: str) -> None:
        self.refuse, self.reports = refuse, []  # type: ignore[var-annotated]

    def list_topics(self, timeout: float) -> None:
        return None

    def produce(self, topic: str, value: bytes | None, key: bytes | None, headers: list, on_delivery: Any) -> None:
        error = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED) if topic == self.refuse else None
        self.reports.append((on_delivery, error, Message(topic)))

    def flush(self, timeout: float) -> int:
        for report, error, message in self.reports:
            report(error, message)
        self.reports = []
        return 0


def test_confluent_delivery_without_write_names_the_topic() -> None:
    sink = ConfluentSink(settings(), producer_factory=lambda conf: UnauthorizedProducer(refuse="dl"))
    letter = DeadLetter(record=Record("in", 0, 1, None, b"x"), reason=Reason.OVERSIZED, error="big")
    with pytest.raises(DeliveryError, match=r"not authorized: User:svc needs WRITE on TOPIC 'dl'"):
        sink.publish([], [letter])


class RefusedLogin:
    """A librdkafka client with a wrong password: metadata fails as a transport error; error_cb says why (in
    poll)."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf

    def list_topics(self, timeout: float) -> None:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata: Local: Broker transport "
                                                               "failure"))

    def poll(self, timeout: float) -> None:
        self.conf["error_cb"](KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: Authentication "
                                                                     "failed due to invalid credentials"))

    def close(self) -> None:
        pass


@pytest.mark.parametrize("client", ["source", "sink"])
def test_confluent_wrong_password_says_authentication_failed_without_the_password(client: str) -> None:
    with pytest.raises(BrokerUnavailable, match="authentication failed: SCRAM-SHA-512 login as 'svc'") as caught:
        if client == "source":
            ConfluentSource(settings(), consumer_factory=RefusedLogin)
        else:
            ConfluentSink(settings(), producer_factory=RefusedLogin)
    assert PASSWORD not in str(caught.value)


# The side paths (anomaly-replay, anomaly-train --from-kafka) with either client: test_kafka_side_paths.py.


class FatallyRefusedProducer(UnauthorizedProducer):
    """librdkafka's idempotent producer when the principal may write no topic: its producer id is refused
    (a fatal error, raised by the next poll), and every produce says only `_FATAL`."""

    def produce(self, topic: str, value: bytes | None, key: bytes | None, headers: list, on_delivery: Any) -> None:
        raise KafkaException(KafkaError(KafkaError._FATAL, "Unable to produce message: Local: Fatal error"))

    def poll(self, timeout: float) -> int:
        raise KafkaException(KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED, "Failed to acquire idempotence "
                                        "PID from broker", fatal=True))


class FatalInFlushProducer(FatallyRefusedProducer):
    """The same refusal arriving while flush serves delivery reports: the binding raises a SystemError."""

    def produce(self, topic: str, value: bytes | None, key: bytes | None, headers: list, on_delivery: Any) -> None:
        pass

    def flush(self, timeout: float) -> int:
        raise SystemError("<method 'flush' of 'cimpl.Producer' objects> returned NULL without setting an exception")


class KafkaErrorRaisedInFlushProducer(FatallyRefusedProducer):
    """The same refusal as the binding raised it in one CI run: the `KafkaError` object itself, which is no
    exception class (only a bare `except` catches it; it ended the worker)."""

    def produce(self, topic: str, value: bytes | None, key: bytes | None, headers: list, on_delivery: Any) -> None:
        pass

    def flush(self, timeout: float) -> int:
        raise_object(KafkaError(KafkaError.CLUSTER_AUTHORIZATION_FAILED, "Failed to acquire idempotence PID from "
                                "broker: Broker: Cluster authorization failed", fatal=True))
        return 0


def raise_object(error: KafkaError) -> None:
    """Raise `error` as the C binding does (Python's `raise` refuses a non-exception: set it as C code can)."""
    import ctypes

    restore = ctypes.pythonapi.PyErr_Restore
    restore.argtypes = [ctypes.py_object, ctypes.py_object, ctypes.c_void_p]
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(KafkaError))  # PyErr_Restore steals both references
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(error))
    restore(KafkaError, error, None)


def test_a_kafka_error_object_raised_by_the_binding_is_not_caught_by_except_exception() -> None:
    """Why the producer is `Guarded`: this is what happened in the binding, and what `except Exception` misses."""
    caught = None
    try:
        try:
            raise_object(KafkaError(KafkaError._FATAL, "x", fatal=True))
        except Exception:  # noqa: BLE001 - shows what this clause misses
            caught = "except Exception"
    except:  # noqa: E722
        caught = "only a bare except"
    assert caught == "only a bare except"


@pytest.mark.parametrize("refused", [FatallyRefusedProducer, FatalInFlushProducer, KafkaErrorRaisedInFlushProducer])
def test_confluent_producer_that_failed_fatally_names_the_acls_and_is_replaced(refused: type) -> None:
    made: list[Any] = []

    def factory(conf: dict[str, Any]) -> Any:
        made.append(refused(refuse="") if not made else UnauthorizedProducer(refuse=""))
        return made[-1]

    sink = ConfluentSink(settings(), producer_factory=factory)
    letter = DeadLetter(record=Record("in", 0, 1, None, b"x"), reason=Reason.OVERSIZED, error="big")
    with pytest.raises(DeliveryError, match=r"needs WRITE on TOPIC 'al' and TOPIC 'dl'; add those ACLs"):
        sink.publish([], [letter])
    sink.publish([], [letter])  # the ACL was granted meanwhile: a new producer delivers
    assert len(made) == 2
