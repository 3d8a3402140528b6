"""Training on more rows than memory: a seeded uniform sample read in chunks (training/sample.py), from a file,
a glob or a partitioned Parquet folder; data within --max-rows trains exactly as when read whole."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.unit.conftest import TRAIN_ARGS, synthetic_events
from training.bundle import load_bundle
from training.cli import train_main
from training.data import Labels, file_sha256, iter_source, read_frame, resolve_source, source_sha256
from training.errors import DataError
from training.model import FitConfig
from training.sample import Sample, sample_rows
from training.scoring import score_frame
from training.train import TrainConfig, train_frame

LABEL_ARGS = ["--label-column", "label", "--normal-value", "normal", "--drop", "event_id"]


def _chunks(frame: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [frame.iloc[start:start + size] for start in range(0, len(frame), size)]


def _kept(sample: Sample) -> list[str]:
    return sample.frame["event_id"].tolist()


def test_the_same_seed_keeps_the_same_rows_whatever_the_chunk_size() -> None:
    frame = synthetic_events(2_000)
    samples = [sample_rows(_chunks(frame, size), 300, seed=5) for size in (7, 64, 333, 2_000)]
    assert all(_kept(sample) == _kept(samples[0]) for sample in samples)
    assert len(samples[0].frame) == 300 and samples[0].rows_read == 2_000 and not samples[0].whole
    assert _kept(sample_rows(_chunks(frame, 64), 300, seed=6)) != _kept(samples[0])
    # Kept in data order, every column as read.
    positions = frame.index[frame["event_id"].isin(_kept(samples[0]))]
    pd.testing.assert_frame_equal(samples[0].frame, frame.loc[positions].reset_index(drop=True))


def test_every_row_is_equally_likely_to_be_kept() -> None:
    frame = pd.DataFrame({"row": np.arange(40)})
    counts = np.zeros(40)
    for seed in range(1_000):
        counts[sample_rows(_chunks(frame, 9), 8, seed=seed).frame["row"].to_numpy()] += 1
    # Each row is kept with probability 8/40: 200 of 1000 times, standard deviation 12.6.
    assert np.abs(counts - 200).max() < 5 * 12.65
    first_half = np.array([sample_rows(_chunks(frame, 9), 8, seed=s).frame["row"].lt(20).sum() for s in range(300)])
    assert abs(first_half.mean() - 4.0) < 0.3  # no drift towards early or late rows


def test_labelled_anomalies_are_kept_at_the_rate_of_the_normal_rows() -> None:
    frame = synthetic_events(20_000, seed=3)
    labels = Labels("label", "normal")
    sample = sample_rows(_chunks(frame, 1_000), 2_000, seed=0,
                         normal_rows=lambda chunk, first: labels.normal_rows(chunk, Path("x"), first))
    normal = sample.frame["label"] == "normal"
    assert int(normal.sum()) == 2_000 == sample.normal_rows_kept
    share_read = 1 - sample.normal_rows_read / sample.rows_read
    assert abs((~normal).mean() - share_read) < 0.02  # the evaluation sees the data's share of anomalies
    anomalies = sample.rows_read - sample.normal_rows_read
    assert f"of {sample.normal_rows_read} normal rows and {len(sample.frame) - 2_000} of {anomalies} labelled" \
        in sample.describe()


def test_a_chunk_without_normal_rows_is_fine_and_a_missing_label_names_its_row() -> None:
    frame = synthetic_events(300)
    frame.loc[:99, "label"] = "attack"
    labels = Labels("label", "normal")
    sample = sample_rows(_chunks(frame, 50), 1_000, seed=0,
                         normal_rows=lambda chunk, first: labels.normal_rows(chunk, Path("x"), first))
    assert sample.whole
    frame.loc[123, "label"] = None
    with pytest.raises(DataError, match="row 124: label is missing"):
        sample_rows(_chunks(frame, 50), 1_000, seed=0,
                    normal_rows=lambda chunk, first: labels.normal_rows(chunk, Path("x"), first))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_file_within_max_rows_is_kept_whole_as_read_whole(tmp_path: Path, suffix: str) -> None:
    frame = synthetic_events(300)
    frame.loc[5, "amount"] = None
    path = tmp_path / f"events{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".jsonl":
        records = frame.astype(object).where(frame.notna(), None).to_dict("records")
        del records[200]["method"]  # a key absent from one chunk's rows
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        frame.to_parquet(path, index=False)
    source = resolve_source(path)
    sample = sample_rows(iter_source(source, 64), 300, seed=1)
    assert sample.whole
    pd.testing.assert_frame_equal(sample.frame, read_frame(path))
    assert source_sha256(source) == file_sha256(path)


def test_a_file_within_max_rows_trains_exactly_as_before(tmp_path: Path) -> None:
    frame = synthetic_events(400)
    csv = tmp_path / "events.csv"
    frame.to_csv(csv, index=False)
    assert train_main(["--data", str(csv), "--out", str(tmp_path / "new"), *LABEL_ARGS, *TRAIN_ARGS,
                       "--max-rows", "400"]) == 0
    # Before: the whole file read at once, then trained.
    config = TrainConfig(fit=FitConfig(epochs=4, hidden=(8, 3), batch_size=64, seed=7),  # TRAIN_ARGS
                         drop=("event_id",), labels=Labels("label", "normal"))
    train_frame(read_frame(csv), tmp_path / "old", config, file_sha256(csv), source=csv, log=lambda _line: None)
    new, old = load_bundle(tmp_path / "new"), load_bundle(tmp_path / "old")
    # Every file hashes alike but the report (it states the seconds taken) and the SavedModel (TensorFlow writes
    # the same weights to different bytes each time): the scores below show the model is the same.
    files = [{k: v for k, v in b.manifest.files.items() if not k.startswith(("report/", "saved_model/"))}
             for b in (new, old)]
    assert files[0] == files[1] and "features.json" in files[0] and "field_histograms.json" in files[0]
    without_time = [{k: v for k, v in b.manifest.training.items() if k != "seconds"} for b in (new, old)]
    assert without_time[0] == without_time[1] and "rows_read" not in without_time[0]
    assert new.manifest.data_sha256 == old.manifest.data_sha256 == file_sha256(csv)
    assert new.manifest.metrics == old.manifest.metrics
    np.testing.assert_array_equal(score_frame(new, frame).score, score_frame(old, frame).score)


def test_more_rows_than_max_rows_train_on_a_sample_and_say_so(tmp_path: Path) -> None:
    csv = tmp_path / "events.csv"
    synthetic_events(1_200).to_csv(csv, index=False)
    assert train_main(["--data", str(csv), "--out", str(tmp_path / "m"), *LABEL_ARGS, *TRAIN_ARGS,
                       "--max-rows", "300"]) == 0
    training = load_bundle(tmp_path / "m").manifest.training
    assert training["rows_read"] == 1_200 and training["normal_rows"] == 300
    assert training["sampled_rows"] == training["rows"] < 1_200
    assert training["sample"].startswith("uniform sample (seed 7) of 300 of ")
    assert "uniform sample (seed 7) of 300" in (tmp_path / "m" / "report" / "report.html").read_text()


def test_a_partitioned_parquet_folder_trains_with_its_partition_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "flows"
    pq.write_to_dataset(pa.Table.from_pandas(synthetic_events(400), preserve_index=False), folder,
                        partition_cols=["method"])
    (folder / "_SUCCESS").touch()  # Spark's marker file is not data
    source = resolve_source(folder)
    assert len(source.files) == 3
    assert train_main(["--data", str(folder), "--out", str(tmp_path / "m"), *LABEL_ARGS, *TRAIN_ARGS]) == 0
    bundle = load_bundle(tmp_path / "m")
    assert "method" in bundle.schema.categorical_names
    assert bundle.manifest.training["rows"] == 400
    assert bundle.manifest.data_sha256 == source_sha256(source) != file_sha256(source.files[0])


def test_a_glob_of_files_trains_on_all_of_them_and_hashes_each(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                ) -> None:
    frame = synthetic_events(400)
    for part, chunk in enumerate(_chunks(frame, 150)):
        chunk.to_csv(tmp_path / f"part-{part}.csv", index=False)
    pattern = str(tmp_path / "part-*.csv")
    assert train_main(["--data", pattern, "--out", str(tmp_path / "m"), *LABEL_ARGS, *TRAIN_ARGS]) == 0
    assert "read 400 rows in 3 file(s)" in capsys.readouterr().out
    before = load_bundle(tmp_path / "m").manifest.data_sha256
    (tmp_path / "part-2.csv").write_text((tmp_path / "part-2.csv").read_text().replace("normal", "attack", 1))
    assert source_sha256(resolve_source(Path(pattern))) != before
    assert train_main(["--data", str(tmp_path / "none-*.csv"), "--out", str(tmp_path / "n"), *TRAIN_ARGS]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_windows_over_more_rows_than_max_rows_are_refused_in_one_line(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    frame = synthetic_events(400).assign(ts=np.arange(400.0), host="h")
    csv = tmp_path / "events.csv"
    frame.to_csv(csv, index=False)
    code = train_main(["--data", str(csv), "--out", str(tmp_path / "m"), *LABEL_ARGS, *TRAIN_ARGS, "--max-rows", "300",
                       "--entity", "host", "--window", "10s", "--event-time", "ts"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "more than --max-rows 300 rows: window features need every row in event order" in err
