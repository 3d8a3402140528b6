"""Scoring through the SavedModel signature, and per-field explanations of a score.

Used by `anomaly-score`, `anomaly-evaluate`, the training run itself (calibration) and the worker, so
every consumer computes the same number for the same row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.errors import BundleError
from training.features import CategoricalField, FeatureSchema, NumericField
from training.model import SIGNATURE, SIGNATURE_INPUT, tf


@dataclass(frozen=True)
class Scores:
    """Scores of a batch: one score per row, and the error of each field (one-hots folded back)."""

    score: np.ndarray
    field_errors: np.ndarray
    reconstruction: np.ndarray

    def __len__(self) -> int:
        return len(self.score)


@dataclass(frozen=True)
class Contribution:
    """One field's share of a row's error, with the observed and the reconstructed ("expected") value."""

    field: str
    share: float
    observed: Any
    expected: Any

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "share": round(self.share, 6), "observed": self.observed,
                "expected": self.expected}


def _plain(value: Any) -> Any:
    """JSON-friendly scalar: numpy types to Python, NaN to None, floats rounded for readability."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return None if math.isnan(value) else float(f"{value:.6g}")
    return value


class Scorer:
    """Wraps the bundle's SavedModel signature; knows the schema to fold and decode its outputs."""

    def __init__(self, saved_model_dir: Path, schema: FeatureSchema, max_batch_rows: int = 16_384) -> None:
        try:
            loaded = tf.saved_model.load(str(saved_model_dir))
            self._signature = loaded.signatures[SIGNATURE]
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{saved_model_dir}: cannot load the SavedModel signature {SIGNATURE!r} ({exc}); "
                              f"retrain the model") from exc
        self._loaded = loaded  # keeps variables alive for the signature
        expected = self._signature.structured_input_signature[1][SIGNATURE_INPUT].shape[1]
        if expected != schema.width:
            raise BundleError(f"{saved_model_dir}: model expects {expected} inputs but the schema encodes "
                              f"{schema.width}; the bundle is inconsistent, retrain the model")
        self.schema = schema
        self._fold = schema.fold_matrix()
        self._max_batch_rows = max_batch_rows

    def score(self, matrix: np.ndarray) -> Scores:
        """Score encoded rows (float32, schema width) in one model call per `max_batch_rows` rows."""
        if matrix.ndim != 2 or matrix.shape[1] != self.schema.width:
            raise ValueError(f"expected an (n, {self.schema.width}) matrix, got shape {matrix.shape}")
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, max(len(matrix), 1), self._max_batch_rows):
            chunk = np.ascontiguousarray(matrix[start:start + self._max_batch_rows], dtype=np.float32)
            out = self._signature(**{SIGNATURE_INPUT: tf.constant(chunk)})
            parts.append({k: v.numpy() for k, v in out.items()})
        joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return Scores(score=joined["score"].astype(np.float64),
                      field_errors=joined["feature_errors"] @ self._fold,
                      reconstruction=joined["reconstruction"])

    def top_fields(self, scores: Scores) -> list[str]:
        """The field with the largest error for each row."""
        names = self.schema.names
        return [names[i] for i in np.argmax(scores.field_errors, axis=1)]

    def explain(self, scores: Scores, row: int, observed: Mapping[str, Any], top_k: int = 3) -> list[Contribution]:
        """Top fields of one row by share of its error, with observed and expected values in original units."""
        errors = scores.field_errors[row]
        total = float(errors.sum()) or 1.0
        order = np.argsort(-errors)[:top_k]
        slices = self.schema.slices()
        out = []
        for j in order:
            f = self.schema.fields[j]
            block = scores.reconstruction[row, slices[j]]
            expected: Any
            if isinstance(f, NumericField):
                expected = f.decode(block)[0]
            else:
                assert isinstance(f, CategoricalField)
                expected = f.decode(block)[0]
            out.append(Contribution(field=f.name, share=float(errors[j]) / total,
                                    observed=_plain(observed.get(f.name)), expected=_plain(expected)))
        return out
