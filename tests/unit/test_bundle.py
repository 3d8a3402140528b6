"""The bundle round trip: train via the CLI, score via the CLI and in-process, verify on load, write atomically."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.unit.conftest import TrainedBundle
from training import report
from training.bundle import FORMAT_VERSION, BundleContents, load_bundle, write_bundle
from training.cli import score_main, train_main
from training.errors import BundleError
from training.features import FeatureSchema, fit_schema
from training.windows import WindowSpec, build_spec


def in_process_scores(bundle_dir: Path, frame: pd.DataFrame) -> np.ndarray:
    bundle = load_bundle(bundle_dir)
    schema = bundle.schema
    columns = {n: frame[n].to_numpy(dtype=np.float64 if n in schema.numeric_names else object) for n in schema.names}
    return bundle.scorer.score(schema.encode(columns).matrix).score


def cli_scores(bundle_dir: Path, data: Path, out: Path) -> pd.DataFrame:
    assert score_main(["--model", str(bundle_dir), "--data", str(data), "--out", str(out),
                       "--passthrough", "event_id", "--chunk-rows", "150"]) == 0
    return pd.read_csv(out)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_cli_scores_every_row_in_order_and_match_in_process(trained_bundle: TrainedBundle, tmp_path: Path) -> None:
    out = cli_scores(trained_bundle.path, trained_bundle.csv, tmp_path / "scores.csv")
    assert list(out.columns) == ["event_id", "score", "is_anomaly", "top_feature", "top_feature_share"]
    assert out["event_id"].tolist() == trained_bundle.frame["event_id"].tolist()
    expected = in_process_scores(trained_bundle.path, trained_bundle.frame)
    np.testing.assert_allclose(out["score"].to_numpy(), expected, rtol=1e-6)
    threshold = load_bundle(trained_bundle.path).threshold.value
    np.testing.assert_array_equal(out["is_anomaly"].to_numpy(), (expected > threshold).astype(int))
    assert set(out["top_feature"]) <= {"amount", "latency", "version", "method"}


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_give_the_same_scores_as_csv(trained_bundle: TrainedBundle, tmp_path: Path,
                                                       fmt: str) -> None:
    data = tmp_path / f"events.{fmt}"
    if fmt == "jsonl":
        trained_bundle.frame.to_json(data, orient="records", lines=True)
    else:
        trained_bundle.frame.to_parquet(data)
    out = cli_scores(trained_bundle.path, data, tmp_path / "scores.csv")
    assert out["event_id"].tolist() == trained_bundle.frame["event_id"].tolist()
    reference = cli_scores(trained_bundle.path, trained_bundle.csv, tmp_path / "reference.csv")
    np.testing.assert_allclose(out["score"].to_numpy(), reference["score"].to_numpy(), rtol=1e-6)


def test_training_from_parquet_matches_training_from_csv(trained_bundle: TrainedBundle, tmp_path: Path) -> None:
    data = tmp_path / "events.parquet"
    trained_bundle.frame.to_parquet(data)
    args = [a if a != str(trained_bundle.csv) else str(data) for a in trained_bundle.args]
    assert train_main([*args, "--out", str(tmp_path / "model")]) == 0
    parquet, csv = load_bundle(tmp_path / "model"), load_bundle(trained_bundle.path)
    assert parquet.schema.schema_hash() == csv.schema.schema_hash()
    assert parquet.threshold.value == pytest.approx(csv.threshold.value, rel=1e-6)
    np.testing.assert_allclose(in_process_scores(parquet.path, trained_bundle.frame),
                               in_process_scores(csv.path, trained_bundle.frame), rtol=1e-6)


def test_same_seed_retrains_to_the_same_model_replacing_the_old_bundle(trained_bundle: TrainedBundle,
                                                                       tmp_path: Path) -> None:
    out = Path(shutil.copytree(trained_bundle.path, tmp_path / "model"))
    before = load_bundle(out)
    assert train_main([*trained_bundle.args, "--out", str(out)]) == 0
    after = load_bundle(out)
    assert after.manifest.created_at != before.manifest.created_at  # replaced, not kept
    assert after.threshold == before.threshold
    assert (out / "features.json").read_bytes() == (trained_bundle.path / "features.json").read_bytes()
    np.testing.assert_array_equal(in_process_scores(out, trained_bundle.frame),
                                  in_process_scores(trained_bundle.path, trained_bundle.frame))
    assert leftovers(tmp_path) == []


def test_failed_training_leaves_existing_bundle_intact(trained_bundle: TrainedBundle, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    out = Path(shutil.copytree(trained_bundle.path, tmp_path / "model"))
    files = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_html", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train_main([*trained_bundle.args, "--out", str(out)])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == files
    assert load_bundle(out).version == load_bundle(trained_bundle.path).version
    assert leftovers(tmp_path) == []


def test_manifest_describes_the_bundle(trained_bundle: TrainedBundle) -> None:
    bundle = load_bundle(trained_bundle.path)
    m = bundle.manifest
    assert m.format_version == FORMAT_VERSION
    assert m.schema_sha256 == bundle.schema.schema_hash()
    data_sha = hashlib.sha256(trained_bundle.csv.read_bytes()).hexdigest()
    assert m.data_sha256 == data_sha
    assert {"features.json", "threshold.json", "score_histogram.json", "report/report.html"} <= set(m.files)
    assert any(name.startswith("saved_model/") for name in m.files)
    assert "manifest.json" not in m.files
    assert bundle.passthrough_columns == ["event_id", "label"]
    assert m.training["hidden"] == [8, 3] and m.training["seed"] == 7
    assert 0.0 <= m.metrics["roc_auc"] <= 1.0
    assert bundle.threshold.method == "target_fpr" and bundle.threshold.parameter == 0.01
    assert sum(bundle.histogram.counts) == m.training["validation_rows"] + m.training["calibration_rows"]


@pytest.fixture()
def bundle_copy(trained_bundle: TrainedBundle, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_bundle.path, tmp_path / "bundle"))


def _placeholder_model(path: Path) -> None:
    path.mkdir()
    (path / "saved_model.pb").write_bytes(b"not a real model")


def _rehash(bundle: Path) -> None:
    """Make the manifest's hashes match the files again, as someone hand-editing a bundle would."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = {name: hashlib.sha256((bundle / name).read_bytes()).hexdigest() for name in manifest["files"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(bundle: Path, **changes: object) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_load_refuses_modified_file(bundle_copy: Path) -> None:
    variables = next((bundle_copy / "saved_model").rglob("variables.data-*"))
    data = bytearray(variables.read_bytes())
    data[len(data) // 2] ^= 0xFF
    variables.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"file saved_model/variables/variables\.data-.* does not match its hash"):
        load_bundle(bundle_copy)


def test_load_refuses_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / "score_histogram.json").unlink()
    with pytest.raises(BundleError, match="score_histogram.json listed in the manifest is missing"):
        load_bundle(bundle_copy)


def test_load_refuses_other_format_version(bundle_copy: Path) -> None:
    _edit_manifest(bundle_copy, format_version=FORMAT_VERSION + 1)
    with pytest.raises(BundleError, match=f"bundle format {FORMAT_VERSION + 1} is not supported"):
        load_bundle(bundle_copy)


def test_load_refuses_corrupt_manifest(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json is not valid JSON"):
        load_bundle(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        load_bundle(bundle_copy)


def test_load_refuses_unexpected_schema(trained_bundle: TrainedBundle) -> None:
    bundle = load_bundle(trained_bundle.path, expected_schema_sha256=load_bundle(trained_bundle.path).schema
                         .schema_hash())
    with pytest.raises(BundleError, match="differs from the expected"):
        load_bundle(trained_bundle.path, expected_schema_sha256="0" * 64)
    assert bundle.schema.names == ["amount", "latency", "version", "method"]


def test_write_refuses_to_replace_a_directory_that_is_not_a_bundle(trained_bundle: TrainedBundle,
                                                                    tmp_path: Path) -> None:
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.jpg").write_bytes(b"meow")
    bundle = load_bundle(trained_bundle.path)
    contents = BundleContents(schema=bundle.schema, threshold=bundle.threshold, histogram=bundle.histogram,
                              data_sha256="0" * 64, write_saved_model=lambda path: path.mkdir())
    with pytest.raises(BundleError, match="exists and is not a model bundle"):
        write_bundle(target, contents)
    assert [p.name for p in target.iterdir()] == ["cat.jpg"]
    assert leftovers(tmp_path) == []


def test_write_then_load_without_a_model(tmp_path: Path, trained_bundle: TrainedBundle) -> None:
    bundle = load_bundle(trained_bundle.path)
    contents = BundleContents(schema=bundle.schema, threshold=bundle.threshold, histogram=bundle.histogram,
                              data_sha256="ab" * 32, write_saved_model=_placeholder_model)
    manifest = write_bundle(tmp_path / "b", contents)
    again = load_bundle(tmp_path / "b")
    assert again.manifest == manifest
    assert again.schema == bundle.schema and isinstance(again.schema, FeatureSchema)
    assert again.threshold == bundle.threshold and again.histogram == bundle.histogram
    assert not (tmp_path / "b" / "report").exists()


# --- issue 7: every bundle file is verified, every value range-checked ---------------------------

def test_load_refuses_a_manifest_with_an_empty_or_partial_file_map(bundle_copy: Path) -> None:
    features = json.loads((bundle_copy / "features.json").read_text())
    features["fields"][0]["center"] = 1e6  # an edit that an empty map used to let through
    (bundle_copy / "features.json").write_text(json.dumps(features))
    _edit_manifest(bundle_copy, files={})
    with pytest.raises(BundleError, match="'files' must map every bundle file to its SHA-256"):
        load_bundle(bundle_copy)


def test_load_refuses_a_manifest_that_leaves_a_file_out(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["files"]["features.json"]
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not list features.json"):
        load_bundle(bundle_copy)


def test_load_refuses_a_file_the_manifest_does_not_list(bundle_copy: Path) -> None:
    (bundle_copy / "saved_model" / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"file saved_model/extra\.bin is not listed in the manifest"):
        load_bundle(bundle_copy)


def test_load_refuses_a_truncated_variables_file(bundle_copy: Path) -> None:
    variables = next((bundle_copy / "saved_model").rglob("variables.data-*"))
    variables.write_bytes(variables.read_bytes()[:10])
    with pytest.raises(BundleError, match="does not match its hash"):
        load_bundle(bundle_copy)
    _rehash(bundle_copy)  # even with matching hashes, TensorFlow's failure becomes one line
    with pytest.raises(BundleError, match="cannot load the SavedModel signature"):
        load_bundle(bundle_copy).scorer  # noqa: B018


@pytest.mark.parametrize("value", [float("nan"), -1.0, 0.0, "high"])
def test_load_refuses_a_threshold_that_is_not_a_finite_positive_score(bundle_copy: Path, value: object) -> None:
    threshold = json.loads((bundle_copy / "threshold.json").read_text())
    threshold["value"] = value
    (bundle_copy / "threshold.json").write_text(json.dumps(threshold))
    _rehash(bundle_copy)
    with pytest.raises(BundleError, match=r"threshold\.json"):
        load_bundle(bundle_copy)


def test_load_refuses_histogram_edges_that_do_not_increase(bundle_copy: Path) -> None:
    histogram = json.loads((bundle_copy / "score_histogram.json").read_text())
    histogram["edges"] = list(reversed(histogram["edges"]))
    (bundle_copy / "score_histogram.json").write_text(json.dumps(histogram))
    _rehash(bundle_copy)
    with pytest.raises(BundleError, match="edges must be finite and strictly increasing"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(("change", "message"), [
    ({"files": []}, "'files' must be an object"),
    ({"model_version": 5}, "'model_version' must be a non-empty string"),
    ({"training": "fast"}, "'training' must be an object"),
])
def test_load_refuses_wrong_types_in_the_manifest(bundle_copy: Path, change: dict, message: str) -> None:
    _edit_manifest(bundle_copy, **change)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_write_never_replaces_a_folder_that_merely_holds_a_manifest(trained_bundle: TrainedBundle,
                                                                     tmp_path: Path) -> None:
    # Issue 7, defect 4: a project folder with index.html, src/ and a manifest.json of its own was destroyed.
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "index.html").write_text("<html>")
    (project / "src" / "app.js").write_text("x")
    (project / "manifest.json").write_text('{"name": "my web app"}')
    bundle = load_bundle(trained_bundle.path)
    contents = BundleContents(schema=bundle.schema, threshold=bundle.threshold, histogram=bundle.histogram,
                              data_sha256="0" * 64, write_saved_model=_placeholder_model)
    with pytest.raises(BundleError, match="is not a model bundle"):
        write_bundle(project, contents)
    # A real bundle with a file added by hand is not replaced either.
    ours = Path(shutil.copytree(trained_bundle.path, tmp_path / "ours"))
    (ours / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match=r"holds files the bundle did not write \(notes\.txt\)"):
        write_bundle(ours, contents)
    assert sorted(p.name for p in project.rglob("*")) == ["app.js", "index.html", "manifest.json", "src"]
    assert (ours / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []


# --- issue 19: hostile bundles with recomputed hashes ---------------------------------------------------

@pytest.mark.parametrize(("name", "text", "message"), [
    ("threshold.json", "[" * 200_000, "threshold.json is not valid JSON (nested too deeply)"),
    ("manifest.json", "[" * 200_000, "manifest.json is not valid JSON (nested too deeply)"),
    ("threshold.json", '{"value": ' + "9" * 5000 + "}", "threshold.json is not valid JSON"),
])
def test_anomaly_score_refuses_json_the_parser_cannot_take_with_one_line(
        trained_bundle: TrainedBundle, bundle_copy: Path, capsys, name: str, text: str, message: str) -> None:
    from tests.unit.test_cli import assert_user_error, run

    (bundle_copy / name).write_text(text)
    if name != "manifest.json":
        _rehash(bundle_copy)
    result = run(score_main, ["--model", bundle_copy, "--data", trained_bundle.csv,
                              "--out", bundle_copy.parent / "o.csv"], capsys)
    assert_user_error(result, "anomaly-score", message)


def _edit_field(bundle: Path, name: str, **changes: object) -> None:
    """Change one field's statistics in features.json and fix the hashes (the schema hash leaves stats out)."""
    features = json.loads((bundle / "features.json").read_text())
    field = next(f for f in features["fields"] if f["name"] == name)
    for key, value in changes.items():
        if value is None:
            del field[key]
        else:
            field[key] = value
    (bundle / "features.json").write_text(json.dumps(features))
    _rehash(bundle)


@pytest.mark.parametrize(("changes", "message"), [
    ({"scale": 0}, "field 'latency': scale must be positive, got 0.0"),
    ({"center": 1e308}, "field 'latency': center 1e+308 must lie in the training range"),
    ({"center": float("nan")}, "field 'latency': center must be a finite number, got nan"),
    ({"scale": 1e300}, "field 'latency': scale 1e+300 must be at most the training range's width"),
    ({"scale": 1e-30}, "at least a 1e-9th of it"),
    ({"impute": -1.0}, "field 'latency': impute -1.0 must lie in the training range"),
    ({"low": None, "high": None}, "field 'latency': low and high (the training range) are required"),
    ({"center": "7"}, "field 'latency': center must be a finite number, got '7'"),
])
def test_load_range_checks_feature_statistics(bundle_copy: Path, changes: dict, message: str) -> None:
    _edit_field(bundle_copy, "latency", **changes)
    with pytest.raises(BundleError) as refused:
        load_bundle(bundle_copy)
    assert message in str(refused.value) and "retrain the model" in str(refused.value)


def test_load_range_checks_after_the_log_transform(bundle_copy: Path) -> None:
    # amount is heavy-tailed: its center and scale are in log1p units, its range in raw units.
    bundle = load_bundle(bundle_copy)
    amount = next(f for f in bundle.schema.fields if f.name == "amount")
    assert getattr(amount, "log", False)
    _edit_field(bundle_copy, "amount", center=getattr(amount, "high") * 0.9)  # in range raw, not after log
    with pytest.raises(BundleError, match=r"field 'amount': center .* must lie in the training range .* \(after log\)"):
        load_bundle(bundle_copy)


def test_anomaly_score_refuses_a_zero_scale_and_an_absurd_center_with_one_line(
        trained_bundle: TrainedBundle, bundle_copy: Path, capsys) -> None:
    from tests.unit.test_cli import assert_user_error, run

    _edit_field(bundle_copy, "latency", scale=0.0, center=1e308)
    result = run(score_main, ["--model", bundle_copy, "--data", trained_bundle.csv,
                              "--out", bundle_copy.parent / "o.csv"], capsys)
    assert_user_error(result, "anomaly-score", "features.json", "field 'latency': scale must be positive")
    assert not (bundle_copy.parent / "o.csv").exists()


@pytest.mark.parametrize("kind", ["file link into another bundle", "report link to a system file", "fifo"])
def test_load_refuses_links_and_special_files_anywhere_in_the_bundle(trained_bundle: TrainedBundle,
                                                                     bundle_copy: Path, kind: str) -> None:
    import os

    if kind == "file link into another bundle":
        name = "features.json"
        (bundle_copy / name).unlink()
        (bundle_copy / name).symlink_to(trained_bundle.path.resolve() / name)
    elif kind == "report link to a system file":
        name = "report/x"
        (bundle_copy / name).symlink_to("/etc/hostname")
    else:
        name = "report/pipe"
        os.mkfifo(bundle_copy / name)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    if kind != "fifo":  # listed with its hash, as a hand-made bundle would (a FIFO cannot be hashed)
        manifest["files"][name] = hashlib.sha256((bundle_copy / name).read_bytes()).hexdigest()
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError) as refused:
        load_bundle(bundle_copy)
    what = "is not a regular file" if kind == "fifo" else "is a symbolic link"
    assert f"{bundle_copy / name} {what}" in str(refused.value)


def test_write_never_replaces_a_bundle_holding_a_link(trained_bundle: TrainedBundle, tmp_path: Path) -> None:
    mine = tmp_path / "mine.txt"
    mine.write_text("keep me")
    ours = Path(shutil.copytree(trained_bundle.path, tmp_path / "ours"))
    (ours / "report" / "x").symlink_to(mine)
    _rehash(ours)
    manifest = json.loads((ours / "manifest.json").read_text())
    manifest["files"]["report/x"] = hashlib.sha256(mine.read_bytes()).hexdigest()
    (ours / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(trained_bundle.path)
    contents = BundleContents(schema=bundle.schema, threshold=bundle.threshold, histogram=bundle.histogram,
                              data_sha256="0" * 64, write_saved_model=_placeholder_model)
    with pytest.raises(BundleError, match=r"is not a model bundle \(.*report/x is a symbolic link"):
        write_bundle(ours, contents)
    assert mine.read_text() == "keep me" and (ours / "report" / "x").is_symlink()


# --- issue 21: window features are part of the bundle ---------------------------------------------

WINDOW_SPEC = build_spec(["host"], ["2s", "1m"], "ts", {"host": "categorical", "ts": "numeric", "bytes": "numeric"})
Windowed = Callable[[WindowSpec | None, Sequence[str]], BundleContents]


@pytest.fixture()
def windowed(trained_bundle: TrainedBundle) -> Windowed:
    """Bundle contents with numeric fields `names` (and no real model), to be written with window spec `spec`."""
    parts = load_bundle(trained_bundle.path)

    def contents(spec: WindowSpec | None, names: Sequence[str]) -> BundleContents:
        rng = np.random.default_rng(0)
        schema = fit_schema({name: rng.normal(size=50) for name in names}, [])
        return BundleContents(schema=schema, threshold=parts.threshold, histogram=parts.histogram,
                              data_sha256="cd" * 32, write_saved_model=_placeholder_model, windows=spec)

    return contents


def test_a_windowed_bundle_keeps_its_spec_and_lets_its_keys_through(windowed: Windowed, tmp_path: Path) -> None:
    window_spec = WINDOW_SPEC
    write_bundle(tmp_path / "b", windowed(window_spec, ["bytes", *window_spec.names]))
    bundle = load_bundle(tmp_path / "b")
    assert bundle.windows == window_spec and bundle.windows.names == window_spec.names
    assert "windows.json" in bundle.manifest.files
    assert json.loads((tmp_path / "b" / "windows.json").read_text()) == window_spec.to_dict()
    # The entity and time fields are read by the windows, not the model: a file to score may carry them.
    assert set(bundle.passthrough_columns) >= {"host", "ts"} and "bytes" not in bundle.passthrough_columns


def test_a_bundle_without_windows_loads_with_none(trained_bundle: TrainedBundle) -> None:
    bundle = load_bundle(trained_bundle.path)
    assert bundle.windows is None and "windows.json" not in bundle.manifest.files


@pytest.mark.parametrize(("edit", "message"), [
    ({"grace_s": -1}, "windows.json is not a window spec.*grace"),
    ({"windows": ["2 parsecs"]}, "windows.json is not a window spec.*not a duration"),
    ({"entities": []}, "windows.json is not a window spec.*entity"),
    ({"windows": ["2s", "5m"]}, "window feature 'win:host:1m:count' that windows.json does not define"),
])
def test_load_refuses_a_window_spec_out_of_range_or_not_matching_the_schema(
        windowed: Windowed, tmp_path: Path, edit: dict, message: str) -> None:
    write_bundle(tmp_path / "b", windowed(WINDOW_SPEC, ["bytes", *WINDOW_SPEC.names]))
    (tmp_path / "b" / "windows.json").write_text(json.dumps({**WINDOW_SPEC.to_dict(), **edit}))
    _rehash(tmp_path / "b")
    with pytest.raises(BundleError, match=message):
        load_bundle(tmp_path / "b")


def test_load_refuses_window_features_without_their_spec(windowed: Windowed, tmp_path: Path) -> None:
    write_bundle(tmp_path / "b", windowed(None, ["bytes", *WINDOW_SPEC.names]))
    with pytest.raises(BundleError, match="window feature 'win:host:2s:count' but the bundle has no windows.json"):
        load_bundle(tmp_path / "b")
