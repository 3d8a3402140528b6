"""Record bytes -> event object, or the reason it is not one."""

from __future__ import annotations

from typing import Any

import orjson

from training.features import NON_FINITE, Invalid, json_type

INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
OVERSIZED = "oversized"
#: A record with a null value: a deletion marker on a compacted topic, not an event. Dead-lettered (key and
#: headers kept) under its own reason so it is counted apart from malformed events.
TOMBSTONE = "tombstone"


def decode(value: bytes | None, max_bytes: int) -> dict[str, Any] | Invalid:
    """Parse one record value as a JSON object (UTF-8, finite numbers, at most `max_bytes`)."""
    if value is None:
        return Invalid(TOMBSTONE, "record has no value (tombstone); expected a JSON object")
    if len(value) > max_bytes:
        return Invalid(OVERSIZED, f"record value is {len(value)} bytes, the limit is {max_bytes}")
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as utf:
            return Invalid(INVALID_UTF8, f"record value is not valid UTF-8 at byte {utf.start}")
        if "infinity" in str(exc):
            return Invalid(NON_FINITE, f"record value has a number out of range: {exc}")
        return Invalid(INVALID_JSON, f"record value is not valid JSON: {exc}")
    if not isinstance(event, dict):
        return Invalid(NOT_AN_OBJECT, f"expected a JSON object, got a JSON {json_type(event)}")
    return event
