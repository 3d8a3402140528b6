"""Threshold calibration on normal scores, its validation, and the training score histogram."""

from __future__ import annotations

import numpy as np
import pytest

from training.errors import BundleError, ConfigError
from training.threshold import (
    DEFAULT_TARGET_FPR,
    ScoreHistogram,
    Threshold,
    ThresholdConfig,
    calibrate,
    score_histogram,
)


@pytest.fixture()
def normal_scores() -> np.ndarray:
    return np.random.default_rng(3).lognormal(-3.0, 0.8, 20_000)


@pytest.mark.parametrize("fpr", [0.001, 0.01, 0.05, 0.2])
def test_target_fpr_gives_that_rate_on_calibration_and_fresh_normal_scores(normal_scores: np.ndarray,
                                                                           fpr: float) -> None:
    threshold = calibrate(normal_scores, ThresholdConfig(target_fpr=fpr))
    assert threshold.method == "target_fpr" and threshold.parameter == fpr
    assert threshold.calibration_rows == normal_scores.size
    assert threshold.calibration_fpr == pytest.approx(fpr, abs=1.0 / normal_scores.size)
    fresh = np.random.default_rng(4).lognormal(-3.0, 0.8, 200_000)
    assert np.mean(fresh > threshold.value) == pytest.approx(fpr, rel=0.25, abs=5e-4)


def test_default_is_one_percent_false_positives(normal_scores: np.ndarray) -> None:
    threshold = calibrate(normal_scores, ThresholdConfig())
    assert threshold.method == "target_fpr" and threshold.parameter == DEFAULT_TARGET_FPR == 0.01
    assert threshold.calibration_fpr == pytest.approx(0.01, abs=1e-4)


def test_quantile_threshold(normal_scores: np.ndarray) -> None:
    threshold = calibrate(normal_scores, ThresholdConfig(quantile=0.9))
    assert threshold.method == "quantile"
    assert threshold.value == pytest.approx(float(np.quantile(normal_scores, 0.9)))
    assert threshold.calibration_fpr == pytest.approx(0.1, abs=1e-4)


def test_manual_threshold_reports_its_false_positive_rate(normal_scores: np.ndarray) -> None:
    threshold = calibrate(normal_scores, ThresholdConfig(manual=0.1))
    assert (threshold.value, threshold.method, threshold.parameter) == (0.1, "manual", 0.1)
    assert threshold.calibration_fpr == pytest.approx(float(np.mean(normal_scores > 0.1)))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target_fpr": 0.0}, "target false-positive rate must be in (0, 1), got 0.0"),
    ({"target_fpr": 1.0}, "target false-positive rate must be in (0, 1), got 1.0"),
    ({"target_fpr": -0.1}, "target false-positive rate must be in (0, 1), got -0.1"),
    ({"quantile": 1.5}, "threshold quantile must be in (0, 1), got 1.5"),
    ({"quantile": 0.0}, "threshold quantile must be in (0, 1), got 0.0"),
    ({"manual": 0.0}, "a manual threshold must be a positive score, got 0.0"),
    ({"manual": -2.0}, "a manual threshold must be a positive score, got -2.0"),
    ({"target_fpr": 0.01, "manual": 1.0}, "choose one threshold option, got --target-fpr and --threshold"),
    ({"quantile": 0.9, "target_fpr": 0.01}, "choose one threshold option, got --target-fpr and --threshold-quantile"),
])
def test_config_is_validated_with_a_message_that_says_what_to_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ThresholdConfig(**kwargs)
    assert str(info.value) == message


def test_calibration_needs_rows() -> None:
    with pytest.raises(ConfigError, match="no calibration rows"):
        calibrate(np.array([]), ThresholdConfig())


def test_threshold_round_trips_and_refuses_malformed(normal_scores: np.ndarray) -> None:
    threshold = calibrate(normal_scores, ThresholdConfig(quantile=0.95))
    assert Threshold.from_dict(threshold.to_dict()) == threshold
    with pytest.raises(BundleError, match="threshold.json is malformed"):
        Threshold.from_dict({"value": 1.0})


def test_score_histogram_has_equal_mass_bins(normal_scores: np.ndarray) -> None:
    hist = score_histogram(normal_scores, bins=20)
    assert len(hist.edges) == len(hist.counts) + 1 == 21
    assert sum(hist.counts) == normal_scores.size
    assert hist.edges[0] == normal_scores.min() and hist.edges[-1] == normal_scores.max()
    assert max(hist.counts) - min(hist.counts) <= 2
    assert ScoreHistogram.from_dict(hist.to_dict()) == hist


def test_score_histogram_of_constant_scores_is_valid() -> None:
    hist = score_histogram(np.full(50, 0.25))
    assert len(hist.edges) == 2 and hist.counts == [50]


def test_histogram_refuses_inconsistent_edges() -> None:
    with pytest.raises(BundleError, match="one more entry than counts"):
        ScoreHistogram.from_dict({"edges": [0.0, 1.0], "counts": [1, 2]})
    with pytest.raises(BundleError, match="malformed"):
        ScoreHistogram.from_dict({"edges": "x"})


def test_training_warns_when_the_threshold_rests_on_a_handful_of_rows(tmp_path) -> None:
    from tests.unit.conftest import synthetic_events
    from training.model import FitConfig
    from training.train import TrainConfig, train_frame

    frame = synthetic_events(300).drop(columns=["event_id", "label"])
    lines: list[str] = []
    fit = FitConfig(epochs=1, hidden=(4, 2), ensemble=1)
    train_frame(frame, tmp_path / "a", TrainConfig(fit=fit), data_sha256="x", log=lines.append)
    assert any("threshold rests on fewer than 5" in line for line in lines)
    lines.clear()
    train_frame(frame, tmp_path / "b", TrainConfig(fit=fit, threshold=ThresholdConfig(target_fpr=0.2)),
                data_sha256="x", log=lines.append)
    assert not any("threshold rests on" in line for line in lines)
