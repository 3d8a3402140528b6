"""Window state of the worker: one `WindowState` per assigned partition of the input topic. Pure: no Kafka.

The pipeline hands each batch's valid events here (`features`), once per batch; the restore protocol
(worker/kafka/) hands replayed records (`replay`), asks what to write as commit metadata (`commit_metadata`)
and says what was committed, assigned and revoked. A partition that was never `assign`ed gets an empty
state at its first records.

Windows are exact when the topic is keyed by entity, so that all of an entity's events are in one partition,
in order. An entity key seen on two partitions means they are not: it is counted
(`anomaly_window_entity_partition_changes_total`) and a warning, at most one a minute, names the entity and
both partitions. Which partition each key was last seen on is kept for the `MAX_OWNERS` most recent keys.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from training.window_state import RestorePoint, WindowInputs, WindowState, entity_key
from training.windows import WindowSpec, entity_name
from worker.config import DEFAULT_WINDOW_MAX_BYTES
from worker.kafka.core import describe
from worker.records import Record

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

Key = tuple[str, int]
#: How many entity keys the keyed-topic check remembers (least recently seen forgotten first): ~25 MB at most.
MAX_OWNERS = 65_536
#: At most one keyed-topic warning per this many seconds; the events in between are counted into the next.
WARN_EVERY_S = 60.0
#: Longest part of an entity key a log line shows.
SHOWN_KEY_CHARS = 64
DEFAULT_MAX_BYTES = DEFAULT_WINDOW_MAX_BYTES


class PartitionWindows:
    """One WindowState per assigned partition of the input topic; pure (no Kafka)."""

    def __init__(self, spec: WindowSpec | None, max_entities: int, max_bytes: int | None,
                 metrics: WorkerMetrics | None = None, clock: Callable[[], float] = time.monotonic,
                 max_owners: int = MAX_OWNERS, warn_every_s: float = WARN_EVERY_S) -> None:
        if max_entities < 1:
            raise ValueError(f"window max entities must be at least 1, got {max_entities}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"window max bytes must be at least 1, got {max_bytes}")
        self.spec = spec
        self.max_entities, self.max_bytes = max_entities, max_bytes
        self.metrics, self.clock = metrics, clock
        self.states: dict[Key, WindowState] = {}
        self._owners: OrderedDict[tuple[int, str], int] = OrderedDict()
        self._max_owners, self._warn_every_s = max_owners, warn_every_s
        self._last_warning: float | None = None
        self._unwarned = 0

    @property
    def width(self) -> int:
        return 0 if self.spec is None else len(self.spec.names)

    # -- the scoring path -----------------------------------------------------------------------

    def features(self, records: Sequence[Record], inputs: WindowInputs) -> np.ndarray:
        """The window features of `records` (rows of `inputs`, same order), each partition through its own state."""
        out = np.full((len(records), self.width), np.nan)
        if self.spec is None or not records:
            return out
        for key, rows in _by_partition(records).items():
            part = inputs if len(rows) == len(records) else inputs.take(rows)
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = self._new_state(None)
            out[rows] = state.advance(part, [records[i].offset for i in rows])
            self._check_keyed(key, part)
            outcomes = state.counts.take()
            if self.metrics is not None and outcomes:
                self.metrics.record_window_outcomes(outcomes)
        return out

    def replay(self, records: Sequence[Record], inputs: WindowInputs) -> None:
        """Restore: the records enter the state as in `features`; counted as restored, not again by outcome."""
        if self.spec is None or not records:
            return
        for key, rows in _by_partition(records).items():
            part = inputs if len(rows) == len(records) else inputs.take(rows)
            state = self.states.get(key)
            if state is None:
                state = self.states[key] = self._new_state(None)
            state.advance(part, [records[i].offset for i in rows], features=False)
            self._check_keyed(key, part)
            state.counts.take()  # counted by whoever scored them first
        if self.metrics is not None:
            self.metrics.window_restored_events.inc(len(records))

    def discard(self, records: Sequence[Record], why: BaseException) -> None:
        """The window step failed for `records`: their partitions' states may be half advanced, so they are
        dropped (the next records start them afresh); counted and logged."""
        keys = sorted(_by_partition(records))
        for key in keys:
            self.states.pop(key, None)
        if self.metrics is not None:
            self.metrics.window_failures.inc()
        log.error("window features of %d records failed (%s: %s); they are scored with window features missing and "
                  "the window state of %s starts again empty", len(records), type(why).__name__, why,
                  ", ".join(describe(t, p) for t, p in keys) or "no partition", exc_info=why)

    # -- the restore protocol -------------------------------------------------------------------

    def commit_metadata(self, key: Key, next_offset: int) -> str | None:
        """`RestorePoint.encode()` of that partition's state for a commit of `next_offset`; None if no state."""
        state = self.states.get(key)
        return None if state is None else state.restore_point(next_offset).encode()

    def committed(self, offsets: Mapping[Key, int]) -> None:
        """Offsets were committed: the states forget checkpoints no later restore can need."""
        for key, next_offset in offsets.items():
            if (state := self.states.get(key)) is not None:
                state.forget_before(next_offset)

    def assign(self, key: Key, point: RestorePoint | None) -> None:
        """A fresh state for `key` starting from `point`'s clock (replacing any); replay follows."""
        if self.spec is not None:
            self.states[key] = self._new_state(point)

    def revoke(self, keys: Iterable[Key]) -> None:
        for key in keys:
            self.states.pop(key, None)

    # -- a model with other windows ---------------------------------------------------------------

    def reset(self, spec: WindowSpec | None) -> None:
        """Windows of another spec from now on: every state is dropped (its features mean something else)."""
        if spec is self.spec or spec == self.spec:
            return
        if self.states:
            log.warning("the model's window definitions changed: the window state of %d partitions starts again "
                        "empty", len(self.states))
        self.spec = spec
        self.states.clear()
        self._owners.clear()

    # -- size, read at scrape time ------------------------------------------------------------------

    def entity_count(self) -> int:
        return sum(state.entity_count() for state in list(self.states.values()))

    def estimated_bytes(self) -> int:
        return sum(state.estimated_bytes() for state in list(self.states.values()))

    # -- internals ------------------------------------------------------------------------------

    def _new_state(self, point: RestorePoint | None) -> WindowState:
        assert self.spec is not None
        return WindowState(self.spec, max_entities=self.max_entities, start=point, max_bytes=self.max_bytes)

    def _check_keyed(self, key: Key, inputs: WindowInputs) -> None:
        """Remember which partition each entity key came from; count and warn where one changes partition."""
        assert self.spec is not None
        owners, partition = self._owners, key[1]
        moved = 0
        for e, keys in enumerate(inputs.keys):
            for text in dict.fromkeys(keys):
                kept, _ = entity_key(text)
                if kept is None:
                    continue
                ident = (e, kept)
                before = owners.get(ident)
                owners[ident] = partition
                owners.move_to_end(ident)
                if before is not None and before != partition:
                    moved += 1
                    self._warn(e, text or "", before, key)
        while len(owners) > self._max_owners:
            owners.popitem(last=False)
        if moved and self.metrics is not None:
            self.metrics.window_partition_changes.inc(moved)

    def _warn(self, e: int, text: str, before: int, key: Key) -> None:
        now = self.clock()
        if self._last_warning is not None and now - self._last_warning < self._warn_every_s:
            self._unwarned += 1
            return
        assert self.spec is not None
        shown = text if len(text) <= SHOWN_KEY_CHARS else text[:SHOWN_KEY_CHARS] + f"... ({len(text)} chars)"
        since = f"; {self._unwarned} more since the last warning" if self._unwarned else ""
        log.warning("entity %s %r arrived on partitions %d and %d of %s: window features are exact only when the "
                    "topic is keyed by the entity (docs/windows.md)%s", entity_name(self.spec.entities[e]), shown,
                    before, key[1], key[0], since)
        self._last_warning, self._unwarned = now, 0


def _by_partition(records: Sequence[Record]) -> dict[Key, list[int]]:
    """Row numbers of each partition's records, in batch (so offset) order."""
    groups: dict[Key, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault((record.topic, record.partition), []).append(i)
    return groups
