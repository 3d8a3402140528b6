"""Entity histories and the window arithmetic (used by `training.window_state`, batch by batch).

A `History` holds one entity's events within the horizon, ordered by (time, arrival): times, a matrix of the
summarised numeric values (NaN missing) and the categorical values. An event's window is the run of its
entity's entries [lo, itself]; its statistics are computed by `window_stats` over that run, one numpy call
per statistic for a whole batch (`np.add.reduceat` and friends over index pairs).

Numbers never depend on how the state was built (one call, many batches, or a restore): every statistic is a
function of the run's values in order, computed by the same numpy reductions on the same rows, so one run
gives the same bits whichever path produced it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import numpy as np


class _Distinct:
    """Value counts of each categorical field over the entries [lo, hi) of a history."""

    __slots__ = ("lo", "hi", "counts")

    def __init__(self, lo: int, n_fields: int) -> None:
        self.lo = self.hi = lo
        self.counts: list[dict[str, int]] = [{} for _ in range(n_fields)]

    def enter(self, values: tuple[str | None, ...]) -> None:
        for field, value in zip(self.counts, values, strict=True):
            if value is not None:
                field[value] = field.get(value, 0) + 1

    def leave(self, values: tuple[str | None, ...]) -> None:
        for field, value in zip(self.counts, values, strict=True):
            if value is not None:
                left = field[value] - 1
                if left:
                    field[value] = left
                else:
                    del field[value]


class History:
    """One entity's events within the horizon (entries before `start` have left and are compacted in bulk).

    `distinct` keeps, per window, the value counts of the entity's latest window between calls, so an event
    costs O(1) dictionary steps per categorical field; an out-of-order insert drops them (rebuilt when needed).
    """

    __slots__ = ("times", "values", "categorical", "start", "distinct")

    def __init__(self, n_numeric: int) -> None:
        self.times: list[int] = []
        self.values = np.empty((4, n_numeric))
        self.categorical: list[tuple[str | None, ...]] = []
        self.start = 0
        self.distinct: list[_Distinct | None] | None = None

    def distinct_runs(self, w: int, n_windows: int, n_fields: int, lows: Sequence[int], highs: Sequence[int]
                      ) -> list[list[int]]:
        """Distinct present values per categorical field over runs [lo, hi) of this history (both ends
        non-decreasing), continuing window `w`'s counts from the previous call where they still apply."""
        if self.distinct is None:
            self.distinct = [None] * n_windows
        kept = self.distinct[w]
        if kept is None or kept.lo > lows[0]:
            kept = self.distinct[w] = _Distinct(lows[0], n_fields)
        entries = self.categorical
        out: list[list[int]] = []
        for lo, hi in zip(lows, highs, strict=True):
            if lo >= kept.hi:
                kept = self.distinct[w] = _Distinct(lo, n_fields)
            while kept.hi < hi:
                kept.enter(entries[kept.hi])
                kept.hi += 1
            while kept.lo < lo:
                kept.leave(entries[kept.lo])
                kept.lo += 1
            out.append([len(field) for field in kept.counts])
        return out

    def _forget(self) -> None:
        """Entries before `start` left: they leave the kept counts too."""
        for kept in self.distinct or ():
            if kept is None:
                continue
            while kept.lo < min(self.start, kept.hi):
                kept.leave(self.categorical[kept.lo])
                kept.lo += 1
            kept.lo = max(kept.lo, self.start)
            kept.hi = max(kept.hi, kept.lo)

    def __len__(self) -> int:
        return len(self.times) - self.start

    @property
    def latest(self) -> int:
        return self.times[-1]

    def rows(self, first: int) -> np.ndarray:
        return self.values[first:len(self.times)]

    def extend(self, times: list[int], values: np.ndarray, categorical: list[tuple[str | None, ...]]) -> None:
        """Append events at or after the latest time."""
        end = len(self.times)
        self._room(end + len(times))
        self.values[end:end + len(times)] = values
        self.times.extend(times)
        self.categorical.extend(categorical)

    def insert(self, time: int, values: np.ndarray, categorical: tuple[str | None, ...]) -> int:
        """Insert one event in time order (after equal times); its position."""
        position = bisect_right(self.times, time, self.start)
        end = len(self.times)
        self._room(end + 1)
        self.values[position + 1:end + 1] = self.values[position:end].copy()
        self.values[position] = values
        self.times.insert(position, time)
        self.categorical.insert(position, categorical)
        self.distinct = None
        return position

    def _room(self, size: int) -> None:
        if size > len(self.values):
            grown = np.empty((max(size, 2 * len(self.values)), self.values.shape[1]))
            grown[:len(self.times)] = self.values[:len(self.times)]
            self.values = grown

    def drop_until(self, cutoff: int) -> int:
        """Entries with time <= cutoff leave (no later window can hold them); how many."""
        end = bisect_right(self.times, cutoff, self.start)
        dropped = end - self.start
        self.start = end
        self._forget()
        self._compact()
        return dropped

    def drop_oldest(self, n: int) -> None:
        self.start += n
        self._forget()
        self._compact()

    def _compact(self) -> None:
        if self.start < 32 or self.start * 2 < len(self.times):
            return
        shift, end = self.start, len(self.times)
        self.values[:end - shift] = self.values[shift:end].copy()
        del self.times[:shift], self.categorical[:shift]
        self.start = 0
        for kept in self.distinct or ():
            if kept is not None:
                kept.lo -= shift
                kept.hi -= shift


def window_stats(values: np.ndarray, runs: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, ...]:
    """Mean, max and ratio of each numeric column over each run [lo, hi) of `values`.

    `runs` is (k, 2) with the runs in increasing order (so the stretches between them, which `reduceat` also
    reduces, add up to at most the whole matrix); `current` holds the value of the event each run ends with.
    Ratio: (current + 1) / (mean of the run's other present values + 1); 1 when there is none.
    """
    padded = np.vstack([values, np.zeros((1, values.shape[1]))])
    present = ~np.isnan(padded)
    index = runs.reshape(-1)
    totals = np.add.reduceat(np.where(present, padded, 0.0), index, axis=0)[::2]
    counts = np.add.reduceat(present.astype(np.int64), index, axis=0)[::2]
    maxima = np.fmax.reduceat(padded, index, axis=0)[::2]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)
        has = ~np.isnan(current)
        earlier = counts - has
        previous = np.where(earlier > 0, (totals - np.where(has, current, 0.0)) / np.maximum(earlier, 1), np.nan)
        ratio = np.where(earlier > 0, (current + 1.0) / (previous + 1.0), 1.0)
        ratio = np.where(has & ((earlier == 0) | (previous + 1.0 > 0)), ratio, np.nan)
    return mean, maxima, ratio


def distinct_in(categorical: Sequence[tuple[str | None, ...]], lo: int, hi: int, n_fields: int) -> list[int]:
    """The number of distinct present values of each categorical field over the entries [lo, hi)."""
    run = categorical[lo:hi]
    return [len({entry[j] for entry in run} - {None}) for j in range(n_fields)]
