"""Window features in training and batch scoring: anomaly-train --entity/--window, anomaly-score and
anomaly-evaluate on a windowed bundle, explanations in words, and parity with the event path."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from tests.unit.conftest import TRAIN_ARGS
from training.bundle import Bundle, load_bundle
from training.cli import evaluate_main, score_main, train_main
from training.contract import decode_event, event_columns
from training.data import file_windows, frame_columns, input_kinds, iter_frames, raw_columns, read_frame, with_windows
from training.features import NumericField
from training.train import StreamOrder, window_columns
from training.window_state import WindowState, window_features
from training.windows import window_inputs

START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
BURST_HOST = "10.0.0.99"
WINDOW_ARGS = ["--entity", "src_host", "--window", "2s", "--window", "60s", "--event-time", "ts"]
LABEL_ARGS = ["--label-column", "label", "--normal-value", "normal"]


def traffic(seed: int = 0, hosts: int = 8, seconds: float = 900.0, rate: float = 0.25, bursts: int = 4,
            burst_events: int = 40) -> pd.DataFrame:
    """Per-host connections (about one every 4 s per host), and one host that now and then sends 40 in 2 s.

    Every burst event looks ordinary on its own (same bytes and ports as the rest): only its host's
    behaviour over time gives it away. Rows are in event-time order, as logs are.
    """
    rng = np.random.default_rng(seed)
    rows = []

    def event(t: float, host: str, label: str) -> tuple[float, str, float, str, str]:
        return (round(START + t, 3), host, round(float(rng.lognormal(6.0, 0.5)), 1),
                str(rng.choice(["http", "tls", "ssh"], p=[0.5, 0.4, 0.1])), label)

    for h in range(hosts):
        for t in np.sort(rng.uniform(0.0, seconds, rng.poisson(rate * seconds))):
            rows.append(event(float(t), f"10.0.0.{h}", "normal"))
    for _ in range(bursts):
        t0 = rng.uniform(60.0, seconds - 60.0)
        for t in np.sort(rng.uniform(t0, t0 + 2.0, burst_events)):
            rows.append(event(float(t), BURST_HOST, "attack"))
    frame = pd.DataFrame(rows, columns=["ts", "src_host", "bytes", "service", "label"])
    return frame.sort_values("ts", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class Trained:
    csv: Path
    frame: pd.DataFrame
    windowed: Path
    plain: Path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    root = tmp_path_factory.mktemp("windows")
    frame = traffic()
    data = root / "traffic.csv"
    frame.to_csv(data, index=False)
    assert train_main(["--data", str(data), "--out", str(root / "windowed"), *LABEL_ARGS, *WINDOW_ARGS,
                       *TRAIN_ARGS]) == 0
    assert train_main(["--data", str(data), "--out", str(root / "plain"), *LABEL_ARGS, "--drop", "ts", "src_host",
                       *TRAIN_ARGS]) == 0
    return Trained(csv=data, frame=frame, windowed=root / "windowed", plain=root / "plain")


@pytest.fixture(scope="module")
def windowed(trained: Trained) -> Bundle:
    return load_bundle(trained.windowed)


def scored(model: Path, data: Path, out: Path, *extra: str) -> pd.DataFrame:
    assert score_main(["--model", str(model), "--data", str(data), "--out", str(out), *extra]) == 0
    return pd.read_csv(out, keep_default_na=False)


# --- the bundle ------------------------------------------------------------------------------------

def test_a_windowed_bundle_holds_its_spec_and_the_window_columns_as_fields(trained: Trained) -> None:
    bundle = load_bundle(trained.windowed)
    spec = bundle.windows
    assert spec is not None and (trained.windowed / "windows.json").is_file()
    assert spec.entities == (("src_host",),) and [w.label for w in spec.windows] == ["2s", "60s"]
    assert spec.time_field == "ts" and spec.numeric == ("bytes",) and spec.categorical == ("service",)
    # The window columns are ordinary numeric fields; the entity and time fields are not model fields.
    assert [n for n in bundle.schema.names if n.startswith("win:")] == list(spec.names)
    assert {"win:src_host:2s:count", "win:src_host:60s:distinct:service", "win:src_host:2s:ratio:bytes"} <= set(
        spec.names)
    assert all(bundle.schema.kinds[n] == "numeric" for n in spec.names)
    assert "src_host" not in bundle.schema.names and "ts" not in bundle.schema.names
    assert bundle.manifest.training["window_features"] == len(spec.names) == 2 * (1 + 1 + 3)
    assert bundle.manifest.training["window_outcomes"] == {}  # every event had a time and a host
    assert load_bundle(trained.plain).windows is None


# --- scoring a file --------------------------------------------------------------------------------

def direct_scores(bundle: Bundle, frame: pd.DataFrame) -> np.ndarray:
    """The definition: the file's rows in order through one window state, then the schema and the model."""
    spec = bundle.windows
    assert spec is not None
    columns = raw_columns(frame, input_kinds(bundle.schema), Path("<frame>"))
    raw = {"src_host": frame["src_host"].to_numpy(dtype=object), "ts": frame["ts"].to_numpy()}
    features, _ = window_features(spec, window_inputs(spec, raw, columns, len(frame)))
    return np.asarray(bundle.scorer.score(bundle.schema.encode(with_windows(columns, features, spec)).matrix).score)


def test_anomaly_score_computes_the_windows_over_the_file_in_order_in_chunks_or_not(
        trained: Trained, tmp_path: Path) -> None:
    bundle = load_bundle(trained.windowed)
    whole = scored(trained.windowed, trained.csv, tmp_path / "whole.csv", "--passthrough", "label")
    chunked = scored(trained.windowed, trained.csv, tmp_path / "chunked.csv", "--passthrough", "label",
                     "--chunk-rows", "37")
    assert list(whole.columns) == ["label", "score", "is_anomaly", "top_feature", "top_feature_share",
                                   "explanation"]
    pd.testing.assert_frame_equal(whole, chunked)  # one state across chunks: the features of one pass
    expected = direct_scores(bundle, read_frame(trained.csv))
    np.testing.assert_allclose(whole["score"].to_numpy(), expected, rtol=1e-6)
    assert list(whole["label"]) == list(trained.frame["label"])  # output rows stay in file order


def test_anomaly_score_writes_over_its_own_earlier_output_with_or_without_the_explanation(
        trained: Trained, tmp_path: Path) -> None:
    out = tmp_path / "scores.csv"
    plain = scored(trained.plain, trained.csv, out, "--passthrough", "label", "--passthrough", "ts", "src_host")
    assert "explanation" not in plain.columns
    assert "explanation" in scored(trained.windowed, trained.csv, out).columns
    assert "explanation" in scored(trained.windowed, trained.csv, out).columns
    assert "explanation" not in scored(trained.plain, trained.csv, out, "--passthrough", "label", "--passthrough",
                                       "ts", "src_host").columns


def test_the_burst_host_is_found_with_windows_and_not_without(trained: Trained, tmp_path: Path) -> None:
    attack = (trained.frame["label"] == "attack").to_numpy()
    with_windows_ = scored(trained.windowed, trained.csv, tmp_path / "w.csv", "--passthrough", "label")
    without = scored(trained.plain, trained.csv, tmp_path / "p.csv", "--passthrough", "label",
                     "--passthrough", "ts", "src_host")
    auc_with = roc_auc_score(attack, with_windows_["score"])
    auc_without = roc_auc_score(attack, without["score"])
    assert auc_with >= 0.95 > 0.75 >= auc_without, (auc_with, auc_without)
    flagged = with_windows_[attack & (with_windows_["is_anomaly"] == 1).to_numpy()]
    assert len(flagged) >= attack.sum() // 2
    # The alerts say why, in words and units: the host's event count in the short window.
    top = flagged.sort_values("score").iloc[-1]
    assert top["top_feature"] == "win:src_host:2s:count"
    assert top["explanation"].startswith(f"events from src_host {BURST_HOST} in the last 2s: ")


def test_anomaly_evaluate_scores_a_windowed_bundle_with_the_same_features(trained: Trained, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert evaluate_main(["--model", str(trained.windowed), "--data", str(trained.csv), *LABEL_ARGS,
                          "--report-dir", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    attack = (trained.frame["label"] == "attack").to_numpy()
    expected = roc_auc_score(attack, direct_scores(load_bundle(trained.windowed), read_frame(trained.csv)))
    assert f"ROC-AUC {expected:.4f}" in out and "every event windowed at its own time" in out


def test_explanations_name_window_features_in_words_and_leave_the_others_as_they_were(trained: Trained) -> None:
    bundle = load_bundle(trained.windowed)
    frame = read_frame(trained.csv)
    columns = frame_columns(bundle.schema, frame, trained.csv, windows=file_windows(bundle.windows))
    scores = bundle.scorer.score(bundle.schema.encode(columns).matrix)
    rows = list(range(len(frame)))
    # What the worker passes: the event's own fields and each window feature's value under its name.
    observed = [{**{k: v[i] for k, v in columns.items()}, "src_host": frame["src_host"][i]} for i in rows]
    documents = bundle.scorer.explain_documents(scores, rows, observed, top_k=len(bundle.schema.names))
    contributions = bundle.scorer.explain_rows(scores, rows, observed, top_k=len(bundle.schema.names))
    burst = int(np.argmax(scores.score))
    assert frame["src_host"][burst] == BURST_HOST
    for document, contribution in zip(documents[burst], contributions[burst], strict=True):
        assert contribution.to_dict() == document
        if document["field"].startswith("win:"):
            assert f"src_host {BURST_HOST}" in document["text"] and " the last " in document["text"]
        else:
            assert "text" not in document and set(document) == {"field", "share", "observed", "expected"}
    count = next(d for d in documents[burst] if d["field"] == "win:src_host:2s:count")
    assert count["text"] == (f"events from src_host {BURST_HOST} in the last 2s: {count['observed']:.0f}, "
                             f"expected {_shown(count['expected'])}")


def _shown(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


# --- training order --------------------------------------------------------------------------------

def _window_values(frame: pd.DataFrame, stream: StreamOrder | None = None) -> np.ndarray:
    from training.windows import build_spec

    spec = build_spec(["src_host"], ["2s", "60s"], "ts", {"bytes": "numeric", "service": "categorical"})
    columns = raw_columns(frame, {"bytes": "numeric", "service": "categorical"}, Path("<frame>"))
    return window_columns(spec, frame, columns, stream)[0]


def test_training_windows_count_the_anomalous_rows_too(tmp_path: Path) -> None:
    """The windows describe the traffic; the labels only choose the rows trained on."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(60):  # each normal event comes 0.1 s after five labelled anomalies of the same host
        t = START + 10.0 * i
        rows += [(round(t + 0.01 * k, 3), "x", float(rng.integers(1, 100)), "attack") for k in range(5)]
        rows.append((round(t + 0.1, 3), "x", float(rng.integers(1, 100)), "normal"))
    data = tmp_path / "mixed.csv"
    pd.DataFrame(rows, columns=["ts", "host", "bytes", "label"]).to_csv(data, index=False)
    out = tmp_path / "model"
    assert train_main(["--data", str(data), "--out", str(out), *LABEL_ARGS, "--entity", "host", "--window", "2s",
                       "--event-time", "ts", *TRAIN_ARGS, "--ensemble", "1"]) == 0
    schema = load_bundle(out).schema
    count = schema.fields[schema.names.index("win:host:2s:count")]
    # Every normal row trained on saw the five anomalies before it.
    assert isinstance(count, NumericField) and count.low == count.high == 6


def test_training_windows_a_file_in_event_time_order_whatever_the_row_order() -> None:
    frame = traffic(hosts=3, seconds=120.0, bursts=1)
    shuffled = np.random.default_rng(1).permutation(len(frame))
    in_order = _window_values(frame)
    again = _window_values(frame.iloc[shuffled].reset_index(drop=True))
    np.testing.assert_array_equal(again, in_order[shuffled])


def test_training_from_a_stream_windows_each_partition_in_offset_order() -> None:
    frame = traffic(hosts=4, seconds=120.0, bursts=1)
    partition = (frame["src_host"].str[-1].map(ord) % 2).to_numpy()  # keyed by host: each host on one partition
    values = _window_values(frame, StreamOrder(partition, np.full(len(frame), np.nan)))
    for p in (0, 1):
        rows = np.flatnonzero(partition == p)
        np.testing.assert_array_equal(values[rows], _window_values(frame.iloc[rows].reset_index(drop=True)))


# --- one-line errors -------------------------------------------------------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--entity", "src_host", "--window", "2s"], "name its field with --event-time FIELD"),
    (["--entity", "host", "--window", "2s", "--event-time", "ts"], "--entity host: no such field"),
    (["--entity", "src_host", "--window", "2 weeks", "--event-time", "ts"], "'2 weeks' is not a duration"),
    (["--entity", "src_host", "--window", "2s", "--event-time", "when"], "--event-time when: no such field"),
    (["--entity", "src_host", "--window", "2s", "--event-time", "@record"], "only with --from-kafka"),
    (["--window", "2s", "--event-time", "ts"], "--window needs --entity"),
    (["--entity", "src_host", "--event-time", "ts"], "--entity needs --window"),
    (["--event-time", "ts"], "go with --entity and --window"),
    ([*WINDOW_ARGS, "--window-field", "size"], "--window-field size: no such field"),
    ([*WINDOW_ARGS, "--window-grace", "-1"], "--window-grace must be between 0 and 86400"),
    (["--entity", "src_host+", "--window", "2s", "--event-time", "ts"], "names an empty field"),
])
def test_window_flags_refuse_what_they_cannot_mean_with_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    data = tmp_path / "traffic.csv"
    traffic(hosts=2, seconds=60.0, bursts=0).to_csv(data, index=False)
    code = train_main(["--data", str(data), "--out", str(tmp_path / "model"), *LABEL_ARGS, *flags, *TRAIN_ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("anomaly-train: error: ")
    assert message in err[0], err[0]
    assert not (tmp_path / "model").exists()


def test_a_file_without_the_window_keys_is_refused_by_anomaly_score(trained: Trained, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "no-time.csv"
    trained.frame.drop(columns=["ts"]).to_csv(data, index=False)
    assert score_main(["--model", str(trained.windowed), "--data", str(data), "--out", str(tmp_path / "s.csv"),
                       "--passthrough", "label"]) == 2
    assert "missing column(s) required by the model: ts" in capsys.readouterr().err


# --- parity: a file scored by anomaly-score's path and the same rows as events ----------------------

HOSTS = ["a", "b", "c", None]


@st.composite
def event_sequences(draw: Callable[..., Any]) -> list[dict[str, Any]]:
    """Events with out-of-order (within and beyond the grace) and equal times, gaps longer than the windows,
    missing hosts, missing and absurd times, hosts seen once, and the first events of an empty history."""
    n = draw(st.integers(1, 40))
    t, events = START, []
    for _ in range(n):
        step = draw(st.sampled_from([0.0, 0.0, 0.4, 1.1, -0.7, -15.0, 75.0, 400.0]))
        t = t + step
        event: dict[str, Any] = {"bytes": draw(st.sampled_from([0.0, 12.5, 400.0, 3000.0])),
                                 "service": draw(st.sampled_from(["http", "tls", "ssh"]))}
        if (host := draw(st.sampled_from(HOSTS))) is not None:
            event["src_host"] = host
        when = draw(st.integers(0, 11))  # 0: no time; 1: an absurd one (1970)
        if when:
            event["ts"] = 12.0 if when == 1 else round(t, 3)
        events.append(event)
    return events


def file_path_features(bundle: Bundle, events: Sequence[dict[str, Any]], path: Path,
                       chunk_rows: int) -> dict[str, np.ndarray]:
    """What anomaly-score computes for the rows of a CSV file, read in chunks."""
    names = ["ts", "src_host", "bytes", "service"]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for event in events:
            writer.writerow(["" if event.get(n) is None else repr(event[n]) if isinstance(event[n], float)
                             else event[n] for n in names])
    state = file_windows(bundle.windows)
    parts = [frame_columns(bundle.schema, chunk, path, first, state) for first, chunk in iter_frames(path, chunk_rows)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def event_path_features(bundle: Bundle, events: Sequence[dict[str, Any]], batch: int) -> dict[str, np.ndarray]:
    """What the stream computes for the same rows as JSON records of one partition, batch after batch."""
    spec = bundle.windows
    assert spec is not None
    state = WindowState(spec)
    parts = []
    for start in range(0, len(events), batch):
        decoded = [decode_event(json.dumps(e).encode(), 1 << 20) for e in events[start:start + batch]]
        assert all(isinstance(e, dict) for e in decoded)
        parsed = event_columns(decoded, input_kinds(bundle.schema)).columns  # type: ignore[arg-type]
        raw = {name: [e.get(name) for e in decoded] for name in spec.key_fields}  # type: ignore[union-attr]
        features = state.advance(window_inputs(spec, raw, parsed, len(decoded)))
        parts.append(with_windows(parsed, features, spec))
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(events=event_sequences(), chunk_rows=st.integers(1, 9), batch=st.integers(1, 9))
def test_a_file_and_the_same_events_give_identical_features_and_scores(
        windowed: Bundle, tmp_path: Path, events: list[dict[str, Any]], chunk_rows: int, batch: int) -> None:
    bundle = windowed
    from_file = file_path_features(bundle, events, tmp_path / "events.csv", chunk_rows)
    from_events = event_path_features(bundle, events, batch)
    assert from_file.keys() == from_events.keys()
    for name in bundle.schema.names:
        if bundle.schema.kinds[name] == "numeric":
            np.testing.assert_array_equal(from_file[name], from_events[name], err_msg=name)
        else:
            assert list(from_file[name]) == list(from_events[name]), name
    file_scores = bundle.scorer.score(bundle.schema.encode(from_file).matrix).score
    event_scores = bundle.scorer.score(bundle.schema.encode(from_events).matrix).score
    np.testing.assert_array_equal(file_scores, event_scores)
