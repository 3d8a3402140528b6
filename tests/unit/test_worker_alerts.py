"""Alert documents: deterministic ids, source coordinates, event time and explanations."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from training.scoring import Contribution
from worker.alerts import ALERT_SCHEMA_VERSION, alert_id, build_alert, event_time
from worker.records import Record

RECORD = Record(topic="events", partition=2, offset=41, key=b"host-7", value=b"{}", timestamp_ms=1_700_000_000_123)
CONTRIBUTIONS = [Contribution(field="latency", share=0.75, observed=900.0, expected=101.5),
                 Contribution(field="method", share=0.2500004, observed="TRACE", expected="GET")]


def test_alert_id_depends_only_on_model_and_source_coordinates() -> None:
    same = Record(topic="events", partition=2, offset=41, key=None, value=b"other bytes", timestamp_ms=None)
    assert alert_id("m1", RECORD) == alert_id("m1", same) == "m1/events/2/41"
    assert alert_id("m2", RECORD) != alert_id("m1", RECORD)
    assert alert_id("m1", RECORD) != alert_id("m1", Record("events", 2, 42, None, None))
    assert alert_id("m1", RECORD) != alert_id("m1", Record("events", 1, 41, None, None))


@pytest.mark.parametrize("value, expected", [
    ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()),
    ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()),
    ("2024-05-01T12:00:00", datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()),  # naive = UTC
    (1_714_564_800, 1_714_564_800.0),              # epoch seconds
    (1_714_564_800_500, 1_714_564_800.5),          # epoch milliseconds
    (1_714_564_800.25, 1_714_564_800.25),
])
def test_event_time_from_the_event(value: object, expected: float) -> None:
    assert event_time({"timestamp": value}, RECORD) == pytest.approx(expected)


@pytest.mark.parametrize("event", [{}, {"timestamp": "yesterday"}, {"timestamp": True}, {"timestamp": None}])
def test_event_time_falls_back_to_the_record_timestamp(event: dict) -> None:
    assert event_time(event, RECORD) == pytest.approx(1_700_000_000.123)


def test_event_time_is_none_without_any_timestamp() -> None:
    assert event_time({}, Record("t", 0, 0, None, b"{}", timestamp_ms=None)) is None
    assert event_time({}, Record("t", 0, 0, None, b"{}", timestamp_ms=-1)) is None


def test_alert_document() -> None:
    event = {"id": "evt-9", "timestamp": "2024-05-01T12:00:00Z", "latency": 900.0, "method": "TRACE"}
    alert = build_alert(RECORD, event, score=12.3456789012, threshold=2.0, model_version="m1",
                        top_features=[c.to_dict() for c in CONTRIBUTIONS], detected_at=1_714_564_801.5)
    assert alert.alert_id == "m1/events/2/41"
    assert alert.record is RECORD
    assert alert.event_time_s == pytest.approx(datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp())
    doc = alert.document
    assert doc == {
        "alert_id": "m1/events/2/41",
        "schema_version": ALERT_SCHEMA_VERSION,
        "model_version": "m1",
        "event_id": "evt-9",
        "event_key": "host-7",
        "source": {"topic": "events", "partition": 2, "offset": 41},
        "event_timestamp": "2024-05-01T12:00:00.000+00:00",
        "detected_at": "2024-05-01T12:00:01.500+00:00",
        "score": 12.3456789,
        "threshold": 2.0,
        "score_ratio": 6.17284,
        "top_features": [
            {"field": "latency", "share": 0.75, "observed": 900.0, "expected": 101.5},
            {"field": "method", "share": 0.25, "observed": "TRACE", "expected": "GET"},
        ],
    }
    assert orjson.loads(orjson.dumps(doc)) == doc  # serialisable as is


def test_alert_document_is_deterministic_apart_from_detection_time() -> None:
    event = {"event_id": 17, "latency": 900.0}
    first = build_alert(RECORD, event, 5.0, 1.0, "m1", [c.to_dict() for c in CONTRIBUTIONS], detected_at=1.0).document
    again = build_alert(RECORD, event, 5.0, 1.0, "m1", [c.to_dict() for c in CONTRIBUTIONS], detected_at=2.0).document
    assert first.pop("detected_at") != again.pop("detected_at")
    assert first == again
    assert first["event_id"] == 17


@pytest.mark.parametrize("event, expected", [
    ({"id": 3}, 3), ({"event_id": "x"}, "x"), ({"id": True}, None), ({"id": [1]}, None), ({}, None),
])
def test_event_id_only_when_a_string_or_integer(event: dict, expected: object) -> None:
    assert build_alert(RECORD, event, 2.0, 1.0, "m", [], 0.0).document["event_id"] == expected


def test_keyless_record_and_undecodable_key() -> None:
    keyless = Record("t", 0, 5, None, b"{}", None)
    doc = build_alert(keyless, {}, 2.0, 1.0, "m", [], 0.0).document
    assert doc["event_key"] is None and doc["event_timestamp"] is None
    odd = Record("t", 0, 5, b"k\xff", b"{}", None)
    assert build_alert(odd, {}, 2.0, 1.0, "m", [], 0.0).document["event_key"] == "k\ufffd"


def test_score_ratio_absent_for_a_non_positive_threshold() -> None:
    assert build_alert(RECORD, {}, 2.0, 0.0, "m", [], 0.0).document["score_ratio"] is None


def test_keys_of_any_bytes_selected_headers_and_log_append_time() -> None:
    record = Record(topic="events", partition=0, offset=3, key=b"\x00\xff\xfe", value=b"{}",
                    timestamp_ms=1_700_000_000_000, headers=(("trace", b"t-1"), ("secret", b"x"), ("none", None)),
                    timestamp_type=1)
    alert = build_alert(record, {}, score=3.0, threshold=1.0, model_version="m1", top_features=[],
                        detected_at=1_700_000_001.0, header_names=("trace", "none", "absent"))
    doc = alert.document
    assert doc["event_key_base64"] == "AP/+" and doc["headers"] == {"trace": "t-1", "none": None}
    assert doc["event_timestamp"] == "2023-11-14T22:13:20.000+00:00"  # the broker's append time
    plain = build_alert(RECORD, {}, 3.0, 1.0, "m1", [], 1_700_000_001.0)
    assert "event_key_base64" not in plain.document and "headers" not in plain.document


@pytest.mark.parametrize("event, record_ms, expected", [
    ({"timestamp": 1e20}, 1_700_000_000_000, 1_700_000_000.0),           # absurd field: the record's time
    ({"timestamp": "9999-12-31T23:59:59Z"}, 1_700_000_000_000, 1_700_000_000.0),  # past the range
    ({}, 1, 0.001),                                                      # a 1970 record timestamp
])
def test_very_old_and_future_timestamps_never_break_an_alert(event: dict, record_ms: int | None,
                                                              expected: float) -> None:
    record = Record("events", 0, 1, None, b"{}", timestamp_ms=record_ms)
    assert event_time(event, record) == pytest.approx(expected)
    alert = build_alert(record, event, 3.0, 1.0, "m1", [], 1_700_000_001.0)
    orjson.dumps(alert.document)
