"""Scoring through the SavedModel signature, and per-field explanations of a score.

Used by `anomaly-score`, `anomaly-evaluate`, the training run itself (calibration) and the worker, so
every consumer computes the same number for the same row.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import pandas as pd

from training.contract import category
from training.data import check_columns, encode_frame, file_windows
from training.errors import BundleError
from training.features import FeatureSchema, NumericField
from training.model import PART_OUTPUTS, SIGNATURE, SIGNATURE_INPUT, tf
from training.tf_runtime import quiet_native_stderr
from training.windows import WindowSpec, explain

if TYPE_CHECKING:
    from training.bundle import Bundle


@dataclass(frozen=True)
class Scores:
    """Scores of a batch: one score per row, the error of each field (one-hots folded back), the expected
    values, and the score's parts by term (`score_reconstruction`, `score_distance`; they sum to the score)."""

    score: np.ndarray
    field_errors: np.ndarray
    reconstruction: np.ndarray
    parts: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.score)


class Contribution(NamedTuple):
    """One field's share of a row's error, with the observed and the reconstructed ("expected") value;
    `text` says a window feature in words ("events from src_host 10.0.0.5 in the last 2s: 47, expected 3").

    A named tuple rather than a frozen dataclass: each alert carries several, and a tuple is built several
    times faster."""

    field: str
    share: float
    observed: Any
    expected: Any
    text: str | None = None

    def to_dict(self) -> dict[str, Any]:
        document = {"field": self.field, "share": round(self.share, 6), "observed": self.observed,
                    "expected": self.expected}
        if self.text is not None:
            document["text"] = self.text
        return document


def _plain(value: Any) -> Any:
    """JSON-friendly scalar: numpy types to Python, NaN to None."""
    if type(value) in _PLAIN_TYPES:  # the common case, checked first (this runs for every value of every alert)
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _plain_floats(values: np.ndarray) -> list[float | None]:
    """`_plain` of each value of a float array."""
    missing = np.isnan(values)
    return [None if m else v for v, m in zip(values.tolist(), missing.tolist(), strict=True)] if missing.any() \
        else values.tolist()


#: Types `_plain` returns unchanged (not float: NaN is not plain; not subclasses such as numpy's float64).
_PLAIN_TYPES = frozenset({str, int, bool, type(None)})


def round_significant(values: np.ndarray, digits: int = 6) -> np.ndarray:
    """Round to `digits` significant digits (readable explanations), vectorised."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values) & (values != 0)
    magnitude = np.floor(np.log10(np.abs(np.where(finite, values, 1.0))))
    factor = 10.0 ** (digits - 1 - magnitude)
    return np.where(finite, np.round(values * factor) / factor, values)


class Scorer:
    """Wraps the bundle's SavedModel signature; knows the schema to fold and decode its outputs, and the window
    spec (if any) to say window features in words."""

    def __init__(self, saved_model_dir: Path, schema: FeatureSchema, max_batch_rows: int = 16_384,
                 windows: WindowSpec | None = None) -> None:
        try:
            with quiet_native_stderr():
                loaded = tf.saved_model.load(str(saved_model_dir))
            self._signature = loaded.signatures[SIGNATURE]
        except Exception as exc:  # noqa: BLE001 - TensorFlow raises many types for a damaged SavedModel
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BundleError(f"{saved_model_dir}: cannot load the SavedModel signature {SIGNATURE!r} ({first}); "
                              f"copy the bundle again or retrain the model") from exc
        self._loaded = loaded  # keeps variables alive for the signature
        expected = self._signature.structured_input_signature[1][SIGNATURE_INPUT].shape[1]
        if expected != schema.width:
            raise BundleError(f"{saved_model_dir}: model expects {expected} inputs but the schema encodes "
                              f"{schema.width}; the bundle is inconsistent, retrain the model")
        self.schema = schema
        self._fold = schema.fold_matrix()
        self._max_batch_rows = max_batch_rows
        self.windows = windows
        # Field index -> the entity fields of a window feature, for its explanation in words.
        self._entities: dict[int, tuple[str, ...]] = {}
        if windows is not None:
            per_entity = len(windows.windows) * len(windows.per_window())
            entity_of = {name: windows.entities[i // per_entity] for i, name in enumerate(windows.names)}
            self._entities = {j: entity_of[name] for j, name in enumerate(schema.names) if name in entity_of}

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
                      reconstruction=joined["reconstruction"],
                      parts={k: joined[k].astype(np.float64) for k in PART_OUTPUTS if k in joined})

    def top_fields(self, scores: Scores) -> list[str]:
        """The field with the largest error for each row."""
        names = self.schema.names
        return [names[i] for i in np.argmax(scores.field_errors, axis=1)]

    def explain(self, scores: Scores, row: int, observed: Mapping[str, Any], top_k: int = 3) -> list[Contribution]:
        """Top fields of one row by share of its error, with observed and expected values in original units."""
        return self.explain_rows(scores, [row], [observed], top_k)[0]

    def explain_rows(self, scores: Scores, rows: Sequence[int], observed: Sequence[Mapping[str, Any]],
                     top_k: int = 3) -> list[list[Contribution]]:
        """`explain` for many rows at once: ranking, shares and decoding are vectorised over the rows.

        `observed`: each row's own fields by name and, for a windowed model, each window feature's value under
        its column name (`win:src_host:2s:count`); a window feature's words name the entity by the row's value
        of the entity's field(s)."""
        names = self.schema.names
        top, shares, expected = self._ranked(scores, rows, top_k)
        return [[Contribution(names[j], share, value := _plain(event.get(names[j])), expected[j][a],
                              self._words(j, value, expected[j][a], event) if j in self._entities else None)
                 for j, share in zip(picked, row_shares, strict=True)]
                for a, (event, picked, row_shares) in enumerate(zip(observed, top, shares, strict=True))]

    def explain_documents(self, scores: Scores, rows: Sequence[int], observed: Sequence[Mapping[str, Any]],
                          top_k: int = 3) -> list[list[dict[str, Any]]]:
        """`explain_rows` as the alert document's `top_features` (`Contribution.to_dict` of each), built
        directly: a worker alerting on a third of a busy stream builds thousands of these a second."""
        names = self.schema.names
        top, shares, expected = self._ranked(scores, rows, top_k)
        documents = [[{"field": names[j], "share": round(share, 6), "observed": _plain(event.get(names[j])),
                       "expected": expected[j][a]}
                      for j, share in zip(picked, row_shares, strict=True)]
                     for a, (event, picked, row_shares) in enumerate(zip(observed, top, shares, strict=True))]
        if self._entities:
            for event, picked, row in zip(observed, top, documents, strict=True):
                for j, document in zip(picked, row, strict=True):
                    if j in self._entities:
                        document["text"] = self._words(j, document["observed"], document["expected"], event)
        return documents

    def _words(self, j: int, observed: Any, expected: Any, event: Mapping[str, Any]) -> str:
        """Window feature `j` in words; the entity is the event's own value of the entity's field(s)."""
        parts = [category(event.get(name), name) for name in self._entities[j]]
        entity = "+".join(parts) if all(isinstance(p, str) for p in parts) else None  # type: ignore[arg-type]
        return explain(self.schema.names[j], observed if isinstance(observed, int | float) else None,
                       expected if isinstance(expected, int | float) else None, entity)

    def _ranked(self, scores: Scores, rows: Sequence[int], top_k: int
                ) -> tuple[list[list[int]], list[list[float]], dict[int, list[Any]]]:
        """For each row: its `top_k` fields by error, their shares of the row's error, and per field picked
        anywhere the decoded expected value of each row."""
        if len(rows) == 0:
            return [], [], {}
        index = np.asarray(rows, dtype=np.intp)
        errors = scores.field_errors[index]
        totals = errors.sum(axis=1)
        totals[totals == 0] = 1.0
        top = np.argsort(-errors, axis=1, kind="stable")[:, :top_k]
        # Element-wise the same division as errors[a, j] / totals[a], in the errors' own dtype.
        shares = (np.take_along_axis(errors, top, axis=1) / totals[:, None]).tolist()
        reconstruction = scores.reconstruction[index]
        slices = self.schema.slices()
        expected: dict[int, list[Any]] = {}
        for j in np.unique(top).tolist():
            f = self.schema.fields[j]
            block = reconstruction[:, slices[j]]
            expected[j] = _plain_floats(round_significant(f.decode(block[:, 0]))) if isinstance(f, NumericField) \
                else f.decode(block)
        return top.tolist(), shares, expected


def score_frame(bundle: Bundle, frame: pd.DataFrame, source: Path = Path("<frame>"), first_row: int = 1) -> Scores:
    """Score every row of a frame with a loaded bundle: the values are checked and encoded as `anomaly-score`
    does (a `DataError` names `source`, the column and the row). Columns besides the features are ignored;
    compare `Scores.score` with `bundle.threshold.value` for the verdict. A windowed bundle's window features
    are computed over the frame's rows in order, as one partition would see them."""
    check_columns(frame, bundle.schema, [str(c) for c in frame.columns], source, bundle.windows)
    windows = file_windows(bundle.windows)
    return cast(Scores, bundle.scorer.score(encode_frame(bundle.schema, frame, source, first_row, windows)))
