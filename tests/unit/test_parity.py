"""Parity as a property: a row means the same in a file scored by anomaly-score and as a JSON event in the worker.

Hypothesis generates rows of mixed columns (numbers, numeric text, NA-like text, nulls, booleans and their
text, known and unseen categories, instants, out-of-range timestamps); each batch is written as CSV, JSON
Lines and Parquet and scored with `anomaly-score`, and sent through the worker's pipeline as JSON events.
Instants are ISO 8601 text (any offset) or epoch seconds in CSV, JSON and events, and a timestamp column
(ms, us or ns, with or without a time zone) in Parquet. Every row must get the same score and flag on
every path; a row the worker dead-letters for its values makes `anomaly-score` refuse the file.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.bundle import Bundle, load_bundle
from training.cli import score_main, train_main
from worker.pipeline import Pipeline
from worker.records import Record

COLUMNS = ["bytes", "count", "flag", "proto", "seen", "timestamp"]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: The instants of the training rows (each seen several times: a model that took them as categories knows them).
TRAINING_MS = [1_700_000_000_000 + 3_600_000 * i + 250 for i in range(40)]


@dataclass(frozen=True)
class Instant:
    """An instant (whole milliseconds since the epoch) and how a writer renders it in CSV, JSON and events."""

    ms: int
    style: int

    def rendered(self) -> str | float:
        moment = EPOCH + timedelta(milliseconds=self.ms)
        if self.style == 0:
            return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.style == 1:
            return moment.astimezone(timezone(timedelta(hours=-9, minutes=-30))).isoformat()
        if self.style == 2:
            return moment.replace(tzinfo=None).isoformat(sep=" ")  # no offset: UTC
        return self.ms / 1000  # epoch seconds, a number


def training_rows(n: int = 600, seed: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "bytes": np.round(rng.lognormal(5.0, 1.0, n), 2),
        "count": rng.integers(0, 20, n),
        "flag": rng.random(n) < 0.3,
        "proto": rng.choice(["tcp", "udp", "icmp"], n, p=[0.6, 0.3, 0.1]),
        "seen": [Instant(int(ms), 0).rendered() for ms in rng.choice(TRAINING_MS, n)],
        "timestamp": rng.integers(1_600_000_000, 1_700_000_000, n),
    })


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    root = tmp_path_factory.mktemp("parity")
    data = root / "train.jsonl"
    training_rows().to_json(data, orient="records", lines=True)  # booleans stay JSON booleans
    assert train_main(["--data", str(data), "--out", str(root / "bundle"), "--drop", "timestamp", "--epochs", "3",
                       "--hidden", "8,3", "--ensemble", "1", "--seed", "3", "--target-fpr", "0.05"]) == 0
    return load_bundle(root / "bundle")


NA_TEXT = st.sampled_from(["", "NA", "n/a", "None", "null", "NaN", " NULL "])
NUMBER = st.one_of(st.floats(min_value=-1e6, max_value=1e7, allow_nan=False), st.integers(-1000, 10**6))
NUMERIC = st.one_of(st.none(), NA_TEXT, NUMBER, NUMBER.map(lambda v: f" {v!r} "), st.booleans(),
                    st.sampled_from(["true", "False"]))
CATEGORY = st.one_of(st.none(), NA_TEXT, st.sampled_from(["tcp", "udp", "icmp", " tcp ", "gre", "TCP"]),
                     st.integers(0, 99), st.integers(0, 99).map(lambda v: v + 0.5), st.integers(0, 9).map(float),
                     st.text(alphabet="ab,\" \n", min_size=1, max_size=4))
SEEN = st.one_of(st.none(), NA_TEXT, st.builds(Instant, st.sampled_from(TRAINING_MS), st.integers(0, 3)),
                 st.builds(Instant, st.integers(1_600_000_000_000, 1_800_000_000_000), st.integers(0, 3)))
TIMESTAMP = st.one_of(st.none(), st.sampled_from(["9999-12-31T23:59:59-12:00", 1e20, -1e12, 2**62, "not a time"]),
                      st.integers(0, 2_000_000_000))
ROW = st.fixed_dictionaries({"bytes": NUMERIC, "count": NUMERIC, "flag": NUMERIC, "proto": CATEGORY,
                             "seen": SEEN, "timestamp": TIMESTAMP})
#: How Parquet holds the instants: a timestamp column's unit and time zone (none: UTC).
PARQUET_TIME = st.sampled_from([("ms", None), ("us", None), ("ns", "UTC"), ("ms", "Asia/Kolkata")])
_TICKS = {"ms": 1, "us": 10**3, "ns": 10**6}


def csv_text(value: Any) -> str:
    """A value as a CSV writer renders it (None is an empty cell)."""
    return "" if value is None else str(value)


def plain(row: dict[str, Any]) -> dict[str, Any]:
    """The row as JSON and CSV carry it: instants rendered."""
    return {c: v.rendered() if isinstance(v, Instant) else v for c, v in row.items()}


def write(rows: list[dict[str, Any]], path: Path, parquet_time: tuple[str, str | None] = ("ms", None)) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(plain(r)) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            writer.writerows([[csv_text(plain(r)[c]) for c in COLUMNS] for r in rows])
    else:  # Parquet with text columns, as many exporters write mixed data, and instants in a timestamp column
        unit, tz = parquet_time
        instants = [r["seen"].ms * _TICKS[unit] if isinstance(r["seen"], Instant) else None for r in rows]
        pq.write_table(pa.table({c: pa.array(instants, pa.timestamp(unit, tz)) if c == "seen" else
                                 pa.array([None if r[c] is None else str(r[c]) for r in rows], pa.string())
                                 for c in COLUMNS}), path)


def score_file(bundle: Bundle, path: Path) -> tuple[int, pd.DataFrame | None]:
    out = path.with_name(path.stem + "-" + path.suffix[1:] + ".scores.csv")
    code = score_main(["--model", str(bundle.path), "--data", str(path), "--out", str(out)])
    return code, pd.read_csv(out) if code == 0 else None


def worker_scores(bundle: Bundle, rows: list[dict[str, Any]]) -> tuple[dict[int, float], dict[int, bool], set[int]]:
    records = [Record("events", 0, i, None, json.dumps(plain(r)).encode(), timestamp_ms=2**62)
               for i, r in enumerate(rows)]
    result = Pipeline(bundle).process(records)
    dead = {d.record.offset for d in result.dead_letters}
    scored = [i for i in range(len(rows)) if i not in dead]
    alerted = {a.record.offset for a in result.alerts}
    return (dict(zip(scored, result.scores.tolist(), strict=True)), {i: i in alerted for i in scored}, dead)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=1, max_size=15).filter(lambda rows: any(
    any(r[c] not in (None, "", "NA", "n/a", "None", "null", "NaN", " NULL ") for c in COLUMNS[:4]) for r in rows)),
       parquet_time=PARQUET_TIME)
def test_a_row_scores_the_same_in_every_file_format_and_in_the_worker(
        bundle: Bundle, tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, Any]],
        parquet_time: tuple[str, str | None]) -> None:
    directory = tmp_path_factory.mktemp("rows")
    _, _, dead = worker_scores(bundle, rows)
    if dead:  # rows without any feature value: the worker dead-letters them, anomaly-score refuses the file
        write(rows, directory / "with-dead.csv")
        assert score_file(bundle, directory / "with-dead.csv")[0] == 2
        rows = [r for i, r in enumerate(rows) if i not in dead]
    scores, flags, dead = worker_scores(bundle, rows)
    assert not dead
    for suffix in (".csv", ".jsonl", ".parquet"):
        path = directory / f"rows{suffix}"
        write(rows, path, parquet_time)
        code, out = score_file(bundle, path)
        assert code == 0 and out is not None, f"{suffix}: anomaly-score refused rows the worker scored"
        np.testing.assert_allclose(out["score"].to_numpy(), [scores[i] for i in range(len(rows))], rtol=2e-6,
                                   err_msg=suffix)
        threshold = bundle.threshold.value
        for i, flagged in flags.items():
            if abs(scores[i] - threshold) > 1e-6 * threshold:
                assert bool(out["is_anomaly"][i]) == flagged, (suffix, i, rows[i])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=ROW, bad=st.sampled_from([("bytes", "12 ms"), ("count", "[1, 2]"), ("flag", "yes"), ("bytes", "-inf")]))
def test_a_value_the_worker_dead_letters_makes_anomaly_score_refuse_the_file(
        bundle: Bundle, tmp_path_factory: pytest.TempPathFactory, row: dict[str, Any], bad: tuple[str, str]) -> None:
    row = {**row, bad[0]: bad[1]}
    _, _, dead = worker_scores(bundle, [row])
    assert dead == {0}
    path = tmp_path_factory.mktemp("bad") / "row.csv"
    write([row], path)
    assert score_file(bundle, path)[0] == 2
