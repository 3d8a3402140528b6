"""Reading event files: formats, column kinds, missing values, and errors that name file, column and row."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.contract import decode_event, event_columns, instant
from training.data import (
    Labels,
    check_columns,
    encode_frame,
    file_format,
    infer_kinds,
    instant_columns,
    instant_warnings,
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
    with pytest.raises(DataError, match=r"unknown file type '\.txt'; use one of \.avro, \.csv"):
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


# --- instants: one number (epoch seconds) whatever the format ----------------------------------

def _iso(moment: datetime, style: int) -> str:
    """The instant as different writers render it: Z, an offset, naive UTC with a space, a bare date at midnight."""
    if style == 0:
        return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    if style == 1:
        return moment.astimezone(timezone(timedelta(hours=-3, minutes=-30))).isoformat()
    if style == 2 or moment.astimezone(UTC).time() != time(0):
        return moment.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
    return moment.astimezone(UTC).date().isoformat()


_MOMENTS = st.datetimes(min_value=datetime(1950, 1, 1), max_value=datetime(2150, 1, 1), timezones=st.just(UTC))


@settings(max_examples=60, deadline=None)
@given(moments=st.lists(st.one_of(st.none(), _MOMENTS, _MOMENTS.map(lambda m: m.replace(hour=0, minute=0, second=0,
                                                                                        microsecond=0))),
                        min_size=1, max_size=8).filter(lambda ms: any(ms)),
       styles=st.lists(st.integers(0, 3), min_size=8, max_size=8),
       unit=st.sampled_from(["us", "ns"]), tz=st.sampled_from([None, "UTC", "Asia/Kolkata"]))
def test_an_instant_decodes_to_one_number_from_parquet_csv_jsonl_and_events(
        tmp_path_factory: pytest.TempPathFactory, moments: list[datetime | None], styles: list[int], unit: str,
        tz: str | None) -> None:
    directory = tmp_path_factory.mktemp("instants")
    texts = [None if m is None else _iso(m, styles[i]) for i, m in enumerate(moments)]
    expected = np.array([np.nan if m is None else m.timestamp() for m in moments])
    micros = [None if m is None else (m - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
              for m in moments]
    parquet = directory / "a.parquet"
    ticks = [None if t is None else t * (1000 if unit == "ns" else 1) for t in micros]
    pq.write_table(pa.table({"ts": pa.array(ticks, pa.timestamp(unit, tz)), "n": list(range(len(moments)))}), parquet)
    csv = _write(directory / "a.csv", "ts,n\n" + "".join(f"{t or ''},{i}\n" for i, t in enumerate(texts)))
    jsonl = _write(directory / "a.jsonl", "".join(  # odd rows carry the epoch seconds as a JSON number
        json.dumps({"ts": t if i % 2 == 0 or t is None else instant(t), "n": i}) + "\n" for i, t in enumerate(texts)))
    for path in (parquet, csv, jsonl):
        frame = read_frame(path)
        assert infer_kinds(frame, []) == {"ts": NUMERIC, "n": NUMERIC}, path
        if path != jsonl:  # (a JSON number is a number: epoch seconds are not told from other numbers)
            assert instant_columns(frame, ["ts", "n"]) == ["ts"], path
        got = raw_columns(frame, {"ts": NUMERIC, "n": NUMERIC}, path)["ts"]
        assert got.tobytes() == expected.tobytes(), (path, got, expected)
    events = [{"ts": t, "n": i} for i, t in enumerate(texts)]
    assert event_columns(events, {"ts": NUMERIC, "n": NUMERIC}).columns["ts"].tobytes() == expected.tobytes()


def test_date_columns_are_epoch_seconds_at_midnight_utc(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"day": pa.array([date(2024, 5, 1), None, date(1969, 12, 31)], pa.date32()),
                             "n": [1, 2, 3]}), path)
    np.testing.assert_array_equal(raw_columns(read_frame(path), {"day": NUMERIC, "n": NUMERIC}, path)["day"],
                                  [datetime(2024, 5, 1, tzinfo=UTC).timestamp(), np.nan, -86_400.0])


def test_issue_19_row_3_parquet_timestamps_and_jsonl_text_encode_alike(tmp_path: Path) -> None:
    # Trained on Parquet with a timestamp[ms] column, the same rows scored as Parquet and as JSON Lines (ISO
    # text, as pandas writes them): the column was a category and only the Parquet rows matched it.
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"bytes": rng.lognormal(5, 1, 50),
                          "seen": pd.to_datetime(1_700_000_000_000 + rng.integers(0, 10**9, 50), unit="ms")})
    parquet, jsonl = tmp_path / "a.parquet", tmp_path / "a.jsonl"
    pq.write_table(pa.Table.from_pandas(frame).cast(pa.schema([("bytes", pa.float64()),
                                                                ("seen", pa.timestamp("ms"))])), parquet)
    frame.to_json(jsonl, orient="records", lines=True, date_format="iso", date_unit="ms")
    assert '"seen":"2023-' in jsonl.read_text()
    trained = read_frame(parquet)
    kinds = infer_kinds(trained, [])
    assert kinds == {"bytes": NUMERIC, "seen": NUMERIC}
    schema = fit_schema(raw_columns(trained, kinds, parquet), [])
    np.testing.assert_array_equal(encode_frame(schema, read_frame(jsonl), jsonl),
                                  encode_frame(schema, read_frame(parquet), parquet))
    assert instant_warnings(trained, kinds) == [
        "warning: column 'seen' holds instants: an absolute time keeps growing past its training range, so later "
        "events look anomalous on it; pass --drop seen unless that is intended"]


def test_only_columns_of_instants_are_warned_about() -> None:
    frame = pd.DataFrame({"n": ["1", "2", "2024-01-01"], "words": ["a", "b", "2024-01-01"],
                          "ts": ["2024-01-01T00:00Z", "NA", "2024-01-02"], "f": [1.5, 2.0, 3.0]})
    assert instant_columns(frame, frame.columns) == ["ts"]


# --- one name, one column ----------------------------------------------------------------------

def test_a_repeated_csv_column_name_is_refused_not_renamed(tmp_path: Path) -> None:
    # pandas renames the second src_bytes to src_bytes.1, a field no event carries.
    path = _write(tmp_path / "a.csv", "src_bytes,dst_bytes,src_bytes\n1,2,3\n")
    for read in (read_frame, lambda p: list(iter_frames(p, 10))):
        with pytest.raises(DataError, match=r"a\.csv: column 'src_bytes' appears more than once"):
            read(path)


def test_a_repeated_parquet_column_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array([1, 2]), pa.array([3, 4])], names=["src_bytes", "src_bytes"]), path)
    with pytest.raises(DataError, match=r"a\.parquet: column 'src_bytes' appears more than once"):
        read_frame(path)


def test_a_repeated_json_key_is_its_last_value_as_in_an_event(tmp_path: Path) -> None:
    line = b'{"src_bytes": 1, "dst_bytes": 2, "src_bytes": 3}'
    frame = read_frame(_write(tmp_path / "a.jsonl", line.decode() + "\n"))
    assert list(frame.columns) == ["src_bytes", "dst_bytes"] and frame["src_bytes"].tolist() == [3]
    assert decode_event(line, len(line)) == {"src_bytes": 3, "dst_bytes": 2}


def test_anomaly_train_names_the_repeated_column_in_one_line(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit.test_cli import assert_user_error, run
    from training.cli import train_main

    path = _write(tmp_path / "events.csv", "src_bytes,src_bytes\n" + "1,2\n" * 30)
    result = run(train_main, ["--data", path, "--out", tmp_path / "model"], capsys)
    assert_user_error(result, "anomaly-train", "events.csv: column 'src_bytes' appears more than once")
    assert not (tmp_path / "model").exists()
