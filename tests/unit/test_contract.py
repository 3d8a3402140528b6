"""The data contract: one type policy for file values and event values, and the column builder."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.contract import (
    CATEGORICAL,
    NA_STRINGS,
    NUMERIC,
    Invalid,
    Reason,
    build_columns,
    categorical_column,
    category,
    epoch_seconds,
    event_columns,
    instant,
    number,
    numeric_column,
)

KINDS = {"amount": NUMERIC, "latency": NUMERIC, "method": CATEGORICAL}


def _objects(*values: Any) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


@pytest.mark.parametrize(("value", "expected"), [
    (3, 3.0), (2.5, 2.5), (True, 1.0), (False, 0.0), (" 12 ", 12.0), ("1e3", 1000.0), ("TRUE", 1.0), ("false", 0.0),
    (None, math.nan), ("", math.nan), ("NA", math.nan), (" n/a ", math.nan), ("None", math.nan), ("null", math.nan),
    ("NaN", math.nan), (math.nan, math.nan),
])
def test_numeric_meaning_of_a_value(value: Any, expected: float) -> None:
    got = number(value, "x")
    assert isinstance(got, float)
    assert got == expected or (math.isnan(got) and math.isnan(expected))


@pytest.mark.parametrize(("value", "reason"), [
    ("12 ms", Reason.WRONG_TYPE), ([1.0], Reason.WRONG_TYPE), ({"a": 1}, Reason.WRONG_TYPE),
    (math.inf, Reason.NON_FINITE), ("-inf", Reason.NON_FINITE), (10**400, Reason.NON_FINITE),
])
def test_values_without_a_numeric_meaning_name_the_field(value: Any, reason: Reason) -> None:
    got = number(value, "amount")
    assert isinstance(got, Invalid) and got.reason == reason and got.field == "amount"
    assert "'amount'" in got.message


@pytest.mark.parametrize(("value", "expected"), [
    ("GET", "GET"), ("  GET ", "GET"), (80, "80"), (80.0, "80"), ("80", "80"), ("80.0", "80"), ("-3.00", "-3"),
    ("007", "007"), ("80.5", "80.5"), ("1e3", "1e3"), (0.5, "0.5"), (True, "true"),
    (None, None), ("NA", None), ("None", None), ("", None), (math.nan, None),
])
def test_categorical_meaning_of_a_value(value: Any, expected: str | None) -> None:
    assert category(value, "method") == expected


def test_every_na_string_is_missing_in_both_kinds() -> None:
    for text in NA_STRINGS:
        assert math.isnan(number(f" {text} ", "x"))  # type: ignore[arg-type]
        assert category(f" {text} ", "k") is None


# One definition: the vectorised column paths must give what the one-value functions give, value by value,
# whatever else the column holds (a value's meaning must not depend on its neighbours).
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20), st.integers(min_value=10**308),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(sorted(NA_STRINGS)),
    st.sampled_from(["true", "False", " 12 ", "1e3", "-inf", "Infinity", "12 ms", "GET", "1_000", "0x10"]),
    st.text(max_size=6), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(),
                                                                               max_size=1),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_VALUES, min_size=1, max_size=12))
def test_column_paths_agree_with_the_value_functions(values: list[Any]) -> None:
    column = numeric_column(_objects(*values), "x")
    texts = categorical_column(_objects(*values), "x")
    for i, value in enumerate(values):
        expected = number(value, "x")
        if isinstance(expected, Invalid):
            assert column.problems[i].reason == expected.reason and math.isnan(column.values[i])
        else:
            assert i not in column.problems
            assert column.values[i] == expected or (math.isnan(column.values[i]) and math.isnan(expected))
        meaning = category(value, "x")
        if isinstance(meaning, Invalid):
            assert texts.problems[i].reason == meaning.reason
        else:
            assert texts.values[i] == meaning


def test_typed_numeric_arrays_take_the_same_policy() -> None:
    column = numeric_column(np.array([1.0, np.nan, np.inf]), "x")
    np.testing.assert_array_equal(column.values, [1.0, np.nan, np.nan])
    assert column.problems[2].reason == Reason.NON_FINITE
    np.testing.assert_array_equal(numeric_column(np.array([True, False]), "x").values, [1.0, 0.0])


# --- events ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("event", "reason", "field"), [
    ({"amount": "12 ms", "latency": 1.0}, Reason.WRONG_TYPE, "amount"),
    ({"amount": [1.0]}, Reason.WRONG_TYPE, "amount"),
    ({"method": [1]}, Reason.WRONG_TYPE, "method"),
    ({"method": {"verb": "GET"}}, Reason.WRONG_TYPE, "method"),
    ({"latency": math.nan, "amount": math.inf}, Reason.NON_FINITE, "amount"),
    ({"latency": -math.inf, "amount": 3}, Reason.NON_FINITE, "latency"),
])
def test_bad_event_names_reason_and_field(event: dict, reason: Reason, field: str) -> None:
    parsed = event_columns([{"amount": 1.0}, event], KINDS)
    assert list(parsed.problems) == [1]
    assert parsed.problems[1].reason == reason and repr(field) in parsed.problems[1].message
    assert parsed.valid_rows().tolist() == [0]


@pytest.mark.parametrize("event", [
    {}, {"unrelated": 1}, {"amount": None, "latency": None, "method": None}, {"amount": "NA", "method": "None"},
])
def test_event_without_a_value_for_any_field_has_no_features(event: dict) -> None:
    parsed = event_columns([event], KINDS)
    assert parsed.problems[0].reason == Reason.NO_FEATURES
    assert "amount" in parsed.problems[0].message


def test_events_parse_like_files_booleans_numeric_text_and_na_text() -> None:
    parsed = event_columns([
        {"amount": True, "latency": "2.5", "method": "None"},
        {"amount": 5, "method": 80},
        {"latency": 1.5, "method": " GET "},
    ], KINDS)
    assert parsed.problems == {}
    np.testing.assert_array_equal(parsed.columns["amount"], [1.0, 5.0, np.nan])
    np.testing.assert_array_equal(parsed.columns["latency"], [2.5, np.nan, 1.5])
    assert list(parsed.columns["method"]) == [None, "80", "GET"]


def test_a_field_absent_from_the_raw_columns_is_missing_everywhere() -> None:
    parsed = build_columns({"amount": np.array([1.0, 2.0])}, KINDS, 2)
    assert parsed.problems == {}
    assert np.isnan(parsed.columns["latency"]).all() and list(parsed.columns["method"]) == [None, None]


def test_reason_codes_are_one_enum_that_dead_letters_and_metrics_use() -> None:
    from prometheus_client import CollectorRegistry

    from worker.metrics import DEAD_LETTER_REASONS, WorkerMetrics
    from worker.records import DeadLetter, Record

    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    record = Record("t", 0, 1, None, b"{}")
    for reason in Reason:
        assert reason.value in DEAD_LETTER_REASONS
        metrics.record_dead_letter("t", reason)
        assert registry.get_sample_value("anomaly_dead_letters_total", {"topic": "t", "reason": reason.value}) == 1
        assert dict(DeadLetter(record, reason, "why").kafka_headers())["dlq.reason"] == reason.value.encode()


# The batch path of event_columns (one cast for all numeric fields) must give exactly what build_columns gives on
# the same values field by field, whatever the batch mixes: plain numbers (the fast path) and hostile values.
_PLAIN = st.one_of(st.none(), st.integers(-(10**6), 10**6), st.floats(-1e9, 1e9, allow_nan=False), st.booleans())
#: Values the one cast accepts although `number` gives them a problem or a meaning of its own.
_CAST_TRAPS = st.sampled_from([math.inf, -math.inf, math.nan, 10**400, " 12 ", "1e3", "nan", "-inf", "Infinity",
                               "1_000", "1e999", "NaN", " NULL ", "true", 10**20, 2**63 + 1])
_EVENTS = st.lists(st.dictionaries(st.sampled_from([*KINDS, "other"]), st.one_of(_PLAIN, _PLAIN, _CAST_TRAPS, _VALUES)),
                   max_size=8)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == object:
        return a.tolist() == b.tolist() and [type(v) for v in a.tolist()] == [type(v) for v in b.tolist()]
    return a.tobytes() == b.tobytes()


@settings(max_examples=400, deadline=None)
@given(_EVENTS, st.sampled_from([KINDS, {"amount": NUMERIC}, {"method": CATEGORICAL}, {"amount": NUMERIC,
                                                                                      "latency": NUMERIC}]))
def test_event_batches_parse_exactly_like_the_column_builder(events: list[dict[str, Any]],
                                                              kinds: dict[str, str]) -> None:
    got = event_columns(events, kinds)
    reference = build_columns({name: _objects(*[e.get(name) for e in events]) for name in kinds}, kinds, len(events))
    assert got.problems == reference.problems and got.rows == reference.rows
    assert list(got.columns) == list(reference.columns)
    assert all(_same(got.columns[name], reference.columns[name]) for name in kinds)


# --- instants: epoch seconds (UTC) in every format ----------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("2024-05-01", datetime(2024, 5, 1, tzinfo=UTC)),
    ("2024-05-01T12:30", datetime(2024, 5, 1, 12, 30, tzinfo=UTC)),
    ("2024-05-01 12:30:15", datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC)),
    ("2024-05-01T12:30:15.25Z", datetime(2024, 5, 1, 12, 30, 15, 250_000, tzinfo=UTC)),
    ("2024-05-01t12:30:15z", datetime(2024, 5, 1, 12, 30, 15, tzinfo=UTC)),
    ("2024-05-01T12:30:15.123456+02:00", datetime(2024, 5, 1, 10, 30, 15, 123_456, tzinfo=UTC)),
    ("2024-05-01T12:30:15-0530", datetime(2024, 5, 1, 18, 0, 15, tzinfo=UTC)),
    ("1969-12-31T23:59:59.5Z", datetime(1969, 12, 31, 23, 59, 59, 500_000, tzinfo=UTC)),
])
def test_iso_8601_text_in_a_numeric_field_is_its_epoch_seconds(text: str, expected: datetime) -> None:
    assert instant(text) == expected.timestamp()
    assert number(f" {text} ", "ts") == expected.timestamp()
    assert event_columns([{"ts": text}], {"ts": NUMERIC}).columns["ts"][0] == expected.timestamp()


@pytest.mark.parametrize("text", [
    "2024-02-30", "2024-13-01", "0000-01-01", "2024-5-1", "2024-05-01T", "2024-05-01T24:00", "2024-05-01T12:60",
    "2024-05-01T12:30:60", "2024-05-01Z", "2024-05-01T12:30+24:00", "2024-05-01T12:30:15.1234567890",
    "01/05/2024", "2024-05-01T12:30:15 UTC", "\u0662\u0660\u0662\u0664-05-01",
])
def test_text_that_is_not_a_strict_iso_instant_is_wrong_type(text: str) -> None:
    assert instant(text) is None
    got = number(text, "ts")
    assert isinstance(got, Invalid) and got.reason == Reason.WRONG_TYPE


def test_an_instant_is_one_category_whatever_its_form() -> None:
    """ISO text in a categorical field is the category of its epoch seconds, as a Parquet or Avro timestamp of the
    same instant is (issue 22: the text used to differ from a typed timestamp's)."""
    assert category(" 2024-05-01 ", "day") == category(1714521600.0, "day") == "1714521600"
    assert category("2024-05-01T12:00:00.5+00:00", "at") == category("2024-05-01T12:00:00.500Z", "at") == \
        category(1714564800.5, "at") == "1714564800.5"
    assert category("2024-13-01", "day") == "2024-13-01"  # not a date: text


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**63) + 1000, 2**63 - 1), st.sampled_from([1, 10**3, 10**6, 10**9]))
def test_epoch_seconds_rounds_ticks_once_like_integer_division(tick: int, per_second: int) -> None:
    got = epoch_seconds(np.array([tick, tick - tick % 1000]), per_second)
    assert got.tolist() == [tick / per_second, (tick - tick % 1000) / per_second]


_INSTANTS = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1),
                         timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                                    timezone(timedelta(hours=-8))]))


@settings(max_examples=300, deadline=None)
@given(_INSTANTS, st.sampled_from(["T", " "]), st.sampled_from(["auto", "seconds", "milliseconds", "microseconds"]))
def test_an_instant_is_one_number_from_iso_text_epoch_ticks_and_events(moment: datetime, sep: str,
                                                                       timespec: str) -> None:
    if timespec == "seconds":
        moment = moment.replace(microsecond=0)
    elif timespec == "milliseconds":
        moment = moment.replace(microsecond=moment.microsecond // 1000 * 1000)
    text = moment.isoformat(sep=sep, timespec=timespec)
    micros = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    expected = micros / 10**6
    assert instant(text) == expected == moment.timestamp()
    assert epoch_seconds(np.array([micros]), 10**6)[0] == expected
    assert epoch_seconds(np.array([micros * 1000]), 10**9)[0] == expected
    parsed = event_columns([{"ts": text, "n": 1}, {"ts": expected, "n": 2}], {"ts": NUMERIC, "n": NUMERIC})
    assert parsed.problems == {} and parsed.columns["ts"].tolist() == [expected, expected]
