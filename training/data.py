"""Reading event files (CSV, JSON Lines, Parquet) into raw columns, with errors that name file, column and row.

Row numbers in messages count data rows from 1 (for CSV, row 1 is the line after the header).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from training.errors import DataError
from training.features import CATEGORICAL, NUMERIC, FeatureSchema, NumericField, category_text

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
           ".pq": "parquet"}
#: A column without a declared kind is numeric when at least this share of its present values parse as numbers.
NUMERIC_SHARE = 0.5


def file_format(path: Path) -> str:
    """The reader for a path, chosen by extension."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unknown file type {path.suffix or '(none)'!r}; "
                        f"use one of {', '.join(sorted(FORMATS))}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return fmt


def file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _read_chunks(path: Path, chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    fmt = file_format(path)
    try:
        if fmt == "csv":
            if chunk_rows is None:
                yield pd.read_csv(path, dtype=str, skipinitialspace=True)
            else:
                yield from pd.read_csv(path, dtype=str, skipinitialspace=True, chunksize=chunk_rows)
        elif fmt == "jsonl":
            opts = {"lines": True, "dtype": False, "convert_dates": False, "keep_default_dates": False}
            if chunk_rows is None:
                yield pd.read_json(path, **opts)  # type: ignore[call-overload]
            else:
                with pd.read_json(path, chunksize=chunk_rows, **opts) as reader:  # type: ignore[call-overload]
                    yield from reader
        else:
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(path)
            for batch in parquet.iter_batches(batch_size=chunk_rows or 65_536):
                yield batch.to_pandas()
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: file is empty") from exc
    except (ValueError, pd.errors.ParserError, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot be read as {fmt}: {str(exc).splitlines()[0]}") from exc


def read_frame(path: Path) -> pd.DataFrame:
    """Read a whole file; raises DataError if it has no data rows."""
    frames = list(_read_chunks(path, None))
    # A Parquet file with zero rows yields no batches at all.
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0] if frames else pd.DataFrame()
    if frame.empty or len(frame.columns) == 0:
        raise DataError(f"{path}: file has no data rows")
    return frame


def iter_frames(path: Path, chunk_rows: int) -> Iterator[tuple[int, pd.DataFrame]]:
    """Yield (row number of the chunk's first row, chunk) with bounded memory."""
    first = 1
    seen = False
    for chunk in _read_chunks(path, chunk_rows):
        chunk = chunk.reset_index(drop=True)
        seen = seen or not chunk.empty
        yield first, chunk
        first += len(chunk)
    if not seen:
        raise DataError(f"{path}: file has no data rows")


def _is_missing(values: pd.Series) -> np.ndarray:
    return np.asarray(values.isna(), dtype=bool)


def numeric_column(values: pd.Series, column: str, path: Path, first_row: int = 1) -> np.ndarray:
    """Coerce a column to float64 (NaN = missing); stray text or infinities raise DataError naming the row."""
    if values.dtype == bool:
        return values.to_numpy(dtype=np.float64)
    parsed = pd.to_numeric(values, errors="coerce")
    numbers = np.asarray(parsed, dtype=np.float64)
    bad = np.flatnonzero(np.isnan(numbers) & ~_is_missing(values))
    if bad.size:
        row = int(bad[0])
        raise DataError(f"{path}: column {column!r}, row {first_row + row}: {values.iloc[row]!r} is not a number "
                        f"({bad.size} such rows in this chunk; fix the value, or declare the column "
                        f"categorical with --categorical {column})")
    inf = np.flatnonzero(np.isinf(numbers))
    if inf.size:
        row = int(inf[0])
        raise DataError(f"{path}: column {column!r}, row {first_row + row}: infinite value "
                        f"({inf.size} such rows); numbers must be finite")
    return numbers


def categorical_column(values: pd.Series) -> np.ndarray:
    """Strings with None for missing; numbers become their text (80 -> '80')."""
    out = np.empty(len(values), dtype=object)
    missing = _is_missing(values)
    out[:] = [None if m else category_text(v) for v, m in zip(values.tolist(), missing, strict=True)]
    return out


def infer_kinds(frame: pd.DataFrame, categorical: Sequence[str]) -> dict[str, str]:
    """Kind of each column: declared categorical, typed numeric, or mostly-numeric text -> numeric."""
    kinds: dict[str, str] = {}
    for name in frame.columns:
        col = frame[name]
        if name in categorical:
            kinds[name] = CATEGORICAL
        elif pd.api.types.is_numeric_dtype(col.dtype) or pd.api.types.is_bool_dtype(col.dtype):
            kinds[name] = NUMERIC
        else:
            present = col.dropna()
            parsed = pd.to_numeric(present, errors="coerce")
            share = float(parsed.notna().mean()) if len(present) else 1.0
            kinds[name] = NUMERIC if share >= NUMERIC_SHARE else CATEGORICAL
    return kinds


def raw_columns(frame: pd.DataFrame, kinds: dict[str, str], path: Path, first_row: int = 1) -> dict[str, np.ndarray]:
    """DataFrame -> raw columns for the given kinds, validating numeric values."""
    return {
        name: numeric_column(frame[name], name, path, first_row) if kind == NUMERIC else categorical_column(frame[name])
        for name, kind in kinds.items()
    }


def schema_kinds(schema: FeatureSchema) -> dict[str, str]:
    return {f.name: NUMERIC if isinstance(f, NumericField) else CATEGORICAL for f in schema.fields}


def check_columns(frame: pd.DataFrame, schema: FeatureSchema, allowed_extra: Sequence[str], path: Path) -> None:
    """At scoring time the file must carry every schema column and nothing unexpected."""
    missing = [n for n in schema.names if n not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) required by the model: {', '.join(missing)}")
    extra = [c for c in frame.columns if c not in schema.names and c not in allowed_extra]
    if extra:
        raise DataError(f"{path}: unexpected column(s) {', '.join(map(str, extra))}; the model was trained on "
                        f"{len(schema.names)} columns. Pass --passthrough {extra[0]} to copy such a column "
                        f"to the output, or remove it")


@dataclass(frozen=True)
class Labels:
    """Which rows are normal, from a label column and the value that means normal."""

    column: str
    normal_value: str

    def is_normal(self, frame: pd.DataFrame, path: Path) -> np.ndarray:
        if self.column not in frame.columns:
            raise DataError(f"{path}: label column {self.column!r} not found; columns are "
                            f"{', '.join(map(str, frame.columns[:10]))}")
        values = frame[self.column]
        if values.isna().any():
            row = int(np.flatnonzero(_is_missing(values))[0]) + 1
            raise DataError(f"{path}: label column {self.column!r}, row {row}: label is missing")
        as_text = categorical_column(values)
        normal = np.asarray([v == self.normal_value for v in as_text], dtype=bool)
        if not normal.any():
            seen = sorted({str(v) for v in as_text})[:5]
            raise DataError(f"{path}: label column {self.column!r} has no row equal to {self.normal_value!r} "
                            f"(values seen: {', '.join(seen)}); set --normal-value to the label of normal rows")
        return normal


def encode_frame(schema: FeatureSchema, frame: pd.DataFrame, source: Path, first_row: int = 1) -> np.ndarray:
    """Encode a frame already checked to carry the schema's columns (validating numeric values)."""
    return schema.encode(raw_columns(frame, schema_kinds(schema), source, first_row)).matrix
