"""In-memory Source and Sink for unit tests of the loop (no broker); the contract suite checks them too."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from worker.records import Alert, DeadLetter, Record


class ListSource:
    """Hands out the given batches in order, then empty polls; records what was committed."""

    def __init__(self, batches: list[list[Record]]) -> None:
        self.batches = list(batches)
        self.committed: dict[tuple[str, int], int] = {}

    def poll_batch(self) -> list[Record]:
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: Mapping[tuple[str, int], int]) -> None:
        self.committed.update(offsets)

    def rewind(self, offsets: Mapping[tuple[str, int], int]) -> None: ...

    def lag(self) -> dict[tuple[str, int], int]:
        return {}

    def assigned(self) -> set[tuple[str, int]]:
        return {(r.topic, r.partition) for batch in self.batches for r in batch} or {("events", 0)}

    def reachable(self) -> bool:
        return True

    def close(self) -> None: ...


class ListSink:
    """Keeps every published alert and dead letter."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.dead_letters: list[DeadLetter] = []

    def publish(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter]) -> None:
        self.alerts.extend(alerts)
        self.dead_letters.extend(dead_letters)

    def close(self) -> None: ...
