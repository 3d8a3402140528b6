"""`ArrayHistogram` exports exactly what `prometheus_client.Histogram` would for the same observations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from worker.histogram import ArrayHistogram

BUCKETS = (0.1, 0.5, 1.0, 2.0, 10.0)


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels.get("le", "")): s.value for m in registry.collect() if m.name == name
            for s in m.samples if not s.name.endswith("_created")}


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(st.one_of(
    st.floats(min_value=-1e300, max_value=1e300), st.sampled_from((*BUCKETS, math.nan, math.inf, -math.inf))),
    max_size=40), max_size=5))
def test_same_buckets_count_and_sum_as_one_observe_per_finite_value(batches: list[list[float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    array = ArrayHistogram("h", "doc", BUCKETS, ours)
    reference = Histogram("h", "doc", buckets=BUCKETS, registry=theirs)
    for batch in batches:
        array.observe_many(np.array(batch, dtype=np.float64))
        for value in batch:
            if math.isfinite(value):
                reference.observe(value)
    got, want = samples(ours, "h"), samples(theirs, "h")
    assert got.keys() == want.keys()
    # A batch is summed before it is added, one observe at a time adds in order: the two sums may differ by
    # rounding, which cancellation makes as large as a few ulps of the largest magnitude (-1e300 + 1e300 + 1).
    magnitude = sum(abs(v) for batch in batches for v in batch if math.isfinite(v))
    for key, value in want.items():
        slack = 1e-9 + (1e-12 * magnitude if key[0] == "h_sum" else 0.0)
        assert got[key] == pytest.approx(value, rel=1e-9, abs=slack), key


def test_buckets_must_increase() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        ArrayHistogram("h", "doc", (1.0, 1.0), None)
