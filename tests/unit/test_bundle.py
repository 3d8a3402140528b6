"""The bundle round trip: train via the CLI, score via the CLI and in-process, verify on load, write atomically."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.unit.conftest import TrainedBundle
from training import report
from training.bundle import FORMAT_VERSION, BundleContents, load_bundle, write_bundle
from training.cli import score_main, train_main
from training.errors import BundleError
from training.features import FeatureSchema


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
