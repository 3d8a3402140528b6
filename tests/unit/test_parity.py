"""Parity as a property: a row means the same in a file scored by anomaly-score and as a JSON event in the worker.

Hypothesis generates rows of mixed columns (numbers, numeric text, NA-like text, nulls, booleans and their
text, known and unseen categories, out-of-range timestamps); each batch is written as CSV, JSON Lines and
Parquet and scored with `anomaly-score`, and sent through the worker's pipeline as JSON events. Every
row must get the same score and flag on every path; a row the worker dead-letters for its values makes
`anomaly-score` refuse the file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.bundle import Bundle, load_bundle
from training.cli import score_main, train_main
from worker.pipeline import Pipeline
from worker.records import Record

COLUMNS = ["bytes", "count", "flag", "proto", "timestamp"]


def training_rows(n: int = 600, seed: int = 4) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "bytes": np.round(rng.lognormal(5.0, 1.0, n), 2),
        "count": rng.integers(0, 20, n),
        "flag": rng.random(n) < 0.3,
        "proto": rng.choice(["tcp", "udp", "icmp"], n, p=[0.6, 0.3, 0.1]),
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
TIMESTAMP = st.one_of(st.none(), st.sampled_from(["9999-12-31T23:59:59-12:00", 1e20, -1e12, 2**62, "not a time"]),
                      st.integers(0, 2_000_000_000))
ROW = st.fixed_dictionaries({"bytes": NUMERIC, "count": NUMERIC, "flag": NUMERIC, "proto": CATEGORY,
                             "timestamp": TIMESTAMP})


def csv_text(value: Any) -> str:
    """A value as a CSV writer renders it (None is an empty cell)."""
    return "" if value is None else str(value)


def write(rows: list[dict[str, Any]], path: Path) -> None:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            writer.writerows([[csv_text(r[c]) for c in COLUMNS] for r in rows])
    else:  # Parquet with text columns, as many exporters write mixed data
        pd.DataFrame({c: pd.array([None if r[c] is None else str(r[c]) for r in rows], dtype="string")
                      for c in COLUMNS}).to_parquet(path)


def score_file(bundle: Bundle, path: Path) -> tuple[int, pd.DataFrame | None]:
    out = path.with_name(path.stem + "-" + path.suffix[1:] + ".scores.csv")
    code = score_main(["--model", str(bundle.path), "--data", str(path), "--out", str(out)])
    return code, pd.read_csv(out) if code == 0 else None


def worker_scores(bundle: Bundle, rows: list[dict[str, Any]]) -> tuple[dict[int, float], dict[int, bool], set[int]]:
    records = [Record("events", 0, i, None, json.dumps(r).encode(), timestamp_ms=2**62) for i, r in enumerate(rows)]
    result = Pipeline(bundle).process(records)
    dead = {d.record.offset for d in result.dead_letters}
    scored = [i for i in range(len(rows)) if i not in dead]
    alerted = {a.record.offset for a in result.alerts}
    return (dict(zip(scored, result.scores.tolist(), strict=True)), {i: i in alerted for i in scored}, dead)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(ROW, min_size=1, max_size=15).filter(lambda rows: any(
    any(r[c] not in (None, "", "NA", "n/a", "None", "null", "NaN", " NULL ") for c in COLUMNS[:4]) for r in rows)))
def test_a_row_scores_the_same_in_every_file_format_and_in_the_worker(
        bundle: Bundle, tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, Any]]) -> None:
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
        write(rows, path)
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
