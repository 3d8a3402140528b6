"""kafka-python behind `RecordProducer` (worker/kafka/producer.py): calls and errors translated."""

from __future__ import annotations

from kafka import KafkaProducer
from kafka.errors import AuthorizationError, KafkaError

from worker.kafka.connection import Connection
from worker.kafka.core import denied
from worker.kafka.producer import SendError


class KafkaPythonProducer:
    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._failed: list[tuple[str, Exception]] = []
        try:
            self._producer = KafkaProducer(bootstrap_servers=connection.bootstrap_servers.split(","), acks="all",
                                           linger_ms=20, batch_size=512 * 1024, client_id=connection.client_id,
                                           **connection.security.client_options())
        except KafkaError as exc:
            raise self._error("?", exc) from exc

    def _error(self, topic: str, exc: Exception) -> SendError:
        # A refused InitProducerId (no WRITE on any topic) comes as a plain KafkaError naming
        # ClusterAuthorizationFailedError.
        if isinstance(exc, AuthorizationError) or "AuthorizationFailed" in str(exc):
            return SendError(f"{denied(self.connection.security, 'WRITE', 'TOPIC', topic)} ({exc})")
        return SendError(f"Kafka at {self.connection.bootstrap_servers}: {exc}")

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        try:
            future = self._producer.send(topic, key=key, value=value)
        except KafkaError as exc:
            raise self._error(topic, exc) from exc
        future.add_errback(lambda exc: self._failed.append((topic, exc)))

    def flush(self, timeout_s: float) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise SendError(f"Kafka at {self.connection.bootstrap_servers}: {exc}") from exc
        if self._failed:
            topic, failure = self._failed[0]
            raise self._error(topic, failure) from failure

    def close(self) -> None:
        self._producer.close(timeout=10)
