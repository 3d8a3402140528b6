"""The worker's Kafka edge: one client-independent core (`core`) under two thin clients.

`kafka_python` (kafka-python) and `confluent/` (confluent-kafka, librdkafka) each implement the loop's
`Source` and `Sink`; `open_source`/`open_sink` pick one by `Settings.kafka_client`, importing only that
client. With `--delivery exactly-once`, `open_transactional_sink` gives the confluent source's
transactional counterpart instead. The policy for undecodable record batches is in `core`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from worker.kafka.core import Quarantine, TopicKey

if TYPE_CHECKING:
    from worker.config import Settings
    from worker.loop import Sink, Source

__all__ = ["Quarantine", "open_sink", "open_source", "open_transactional_sink"]


def open_source(settings: Settings, on_revoke: Callable[[set[TopicKey]], None] | None = None,
                quarantine: Quarantine | None = None) -> Source:
    """A consumer group member of the chosen client; raises BrokerUnavailable when no broker answers."""
    if settings.kafka_client == "kafka-python":
        from worker.kafka.kafka_python import KafkaSource
        return KafkaSource(settings, on_revoke=on_revoke, quarantine=quarantine)
    from worker.kafka.confluent import ConfluentSource
    return ConfluentSource(settings, on_revoke=on_revoke, quarantine=quarantine)


def open_transactional_sink(settings: Settings, source: Source) -> Sink:
    """Exactly-once: a transactional producer committing `source`'s offsets with its group metadata."""
    from worker.kafka.confluent import ConfluentSource, ConfluentTransactionalSink
    if not isinstance(source, ConfluentSource):
        raise TypeError(f"exactly-once needs the confluent-kafka source, got {type(source).__name__}")
    return ConfluentTransactionalSink(settings, source.group_metadata)


def open_sink(settings: Settings) -> Sink:
    """An idempotent producer of the chosen client; raises BrokerUnavailable when no broker answers."""
    if settings.kafka_client == "kafka-python":
        from worker.kafka.kafka_python import KafkaSink
        return KafkaSink(settings)
    from worker.kafka.confluent import ConfluentSink
    return ConfluentSink(settings)
