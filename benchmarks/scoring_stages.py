"""The scoring path alone (`Pipeline.process`, no Kafka) on one workload: events/s over passes, where a batch's
time goes stage by stage, and a cProfile of one pass. Used by benchmarks/throughput_feeds.py.

Run pinned to one CPU (what "one core" means in the results), as the feeds benchmark does::

    .venv/bin/python -m benchmarks.scoring_stages BUNDLE EVENTS.jsonl [--passes 9] [--cpu 0]

prints `{"scoring": scoring_passes, "stages": stage_times, "profile": profile_process}` as JSON. `--cpu` pins
the process (every thread TensorFlow and numpy start later inherit it) before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MAX_BATCH = 1000
MAX_EVENT_BYTES = 1_048_576
#: Stages timed one by one on the same batches, in the order a batch meets them (worker/pipeline.py).
STAGES = ("decode", "contract", "encode", "model call", "alerts")


def _batches(values: Sequence[bytes]) -> list[list[Any]]:
    from worker.records import Record

    records = [Record("memory", i % 3, i, None, v) for i, v in enumerate(values)]
    return [records[i:i + MAX_BATCH] for i in range(0, len(records), MAX_BATCH)]


def _pipeline(bundle_dir: Path) -> Any:
    """The worker's Pipeline on the bundle, BLAS single-threaded as worker.wiring runs it, warmed up."""
    from training.bundle import load_bundle
    from worker.pipeline import Pipeline
    from worker.threads import single_threaded_blas

    single_threaded_blas()
    pipeline = Pipeline(load_bundle(bundle_dir, None))
    pipeline.warm_up()
    return pipeline


def scoring_passes(bundle_dir: Path, values: Sequence[bytes], passes: int = 9) -> dict[str, Any]:
    """Events/s of `Pipeline.process` on batches of 1000 in-memory records, `passes` times over `values`; the
    best pass (least disturbed by other work), the median, every pass, and the share of events that alerted."""
    pipeline = _pipeline(bundle_dir)
    batches = _batches(values)
    rates, alerts = [], 0
    for _ in range(passes):
        alerts = 0
        started = time.perf_counter()
        for batch in batches:
            alerts += len(pipeline.process(batch).alerts)
        rates.append(len(values) / (time.perf_counter() - started))
    ordered = sorted(rates)
    return {"events": len(values), "passes": rates, "best_events_per_s": ordered[-1],
            "median_events_per_s": ordered[len(ordered) // 2], "alert_share": alerts / len(values),
            "affinity": sorted(os.sched_getaffinity(0))}


def stage_times(bundle_dir: Path, values: Sequence[bytes], passes: int = 5) -> dict[str, Any]:
    """Seconds per 1000 events of each stage of the scoring path, each the best of `passes`, timed on the same
    batches by calling the functions `Pipeline.process` calls, and `Pipeline.process` itself; "other" is the
    process time the stages do not account for (dead-letter bookkeeping, threshold, result assembly).

    decode = the JSON decoder (bytes -> event dicts); contract = `event_columns` (the data contract: typed
    columns, problems); encode = `FeatureSchema.encode` (scale, one-hot); model call = `Scorer.score` (the
    SavedModel signature and folding the errors per field); alerts = explanations (`explain_documents`) and
    `build_alert` for the rows above the threshold.
    """
    from training.contract import event_columns
    from worker.alerts import build_alert

    pipeline = _pipeline(bundle_dir)
    schema, scorer, threshold = pipeline.bundle.schema, pipeline.scorer, pipeline.threshold
    batches = _batches(values)
    kinds = pipeline._kinds  # noqa: SLF001 - the exact kinds the pipeline hands the contract
    now = time.time()

    def decode(batch: list[Any]) -> Any:
        return pipeline.decoder.decode([r.value for r in batch], MAX_EVENT_BYTES)

    # Each stage's inputs are prepared once, so each timing holds that stage alone.
    decoded = [decode(b) for b in batches]
    parsed = [event_columns(events, kinds) for events in decoded]
    encoded = [schema.encode(p.columns).matrix for p in parsed]
    scored = [scorer.score(m) for m in encoded]
    flagged = [(s.score > threshold).nonzero()[0].tolist() for s in scored]

    def alerts(i: int) -> None:
        events = decoded[i]
        documents = scorer.explain_documents(scored[i], flagged[i], [events[j] for j in flagged[i]],
                                             pipeline.top_features)
        for j, top in zip(flagged[i], documents, strict=True):
            build_alert(batches[i][j], events[j], float(scored[i].score[j]), threshold, pipeline.bundle.version,
                        top, now)

    work: dict[str, Callable[[int], Any]] = {
        "decode": lambda i: decode(batches[i]),
        "contract": lambda i: event_columns(decoded[i], kinds).valid_rows(),
        "encode": lambda i: schema.encode(parsed[i].columns),
        "model call": lambda i: scorer.score(encoded[i]),
        "alerts": alerts,
        "process": lambda i: pipeline.process(batches[i]),
    }
    best = {name: float("inf") for name in work}
    for _ in range(passes):
        for name, step in work.items():  # every stage in each pass, so drift hits them alike
            started = time.perf_counter()
            for i in range(len(batches)):
                step(i)
            best[name] = min(best[name], time.perf_counter() - started)
    per_k = {name: 1000.0 * seconds / len(values) for name, seconds in best.items()}
    per_k["other"] = max(0.0, per_k["process"] - sum(per_k[s] for s in STAGES))
    return {"seconds_per_1000_events": per_k,
            "share_of_process": {s: per_k[s] / per_k["process"] for s in (*STAGES, "other")},
            "alerts_per_1000_events": 1000.0 * sum(map(len, flagged)) / len(values), "passes": passes}


def profile_process(bundle_dir: Path, values: Sequence[bytes], top: int = 15) -> list[dict[str, Any]]:
    """cProfile of one pass of `Pipeline.process` (after a pass to warm up): the `top` functions by own time."""
    pipeline = _pipeline(bundle_dir)
    batches = _batches(values)
    for batch in batches:
        pipeline.process(batch)
    profiler = cProfile.Profile()
    profiler.enable()
    for batch in batches:
        pipeline.process(batch)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    table = stats.stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in table.values())
    rows = sorted(table.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls, "own_s": own, "cumulative_s": cum,
             "own_share": own / total} for (file, line, name), (_, calls, own, cum, _) in rows]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.scoring_stages", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("events", type=Path, help="JSON Lines, one event per line")
    p.add_argument("--passes", type=int, default=9)
    p.add_argument("--cpu", type=int, help="pin this process to this CPU first")
    args = p.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    values = args.events.read_bytes().splitlines()
    print(json.dumps({"scoring": scoring_passes(args.bundle, values, args.passes),
                      "stages": stage_times(args.bundle, values), "profile": profile_process(args.bundle, values)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
