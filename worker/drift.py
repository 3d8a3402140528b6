"""Drift: population stability index of recent live scores (and of each field) against training.

PSI = sum_i (live_i - train_i) * ln(live_i / train_i) over the training histogram's bins, with
proportions floored at `epsilon` so empty bins stay finite. Rule of thumb: < 0.1 stable,
0.1-0.25 moderate shift, > 0.25 significant shift.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from training.features import CategoricalField, FeatureSchema, field_codes
from training.threshold import ScoreHistogram
from worker.metrics import WorkerMetrics
from worker.plugin import Plugin

if TYPE_CHECKING:
    from training.bundle import Bundle
    from worker.pipeline import BatchResult, Pipeline
    from worker.records import Alert


class ScoreDrift:
    """PSI of the last `window` live scores against a training score histogram.

    `edges` (n + 1 increasing values) and `train_counts` (n values) are the training-score
    histogram as `numpy.histogram` returns it. Live scores below the first edge go to the first
    bin, above the last edge to the last bin; NaN scores are ignored. The window slides exactly:
    each new score evicts the oldest once `window` scores are held.

    >>> drift = ScoreDrift([0.0, 1.0, 2.0], [50, 50], window=4)
    >>> drift.update([0.5, 1.5, 0.2, 1.9])
    >>> round(drift.psi(), 6)
    0.0
    """

    def __init__(
        self,
        edges: Sequence[float],
        train_counts: Sequence[int],
        window: int = 10_000,
        epsilon: float = 1e-4,
    ) -> None:
        edge_array = np.asarray(edges, dtype=np.float64)
        counts = np.asarray(train_counts, dtype=np.float64)
        if edge_array.ndim != 1 or edge_array.size < 2:
            raise ValueError(f"edges must be a 1-D sequence of at least 2 values, got {edge_array.size}")
        if np.isnan(edge_array).any() or (np.diff(edge_array) <= 0).any():
            raise ValueError("edges must be strictly increasing and not NaN")
        if counts.shape != (edge_array.size - 1,):
            raise ValueError(
                f"train_counts must have len(edges) - 1 = {edge_array.size - 1} values, got {counts.size}"
            )
        if (counts < 0).any() or not np.isfinite(counts).all() or counts.sum() <= 0:
            raise ValueError("train_counts must be finite, non-negative and not all zero")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0 < epsilon < 1:
            raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")

        self._inner_edges = edge_array[1:-1]
        self._n_bins = counts.size
        self._train = np.maximum(counts / counts.sum(), epsilon)
        self._epsilon = epsilon
        self._window = window
        self._ring: npt.NDArray[np.intp] = np.zeros(window, dtype=np.intp)  # bin index per held score
        self._next = 0  # ring slot the next score is written to
        self._held = 0
        self._live = np.zeros(self._n_bins, dtype=np.int64)

    @property
    def window(self) -> int:
        """Maximum number of recent scores compared against training."""
        return self._window

    @property
    def count(self) -> int:
        """Number of live scores currently held (at most `window`)."""
        return self._held

    def live_counts(self) -> npt.NDArray[np.int64]:
        """Copy of the per-bin counts of the held live scores."""
        return self._live.copy()

    def update(self, scores: Iterable[float]) -> None:
        """Add live scores (any iterable or 1-D array), evicting the oldest beyond the window."""
        values = np.asarray(scores if isinstance(scores, np.ndarray) else list(scores), dtype=np.float64)
        values = values.ravel()
        values = values[~np.isnan(values)]
        if values.size == 0:
            return
        if values.size >= self._window:  # only the newest `window` scores survive anyway
            values = values[-self._window :]
            self._ring[:] = self._bin(values)
            self._live = np.bincount(self._ring, minlength=self._n_bins).astype(np.int64)
            self._next = 0
            self._held = self._window
            return
        bins = self._bin(values)
        slots = (self._next + np.arange(bins.size)) % self._window
        evicted = max(0, self._held + bins.size - self._window)
        if evicted:
            # Slots past the held scores are free; the last `evicted` slots wrap onto the oldest.
            oldest = self._ring[slots[bins.size - evicted :]]
            self._live -= np.bincount(oldest, minlength=self._n_bins)
        self._ring[slots] = bins
        self._live += np.bincount(bins, minlength=self._n_bins)
        self._next = int((self._next + bins.size) % self._window)
        self._held = min(self._window, self._held + bins.size)

    def psi(self) -> float:
        """PSI of the held live scores against training; NaN when no score is held yet."""
        if self._held == 0:
            return math.nan
        live = np.maximum(self._live / self._held, self._epsilon)
        return float(np.sum((live - self._train) * np.log(live / self._train)))

    def reset(self) -> None:
        """Forget all live scores (e.g. after loading a new model)."""
        self._live[:] = 0
        self._next = 0
        self._held = 0

    def _bin(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.intp]:
        # Index = number of inner edges <= value, which clamps out-of-range values to the end bins.
        return np.searchsorted(self._inner_edges, values, side="right").astype(np.intp)


class FieldDrift:
    """PSI per field of recent live values against the bundle's per-field training distributions.

    Numeric fields are binned by their training quantiles, categorical fields by vocabulary entry
    (unknown categories share one bin); missing values are left out. At most `max_fields` fields are
    followed (schema order), which bounds the metric's label set.

    `update` only holds a batch's columns; they are binned together when `psi` is asked for, so the
    per-field work is paid once per `flush_rows` events rather than once per batch (it cost 2 ms of every
    1,000-event batch, 6 % of the worker's time at full speed). `due` says when to ask: once
    `flush_rows` events are held, or `flush_interval_s` after the first one.
    """

    def __init__(self, schema: FeatureSchema, histograms: Mapping[str, ScoreHistogram], window: int = 10_000,
                 max_fields: int = 200, flush_rows: int = 5_000, flush_interval_s: float = 5.0) -> None:
        self._categorical = {f.name: f for f in schema.fields if isinstance(f, CategoricalField)}
        self._drifts = {name: ScoreDrift(h.edges, h.counts, window) for name, h in histograms.items()
                        if sum(h.counts) > 0}
        self._drifts = dict(list(self._drifts.items())[:max_fields])
        self.flush_rows, self.flush_interval_s = flush_rows, flush_interval_s
        self._held: list[Mapping[str, np.ndarray]] = []
        self._held_rows = 0
        self._held_since = 0.0

    def update(self, columns: Mapping[str, np.ndarray], now: float = 0.0) -> None:
        """Hold the parsed columns of scored events (float64 with NaN, or category text with None);
        `now` (monotonic seconds) starts the flush interval when nothing was held."""
        rows = max((len(values) for values in columns.values()), default=0)
        if rows == 0:
            return
        if not self._held:
            self._held_since = now
        self._held.append(columns)
        self._held_rows += rows

    def due(self, now: float) -> bool:
        """Whether held values should reach the histograms now (`flush_rows` held, or the interval passed)."""
        return bool(self._held) and (self._held_rows >= self.flush_rows
                                     or now - self._held_since >= self.flush_interval_s)

    def psi(self) -> dict[str, float]:
        """PSI per followed field, held values included (NaN until a value was seen)."""
        self._flush()
        return {name: drift.psi() for name, drift in self._drifts.items()}

    def _flush(self) -> None:
        held, self._held, self._held_rows = self._held, [], 0
        for name, drift in self._drifts.items():
            parts = [values for columns in held if (values := columns.get(name)) is not None and len(values)]
            if not parts:
                continue
            values = parts[0] if len(parts) == 1 else np.concatenate(parts)
            category = self._categorical.get(name)
            drift.update(field_codes(category, values) if category is not None else values)


class DriftWatch(Plugin):
    """The loop's drift gauges: score and field PSI of delivered batches against the running model's training
    distributions (the baseline follows a model swap); held field values are published when due, busy or idle."""

    def __init__(self, metrics: WorkerMetrics, bundle: Bundle, clock: Callable[[], float] = time.monotonic,
                 field_drift: Callable[[Bundle], FieldDrift] | None = None) -> None:
        self.metrics, self.clock = metrics, clock
        self._field_drift = field_drift or (lambda b: FieldDrift(b.schema, b.field_histograms))
        self._follow(bundle)

    def _follow(self, bundle: Bundle) -> None:
        self.scores = ScoreDrift(bundle.histogram.edges, bundle.histogram.counts)
        self.fields = self._field_drift(bundle)

    def on_model(self, pipeline: Pipeline) -> None:
        self._follow(pipeline.bundle)

    def on_batch(self, result: BatchResult) -> None:
        if result.scored:
            self.scores.update(result.scores)
            self.metrics.set_score_drift_psi(self.scores.psi())
            self.fields.update(result.columns, self.clock())
        self._refresh_fields()

    def on_idle(self) -> list[Alert]:
        self._refresh_fields()
        return []

    def _refresh_fields(self) -> None:
        """Set the per-field gauges when the held values are due (see `FieldDrift`)."""
        if self.fields.due(self.clock()):
            self.metrics.set_field_drift_psi(self.fields.psi())
