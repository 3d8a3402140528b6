"""confluent-kafka (librdkafka) behind `TopicReader` (worker/kafka/reader.py): calls and errors translated.

librdkafka's Python consumer insists on a `group.id`; it is never joined (partitions are assigned by hand)
and nothing is committed, so the principal needs no GROUP ACL.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from worker.kafka.confluent.client import LoginWatch, librdkafka_log
from worker.kafka.connection import Connection
from worker.kafka.core import authentication_failed, denied
from worker.kafka.reader import Message, ReadError

#: Consumer errors of the (unused) group's coordinator lookup: not this reader's concern.
GROUP_ERRORS = frozenset({KafkaError.GROUP_AUTHORIZATION_FAILED, KafkaError._NO_OFFSET})


class ConfluentReader:
    def __init__(self, connection: Connection, consumer_factory: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.connection, self._topic = connection, "?"
        self._login = LoginWatch()
        self._next: dict[int, int] = {}  # past each record and end-of-partition event seen
        self._consumer = (consumer_factory or Consumer)({
            "bootstrap.servers": connection.bootstrap_servers, "client.id": connection.client_id,
            "group.id": f"{connection.client_id}-reader", "enable.auto.commit": False,
            "enable.auto.offset.store": False, "enable.partition.eof": True,
            "isolation.level": "read_uncommitted",  # as kafka-python's: both clients read the same records
            "socket.timeout.ms": int(connection.timeout_s * 1000), "logger": librdkafka_log,
            "error_cb": self._login, **connection.security.librdkafka_config()})

    def _failed(self, error: KafkaError | KafkaException, topic: str, reaching: bool = False) -> ReadError:
        code = (error.args[0] if isinstance(error, KafkaException) else error).code()
        security, servers = self.connection.security, self.connection.bootstrap_servers
        if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
            return ReadError(denied(security, "READ", "TOPIC", topic))
        self._consumer.poll(0)  # serves error_cb: a refused login shows only there
        if self._login.refused is not None:
            return ReadError(authentication_failed(security, servers, self._login.refused.str()))
        return ReadError(f"cannot reach Kafka at {servers} ({error})" if reaching else f"reading failed ({error})")

    def partitions(self, topic: str) -> list[int] | None:
        try:
            metadata = self._consumer.list_topics(topic, timeout=self.connection.timeout_s)
        except KafkaException as exc:
            raise self._failed(exc, topic, reaching=True) from exc
        found = metadata.topics.get(topic)
        if found is None or (found.error is not None and found.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
            return None
        if found.error is not None:
            raise self._failed(found.error, topic)
        return sorted(found.partitions)

    def bounds(self, topic: str, partitions: list[int], since_ms: int | None) -> dict[int, tuple[int, int]]:
        timeout = self.connection.timeout_s
        try:
            marks = {p: self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)
                     for p in partitions}
            if since_ms is None:
                return {p: (low, high) for p, (low, high) in marks.items()}
            found = self._consumer.offsets_for_times([TopicPartition(topic, p, since_ms) for p in partitions],
                                                     timeout=timeout)
        except KafkaException as exc:
            raise self._failed(exc, topic) from exc
        # No record at or after `since_ms`: offset -1 (OFFSET_END), so the partition adds nothing.
        return {tp.partition: (tp.offset if tp.offset >= 0 else marks[tp.partition][1], marks[tp.partition][1])
                for tp in found}

    def assign(self, topic: str, starts: Mapping[int, int]) -> None:
        self._topic, self._next = topic, dict(starts)
        try:
            self._consumer.assign([TopicPartition(topic, p, offset) for p, offset in starts.items()])
        except KafkaException as exc:
            raise self._failed(exc, topic) from exc

    def poll(self, timeout_s: float) -> list[Message]:
        try:
            polled = self._consumer.consume(num_messages=500, timeout=timeout_s)
        except KafkaException as exc:
            raise self._failed(exc, self._topic) from exc
        messages = []
        for m in polled:
            error, partition, offset = m.error(), int(m.partition() or 0), int(m.offset() or 0)
            if error is None:
                kind, stamp = m.timestamp()
                messages.append(Message(partition, offset, m.value(), stamp if kind and stamp >= 0 else None))
                self._next[partition] = offset + 1
            elif error.code() == KafkaError._PARTITION_EOF:  # also past transaction markers at the end
                self._next[partition] = max(self._next.get(partition, 0), offset)
            elif error.code() not in GROUP_ERRORS:
                raise self._failed(error, self._topic)
        return messages

    def position(self, topic: str, partition: int) -> int:
        return self._next.get(partition, -1)

    def close(self) -> None:
        self._consumer.close()
