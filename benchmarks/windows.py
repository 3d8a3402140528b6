"""Per-entity window features (issue 21): what they gain in detection and what they cost.

Run::

    .venv/bin/python -m benchmarks.windows --out benchmarks/results [--data ../shared/data] [--parts ...]

Parts (all by default):
- `fraud`: the Fraud Detection Handbook's simulated card transactions; train on May normals, score
  June-July; TX_AMOUNT alone vs TX_AMOUNT + windows (per customer and per terminal, 1d 7d 30d) vs
  TX_AMOUNT + the handbook's own customer spending features; ROC-AUC / PR-AUC per fraud scenario.
- `network`: the scenario of benchmarks/netscenario.py; single-event fields vs the same + windows per
  `id.orig_h` (2s, 60s); ROC-AUC / PR-AUC of the attack events.
- `memory`: tracemalloc bytes of a WindowState holding 100,000 entities, per entity and per entry, against
  `WindowState.estimated_bytes()`.
- `speed`: `WindowState.advance` events/s on the network scenario (the bound on a partition's restore).
- `throughput`: the worker's `Pipeline.process` on the network events as JSON records, with and without windows.

Window columns are computed by the core (`training.windows.window_inputs` + `training.window_state.window_features`,
all rows in time order: labels only choose training and test rows) and trained through `train_frame` as ordinary
columns, which is what `anomaly-train --entity ... --window ...` does; they are renamed `w.` instead of `win:`
because a bundle refuses `win:` fields without a `windows.json`, which only the CLI path writes.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from benchmarks import netscenario
from benchmarks.windows_report import render_markdown

ROOT = Path(__file__).resolve().parents[1]
FRAUD_FILE = Path("fraud-handbook") / "transactions-2018-04-to-07.parquet"
PARTS = ("fraud", "network", "memory", "speed", "throughput")
FRAUD_WINDOWS = ("1d", "7d", "30d")
NET_WINDOWS = ("2s", "60s")
NET_FIELDS = ("id.resp_p", "proto", "service", "duration", "orig_bytes", "resp_bytes", "conn_state", "orig_pkts",
              "resp_pkts")
NET_CATEGORICAL = ("proto", "service", "conn_state")
BATCH = 500


def default_data() -> Path:
    return Path(os.environ.get("ANOMALY_SHARED_DATA", ROOT.parent / "shared" / "data"))


def metrics(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    return {"roc_auc": round(float(roc_auc_score(y, score)), 4),
            "pr_auc": round(float(average_precision_score(y, score)), 4),
            "positives": int(y.sum()), "negatives": int((~y).sum())}


def window_columns(frame: pd.DataFrame, entities: Sequence[str], windows: Sequence[str], time_field: str,
                   fields: Sequence[str], categorical: Sequence[str] = ()) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The core's window features of every row of `frame` (in its order), as `w.`-named float columns."""
    from training.contract import CATEGORICAL, NUMERIC
    from training.data import raw_values
    from training.window_state import window_features
    from training.windows import build_spec, window_inputs

    kinds = {name: CATEGORICAL if name in categorical or name in entities else NUMERIC
             for name in [*entities, time_field, *fields]}
    spec = build_spec(list(entities), list(windows), time_field, kinds, list(fields))
    raw = {name: raw_values(frame[name]) for name in kinds}
    started = time.perf_counter()
    features, counts = window_features(spec, window_inputs(spec, raw, {}, len(frame)))
    seconds = time.perf_counter() - started
    names = [name.replace("win:", "w.", 1) for name in spec.names]
    out = pd.DataFrame(features, columns=names, index=frame.index)
    return out, {"spec": spec.to_dict(), "columns": len(names), "seconds": round(seconds, 2), "rows": len(frame),
                 "counts": counts}


def train_and_score(frame: pd.DataFrame, train: np.ndarray, test: np.ndarray, features: Sequence[str],
                    workdir: Path, name: str, seed: int, windows: Any = None,
                    categorical: Sequence[str] = ()) -> tuple[np.ndarray, dict[str, Any]]:
    """Train with the product defaults on `train` rows, score `test` rows through the written bundle.

    The frame given to `train_frame` holds every row (a windowed model needs the history before its rows) and a
    `role` label that picks the training rows as its "normal" ones, which the product then splits 60/10/10/20
    (fit / validation / calibration / its own test). A windowed bundle scores the whole frame in order with
    `score_frame` (windows over all rows, as `anomaly-score` does) and the test rows are taken from it.
    """
    from benchmarks.quality import frame_sha256
    from training.bundle import load_bundle
    from training.data import Labels
    from training.model import FitConfig
    from training.scoring import score_frame
    from training.train import TrainConfig, train_frame

    started = time.perf_counter()
    keys = [] if windows is None else [n for e in windows.entities for n in e.split("+")] + [windows.time_field]
    data = frame[list(dict.fromkeys([*keys, *features]))] if windows is not None else frame.iloc[train][list(features)]
    role = np.full(len(data), "train", dtype=object)
    if windows is not None:
        role[:] = "other"
        role[train] = "train"
    data = data.assign(role=role)
    lines: list[str] = []
    config = TrainConfig(fit=FitConfig(seed=seed), categorical=tuple(categorical), labels=Labels("role", "train"),
                         windows=windows)
    result = train_frame(data, workdir / name, config, data_sha256=frame_sha256(data), log=lines.append)
    bundle = load_bundle(workdir / name)
    if windows is None:
        scores = score_frame(bundle, frame.iloc[test][list(features)]).score
    else:
        scores = score_frame(bundle, data.drop(columns="role")).score[test]
    facts = {"model_inputs": bundle.schema.width, "fields": len(bundle.schema.fields),
             "train_seconds": round(result.seconds, 1), "seconds": round(time.perf_counter() - started, 1),
             "log": [line for line in lines if line.startswith(("window features", "splits"))]}
    return scores, facts


# --- fraud --------------------------------------------------------------------------------------------------


def handbook_features(frame: pd.DataFrame) -> pd.DataFrame:
    """The handbook's customer spending features: per customer, over the last 1, 7 and 30 days (the current
    transaction included, as its `get_customer_spending_behaviour_features`), the number of transactions and
    their mean amount, from pandas time-based rolling windows."""
    out = pd.DataFrame(index=frame.index)
    ordered = frame[["CUSTOMER_ID", "TX_DATETIME", "TX_AMOUNT"]].sort_values(["CUSTOMER_ID", "TX_DATETIME"],
                                                                             kind="stable")
    grouped = ordered.set_index("TX_DATETIME").groupby("CUSTOMER_ID", sort=False)["TX_AMOUNT"]
    for days in (1, 7, 30):
        rolling = grouped.rolling(f"{days}D")
        count, total = rolling.count().to_numpy(), rolling.sum().to_numpy()
        out.loc[ordered.index, f"CUSTOMER_NB_TX_{days}DAY"] = count
        out.loc[ordered.index, f"CUSTOMER_AVG_AMOUNT_{days}DAY"] = total / count
    return out


def run_fraud(data: Path, workdir: Path, seed: int, train_rows: int, log: Callable[[str], None]) -> dict[str, Any]:
    from training.train import WindowOptions

    frame = pd.read_parquet(data / FRAUD_FILE)
    if not frame["TX_DATETIME"].is_monotonic_increasing:
        frame = frame.sort_values("TX_DATETIME", kind="stable", ignore_index=True)
    month = frame["TX_DATETIME"].dt.month.to_numpy()
    scenario = frame["TX_FRAUD_SCENARIO"].to_numpy()
    may_normals = np.flatnonzero((month == 5) & (scenario == 0))
    train = np.sort(np.random.default_rng(seed).permutation(may_normals)[:train_rows])
    test = np.flatnonzero(month >= 6)
    log(f"fraud: {len(frame)} rows; train {train.size} of {may_normals.size} May normals; test {test.size} June-July")
    started = time.perf_counter()
    handbook = handbook_features(frame)
    handbook_s = time.perf_counter() - started
    frame = pd.concat([frame, handbook], axis=1)
    customer = WindowOptions(entities=("CUSTOMER_ID",), windows=FRAUD_WINDOWS, time_field="TX_DATETIME")
    both = WindowOptions(entities=("CUSTOMER_ID", "TERMINAL_ID"), windows=FRAUD_WINDOWS, time_field="TX_DATETIME")
    variants = {"none": (["TX_AMOUNT"], None), "windows": (["TX_AMOUNT"], both),
                "windows_customer": (["TX_AMOUNT"], customer), "handbook": (["TX_AMOUNT", *handbook.columns], None)}
    s = scenario[test]
    groups = {"scenarios 1+3": np.isin(s, (1, 3)), "scenario 1": s == 1, "scenario 3": s == 3, "scenario 2": s == 2,
              "all fraud": s != 0}
    results: dict[str, Any] = {}
    for name, (features, windows) in variants.items():
        scores, facts = train_and_score(frame, train, test, features, workdir, f"fraud-{name}", seed, windows)
        results[name] = {**facts, "columns": features, "windows": None if windows is None else vars(windows),
                         "metrics": {g: metrics(pos[(s == 0) | pos], scores[(s == 0) | pos])
                                     for g, pos in groups.items()}}
        log(f"fraud {name:17s} " + "  ".join(f"{g}: {m['roc_auc']:.4f}/{m['pr_auc']:.4f}"
                                              for g, m in results[name]["metrics"].items()))
    return {"rows": len(frame), "train_rows": int(train.size), "may_normals": int(may_normals.size),
            "test_rows": int(test.size), "handbook_seconds": round(handbook_s, 2),
            "results": results}


# --- network ------------------------------------------------------------------------------------------------


def run_network(workdir: Path, seed: int, hosts: int, seconds: float, log: Callable[[str], None]) -> dict[str, Any]:
    from training.train import WindowOptions

    frame = netscenario.scenario(hosts=hosts, seconds=seconds, seed=seed)
    half = netscenario.START + seconds / 2
    normal = (frame["label"] == "normal").to_numpy()
    ts = frame["ts"].to_numpy()
    train = np.flatnonzero(normal & (ts < half))
    test = np.flatnonzero(ts >= half)
    log(f"network: {len(frame)} events, {hosts} hosts, {seconds:.0f} s; train {train.size} normals of the first "
        f"half; test {test.size}")
    options = WindowOptions(entities=("id.orig_h",), windows=NET_WINDOWS, time_field="ts")
    labels = frame["label"].to_numpy()[test]
    groups = {"all attacks": labels != "normal", **{k: labels == k for k in ("portscan", "flood", "bruteforce")}}
    results: dict[str, Any] = {}
    for name, windows in (("none", None), ("windows", options)):
        scores, facts = train_and_score(frame, train, test, NET_FIELDS, workdir, f"net-{name}", seed, windows,
                                        NET_CATEGORICAL)
        negatives = labels == "normal"
        results[name] = {**facts, "metrics": {g: metrics(pos[negatives | pos], scores[negatives | pos])
                                              for g, pos in groups.items()}}
        log(f"network {name:8s} " + "  ".join(f"{g}: {m['roc_auc']:.4f}/{m['pr_auc']:.4f}"
                                             for g, m in results[name]["metrics"].items()))
    attacks = frame[~normal].groupby("attack_id").agg(kind=("label", "first"), events=("ts", "size"),
                                                      span_s=("ts", lambda t: float(t.max() - t.min())))
    return {"events": len(frame), "hosts": hosts, "seconds": seconds, "train_rows": int(train.size),
            "test_rows": int(test.size), "results": results,
            "attacks": [{"kind": kind, "events": int(events), "span_s": round(float(span), 2)}
                        for kind, events, span in attacks[["kind", "events", "span_s"]].to_numpy().tolist()]}


# --- memory and speed of the state --------------------------------------------------------------------------


def net_spec() -> Any:
    from training.contract import CATEGORICAL, NUMERIC
    from training.windows import build_spec

    kinds = {"id.orig_h": CATEGORICAL, "ts": NUMERIC,
             **{f: CATEGORICAL if f in NET_CATEGORICAL else NUMERIC for f in NET_FIELDS}}
    return build_spec(["id.orig_h"], list(NET_WINDOWS), "ts", kinds, list(NET_FIELDS))


def _inputs(spec: Any, frame: pd.DataFrame, fresh: bool) -> Any:
    """WindowInputs of `frame`; `fresh` gives every key and category its own string object, as JSON decoding does."""
    from training.data import raw_values
    from training.windows import window_inputs

    inputs = window_inputs(spec, {n: raw_values(frame[n]) for n in [*spec.key_fields, *NET_FIELDS]}, {}, len(frame))
    if fresh:
        inputs.keys[:] = [[None if k is None else k.encode().decode() for k in keys] for keys in inputs.keys]
        inputs.categorical[:] = [[None if v is None else v.encode().decode() for v in values]
                                 for values in inputs.categorical]
    return inputs


def state_bytes(spec: Any, frame: pd.DataFrame) -> tuple[int, Any]:
    """tracemalloc bytes a WindowState holds after taking `frame` (keys and categories as fresh strings)."""
    from training.window_state import WindowState

    batches = [frame.iloc[i:i + 10_000] for i in range(0, len(frame), 10_000)]
    WindowState(spec).advance(_inputs(spec, frame.iloc[:100], fresh=True))  # imports and caches outside the count
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    state = WindowState(spec, max_entities=10**7)
    for batch in batches:
        inputs = _inputs(spec, batch, fresh=True)
        out = state.advance(inputs)
        del inputs, out
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return held, state


def run_memory(entities: int, log: Callable[[str], None]) -> dict[str, Any]:
    from training import window_state

    spec = net_spec()
    rows = []
    for per_entity in (1, 5):
        # Spread over 50 s: nothing leaves the state (horizon = 60 s + 10 s grace).
        frame = netscenario.entity_events(entities, per_entity, seconds=50.0, seed=0)
        held, state = state_bytes(spec, frame)
        rows.append({"entities": state.entity_count(), "entries": state.entries, "bytes": held,
                     "estimated_bytes": state.estimated_bytes()})
        log(f"memory: {state.entity_count()} entities, {state.entries} entries: {held / 1e6:.1f} MB measured, "
            f"{state.estimated_bytes() / 1e6:.1f} MB estimated")
        del state
    one, five = rows
    entry = (five["bytes"] - one["bytes"]) / (five["entries"] - one["entries"])
    entity = one["bytes"] / one["entities"] - entry
    fields = len(spec.numeric) + len(spec.categorical)
    return {"spec": spec.to_dict(), "rows": rows, "entity_bytes": round(entity), "entry_bytes": round(entry),
            "entry_bytes_less_fields": round(entry - 8 * fields), "fields": fields,
            "constants": {"ENTITY_BYTES": window_state.ENTITY_BYTES, "ENTRY_BYTES": window_state.ENTRY_BYTES}}


def run_speed(hosts: int, seconds: float, seed: int, log: Callable[[str], None], repeats: int = 3) -> dict[str, Any]:
    from training.window_state import WindowState

    spec = net_spec()
    results: dict[str, dict[str, Any]] = {}
    profiled: list[Any] = []
    for name, frame in (("scenario", netscenario.scenario(hosts=hosts, seconds=seconds, seed=seed)),
                        ("normal only", netscenario.scenario(hosts=hosts, seconds=seconds, seed=seed,
                                                             with_attacks=False))):
        batches = [_inputs(spec, frame.iloc[i:i + BATCH], fresh=False) for i in range(0, len(frame), BATCH)]
        profiled = profiled or batches
        results[name] = {"events": len(frame)}
        for mode, features in (("features", True), ("replay", False)):
            times = []
            for _ in range(repeats):
                state = WindowState(spec)
                started = time.perf_counter()
                outs = [state.advance(b, features=features) for b in batches]
                times.append(time.perf_counter() - started)
            results[name][mode] = {"seconds": [round(t, 3) for t in times],
                                   "events_per_s": round(len(frame) / min(times))}
            if features:
                counts = np.concatenate(outs)[:, [spec.names.index(f"win:id.orig_h:{w}:count") for w in NET_WINDOWS]]
                results[name]["mean_events_in_window"] = {w: round(float(np.mean(counts[:, i])), 2)
                                                          for i, w in enumerate(NET_WINDOWS)}
        log(f"speed ({name}): {results[name]}")
    profile = cProfile.Profile()
    state = WindowState(spec)
    profile.enable()
    for b in profiled:
        state.advance(b)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(8)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return {"spec": spec.to_dict(), "batch": BATCH, "results": results, "profile": lines[start:start + 9]}


# --- worker pipeline ----------------------------------------------------------------------------------------


#: The network events' fields as the worker receives them (JSON records).
NET_COLUMNS = ["ts", "id.orig_h", *NET_FIELDS]


def net_bundles(frame: pd.DataFrame, seconds: float, workdir: Path, seed: int) -> dict[str, Path]:
    """Two bundles trained on the normal events of the scenario's first half: "none" on the single-event fields,
    "windows" on the same fields with windows per `id.orig_h` (`TrainConfig(windows=...)`, as
    `anomaly-train --entity id.orig_h --window 2s --window 60s --event-time ts`)."""
    from benchmarks.quality import frame_sha256
    from training.data import Labels
    from training.model import FitConfig
    from training.train import TrainConfig, WindowOptions, train_frame

    first = frame[frame["ts"] < netscenario.START + seconds / 2][[*NET_COLUMNS, "label"]]
    options = WindowOptions(entities=("id.orig_h",), windows=NET_WINDOWS, time_field="ts")
    paths = {}
    for name, chosen, windows in (("none", [*NET_FIELDS, "label"], None), ("windows", list(first.columns), options)):
        config = TrainConfig(fit=FitConfig(seed=seed), categorical=NET_CATEGORICAL, labels=Labels("label", "normal"),
                             windows=windows)
        paths[name] = workdir / f"tp-{name}"
        train_frame(first[chosen], paths[name], config, data_sha256=frame_sha256(first[chosen]), log=lambda _: None)
    return paths


def run_throughput(workdir: Path, hosts: int, seconds: float, seed: int, passes: int,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Pipeline.process over the scenario's events as JSON records (the same records for both pipelines), with a
    bundle trained on the single-event fields and one trained on the same fields with windows per `id.orig_h`
    (`TrainConfig(windows=...)`, as `anomaly-train --entity id.orig_h --window 2s --window 60s --event-time ts`),
    alternating, `passes` times; the windowed pipeline starts each pass with an empty state."""
    from training.bundle import load_bundle
    from worker.pipeline import Pipeline
    from worker.records import Record

    frame = netscenario.scenario(hosts=hosts, seconds=seconds, seed=seed)
    columns = NET_COLUMNS
    bundles = {name: load_bundle(path) for name, path in net_bundles(frame, seconds, workdir, seed).items()}
    out: dict[str, Any] = {"batch": BATCH, "passes": passes,
                           "model_inputs": {name: b.schema.width for name, b in bundles.items()}}
    for traffic, rows in (("scenario", frame), ("normal only", frame[frame["label"] == "normal"])):
        values = [json.dumps(row).encode() for row in rows[columns].to_dict("records")]
        times = rows["ts"].tolist()
        records = [Record("events", 0, i, None, v, int(times[i] * 1000)) for i, v in enumerate(values)]
        n = len(records)
        timings: dict[str, list[float]] = {"none": [], "windows": []}
        alerts: dict[str, int] = {}
        for _ in range(passes):
            for name, bundle in bundles.items():
                pipeline = Pipeline(bundle)
                pipeline.warm_up()
                started = time.perf_counter()
                alerts[name] = sum(len(pipeline.process(records[i:i + BATCH]).alerts) for i in range(0, n, BATCH))
                timings[name].append(time.perf_counter() - started)
        rates = {name: {"best": round(n / min(t)), "median": round(n / statistics.median(t))}
                 for name, t in timings.items()}
        log(f"throughput ({traffic}): {rates}, alerts {alerts}")
        out[traffic] = {"events": n, "alerts": alerts, "events_per_s": rates,
                        "seconds": {k: [round(x, 3) for x in v] for k, v in timings.items()},
                        "ratio_best": round(rates["windows"]["best"] / rates["none"]["best"], 3),
                        "ratio_median": round(rates["windows"]["median"] / rates["none"]["median"], 3)}
    return out


# --- report -------------------------------------------------------------------------------------------------


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data())
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fraud-train-rows", type=int, default=50_000)
    parser.add_argument("--hosts", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--passes", type=int, default=5)
    args = parser.parse_args(argv)
    command = "python -m benchmarks.windows " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
                              "seed": args.seed}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "windows.json"
    if path.is_file():  # parts run separately accumulate in one report
        report = {**json.loads(path.read_text()), **{k: report[k] for k in ("date", "machine")}}
    with tempfile.TemporaryDirectory(prefix="bench-windows-") as tmp:
        work = Path(tmp)
        for part in args.parts:
            started = time.perf_counter()
            if part == "fraud":
                report[part] = run_fraud(args.data, work, args.seed, args.fraud_train_rows, print)
            elif part == "network":
                report[part] = run_network(work, args.seed, args.hosts, args.seconds, print)
            elif part == "memory":
                report[part] = run_memory(args.entities, print)
            elif part == "speed":
                report[part] = run_speed(args.hosts, args.seconds, args.seed, print)
            else:
                report[part] = run_throughput(work, args.hosts, args.seconds, args.seed, args.passes, print)
            report[part]["command"] = command
            report[part]["date"] = report["date"]
            report[part]["wall_s"] = round(time.perf_counter() - started, 1)
            path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "windows.md").write_text(render_markdown(report))
    print(f"wrote {path} and {args.out / 'windows.md'}")


if __name__ == "__main__":
    main()
