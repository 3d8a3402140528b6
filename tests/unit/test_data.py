"""Reading event files: formats, column kinds, missing values, and errors that name file, column and row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from training.data import (
    Labels,
    check_columns,
    file_format,
    infer_kinds,
    iter_frames,
    raw_columns,
    read_frame,
)
from training.errors import DataError
from training.features import CATEGORICAL, NUMERIC, FeatureSchema, fit_schema


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(("name", "fmt"), [("a.csv", "csv"), ("a.JSONL", "jsonl"), ("a.ndjson", "jsonl"),
                                           ("a.parquet", "parquet"), ("a.pq", "parquet")])
def test_format_follows_extension(tmp_path: Path, name: str, fmt: str) -> None:
    assert file_format(_write(tmp_path / name, "x")) == fmt


def test_unknown_missing_and_empty_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"unknown file type '\.txt'; use one of \.csv"):
        file_format(_write(tmp_path / "events.txt", "a,b\n1,2\n"))
    with pytest.raises(DataError, match="no such file"):
        file_format(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="file is empty"):
        file_format(_write(tmp_path / "empty.csv", ""))


@pytest.mark.parametrize(("name", "text"), [("header.csv", "a,b\n"), ("blank.jsonl", "\n\n")])
def test_file_without_data_rows_is_refused(tmp_path: Path, name: str, text: str) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match="no data rows"):
        read_frame(path)
    with pytest.raises(DataError, match="no data rows"):
        list(iter_frames(path, 10))


def test_parquet_without_rows_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pd.DataFrame({"a": pd.Series([], dtype=float)}).to_parquet(path)
    with pytest.raises(DataError, match="no data rows"):
        read_frame(path)


def test_unparseable_file_names_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", '{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: record value is not valid JSON"):
        read_frame(path)
    with pytest.raises(DataError, match=r"a\.jsonl: line 1: expected a JSON object, got a JSON array"):
        read_frame(_write(tmp_path / "a.jsonl", "[1]\n"))


def test_empty_csv_cells_and_jsonl_nulls_are_missing_values(tmp_path: Path) -> None:
    csv = _write(tmp_path / "a.csv", "x,kind\n1.5,GET\n,PUT\n3,\n")
    jsonl = _write(tmp_path / "a.jsonl", '{"x": 1.5, "kind": "GET"}\n{"x": null, "kind": "PUT"}\n'
                                         '{"x": 3}\n')
    for path in (csv, jsonl):
        frame = read_frame(path)
        kinds = infer_kinds(frame, categorical=[])
        assert kinds == {"x": NUMERIC, "kind": CATEGORICAL}
        columns = raw_columns(frame, kinds, path)
        np.testing.assert_array_equal(columns["x"], [1.5, np.nan, 3.0])
        assert list(columns["kind"]) == ["GET", "PUT", None]


def test_mostly_numeric_text_column_stays_numeric_and_stray_text_names_the_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", "x\n1\n2\noops\n4\n")
    frame = read_frame(path)
    assert infer_kinds(frame, categorical=[]) == {"x": NUMERIC}
    with pytest.raises(DataError, match=r"a\.csv: column 'x', row 3: 'oops' is not a number"):
        raw_columns(frame, {"x": NUMERIC}, path)


def test_declared_categorical_wins_and_numbers_become_their_text() -> None:
    frame = pd.DataFrame({"port": [80.0, 443.0, np.nan], "code": [1, 2, 3]})
    assert infer_kinds(frame, categorical=["port"]) == {"port": CATEGORICAL, "code": NUMERIC}
    kinds = {"port": CATEGORICAL, "code": NUMERIC}
    assert list(raw_columns(frame, kinds, Path("x"))["port"]) == ["80", "443", None]


def test_infinite_value_names_the_row() -> None:
    with pytest.raises(DataError, match=r"column 'x', row 12: infinite value"):
        raw_columns(pd.DataFrame({"x": ["1", "-inf"]}), {"x": NUMERIC}, Path("f.csv"), first_row=11)


def test_na_like_text_is_missing_in_numeric_and_categorical_columns(tmp_path: Path) -> None:
    # Issue 7: the worker and the file reader must agree; the contract says NA-like text is missing everywhere.
    path = _write(tmp_path / "a.csv", "x,kind\nNA,GET\n n/a ,PUT\n2,None\n3,null \n4,NaN\n")
    frame = read_frame(path)
    kinds = infer_kinds(frame, categorical=[])
    assert kinds == {"x": NUMERIC, "kind": CATEGORICAL}
    columns = raw_columns(frame, kinds, path)
    np.testing.assert_array_equal(columns["x"], [np.nan, np.nan, 2.0, 3.0, 4.0])
    assert list(columns["kind"]) == ["GET", "PUT", None, None, None]


def test_boolean_columns_mean_one_and_zero_in_every_format(tmp_path: Path) -> None:
    csv = _write(tmp_path / "a.csv", "flag,n\ntrue,1\nFalse,2\n,3\n")
    jsonl = _write(tmp_path / "a.jsonl", '{"flag": true, "n": 1}\n{"flag": false, "n": 2}\n{"flag": null, "n": 3}\n')
    parquet = tmp_path / "a.parquet"
    pd.DataFrame({"flag": pd.array([True, False, None], dtype="boolean"), "n": [1, 2, 3]}).to_parquet(parquet)
    for path in (csv, jsonl, parquet):
        frame = read_frame(path)
        assert infer_kinds(frame, []) == {"flag": NUMERIC, "n": NUMERIC}, path
        np.testing.assert_array_equal(raw_columns(frame, {"flag": NUMERIC, "n": NUMERIC}, path)["flag"],
                                      [1.0, 0.0, np.nan])


def test_row_without_any_feature_value_is_refused_like_an_event(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", "x,kind\n1,GET\n,NA\n")
    frame = read_frame(path)
    with pytest.raises(DataError, match=r"a\.csv: row 2: none of the 2 feature columns has a value"):
        raw_columns(frame, {"x": NUMERIC, "kind": CATEGORICAL}, path)


def test_nested_jsonl_values_are_refused_with_their_row(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jsonl", '{"x": 1, "kind": "a"}\n{"x": 2, "kind": ["a"]}\n')
    with pytest.raises(DataError, match=r"column 'kind', row 2: a array cannot be a category"):
        raw_columns(read_frame(path), {"x": NUMERIC, "kind": CATEGORICAL}, path)


def test_row_numbers_count_across_chunks(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.csv", "x\n" + "".join(f"{i}\n" for i in range(1, 8)) + "bad\n")
    firsts = []
    with pytest.raises(DataError, match=r"row 8: 'bad'"):
        for first, chunk in iter_frames(path, 3):
            firsts.append(first)
            raw_columns(chunk, {"x": NUMERIC}, path, first)
    assert firsts == [1, 4, 7]


def test_bool_column_is_numeric() -> None:
    frame = pd.DataFrame({"flag": [True, False]})
    assert infer_kinds(frame, []) == {"flag": NUMERIC}
    np.testing.assert_array_equal(raw_columns(frame, {"flag": NUMERIC}, Path("x"))["flag"], [1.0, 0.0])


@pytest.fixture()
def schema() -> FeatureSchema:
    obj = np.empty(4, dtype=object)
    obj[:] = ["a", "a", "b", "b"]
    return fit_schema({"x": np.arange(4.0), "k": obj}, categorical=["k"])


def test_scoring_file_must_have_every_schema_column(schema: FeatureSchema) -> None:
    with pytest.raises(DataError, match=r"s\.csv: missing column\(s\) required by the model: k"):
        check_columns(pd.DataFrame({"x": [1.0]}), schema, [], Path("s.csv"))


def test_scoring_file_must_not_have_unexpected_columns(schema: FeatureSchema) -> None:
    frame = pd.DataFrame({"x": [1.0], "k": ["a"], "id": [1]})
    with pytest.raises(DataError, match="unexpected column.* id.*--passthrough id"):
        check_columns(frame, schema, [], Path("s.csv"))
    check_columns(frame, schema, ["id"], Path("s.csv"))


def test_labels_select_normal_rows() -> None:
    frame = pd.DataFrame({"y": [0, 1, 0]})
    np.testing.assert_array_equal(Labels("y", "0").is_normal(frame, Path("f")), [True, False, True])


@pytest.mark.parametrize(("frame", "message"), [
    (pd.DataFrame({"y": ["bad", "bad"]}), "has no row equal to 'ok' .values seen: bad"),
    (pd.DataFrame({"z": ["ok"]}), "label column 'y' not found; columns are z"),
    (pd.DataFrame({"y": ["ok", None]}), "label column 'y', row 2: label is missing"),
])
def test_label_problems_say_what_to_fix(frame: pd.DataFrame, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Labels("y", "ok").is_normal(frame, Path("f.csv"))
