"""Feature schema: learned once from training rows, then used unchanged by training, batch scoring and the worker.

Columns arrive as *parsed columns* (built by `training.contract`, the one type policy for files and
events): a mapping from field name to a 1-D array, float64 with NaN for a missing numeric value,
object (str or None) for a categorical value. `FeatureSchema.encode` turns
raw columns into the model's float32 matrix; `FeatureSchema.decode_numeric` maps a reconstruction
back to original units for explanations. The rules for heavy tails, constants and missing values
are documented in docs/preprocessing.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from training.contract import CATEGORICAL, NUMERIC
from training.errors import BundleError, ConfigError

#: A numeric column whose sample skewness exceeds this is compressed with signed log1p before scaling.
SKEW_FOR_LOG = 2.0
#: Categories kept per field (most frequent first); the rest share the "unknown" bucket.
MAX_CATEGORIES = 64
#: A category must be seen this many times in training to get its own one-hot column.
MIN_CATEGORY_COUNT = 2
#: Scaled values are clipped to +-CLIP so one absurd value cannot overflow float32 squared error.
CLIP = 1.0e4
UNKNOWN = "<unknown>"
_TEXT_TYPES = frozenset({str, type(None)})


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """sign(x) * log(1 + |x|): compresses heavy tails, keeps zero at zero and the sign."""
    return np.sign(x) * np.log1p(np.abs(x))


def signed_expm1(x: np.ndarray) -> np.ndarray:
    """Inverse of `signed_log1p` (saturating at the largest float64 instead of overflowing)."""
    return np.sign(x) * np.expm1(np.minimum(np.abs(x), 709.0))


@dataclass(frozen=True)
class NumericField:
    """A numeric column: optional signed log1p, then z-score; missing values take the training median."""

    name: str
    log: bool
    center: float
    scale: float
    impute: float
    constant: bool = False
    low: float | None = None
    high: float | None = None
    kind: str = field(default=NUMERIC, init=False)

    @property
    def width(self) -> int:
        return 1

    @property
    def encoded_names(self) -> list[str]:
        return [self.name]

    def encode(self, raw: np.ndarray) -> tuple[np.ndarray, int]:
        """Return (scaled column, number of missing values imputed)."""
        values = np.asarray(raw, dtype=np.float64)
        missing = np.isnan(values)
        n_missing = int(missing.sum())
        if n_missing:
            values = np.where(missing, self.impute, values)
        if self.log:
            values = signed_log1p(values)
        scaled = (values - self.center) / self.scale
        return np.clip(scaled, -CLIP, CLIP), n_missing

    def decode(self, scaled: np.ndarray) -> np.ndarray:
        """Map scaled values back to original units, within the range seen in training."""
        values = np.asarray(scaled, dtype=np.float64) * self.scale + self.center
        values = signed_expm1(values) if self.log else values
        if self.low is not None and self.high is not None:
            values = np.clip(values, self.low, self.high)
        return values

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": NUMERIC, "log": self.log, "center": self.center,
            "scale": self.scale, "impute": self.impute, "constant": self.constant, "low": self.low,
            "high": self.high,
        }


def _scale_numeric(values: np.ndarray, fields: Sequence[NumericField]) -> tuple[np.ndarray, list[int]]:
    """`NumericField.encode` of each column of `values` (one column per field), as one array operation per step."""
    missing = np.isnan(values)
    counts = missing.sum(axis=0).tolist()
    if any(counts):
        values = np.where(missing, np.array([f.impute for f in fields]), values)
    if logs := [i for i, f in enumerate(fields) if f.log]:
        values[:, logs] = signed_log1p(values[:, logs])
    scaled = (values - np.array([f.center for f in fields])) / np.array([f.scale for f in fields])
    return np.clip(scaled, -CLIP, CLIP), counts


@dataclass(frozen=True)
class CategoricalField:
    """A categorical column: one-hot over a vocabulary plus an unknown bucket; missing takes the mode."""

    name: str
    vocabulary: tuple[str, ...]
    impute: str
    kind: str = field(default=CATEGORICAL, init=False)

    @property
    def width(self) -> int:
        return len(self.vocabulary) + 1

    @property
    def encoded_names(self) -> list[str]:
        return [f"{self.name}={v}" for v in self.vocabulary] + [f"{self.name}={UNKNOWN}"]

    def encode(self, raw: np.ndarray) -> tuple[np.ndarray, int]:
        """Return (one-hot block, number of missing values imputed)."""
        codes, n_missing = self._codes(list(raw))
        out = np.zeros((len(codes), self.width), dtype=np.float64)
        out[np.arange(len(codes)), codes] = 1.0
        return out, n_missing

    def _codes(self, values: list[Any]) -> tuple[np.ndarray, int]:
        """Each value's one-hot column (unknown: the last; missing: the imputed value's), and how many were missing."""
        index, unknown = self._index, len(self.vocabulary)
        if set(map(type, values)) <= _TEXT_TYPES:  # parsed columns: text or None, each distinct value looked up once
            code = {value: index.get(self.impute if value is None else value, unknown) for value in set(values)}
            return np.fromiter(map(code.__getitem__, values), np.intp, len(values)), values.count(None)
        codes = np.empty(len(values), dtype=np.intp)
        n_missing = 0
        for row, value in enumerate(values):
            if value is None or (isinstance(value, float) and math.isnan(value)):
                n_missing += 1
                value = self.impute
            codes[row] = index.get(str(value), unknown)
        return codes, n_missing

    @cached_property
    def _index(self) -> dict[str, int]:
        return {v: i for i, v in enumerate(self.vocabulary)}

    def decode(self, block: np.ndarray) -> list[str]:
        """The category each reconstructed one-hot block points at (argmax)."""
        labels = [*self.vocabulary, UNKNOWN]
        return [labels[i] for i in np.argmax(np.atleast_2d(block), axis=1)]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": CATEGORICAL, "vocabulary": list(self.vocabulary), "impute": self.impute}


Field = NumericField | CategoricalField


@dataclass(frozen=True)
class Encoded:
    """The model's input matrix plus how many values of each field were imputed."""

    matrix: np.ndarray
    missing: dict[str, int]


@dataclass(frozen=True)
class FeatureSchema:
    """Ordered fields with their learned preprocessing; the single definition of the model's input."""

    fields: tuple[Field, ...]

    def __post_init__(self) -> None:
        names = [f.name for f in self.fields]
        if not names:
            raise ConfigError("a feature schema needs at least one field")
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate field names in schema: {names}")

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def numeric_names(self) -> list[str]:
        return [f.name for f in self.fields if isinstance(f, NumericField)]

    @property
    def categorical_names(self) -> list[str]:
        return [f.name for f in self.fields if isinstance(f, CategoricalField)]

    @property
    def width(self) -> int:
        return sum(f.width for f in self.fields)

    @property
    def encoded_names(self) -> list[str]:
        return [name for f in self.fields for name in f.encoded_names]

    def slices(self) -> list[slice]:
        """The encoded columns of each field, in field order."""
        return list(self._slices)

    @cached_property
    def _slices(self) -> tuple[slice, ...]:
        # Computed once: explaining every alert of a batch asks for the slices again.
        out, start = [], 0
        for f in self.fields:
            out.append(slice(start, start + f.width))
            start += f.width
        return tuple(out)

    @cached_property
    def kinds(self) -> dict[str, str]:
        """Field name -> NUMERIC or CATEGORICAL, in schema order (what `training.contract` parses by)."""
        return {f.name: f.kind for f in self.fields}

    def fold_matrix(self) -> np.ndarray:
        """A (width x fields) 0/1 matrix summing encoded-column errors into per-field errors."""
        fold = np.zeros((self.width, len(self.fields)), dtype=np.float32)
        for j, s in enumerate(self.slices()):
            fold[s, j] = 1.0
        return fold

    def encode(self, columns: Mapping[str, np.ndarray | Sequence[Any]]) -> Encoded:
        """Raw columns -> float32 model input. Every schema field must be present as a column.

        The numeric fields are scaled together as one (rows x fields) array, value by value the arithmetic of
        `NumericField.encode`."""
        raws: list[np.ndarray] = []
        for f in self.fields:
            if f.name not in columns:
                raise ConfigError(f"column {f.name!r} is required by the model schema but absent")
            raw = np.asarray(columns[f.name], dtype=np.float64 if isinstance(f, NumericField) else object)
            if raws and len(raw) != len(raws[0]):
                raise ConfigError(f"column {f.name!r} has {len(raw)} rows, expected {len(raws[0])}")
            raws.append(raw)
        matrix = np.empty((len(raws[0]), self.width), dtype=np.float64)
        missing = [0] * len(self.fields)
        slices = self._slices
        if numeric := self._numeric:
            scaled, counts = _scale_numeric(np.stack([raws[k] for k, _ in numeric], axis=1), [f for _, f in numeric])
            for i, (k, _) in enumerate(numeric):
                matrix[:, slices[k].start] = scaled[:, i]
                missing[k] = counts[i]
        for k, f in enumerate(self.fields):
            if isinstance(f, CategoricalField):
                matrix[:, slices[k]], missing[k] = f.encode(raws[k])
        return Encoded(matrix=matrix.astype(np.float32),
                       missing={f.name: n for f, n in zip(self.fields, missing, strict=True)})

    @cached_property
    def _numeric(self) -> tuple[tuple[int, NumericField], ...]:
        return tuple((k, f) for k, f in enumerate(self.fields) if isinstance(f, NumericField))

    def to_dict(self) -> dict[str, Any]:
        return {"fields": [f.to_dict() for f in self.fields], "encoded_columns": self.encoded_names}

    def schema_hash(self) -> str:
        """Hash of what an event must look like: field names, kinds, order and vocabularies (not the stats)."""
        shape = [
            {"name": f.name, "kind": f.kind, **({"vocabulary": list(f.vocabulary)}
                                                if isinstance(f, CategoricalField) else {})}
            for f in self.fields
        ]
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSchema:
        """Read a schema written by `to_dict`, range-checking every value (docs/bundle.md, "Loading")."""
        try:
            fields: list[Field] = []
            for item in data["fields"]:
                if item["kind"] == NUMERIC:
                    fields.append(_numeric_from_dict(item))
                elif item["kind"] == CATEGORICAL:
                    fields.append(_categorical_from_dict(item))
                else:
                    raise BundleError(f"unknown field kind {item['kind']!r} for field {item.get('name')!r}")
            return cls(fields=tuple(fields))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise BundleError(f"feature schema is malformed ({exc!r}); retrain the model") from exc


#: Relative slack for a statistic computed in floating point against the range it came from.
_ROUNDING = 1e-9


def _name(item: Mapping[str, Any]) -> str:
    name = item["name"]
    if not isinstance(name, str) or not name:
        raise BundleError(f"a field name must be a non-empty string, got {name!r}; retrain the model")
    return name


def _finite(item: Mapping[str, Any], key: str, name: str) -> float:
    value = item[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BundleError(f"field {name!r}: {key} must be a finite number, got {value!r}; retrain the model")
    return float(value)


def _numeric_from_dict(item: Mapping[str, Any]) -> NumericField:
    """A numeric field whose statistics `fit_numeric` could have learned from finite training values."""
    name = _name(item)
    center, scale, impute = (_finite(item, key, name) for key in ("center", "scale", "impute"))
    low, high = (None if item.get(key) is None else _finite(item, key, name) for key in ("low", "high"))
    f = NumericField(name=name, log=bool(item["log"]), center=center, scale=scale, impute=impute,
                     constant=bool(item.get("constant", False)), low=low, high=high)
    problem = _statistics_problem(f)
    if problem is not None:
        raise BundleError(f"field {name!r}: {problem}; retrain the model")
    return f


def _statistics_problem(f: NumericField) -> str | None:
    """Why `f`'s statistics cannot come from its training values, or None.

    The rule: scale > 0; impute (the median) lies in the training range [low, high]; after the log
    transform (if any) the center (the mean) lies in that range, and the scale (the standard deviation)
    is at most the range's width, or 1 (a constant column's), and at least a 1e-9th of it. Only a field
    without values in training has no range, and it is constant with center 0 and scale 1.
    """
    if f.scale <= 0:
        return f"scale must be positive, got {f.scale!r}"
    if f.low is None or f.high is None:
        if f.low is None and f.high is None and f.constant and f.center == 0.0 and f.scale == 1.0:
            return None
        return (f"low and high (the training range) are required unless the field had no values in training "
                f"(then constant, center 0, scale 1); got low {f.low!r}, high {f.high!r}, center {f.center!r}, "
                f"scale {f.scale!r}")
    if f.low > f.high:
        return f"low {f.low!r} is above high {f.high!r}"
    if not f.low <= f.impute <= f.high:
        return f"impute {f.impute!r} must lie in the training range [{f.low!r}, {f.high!r}]"
    lo, hi = (float(signed_log1p(np.array(b))) if f.log else b for b in (f.low, f.high))
    after_log = " (after log)" if f.log else ""
    if not lo - _ROUNDING * max(abs(lo), abs(hi)) <= f.center <= hi + _ROUNDING * max(abs(lo), abs(hi)):
        return f"center {f.center!r} must lie in the training range [{lo!r}, {hi!r}]{after_log}"
    width = hi - lo
    if not width * _ROUNDING <= f.scale <= max(width, 1.0) * (1 + _ROUNDING):
        return (f"scale {f.scale!r} must be at most the training range's width {width!r}{after_log} (or 1) and at "
                f"least a 1e-9th of it")
    return None


def _categorical_from_dict(item: Mapping[str, Any]) -> CategoricalField:
    name = _name(item)
    vocabulary, impute = item["vocabulary"], item["impute"]
    if not isinstance(vocabulary, list) or not all(isinstance(v, str) for v in vocabulary) \
            or len(set(vocabulary)) != len(vocabulary):
        raise BundleError(f"field {name!r}: vocabulary must be a list of distinct strings; retrain the model")
    if not isinstance(impute, str):
        raise BundleError(f"field {name!r}: impute must be a string, got {impute!r}; retrain the model")
    return CategoricalField(name=name, vocabulary=tuple(vocabulary), impute=impute)


def fit_numeric(name: str, values: np.ndarray) -> NumericField:
    """Learn log/center/scale/impute for one numeric column from its training values (NaN = missing)."""
    present = values[~np.isnan(values)]
    if present.size == 0:
        return NumericField(name=name, log=False, center=0.0, scale=1.0, impute=0.0, constant=True)
    median = float(np.median(present))
    low, high = float(present.min()), float(present.max())
    std = float(np.std(present))
    if std == 0.0:
        # A constant column: scale 1 in log space, so a new value is an anomaly of bounded size.
        return NumericField(name=name, log=True, center=float(signed_log1p(np.array(median))),
                            scale=1.0, impute=median, constant=True, low=low, high=high)
    skew = float(np.mean(((present - present.mean()) / std) ** 3))
    log = skew > SKEW_FOR_LOG
    transformed = signed_log1p(present) if log else present
    center = float(np.mean(transformed))
    scale = float(np.std(transformed)) or 1.0
    return NumericField(name=name, log=log, center=center, scale=scale, impute=median, low=low, high=high)


def fit_categorical(name: str, values: np.ndarray) -> CategoricalField:
    """Learn the vocabulary (frequent categories) and the imputation value (mode) for one column."""
    present = [str(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    counts: dict[str, int] = {}
    for v in present:
        counts[v] = counts.get(v, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    vocabulary = tuple(v for v, c in ranked[:MAX_CATEGORIES] if c >= MIN_CATEGORY_COUNT)
    impute = ranked[0][0] if ranked else UNKNOWN
    return CategoricalField(name=name, vocabulary=vocabulary, impute=impute)


def fit_schema(columns: Mapping[str, np.ndarray], categorical: Sequence[str]) -> FeatureSchema:
    """Learn a schema from raw training columns; `categorical` names the one-hot fields, the rest are numeric."""
    fields: list[Field] = []
    for name, values in columns.items():
        if name in categorical:
            fields.append(fit_categorical(name, np.asarray(values, dtype=object)))
        else:
            fields.append(fit_numeric(name, np.asarray(values, dtype=np.float64)))
    return FeatureSchema(fields=tuple(fields))


# --- per-field training distributions (the worker's per-field drift baseline) ---------------------

#: Quantile bins per numeric field in the training histograms.
FIELD_BINS = 10


def field_histograms(schema: FeatureSchema, columns: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Training distribution of every field: numeric fields in quantile bins of their raw values,
    categorical fields as counts per vocabulary entry plus unknown (`field_codes` maps live values to
    the same bins). Missing values are left out: anomaly_missing_values_total counts them."""
    out = []
    for f in schema.fields:
        if isinstance(f, NumericField):
            values = np.asarray(columns[f.name], dtype=np.float64)
            values = values[~np.isnan(values)]
            edges = np.unique(np.quantile(values, np.linspace(0, 1, FIELD_BINS + 1))) if values.size else np.zeros(0)
            if edges.size < 3:  # (nearly) constant: below, at and above the training value
                center = float(edges[0]) if edges.size else 0.0
                step = max(abs(center) * 1e-9, 1e-12)
                edges = np.array([center - 1.0, center - step, center + step, center + 1.0])
            counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        else:
            codes = field_codes(f, columns[f.name])
            codes = codes[~np.isnan(codes)].astype(np.intp)
            counts = np.bincount(codes, minlength=f.width)
            edges = np.arange(f.width + 1, dtype=np.float64) - 0.5
        out.append({"name": f.name, "edges": [float(e) for e in edges], "counts": [int(c) for c in counts]})
    return {"bins": FIELD_BINS, "fields": out}


def field_codes(f: CategoricalField, values: np.ndarray) -> np.ndarray:
    """Category texts -> vocabulary index (unknown = len(vocabulary)), NaN for missing."""
    index = {v: float(i) for i, v in enumerate(f.vocabulary)}
    unknown = float(len(f.vocabulary))
    return np.fromiter((math.nan if v is None else index.get(v, unknown) for v in values), dtype=np.float64,
                       count=len(values))
