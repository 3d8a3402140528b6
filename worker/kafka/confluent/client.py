"""What every librdkafka client of the worker shares: its properties, a refused login, reachability, errors."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from worker.config import Settings
from worker.errors import BrokerUnavailable
from worker.kafka.core import authentication_failed, denied_for, partition_fetch_bytes

librdkafka_log = logging.getLogger("librdkafka")

#: librdkafka's authorization error codes, by the resource whose ACL is missing.
DENIALS = {KafkaError.TOPIC_AUTHORIZATION_FAILED: "topic", KafkaError.GROUP_AUTHORIZATION_FAILED: "group",
           KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "transactional-id"}


def client_config(settings: Settings) -> dict[str, Any]:
    """Properties every librdkafka client of the worker shares: brokers, id, security, timeouts, logging."""
    return {"bootstrap.servers": settings.bootstrap_servers, "client.id": settings.client_id,
            "socket.timeout.ms": int(settings.kafka_timeout_s * 1000), "logger": librdkafka_log,
            **settings.security.librdkafka_config()}


def producer_config(settings: Settings) -> dict[str, Any]:
    """Idempotent producer (acks=all) properties shared by the plain and the transactional sink."""
    return {**client_config(settings), "acks": "all", "enable.idempotence": True, "linger.ms": 5,
            "compression.type": settings.output_compression,
            "message.max.bytes": partition_fetch_bytes(settings),
            "request.timeout.ms": int(settings.kafka_timeout_s * 1000),
            "message.timeout.ms": int(settings.kafka_timeout_s * 1000) + 5_000}


def offset_with(topic: str, partition: int, offset: int, metadata: str | None) -> TopicPartition:
    """A next offset to commit, with its commit metadata if any (the binding takes no None for it)."""
    if metadata is None:
        return TopicPartition(topic, partition, offset)
    return TopicPartition(topic, partition, offset, metadata=metadata)


class LoginWatch:
    """A client's `error_cb` that remembers a refused SASL login (then calls `on_error`, if any).

    A metadata request of a client whose login was refused fails as a mere transport failure; the
    reason reaches only this callback, served inside poll.
    """

    def __init__(self, on_error: Callable[[KafkaError], None] | None = None) -> None:
        self.on_error = on_error
        self.refused: KafkaError | None = None

    def __call__(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            self.refused = error
        if self.on_error is not None:
            self.on_error(error)


def check_reachable(client: Any, settings: Settings, login: LoginWatch | None = None) -> None:
    """librdkafka connects lazily; ask for metadata so an absent broker is BrokerUnavailable, as with kafka-python.

    With the client's `login` watch, a refused login says so (`authentication failed: ...`).
    """
    try:
        client.list_topics(timeout=settings.kafka_timeout_s)
    except KafkaException as exc:
        if login is not None:
            client.poll(0)  # serves error_cb
            if login.refused is not None:
                raise BrokerUnavailable(authentication_failed(
                    settings.security, settings.bootstrap_servers, login.refused.str())) from exc
        raise BrokerUnavailable(f"no Kafka broker reachable at {settings.bootstrap_servers}: {exc}") from exc


def denied(settings: Settings, error: KafkaError, topic: str | None, operation: str) -> str | None:
    """The missing ACL an authorization error means (`operation` on `topic` for a topic), else None."""
    denial = DENIALS.get(error.code())
    return None if denial is None else denied_for(settings, denial, topic, operation)


def kafka_error(exc: BaseException) -> KafkaError | None:
    return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None


class Guarded:
    """A librdkafka client whose calls never raise a bare `KafkaError`.

    The binding can raise the `KafkaError` object itself: seen from `Producer.flush` after a fatal
    idempotence error (no WRITE on any topic: CLUSTER_AUTHORIZATION_FAILED). It is no exception class, so no
    `except` clause but a bare one catches it, and it ended the worker. Every call through this proxy turns it
    into the `KafkaException` the sinks already handle (a fatal one replaces the producer).
    """

    __slots__ = ("_client",)

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._client, name)
        return _guarded(attribute) if callable(attribute) else attribute


def _guarded(call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return call(*args, **kwargs)
        except:  # noqa: E722 - the only clause that catches a raised KafkaError object (see Guarded)
            raised = sys.exc_info()[1]
            if isinstance(raised, KafkaError):
                raise KafkaException(raised) from None
            raise
    return guarded
