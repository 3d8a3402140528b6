"""Window state: one partition's (or one file's) per-entity history, and the window features of each event.

Pure: no Kafka, no files, no wall clock. A file is one `WindowState` fed all its rows in order; a topic has
one per partition, fed its records in offset order, batch after batch. Batch boundaries change nothing:
`advance` on a sequence in one call or in many gives the same features (the property test checks it).

Time (all in integer milliseconds, so comparisons are exact):
1. An event's time is its time field (epoch seconds, ISO 8601 text, a Parquet timestamp: the data
   contract's one meaning) or, for `@record`, the Kafka record's timestamp.
2. Unusable (missing, not a number, before 2000 or from 2100 on): the event is windowed at the partition's
   watermark (the latest usable time seen), counted `no_time` or `absurd_time`; before any usable time it
   enters no window and its features are missing.
3. More than a day ahead of the watermark: windowed at the watermark, counted `ahead`, unless it is the
   third such event in a row (a real gap in the traffic): then the watermark jumps to it.
4. Behind the watermark by more than the grace period: windowed at watermark - grace, counted `late`.
   Within the grace it is windowed at its own time (out-of-order events are exact within the grace).
5. An event's window of length w holds the entity's events with time in (t - w, t] that arrived before it,
   and itself.

State stays bounded: entries older than watermark - grace - longest window can be in no future window and
leave; an entity with none left is dropped; at most `max_entities` entities per entity definition (the least
recently seen is evicted) and `max_events` entries per entity (the oldest leave early).
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from training.window_history import History, distinct_in, window_stats
from training.windows import WindowSpec

MIN_TIME_MS = 946_684_800_000  # 2000-01-01
MAX_TIME_MS = 4_102_444_800_000  # 2100-01-01
MAX_AHEAD_MS = 86_400_000
RESYNC_AFTER = 3
#: A key longer than this (UTF-8 bytes) is kept as its 128-bit BLAKE2b digest, so a huge key costs no memory.
MAX_KEY_BYTES = 128
DEFAULT_MAX_ENTITIES = 100_000
#: Restore checkpoints kept per partition before neighbours are merged (merging only moves restores earlier).
MAX_CHECKPOINTS = 256
#: Estimated bytes of an entity with no entries, and of one entry besides 8 bytes per summarised field, as
#: measured with tracemalloc (`python -m benchmarks.windows --parts memory`: 2,080 and 239 on the network
#: spec; benchmarks/results/windows.md); the state's byte limit is checked against these.
ENTITY_BYTES = 2_100
ENTRY_BYTES = 240
OUTCOMES = ("no_time", "absurd_time", "ahead", "late", "no_entity", "long_key", "evicted", "truncated")


@dataclass(frozen=True)
class WindowInputs:
    """What the windows read of n events: times (epoch s, NaN unusable), keys per entity, summarised values."""

    times: np.ndarray  # float64 seconds
    keys: list[list[str | None]]  # one list per entity definition
    numeric: np.ndarray  # (n, len(spec.numeric)) float64, NaN missing
    categorical: list[list[str | None]]  # one list per categorical field

    @property
    def rows(self) -> int:
        return int(self.times.size)

    def take(self, rows: Sequence[int]) -> WindowInputs:
        index = np.asarray(rows, dtype=np.intp)
        return WindowInputs(times=self.times[index], keys=[[k[i] for i in rows] for k in self.keys],
                            numeric=self.numeric[index], categorical=[[c[i] for i in rows] for c in self.categorical])


@dataclass
class Counts:
    """Events by outcome (see OUTCOMES) since the last `take`."""

    by_outcome: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    def add(self, outcome: str, n: int = 1) -> None:
        self.by_outcome[outcome] += n

    def take(self) -> dict[str, int]:
        out = {k: v for k, v in self.by_outcome.items() if v}
        self.by_outcome = dict.fromkeys(OUTCOMES, 0)
        return out


@dataclass(frozen=True)
class RestorePoint:
    """Where a partition's state can be rebuilt from: replay offsets [offset, committed) starting from this clock."""

    offset: int
    watermark_ms: int | None
    ahead: int

    def encode(self) -> str:
        wm = "" if self.watermark_ms is None else str(self.watermark_ms)
        return f"w1:{self.offset}:{wm}:{self.ahead}"

    @classmethod
    def decode(cls, text: str | None) -> RestorePoint | None:
        """The commit metadata written by `encode`; anything else (another writer, none) is None."""
        if not text or not text.startswith("w1:"):
            return None
        try:
            _, offset, wm, ahead = text.split(":")
            return cls(int(offset), int(wm) if wm else None, int(ahead))
        except ValueError:
            return None


@dataclass
class _Checkpoint:
    first: int  # first offset
    last: int  # last offset
    watermark_before: int | None
    ahead_before: int
    watermark_after: int | None
    ahead_after: int
    newest: int | None  # latest effective time stored by these offsets


def entity_key(text: str | None) -> tuple[str | None, bool]:
    """(the key kept in the state, whether it was too long and hashed)."""
    if text is None:
        return None, False
    if len(text) * 4 <= MAX_KEY_BYTES or len(text.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES:
        return text, False
    return "#" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest(), True


class WindowState:
    """One partition's window state; `advance` computes the features of the next events and remembers them."""

    def __init__(self, spec: WindowSpec, max_entities: int = DEFAULT_MAX_ENTITIES,
                 start: RestorePoint | None = None, max_bytes: int | None = None) -> None:
        self.spec = spec
        self.max_entities = max_entities
        self.max_bytes = max_bytes
        self.watermark: int | None = start.watermark_ms if start else None
        self.ahead = start.ahead if start else 0
        self.entities: list[OrderedDict[str, History]] = [OrderedDict() for _ in spec.entities]
        self.counts = Counts()
        self.entries = 0
        self._checkpoints: deque[_Checkpoint] = deque()
        self._windows = [w.ms for w in spec.windows]
        self._per_window = len(spec.per_window())
        self._grace = round(spec.grace_s * 1000)
        self._horizon = spec.longest_ms + self._grace
        self._longest = spec.longest_ms

    @property
    def width(self) -> int:
        return len(self.spec.names)

    def entity_count(self) -> int:
        return sum(len(e) for e in self.entities)

    def estimated_bytes(self) -> int:
        """The state's memory, estimated from its entity and entry counts (benchmarks/windows.py measures the sizes)."""
        per_entry = ENTRY_BYTES + 8 * len(self.spec.numeric) + 8 * len(self.spec.categorical)
        return self.entity_count() * ENTITY_BYTES + self.entries * per_entry

    def advance(self, inputs: WindowInputs, offsets: Sequence[int] | None = None, features: bool = True
                ) -> np.ndarray:
        """The window features of `inputs`' events, in order (n x width, NaN where unknown); they join the state.

        1. Each event's effective time, in order (moves the watermark; module docstring, steps 2-4).
        2. Per entity definition, events grouped by entity. An entity whose events of this call are in time
           order after its history (the usual case) has all its windows computed at once, with every such
           entity's, by `window_stats`; any other entity's events are inserted and computed one by one.
        3. Then the limits: expired entries and entities leave, the oldest entries of an entity over
           `max_events` leave, the least recently seen entities over `max_entities` or `max_bytes` are evicted.

        `features=False` (a restore's replay) changes the state exactly as `True` would and skips computing
        the features (the array returned is all NaN).
        """
        n = inputs.rows
        out = np.full((n, self.width), np.nan)
        before = (self.watermark, self.ahead)
        times = [self._effective_time(value) for value in inputs.times.tolist()]
        stored = np.zeros(n, dtype=bool)
        touched: list[list[str]] = []
        for e, keys in enumerate(inputs.keys):
            groups: dict[str, list[int]] = {}
            for row, key in enumerate(keys):
                if times[row] is None:
                    continue
                kept, hashed = entity_key(key)
                if kept is None:
                    self.counts.add("no_entity")
                    continue
                if hashed:
                    self.counts.add("long_key")
                groups.setdefault(kept, []).append(row)
                stored[row] = True
            self._entity_groups(e, groups, times, inputs, out, features)
            touched.append(list(groups))
        newest = max((t for t, keep in zip(times, stored.tolist(), strict=True) if keep and t is not None),
                     default=None)
        self._limit(touched)
        if offsets is not None and n:
            self._checkpoints.append(_Checkpoint(offsets[0], offsets[-1], before[0], before[1], self.watermark,
                                                 self.ahead, newest))
            self._merge_checkpoints()
        return out

    def _entity_groups(self, e: int, groups: dict[str, list[int]], times: list[int | None], inputs: WindowInputs,
                       out: np.ndarray, features: bool) -> None:
        """Step 2 for one entity definition: every group's events join its history and get their features."""
        table = self.entities[e]
        in_order: list[tuple[History, list[int], list[int]]] = []
        for key, rows in groups.items():
            history = table.get(key)
            if history is None:
                history = table[key] = History(len(self.spec.numeric))
            else:
                table.move_to_end(key)
            stamps: list[int] = [times[row] for row in rows]  # type: ignore[misc]  # rows have a time
            if (not len(history) or stamps[0] >= history.latest) and all(
                    a <= b for a, b in zip(stamps, stamps[1:], strict=False)):
                in_order.append((history, rows, stamps))
            else:
                for row, stamp in zip(rows, stamps, strict=True):
                    self._one_by_one(e, history, row, stamp, inputs, out, features)
            self.entries += len(rows)
        if in_order:
            self._at_once(e, in_order, inputs, out, features)

    def _columns(self, e: int, w: int) -> int:
        return (e * len(self._windows) + w) * self._per_window

    def _at_once(self, e: int, groups: list[tuple[History, list[int], list[int]]], inputs: WindowInputs,
                 out: np.ndarray, features: bool = True) -> None:
        """Windows of in-order events: they join their histories; each entity's entries that a window can hold
        are laid end to end, and one `window_stats` call per window computes every event's numeric statistics."""
        n_numeric, n_categorical = len(self.spec.numeric), len(self.spec.categorical)
        n_windows = len(self._windows)
        rows_all = [row for _, rows, _ in groups for row in rows]
        target = np.asarray(rows_all, dtype=np.intp)
        new_values = inputs.numeric[target] if n_numeric else np.empty((len(rows_all), 0))
        rows_categorical = list(zip(*inputs.categorical, strict=True)) if n_categorical else []
        if not features:  # the histories' kept value counts stay valid: appending leaves their runs as they are
            done = 0
            for history, rows, stamps in groups:
                history.extend(stamps, new_values[done:done + len(rows)],
                               [rows_categorical[row] for row in rows] if n_categorical else [()] * len(rows))
                done += len(rows)
            return
        held: list[tuple[History, int, int]] = []  # (history, its first entry a window can hold, where it goes)
        position: list[int] = []  # where each new event goes
        lows: list[list[int]] = [[] for _ in range(n_windows)]  # where each event's window starts, per window
        local: list[list[int]] = [[] for _ in range(n_windows)]  # the same as an index into its history
        total = done = 0
        for history, rows, stamps in groups:
            first = bisect_right(history.times, stamps[0] - self._longest, history.start)
            joined = len(history.times)
            history.extend(stamps, new_values[done:done + len(rows)],
                           [rows_categorical[row] for row in rows] if n_categorical else [()] * len(rows))
            times, begin = history.times, total - first
            for k, stamp in enumerate(stamps):
                position.append(begin + joined + k)
                for w, length in enumerate(self._windows):
                    low = bisect_right(times, stamp - length, first, joined + k)
                    lows[w].append(begin + low)
                    local[w].append(low)
            held.append((history, first, total))
            total += len(times) - first
            done += len(rows)
        at_position = np.asarray(position, dtype=np.intp)
        values = np.empty((total, n_numeric))
        if n_numeric:
            for history, first, begin in held:
                values[begin:begin + len(history.times) - first] = history.values[first:len(history.times)]
        for w in range(n_windows):
            run_start = np.asarray(lows[w], dtype=np.intp)
            at = self._columns(e, w)
            out[target, at] = at_position - run_start + 1
            if n_categorical:
                ends = [p + 1 for p in position]
                counts: list[list[int]] = []
                done = 0
                for (history, first, begin), (_, rows, _) in zip(held, groups, strict=True):
                    shift = first - begin
                    counts.extend(history.distinct_runs(w, n_windows, n_categorical, local[w][done:done + len(rows)],
                                                        [end + shift for end in ends[done:done + len(rows)]]))
                    done += len(rows)
                out[target, at + 1:at + 1 + n_categorical] = counts
            if n_numeric:
                mean, maxima, ratio = window_stats(values, np.column_stack([run_start, at_position + 1]), new_values)
                first_column = at + 1 + n_categorical
                out[target, first_column:first_column + 3 * n_numeric:3] = mean
                out[target, first_column + 1:first_column + 3 * n_numeric:3] = maxima
                out[target, first_column + 2:first_column + 3 * n_numeric:3] = ratio

    def _one_by_one(self, e: int, history: History, row: int, stamp: int, inputs: WindowInputs,
                    out: np.ndarray, features: bool = True) -> None:
        """An event before its entity's latest (within the grace): inserted, its windows computed from its run."""
        n_numeric, n_categorical = len(self.spec.numeric), len(self.spec.categorical)
        value = inputs.numeric[row] if n_numeric else np.empty(0)
        position = history.insert(stamp, value, tuple(values[row] for values in inputs.categorical))
        if not features:
            return
        for w, length in enumerate(self._windows):
            low = bisect_right(history.times, stamp - length, history.start, position)
            at = self._columns(e, w)
            out[row, at] = position - low + 1
            if n_categorical:
                out[row, at + 1:at + 1 + n_categorical] = distinct_in(
                    history.categorical, low, position + 1, n_categorical)
            if n_numeric:
                run = history.rows(low)[:position + 1 - low]
                mean, maxima, ratio = window_stats(run, np.array([[0, len(run)]]), value.reshape(1, -1))
                first = at + 1 + n_categorical
                out[row, first:first + 3 * n_numeric:3] = mean[0]
                out[row, first + 1:first + 3 * n_numeric:3] = maxima[0]
                out[row, first + 2:first + 3 * n_numeric:3] = ratio[0]

    def _limit(self, touched: list[list[str]]) -> None:
        """Step 3 of `advance`: the entities of this call drop what left their windows and what is over
        `max_events`; entities seen least recently leave once all their entries have expired (an entity not
        seen keeps expired entries until then: they are in no window, only in the byte estimate)."""
        cutoff = None if self.watermark is None else self.watermark - self._horizon
        for table, keys in zip(self.entities, touched, strict=True):
            for key in keys:
                history = table[key]
                if cutoff is not None:
                    self.entries -= history.drop_until(cutoff)
                if len(history) > self.spec.max_events:
                    extra = len(history) - self.spec.max_events
                    history.drop_oldest(extra)
                    self.entries -= extra
                    self.counts.add("truncated", extra)
            while table and cutoff is not None:
                key, history = next(iter(table.items()))
                if len(history) and history.latest > cutoff:
                    break
                self.entries -= len(history)
                del table[key]
            while len(table) > self.max_entities or (
                    self.max_bytes is not None and len(table) > 1 and self.estimated_bytes() > self.max_bytes):
                _, evicted = table.popitem(last=False)
                self.entries -= len(evicted)
                self.counts.add("evicted")

    def _effective_time(self, value: float) -> int | None:
        """Steps 2-4 of the module docstring for one event; moves the watermark."""
        if math.isnan(value) or math.isinf(value):
            self.counts.add("no_time")
            return self.watermark
        t = round(value * 1000)
        if not MIN_TIME_MS <= t < MAX_TIME_MS:
            self.counts.add("absurd_time")
            return self.watermark
        if self.watermark is None:
            self.watermark = t
            return t
        if t > self.watermark + MAX_AHEAD_MS:
            self.ahead += 1
            if self.ahead < RESYNC_AFTER:
                self.counts.add("ahead")
                return self.watermark
            self.watermark, self.ahead = t, 0
            return t
        self.ahead = 0
        if t < self.watermark - self._grace:
            self.counts.add("late")
            return self.watermark - self._grace
        self.watermark = max(self.watermark, t)
        return t

    def _merge_checkpoints(self) -> None:
        while len(self._checkpoints) > MAX_CHECKPOINTS:
            a = self._checkpoints.popleft()
            b = self._checkpoints.popleft()
            newest = b.newest if a.newest is None else a.newest if b.newest is None else max(a.newest, b.newest)
            self._checkpoints.appendleft(_Checkpoint(a.first, b.last, a.watermark_before, a.ahead_before,
                                                     b.watermark_after, b.ahead_after, newest))

    def restore_point(self, next_offset: int) -> RestorePoint:
        """Where to rebuild this state from for a consumer that will start at `next_offset`.

        Replaying the offsets [point.offset, next_offset) from the point's clock rebuilds exactly what this
        state held when it had taken every offset before `next_offset`: every entry it held then came from
        those offsets, and the clock and expiry only ever depend on the events fed.
        """
        done = [c for c in self._checkpoints if c.last < next_offset]
        if not done:
            return RestorePoint(next_offset, self.watermark, self.ahead) if not self._checkpoints else \
                RestorePoint(self._checkpoints[0].first, self._checkpoints[0].watermark_before,
                             self._checkpoints[0].ahead_before)
        last = done[-1]
        cutoff = None if last.watermark_after is None else last.watermark_after - self._horizon
        for c in done:
            if c.newest is not None and (cutoff is None or c.newest > cutoff):
                return RestorePoint(c.first, c.watermark_before, c.ahead_before)
        return RestorePoint(last.last + 1, last.watermark_after, last.ahead_after)

    def forget_before(self, next_offset: int) -> None:
        """Checkpoints no restore from `next_offset` on can need (after it is committed)."""
        point = self.restore_point(next_offset)
        while self._checkpoints and self._checkpoints[0].last < point.offset:
            self._checkpoints.popleft()


def window_features(spec: WindowSpec, inputs: WindowInputs) -> tuple[np.ndarray, dict[str, int]]:
    """A file's window features: its rows in order through one state, as one partition of a topic would be."""
    state = WindowState(spec, max_entities=max(DEFAULT_MAX_ENTITIES, inputs.rows))
    features = state.advance(inputs)
    return features, state.counts.take()
