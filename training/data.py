"""Reading event files (CSV, JSON Lines, Parquet) into raw columns, with errors that name file, column and row.

Row numbers in messages count data rows from 1 (for CSV, row 1 is the line after the header). Column names
are unique: a file that repeats one is refused (JSON Lines cannot: a repeated key is one value, the last,
as in an event).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import time
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from training.contract import (
    CATEGORICAL,
    NA_STRINGS,
    NUMERIC,
    Invalid,
    Reason,
    build_columns,
    categorical_column,
    decode_event,
    epoch_seconds,
    instant,
    json_type,
    numeric_share,
)
from training.errors import DataError
from training.features import FeatureSchema
from training.nested import FieldClash, plain, plain_record
from training.window_state import WindowInputs, WindowState
from training.windows import WindowSpec, is_window_feature, window_inputs

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
           ".pq": "parquet", ".avro": "avro"}
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
            # Every cell as text; NA-like text is missing (the contract, not pandas' defaults, decides).
            opts: dict[str, Any] = {"dtype": str, "skipinitialspace": True, "keep_default_na": False,
                                    "na_values": sorted(NA_STRINGS)}
            # pandas renames a repeated header name ("x" -> "x.1"); the header read as a row keeps it.
            header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False, skipinitialspace=True)
            _unique([name for name in header.iloc[0].tolist() if name], path)  # blank ones: "Unnamed: N"
            if chunk_rows is None:
                yield pd.read_csv(path, **opts)
            else:
                yield from pd.read_csv(path, chunksize=chunk_rows, **opts)
        elif fmt == "jsonl":
            yield from _read_jsonl(path, chunk_rows)
        elif fmt == "avro":
            yield from _read_avro(path, chunk_rows)
        else:
            yield from _read_parquet(path, chunk_rows)
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: file is empty") from exc
    except (ValueError, EOFError, pd.errors.ParserError, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot be read as {fmt}: {str(exc).splitlines()[0]}") from exc


def _read_parquet(path: Path, chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    """Parquet row groups as frames; struct columns become one column per member (training/nested.py's rule)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    _unique(parquet.schema_arrow.names, path)
    for batch in parquet.iter_batches(batch_size=chunk_rows or 65_536):
        yield _flat_frame(pa.Table.from_batches([batch]), path)


def _flat_frame(table: Any, path: Path) -> pd.DataFrame:
    """An Arrow table as a frame, struct columns as one column per member (training/nested.py's rule)."""
    import pyarrow as pa

    while any(pa.types.is_struct(column.type) for column in table.schema):
        nested = {str(column.name) for column in table.schema if pa.types.is_struct(column.type)}
        table = table.flatten()  # one level: "a" -> "a.b" (pyarrow names members as the rule does)
        clashes = [name for name, count in Counter(table.column_names).items() if count > 1]
        if clashes:
            raise DataError(f"{path}: {FieldClash(clashes[0])} (struct {', '.join(sorted(nested))})")
    return cast(pd.DataFrame, table.to_pandas(date_as_object=False))  # dates as datetime64, like timestamps


def _read_avro(path: Path, chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    """An Avro container file's records as object columns, each as its JSON value (training/nested.py)."""
    import fastavro

    rows: list[dict[str, Any]] = []
    with path.open("rb") as fh:
        try:
            reader = fastavro.reader(fh)
        except (ValueError, EOFError) as exc:
            raise DataError(f"{path}: not an Avro container file: {exc}") from exc
        for number, record in enumerate(reader, start=1):
            if not isinstance(record, dict):
                raise DataError(f"{path}: record {number}: the file's schema is not a record, "
                                f"got {type(record).__name__}")
            try:
                rows.append(plain_record(record))
            except FieldClash as exc:
                raise DataError(f"{path}: record {number}: {exc}") from exc
            if chunk_rows is not None and len(rows) >= chunk_rows:
                yield object_frame(rows)
                rows = []
    if rows or chunk_rows is None:
        yield object_frame(rows)


def _unique(names: Iterable[object], path: Path) -> None:
    """Refuse a file whose header names a column twice (one name, one column: a field is not two values)."""
    repeated = [name for name, count in Counter(map(str, names)).items() if count > 1]
    if repeated:
        raise DataError(f"{path}: column {repeated[0]!r} appears more than once; column names must be unique "
                        f"(rename or remove the repeated column)")


def _read_jsonl(path: Path, chunk_rows: int | None) -> Iterator[pd.DataFrame]:
    """JSON Lines as object columns holding the decoded JSON values, exactly as an event carries them
    (decoded by `training.contract.decode_event`, like a Kafka record).

    A key absent from a row is a missing value (as in an event); blank lines are skipped.
    """
    rows: list[dict[str, Any]] = []
    with path.open("rb") as fh:
        for line_number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = decode_event(line, len(line))  # the worker's decoder: one meaning per record
            if isinstance(row, Invalid):
                raise DataError(f"{path}: line {line_number}: {row.message}")
            rows.append(row)
            if chunk_rows is not None and len(rows) >= chunk_rows:
                yield object_frame(rows)
                rows = []
    if rows or chunk_rows is None:
        yield object_frame(rows)


def object_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Decoded JSON objects -> a frame of object columns (a key absent from a row is None there)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    columns = {}
    for name in names:
        values = np.empty(len(rows), dtype=object)
        values[:] = [row.get(name) for row in rows]
        columns[name] = values
    return pd.DataFrame(columns, index=pd.RangeIndex(len(rows)))


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


#: Characters that make `--data` a glob pattern rather than a path.
GLOB_CHARACTERS = frozenset("*?[")


@dataclass(frozen=True)
class Source:
    """What `anomaly-train --data` names: one file, the files a glob matches, or a partitioned Parquet folder
    (as Spark writes one: hive-style `name=value` folders, whose names and values become columns)."""

    name: str
    files: tuple[Path, ...]
    folder: Path | None = None

    @property
    def single(self) -> bool:
        return self.folder is None and len(self.files) == 1 and str(self.files[0]) == self.name


def resolve_source(data: Path) -> Source:
    """The files behind `--data` (sorted, so a seeded sample reads rows in one order), or a DataError."""
    text = str(data)
    if data.is_dir():
        import pyarrow.dataset as ds

        try:
            dataset = ds.dataset(data, format="parquet", partitioning="hive")
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"{data}: not a partitioned Parquet folder: {str(exc).splitlines()[0]}") from exc
        if not dataset.files:
            raise DataError(f"{data}: folder holds no Parquet files")
        return Source(text, tuple(sorted(Path(name) for name in dataset.files)), data)
    if not data.exists() and GLOB_CHARACTERS & set(text):
        import glob

        files = tuple(Path(name) for name in sorted(glob.glob(text)) if Path(name).is_file())
        if not files:
            raise DataError(f"{text}: the pattern matches no file")
        for path in files:
            file_format(path)
        return Source(text, files)
    file_format(data)
    return Source(text, (data,))


def source_sha256(source: Source) -> str:
    """One file's sha256, as before; for several, the sha256 of each file's name (relative to the folder or
    the pattern's fixed part) and sha256, one per line in sorted order: the whole input, streamed."""
    if source.single:
        return file_sha256(source.files[0])
    base = source.folder or Path(os.path.commonpath([path.parent for path in source.files]))
    lines = "".join(f"{path.relative_to(base).as_posix()}  {file_sha256(path)}\n" for path in source.files)
    return hashlib.sha256(lines.encode()).hexdigest()


def iter_source(source: Source, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The source's rows in chunks of at most `chunk_rows`, file after file in sorted order."""
    if source.folder is None:
        for path in source.files:
            yield from _read_chunks(path, chunk_rows)
        return
    import pyarrow as pa
    import pyarrow.dataset as ds

    dataset = ds.dataset(list(map(str, source.files)), format="parquet",
                         partitioning=ds.HivePartitioning.discover(), partition_base_dir=str(source.folder))
    _unique(dataset.schema.names, source.folder)  # a partition named like a column is one name twice
    fragments = {fragment.path: fragment for fragment in dataset.get_fragments()}
    for path in source.files:
        try:
            for batch in fragments[str(path)].to_batches(schema=dataset.schema, batch_size=chunk_rows):
                yield _flat_frame(pa.Table.from_batches([batch]), path)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path}: cannot be read as parquet: {str(exc).splitlines()[0]}") from exc


#: Ticks per second of each pandas datetime unit.
_PER_SECOND = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}


def raw_values(values: pd.Series) -> np.ndarray:
    """A frame column as the contract takes it: a typed numeric array, or objects with None for missing.

    Timestamps (any unit; with a time zone or without, which means UTC) and dates are instants: epoch
    seconds, the number ISO 8601 text of the same instant has in CSV, JSON Lines and events.
    """
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        array = values.array
        present = ~values.isna().to_numpy()
        seconds = np.full(len(values), np.nan)
        seconds[present] = epoch_seconds(array.asi8[present], _PER_SECOND[array.unit])
        return seconds
    if not isinstance(values.dtype, pd.api.extensions.ExtensionDtype) and (
            pd.api.types.is_bool_dtype(values.dtype) or pd.api.types.is_numeric_dtype(values.dtype)):
        return values.to_numpy()
    objects = values.to_numpy(dtype=object, na_value=None)  # type: ignore[call-overload]
    # Parquet binary, decimal, time: the JSON value each stands for (training/nested.py), as from Avro.
    if any(isinstance(value, bytes | Decimal | time) for value in objects[:1000].tolist()):
        texts = np.empty(len(objects), dtype=object)
        texts[:] = [plain(value) for value in objects.tolist()]
        return texts
    return objects


def array_columns(frame: pd.DataFrame) -> list[str]:
    """Columns holding arrays (JSON arrays, Avro/Parquet lists): never features (training/nested.py)."""
    return [str(name) for name in frame.columns if frame[name].dtype == object
            and any(isinstance(value, list | tuple | np.ndarray) for value in frame[name].tolist())]


def infer_kinds(frame: pd.DataFrame, categorical: Sequence[str]) -> dict[str, str]:
    """Kind of each column: declared categorical, else numeric when most present values are numbers."""
    return {str(name): CATEGORICAL if name in categorical or numeric_share(raw_values(frame[name])) < NUMERIC_SHARE
            else NUMERIC for name in frame.columns}


def instant_columns(frame: pd.DataFrame, names: Iterable[str]) -> list[str]:
    """Those of `names` that hold instants: timestamp or date columns, or text mostly in ISO 8601 form."""
    return [name for name in names if name in frame.columns and _holds_instants(frame[name])]


def _holds_instants(values: pd.Series) -> bool:
    if pd.api.types.is_datetime64_any_dtype(values.dtype):
        return True
    raw = raw_values(values)
    if raw.dtype != object:
        return False
    try:
        raw.astype(np.float64)  # numbers and NA-like text only: no instant (the common case, in one C call)
        return False
    except (TypeError, ValueError, OverflowError):
        pass
    texts = [value.strip() for value in raw.tolist() if isinstance(value, str)]
    present = [text for text in texts if text not in NA_STRINGS]
    return sum(instant(text) is not None for text in present) >= NUMERIC_SHARE * max(len(present), 1)


def instant_warnings(frame: pd.DataFrame, names: Iterable[str]) -> list[str]:
    """One line per instant column of the features: an absolute time leaves its training range (`--drop` it)."""
    return [f"warning: column {name!r} holds instants: an absolute time keeps growing past its training range, "
            f"so later events look anomalous on it; pass --drop {name} unless that is intended"
            for name in instant_columns(frame, names)]


def raw_columns(frame: pd.DataFrame, kinds: dict[str, str], path: Path, first_row: int = 1) -> dict[str, np.ndarray]:
    """DataFrame -> parsed columns for the given kinds; a value that breaks the contract is a DataError.

    A kind whose column the frame lacks is missing in every row (a JSON Lines file may omit a key).
    """
    raw = {name: raw_values(frame[name]) for name in kinds if name in frame.columns}
    parsed = build_columns(raw, kinds, len(frame))
    if parsed.problems:
        row, problem = next(iter(parsed.problems.items()))
        raise DataError(_problem_message(path, first_row, row, problem, raw, kinds,
                                         sum(p.field == problem.field for p in parsed.problems.values())))
    return parsed.columns


def _problem_message(path: Path, first_row: int, row: int, problem: Invalid, raw: dict[str, np.ndarray],
                     kinds: dict[str, str], count: int) -> str:
    where = f"{path}: column {problem.field!r}, row {first_row + row}"
    if problem.reason == Reason.NO_FEATURES or problem.field is None:
        return (f"{path}: row {first_row + row}: none of the {len(kinds)} feature columns has a value "
                f"({count} such rows in this chunk); fill them in or remove the row")
    value = raw[problem.field][row] if problem.field in raw else None
    if problem.reason == Reason.NON_FINITE:
        return f"{where}: infinite value {value!r} ({count} such rows in this chunk); numbers must be finite"
    if kinds[problem.field] == NUMERIC:
        return (f"{where}: {value!r} is not a number ({count} such rows in this chunk; fix the value, or declare "
                f"the column categorical with --categorical {problem.field})")
    return f"{where}: a {json_type(value)} cannot be a category ({count} such rows in this chunk); use text"


def check_columns(frame: pd.DataFrame, schema: FeatureSchema, allowed_extra: Sequence[str], path: Path,
                  windows: WindowSpec | None = None) -> None:
    """At scoring time the file must carry every schema column and nothing unexpected.

    Window features are computed, not read: a file for a windowed model carries the windows' entity and time
    fields instead. In JSON Lines an absent key is a missing value, as in an event, so only CSV and Parquet
    need every column.
    """
    needed = [n for n in schema.names if not is_window_feature(n)]
    if windows is not None:
        needed += [n for n in windows.key_fields if n not in needed]
    missing = [n for n in needed if n not in frame.columns]
    if missing and FORMATS.get(path.suffix.lower()) != "jsonl":
        raise DataError(f"{path}: missing column(s) required by the model: {', '.join(missing)}")
    extra = [c for c in frame.columns if c not in schema.names and c not in allowed_extra]
    if extra:
        raise DataError(f"{path}: unexpected column(s) {', '.join(map(str, extra))}; the model was trained on "
                        f"{len(schema.names)} columns. Pass --passthrough {extra[0]} to copy such a column "
                        f"to the output, or remove it")


def check_passthrough(frame: pd.DataFrame, names: Sequence[str], path: Path) -> list[list[Any]]:
    """The values of the --passthrough columns (JSON Lines: an absent key is an empty cell)."""
    absent = [n for n in names if n not in frame.columns]
    if absent and FORMATS.get(path.suffix.lower()) != "jsonl":
        raise DataError(f"{path}: --passthrough column(s) not found: {', '.join(absent)}; columns are "
                        f"{', '.join(map(str, frame.columns[:10]))}")
    return [frame[n].tolist() if n in frame.columns else [None] * len(frame) for n in names]


@dataclass(frozen=True)
class Labels:
    """Which rows are normal, from a label column and the value that means normal."""

    column: str
    normal_value: str

    def is_normal(self, frame: pd.DataFrame, path: Path) -> np.ndarray:
        """The normal rows of a whole data set, which must hold at least one."""
        normal = self.normal_rows(frame, path)
        if not normal.any():
            labels = categorical_column(raw_values(frame[self.column]), self.column).values
            seen = sorted({str(v) for v in labels})[:5]
            raise DataError(f"{path}: label column {self.column!r} has no row equal to {self.normal_value!r} "
                            f"(values seen: {', '.join(seen)}); set --normal-value to the label of normal rows")
        return normal

    def normal_rows(self, frame: pd.DataFrame, path: Path, first_row: int = 1) -> np.ndarray:
        """Which of a chunk's rows are normal (a chunk may hold none); `first_row` numbers them in messages."""
        if self.column not in frame.columns:
            raise DataError(f"{path}: label column {self.column!r} not found; columns are "
                            f"{', '.join(map(str, frame.columns[:10]))}")
        column = categorical_column(raw_values(frame[self.column]), self.column)
        missing = column.missing()
        if missing.any():
            row = int(np.flatnonzero(missing)[0]) + first_row
            raise DataError(f"{path}: label column {self.column!r}, row {row}: label is missing")
        return np.asarray(np.asarray(column.values, dtype=object) == self.normal_value, dtype=bool)


def encode_frame(schema: FeatureSchema, frame: pd.DataFrame, source: Path, first_row: int = 1,
                 windows: WindowState | None = None) -> np.ndarray:
    """Encode a frame already checked to carry the schema's columns (validating numeric values).

    A windowed model's features are computed by `windows`, the file's one state, fed the frame's rows in
    order: chunk after chunk of a file gives the features of the whole file in one call."""
    return schema.encode(frame_columns(schema, frame, source, first_row, windows)).matrix


def frame_columns(schema: FeatureSchema, frame: pd.DataFrame, source: Path, first_row: int = 1,
                  windows: WindowState | None = None) -> dict[str, np.ndarray]:
    """The parsed columns `encode_frame` encodes: the frame's own, and the window features `windows` computes."""
    if windows is None:
        return raw_columns(frame, schema.kinds, source, first_row)
    columns = raw_columns(frame, input_kinds(schema), source, first_row)
    return with_windows(columns, windows.advance(frame_window_inputs(windows.spec, frame, columns)), windows.spec)


def file_windows(spec: WindowSpec | None) -> WindowState | None:
    """The window state of one file scored with a windowed model: a replay of the file onto one partition,
    with no entity limit (the windows' horizon bounds it). None for a model without windows."""
    return None if spec is None else WindowState(spec, max_entities=sys.maxsize)


def input_kinds(schema: FeatureSchema) -> dict[str, str]:
    """The fields a row or an event carries itself: the schema's, less the window features computed from them."""
    return {name: kind for name, kind in schema.kinds.items() if not is_window_feature(name)}


def frame_window_inputs(spec: WindowSpec, frame: pd.DataFrame, parsed: dict[str, np.ndarray],
                        record_times_s: np.ndarray | None = None) -> WindowInputs:
    """What the windows read of a frame's rows: `parsed` model columns, the other fields parsed from the frame."""
    wanted = [*spec.key_fields, *spec.numeric, *spec.categorical]
    raw = {name: raw_values(frame[name]) for name in wanted if name in frame.columns and name not in parsed}
    return cast(WindowInputs, window_inputs(spec, raw, parsed, len(frame), record_times_s))


def with_windows(columns: dict[str, np.ndarray], features: np.ndarray, spec: WindowSpec) -> dict[str, np.ndarray]:
    """Parsed columns and the window features (`WindowState.advance`'s n x width array) as columns of their own."""
    return {**columns, **{name: features[:, i] for i, name in enumerate(spec.names)}}
