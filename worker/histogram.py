"""A Prometheus histogram observed a whole array at a time.

`prometheus_client.Histogram.observe` takes one value per call (a lock and a bucket search each);
scoring observes one value per event, which at tens of thousands of events per second cost more than
the model. This keeps the bucket counts in numpy, adds a batch with one `searchsorted` and one
`bincount`, and exports the standard `_bucket`/`_count`/`_sum` series through a collector, so the
exposition is what a `Histogram` with the same buckets would give.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString


class ArrayHistogram:
    """Cumulative histogram with fixed finite upper bounds (plus +Inf), fed by `observe_many`."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry | None) -> None:
        bounds = [float(b) for b in buckets if math.isfinite(float(b))]
        if not bounds or any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"histogram buckets must be finite and strictly increasing, got {list(buckets)}")
        self.name, self.documentation = name, documentation
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # the last one is +Inf only
        self._sum = 0.0
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def observe_many(self, values: npt.ArrayLike) -> None:
        """Observe every finite value (NaN and infinities would poison `_sum` for the process lifetime)."""
        array = np.asarray(values, dtype=np.float64).ravel()
        array = array[np.isfinite(array)]
        if array.size == 0:
            return
        # Bucket i counts values <= bounds[i] ("le"); searchsorted(left) is the first bound >= value.
        counts = np.bincount(np.searchsorted(self._bounds, array, side="left"), minlength=self._counts.size)
        total = float(array.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        buckets = [(floatToGoString(b), c) for b, c in zip(self._bounds.tolist(), cumulative, strict=False)]
        buckets.append(("+Inf", cumulative[-1]))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)
