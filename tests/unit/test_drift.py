"""ScoreDrift: PSI small for the training distribution, large for a shifted one, bounded window."""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.drift import FieldDrift, ScoreDrift


@pytest.fixture()
def train() -> tuple[np.ndarray, np.ndarray]:
    scores = np.random.default_rng(0).gamma(shape=2.0, scale=1.0, size=50_000)
    counts, edges = np.histogram(scores, bins=20)
    return edges, counts


def sample(seed: int, n: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).gamma(shape=2.0, scale=1.0, size=n) + shift


def test_same_distribution_has_small_psi(train: tuple[np.ndarray, np.ndarray]) -> None:
    drift = ScoreDrift(*train, window=10_000)
    drift.update(sample(1, 10_000))
    assert drift.psi() < 0.05


def test_shifted_distribution_has_large_psi(train: tuple[np.ndarray, np.ndarray]) -> None:
    drift = ScoreDrift(*train, window=10_000)
    drift.update(sample(1, 10_000, shift=2.0))
    assert drift.psi() > 0.5


def test_window_forgets_old_scores(train: tuple[np.ndarray, np.ndarray]) -> None:
    drift = ScoreDrift(*train, window=5_000)
    drift.update(sample(1, 5_000, shift=3.0))
    assert drift.psi() > 0.5
    for chunk in np.array_split(sample(2, 5_000), 7):  # uneven chunks exercise ring wrap-around
        drift.update(chunk)
    assert drift.count == 5_000
    assert drift.psi() < 0.05


def test_counts_match_a_histogram_of_the_last_window_scores() -> None:
    edges = [0.0, 1.0, 2.0, 3.0]
    drift = ScoreDrift(edges, [1, 1, 1], window=4)
    drift.update([0.5, 1.5])
    drift.update([2.5, -10.0, 99.0])  # out-of-range values go to the end bins; 0.5 is evicted
    assert drift.count == 4
    assert drift.live_counts().tolist() == [1, 1, 2]  # -10 | 1.5 | 2.5, 99
    drift.update(iter([0.1, 0.2, 0.3, 0.4, 2.9]))  # more than the window at once keeps the newest 4
    assert drift.live_counts().tolist() == [3, 0, 1]


def test_empty_bins_stay_finite_and_nan_is_ignored() -> None:
    drift = ScoreDrift([0.0, 1.0, 2.0], [100, 0], window=10)
    assert math.isnan(drift.psi())
    drift.update([math.nan])
    assert drift.count == 0
    drift.update([1.5] * 10)  # all live scores land where training had none
    psi = drift.psi()
    assert math.isfinite(psi) and psi > 5
    drift.reset()
    assert drift.count == 0 and math.isnan(drift.psi())


@pytest.mark.parametrize(
    ("edges", "counts", "window", "match"),
    [
        ([0.0], [], 10, "at least 2"),
        ([0.0, 0.0, 1.0], [1, 1], 10, "strictly increasing"),
        ([0.0, 1.0, 2.0], [1], 10, "len\\(edges\\) - 1 = 2"),
        ([0.0, 1.0], [0], 10, "not all zero"),
        ([0.0, 1.0], [1], 0, "window must be >= 1"),
    ],
)
def test_invalid_arguments_are_rejected(edges: list[float], counts: list[int], window: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ScoreDrift(edges, counts, window=window)


def test_field_drift_follows_each_field_against_its_training_distribution(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Per-field PSI: a field whose live values moved drifts, the others stay near 0."""
    import pandas as pd

    from training.bundle import load_bundle
    from training.model import FitConfig
    from training.train import TrainConfig, train_frame
    from worker.drift import FieldDrift

    rng = np.random.default_rng(0)
    n = 2000
    frame = pd.DataFrame({"bytes": rng.lognormal(5, 1, n), "port": rng.choice(["80", "443"], n, p=[0.7, 0.3]),
                          "flag": np.zeros(n)})
    train_frame(frame, tmp_path / "b", TrainConfig(fit=FitConfig(epochs=1, hidden=(4, 2), ensemble=1),
                                                   categorical=("port",)), "0" * 64, log=lambda _l: None)
    bundle = load_bundle(tmp_path / "b")
    assert set(bundle.field_histograms) == {"bytes", "port", "flag"}
    drift = FieldDrift(bundle.schema, bundle.field_histograms, window=1000)
    port = np.empty(1000, dtype=object)
    port[:] = ["22"] * 1000  # an unknown category for every event
    drift.update({"bytes": rng.lognormal(5, 1, 1000), "port": port, "flag": np.zeros(1000)})
    psi = drift.psi()
    assert psi["bytes"] < 0.1 and psi["flag"] < 0.1
    assert psi["port"] > 1.0


def small_field_drift(**kwargs: float) -> FieldDrift:
    from training.features import CategoricalField, FeatureSchema, NumericField
    from training.threshold import ScoreHistogram

    schema = FeatureSchema((NumericField("bytes", log=False, center=0.0, scale=1.0, impute=0.0),
                            CategoricalField("port", vocabulary=("80", "443"), impute="80")))
    histograms = {"bytes": ScoreHistogram(edges=[0.0, 1.0, 2.0, 3.0], counts=[10, 10, 10]),
                  "port": ScoreHistogram(edges=[-0.5, 0.5, 1.5, 2.5], counts=[20, 10, 0])}
    return FieldDrift(schema, histograms, window=100, **kwargs)  # type: ignore[arg-type]


def test_field_drift_holds_batches_until_due_and_bins_them_as_one() -> None:
    rng = np.random.default_rng(1)
    batches = [{"bytes": rng.uniform(0, 3, 30), "port": np.array(rng.choice(["80", "443", "22", None], 30),
                                                                    dtype=object)} for _ in range(3)]
    held = small_field_drift(flush_rows=80, flush_interval_s=10.0)
    assert not held.due(0.0)
    held.update(batches[0], now=100.0)
    held.update(batches[1], now=101.0)
    assert not held.due(109.9), "60 of 80 rows held, 9.9 s after the first"
    assert held.due(110.0), "the interval since the first held row has passed"
    held.update(batches[2], now=102.0)
    assert held.due(102.0), "90 rows held"
    at_once = small_field_drift()
    at_once.update({name: np.concatenate([b[name] for b in batches]) for name in ("bytes", "port")})
    assert held.psi() == at_once.psi()
    assert not held.due(1e9), "psi took every held row"
    assert all(math.isfinite(v) for v in held.psi().values())
