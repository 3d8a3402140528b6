"""The console scripts in-process: bad input exits 2 with one line naming what to fix, never a traceback."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.unit.conftest import TRAIN_ARGS, TrainedBundle, synthetic_events
from training.bundle import load_bundle
from training.cli import evaluate_main, score_main, train_main

Main = Callable[[Sequence[str]], int]


def run(main: Main, argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one console-script call (argparse errors exit via SystemExit)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result: tuple[int, str, str], prog: str, *fragments: str) -> str:
    """Exit 2, exactly one stderr line '<prog>: error: ...' holding every fragment, no traceback."""
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# --- anomaly-train ---------------------------------------------------------------------------

@pytest.fixture()
def events(tmp_path: Path) -> pd.DataFrame:
    return synthetic_events(n=200, seed=1)


def train(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    return run(train_main, ["--data", data, "--out", tmp_path / "model", *TRAIN_ARGS, *extra], capsys)


def test_train_refuses_unknown_file_type(tmp_path: Path, events: pd.DataFrame, capsys) -> None:
    data = tmp_path / "events.txt"
    events.to_csv(data, index=False)
    assert_user_error(train(tmp_path, data, capsys), "anomaly-train", "events.txt", "unknown file type '.txt'")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize(("text", "message"), [("", "file is empty"), ("amount,latency\n", "no data rows")])
def test_train_refuses_file_without_rows(tmp_path: Path, capsys, text: str, message: str) -> None:
    data = tmp_path / "events.csv"
    data.write_text(text)
    assert_user_error(train(tmp_path, data, capsys), "anomaly-train", str(data), message)


def test_train_refuses_missing_data_file(tmp_path: Path, capsys) -> None:
    assert_user_error(train(tmp_path, tmp_path / "nope.csv", capsys), "anomaly-train", "nope.csv: no such file")


def test_stray_text_in_numeric_column_names_the_row_and_is_not_made_categorical(
        tmp_path: Path, events: pd.DataFrame, capsys) -> None:
    events["latency"] = events["latency"].astype(object)
    events.loc[41, "latency"] = "n/a ms"
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    line = assert_user_error(train(tmp_path, data, capsys), "anomaly-train",
                             "events.csv", "column 'latency'", "row 42", "'n/a ms' is not a number")
    assert "--categorical latency" in line
    assert not (tmp_path / "model").exists()


def test_infinite_value_is_refused_with_its_row(tmp_path: Path, events: pd.DataFrame, capsys) -> None:
    events["amount"] = events["amount"].astype(object)
    events.loc[9, "amount"] = "inf"
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    assert_user_error(train(tmp_path, data, capsys), "anomaly-train",
                      "column 'amount'", "row 10", "infinite value")


def test_label_column_without_normal_rows(tmp_path: Path, events: pd.DataFrame, capsys) -> None:
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    result = train(tmp_path, data, capsys, "--label-column", "label", "--normal-value", "benign")
    assert_user_error(result, "anomaly-train", "label column 'label' has no row equal to 'benign'",
                      "attack", "--normal-value")


def test_label_column_needs_normal_value(tmp_path: Path, events: pd.DataFrame, capsys) -> None:
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    assert_user_error(train(tmp_path, data, capsys, "--label-column", "label"), "anomaly-train",
                      "--label-column and --normal-value go together")


def test_conflicting_threshold_options_are_a_usage_error(tmp_path: Path, events: pd.DataFrame, capsys) -> None:
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    code, _, err = train(tmp_path, data, capsys, "--target-fpr", "0.05", "--threshold", "3")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("anomaly-train: error: argument --threshold: "
                                            "not allowed with argument --target-fpr")


@pytest.mark.parametrize(("option", "message"), [
    (["--target-fpr", "1.5"], "target false-positive rate must be in (0, 1), got 1.5"),
    (["--threshold-quantile", "0"], "threshold quantile must be in (0, 1), got 0.0"),
    (["--threshold", "-1"], "a manual threshold must be a positive score, got -1.0"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--distance-weight", "1.5"], "distance weight must be in [0, 1], got 1.5"),
    (["--neighbours", "0"], "neighbours must be >= 1, got 0"),
    (["--bank-rows", "2", "--neighbours", "3"], "the neighbour bank needs at least 3 rows, got 2"),
])
def test_out_of_range_options(tmp_path: Path, events: pd.DataFrame, capsys, option: list[str], message: str) -> None:
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    assert_user_error(train(tmp_path, data, capsys, *option), "anomaly-train", message)


def test_score_settings_reach_the_bundle(tmp_path: Path, events: pd.DataFrame, capsys) -> None:
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    common = ("--drop", "event_id", "--label-column", "label", "--normal-value", "normal")
    code, _, err = train(tmp_path, data, capsys, *common, "--bank-rows", "40", "--neighbours", "2")
    assert code == 0, err
    training = load_bundle(tmp_path / "model").manifest.training
    assert (training["bank_rows"], training["neighbours"], training["distance_weight"]) == (40, 2, 0.9)
    code, _, err = train(tmp_path, data, capsys, *common, "--distance-weight", "0")
    assert code == 0, err
    training = load_bundle(tmp_path / "model").manifest.training
    assert (training["bank_rows"], training["neighbours"], training["distance_weight"]) == (0, 0, 0.0), \
        "weight 0: the reconstruction score alone, no neighbour bank"


def test_drop_of_unknown_column(tmp_path: Path, events: pd.DataFrame, capsys) -> None:
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    assert_user_error(train(tmp_path, data, capsys, "--drop", "evnt_id"), "anomaly-train", "not found: evnt_id")


def test_training_with_empty_cells_and_nulls_imputes_them(tmp_path: Path, events: pd.DataFrame, capsys) -> None:
    events.loc[[3, 50, 77], "latency"] = np.nan
    events.loc[[5, 60], "method"] = None
    data = tmp_path / "events.jsonl"
    events.to_json(data, orient="records", lines=True)
    assert '"latency":null' in data.read_text()
    code, out, err = train(tmp_path, data, capsys, "--drop", "event_id", "--label-column", "label",
                           "--normal-value", "normal")
    assert code == 0, err
    assert "written to" in out and "ROC-AUC" in out
    schema = load_bundle(tmp_path / "model").schema
    assert schema.names == ["amount", "latency", "version", "method"]
    assert schema.categorical_names == ["method"]


# --- anomaly-score ---------------------------------------------------------------------------

def score(trained: TrainedBundle, data: Path, capsys, *extra: str) -> tuple[int, str, str]:
    return run(score_main, ["--model", trained.path, "--data", data, "--out", data.with_suffix(".scores.csv"),
                            *extra], capsys)


def assert_no_output(data: Path) -> None:
    out = data.with_suffix(".scores.csv")
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial*"))


def test_score_refuses_missing_column(trained_bundle: TrainedBundle, tmp_path: Path, capsys) -> None:
    data = tmp_path / "new.csv"
    trained_bundle.frame.drop(columns=["latency"]).to_csv(data, index=False)
    assert_user_error(score(trained_bundle, data, capsys), "anomaly-score",
                      "new.csv", "missing column(s) required by the model: latency")
    assert_no_output(data)


def test_score_refuses_extra_column_unless_passed_through(trained_bundle: TrainedBundle, tmp_path: Path,
                                                          capsys) -> None:
    data = tmp_path / "new.csv"
    trained_bundle.frame.assign(region="eu").to_csv(data, index=False)
    assert_user_error(score(trained_bundle, data, capsys), "anomaly-score",
                      "new.csv", "unexpected column(s) region", "--passthrough region")
    assert_no_output(data)
    code, _, err = score(trained_bundle, data, capsys, "--passthrough", "region")
    assert code == 0, err
    assert set(pd.read_csv(data.with_suffix(".scores.csv"))["region"]) == {"eu"}


@pytest.mark.parametrize(("value", "message"), [("12 ms", "'12 ms' is not a number"), ("-inf", "infinite value")])
def test_score_refuses_bad_numbers_with_their_row(trained_bundle: TrainedBundle, tmp_path: Path, capsys,
                                                  value: str, message: str) -> None:
    frame = trained_bundle.frame.copy()
    frame["latency"] = frame["latency"].astype(object)
    frame.loc[123, "latency"] = value
    data = tmp_path / "new.csv"
    frame.to_csv(data, index=False)
    # Small chunks: the row number must count across chunks.
    assert_user_error(score(trained_bundle, data, capsys, "--chunk-rows", "50"), "anomaly-score",
                      "new.csv", "column 'latency'", "row 124", message)
    assert_no_output(data)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_score_imputes_empty_cells_and_nulls(trained_bundle: TrainedBundle, tmp_path: Path, capsys,
                                             suffix: str) -> None:
    frame = trained_bundle.frame.copy()
    frame.loc[[0, 10], "amount"] = np.nan
    frame.loc[[1, 10], "method"] = None
    data = tmp_path / f"new{suffix}"
    if suffix == ".csv":
        frame.to_csv(data, index=False)
        assert "\ne0000,," in data.read_text()
    else:
        frame.to_json(data, orient="records", lines=True)
    code, out, err = score(trained_bundle, data, capsys)
    assert code == 0, err
    assert f"scored {len(frame)} rows" in out
    scores = pd.read_csv(data.with_suffix(".scores.csv"))["score"]
    assert len(scores) == len(frame) and np.all(np.isfinite(scores))


def test_score_creates_the_output_directory(trained_bundle: TrainedBundle, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results" / "today" / "scores.csv"
    code, _, err = run(score_main, ["--model", trained_bundle.path, "--data", trained_bundle.csv, "--out", out],
                       capsys)
    assert code == 0, err
    assert len(pd.read_csv(out)) == len(trained_bundle.frame)


def test_score_refuses_missing_bundle(tmp_path: Path, capsys) -> None:
    data = tmp_path / "new.csv"
    data.write_text("a\n1\n")
    result = run(score_main, ["--model", tmp_path / "no-model", "--data", data, "--out", tmp_path / "o.csv"], capsys)
    assert_user_error(result, "anomaly-score", "no-model: no model bundle here", "anomaly-train --out")


@pytest.fixture()
def bundle_copy(trained_bundle: TrainedBundle, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_bundle.path, tmp_path / "bundle"))


def test_score_refuses_tampered_bundle(trained_bundle: TrainedBundle, bundle_copy: Path, capsys) -> None:
    threshold = json.loads((bundle_copy / "threshold.json").read_text())
    threshold["value"] *= 10
    (bundle_copy / "threshold.json").write_text(json.dumps(threshold))
    result = run(score_main, ["--model", bundle_copy, "--data", trained_bundle.csv,
                              "--out", bundle_copy.parent / "o.csv"], capsys)
    assert_user_error(result, "anomaly-score", "file threshold.json does not match its hash in the manifest")


def test_score_refuses_schema_that_does_not_match_manifest(trained_bundle: TrainedBundle, bundle_copy: Path,
                                                           capsys) -> None:
    # Re-hash the edited features.json so only the schema-hash check can catch it.
    features = json.loads((bundle_copy / "features.json").read_text())
    method = next(f for f in features["fields"] if f["name"] == "method")
    method["vocabulary"].append("PATCH")
    (bundle_copy / "features.json").write_text(json.dumps(features))
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"]["features.json"] = hashlib.sha256((bundle_copy / "features.json").read_bytes()).hexdigest()
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    result = run(score_main, ["--model", bundle_copy, "--data", trained_bundle.csv,
                              "--out", bundle_copy.parent / "o.csv"], capsys)
    assert_user_error(result, "anomaly-score", "features.json does not match the manifest's schema hash")


# --- anomaly-evaluate ------------------------------------------------------------------------

def test_evaluate_writes_report_and_prints_roc_auc(trained_bundle: TrainedBundle, tmp_path: Path, capsys) -> None:
    report = tmp_path / "evaluation"
    code, out, err = run(evaluate_main, ["--model", trained_bundle.path, "--data", trained_bundle.csv,
                                         "--label-column", "label", "--normal-value", "normal",
                                         "--report-dir", report], capsys)
    assert code == 0, err
    for name in ("report.html", "scores.png", "roc.png", "pr.png", "confusion.png"):
        assert (report / name).stat().st_size > 0, name
    assert (report / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (report / "report.html").read_text()
    assert 'src="roc.png"' in html and "roc_auc" in html
    match = re.search(r"ROC-AUC (\d\.\d{4})", out)
    assert match is not None, out
    assert float(match.group(1)) > 0.8  # latency of the anomalies is shifted by 8 standard deviations


def test_evaluate_needs_anomalous_rows(trained_bundle: TrainedBundle, tmp_path: Path, capsys) -> None:
    data = tmp_path / "normal.csv"
    trained_bundle.frame.query("label == 'normal'").to_csv(data, index=False)
    result = run(evaluate_main, ["--model", trained_bundle.path, "--data", data, "--label-column", "label",
                                 "--normal-value", "normal"], capsys)
    assert_user_error(result, "anomaly-evaluate", "normal.csv: every row is normal")
    assert not (tmp_path / "evaluation-normal").exists()


# --- issue 7: never destroy what we did not write ---------------------------------------------------

def test_score_refuses_to_write_over_its_input(trained_bundle: TrainedBundle, tmp_path: Path, capsys) -> None:
    data = Path(shutil.copy(trained_bundle.csv, tmp_path / "events.csv"))
    before = data.read_bytes()
    result = run(score_main, ["--model", trained_bundle.path, "--data", data, "--out", tmp_path / "." / "events.csv"],
                 capsys)
    assert_user_error(result, "anomaly-score", "is the input file")
    assert data.read_bytes() == before


def test_score_refuses_a_directory_or_a_file_it_did_not_write(trained_bundle: TrainedBundle, tmp_path: Path,
                                                             capsys) -> None:
    result = run(score_main, ["--model", trained_bundle.path, "--data", trained_bundle.csv, "--out", tmp_path],
                 capsys)
    assert_user_error(result, "anomaly-score", "is a directory")
    notes = tmp_path / "notes.csv"
    notes.write_text("name,comment\nalice,keep me\n")
    result = run(score_main, ["--model", trained_bundle.path, "--data", trained_bundle.csv, "--out", notes], capsys)
    assert_user_error(result, "anomaly-score", "exists and was not written by anomaly-score")
    assert notes.read_text() == "name,comment\nalice,keep me\n"
    # An earlier anomaly-score output is ours to replace.
    out = tmp_path / "scores.csv"
    for _ in range(2):
        code, _, err = run(score_main, ["--model", trained_bundle.path, "--data", trained_bundle.csv, "--out", out],
                           capsys)
        assert code == 0, err
    assert len(pd.read_csv(out)) == len(trained_bundle.frame)


def test_score_names_a_missing_passthrough_column(trained_bundle: TrainedBundle, tmp_path: Path, capsys) -> None:
    data = tmp_path / "new.csv"
    trained_bundle.frame.to_csv(data, index=False)
    assert_user_error(score(trained_bundle, data, capsys, "--passthrough", "event_id", "request_id"),
                      "anomaly-score", "--passthrough column(s) not found: request_id")
    assert_no_output(data)


def test_evaluate_refuses_a_report_dir_holding_other_files(trained_bundle: TrainedBundle, tmp_path: Path,
                                                          capsys) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.html").write_text("mine")
    result = run(evaluate_main, ["--model", trained_bundle.path, "--data", trained_bundle.csv, "--label-column",
                                 "label", "--normal-value", "normal", "--report-dir", tmp_path / "docs"], capsys)
    assert_user_error(result, "anomaly-evaluate", "holds files the evaluation did not write (index.html)")
    assert [p.name for p in (tmp_path / "docs").iterdir()] == ["index.html"]


def test_train_refuses_to_replace_a_project_folder(tmp_path: Path, events: pd.DataFrame, capsys) -> None:
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    project = tmp_path / "model"
    (project / "src").mkdir(parents=True)
    (project / "manifest.json").write_text('{"name": "web app"}')
    (project / "index.html").write_text("<html>")
    assert_user_error(train(tmp_path, data, capsys), "anomaly-train", "is not a model bundle")
    assert sorted(p.name for p in project.iterdir()) == ["index.html", "manifest.json", "src"]


def test_sigterm_reported_when_library_code_turns_it_into_another_error(capsys: pytest.CaptureFixture[str]) -> None:
    """TensorFlow's graph tracing can turn the SIGTERM exception into a SystemError; the exit status still says 143."""
    import signal

    from training.cli import _run

    cleaned: list[str] = []

    def body() -> int:
        try:
            try:
                signal.raise_signal(signal.SIGTERM)
            except KeyboardInterrupt as exc:
                raise SystemError("Objects/listobject.c:338: bad argument to internal function") from exc
        finally:
            cleaned.append("temporary folder")
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert _run("anomaly-train", body) == 143
    assert cleaned == ["temporary folder"]
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_unexpected_errors_still_propagate_without_a_signal() -> None:
    from training.cli import _run

    def body() -> int:
        raise SystemError("a real bug")

    with pytest.raises(SystemError, match="a real bug"):
        _run("anomaly-train", body)


def test_sigterm_during_training_leaves_nothing_behind(tmp_path: Path, events: pd.DataFrame) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tests.kafka_broker import wait_for

    data = tmp_path / "events.csv"
    synthetic_events(n=3000, seed=2).to_csv(data, index=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "models" / "m"
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from training.cli import train_main; sys.exit(train_main(sys.argv[1:]))",
         "--data", str(data), "--out", str(out), "--label-column", "label", "--normal-value", "normal",
         "--drop", "event_id", "--epochs", "3", "--hidden", "8,3", "--ensemble", "1"],
        env={**os.environ, "TMPDIR": str(scratch)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Wait until the run holds its temporary files (the SavedModel export), then stop it there.
    wait_for(lambda: any(p.name.startswith("anomaly-train-") for p in scratch.iterdir()) or proc.poll() is not None,
             timeout=240, what="training to reach its export step", interval=0.01)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err.decode()
    assert b"Traceback" not in err
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("anomaly-train-")]
    assert not out.exists()
    assert not out.parent.exists() or not [p.name for p in out.parent.iterdir() if ".tmp-" in p.name]


# --- issue 19: a destination that cannot be written is refused before training ------------------------------

@pytest.mark.parametrize("where", [["--out", "FILE/x"], ["--repo", "FILE"], ["--repo", "FILE/x"]])
def test_train_refuses_a_destination_under_a_file_before_training(tmp_path: Path, events: pd.DataFrame, capsys,
                                                                   where: list[str]) -> None:
    data = tmp_path / "events.csv"
    events.to_csv(data, index=False)
    (tmp_path / "FILE").write_text("mine")
    option, path = where[0], tmp_path / where[1]
    code, out, err = run(train_main, ["--data", data, option, path, *TRAIN_ARGS], capsys)
    assert_user_error((code, out, err), "anomaly-train", f"{option} {path}", "is a file")
    assert "epoch" not in out and out == ""  # refused before reading or training
    assert (tmp_path / "FILE").read_text() == "mine"
