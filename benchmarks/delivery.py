"""Exactly-once against at-least-once: the same worker, broker, backlog and run.

Run::

    .venv/bin/python -m benchmarks.delivery [--events 100000] [--rounds 2] [--bootstrap-servers HOST:PORT]

1. Start a local single-node broker (unless `--bootstrap-servers`) and train (or reuse) the bundle of
   benchmarks/throughput.py.
2. Produce `--events` NSL-KDD events to a 3-partition topic.
3. `--rounds` times, alternating so load changes on this shared machine hit both modes alike: the real
   worker (worker.wiring, as worker/main.py builds it; confluent client, batches of 1000) reads the whole
   backlog with a fresh group, once `--delivery at-least-once`, once `--delivery exactly-once` (one
   transaction per batch), until its offsets reach the end.
4. Report each run's events/s, the median per mode and the ratio (target: exactly-once >= 0.7x),
   in benchmarks/results/delivery.md and delivery.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.throughput import (
    MAX_BATCH,
    REPO,
    cached_bundle,
    create_topics,
    local_broker,
    make_events,
    produce,
    run_worker,
    sample_rows,
    worker_settings,
)

MODES = ("at-least-once", "exactly-once")
GOAL = 0.7


def measure(bootstrap: str, bundle: Path, events: int, rounds: int) -> dict[str, Any]:
    topic = f"delivery-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic, f"{topic}-alerts", f"{topic}-dlq"])
    ends = produce(bootstrap, topic, make_events(sample_rows(), events))
    runs: list[dict[str, Any]] = []
    for round_ in range(rounds):
        for mode in MODES if round_ % 2 == 0 else reversed(MODES):
            print(f"round {round_ + 1}: {mode} ...", file=sys.stderr)
            result = run_worker(worker_settings(bootstrap, bundle, topic, f"delivery-{mode}", delivery=mode), ends)
            runs.append({"round": round_ + 1, "mode": mode, **result})
            print(f"  {result['events_per_s']:,.0f} events/s", file=sys.stderr)
    median = {mode: statistics.median(r["events_per_s"] for r in runs if r["mode"] == mode) for mode in MODES}
    steady = {mode: statistics.median(r["events_per_s_after_join"] for r in runs if r["mode"] == mode)
              for mode in MODES}
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} Linux, nproc {os.cpu_count()}",
            "events": events, "max_batch": MAX_BATCH, "runs": runs, "median_events_per_s": median,
            "ratio": median["exactly-once"] / median["at-least-once"], "goal": GOAL,
            "median_events_per_s_after_join": steady,
            "ratio_after_join": steady["exactly-once"] / steady["at-least-once"]}


def render(report: dict[str, Any]) -> str:
    lines = ["# Delivery modes: exactly-once against at-least-once", "",
             f"Run {report['date']} on {report['machine']}; `python -m benchmarks.delivery`. "
             f"{report['events']:,} NSL-KDD events, 3 partitions, batches of {report['max_batch']}, confluent "
             "client, one local broker; each run reads the whole backlog with a fresh group.", "",
             "| round | delivery | events/s | events/s after join | seconds | alerts |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in report["runs"]:
        lines.append(f"| {r['round']} | {r['mode']} | {r['events_per_s']:,.0f} | "
                     f"{r['events_per_s_after_join']:,.0f} | {r['seconds']:.2f} | {r['alerts']:,} |")
    median, ratio = report["median_events_per_s"], report["ratio"]
    verdict = "met" if ratio >= report["goal"] else "NOT met"
    lines += ["", f"- Median at-least-once: **{median['at-least-once']:,.0f}** events/s; median exactly-once: "
                  f"**{median['exactly-once']:,.0f}** events/s.",
              f"- Exactly-once / at-least-once = **{ratio:.2f}**: {verdict} (goal >= {report['goal']}); "
              f"leaving out the group join: {report['ratio_after_join']:.2f}.",
              "- Exactly-once commits one transaction per batch: begin, produce, send the offsets with the "
              "group metadata, commit (a round trip to the transaction coordinator and the commit markers).", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.delivery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.events < 1 or args.rounds < 1:
        p.error("--events and --rounds must be positive")
    bundle = cached_bundle(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="delivery-") as tmp:
        broker: contextlib.AbstractContextManager[str] = (
            contextlib.nullcontext(args.bootstrap_servers) if args.bootstrap_servers else local_broker(Path(tmp)))
        with broker as bootstrap:
            report = measure(bootstrap, bundle, args.events, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "delivery.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "delivery.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
