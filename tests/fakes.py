"""In-memory Source and Sink for unit tests of the loop (no broker); the contract suite checks them too."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from worker.errors import CommitError, RebalanceInProgress
from worker.kafka.core import Offsets
from worker.records import Alert, DeadLetter, Record

TOPIC = "events"


class FakeClock:
    """A monotonic clock that moves only when a test says so: components that decide by time take a clock."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class ListSource:
    """Hands out the given batches in order, then empty polls; records what was committed."""

    def __init__(self, batches: list[list[Record]]) -> None:
        self.batches = list(batches)
        self.committed: dict[tuple[str, int], int] = {}

    def poll_batch(self) -> list[Record]:
        return self.batches.pop(0) if self.batches else []

    def commit(self, offsets: Offsets) -> None:
        self.committed.update(offsets)

    def rewind(self, offsets: Offsets) -> None: ...

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


class FakeSource:
    """Partitions as in-memory lists; a position and a committed offset per partition, like a consumer."""

    def __init__(self, log: list[tuple], partitions: dict[int, list[bytes]], max_batch: int = 4) -> None:
        self.log = log
        self.data = {(TOPIC, p): values for p, values in partitions.items()}
        self.position = {tp: 0 for tp in self.data}
        self.committed: dict[tuple[str, int], int] = {}
        self.max_batch = max_batch
        self.fail_commits = 0
        self.rebalancing = False
        self.broker_up = True
        self.on_empty: threading.Event | None = None

    def poll_batch(self) -> list[Record]:
        out: list[Record] = []
        for (topic, p), values in sorted(self.data.items()):
            while self.position[(topic, p)] < len(values) and len(out) < self.max_batch:
                offset = self.position[(topic, p)]
                out.append(Record(topic, p, offset, None, values[offset], timestamp_ms=None))
                self.position[(topic, p)] += 1
        self.log.append(("poll", [(r.partition, r.offset) for r in out]))
        if not out and self.on_empty is not None:
            self.on_empty.set()
        return out

    def commit(self, offsets: Offsets) -> None:
        if self.rebalancing:
            self.log.append(("commit-deferred", dict(offsets)))
            raise RebalanceInProgress("rebalancing")
        if self.fail_commits:
            self.fail_commits -= 1
            self.log.append(("commit-failed", dict(offsets)))
            raise CommitError("coordinator not available")
        # Like a consumer: only partitions it holds are committed; anything else given is ignored.
        self.committed.update({tp: o for tp, o in offsets.items() if tp in self.data})
        self.log.append(("commit", dict(offsets)))

    def rewind(self, offsets: Offsets) -> None:
        self.position.update(offsets)
        self.log.append(("rewind", dict(offsets)))

    def lag(self) -> dict[tuple[str, int], int]:
        return {tp: len(v) - self.position[tp] for tp, v in self.data.items()}

    def assigned(self) -> set[tuple[str, int]]:
        return set(self.data)

    def close(self) -> None:
        self.log.append(("close_source",))

    def reachable(self) -> bool:
        self.log.append(("reachable", self.broker_up))
        return self.broker_up
