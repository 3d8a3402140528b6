"""confluent-kafka (librdkafka) behind `RecordProducer` (worker/kafka/producer.py): calls and errors translated.

Not idempotent: a principal without WRITE then gets each record refused by name (TOPIC_AUTHORIZATION_FAILED)
rather than a fatal producer-id error, and replayed demo data needs no exactly-once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from worker.kafka.confluent.client import LoginWatch, librdkafka_log
from worker.kafka.connection import Connection
from worker.kafka.core import authentication_failed, denied
from worker.kafka.producer import SendError


class ConfluentProducer:
    def __init__(self, connection: Connection, producer_factory: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.connection = connection
        self._login = LoginWatch()
        self._failed: list[tuple[str, KafkaError]] = []
        self._producer = (producer_factory or Producer)({
            "bootstrap.servers": connection.bootstrap_servers, "client.id": connection.client_id, "acks": "all",
            "enable.idempotence": False, "linger.ms": 20, "batch.size": 512 * 1024,
            "socket.timeout.ms": int(connection.timeout_s * 1000), "logger": librdkafka_log,
            "error_cb": self._login, **connection.security.librdkafka_config()})
        try:  # librdkafka connects lazily: an absent broker or a refused login fails here, as with kafka-python
            self._producer.list_topics(timeout=connection.timeout_s)
        except KafkaException as exc:
            self._producer.poll(0)  # serves error_cb: a refused login shows only there
            if self._login.refused is not None:
                raise SendError(authentication_failed(connection.security, connection.bootstrap_servers,
                                                      self._login.refused.str())) from exc
            raise SendError(f"Kafka at {connection.bootstrap_servers}: {exc}") from exc

    def _delivered(self, error: KafkaError | None, message: Any) -> None:
        if error is not None:
            self._failed.append((message.topic(), error))

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._delivered)
                break
            except BufferError:  # the local queue is full: serve delivery reports until there is room
                self._producer.poll(0.1)
            except KafkaException as exc:
                raise SendError(f"Kafka at {self.connection.bootstrap_servers}: {exc}") from exc
        self._producer.poll(0)

    def flush(self, timeout_s: float) -> None:
        left = self._producer.flush(timeout_s)
        if self._failed:
            topic, error = self._failed[0]
            if error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                raise SendError(f"{denied(self.connection.security, 'WRITE', 'TOPIC', topic)} ({error.str()})")
            raise SendError(f"Kafka at {self.connection.bootstrap_servers}: {error.str()} "
                            f"({len(self._failed)} records not delivered)")
        if left:
            raise SendError(f"Kafka at {self.connection.bootstrap_servers}: {left} records not delivered within "
                            f"{timeout_s:g} s")

    def close(self) -> None:
        self._producer.flush(0)
