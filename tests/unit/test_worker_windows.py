"""The worker's window state: per partition as in training, once per batch, bounded against bad input, keyed-topic
check, restore interface, reset on a model with other windows; the pipeline's scores against the training path."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry

from training.bundle import Bundle, load_bundle
from training.contract import Reason, build_columns
from training.model import FitConfig
from training.train import TrainConfig, WindowOptions, train_frame
from training.window_state import RestorePoint, WindowInputs, window_features
from training.windows import WindowSpec, build_spec, window_inputs
from worker.metrics import WorkerMetrics
from worker.pipeline import Pipeline
from worker.records import Record
from worker.windows import PartitionWindows

T0 = 1_700_000_000.0
TOPIC = "events"
KINDS = {"host": "categorical", "port": "categorical", "bytes": "numeric", "ts": "numeric"}
COUNT_2S = "win:host:2s:count"


def spec(grace_s: float = 2.0) -> WindowSpec:
    return build_spec(["host"], ["2s", "10s"], "ts", KINDS, grace_s=grace_s)


def events(n: int, seed: int = 1, hosts: int = 5) -> list[dict[str, object]]:
    """n events in time order, some out of order within the grace, a few hosts bursting."""
    rng = np.random.default_rng(seed)
    times = T0 + np.cumsum(rng.exponential(0.3, n)) + rng.uniform(-0.5, 0.0, n)
    return [{"host": f"10.0.0.{rng.integers(hosts)}", "port": str(rng.choice([22, 80, 443])),
             "bytes": float(np.round(rng.lognormal(5, 1), 2)), "ts": float(np.round(t, 3))} for t in times]


def inputs_of(s: WindowSpec, rows: list[dict[str, object]]) -> WindowInputs:
    raw = {name: [row.get(name) for row in rows] for name in KINDS}
    return window_inputs(s, raw, {}, len(rows))


def records_of(rows: list[dict[str, object]], partition: int = 0, first: int = 0) -> list[Record]:
    return [Record(TOPIC, partition, first + i, None, orjson.dumps(row), timestamp_ms=int(T0 * 1000))
            for i, row in enumerate(rows)]


def metrics() -> tuple[WorkerMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return WorkerMetrics(registry), registry


# -- PartitionWindows: pure ----------------------------------------------------------------------


def test_each_partition_goes_through_its_own_state_as_a_file_would() -> None:
    s = spec()
    rows = {0: events(60, seed=1), 1: events(45, seed=2)}
    expected = {p: window_features(s, inputs_of(s, r))[0] for p, r in rows.items()}
    # Interleaved partitions, cut into uneven batches: each partition's rows in offset order.
    tagged = sorted([(p, i) for p, r in rows.items() for i in range(len(r))], key=lambda pi: (pi[1], pi[0]))
    windows = PartitionWindows(s, max_entities=1000, max_bytes=None)
    got: dict[int, list[np.ndarray]] = {0: [], 1: []}
    bounds = [0, 7, 40, 41, 90, len(tagged)]
    for start, end in zip(bounds, bounds[1:], strict=False):
        batch = tagged[start:end]
        recs = [Record(TOPIC, p, i, None, b"", None) for p, i in batch]
        out = windows.features(recs, inputs_of(s, [rows[p][i] for p, i in batch]))
        for (p, _), row in zip(batch, out, strict=True):
            got[p].append(row)
    for p in rows:
        np.testing.assert_array_equal(np.array(got[p]), expected[p])
    assert set(windows.states) == {(TOPIC, 0), (TOPIC, 1)}


def test_outcomes_and_size_are_metrics() -> None:
    m, registry = metrics()
    s = spec()
    windows = PartitionWindows(s, max_entities=2, max_bytes=None, metrics=m)
    m.follow_window_state(windows.entity_count, windows.estimated_bytes)
    rows: list[dict[str, object]] = [
        {"host": "a", "ts": T0, "bytes": 1.0}, {"host": "b", "ts": T0 + 0.1}, {"host": "c", "ts": T0 + 0.2},
        {"host": None, "ts": T0 + 0.3}, {"host": "a", "ts": "not a time"}, {"host": "a", "ts": T0 - 100},
    ]
    windows.features(records_of(rows), inputs_of(s, rows))

    def outcome(name: str) -> float | None:
        return registry.get_sample_value("anomaly_window_events_total", {"outcome": name})

    # a, b, c in one batch; the limits apply after it: the least recently seen of three (a) is evicted
    assert (outcome("evicted"), outcome("no_entity"), outcome("no_time"), outcome("late")) == (1, 1, 1, 1)
    assert outcome("long_key") == 0  # declared at 0
    assert registry.get_sample_value("anomaly_window_state_entities") == windows.entity_count() == 2
    assert registry.get_sample_value("anomaly_window_state_bytes") == windows.estimated_bytes() > 0


def test_a_huge_key_and_an_event_without_time_do_not_poison_the_state() -> None:
    m, registry = metrics()
    s = spec()
    windows = PartitionWindows(s, max_entities=1000, max_bytes=None, metrics=m)
    huge = "k" * 1_000_000
    rows: list[dict[str, object]] = [{"host": huge, "ts": T0}, {"host": "a", "ts": None}, {"host": huge, "ts": T0 + 1},
                                     {"host": "a", "ts": T0 + 1.5}]
    out = windows.features(records_of(rows), inputs_of(s, rows))
    state = windows.states[(TOPIC, 0)]
    assert max(len(key) for table in state.entities for key in table) <= 128  # kept as a digest, not 1 MB
    assert windows.estimated_bytes() < 10_000
    names = list(s.names)
    assert out[2, names.index(COUNT_2S)] == 2  # the huge key is one entity: its digest
    assert out[3, names.index(COUNT_2S)] == 2  # the timeless "a" is windowed at the watermark, counted
    assert registry.get_sample_value("anomaly_window_events_total", {"outcome": "long_key"}) == 2
    assert registry.get_sample_value("anomaly_window_events_total", {"outcome": "no_time"}) == 1


def test_an_entity_on_two_partitions_is_counted_and_named_in_a_throttled_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    m, registry = metrics()
    s = spec()
    now = [0.0]
    windows = PartitionWindows(s, max_entities=1000, max_bytes=None, metrics=m, clock=lambda: now[0],
                               warn_every_s=60.0)
    long_host = "h" * 500

    def feed(host: str, partition: int, offset: int) -> None:
        row = [{"host": host, "ts": T0 + offset}]
        windows.features(records_of(row, partition, offset), inputs_of(s, row))

    caplog.set_level(logging.WARNING, logger="worker.windows")
    feed("10.0.0.5", 0, 0)
    feed("10.0.0.5", 0, 1)
    assert registry.get_sample_value("anomaly_window_entity_partition_changes_total") == 0
    feed("10.0.0.5", 3, 2)
    assert registry.get_sample_value("anomaly_window_entity_partition_changes_total") == 1
    (first,) = caplog.records
    assert "host '10.0.0.5'" in first.getMessage() and "partitions 0 and 3 of events" in first.getMessage()
    feed(long_host, 0, 3)
    feed(long_host, 1, 4)  # within the minute: counted, not logged
    assert len(caplog.records) == 1
    assert registry.get_sample_value("anomaly_window_entity_partition_changes_total") == 2
    now[0] = 61.0
    feed("10.0.0.5", 0, 5)
    second = caplog.records[-1].getMessage()
    assert "partitions 3 and 0" in second and "1 more since the last warning" in second
    feed(long_host, 0, 6)
    now[0] = 200.0
    feed(long_host, 1, 7)
    third = caplog.records[-1].getMessage()
    assert "h" * 64 + "... (500 chars)" in third and "h" * 65 not in third


def test_the_memory_of_keys_is_bounded() -> None:
    m, registry = metrics()
    s = spec()
    windows = PartitionWindows(s, max_entities=1000, max_bytes=None, metrics=m, max_owners=2)
    for offset, (host, partition) in enumerate([("a", 0), ("b", 0), ("c", 0), ("a", 1)]):
        row = [{"host": host, "ts": T0 + offset}]
        windows.features(records_of(row, partition, offset), inputs_of(s, row))
    # "a" was forgotten (only the 2 most recent keys are kept): moving it is not noticed
    assert registry.get_sample_value("anomaly_window_entity_partition_changes_total") == 0


def test_a_partition_rebuilt_from_its_commit_metadata_gives_the_same_features() -> None:
    m, registry = metrics()
    s = spec()
    rows = events(80, seed=4)
    recs = records_of(rows, partition=2)
    key = (TOPIC, 2)
    live = PartitionWindows(s, max_entities=1000, max_bytes=None)
    for start in range(0, 60, 9):
        live.features(recs[start:min(start + 9, 60)], inputs_of(s, rows[start:min(start + 9, 60)]))
    metadata = live.commit_metadata(key, 60)
    assert metadata is not None and live.commit_metadata((TOPIC, 9), 60) is None
    live.committed({key: 60})
    point = RestorePoint.decode(metadata)
    assert point is not None and point.offset <= 60

    restored = PartitionWindows(s, max_entities=1000, max_bytes=None, metrics=m)
    restored.assign(key, point)
    restored.replay(recs[point.offset:60], inputs_of(s, rows[point.offset:60]))
    assert registry.get_sample_value("anomaly_window_restored_events_total") == 60 - point.offset
    assert registry.get_sample_value("anomaly_window_events_total", {"outcome": "late"}) == 0  # counted once, live
    np.testing.assert_array_equal(restored.features(recs[60:], inputs_of(s, rows[60:])),
                                  live.features(recs[60:], inputs_of(s, rows[60:])))
    restored.revoke([key])
    assert restored.states == {} and restored.commit_metadata(key, 80) is None


def test_reset_drops_the_states_only_for_other_windows() -> None:
    s = spec()
    windows = PartitionWindows(s, max_entities=1000, max_bytes=None)
    rows = events(10)
    windows.features(records_of(rows), inputs_of(s, rows))
    windows.reset(spec())  # equal spec: kept
    assert windows.entity_count() > 0
    windows.reset(spec(grace_s=5.0))
    assert windows.entity_count() == 0 and windows.spec == spec(grace_s=5.0)
    windows.reset(None)
    assert windows.width == 0 and windows.features(records_of(rows), inputs_of(s, rows)).shape == (10, 0)


# -- the pipeline with a windowed bundle ------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    out = tmp_path_factory.mktemp("windowed") / "bundle"
    frame = pd.DataFrame(events(600, seed=7))
    config = TrainConfig(fit=FitConfig(epochs=3, hidden=(8, 3), batch_size=64, seed=5), categorical=("port",),
                         windows=WindowOptions(entities=("host",), windows=("2s", "10s"), time_field="ts"))
    train_frame(frame, out, config, data_sha256="0" * 64, log=lambda _line: None)
    loaded = load_bundle(out)
    assert loaded.windows is not None and COUNT_2S in loaded.schema.names
    return loaded


def reference_scores(bundle: Bundle, rows: list[dict[str, object]]) -> np.ndarray:
    """The training package's path: parse the rows, the window features of the whole sequence, encode, score."""
    assert bundle.windows is not None
    kinds = {name: kind for name, kind in bundle.schema.kinds.items() if not name.startswith("win:")}
    columns = build_columns({name: [row.get(name) for row in rows] for name in kinds}, kinds, len(rows)).columns
    raw = {name: [row.get(name) for row in rows] for name in ("host", "ts") if name not in columns}
    features, _ = window_features(bundle.windows, window_inputs(bundle.windows, raw, columns, len(rows)))
    columns.update({name: features[:, j] for j, name in enumerate(bundle.windows.names)})
    return np.asarray(bundle.scorer.score(bundle.schema.encode(columns).matrix).score)


def test_pipeline_scores_equal_the_training_path_batch_after_batch(bundle: Bundle) -> None:
    rows = events(300, seed=11, hosts=3) + [{"host": "10.0.0.1", "port": "22", "bytes": 9e6, "ts": T0 + 200.0 + i / 50}
                                            for i in range(40)]  # a burst the windows should make anomalous
    recs = records_of(rows)
    pipeline = Pipeline(bundle)
    results = [pipeline.process(recs[a:b]) for a, b in ((0, 1), (1, 120), (120, 121), (121, 340))]
    assert not any(r.dead_letters for r in results)
    np.testing.assert_allclose(np.concatenate([r.scores for r in results]), reference_scores(bundle, rows),
                               rtol=1e-5, atol=1e-6)
    alerts = [a for r in results for a in r.alerts]
    assert alerts, "the burst should alert"
    explained = [f for a in alerts for f in a.document["top_features"] if f["field"].startswith("win:")]
    assert explained, "window features explain some alerts"
    for feature in explained:  # the alert carries the window value it was scored with, in words too
        assert feature["observed"] is not None and "the last " in feature["text"]
    burst = [f for a in alerts if a.record.offset >= 300 for f in a.document["top_features"] if "text" in f]
    assert burst and all("host 10.0.0.1" in f["text"] for f in burst), burst


def test_dead_letters_enter_no_window_and_a_bisected_batch_advances_the_state_once(
        bundle: Bundle, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = Pipeline(bundle)
    poison = 123456.0
    bytes_field = bundle.schema.names.index("bytes")
    column = bundle.schema.slices()[bytes_field].start
    target = bundle.schema.fields[bytes_field].encode(np.array([poison]))[0][0]
    real = pipeline.scorer.score

    def score(matrix: np.ndarray) -> object:
        if np.isclose(matrix[:, column], target).any():
            raise ValueError("cannot score this row")
        return real(matrix)

    monkeypatch.setattr(pipeline.scorer, "score", score)
    rows: list[dict[str, object]] = [
        {"host": "h", "port": "22", "bytes": poison if i == 6 else 100.0, "ts": T0 + i / 10} for i in range(9)]
    values = [orjson.dumps(row) for row in rows]
    values[3] = b"{not json"
    values[4] = orjson.dumps({"host": "h", "port": "22", "bytes": "many", "ts": T0})  # wrong_type
    recs = [r._replace(value=v) for r, v in zip(records_of(rows), values, strict=True)]
    result = pipeline.process(recs)
    assert result.isolated == 1 and result.scored == 6
    assert sorted((d.record.offset, d.reason) for d in result.dead_letters) == [
        (3, Reason.INVALID_JSON), (4, Reason.WRONG_TYPE), (6, Reason.PROCESSING_ERROR)]
    # 0, 1, 2 then 5, 6 (valid, entered, failed to score), 7, 8: each counted once, the dead letters of decode
    # and contract not at all, although the batch was processed three times over while bisecting
    assert result.columns[COUNT_2S].tolist() == [1, 2, 3, 4, 6, 7]
    after = pipeline.process(records_of([{"host": "h", "port": "22", "bytes": 100.0, "ts": T0 + 0.95}], first=9))
    assert after.columns[COUNT_2S].tolist() == [8]


def test_a_failing_window_step_scores_the_batch_without_window_features(
        bundle: Bundle, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    m, registry = metrics()
    assert bundle.windows is not None
    windows = PartitionWindows(bundle.windows, 1000, None, metrics=m)
    pipeline = Pipeline(bundle, windows=windows)
    rows = events(20, seed=3)
    pipeline.process(records_of(rows[:10]))
    assert (TOPIC, 0) in windows.states

    def broken(records: object, inputs: object) -> np.ndarray:
        raise RuntimeError("window bug")

    monkeypatch.setattr(windows, "features", broken)
    result = pipeline.process(records_of(rows[10:], first=10))
    assert result.scored == 10 and not result.dead_letters
    assert np.isnan(result.columns[COUNT_2S]).all()
    assert registry.get_sample_value("anomaly_window_failures_total") == 1
    assert (TOPIC, 0) not in windows.states  # possibly half advanced: dropped
    assert "window bug" in caplog.text and "events[0]" in caplog.text


def test_replay_fills_the_state_as_scoring_would_without_results(bundle: Bundle) -> None:
    rows = events(50, seed=5)
    values = [orjson.dumps(r) for r in rows]
    values[10] = b"[1, 2]"  # would be a dead letter: enters no window
    recs = [r._replace(value=v) for r, v in zip(records_of(rows), values, strict=True)]
    scored, replayed = Pipeline(bundle), Pipeline(bundle)
    scored.process(recs[:40])
    replayed.replay(recs[:40])
    np.testing.assert_array_equal(replayed.process(recs[40:]).columns[COUNT_2S],
                                  scored.process(recs[40:]).columns[COUNT_2S])


def test_a_model_with_other_windows_resets_the_state_and_the_same_windows_keep_it(bundle: Bundle) -> None:
    assert bundle.windows is not None
    shared = PartitionWindows(bundle.windows, 1000, None)
    one = {"host": "h", "port": "22", "bytes": 10.0}
    first = Pipeline(bundle, windows=shared)
    first.process(records_of([{**one, "ts": T0}, {**one, "ts": T0 + 0.1}]))
    same = Pipeline(dataclasses.replace(bundle, windows=dataclasses.replace(bundle.windows)), windows=shared)
    assert same.process(records_of([{**one, "ts": T0 + 0.2}], first=2)).columns[COUNT_2S].tolist() == [3]
    other_spec = dataclasses.replace(bundle.windows, grace_s=bundle.windows.grace_s + 1)  # same feature names
    other = Pipeline(dataclasses.replace(bundle, windows=other_spec), windows=shared)
    assert shared.entity_count() == 1  # built (as the reload thread does) without touching the live state
    assert other.process(records_of([{**one, "ts": T0 + 0.3}], first=3)).columns[COUNT_2S].tolist() == [1]


def test_a_bundle_without_windows_is_scored_as_before(tmp_path: Path) -> None:
    frame = pd.DataFrame(events(200, seed=2)).drop(columns=["host", "ts"])
    train_frame(frame, tmp_path / "b", TrainConfig(fit=FitConfig(epochs=1, hidden=(4, 2), batch_size=64, seed=1)),
                data_sha256="0" * 64, log=lambda _line: None)
    plain = load_bundle(tmp_path / "b")
    pipeline = Pipeline(plain)
    result = pipeline.process(records_of([{"port": "22", "bytes": 1.0}]))
    assert result.scored == 1 and pipeline.windows.width == 0 and not pipeline.windows.states
