"""Nested events under the data contract: one rule turns a nested object into fields, for every source.

A field of the contract may be a path into nested objects: ``{"flow": {"pkts_toserver": 3}}`` carries the
field ``flow.pkts_toserver``. The rule, applied to a decoded JSON event or JSON Lines row (`flatten`), an
Avro or Protobuf record and an Avro container file's rows (`plain_record`), and a Parquet struct column
(`training.data`, through pyarrow's ``flatten``, which names children the same way):

- an object's members become fields named ``<object field>.<member>``, at any depth; an empty object
  adds no field;
- a literal key that holds a dot (Zeek's ``id.orig_h``) is a field of that name, as before;
- a clash, the same name reached twice (``{"id": {"orig_h": ...}, "id.orig_h": ...}``), makes the record
  invalid: ``field_clash`` (a dead letter from a stream, a one-line error from a file), since which value
  is meant cannot be known;
- an array is one value: a feature field holding an array is ``wrong_type``; an array in a field the
  model does not use is ignored like any other extra field (training leaves array columns out).

Typed formats carry values JSON has no type for; `plain` gives each the JSON value it stands for, so a
row means the same from every source (docs/preprocessing.md has the table): timestamps and dates are
instants (epoch seconds, as ISO 8601 text is), a time of day is seconds since midnight, decimals are
numbers, bytes are base64 text (Protobuf's JSON form), UUIDs are text, enums are their symbol's text.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import numpy as np

SEPARATOR = "."
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_SCALARS = frozenset({str, int, float, bool, type(None)})


def is_nested(event: Mapping[str, Any]) -> bool:
    """Whether any member of `event` is an object (then `flatten` has work to do)."""
    return dict in map(type, event.values())  # in C: twice as fast as a generator over the values


class FieldClash(ValueError):
    """Two names of a nested object reach the same field (`field_clash`)."""

    def __init__(self, field: str) -> None:
        super().__init__(f"field {field!r} is given twice, as a key and as a path into nested objects; "
                         f"rename one of them")
        self.field = field


def flatten(event: dict[str, Any]) -> dict[str, Any]:
    """The fields of a decoded object under the nested rule (the object itself when nothing is nested), in the
    order the object names them. Raises `FieldClash` when a name is reached twice."""
    if not is_nested(event):
        return event
    out: dict[str, Any] = {}
    _into(out, event, "")
    return out


def _into(out: dict[str, Any], event: Mapping[str, Any], prefix: str) -> None:
    """Add `event`'s fields under `prefix` to `out` (a plain loop: faster than a comprehension merged in)."""
    for key, value in event.items():
        name = prefix + key
        if type(value) is dict:
            _into(out, value, name + SEPARATOR)
        elif name in out:
            raise FieldClash(name)
        else:
            out[name] = value


def plain_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record decoded from a typed format (Avro, Protobuf): `plain` values, then `flatten` (`FieldClash`)."""
    return flatten({str(key): plain(value) for key, value in record.items()})


def plain(value: Any) -> Any:
    """The JSON value a typed value stands for (see the module docstring); JSON values are returned as they are."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [plain(item) for item in value]
    if isinstance(value, datetime):
        return instant_of(value)
    if isinstance(value, date):
        return float((value - date(1970, 1, 1)).days * 86_400)
    if isinstance(value, time):
        micros = ((value.hour * 60 + value.minute) * 60 + value.second) * 10**6 + value.microsecond
        return micros / 10**6
    if isinstance(value, Decimal):
        return float(value)  # NaN stays NaN (missing), an infinity stays one (non_finite), as in JSON
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, np.generic):
        return plain(value.item())
    return value


def instant_of(value: datetime) -> float:
    """Epoch seconds of a datetime (naive = UTC), rounded once from whole microseconds, as text and Parquet are."""
    aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return ((aware - _EPOCH) // _MICROSECOND) / 10**6
