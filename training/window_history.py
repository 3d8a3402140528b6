"""One entity's recent events and the running aggregates of its windows (used by `training.window_state`).

Entries are ordered by (time, arrival). An event at or after the entity's latest time (the usual case) has
windows that are suffixes of the history: each window keeps running aggregates (count, sums, a monotonic
deque for the maximum, value counts for distinct values) updated as events enter and leave, O(1) amortised
per event. An out-of-order event (within the grace period) is computed from its slice of the history and
invalidates the aggregates, which the next in-order event rebuilds.

Both paths give identical numbers for the same window content, so features never depend on how state
was built (one run, many batches, or a restore): sums are exact integers on a 2**-60 grid (an integer sum
does not depend on the order of additions and subtractions), maxima and distinct counts are exact.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence

GRID = 1 << 60
_EXACT = float(1 << 53)  # from here on a float is an integer


def on_grid(value: float) -> int | None:
    """`value` as an integer multiple of 2**-60 (None for NaN): exact for every float of magnitude >= 2**-8."""
    if value != value:
        return None
    return int(value) * GRID if abs(value) >= _EXACT else round(value * GRID)


class _Aggregate:
    """Running count, sums and value counts of one window: entries [lo, end) of the history."""

    __slots__ = ("lo", "sums", "present", "distinct")

    def __init__(self, lo: int, n_numeric: int, n_categorical: int) -> None:
        self.lo = lo
        self.sums = [0] * n_numeric
        self.present = [0] * n_numeric
        self.distinct: list[dict[str, int]] = [{} for _ in range(n_categorical)]

    def enter(self, grid: Sequence[int | None], categorical: Sequence[str | None]) -> None:
        sums, present = self.sums, self.present
        for j, g in enumerate(grid):
            if g is not None:
                sums[j] += g
                present[j] += 1
        for counts, c in zip(self.distinct, categorical, strict=True):
            if c is not None:
                counts[c] = counts.get(c, 0) + 1

    def leave(self, grid: Sequence[int | None], categorical: Sequence[str | None]) -> None:
        """The entry at `lo` leaves the window."""
        sums, present = self.sums, self.present
        for j, g in enumerate(grid):
            if g is not None:
                sums[j] -= g
                present[j] -= 1
        for counts, c in zip(self.distinct, categorical, strict=True):
            if c is not None:
                left = counts[c] - 1
                if left:
                    counts[c] = left
                else:
                    del counts[c]
        self.lo += 1


class History:
    """One entity's events within the horizon: per window an `_Aggregate` (None while invalid), and per numeric
    field one monotonic deque of (position, value) shared by the windows (the maximum of a window is its first
    element at or after the window's `lo`)."""

    __slots__ = ("times", "values", "grid", "categorical", "start", "aggregates", "maxima")

    def __init__(self) -> None:
        self.times: list[int] = []
        self.values: list[tuple[float, ...]] = []
        self.grid: list[tuple[int | None, ...]] = []
        self.categorical: list[tuple[str | None, ...]] = []
        self.start = 0  # entries before it have left (dropped lazily, compacted in bulk)
        self.aggregates: list[_Aggregate] | None = None
        self.maxima: list[deque[tuple[int, float]]] = []

    def __len__(self) -> int:
        return len(self.times) - self.start

    @property
    def latest(self) -> int:
        return self.times[-1]

    def add(self, time: int, values: tuple[float, ...], categorical: tuple[str | None, ...], windows: Sequence[int],
            out: list[float], at: int) -> None:
        """Insert the event and write its features for each window from `out[at]` on (see `_write`)."""
        grid = tuple([on_grid(v) for v in values])
        step = 1 + len(categorical) + 3 * len(values)
        if len(self.times) == self.start or time >= self.times[-1]:
            position = len(self.times)
            aggregates = self._aggregates(len(values), len(categorical), windows, position)
            self.times.append(time)
            self.values.append(values)
            self.grid.append(grid)
            self.categorical.append(categorical)
            for j, value in enumerate(values):
                if value == value:
                    queue = self.maxima[j]
                    while queue and queue[-1][1] <= value:
                        queue.pop()
                    queue.append((position, value))
            lowest = position
            times, grids, cats = self.times, self.grid, self.categorical
            present_grid = [(j, g) for j, g in enumerate(grid) if g is not None]
            present_cats = [(counts_at, c) for counts_at, c in enumerate(categorical) if c is not None]
            for w, length in enumerate(windows):
                aggregate = aggregates[w]
                sums, present, distinct = aggregate.sums, aggregate.present, aggregate.distinct
                for j, g in present_grid:
                    sums[j] += g
                    present[j] += 1
                for k, c in present_cats:
                    counts = distinct[k]
                    counts[c] = counts.get(c, 0) + 1
                cutoff = time - length
                while times[aggregate.lo] <= cutoff:
                    aggregate.leave(grids[aggregate.lo], cats[aggregate.lo])
                lowest = min(lowest, aggregate.lo)
                self._write(aggregate, position + 1 - aggregate.lo, values, grid, self._maxima(aggregate.lo), out,
                            at + w * step)
            for queue in self.maxima:
                while queue and queue[0][0] < lowest:
                    queue.popleft()
            return
        position = bisect_right(self.times, time, self.start)
        self.times.insert(position, time)
        self.values.insert(position, values)
        self.grid.insert(position, grid)
        self.categorical.insert(position, categorical)
        self.aggregates = None
        for w, length in enumerate(windows):
            low = bisect_right(self.times, time - length, self.start, position)
            aggregate = _Aggregate(low, len(values), len(categorical))
            maxima: list[float | None] = [None] * len(values)
            for p in range(low, position + 1):
                aggregate.enter(self.grid[p], self.categorical[p])
                for j, v in enumerate(self.values[p]):
                    if v == v and (maxima[j] is None or v > maxima[j]):  # type: ignore[operator]
                        maxima[j] = v
            self._write(aggregate, position + 1 - low, values, grid, maxima, out, at + w * step)

    def _maxima(self, lo: int) -> list[float | None]:
        """Each numeric field's maximum over the entries from `lo` on (None if all are missing)."""
        out: list[float | None] = []
        for queue in self.maxima:
            for position, value in queue:
                if position >= lo:
                    out.append(value)
                    break
            else:
                out.append(None)
        return out

    def _aggregates(self, n_numeric: int, n_categorical: int, windows: Sequence[int], position: int
                    ) -> list[_Aggregate]:
        """The running aggregates, rebuilt over the live entries before `position` if an insert invalidated them."""
        if self.aggregates is None:
            self.aggregates = [_Aggregate(self.start, n_numeric, n_categorical) for _ in windows]
            self.maxima = [deque() for _ in range(n_numeric)]
            for p in range(self.start, position):
                for aggregate in self.aggregates:
                    aggregate.enter(self.grid[p], self.categorical[p])
                for j, value in enumerate(self.values[p]):
                    if value == value:
                        queue = self.maxima[j]
                        while queue and queue[-1][1] <= value:
                            queue.pop()
                        queue.append((p, value))
        return self.aggregates

    @staticmethod
    def _write(aggregate: _Aggregate, count: int, values: tuple[float, ...], grid: tuple[int | None, ...],
               maxima: list[float | None], out: list[float], at: int) -> None:
        """count, distinct per categorical field, then mean, max, ratio per numeric field."""
        out[at] = count
        at += 1
        for counts in aggregate.distinct:
            out[at] = len(counts)
            at += 1
        for j, value in enumerate(values):
            present = aggregate.present[j]
            if present:
                total = aggregate.sums[j]
                out[at] = total / (present * GRID)
                out[at + 1] = maxima[j]  # type: ignore[call-overload]
                g = grid[j]
                if g is not None:
                    if present == 1:
                        out[at + 2] = 1.0
                    else:
                        mean = (total - g) / ((present - 1) * GRID)
                        out[at + 2] = (value + 1.0) / (mean + 1.0) if mean + 1.0 > 0 else math.nan
            at += 3

    def drop_until(self, cutoff: int) -> int:
        """Entries with time <= cutoff leave (they are in no window of an event at or after the caller's time)."""
        end = bisect_right(self.times, cutoff, self.start)
        dropped = end - self.start
        if dropped:
            if self.aggregates is not None and any(a.lo < end for a in self.aggregates):
                self.aggregates = None
            self.start = end
            self._compact()
        return dropped

    def drop_oldest(self) -> None:
        """The oldest entry leaves early (the entity holds too many)."""
        if self.aggregates is not None:
            for aggregate in self.aggregates:
                if aggregate.lo == self.start:
                    aggregate.leave(self.grid[self.start], self.categorical[self.start])
        self.start += 1
        for queue in self.maxima:
            while queue and queue[0][0] < self.start:
                queue.popleft()
        self._compact()

    def _compact(self) -> None:
        if self.start < 64 or self.start * 2 < len(self.times):
            return
        shift = self.start
        del self.times[:shift], self.values[:shift], self.grid[:shift], self.categorical[:shift]
        self.start = 0
        for aggregate in self.aggregates or ():
            aggregate.lo -= shift
        self.maxima = [deque((p - shift, v) for p, v in queue) for queue in self.maxima]


def stride(values: Sequence[float], categorical: Sequence[str | None]) -> int:
    """Columns per window: count, one per categorical field, three per numeric field."""
    return 1 + len(categorical) + 3 * len(values)
