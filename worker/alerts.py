"""The alert document: deterministic id, source coordinates, score, threshold and the explaining features."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from worker.records import Alert, Record

#: Bump when the alert document changes shape, so consumers can tell.
ALERT_SCHEMA_VERSION = 1


def alert_id(model_version: str, record: Record) -> str:
    """Same model + same record -> same id, so a replay after a rebalance or crash is recognisable."""
    return f"{model_version}/{record.topic}/{record.partition}/{record.offset}"


#: Event times outside what an ISO timestamp can show (years 1..9999) are treated as absent.
_MIN_S = datetime(1, 1, 2, tzinfo=UTC).timestamp()
_MAX_S = datetime(9999, 12, 30, tzinfo=UTC).timestamp()


def event_time(event: Mapping[str, Any], record: Record) -> float | None:
    """Event time in epoch seconds: the event's `timestamp` (ISO-8601, epoch s or ms), else the record's.

    Total: a timestamp that cannot be read or lies outside years 1..9999 is ignored, never an error.
    """
    when = _plausible(_event_timestamp(event.get("timestamp")))
    if when is None and record.timestamp_ms is not None and record.timestamp_ms >= 0:
        when = _plausible(record.timestamp_ms / 1000.0)
    return when


def _event_timestamp(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            return None
        return seconds / 1000.0 if abs(seconds) > 1e11 else seconds
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
        except (ValueError, OverflowError, OSError):
            return None
    return None


def _plausible(seconds: float | None) -> float | None:
    return seconds if seconds is not None and math.isfinite(seconds) and _MIN_S <= seconds <= _MAX_S else None


def _key_text(key: bytes | None) -> str | None:
    return None if key is None else key.decode("utf-8", "replace")


def _key_base64(key: bytes | None) -> str | None:
    """Keys are any bytes: where they are not UTF-8 text, the alert carries them exactly, in base64."""
    if key is None:
        return None
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(key).decode("ascii")
    return None


def selected_headers(record: Record, names: Sequence[str]) -> dict[str, str | None]:
    """The input record's headers named in `names` (last value wins), as text, for the alert document."""
    wanted = set(names)
    return {name: None if value is None else value.decode("utf-8", "replace")
            for name, value in record.headers if name in wanted}


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else _iso_text(seconds)


@lru_cache(maxsize=1024)
def _iso_text(seconds: float) -> str:
    # Cached: every alert of a batch has the same detected_at, and formatting a datetime costs more than a dict.
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def build_alert(record: Record, event: Mapping[str, Any], score: float, threshold: float, model_version: str,
                top_features: Sequence[Mapping[str, Any]], detected_at: float, entity_field: str | None = None,
                header_names: Sequence[str] = ()) -> Alert:
    """Assemble one alert. `top_features` are the explaining fields as documents (`Contribution.to_dict`, or
    `Scorer.explain_documents` for a batch); `detected_at` is epoch seconds; `entity_field` names the event
    field that says which entity (host, account) the alert is about, for flood control and for the reader;
    `header_names` are input record headers copied into the document."""
    when = event_time(event, record)
    ident = alert_id(model_version, record)
    event_id = event.get("id", event.get("event_id"))
    document = {
        "alert_id": ident,
        "schema_version": ALERT_SCHEMA_VERSION,
        "model_version": model_version,
        "event_id": event_id if isinstance(event_id, str | int) and not isinstance(event_id, bool) else None,
        "event_key": _key_text(record.key),
        "source": {"topic": record.topic, "partition": record.partition, "offset": record.offset},
        "event_timestamp": _iso(when),
        "detected_at": _iso(detected_at),
        "score": float(f"{score:.9g}"),
        "threshold": float(f"{threshold:.9g}"),
        "score_ratio": float(f"{score / threshold:.6g}") if threshold > 0 else None,
        "top_features": list(top_features),
    }
    if entity_field is not None:
        entity = event.get(entity_field)
        document["entity"] = None if entity is None or isinstance(entity, dict | list) else str(entity)
    if (key_base64 := _key_base64(record.key)) is not None:
        document["event_key_base64"] = key_base64
    if header_names:
        document["headers"] = selected_headers(record, header_names)
    return Alert(alert_id=ident, record=record, document=document, event_time_s=when)
