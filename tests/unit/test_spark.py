"""training.spark.score on a real local-mode Spark: anomaly-score's columns and exactly its numbers."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.unit.conftest import TRAIN_ARGS, synthetic_events
from training.cli import SCORE_COLUMNS, score_main, train_main
from training.errors import BundleError, DataError
from training.repository import resolve_model

pyspark = pytest.importorskip("pyspark", reason="pyspark is the optional extra streaming-anomaly[spark]")
from pyspark.sql import DataFrame, SparkSession  # noqa: E402 - only once pyspark is known to be installed

from training.spark import score  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas")]

#: The rows' fields as Spark types; two feature names hold a dot (as a flattened struct's members do).
SCHEMA = ("event_id string, `req.amount` double, `req.latency` double, version double, method string, "
          "label string")


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYSPARK_PYTHON", sys.executable)  # the Python workers need this venv's packages
        session = (SparkSession.builder.master("local[1]").appName("test_spark")
                   .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1")
                   .config("spark.driver.memory", "512m").config("spark.default.parallelism", "1")
                   .getOrCreate())
        session.sparkContext.setLogLevel("ERROR")
        yield session
        session.stop()


@dataclass(frozen=True)
class Scored:
    """A model repository trained by anomaly-train, rows to score, and anomaly-score's CSV of those rows."""

    repo: Path
    rows: pd.DataFrame
    cli: pd.DataFrame


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> Scored:
    root = tmp_path_factory.mktemp("spark")
    frame = synthetic_events().rename(columns={"amount": "req.amount", "latency": "req.latency"})
    train = root / "train.csv"
    frame.to_csv(train, index=False)
    assert train_main(["--data", str(train), "--repo", str(root / "repo"), "--promote", "--label-column", "label",
                       "--normal-value", "normal", "--drop", "event_id", *TRAIN_ARGS]) == 0
    rows = synthetic_events(120, seed=3).rename(columns={"amount": "req.amount", "latency": "req.latency"})
    rows = rows.astype(object)
    rows.loc[[3, 40], "req.amount"] = None  # missing values, numeric and categorical
    rows.loc[[5, 40], "method"] = None
    rows.loc[[7, 90], "method"] = "PATCH"  # a category the model never saw
    data = root / "rows.csv"
    rows.to_csv(data, index=False)
    out = root / "rows.scores.csv"
    assert score_main(["--model", str(root / "repo"), "--data", str(data), "--out", str(out),
                       "--passthrough", "event_id", "label"]) == 0
    return Scored(repo=root / "repo", rows=rows, cli=pd.read_csv(out, dtype=str, keep_default_na=False))


def spark_rows(spark: SparkSession, rows: pd.DataFrame, schema: str = SCHEMA) -> DataFrame:
    """The rows as a DataFrame with Spark nulls for the missing values, spread over three partitions."""
    records = [tuple(None if pd.isna(v) else v for v in row) for row in rows.itertuples(index=False)]
    return spark.createDataFrame(records, schema).repartition(3)


def as_written(out: pd.DataFrame) -> pd.DataFrame:
    """Spark's score columns as anomaly-score writes them in its CSV."""
    return out.assign(score=[f"{s:.9g}" for s in out["score"]], is_anomaly=out["is_anomaly"].astype(str),
                      top_feature_share=[f"{s:.4f}" for s in out["top_feature_share"]])


def assert_same_scores(out: pd.DataFrame, cli: pd.DataFrame, columns: list[str]) -> None:
    """Row by row (matched on event_id: partitions reorder rows), every column equal to anomaly-score's text."""
    mine = as_written(out).set_index("event_id").loc[cli["event_id"], columns].reset_index()
    pd.testing.assert_frame_equal(mine, cli[["event_id", *columns]], check_dtype=False)


def test_scores_equal_anomaly_score_with_passthrough_missing_values_and_categories(
        spark: SparkSession, scored: Scored) -> None:
    bundle = resolve_model(scored.repo)
    out = score(spark_rows(spark, scored.rows), bundle, ["event_id", "label"]).toPandas()
    assert list(out.columns) == ["event_id", "label", *SCORE_COLUMNS]
    assert len(out) == len(scored.rows)
    assert_same_scores(out, scored.cli, ["label", *SCORE_COLUMNS])
    # The model flags some rows and not others (the equality above is not of constant columns).
    assert 0 < (out["is_anomaly"] == 1).sum() < len(out)
    assert out["score"].to_numpy().dtype == np.float64


def test_a_repository_scores_with_its_current_version_here_or_shipped(
        spark: SparkSession, scored: Scored, monkeypatch: pytest.MonkeyPatch) -> None:
    df = spark_rows(spark, scored.rows)
    monkeypatch.chdir(scored.repo.parent)  # a relative path is the driver's: the Python workers started elsewhere
    for ship in (False, True):
        out = score(df, Path(scored.repo.name), ["event_id"], ship=ship).toPandas()
        assert list(out.columns) == ["event_id", *SCORE_COLUMNS]
        assert_same_scores(out, scored.cli, SCORE_COLUMNS)
    # Shipped: the current version's folder is one of the job's files (the executors read it from SparkFiles).
    assert resolve_model(scored.repo).name in {Path(f).name for f in spark.sparkContext.listFiles}


def test_a_struct_column_is_scored_as_its_dotted_fields(spark: SparkSession, scored: Scored) -> None:
    nested = ("event_id string, req struct<amount: double, latency: double>, version double, method string, "
              "label string")
    rows = scored.rows
    records = [(r.event_id, (None if pd.isna(amount) else amount, latency), r.version,
                None if pd.isna(r.method) else r.method, r.label)
               for r, amount, latency in zip(rows.itertuples(index=False), rows["req.amount"], rows["req.latency"],
                                             strict=True)]
    df = spark.createDataFrame(records, nested)
    out = score(df, scored.repo, ["event_id", "req.latency"]).toPandas()
    assert list(out.columns) == ["event_id", "req.latency", *SCORE_COLUMNS]
    assert_same_scores(out, scored.cli, SCORE_COLUMNS)
    np.testing.assert_array_equal(out["req.latency"], rows["req.latency"].astype(float))
    # A literal column `req.amount` beside the struct's member of that name: which value is meant is unknown.
    clash = df.withColumn("req.amount", df["req.amount"])
    with pytest.raises(DataError, match=r"'req\.amount' is given twice"):
        score(clash, scored.repo)


def test_a_missing_field_is_refused_before_any_job(spark: SparkSession, scored: Scored) -> None:
    df = spark_rows(spark, scored.rows).drop("method")
    with pytest.raises(DataError, match="missing column.*method"):
        score(df, scored.repo)
    with pytest.raises(DataError, match="passthrough column.*not found: id"):
        score(spark_rows(spark, scored.rows), scored.repo, ["id"])


def test_a_value_that_breaks_the_contract_fails_the_job_with_anomaly_scores_message(
        spark: SparkSession, scored: Scored) -> None:
    from pyspark.errors import PythonException

    rows = scored.rows.astype({"req.amount": str}).replace({"req.amount": {"None": None}})
    rows.loc[11, "req.amount"] = "lots"
    df = spark_rows(spark, rows, SCHEMA.replace("`req.amount` double", "`req.amount` string"))
    with pytest.raises(PythonException, match=r"DataError: Spark DataFrame partition \d+: column 'req\.amount', "
                                              r"row \d+: 'lots' is not a number"):
        score(df, scored.repo).collect()


def test_a_windowed_bundle_is_refused_in_one_line(spark: SparkSession, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    events = pd.DataFrame({"ts": 1_767_225_600.0 + np.arange(200) * 1.5, "src_host": rng.choice(["a", "b"], 200),
                           "bytes": np.round(rng.lognormal(6.0, 0.5, 200), 1)})
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    assert train_main(["--data", str(data), "--out", str(tmp_path / "windowed"), "--entity", "src_host",
                       "--window", "60s", "--event-time", "ts", *TRAIN_ARGS, "--epochs", "1", "--ensemble", "1"]) == 0
    df = spark.createDataFrame(events.head(5))
    with pytest.raises(BundleError) as refused:
        score(df, tmp_path / "windowed")
    message = str(refused.value)
    assert "\n" not in message and "window features" in message and "order" in message


def test_instants_are_epoch_seconds_whatever_the_session_time_zone(spark: SparkSession) -> None:
    """pyspark hands pandas timestamps in the session's zone, without one; the contract reads such as UTC."""
    from pyspark.sql.types import DateType, TimestampType

    from training.data import raw_values
    from training.spark import _as_feature

    previous = spark.conf.get("spark.sql.session.timeZone")
    spark.conf.set("spark.sql.session.timeZone", "America/St_Johns")  # UTC-03:30
    try:
        df = spark.sql("select timestamp'2026-01-02T03:04:05.678901Z' as t, date'2026-01-02' as d")
        t, d = df.select(_as_feature(df["t"], TimestampType()), _as_feature(df["d"], DateType())).first()
    finally:
        spark.conf.set("spark.sql.session.timeZone", previous)
    # What anomaly-score reads from a Parquet timestamp and date column of the same instants.
    assert t == raw_values(pd.Series(pd.to_datetime(["2026-01-02T03:04:05.678901Z"])))[0]
    assert d == raw_values(pd.Series(pd.to_datetime(["2026-01-02"])))[0]
