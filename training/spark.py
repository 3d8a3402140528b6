"""Score a Spark DataFrame with a bundle or a model repository: `anomaly-score`'s columns and numbers, at scale.

`score(df, model)` is lazy: it loads and verifies the bundle on the driver, then returns a DataFrame whose
rows are scored by `DataFrame.mapInPandas` on the executors, one Arrow batch at a time. Each Python worker
loads the bundle once and keeps it (keyed by path and version) for every later batch and task it runs.
Rows are checked and encoded by the same code as `anomaly-score` (`training.data.frame_columns`), so a row
gets the same score, flag and top feature here as in the CSV `anomaly-score` writes. pyspark is an optional
extra (`pip install 'streaming-anomaly[spark]'`); docs/spark.md says how to ship the bundle to a cluster.

A struct column follows the nested rule (training/nested.py), as a Parquet struct does: its members are
fields named ``<column>.<member>``. Window-feature bundles are refused: their features need each entity's
events in order through one state, which a DataFrame's partitions do not give.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from training.bundle import Bundle, load_bundle
from training.data import check_columns, frame_columns, input_kinds
from training.errors import BundleError, ConfigError, DataError
from training.nested import SEPARATOR, FieldClash
from training.repository import resolve_model
from training.scoring import Scores

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame
    from pyspark.sql.types import DataType, StructType

#: What an error about the rows names as their source (a DataFrame has no file name).
SOURCE = "Spark DataFrame"

#: The score columns, after the passthrough ones, as `anomaly-score` writes them (training.cli.SCORE_COLUMNS),
#: with their Spark types: is_anomaly is 0 or 1, as in the CSV.
SCORE_SCHEMA = "score double, is_anomaly int, top_feature string, top_feature_share double"


def score(df: DataFrame, model: str | Path, passthrough: Sequence[str] = (), *, ship: bool = False) -> DataFrame:
    """`df` scored with the bundle (or the repository's current version) at `model`: a lazy DataFrame with the
    `passthrough` columns first, then ``score, is_anomaly, top_feature, top_feature_share``.

    `model` is a path the driver reads; the executors read the same path (shared storage) unless `ship` is
    true, which adds the bundle to the job with `SparkContext.addFile` and reads it from `SparkFiles` there.
    Columns besides the model's fields and `passthrough` are ignored. A value that breaks the data contract
    fails the job with `anomaly-score`'s message (partition and row instead of file and row)::

        from training.spark import score
        scored = score(spark.read.parquet("s3a://flows/2026-q3/"), "/mnt/models/flows", ["flow_id"])
        scored.where("is_anomaly = 1").write.parquet("s3a://audits/flows-q3/")
    """
    # Absolute, links kept: the executors' working folder is not the driver's, and a mount point is a name.
    bundle = load_bundle(resolve_model(Path(os.path.abspath(model))))
    if bundle.windows is not None:
        raise BundleError(f"{bundle.path}: model {bundle.version} has window features "
                          f"({bundle.windows.names[0]}, ...), which need each entity's events in order through "
                          f"one state, and a DataFrame's partitions have no such order; score the rows with "
                          f"anomaly-score (one file in event order) or replay them through the worker")
    fields = dict(flat_fields(df.schema))
    check_columns(pd.DataFrame(columns=list(fields)), bundle.schema, list(fields), Path(SOURCE))
    _check_passthrough(passthrough, fields)
    names = list(input_kinds(bundle.schema))
    # Internal names (f0.., p0..) keep a feature and a passthrough copy of one field apart.
    selected = [_as_feature(*fields[name]).alias(f"f{i}") for i, name in enumerate(names)]
    selected += [fields[name][0].alias(f"p{i}") for i, name in enumerate(passthrough)]
    if ship:
        df.sparkSession.sparkContext.addFile(str(bundle.path), recursive=True)
    task = _Task(str(bundle.path), bundle.version, ship, tuple(names), tuple(passthrough))
    output = ", ".join(f"`{_quoted(name)}` {fields[name][1].simpleString()}" for name in passthrough)
    return df.select(*selected).mapInPandas(task, ", ".join(filter(None, [output, SCORE_SCHEMA])))


def flat_fields(schema: StructType) -> list[tuple[str, tuple[Column, DataType]]]:
    """Each field of a DataFrame's schema under the nested rule, with the column that selects it: a struct's
    members as ``<struct>.<member>`` (an empty struct adds none), any other column as itself. A name reached
    twice (a column ``a.b`` beside a struct ``a`` with a member ``b``) is a `DataError`."""
    fields = list(_walk(schema, "", None))
    clash = next((name for name, count in Counter(name for name, _ in fields).items() if count > 1), None)
    if clash is not None:
        raise DataError(f"{SOURCE}: {FieldClash(clash)}")
    return fields


def _walk(schema: StructType, prefix: str, parent: Column | None) -> Iterator[tuple[str, tuple[Column, DataType]]]:
    from pyspark.sql import functions as F
    from pyspark.sql.types import StructType

    for child in schema.fields:
        column = F.col(f"`{_quoted(child.name)}`") if parent is None else parent.getField(child.name)
        if isinstance(child.dataType, StructType):
            yield from _walk(child.dataType, f"{prefix}{child.name}{SEPARATOR}", column)
        else:
            yield prefix + child.name, (column, child.dataType)


def _quoted(name: str) -> str:
    """A column name for Spark's parser inside backticks (a dot there is part of the name)."""
    return name.replace("`", "``")


def _as_feature(column: Column, kind: DataType) -> Column:
    """A column as the data contract reads it: instants as epoch seconds.

    pyspark hands timestamps to pandas in the session's time zone without one, which the contract would read
    as UTC; seconds computed in Spark are the same number `training.data.raw_values` gives a Parquet timestamp
    (whole microseconds over 10**6) or date (whole days times 86,400)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import DateType, TimestampType

    if isinstance(kind, TimestampType):
        return column.cast("double")
    if isinstance(kind, DateType):
        return (F.unix_date(column).cast("long") * 86_400).cast("double")
    return column


def _check_passthrough(names: Sequence[str], fields: dict[str, Any]) -> None:
    if isinstance(names, str):
        raise ConfigError(f"passthrough is a list of column names, got the string {names!r}; pass [{names!r}]")
    absent = [name for name in names if name not in fields]
    if absent:
        raise DataError(f"{SOURCE}: passthrough column(s) not found: {', '.join(absent)}; fields are "
                        f"{', '.join(list(fields)[:10])}")
    taken = [name for name, count in Counter([*names, *score_names()]).items() if count > 1]
    if taken:
        raise ConfigError(f"passthrough names {taken[0]!r} twice or as a score column; an output column name must "
                          f"be unique (rename it with withColumnRenamed first)")


def score_names() -> list[str]:
    """The score columns' names, in order."""
    return [part.split()[0] for part in SCORE_SCHEMA.split(", ")]


def score_columns(bundle: Bundle, scores: Scores) -> dict[str, np.ndarray]:
    """The score columns of scored rows, as `anomaly-score` computes them before it writes them as text."""
    totals = np.maximum(scores.field_errors.sum(axis=1), 1e-30)
    return {"score": scores.score,
            "is_anomaly": (scores.score > bundle.threshold.value).astype(np.int32),
            "top_feature": np.asarray(bundle.scorer.top_fields(scores), dtype=object),
            "top_feature_share": scores.field_errors.max(axis=1) / totals}


#: Bundles loaded in this Python process (a Spark Python worker), by path and version.
_loaded: dict[tuple[str, str], Bundle] = {}


def worker_bundle(path: str, version: str) -> Bundle:
    """The bundle at `path`, loaded and verified once per process; it must be the version the driver resolved."""
    key = (path, version)
    if key not in _loaded:
        bundle = load_bundle(Path(path))
        if bundle.version != version:
            raise BundleError(f"{path}: holds model {bundle.version} on this executor, but the driver scores with "
                              f"{version}; give every node the same bundle (or ship it: score(..., ship=True))")
        bundle.scorer  # noqa: B018 - load the SavedModel now, once, not inside the first batch's timing
        _loaded[key] = bundle
    return _loaded[key]


@dataclass(frozen=True)
class _Task:
    """What `mapInPandas` runs on each partition (pickled by reference: the executors import this module)."""

    path: str
    version: str
    shipped: bool
    fields: tuple[str, ...]
    passthrough: tuple[str, ...]

    def __call__(self, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from pyspark import SparkFiles, TaskContext

        path = SparkFiles.get(Path(self.path).name) if self.shipped else self.path
        bundle = worker_bundle(path, self.version)
        context = TaskContext.get()
        source = Path(f"{SOURCE} partition {context.partitionId() if context else '?'}")
        first_row = 1
        width = len(self.fields)
        for batch in batches:
            features = batch.iloc[:, :width].set_axis(list(self.fields), axis=1)
            columns = frame_columns(bundle.schema, features, source, first_row)
            scores = bundle.scorer.score(bundle.schema.encode(columns).matrix)
            kept = {name: batch.iloc[:, width + i] for i, name in enumerate(self.passthrough)}
            yield pd.DataFrame({**kept, **score_columns(bundle, scores)}, index=batch.index)
            first_row += len(batch)
