"""docs/alert.schema.json describes what the worker publishes: every alert and summary the real pipeline and flood
control write validates, every property the schema declares is written by some alert, and a property the documents
carry that the schema lacks fails validation."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from tests.alert_schema import ALERT_SCHEMA_PATH, alert_schema, alert_validator, assert_valid_alerts, on_the_wire
from tests.unit.test_worker_pipeline import (
    _FIELD_VALUES,
    _JSON,
    _STAMP,
    _VALUE,
    GOOD,
    NOW,
    _dumps,
    interleaved,
    records,
    synthetic_frame,
)
from tests.unit.test_worker_pipeline import bundle as plain_bundle  # noqa: F401 - a fixture: numeric and categorical
from tests.unit.test_worker_windows import T0, events, records_of
from tests.unit.test_worker_windows import bundle as windowed_bundle  # noqa: F401 - a fixture: window features
from training.bundle import Bundle
from training.scoring import Contribution
from worker.alerts import build_alert
from worker.flood import FloodControl
from worker.pipeline import Pipeline
from worker.records import Alert, Record

HEADERS = ("trace", "tenant", "empty")
Document = dict[str, Any]


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = alert_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema" and schema["$id"]


def test_the_example_in_the_worker_docs_validates() -> None:
    page = (ALERT_SCHEMA_PATH.parent / "worker.md").read_text(encoding="utf-8")
    example = re.search(r"### The alert document.*?```json\n(.*?)```", page, re.S)
    assert example, "docs/worker.md shows an alert under 'The alert document'"
    assert_valid_alerts([json.loads(example[1])])


# -- what the worker writes -------------------------------------------------------------------------


def _outliers(n: int) -> list[dict[str, Any]]:
    """Events the plain model alerts on, with every kind of value its fields accept, missing ones included."""
    shapes: list[dict[str, Any]] = [
        {"amount": 1e7, "latency": -3000.0, "method": "PUT"},
        {"latency": 5000.0, "method": None},                      # absent and null: imputed
        {"amount": "NA", "latency": "5000", "method": "TRACE"},   # NA text, numeric text, unknown category
        {"amount": True, "latency": 5000, "method": 80},          # a boolean and numbers as they arrive
    ]
    return [shapes[i % len(shapes)] for i in range(n)]


def _keyed_records() -> list[Record]:
    """Outliers under every kind of key (text, none, empty, not UTF-8) and header, with entities of every type."""
    keys: list[bytes | None] = [b"host-7", None, b"", b"k\xff\xfe", b"\x00"]
    entities: list[Any] = ["10.0.0.5", 42, True, None, {"nested": 1}, [1], 2.5, "*"]
    out = []
    for i, event in enumerate(_outliers(16)):
        event = {**event, "id": [f"e{i}", i, True, 1.5, None][i % 5], "src": entities[i % len(entities)],
                 "timestamp": ["2024-05-01T12:00:00Z", 1e20, None, 1_714_564_800_500][i % 4]}
        headers = (("trace", f"t-{i}".encode()), ("tenant", b"\xff"), ("empty", None), ("other", b"x"))
        out.append(Record("events", i % 3, 100 + i, keys[i % len(keys)], orjson.dumps(event),
                          timestamp_ms=[1_700_000_000_000, None, -1][i % 3], headers=headers[:1 + i % 4]))
    return out


def _summaries(alerts: list[Alert]) -> list[Alert]:
    """What flood control publishes for `alerts` over two windows: the alerts it lets through, then summaries."""
    out = []
    for control in (FloodControl("src", cooldown_s=60, max_alerts_per_s=0),   # per-entity cooldown
                    FloodControl(None, cooldown_s=0, max_alerts_per_s=2)):     # global budget, no entity
        first = control.decide(alerts, now=NOW)
        control.apply(first)
        later = control.decide([], now=NOW + 120)
        assert later.summaries, "the fixture needs suppressed alerts"
        out += first.publish + later.summaries
    return out


def _direct() -> list[Alert]:
    """build_alert's own edges: no explanation, a non-positive threshold, event times out of range."""
    record = Record("t", 0, 5, None, b"{}", timestamp_ms=None)
    contributions = [Contribution("latency", 0.75, 900.0, 101.5).to_dict(),
                     Contribution("method", 0.25, "TRACE", "GET").to_dict()]
    return [build_alert(record, {"id": 2**63}, 2.0, 0.0, "m1", [], 0.0),
            build_alert(record, {"event_id": "x", "timestamp": "9999-12-31T23:59:59-12:00"}, 3.0, 1.0, "m1",
                        contributions, 1_700_000_001.0, entity_field="host", header_names=("absent",))]


@pytest.fixture(scope="module")
def produced(plain_bundle: Bundle, windowed_bundle: Bundle) -> dict[str, list[Document]]:  # noqa: F811
    """Alert documents by case, each written by the real pipeline (or flood control, or build_alert)."""
    plain = Pipeline(plain_bundle, max_event_bytes=512, top_features=3, clock=lambda: NOW)
    batch, _, _ = interleaved()  # good events (missing values, odd times) among bad records
    typical = records([orjson.dumps(e) for e in GOOD + synthetic_frame(n=100, seed=12).to_dict(orient="records")])
    keyed = Pipeline(plain_bundle, top_features=3, clock=lambda: NOW, entity_field="src",
                     alert_headers=HEADERS).process(_keyed_records()).alerts
    windowed = Pipeline(windowed_bundle, top_features=4)
    rows = events(300, seed=11, hosts=3) + [{"host": "10.0.0.1", "port": "22", "bytes": 9e6, "ts": T0 + 200.0 + i / 50}
                                            for i in range(40)] + [{"host": None, "port": None, "bytes": 9e6}]
    alerts = {
        "plain and categorical": plain.process(batch).alerts + plain.process(typical).alerts,
        "keys, headers and entities": keyed,
        "window features": [a for start, end in ((0, 150), (150, 340), (340, len(rows)))
                            for a in windowed.process(records_of(rows)[start:end]).alerts],
        "flood control": _summaries(keyed),
        "build_alert": _direct(),
    }
    for name, listed in alerts.items():
        assert listed, f"the {name!r} case needs alerts"
    return {name: [on_the_wire(a.document) for a in listed] for name, listed in alerts.items()}


CASES = ["plain and categorical", "keys, headers and entities", "window features", "flood control", "build_alert"]


@pytest.mark.parametrize("case", CASES)
def test_every_alert_written_validates(produced: dict[str, list[Document]], case: str) -> None:
    assert_valid_alerts(produced[case])


def test_the_cases_cover_what_the_document_can_hold(produced: dict[str, list[Document]]) -> None:
    """The cases above reach the variants the schema allows, so a variant that breaks the schema would fail them."""
    documents = [d for case in CASES for d in produced[case]]
    features = [f for d in documents for f in d.get("top_features", ())]
    values = {(key, type(v).__name__) for d in documents for key, v in d.items()} | {
        (f"top_features.{key}", type(v).__name__) for f in features for key, v in f.items()}
    for expected in [("event_id", "str"), ("event_id", "int"), ("event_id", "NoneType"), ("event_key", "NoneType"),
                     ("event_timestamp", "NoneType"), ("score_ratio", "NoneType"), ("entity", "NoneType"),
                     ("entity", "str"), ("top_features.observed", "NoneType"), ("top_features.observed", "str"),
                     ("top_features.observed", "bool"), ("top_features.observed", "float"),
                     ("top_features.observed", "int"), ("top_features.expected", "str"),
                     ("top_features.expected", "float"), ("top_features.text", "str")]:
        assert expected in values, f"no alert has {expected[0]} of type {expected[1]}"
    assert {d.get("type") for d in documents} == {None, "suppression_summary"}
    assert any(d.get("headers", {}).get("empty", "") is None for d in documents)
    summaries = [d for d in documents if d.get("type")]
    assert {d["entity_field"] for d in summaries} == {"src", None}
    assert {r for d in summaries for r in d["suppressed_by_reason"]} == {"cooldown", "rate_limit"}


#: Events that alert (a latency far out), with any value a field accepts in the others, any id and any time.
_SCALAR = _FIELD_VALUES.filter(lambda value: not isinstance(value, list | dict))
_ALERTING = st.fixed_dictionaries({"latency": st.floats(5e3, 1e12) | st.integers(5_000, 2**64)}, optional={
    "amount": _SCALAR, "method": _SCALAR, "timestamp": _FIELD_VALUES, "id": _JSON, "event_id": _JSON,
}).map(_dumps)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_ALERTING | _VALUE, _STAMP, st.none() | st.binary(max_size=6)), min_size=1, max_size=12))
def test_fuzzed_batches_write_only_valid_alerts(plain_bundle: Bundle,  # noqa: F811
                                                batch: list[tuple[bytes | None, int | None, bytes | None]]) -> None:
    pipeline = Pipeline(plain_bundle, max_event_bytes=512, top_features=3, clock=lambda: NOW, entity_field="amount",
                        alert_headers=("trace",))
    recs = [Record("events", 0, i, key, value, timestamp_ms=stamp, headers=(("trace", key),))
            for i, (value, stamp, key) in enumerate(batch)]
    assert_valid_alerts(a.document for a in pipeline.process(recs).alerts)


# -- drift: the schema and the document must change together ------------------------------------------


def _declared(schema: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(definition, property) of every property the schema's object definitions declare."""
    for name, definition in schema["$defs"].items():
        for prop in definition.get("properties", {}):
            yield name, prop


def _written(documents: list[Document], definition: str, prop: str) -> Document | None:
    """A document that writes `prop` where `definition` applies (a summary, an alert, its source or a feature)."""
    for document in documents:
        summary = document.get("type") == "suppression_summary"
        holders = {"suppression_summary": [document] if summary else [],
                   "alert": [] if summary else [document],
                   "source": [] if summary else [document["source"]],
                   "contribution": [] if summary else document["top_features"]}[definition]
        if any(prop in holder for holder in holders):
            return document
    return None


def test_every_declared_property_is_written_and_required_by_additional_properties_false(
        produced: dict[str, list[Document]]) -> None:
    """A property the schema declares but no alert writes is stale; one an alert writes that the schema lacks
    (simulated by deleting it from a copy of the schema) must fail validation."""
    documents = [d for case in CASES for d in produced[case]]
    schema = alert_schema()
    declared = list(_declared(schema))
    assert {d for d, _ in declared} == {"alert", "source", "contribution", "suppression_summary"}
    for definition, prop in declared:
        document = _written(documents, definition, prop)
        assert document is not None, f"the schema declares {definition}.{prop} but no alert writes it"
        assert alert_validator(schema).is_valid(document)
        drifted = copy.deepcopy(schema)
        del drifted["$defs"][definition]["properties"][prop]
        required = drifted["$defs"][definition].get("required", [])
        if prop in required:
            required.remove(prop)
        assert not alert_validator(drifted).is_valid(document), (
            f"an alert writing {definition}.{prop} still validates without it in the schema")


def test_a_document_with_an_undeclared_property_or_a_wrong_type_fails(produced: dict[str, list[Document]]) -> None:
    alert = produced["keys, headers and entities"][0]
    summary = next(d for d in produced["flood control"] if d.get("type"))
    validator = alert_validator()
    assert validator.is_valid(alert) and validator.is_valid(summary)
    for document in (alert, summary):
        assert not validator.is_valid({**document, "new_field": 1})
        assert not validator.is_valid({key: v for key, v in document.items() if key != "model_version"})
        assert not validator.is_valid({**document, "threshold": str(document["threshold"])})
    assert not validator.is_valid({**alert, "type": "suppression_summary"})
    assert not validator.is_valid({**alert, "detected_at": "2024-05-01 12:00:00"})
    window_feature = {"field": "win:host:2s:count", "share": 0.5, "observed": 47.0, "expected": 3.0}
    assert not validator.is_valid({**alert, "top_features": [window_feature]})  # a window feature says it in words
    with_text = {**window_feature, "text": "events from host h in the last 2s: 47, expected 3"}
    assert validator.is_valid({**alert, "top_features": [with_text]})
