"""Threshold calibration on held-out normal rows, and the training score histogram the worker compares to."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from training.errors import BundleError, ConfigError

DEFAULT_TARGET_FPR = 0.01


@dataclass(frozen=True)
class ThresholdConfig:
    """Exactly one way to choose the threshold; with none given, a 1 % target false-positive rate."""

    target_fpr: float | None = None
    quantile: float | None = None
    manual: float | None = None

    def __post_init__(self) -> None:
        given = [n for n, v in (("--target-fpr", self.target_fpr), ("--threshold-quantile", self.quantile),
                                ("--threshold", self.manual)) if v is not None]
        if len(given) > 1:
            raise ConfigError(f"choose one threshold option, got {' and '.join(given)}")
        if self.target_fpr is not None and not 0.0 < self.target_fpr < 1.0:
            raise ConfigError(f"target false-positive rate must be in (0, 1), got {self.target_fpr}")
        if self.quantile is not None and not 0.0 < self.quantile < 1.0:
            raise ConfigError(f"threshold quantile must be in (0, 1), got {self.quantile}")
        if self.manual is not None and not self.manual > 0.0:
            raise ConfigError(f"a manual threshold must be a positive score, got {self.manual}")


@dataclass(frozen=True)
class Threshold:
    """The decision threshold: score > value is an anomaly."""

    value: float
    method: str
    parameter: float
    calibration_rows: int
    calibration_fpr: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Threshold:
        try:
            threshold = cls(value=float(data["value"]), method=str(data["method"]),
                            parameter=float(data["parameter"]), calibration_rows=int(data["calibration_rows"]),
                            calibration_fpr=float(data["calibration_fpr"]))
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise BundleError(f"threshold.json is malformed ({exc!r}); retrain the model") from exc
        if not (math.isfinite(threshold.value) and threshold.value > 0):
            raise BundleError(f"threshold.json: the threshold must be a finite positive score, got {threshold.value}; "
                              f"retrain the model or set one with anomaly-train --threshold")
        return threshold


def calibrate(normal_scores: np.ndarray, config: ThresholdConfig) -> Threshold:
    """Pick the threshold from scores of held-out normal rows."""
    if normal_scores.size == 0:
        raise ConfigError("no calibration rows: the data set has too few normal rows to calibrate a threshold")
    if config.manual is not None:
        value, method, parameter = config.manual, "manual", config.manual
    elif config.quantile is not None:
        value, method, parameter = float(np.quantile(normal_scores, config.quantile)), "quantile", config.quantile
    else:
        fpr = config.target_fpr if config.target_fpr is not None else DEFAULT_TARGET_FPR
        value, method, parameter = float(np.quantile(normal_scores, 1.0 - fpr)), "target_fpr", fpr
    return Threshold(value=value, method=method, parameter=parameter, calibration_rows=int(normal_scores.size),
                     calibration_fpr=float(np.mean(normal_scores > value)))


@dataclass(frozen=True)
class ScoreHistogram:
    """Training (normal) score distribution in quantile bins: edges has one more entry than counts."""

    edges: list[float]
    counts: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"edges": self.edges, "counts": self.counts}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreHistogram:
        try:
            hist = cls(edges=[float(e) for e in data["edges"]], counts=[int(c) for c in data["counts"]])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise BundleError(f"score_histogram.json is malformed ({exc!r}); retrain the model") from exc
        if len(hist.edges) != len(hist.counts) + 1 or not hist.counts:
            raise BundleError("score_histogram.json: edges must have one more entry than counts; retrain the model")
        edges = np.asarray(hist.edges)
        if not np.isfinite(edges).all() or np.any(np.diff(edges) <= 0):
            raise BundleError("score_histogram.json: edges must be finite and strictly increasing; retrain the model")
        if min(hist.counts) < 0:
            raise BundleError("score_histogram.json: counts must not be negative; retrain the model")
        return hist


def score_histogram(scores: np.ndarray, bins: int = 20) -> ScoreHistogram:
    """Quantile-binned histogram (equal-mass bins are what a population-stability index needs)."""
    edges = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:
        edges = np.array([float(scores.min()), float(scores.min()) + 1e-12])
    counts, _ = np.histogram(scores, bins=edges)
    return ScoreHistogram(edges=[float(e) for e in edges], counts=[int(c) for c in counts])
