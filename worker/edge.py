"""What both Kafka clients share: the choice of client, and holding partitions at batches they cannot decode.

No Kafka imports here: `worker/kafka_io.py` (kafka-python) and `worker/kafka_confluent.py` (confluent-kafka,
librdkafka) each implement the loop's `Source` and `Sink`; `open_source`/`open_sink` pick one by
`Settings.kafka_client`. With `--delivery exactly-once`, `open_transactional_sink` gives the confluent
source's transactional counterpart instead.

An undecodable record batch (a codec the client lacks, a corrupt batch) must not crash-loop the worker:

1. The client reports it; the source logs `topic[partition]@offset` at ERROR with the way out below.
2. It pauses that partition at that offset and never hands out or commits anything at or past it;
   the other partitions go on.
3. `anomaly_undecodable_batches_total{topic,partition}` counts it, `anomaly_undecodable_partitions`
   shows how many are held, and `/readyz` fails `batches_decodable` until the partition is released
   (revoked, or the process restarted).

The way out (README, "Undecodable record batches"): install the missing codec library (the image has all
four), or, for a corrupt batch, stop the group and move its offset past the batch with
`kafka-consumer-groups.sh --reset-offsets --to-offset N --topic T:P --group G --execute`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from worker.config import Settings
from worker.metrics import WorkerMetrics

if TYPE_CHECKING:
    from worker.loop import Sink, Source

log = logging.getLogger(__name__)


class Quarantine:
    """Partitions held at a record batch the Kafka client cannot decode; readiness and the held-partitions
    gauge read `held_count()` when asked (worker/health.py)."""

    def __init__(self, metrics: WorkerMetrics | None = None) -> None:
        self.metrics = metrics
        self.held: dict[tuple[str, int], int] = {}

    def hold(self, topic: str, partition: int, offset: int, error: object) -> None:
        """Record that `topic[partition]` cannot get past `offset` (the caller pauses it)."""
        log.error("record batch at %s[%d]@%d cannot be decoded (%s); partition paused there, the others go on. "
                  "Install the missing codec library, or stop the group and reset the partition's offset past "
                  "the batch (README: Undecodable record batches)", topic, partition, offset, error)
        self.held[(topic, partition)] = offset
        if self.metrics is not None:
            self.metrics.record_undecodable_batch(topic, partition)

    def release(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Forget partitions that are no longer ours (revoked or lost)."""
        for tp in list(partitions):
            self.held.pop(tp, None)

    def limit(self, topic: str, partition: int) -> int | None:
        """The offset `topic[partition]` is held at, or None."""
        return self.held.get((topic, partition))

    def held_count(self) -> int:
        """How many partitions are held; safe from any thread (one `len` of a dict is atomic in CPython)."""
        return len(self.held)


def open_source(settings: Settings, on_revoke: Callable[[set[tuple[str, int]]], None] | None = None,
                quarantine: Quarantine | None = None) -> Source:
    """A consumer group member of the chosen client; raises BrokerUnavailable when no broker answers."""
    if settings.kafka_client == "kafka-python":
        from worker.kafka_io import KafkaSource
        return KafkaSource(settings, on_revoke=on_revoke, quarantine=quarantine)
    from worker.kafka_confluent import ConfluentSource
    return ConfluentSource(settings, on_revoke=on_revoke, quarantine=quarantine)


def open_transactional_sink(settings: Settings, source: Source) -> Sink:
    """Exactly-once: a transactional producer committing `source`'s offsets with its group metadata."""
    from worker.kafka_confluent import ConfluentSource, ConfluentTransactionalSink
    if not isinstance(source, ConfluentSource):
        raise TypeError(f"exactly-once needs the confluent-kafka source, got {type(source).__name__}")
    return ConfluentTransactionalSink(settings, source.group_metadata)


def open_sink(settings: Settings) -> Sink:
    """An idempotent producer of the chosen client; raises BrokerUnavailable when no broker answers."""
    if settings.kafka_client == "kafka-python":
        from worker.kafka_io import KafkaSink
        return KafkaSink(settings)
    from worker.kafka_confluent import ConfluentSink
    return ConfluentSink(settings)
