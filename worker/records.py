"""Plain data crossing the boundary between Kafka I/O and the pipeline (no Kafka imports here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from training.contract import Reason
from worker.kafka.core import describe


class Record(NamedTuple):
    """One consumed Kafka record.

    A named tuple rather than a frozen dataclass: the source builds one per record, and a frozen
    dataclass's constructor took about five times as long, which showed in every batch's processing time."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    timestamp_type: int = 0  # 0: the producer's CreateTime, 1: the broker's LogAppendTime

    @property
    def where(self) -> str:
        """`topic[partition]@offset`, the form every log line uses."""
        return describe(self.topic, self.partition, self.offset)


class Alert(NamedTuple):
    """An anomalous event: its deterministic id and the alert document to publish (a named tuple, as Record)."""

    alert_id: str
    record: Record
    document: dict[str, Any]
    event_time_s: float | None = None


@dataclass(frozen=True)
class DeadLetter:
    """An event that cannot be scored: original bytes plus why, published to the dead-letter topic."""

    record: Record
    reason: Reason
    error: str
    model_version: str = ""
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    def kafka_headers(self) -> list[tuple[str, bytes | None]]:
        """The input record's own headers, then the `dlq.*` headers (which win where names repeat)."""
        return [
            *self.record.headers,
            ("dlq.reason", self.reason.encode()),
            ("dlq.error", self.error.encode("utf-8", "replace")),
            ("dlq.source.topic", self.record.topic.encode()),
            ("dlq.source.partition", str(self.record.partition).encode()),
            ("dlq.source.offset", str(self.record.offset).encode()),
            ("dlq.model.version", self.model_version.encode()),
        ]
