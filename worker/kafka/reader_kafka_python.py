"""kafka-python behind `TopicReader` (worker/kafka/reader.py): calls and errors translated, nothing more."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, TopicAuthorizationFailedError

from worker.kafka.connection import Connection
from worker.kafka.core import denied
from worker.kafka.reader import Message, ReadError


class KafkaPythonReader:
    def __init__(self, connection: Connection) -> None:
        self.connection, self._topic = connection, "?"
        with self._translated():
            self._consumer = KafkaConsumer(
                bootstrap_servers=connection.bootstrap_servers.split(","), client_id=connection.client_id,
                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                request_timeout_ms=int(connection.timeout_s * 1000), **connection.security.client_options())

    @contextmanager
    def _translated(self, topic: str | None = None) -> Iterator[None]:
        try:
            yield
        except TopicAuthorizationFailedError as exc:
            raise ReadError(denied(self.connection.security, "READ", "TOPIC", topic or "?")) from exc
        except KafkaError as exc:
            if not hasattr(self, "_consumer"):
                raise ReadError(f"cannot reach Kafka at {self.connection.bootstrap_servers} ({exc})") from exc
            raise ReadError(f"reading failed ({exc})") from exc

    def partitions(self, topic: str) -> list[int] | None:
        with self._translated(topic):
            found = self._consumer.partitions_for_topic(topic)
        return None if found is None else sorted(found)

    def bounds(self, topic: str, partitions: list[int], since_ms: int | None) -> dict[int, tuple[int, int]]:
        tps = [TopicPartition(topic, p) for p in partitions]
        with self._translated(topic):
            ends = self._consumer.end_offsets(tps)
            if since_ms is None:
                starts = self._consumer.beginning_offsets(tps)
            else:
                found = self._consumer.offsets_for_times({tp: since_ms for tp in tps})
                starts = {tp: ends[tp] if found.get(tp) is None else found[tp].offset for tp in tps}
        return {tp.partition: (starts[tp], ends[tp]) for tp in tps}

    def assign(self, topic: str, starts: Mapping[int, int]) -> None:
        self._topic = topic
        with self._translated(topic):
            self._consumer.assign([TopicPartition(topic, p) for p in starts])
            for p, offset in starts.items():
                self._consumer.seek(TopicPartition(topic, p), offset)

    def poll(self, timeout_s: float) -> list[Message]:
        with self._translated(self._topic):
            batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        return [Message(tp.partition, m.offset, m.value, m.timestamp if (m.timestamp or 0) > 0 else None)
                for tp, batch in batches.items() for m in batch]

    def position(self, topic: str, partition: int) -> int:
        with self._translated(topic):
            return int(self._consumer.position(TopicPartition(topic, partition)))

    def close(self) -> None:
        self._consumer.close()
