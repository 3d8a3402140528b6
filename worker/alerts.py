"""The alert document: deterministic id, source coordinates, score, threshold and the explaining features."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from training.scoring import Contribution
from worker.records import Alert, Record

#: Bump when the alert document changes shape, so consumers can tell.
ALERT_SCHEMA_VERSION = 1


def alert_id(model_version: str, record: Record) -> str:
    """Same model + same record -> same id, so a replay after a rebalance or crash is recognisable."""
    return f"{model_version}/{record.topic}/{record.partition}/{record.offset}"


def event_time(event: Mapping[str, Any], record: Record) -> float | None:
    """Event time in epoch seconds: the event's `timestamp` (ISO-8601, epoch s or ms), else the record's."""
    value = event.get("timestamp")
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) / 1000.0 if value > 1e11 else float(value)
        if _representable(seconds):
            return seconds
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
        if parsed is not None:
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    if record.timestamp_ms is not None and record.timestamp_ms >= 0:
        return record.timestamp_ms / 1000.0
    return None


def _representable(seconds: float) -> bool:
    """A time an ISO-8601 date can show (years 1-9999); a producer's clock or field may be anything."""
    return math.isfinite(seconds) and -62_135_596_800 <= seconds < 253_402_300_800


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


def _iso(seconds: float | None) -> str | None:
    if seconds is None or not _representable(seconds):
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def selected_headers(record: Record, names: Sequence[str]) -> dict[str, str | None]:
    """The input record's headers named in `names` (last value wins), as text, for the alert document."""
    wanted = set(names)
    return {name: None if value is None else value.decode("utf-8", "replace")
            for name, value in record.headers if name in wanted}


def build_alert(record: Record, event: Mapping[str, Any], score: float, threshold: float, model_version: str,
                contributions: Sequence[Contribution], detected_at: float, header_names: Sequence[str] = ()) -> Alert:
    """Assemble one alert; `detected_at` is epoch seconds; `header_names` are input headers to copy in."""
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
        "top_features": [c.to_dict() for c in contributions],
    }
    if (key_base64 := _key_base64(record.key)) is not None:
        document["event_key_base64"] = key_base64
    if header_names:
        document["headers"] = selected_headers(record, header_names)
    return Alert(alert_id=ident, record=record, document=document, event_time_s=when)
