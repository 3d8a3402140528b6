"""Producing keyed records for anomaly-replay: one small interface, a thin adapter per client
(`producer_confluent.py`, `producer_kafka_python.py`), picked by `clients.open_producer`. Each delivery is
checked: `flush` raises SendError, worded as the client's first failure (a missing WRITE ACL names it,
docs/security.md).
"""

from __future__ import annotations

from typing import Protocol

from worker.errors import WorkerError


class SendError(WorkerError):
    """A record was not delivered, or no broker could be reached; the message says why."""


class RecordProducer(Protocol):
    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        """Queue one record (acks=all); a failed delivery is raised by `flush`."""

    def flush(self, timeout_s: float) -> None:
        """Wait for every queued record; SendError if one was not delivered."""

    def close(self) -> None: ...
