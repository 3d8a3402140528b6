"""Pipeline.process: every record accounted for, missing values imputed, and parity with training scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from training.bundle import Bundle, load_bundle
from training.data import encode_frame
from training.features import NO_FEATURES, NON_FINITE, WRONG_TYPE
from training.model import FitConfig
from training.train import TrainConfig, train_frame
from worker.alerts import alert_id
from worker.decode import INVALID_JSON, INVALID_UTF8, NOT_AN_OBJECT, OVERSIZED, TOMBSTONE
from worker.pipeline import Pipeline
from worker.records import Record

FIELDS = ["amount", "latency", "method"]
TOPIC = "events"
NOW = 1_700_000_000.0


def synthetic_frame(n: int = 400, seed: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "amount": np.round(rng.lognormal(3.0, 1.0, n), 3),
        "latency": np.round(rng.normal(100.0, 10.0, n), 3),
        "method": rng.choice(["GET", "POST", "PUT"], n, p=[0.6, 0.3, 0.1]),
    })


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    out = tmp_path_factory.mktemp("pipeline") / "bundle"
    config = TrainConfig(fit=FitConfig(epochs=3, hidden=(8, 3), batch_size=64, seed=5), categorical=("method",))
    train_frame(synthetic_frame(), out, config, data_sha256="0" * 64, log=lambda _line: None)
    return load_bundle(out)


@pytest.fixture(scope="module")
def pipeline(bundle: Bundle) -> Pipeline:
    return Pipeline(bundle, max_event_bytes=512, top_features=2, clock=lambda: NOW)


def records(values: list[bytes | None], first_offset: int = 0) -> list[Record]:
    return [Record(TOPIC, 0, first_offset + i, f"k{i}".encode(), v, timestamp_ms=1_000) for i, v in enumerate(values)]


def as_json(events: list[dict]) -> list[bytes]:
    return [orjson.dumps(e) for e in events]


#: Scorable events: typical ones, missing values (absent or null), unknown category, and clear outliers.
GOOD = [
    {"id": "typical-1", "amount": 20.0, "latency": 101.0, "method": "GET"},
    {"id": "typical-2", "amount": 35.5, "latency": 95.0, "method": "POST", "extra": "ignored"},
    {"id": "absent-amount", "latency": 99.0, "method": "GET"},
    {"id": "null-latency", "amount": 18.0, "latency": None, "method": "PUT"},
    {"id": "null-method", "amount": 22.0, "latency": 100.0, "method": None},
    {"id": "only-method", "method": "GET"},
    {"id": "unknown-method", "amount": 20.0, "latency": 100.0, "method": "TRACE"},
    {"id": "int-values", "amount": 20, "latency": 100, "method": "GET"},
    {"id": "outlier-latency", "amount": 20.0, "latency": 5000.0, "method": "GET"},
    {"id": "outlier-both", "amount": 1e7, "latency": -3000.0, "method": "PUT"},
]
#: Unscorable records and the reason each must be dead-lettered with.
BAD = [
    (b'{"amount": 1', INVALID_JSON),
    (b'{"method": "\xff"}', INVALID_UTF8),
    (b'[{"amount": 1}]', NOT_AN_OBJECT),
    (None, TOMBSTONE),
    (b'{"unrelated": 1}', NO_FEATURES),
    (b'{"amount": "12"}', WRONG_TYPE),
    (b'{"amount": true, "latency": 1}', WRONG_TYPE),
    (b'{"method": ["GET"]}', WRONG_TYPE),
    (b'{"latency": 1e999}', NON_FINITE),
    (b'{"amount": 1.0, "pad": "' + b"x" * 600 + b'"}', OVERSIZED),
]


def interleaved() -> tuple[list[Record], list[int], dict[int, str]]:
    """GOOD and BAD mixed; returns the records, offsets of good events, and offset -> reason for bad ones."""
    values: list[bytes | None] = []
    good_offsets, bad_reasons = [], {}
    for i in range(max(len(GOOD), len(BAD))):
        if i < len(BAD):
            bad_reasons[len(values)] = BAD[i][1]
            values.append(BAD[i][0])
        if i < len(GOOD):
            good_offsets.append(len(values))
            values.append(orjson.dumps(GOOD[i]))
    return records(values), good_offsets, bad_reasons


def training_scores(bundle: Bundle, events: list[dict]) -> np.ndarray:
    """Scores the way anomaly-score computes them: a DataFrame (NaN = missing) through the training encoder."""
    frame = pd.DataFrame([{name: e.get(name) for name in FIELDS} for e in events], columns=FIELDS)
    frame[["amount", "latency"]] = frame[["amount", "latency"]].astype(float)
    return bundle.scorer.score(encode_frame(bundle.schema, frame, Path("<test>"))).score


def test_every_record_is_an_alert_or_normal_or_a_dead_letter(pipeline: Pipeline) -> None:
    batch, good_offsets, bad_reasons = interleaved()
    result = pipeline.process(batch)
    assert result.consumed == len(batch)
    assert result.scored == len(good_offsets)
    assert {d.record.offset: d.reason for d in result.dead_letters} == bad_reasons
    assert result.scored + len(result.dead_letters) == result.consumed
    alerted = {a.record.offset for a in result.alerts}
    assert alerted <= set(good_offsets)
    for letter in result.dead_letters:
        original = batch[letter.record.offset]
        assert letter.record is original  # original bytes and coordinates travel to the dead-letter topic
        assert letter.model_version == pipeline.bundle.version and letter.error
        headers = dict(letter.kafka_headers())
        assert headers["dlq.reason"] == letter.reason.encode()
        assert headers["dlq.source.offset"] == str(original.offset).encode()


def test_dead_letter_errors_name_the_problem(pipeline: Pipeline) -> None:
    result = pipeline.process(records([b'{"amount": "12"}', b'{"unrelated": 1}']))
    wrong, none = result.dead_letters
    assert "'amount'" in wrong.error and "number" in wrong.error
    assert "amount" in none.error  # names fields the model expects


def test_scores_match_training_scoring_on_the_same_rows(pipeline: Pipeline, bundle: Bundle) -> None:
    result = pipeline.process(records(as_json(GOOD)))
    expected = training_scores(bundle, GOOD)
    np.testing.assert_allclose(result.scores, expected, rtol=1e-6, atol=1e-9)


def test_parity_on_training_like_rows(pipeline: Pipeline, bundle: Bundle) -> None:
    frame = synthetic_frame(n=200, seed=11)
    events = frame.to_dict(orient="records")
    result = pipeline.process(records(as_json(events)))
    np.testing.assert_allclose(result.scores, training_scores(bundle, events), rtol=1e-6, atol=1e-9)


def test_alerts_exactly_for_scores_above_the_threshold(pipeline: Pipeline, bundle: Bundle) -> None:
    events = GOOD + synthetic_frame(n=100, seed=12).to_dict(orient="records")
    result = pipeline.process(records(as_json(events)))
    threshold = bundle.threshold.value
    above = {i for i, s in enumerate(result.scores) if s > threshold}
    assert {a.record.offset for a in result.alerts} == above
    assert 0 < len(above) < len(events), "the fixture needs both alerts and normal events"
    assert {"outlier-latency", "outlier-both"} <= {a.document["event_id"] for a in result.alerts}
    for a in result.alerts:
        assert a.document["score"] == pytest.approx(result.scores[a.record.offset], rel=1e-8)
        assert a.document["score"] > a.document["threshold"] == pytest.approx(threshold, rel=1e-8)
        assert a.document["detected_at"] == "2023-11-14T22:13:20.000+00:00"  # the injected clock


def test_missing_and_null_fields_are_counted_and_imputed(pipeline: Pipeline, bundle: Bundle) -> None:
    result = pipeline.process(records(as_json(GOOD)))
    # absent-amount, only-method -> amount; null-latency, only-method -> latency; null-method -> method
    assert result.missing == {"amount": 2, "latency": 2, "method": 1}
    impute = {f.name: f.impute for f in bundle.schema.fields}
    filled = [{**e, **{k: impute[k] for k in FIELDS if e.get(k) is None}} for e in GOOD]
    np.testing.assert_allclose(result.scores, training_scores(bundle, filled), rtol=1e-6, atol=1e-9)


def test_alert_ids_are_deterministic(pipeline: Pipeline, bundle: Bundle) -> None:
    batch, _, _ = interleaved()
    first = pipeline.process(batch)
    again = Pipeline(bundle, max_event_bytes=512, top_features=2, clock=lambda: NOW + 60).process(batch)
    assert first.alerts, "the fixture needs alerts"
    assert [a.alert_id for a in first.alerts] == [a.alert_id for a in again.alerts]
    for a in first.alerts:
        assert a.alert_id == alert_id(bundle.version, a.record) == a.document["alert_id"]
        assert a.document["source"] == {"topic": TOPIC, "partition": 0, "offset": a.record.offset}
    # The id depends on where the record is, not on its position in the batch.
    shifted = pipeline.process(batch[3:])
    assert {a.alert_id for a in shifted.alerts} == {a.alert_id for a in first.alerts if a.record.offset >= 3}


def test_top_features_are_folded_by_field_name_with_observed_and_expected(bundle: Bundle) -> None:
    pipeline = Pipeline(bundle, top_features=3, clock=lambda: NOW)
    events = [{"id": "x", "amount": 20.0, "latency": 5000.0, "method": "TRACE"},
              {"id": "y", "amount": None, "latency": -800.0, "method": "GET"}]
    result = pipeline.process(records(as_json(events)))
    assert len(result.alerts) == 2
    schema = bundle.schema
    scores = bundle.scorer.score(encode_frame(schema, pd.DataFrame(
        [{k: e[k] for k in FIELDS} for e in events], dtype=object).astype({"amount": float, "latency": float}),
        Path("<test>")))
    for row, (alert, event) in enumerate(zip(result.alerts, events, strict=True)):
        top = alert.document["top_features"]
        errors = scores.field_errors[row]
        # One entry per schema field (the one-hot columns of "method" folded into one), largest share first.
        assert [t["field"] for t in top] == [schema.names[j] for j in np.argsort(-errors)]
        assert sum(t["share"] for t in top) == pytest.approx(1.0, abs=1e-5)
        for t in top:
            j = schema.names.index(t["field"])
            assert t["share"] == pytest.approx(errors[j] / errors.sum(), abs=1e-6)
            assert t["observed"] == event[t["field"]]
            block = scores.reconstruction[row, schema.slices()[j]]
            field = schema.fields[j]
            if t["field"] == "method":
                assert t["expected"] == field.decode(block)[0]
                assert t["expected"] in (*field.vocabulary, "<unknown>")
            else:
                assert t["expected"] == pytest.approx(field.decode(block)[0], rel=1e-5)


def test_batch_of_only_bad_records(pipeline: Pipeline) -> None:
    result = pipeline.process(records([b"nope", None]))
    assert result.consumed == 2 and result.scored == 0 and not result.alerts
    assert [d.reason for d in result.dead_letters] == [INVALID_JSON, TOMBSTONE]


def test_one_model_call_per_batch(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = pipeline.scorer.score
    monkeypatch.setattr(pipeline.scorer, "score", lambda m: calls.append(m.shape) or real(m))
    pipeline.process(records(as_json(GOOD * 5)))
    assert calls == [(len(GOOD) * 5, pipeline.bundle.schema.width)]
