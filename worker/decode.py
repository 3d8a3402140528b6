"""Record bytes -> event object, or the reason it is not one."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from training.contract import Invalid, Reason, json_type

_BOM = b"\xef\xbb\xbf"
#: Literals some producers write (Python's json, Jackson with ALLOW_NON_NUMERIC_NUMBERS) that JSON lacks.
_NON_FINITE_LITERAL = re.compile(r"\b(NaN|-?Infinity)\b")


def decode(value: bytes | None, max_bytes: int) -> dict[str, Any] | Invalid:
    """Parse one record value as a JSON object (UTF-8, an optional BOM, finite numbers, at most `max_bytes`)."""
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
    return event


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
