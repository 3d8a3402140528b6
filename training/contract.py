"""The data contract: what a value means, the same whether it comes from a file or a Kafka event.

One type policy turns raw values (CSV text, JSON Lines, Parquet, a decoded JSON event) into column
values, and one column builder applies it to a whole column at a time; files (`training/data.py`) and
events (`worker/pipeline.py`) both call it, so a row means the same thing on both paths.

=================  ==========================================================================
numeric field      finite number -> float; ``true``/``false`` (JSON booleans or that text, any
                   case) -> 1/0; text -> Python ``float()`` of the stripped text, else, if it
                   is an ISO 8601 date or date-time, its epoch seconds (`instant`); NA-like
                   text, null, NaN -> missing; infinite or too large -> ``non_finite``; other
                   text, arrays, objects -> ``wrong_type``.
categorical field  text with surrounding whitespace removed; NA-like text, null, NaN -> missing;
                   a number -> its text (80, 80.0 and the text "80.0" -> "80"); ISO 8601 text of an
                   instant -> the text of its epoch seconds; a boolean -> "true"/"false"; arrays,
                   objects -> ``wrong_type``.
a row or event     with no schema field present (all absent or missing) -> ``no_features``.
=================  ==========================================================================

NA-like text is `NA_STRINGS` after stripping whitespace: the list pandas reads as missing by default. An instant is
epoch seconds (UTC) in every format: from ISO 8601 text here, from Parquet timestamps and dates in
`training.data.raw_values` (both through `epoch_seconds`'s rounding). Users: docs/preprocessing.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from functools import lru_cache
from operator import itemgetter
from typing import Any, cast

import numpy as np
import orjson

from training.nested import FieldClash, flatten

NUMERIC = "numeric"
CATEGORICAL = "categorical"

#: Text that means "missing" in every column, compared after stripping surrounding whitespace.
NA_STRINGS = frozenset({
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
    "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
})
_BOOLEAN_TEXT = {"true": 1.0, "false": 0.0}
_WHOLE_NUMBER_TEXT = re.compile(r"-?\d+\.0+")
_TEXT_TYPES = frozenset({str, type(None)})


class Reason(StrEnum):
    """Why a record cannot be scored: the dead-letter reason codes, owned here and nowhere else."""

    INVALID_UTF8 = "invalid_utf8"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    OVERSIZED = "oversized"
    NO_FEATURES = "no_features"
    WRONG_TYPE = "wrong_type"
    NON_FINITE = "non_finite"
    PROCESSING_ERROR = "processing_error"
    #: A record with a null value: a deletion marker on a compacted topic, not an event. Dead-lettered (key and
    #: headers kept) under its own reason so it is counted apart from malformed events.
    TOMBSTONE = "tombstone"
    #: The same field reached twice in a nested event (training/nested.py).
    FIELD_CLASH = "field_clash"
    #: Registry value formats (training/value_formats.py): a record without the magic byte and schema id,
    #: a schema id the registry says does not exist, a payload that does not decode with its writer schema.
    NO_SCHEMA_ID = "no_schema_id"
    UNKNOWN_SCHEMA = "unknown_schema"
    UNDECODABLE = "undecodable"


@dataclass(frozen=True)
class Invalid:
    """Why one record or value breaks the contract: a reason code and a message naming the field."""

    reason: Reason
    message: str
    field: str | None = None


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return {"list": "array", "dict": "object", "tuple": "array"}.get(type(value).__name__, type(value).__name__)


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- one record: bytes -> JSON object (Kafka events and JSON Lines alike) ----------------------

_BOM = b"\xef\xbb\xbf"
#: Literals some producers write (Python's json, Jackson with ALLOW_NON_NUMERIC_NUMBERS) that JSON lacks.
_NON_FINITE_LITERAL = re.compile(r"\b(NaN|-?Infinity)\b")


def decode_event(value: bytes | None, max_bytes: int) -> dict[str, Any] | Invalid:
    """Parse one record value as a JSON object (UTF-8, an optional BOM, finite numbers, at most `max_bytes`),
    its nested objects flattened into fields (training/nested.py)."""
    if value is None:
        return Invalid(Reason.TOMBSTONE, "record has no value (tombstone); expected a JSON object")
    if len(value) > max_bytes:
        return Invalid(Reason.OVERSIZED, f"record value is {len(value)} bytes, the limit is {max_bytes}")
    if value.startswith(_BOM):
        value = value[len(_BOM):]
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return _why_not_json(value, exc)
    if not isinstance(event, dict):
        return Invalid(Reason.NOT_AN_OBJECT, f"expected a JSON object, got a JSON {json_type(event)}")
    return fields(event)


def fields(event: dict[str, Any]) -> dict[str, Any] | Invalid:
    """A decoded object's fields under the nested rule, or `field_clash`."""
    try:
        return flatten(event)
    except FieldClash as exc:
        return Invalid(Reason.FIELD_CLASH, str(exc), exc.field)


#: Records decoded together by `decode_events`; a chunk holding a bad record is decoded record by record.
_CHUNK = 100


def decode_events(values: Sequence[bytes | None], max_bytes: int) -> list[dict[str, Any] | Invalid]:
    """`decode_event` of each value: chunks of plain JSON objects in one orjson pass each, others value by value."""
    out: list[dict[str, Any] | Invalid] = []
    for start in range(0, len(values), _CHUNK):
        chunk = values[start:start + _CHUNK]
        objects = _plain_objects(chunk, max_bytes)
        out.extend([decode_event(value, max_bytes) for value in chunk] if objects is None else objects)
    return out


def _plain_objects(values: Sequence[bytes | None], max_bytes: int) -> list[dict[str, Any] | Invalid] | None:
    """The objects, if every value is bytes within `max_bytes` holding a JSON object (so no BOM: orjson refuses
    it), which is what `decode_event` gives them; else None."""
    if set(map(type, values)) != {bytes}:
        return None
    texts = cast("Sequence[bytes]", values)
    if max(map(len, texts)) > max_bytes:
        return None
    try:
        objects = list(map(orjson.loads, texts))
    except orjson.JSONDecodeError:
        return None
    if set(map(type, objects)) != {dict}:
        return None
    # A nested object needs a second brace: most flat events skip the per-member check in one C search.
    return [fields(event) if text.find(b"{", 1) != -1 else event for text, event in zip(texts, objects, strict=True)]


def _why_not_json(value: bytes, exc: orjson.JSONDecodeError) -> Invalid:
    """Name what orjson refused: bad UTF-8, a number out of range or a NaN/Infinity literal, or bad JSON."""
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as utf:
        return Invalid(Reason.INVALID_UTF8, f"record value is not valid UTF-8 at byte {utf.start}")
    if "infinity" in str(exc) or "exceeds" in str(exc):
        return Invalid(Reason.NON_FINITE, f"record value has a number out of range: {exc}")
    if _NON_FINITE_LITERAL.search(text):
        try:
            json.loads(text)
        except (ValueError, RecursionError):
            pass
        else:
            return Invalid(Reason.NON_FINITE, "record value holds a NaN or Infinity literal; numbers must be finite")
    return Invalid(Reason.INVALID_JSON, f"record value is not valid JSON: {exc}")


# --- one value ---------------------------------------------------------------------------------

#: Strict ISO 8601 (the RFC 3339 profile): a date, or a date and a time with an optional UTC offset.
_INSTANT_TEXT = re.compile(r"([0-9]{4}-[0-9]{2}-[0-9]{2})(?:[Tt ]([0-9]{2}):([0-9]{2})(?::([0-9]{2})"
                           r"(?:\.([0-9]{1,9}))?)?(?:[Zz]|([+-])([0-9]{2}):?([0-9]{2}))?)?")
_EPOCH_DAY = date(1970, 1, 1).toordinal()
_NANOS = 10**9


def instant(text: str) -> float | None:
    """Epoch seconds of ISO 8601 text (``2024-05-01``, ``2024-05-01T12:00:00.5+02:00``; no offset = UTC), or None.

    Computed from whole nanoseconds and rounded once, as `epoch_seconds` rounds Parquet ticks, so the same
    instant is the same float from text and from a timestamp column.
    """
    match = _INSTANT_TEXT.fullmatch(text)
    if match is None:
        return None
    day, hour, minute, second, fraction, sign, offset_hours, offset_minutes = match.groups()
    days = _epoch_day(day)
    if days is None:
        return None
    if hour is None:
        return float(days * 86_400)
    hours, minutes, seconds = int(hour), int(minute), int(second) if second else 0
    if hours > 23 or minutes > 59 or seconds > 59:
        return None
    whole = days * 86_400 + hours * 3_600 + minutes * 60 + seconds
    if sign:
        offset_h, offset_m = int(offset_hours), int(offset_minutes)
        if offset_h > 23 or offset_m > 59:
            return None
        whole += offset_h * 3_600 + offset_m * 60 if sign == "-" else -(offset_h * 3_600 + offset_m * 60)
    if not fraction:
        return float(whole)
    return (whole * _NANOS + int(fraction.ljust(9, "0"))) / _NANOS


@lru_cache(maxsize=4096)  # events of a stream share their days
def _epoch_day(text: str) -> int | None:
    """Days from 1970-01-01 to a ``YYYY-MM-DD`` date, or None if there is no such day (2023-02-29, year 0)."""
    try:
        return date.fromisoformat(text).toordinal() - _EPOCH_DAY
    except ValueError:
        return None


def epoch_seconds(ticks: np.ndarray, per_second: int) -> np.ndarray:
    """Integer ticks since the epoch (`per_second` of them a second) -> float seconds, each correctly rounded."""
    ticks = np.asarray(ticks, dtype=np.int64)
    while per_second > 1 and not (ticks % 1000).any():  # e.g. nanosecond columns holding whole microseconds
        ticks, per_second = ticks // 1000, per_second // 1000
    out = ticks.astype(np.float64) / per_second  # exact ticks, one rounding: correct below 2**53
    inexact = np.flatnonzero(np.abs(ticks) > 2**53)
    if inexact.size:
        out[inexact] = [tick / per_second for tick in ticks[inexact].tolist()]  # Python's int division rounds once
    return out


def number(value: Any, field: str) -> float | Invalid:
    """The numeric meaning of one raw value: a float (NaN = missing) or why it has none."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text in NA_STRINGS:
            return math.nan
        flag = _BOOLEAN_TEXT.get(text.lower())
        if flag is not None:
            return flag
    elif isinstance(value, list | dict | tuple | np.ndarray):
        return Invalid(Reason.WRONG_TYPE, f"field {field!r} must be a number, got {json_type(value)}", field)
    try:
        out = float(value)
    except OverflowError:
        return Invalid(Reason.NON_FINITE, f"field {field!r} is {_shown(value)}, out of the range of numbers", field)
    except (TypeError, ValueError):
        # Only text that is not a number is tried as an instant, so plain numbers keep the fast path.
        seconds = instant(value.strip()) if isinstance(value, str) else None
        if seconds is not None:
            return seconds
        return Invalid(Reason.WRONG_TYPE, f"field {field!r} must be a number, got {json_type(value)} {_shown(value)}",
                       field)
    if math.isinf(out):
        return Invalid(Reason.NON_FINITE, f"field {field!r} is {_shown(value)}, numbers must be finite", field)
    return out


def category(value: Any, field: str) -> str | None | Invalid:
    """The categorical meaning of one raw value: its text, None for missing, or why it has none."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in NA_STRINGS:
            return None
        # "80.0" is how many writers render the number 80 (pandas, Spark): the same category as 80 and 80.0.
        if _WHOLE_NUMBER_TEXT.fullmatch(text):
            return text.split(".", 1)[0]
        # An instant is one value in every format: ISO 8601 text is the category of its epoch seconds, as a
        # Parquet or Avro timestamp of the same instant is.
        if len(text) >= 10 and text[:4].isdigit() and (seconds := instant(text)) is not None:
            return category(seconds, field)
        return text
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | dict | tuple | np.ndarray):
        return Invalid(Reason.WRONG_TYPE, f"field {field!r} must be a string, got {json_type(value)}", field)
    if isinstance(value, np.generic):
        return category(value.item(), field)
    return str(value)


# --- one column --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """A column under the contract: values (float64 with NaN, or str/None) and the rows that break it."""

    values: np.ndarray
    problems: dict[int, Invalid]

    def missing(self) -> np.ndarray:
        """True where the value is missing (including rows with a problem)."""
        if self.values.dtype == np.float64:
            return np.isnan(self.values)
        return np.equal(self.values, None)  # type: ignore[call-overload]


def _as_objects(raw: np.ndarray | Sequence[Any]) -> np.ndarray:
    if isinstance(raw, np.ndarray) and raw.dtype == object:
        return raw
    out = np.empty(len(raw), dtype=object)
    out[:] = list(raw)
    return out


def numeric_column(raw: np.ndarray | Sequence[Any], field: str) -> Column:
    """`number` applied to every value; typed arrays and plain numbers take a vectorised path.

    The vectorised paths give exactly what `number` gives: an object array is converted with one
    `float()` per value in C, which agrees with `number` wherever it succeeds (NaN text is NA-like,
    infinities are caught below); anything it cannot convert falls back to `number` value by value.
    """
    array = raw if isinstance(raw, np.ndarray) else None
    if array is not None and array.dtype.kind in "biuf":
        values = array.astype(np.float64)
        bad = np.flatnonzero(np.isinf(values))
        problems = {int(i): Invalid(Reason.NON_FINITE, f"field {field!r} is {values[i]}, numbers must be finite", field)
                    for i in bad}
        values[bad] = np.nan
        return Column(values, problems)
    objects = _as_objects(raw)
    converted: np.ndarray | None
    try:
        converted = objects.astype(np.float64)
    except (TypeError, ValueError, OverflowError):
        converted = None
    if converted is not None:
        values = converted
        bad = np.flatnonzero(np.isinf(values))
        if bad.size == 0:
            return Column(values, {})
        problems = {}
        for i in bad.tolist():
            result = number(objects[i], field)
            problems[i] = result if isinstance(result, Invalid) else Invalid(
                Reason.NON_FINITE, f"field {field!r} is {_shown(objects[i])}, numbers must be finite", field)
            values[i] = math.nan
        return Column(values, problems)
    values = np.empty(len(objects), dtype=np.float64)
    problems = {}
    for i, value in enumerate(objects.tolist()):
        result = number(value, field)
        if isinstance(result, Invalid):
            problems[i] = result
            values[i] = math.nan
        else:
            values[i] = result
    return Column(values, problems)


def categorical_column(raw: np.ndarray | Sequence[Any], field: str) -> Column:
    """`category` applied to every value (text-only columns: once per distinct value)."""
    objects = _as_objects(raw)
    values = np.empty(len(objects), dtype=object)
    items = objects.tolist()
    if set(map(type, items)) <= _TEXT_TYPES:
        # The common case: text and nulls. Categories repeat, so each distinct value is parsed once.
        meaning = {value: category(value, field) for value in set(items)}
        values[:] = [meaning[value] for value in items]
        return Column(values, {})
    problems: dict[int, Invalid] = {}
    texts: list[str | None] = []
    for i, value in enumerate(items):
        result = category(value, field)
        if isinstance(result, Invalid):
            problems[i] = result
            result = None
        texts.append(result)
    values[:] = texts
    return Column(values, problems)


def parse_column(raw: np.ndarray | Sequence[Any], field: str, kind: str) -> Column:
    """The column builder: raw values of one field -> column values under the contract."""
    return numeric_column(raw, field) if kind == NUMERIC else categorical_column(raw, field)


def numeric_share(raw: np.ndarray | Sequence[Any]) -> float:
    """Share of the present values that are numbers under the contract (1.0 when none is present)."""
    column = numeric_column(raw, "")
    numbers = len(column.values) - int(np.isnan(column.values).sum())
    present = numbers + len(column.problems)
    return numbers / present if present else 1.0


# --- many columns: a file chunk or a batch of events -------------------------------------------

@dataclass(frozen=True)
class Columns:
    """Parsed columns of several rows, and per row the first contract problem in field order."""

    columns: dict[str, np.ndarray]
    problems: dict[int, Invalid]
    rows: int

    def valid_rows(self) -> np.ndarray:
        if not self.problems:
            return np.arange(self.rows)
        return np.setdiff1d(np.arange(self.rows), np.fromiter(self.problems, dtype=np.intp, count=len(self.problems)))

    def take(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The columns restricted to `rows`."""
        return {name: values[rows] for name, values in self.columns.items()}


def build_columns(raw: Mapping[str, np.ndarray | Sequence[Any]], kinds: Mapping[str, str], rows: int) -> Columns:
    """Parse every field with its kind; a row with a bad value, or with no field present, has a problem.

    `raw` maps field name to its raw values (a field absent from `raw` is missing in every row).
    """
    return _gather({name: parse_column(raw[name], name, kind) if name in raw else _absent(kind, rows)
                    for name, kind in kinds.items()}, rows)


def _absent(kind: str, rows: int) -> Column:
    return Column(np.full(rows, np.nan) if kind == NUMERIC else np.full(rows, None, dtype=object), {})


def _gather(parsed: Mapping[str, Column], rows: int) -> Columns:
    """Parsed columns (field order) -> `Columns`: per row the first problem, or `no_features` if nothing is present."""
    problems: dict[int, Invalid] = {}
    present = np.zeros(rows, dtype=bool)
    for column in parsed.values():
        for row, problem in column.problems.items():
            problems.setdefault(row, problem)
        present |= ~column.missing()
    if not present.all():
        names = list(parsed)
        empty = Invalid(Reason.NO_FEATURES, f"none of the model's {len(names)} fields has a value "
                                            f"(expected e.g. {', '.join(names[:3])})")
        for row in np.flatnonzero(~present).tolist():
            problems.setdefault(row, empty)
    return Columns(columns={name: column.values for name, column in parsed.items()},
                   problems=dict(sorted(problems.items())), rows=rows)


def event_columns(events: Sequence[Mapping[str, Any]], kinds: Mapping[str, str]) -> Columns:
    """Decoded JSON events -> parsed columns (an absent key is a missing value): `build_columns` of the batch.

    The numeric fields of the whole batch are cast to float in one numpy call, the cast `numeric_column`
    starts with; only fields where that cast fails or meets an infinity go through `numeric_column`, which
    then names the bad values. Either way each value gets what `number` gives it.
    """
    names = list(kinds)
    table = np.empty((len(events), len(names)), dtype=object)
    if events:
        table[:] = _field_values(events, names)
    numeric = [j for j, name in enumerate(names) if kinds[name] == NUMERIC]
    plain = _numbers(table, numeric) if numeric and events else {}
    return _gather({name: Column(plain[j], {}) if j in plain else parse_column(table[:, j], name, kinds[name])
                    for j, name in enumerate(names)}, len(events))


def _field_values(events: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[tuple[Any, ...]]:
    """Each event's values of `names` in order, None where a key is absent (C-level lookups, no Python loop)."""
    if len(names) > 1 and all(type(event) is dict for event in events):  # plain dicts: [] has no side effects
        try:
            return list(map(itemgetter(*names), events))
        except KeyError:  # some event lacks a field
            pass
    return [tuple(map(event.get, names)) for event in events]


def _numbers(table: np.ndarray, numeric: list[int]) -> dict[int, np.ndarray]:
    """Column -> float values, for the `numeric` columns of an object table if they all cast (the finite ones)."""
    try:
        values = table[:, numeric].astype(np.float64, order="F")  # order F: each column is contiguous
    except (TypeError, ValueError, OverflowError):
        return {}
    finite = ~np.isinf(values).any(axis=0)
    return {numeric[i]: values[:, i] for i in np.flatnonzero(finite).tolist()}
