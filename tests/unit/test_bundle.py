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
                              data_sha256="ab" * 32, write_saved_model=lambda path: path.mkdir())
    manifest = write_bundle(tmp_path / "b", contents)
    again = load_bundle(tmp_path / "b")
    assert again.manifest == manifest
    assert again.schema == bundle.schema and isinstance(again.schema, FeatureSchema)
    assert again.threshold == bundle.threshold and again.histogram == bundle.histogram
    assert not (tmp_path / "b" / "report").exists()
