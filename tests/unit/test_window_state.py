"""The window state against its definition, across batch boundaries, and rebuilt from a restore point."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.errors import BundleError, ConfigError
from training.window_state import (
    MAX_AHEAD_MS,
    MAX_KEY_BYTES,
    RestorePoint,
    WindowInputs,
    WindowState,
    window_features,
)
from training.windows import RECORD_TIME, WindowSpec, build_spec, explain, parse_window, window_inputs

T0 = 1_700_000_000.0
KINDS = {"host": "categorical", "port": "categorical", "bytes": "numeric", "ts": "numeric"}


def spec(grace_s: float = 2.0, windows: tuple[str, ...] = ("2s", "10s")) -> WindowSpec:
    return build_spec(["host"], list(windows), "ts", KINDS, grace_s=grace_s)


def inputs(times: list[float], hosts: list[str | None], ports: list[str | None], sizes: list[float]) -> WindowInputs:
    return WindowInputs(times=np.asarray(times, dtype=np.float64), keys=[list(hosts)],
                        numeric=np.asarray(sizes, dtype=np.float64).reshape(-1, 1), categorical=[list(ports)])


def reference(s: WindowSpec, data: WindowInputs) -> np.ndarray:
    """The features by their definition (docs/windows.md), event by event, with no state to expire or evict."""
    grace = round(s.grace_s * 1000)
    watermark: int | None = None
    ahead = 0
    stored: list[tuple[int, str, float, str | None]] = []  # (effective time, key, bytes, port) in arrival order
    out = np.full((data.rows, len(s.names)), np.nan)
    for i in range(data.rows):
        value = float(data.times[i])
        t: int | None
        if math.isnan(value) or not 946_684_800_000 <= round(value * 1000) < 4_102_444_800_000:
            t = watermark
        else:
            raw = round(value * 1000)
            if watermark is None:
                watermark = t = raw
            elif raw > watermark + MAX_AHEAD_MS:
                ahead += 1
                if ahead >= 3:
                    watermark, ahead, t = raw, 0, raw
                else:
                    t = watermark
            else:
                ahead = 0
                t = max(raw, watermark - grace)
                watermark = max(watermark, raw)
        key = data.keys[0][i]
        if t is None or key is None:
            continue
        size, port = float(data.numeric[i, 0]), data.categorical[0][i]
        stored.append((t, key, size, port))
        column = 0
        for window in s.windows:
            members = [m for m in stored if m[1] == key and t - window.ms < m[0] <= t]
            sizes = [m[2] for m in members if not math.isnan(m[2])]
            earlier = [m[2] for m in members[:-1] if not math.isnan(m[2])]
            out[i, column] = len(members)
            out[i, column + 1] = len({m[3] for m in members if m[3] is not None})
            if sizes:
                out[i, column + 2] = math.fsum(sizes) / len(sizes)
                out[i, column + 3] = max(sizes)
            if not math.isnan(size):
                out[i, column + 4] = 1.0 if not earlier else (size + 1) / (math.fsum(earlier) / len(earlier) + 1)
            column += 5
    return out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b, equal_nan=True))


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.allclose(a, b, rtol=1e-12, atol=0, equal_nan=True))


events = st.lists(
    st.tuples(
        st.one_of(st.floats(min_value=-3.0, max_value=4.0), st.just(0.0), st.just(math.nan), st.just(40.0),
                  st.just(-1.0e9)),  # step from the previous event: out of order, equal, gaps, no time, absurd
        st.sampled_from(["a", "b", "c", None]),
        st.sampled_from(["22", "80", "443", None]),
        st.one_of(st.floats(min_value=0, max_value=1e4), st.just(math.nan)),
    ),
    min_size=1, max_size=60)


def build(steps: list[tuple[float, str | None, str | None, float]]) -> WindowInputs:
    times, now = [], T0
    for step, *_ in steps:
        if math.isnan(step):
            times.append(math.nan)
        elif step < -1e8:
            times.append(step)  # absurd: 1938
        else:
            now += step
            times.append(now)
    return inputs(times, [s[1] for s in steps], [s[2] for s in steps], [s[3] for s in steps])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, st.lists(st.integers(min_value=1, max_value=7), min_size=1, max_size=20))
def test_features_match_their_definition_in_one_call_and_batch_by_batch(steps: list, cuts: list[int]) -> None:
    s = spec()
    data = build(steps)
    whole, _ = window_features(s, data)
    assert close(whole, reference(s, data))
    state, parts, start, k = WindowState(s), [], 0, 0
    while start < data.rows:
        end = min(data.rows, start + cuts[k % len(cuts)])
        parts.append(state.advance(data.take(list(range(start, end))), list(range(start, end))))
        start, k = end, k + 1
    assert same(np.vstack(parts), whole)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, st.integers(min_value=0, max_value=60), st.integers(min_value=1, max_value=9))
def test_a_state_rebuilt_from_its_restore_point_continues_exactly(steps: list, cut: int, batch: int) -> None:
    s = spec()
    data = build(steps)
    cut = min(cut, data.rows)
    running = WindowState(s)
    for start in range(0, cut, batch):
        rows = list(range(start, min(cut, start + batch)))
        running.advance(data.take(rows), rows)
    point = RestorePoint.decode(running.restore_point(cut).encode())
    assert point is not None and point.offset <= cut
    rebuilt = WindowState(s, start=point)
    for first in range(point.offset, cut, batch):  # a replay: the state only, no features
        rows = list(range(first, min(cut, first + batch)))
        assert np.isnan(rebuilt.advance(data.take(rows), rows, features=False)).all()
    rest = list(range(cut, data.rows))
    if rest:
        assert same(rebuilt.advance(data.take(rest), rest), running.advance(data.take(rest), rest))


def test_the_restore_point_moves_past_expired_batches_and_keeps_the_clock() -> None:
    s = spec(grace_s=0, windows=("2s",))
    state = WindowState(s)
    for offset in range(10):  # one event a second, one batch each
        state.advance(inputs([T0 + offset], ["a"], ["22"], [1.0]), [offset])
    point = state.restore_point(10)
    # Events at T0+7 and T0+8 are older than the 2 s window ending at T0+9: only the last two are replayed.
    assert point.offset == 8 and point.watermark_ms == round((T0 + 7) * 1000)
    state.forget_before(10)
    assert state.restore_point(10) == point


def test_first_events_and_entities_seen_once_have_the_empty_history_features() -> None:
    s = spec()
    features, _ = window_features(s, inputs([T0, T0 + 1], ["a", "b"], ["22", "80"], [100.0, 5.0]))
    assert features[0].tolist()[:5] == [1.0, 1.0, 100.0, 100.0, 1.0]
    assert features[1].tolist()[:5] == [1.0, 1.0, 5.0, 5.0, 1.0]


def test_a_burst_shows_in_the_short_window_and_expires_after_it() -> None:
    s = spec(grace_s=0)
    times = [T0 + i * 0.01 for i in range(50)] + [T0 + 30]
    features, _ = window_features(s, inputs(times, ["scanner"] * 51, [str(p) for p in range(51)], [60.0] * 51))
    assert features[49, 0] == 50 and features[49, 1] == 50  # 50 connections to 50 ports within 2 s
    assert features[50, 0] == 1 and features[50, 5] == 1  # 30 s later both windows hold only the new event


def test_events_without_time_or_entity_and_huge_keys_do_not_poison_the_state() -> None:
    s = spec()
    huge = "x" * 1_048_576
    data = inputs([T0, math.nan, T0 + 1, -5.0, T0 + 2, T0 + 3],
                  ["a", "a", None, "a", huge, huge], ["22"] * 6, [1.0] * 6)
    state = WindowState(s)
    features = state.advance(data)
    counts = state.counts.take()
    assert counts == {"no_time": 1, "absurd_time": 1, "no_entity": 1, "long_key": 2}
    assert np.isnan(features[2]).all()  # no entity: its window features are missing (imputed downstream)
    assert features[1, 0] == 2 and features[3, 0] == 3  # no usable time: windowed at the watermark
    assert features[5, 0] == 2  # the huge key is one entity, kept as a 16-byte digest
    assert max(len(key) for table in state.entities for key in table) <= MAX_KEY_BYTES


def test_a_far_future_event_does_not_move_the_clock_unless_the_traffic_confirms_it() -> None:
    s = spec(grace_s=0)
    later = T0 + 10 * 86_400
    state = WindowState(s)
    state.advance(inputs([T0, later, T0 + 1], ["a"] * 3, ["22"] * 3, [1.0] * 3))
    assert state.watermark == round((T0 + 1) * 1000) and state.counts.take() == {"ahead": 1}
    state.advance(inputs([later, later + 1, later + 2], ["a"] * 3, ["22"] * 3, [1.0] * 3))
    assert state.watermark == round((later + 2) * 1000)


def test_late_events_are_windowed_at_the_watermark_minus_grace_and_counted() -> None:
    s = spec(grace_s=1)
    state = WindowState(s)
    features = state.advance(inputs([T0 + 8.5, T0 + 10, T0 + 9.5, T0 + 2], ["a"] * 4, ["22"] * 4, [1.0] * 4))
    assert state.counts.take() == {"late": 1}
    assert features[2, 0] == 2  # within grace: windowed at its own time: (7.5, 9.5] holds 8.5 and itself
    assert features[3, 0] == 2  # late: windowed at T0 + 9 (watermark - grace): (7, 9] holds 8.5 and itself


def test_state_is_bounded_by_entities_bytes_and_events_per_entity() -> None:
    s = build_spec(["host"], ["10s"], "ts", KINDS, grace_s=0, max_events=5)
    state = WindowState(s, max_entities=3)
    state.advance(inputs([T0 + i * 0.001 for i in range(10)], [f"h{i}" for i in range(10)], ["22"] * 10, [1.0] * 10))
    assert state.entity_count() == 3 and state.counts.take() == {"evicted": 7}
    state.advance(inputs([T0 + 1 + i * 0.001 for i in range(9)], ["h9"] * 9, ["22"] * 9, [1.0] * 9))
    assert len(state.entities[0]["h9"]) == 5 and state.counts.take() == {"truncated": 5}
    small = WindowState(s, max_bytes=3_000)
    small.advance(inputs([T0 + i * 0.001 for i in range(50)], [f"h{i}" for i in range(50)], ["22"] * 50, [1.0] * 50))
    assert small.estimated_bytes() <= 3_000 and small.counts.take()["evicted"] > 0


def test_idle_entities_expire_when_their_windows_are_empty() -> None:
    s = spec(grace_s=0)
    state = WindowState(s)
    state.advance(inputs([T0 + i for i in range(5)], [f"h{i}" for i in range(5)], ["22"] * 5, [1.0] * 5))
    state.advance(inputs([T0 + 100], ["h9"], ["22"], [1.0]))
    assert state.entity_count() == 1 and state.entries == 1


def test_window_inputs_read_files_and_events_alike() -> None:
    s = build_spec(["host+port"], ["2s"], "ts", KINDS)
    raw = {"host": ["a", "a", None], "port": [22, "22", "80"], "bytes": ["7", 7.0, None],
           "ts": ["2023-11-14T22:13:20Z", T0, [1]]}
    data = window_inputs(s, raw, {}, 3)
    assert data.keys[0][:2] == ["a\x1f22", "a\x1f22"] and data.keys[0][2] is None
    assert data.times[0] == data.times[1] == T0 and np.isnan(data.times[2])  # an array is no time, not a failure
    record = build_spec(["host"], ["2s"], RECORD_TIME, KINDS)
    assert window_inputs(record, raw, {}, 3, record_times_s=[1.0, 2.0, 3.0]).times.tolist() == [1.0, 2.0, 3.0]


def test_spec_round_trips_and_refuses_what_it_cannot_mean() -> None:
    s = spec()
    assert WindowSpec.from_dict(s.to_dict()) == s and s.names[0] == "win:host:2s:count"
    assert parse_window("500ms").ms == 500 and parse_window("7d").ms == 7 * 86_400_000
    for bad in ("2", "0s", "-1s", "2 weeks"):
        with pytest.raises(ConfigError):
            parse_window(bad)
    with pytest.raises(ConfigError, match="--event-time"):
        build_spec(["host"], ["2s"], None, KINDS)
    with pytest.raises(ConfigError, match="no such field"):
        build_spec(["host"], ["2s"], "ts", KINDS, fields=["nope"])
    with pytest.raises(BundleError):
        WindowSpec.from_dict({"entities": [], "windows": ["2s"], "time_field": "ts"})


def test_explanations_speak_in_words_and_original_units() -> None:
    words = "events from src 10.0.0.5 in the last 2s: 47, expected 3.2"
    assert explain("win:src:2s:count", 47.0, 3.2, "10.0.0.5") == words
    assert explain("win:card:1d:ratio:amount", 5.04, 1.0, "c1").startswith("amount against card c1's mean")


def test_long_runs_with_compaction_and_kept_counts_match_the_definition() -> None:
    """Hundreds of events per entity: entries leave, histories compact, kept value counts carry across batches."""
    rng = np.random.default_rng(7)
    n = 1500
    steps = rng.exponential(0.05, n)
    steps[rng.random(n) < 0.03] = -0.5  # a few out of order, within the grace
    times = (T0 + np.cumsum(steps)).tolist()
    data = inputs(times, [str(h) for h in rng.integers(0, 3, n)], [str(p) for p in rng.integers(0, 30, n)],
                  rng.exponential(100, n).tolist())
    s = spec()
    expected = reference(s, data)
    state, parts, start = WindowState(s), [], 0
    while start < n:
        end = min(n, start + int(rng.integers(1, 200)))
        parts.append(state.advance(data.take(list(range(start, end))), list(range(start, end))))
        start = end
    assert close(np.vstack(parts), expected)
    assert same(np.vstack(parts), window_features(s, data)[0])


def test_an_explanation_shows_at_most_64_characters_of_the_entity() -> None:
    words = explain("win:src:2s:count", 2.0, 1.0, "x" * 1_048_576)
    assert len(words) < 200 and "x" * 64 + "..." in words


def test_a_numeric_field_as_an_entity_key_is_read_as_text() -> None:
    s = build_spec(["port"], ["2s"], "ts", {**KINDS, "port": "numeric"})
    data = window_inputs(s, {}, {"port": np.array([22.0, np.nan]), "ts": np.array([T0, T0])}, 2)
    assert data.keys[0][0] is not None and isinstance(data.keys[0][0], str) and data.keys[0][1] is None
    assert window_features(s, data)[0][0, 0] == 1
