"""Nested fields: one rule for a JSON event, a JSON Lines row, a Parquet struct, an Avro record (training/nested.py)."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.contract import CATEGORICAL, NUMERIC, Reason, event_columns, instant
from training.data import raw_columns, read_frame
from training.errors import DataError
from training.nested import FieldClash, flatten, plain, plain_record
from worker.decode import decode_events

KINDS = {"flow.pkts": NUMERIC, "flow.bytes": NUMERIC, "flow.state": CATEGORICAL, "id.orig_h": CATEGORICAL,
         "card.merchant.mcc": CATEGORICAL}

AVRO_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "Event", "fields": [
        {"name": "flow", "type": {"type": "record", "name": "Flow", "fields": [
            {"name": "pkts", "type": ["null", "long"]},
            {"name": "bytes", "type": ["null", "double"]},
            {"name": "state", "type": ["null", "string"]}]}},
        {"name": "id_orig_h", "type": ["null", "string"]},  # Avro names cannot hold a dot: renamed below
        {"name": "card", "type": {"type": "record", "name": "Card", "fields": [
            {"name": "merchant", "type": {"type": "record", "name": "Merchant", "fields": [
                {"name": "mcc", "type": ["null", "long"]}]}}]}},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
    ]})

text = st.one_of(st.none(), st.sampled_from(["est", "rej", "10.0.0.1", " x ", "NA", "80"]))
rows = st.lists(st.fixed_dictionaries({
    "pkts": st.one_of(st.none(), st.integers(-10**6, 10**6)),
    "bytes": st.one_of(st.none(), st.floats(-1e9, 1e9, allow_nan=False)),
    "state": text, "orig": text,
    "mcc": st.one_of(st.none(), st.integers(0, 9999)),
}), min_size=1, max_size=12)


def nested(row: dict) -> dict:
    return {"flow": {"pkts": row["pkts"], "bytes": row["bytes"], "state": row["state"]}, "id.orig_h": row["orig"],
            "card": {"merchant": {"mcc": row["mcc"]}}, "tags": ["a", "b"]}


def assert_same(left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> None:
    assert left.keys() == right.keys()
    for name in left:
        if KINDS[name] == NUMERIC:
            np.testing.assert_array_equal(left[name], right[name], err_msg=name)
        else:
            assert left[name].tolist() == right[name].tolist(), name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows)
def test_a_nested_row_means_the_same_from_an_event_jsonl_parquet_and_avro(tmp_path: Path, sample: list[dict]) -> None:
    events = [nested(row) for row in sample]
    decoded = decode_events([json.dumps(event).encode() for event in events], 1 << 20)
    from_events = event_columns(decoded, KINDS)  # type: ignore[arg-type]
    assert not from_events.problems or all(p.reason == Reason.NO_FEATURES for p in from_events.problems.values())
    valid = from_events.valid_rows()
    from_events_columns = from_events.take(valid)
    if len(valid) < len(sample):  # a row with no value at all: every source refuses it
        return

    jsonl = tmp_path / "events.jsonl"
    jsonl.write_text("\n".join(json.dumps(event) for event in events))
    parquet = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pylist(events), parquet)
    avro = tmp_path / "events.avro"
    with avro.open("wb") as fh:
        fastavro.writer(fh, AVRO_SCHEMA, [{**event, "id_orig_h": event["id.orig_h"]} for event in events])
    for path in (jsonl, parquet, avro):
        frame = read_frame(path)
        if path is avro:
            frame = frame.rename(columns={"id_orig_h": "id.orig_h"})
        assert "tags" in frame.columns  # arrays stay one value (training leaves such columns out)
        assert_same(raw_columns(frame, KINDS, path), from_events_columns)


def test_literal_dotted_keys_and_paths_meet_only_by_clash() -> None:
    assert flatten({"id.orig_h": "a", "id": {"resp_h": "b"}}) == {"id.orig_h": "a", "id.resp_h": "b"}
    assert flatten({"conn": {"id.orig_h": "a"}}) == {"conn.id.orig_h": "a"}
    with pytest.raises(FieldClash, match="'id.orig_h' is given twice"):
        flatten({"id": {"orig_h": "a"}, "id.orig_h": "b"})
    flat = {"a": 1, "b": [1, {"c": 2}]}
    assert flatten(flat) is flat  # nothing nested: the event itself, no copy; arrays are one value


def test_a_parquet_struct_clashing_with_a_dotted_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "clash.parquet"
    pq.write_table(pa.table({"id": [{"orig_h": "a"}], "id.orig_h": ["b"]}), path)
    with pytest.raises(DataError, match="'id.orig_h' is given twice"):
        read_frame(path)


def test_typed_values_are_the_json_values_they_stand_for() -> None:
    moment = datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)
    assert plain(moment) == instant("2024-05-01T12:00:00.5Z") == 1714564800.5
    assert plain(datetime(2024, 5, 1, 12)) == instant("2024-05-01T12:00:00")  # naive means UTC
    assert plain(date(2024, 5, 1)) == instant("2024-05-01")
    assert plain(time(1, 2, 3, 250000)) == 3723.25
    assert plain(Decimal("12.34")) == 12.34
    assert plain(b"\x00\x01") == "AAE="
    assert plain(UUID(int=1)) == "00000000-0000-0000-0000-000000000001"
    assert plain_record({"card": {"amount": Decimal("1.5"), "seen": moment}, "tags": (b"x",)}) == {
        "card.amount": 1.5, "card.seen": 1714564800.5, "tags": ["eA=="]}


def test_a_parquet_timestamp_is_the_number_its_iso_text_is(tmp_path: Path) -> None:
    """One representation of an instant: a Parquet timestamp and date, an Avro timestamp-millis and ISO text."""
    moment = datetime(2024, 5, 1, 12, 0, 0, 500000, tzinfo=UTC)
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.table({"ts": pa.array([moment], pa.timestamp("ms", tz="UTC")),
                             "day": pa.array([date(2024, 5, 1)], pa.date32())}), parquet)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"ts": "2024-05-01T12:00:00.5Z", "day": "2024-05-01"}))
    avro = tmp_path / "t.avro"
    with avro.open("wb") as fh:
        fastavro.writer(fh, fastavro.parse_schema({"type": "record", "name": "T", "fields": [
            {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "day", "type": {"type": "int", "logicalType": "date"}}]}),
            [{"ts": moment, "day": date(2024, 5, 1)}])
    kinds = {"ts": NUMERIC, "day": NUMERIC}
    seen = [raw_columns(read_frame(path), kinds, path) for path in (parquet, jsonl, avro)]
    for columns in seen:
        assert columns["ts"].tolist() == [1714564800.5] and columns["day"].tolist() == [1714521600.0]


def test_an_avro_file_that_is_not_avro_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x.avro"
    path.write_bytes(b"not avro at all")
    with pytest.raises(DataError, match="x.avro: .*avro"):
        read_frame(path)


def test_a_model_trained_on_nested_json_lines_scores_the_same_rows_from_avro_and_parquet_alike(tmp_path: Path) -> None:
    """anomaly-train on nested JSON Lines, then anomaly-score on the same rows as .jsonl, .parquet and .avro."""
    import csv

    from tests.unit.conftest import TRAIN_ARGS, synthetic_events
    from training.cli import score_main, train_main

    frame = synthetic_events(300)
    numeric = [c for c in frame.columns if c not in ("event_id", "label") and frame[c].dtype.kind in "if"]
    categorical = [c for c in frame.columns if c not in ("event_id", "label", *numeric)]
    events = [{"event_id": str(row["event_id"]), "flow": {n: float(row[n]) for n in numeric},
               "meta": {"tags": ["x"], **{c: str(row[c]) for c in categorical}}} for row in frame.to_dict("records")]
    jsonl = tmp_path / "events.jsonl"
    jsonl.write_text("\n".join(json.dumps(event) for event in events))
    assert train_main(["--data", str(jsonl), "--out", str(tmp_path / "bundle"), "--drop", "event_id",
                       *TRAIN_ARGS]) == 0
    parquet, avro = tmp_path / "events.parquet", tmp_path / "events.avro"
    pq.write_table(pa.Table.from_pylist(events), parquet)
    schema = fastavro.parse_schema({"type": "record", "name": "E", "fields": [
        {"name": "event_id", "type": "string"},
        {"name": "flow", "type": {"type": "record", "name": "F", "fields": [{"name": n, "type": "double"}
                                                                           for n in numeric]}},
        {"name": "meta", "type": {"type": "record", "name": "M", "fields": [
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            *({"name": c, "type": "string"} for c in categorical)]}}]})
    with avro.open("wb") as fh:
        fastavro.writer(fh, schema, events)
    scores = {}
    for path in (jsonl, parquet, avro):
        out = path.with_suffix(".scores.csv")
        assert score_main(["--model", str(tmp_path / "bundle"), "--data", str(path), "--out", str(out),
                           "--passthrough", "event_id"]) == 0
        with out.open() as fh:
            scores[path.suffix] = [(row["event_id"], row["score"]) for row in csv.DictReader(fh)]
    assert len(scores[".jsonl"]) == len(events)
    assert scores[".jsonl"] == scores[".parquet"] == scores[".avro"]
