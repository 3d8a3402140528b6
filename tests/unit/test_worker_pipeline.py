"""Pipeline.process: every record accounted for, missing values imputed, and parity with training scoring."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.bundle import Bundle, load_bundle
from training.contract import Reason
from training.data import encode_frame
from training.model import FitConfig
from training.train import TrainConfig, train_frame
from worker.alerts import alert_id
from worker.errors import ModelFailure
from worker.pipeline import Pipeline, settle_heap
from worker.records import Record

INVALID_JSON, INVALID_UTF8, NOT_AN_OBJECT = Reason.INVALID_JSON, Reason.INVALID_UTF8, Reason.NOT_AN_OBJECT
OVERSIZED, NO_FEATURES = Reason.OVERSIZED, Reason.NO_FEATURES
WRONG_TYPE, NON_FINITE = Reason.WRONG_TYPE, Reason.NON_FINITE

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
    {"id": "numeric-text", "amount": " 20.5", "latency": "101", "method": "GET"},
    {"id": "na-text", "amount": "NA", "latency": 99.0, "method": "None"},
    {"id": "far-future", "amount": 20.0, "latency": 100.0, "method": "GET", "timestamp": "9999-12-31T23:59:59-12:00"},
    {"id": "huge-epoch", "amount": 20.0, "latency": 5000.0, "method": "GET", "timestamp": 1e20},
    {"id": "ancient-epoch", "amount": 20.0, "latency": 5000.0, "method": "GET", "timestamp": -1e12},
    {"id": "outlier-latency", "amount": 20.0, "latency": 5000.0, "method": "GET"},
    {"id": "outlier-both", "amount": 1e7, "latency": -3000.0, "method": "PUT"},
]
#: Unscorable records and the reason each must be dead-lettered with.
BAD = [
    (b'{"amount": 1', INVALID_JSON),
    (b'{"method": "\xff"}', INVALID_UTF8),
    (b'[{"amount": 1}]', NOT_AN_OBJECT),
    (None, Reason.TOMBSTONE),
    (b'{"unrelated": 1}', NO_FEATURES),
    (b'{"amount": null, "latency": null, "method": null}', NO_FEATURES),
    (b'{"amount": "NA", "method": "n/a"}', NO_FEATURES),
    (b'{"amount": "12 ms"}', WRONG_TYPE),
    (b'{"amount": {"value": 1}}', NO_FEATURES),  # an object is its members' fields (amount.value), amount is absent
    (b'{"amount": 1, "x": {"amount": 2}, "x.amount": 3}', Reason.FIELD_CLASH),
    (b'{"method": ["GET"]}', WRONG_TYPE),
    (b'{"latency": 1e999}', NON_FINITE),
    (b'{"latency": NaN, "amount": 1}', NON_FINITE),
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
    frame = pd.DataFrame([{name: e.get(name) for name in FIELDS} for e in events], columns=FIELDS, dtype=object)
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
    result = pipeline.process(records([b'{"amount": "12 ms"}', b'{"unrelated": 1}']))
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
    # absent-amount, only-method, na-text -> amount; null-latency, only-method -> latency;
    # null-method, na-text -> method
    assert result.missing == {"amount": 3, "latency": 2, "method": 2}
    impute = {f.name: f.impute for f in bundle.schema.fields}
    filled = [{**e, **{k: impute[k] for k in FIELDS if e.get(k) in (None, "NA", "None")}} for e in GOOD]
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
    assert [d.reason for d in result.dead_letters] == [INVALID_JSON, Reason.TOMBSTONE]


def test_one_model_call_per_batch(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = pipeline.scorer.score
    monkeypatch.setattr(pipeline.scorer, "score", lambda m: calls.append(m.shape) or real(m))
    pipeline.process(records(as_json(GOOD * 5)))
    assert calls == [(len(GOOD) * 5, pipeline.bundle.schema.width)]


# --- no record can stop the stream ----------------------------------------------------------------

def test_out_of_range_times_do_not_stop_the_batch(pipeline: Pipeline) -> None:
    # Issue 7, poison pill: these raised out of process() and stalled the partition.
    events = [{"id": f"t{i}", "amount": 20.0, "latency": 5000.0, "method": "GET", "timestamp": ts}
              for i, ts in enumerate(["9999-12-31T23:59:59-12:00", 1e20, -1e12, "0001-01-01T00:00:00+14:00", 10**30])]
    batch = [Record(TOPIC, 0, i, None, json.dumps(e).encode(), timestamp_ms=stamp)
             for i, (e, stamp) in enumerate(zip(events, [2**62, -(2**62), 2**62, 0, None], strict=True))]
    result = pipeline.process(batch)
    assert len(result.alerts) == len(events) and not result.dead_letters
    assert result.alerts[3].document["event_timestamp"] == "1970-01-01T00:00:00.000+00:00"  # record time 0
    assert [a.document["event_timestamp"] for a in result.alerts[:3]] == [None, None, "1938-04-24T22:13:20.000+00:00"]


def test_a_record_whose_alert_cannot_be_built_is_a_processing_error(pipeline: Pipeline,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.pipeline as module

    real = module.build_alert

    def build(record: Record, event: dict, *args: object) -> object:
        if event.get("id") == "outlier-latency":
            raise RuntimeError("boom")
        return real(record, event, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(module, "build_alert", build)
    result = pipeline.process(records(as_json(GOOD)))
    (letter,) = result.dead_letters
    assert letter.reason == Reason.PROCESSING_ERROR and letter.error.endswith("RuntimeError: boom")
    assert orjson.loads(letter.record.value or b"")["id"] == "outlier-latency"
    assert "outlier-both" in {a.document["event_id"] for a in result.alerts}


def test_settle_heap_freezes_what_is_alive_and_frees_what_died_since_the_last_call() -> None:
    class Model:
        pass

    model = Model()
    model.cycle = model  # type: ignore[attr-defined]  # garbage only the cyclic collector can free
    gone = weakref.ref(model)
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        del model
        gc.collect()
        assert gone() is not None  # frozen: full collections no longer walk it
        settle_heap()  # e.g. after a model reload
        assert gone() is None
    finally:
        gc.unfreeze()


def test_a_batch_that_fails_as_a_whole_is_bisected_to_the_offending_record(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    real = pipeline.scorer.score
    poison = 123.456

    def score(matrix: np.ndarray) -> object:
        if np.isclose(matrix, (poison - pipeline.bundle.schema.fields[1].center)  # type: ignore[union-attr]
                      / pipeline.bundle.schema.fields[1].scale).any():  # type: ignore[union-attr]
            raise ValueError("cannot score this row")
        return real(matrix)

    monkeypatch.setattr(pipeline.scorer, "score", score)
    events = [{"id": str(i), "amount": 20.0, "latency": poison if i == 6 else 100.0, "method": "GET"} for i in range(9)]
    result = pipeline.process(records(as_json(events)))
    assert result.isolated == 1 and result.consumed == 9 and result.scored == 8
    (letter,) = result.dead_letters
    assert letter.record.offset == 6 and letter.reason == Reason.PROCESSING_ERROR
    assert "ValueError: cannot score this row" in letter.error


def test_a_model_that_fails_on_every_row_stops_the_worker_instead_of_dead_lettering_the_stream(
        pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(matrix: np.ndarray) -> object:
        raise RuntimeError("model is gone")

    monkeypatch.setattr(pipeline.scorer, "score", broken)
    with pytest.raises(ModelFailure, match="known-good row"):
        pipeline.process(records(as_json(GOOD[:4])))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6)
_FIELD_VALUES = _JSON | st.sampled_from(["NA", "None", "", " 12 ", "true", "9999-12-31T23:59:59-12:00", 1e20, -1e12,
                                         10**30, "GET", "TRACE"])


def _dumps(value: object) -> bytes:
    return json.dumps(value).encode()


_EVENT = st.fixed_dictionaries({}, optional={
    "amount": _FIELD_VALUES, "latency": _FIELD_VALUES, "method": _FIELD_VALUES, "timestamp": _FIELD_VALUES,
    "id": _JSON})
_VALUE = st.one_of(st.none(), st.binary(max_size=40), _EVENT.map(_dumps), _JSON.map(_dumps),
                   st.just(b'{"amount": NaN}'), st.just(b"\xef\xbb\xbf{}"))
_STAMP = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(_VALUE, _STAMP), min_size=1, max_size=12))
def test_fuzz_process_never_raises_and_accounts_for_every_record(
        pipeline: Pipeline, batch: list[tuple[bytes | None, int | None]]) -> None:
    recs = [Record(TOPIC, 0, i, None, value, timestamp_ms=stamp) for i, (value, stamp) in enumerate(batch)]
    result = pipeline.process(recs)
    dead = {d.record.offset for d in result.dead_letters}
    alerted = {a.record.offset for a in result.alerts}
    assert len(dead) == len(result.dead_letters) and not dead & alerted
    assert result.consumed == len(recs) and result.scored + len(dead) == len(recs)
    for letter in result.dead_letters:
        assert letter.reason in Reason and letter.error
