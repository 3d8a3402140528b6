"""The worker on a real broker with window features vs without, one run (issue 21: "throughput of the worker
with windows vs without, same run"; target: with windows at least 0.7x without).

Run::

    .venv/bin/python -m benchmarks.throughput_windows [--events 100000] [--pairs 3] [--bootstrap-servers HOST:PORT]

1. Build the network scenario (benchmarks/netscenario.py, Zeek conn-like, 500 hosts over an hour, about 105,000
   events) and train its two bundles as benchmarks/windows.py does (`net_bundles`): single-event fields, and the
   same fields with `--entity id.orig_h --window 2s --window 60s --event-time ts`.
2. Start a local broker with deploy/kafka/kafka-local.sh (unless `--bootstrap-servers`) and produce `--events`
   of the scenario's events (repeated, each copy shifted by the scenario's length so event time keeps
   increasing) to a `--partitions`-partition topic keyed by `id.orig_h`, as a producer keyed by entity does.
3. One unmeasured warm-up run with each bundle, then `--pairs` pairs of runs of the confluent worker of
   benchmarks/throughput.py (`run_worker`: the real Worker + Source + Sink + Pipeline wired by worker.wiring,
   one process, a fresh group from offset 0 until its commits reach the end offsets), alternating the bundle
   without and with windows (the order swapped each pair); the windowed worker starts each run with empty state
   (a fresh group has no restore point).
4. The confluent pass-through of benchmarks/throughput.py on the same topic, once, for reference.
5. Write windows-throughput.json and windows-throughput.md into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pandas as pd

from benchmarks import netscenario
from benchmarks.throughput import (
    _cpu_busy,
    create_topics,
    local_broker,
    run_passthrough,
    run_worker,
    worker_settings,
)
from benchmarks.windows import NET_COLUMNS, net_bundles

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.7
QUIET_MAX_S = 20.0


def keyed_events(frame: pd.DataFrame, n: int, seconds: float) -> list[tuple[bytes, bytes]]:
    """`n` events of `frame` (ordered by `ts`) as (key = id.orig_h, JSON value); the frame is repeated as often
    as needed, copy k with `ts` shifted by k * `seconds`, so event time keeps increasing."""
    rows = frame[NET_COLUMNS].to_dict("records")
    out = []
    for i in range(n):
        copy, row = divmod(i, len(rows))
        event = {**rows[row], "ts": rows[row]["ts"] + copy * seconds}
        out.append((str(event["id.orig_h"]).encode(), orjson.dumps(event)))
    return out


def produce_keyed(bootstrap: str, topic: str, events: Sequence[tuple[bytes, bytes]]) -> dict[tuple[str, int], int]:
    """Produce (acks=all, the default partitioner: one entity, one partition); the end offset of each partition.

    The record timestamps are the producer's clock: the windows read event time from the `ts` field, and the
    scenario's 2023 times as record timestamps would make the broker's 7-day retention delete the backlog while
    it is read (it did, in a first run)."""
    from confluent_kafka import Producer

    ends: dict[tuple[str, int], int] = {}
    failures: list[Any] = []

    def report(error: Any, message: Any) -> None:
        if error is not None:
            failures.append(error)
            return
        key = (message.topic(), message.partition())
        ends[key] = max(ends.get(key, 0), message.offset() + 1)

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20, "enable.idempotence": True,
                         "client.id": "throughput-windows"})
    for key, value in events:
        while True:
            try:
                producer.produce(topic, key=key, value=value, on_delivery=report)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(120) or failures:
        raise RuntimeError(f"backlog not fully acknowledged: {failures[:3]}")
    return ends


def quiet(max_s: float = QUIET_MAX_S) -> float:
    """Wait until the machine is quiet (CPU under 15 % busy over a second) or `max_s`; the seconds waited."""
    started = time.monotonic()
    while _cpu_busy(1.0) > 0.15 and time.monotonic() - started < max_s:
        pass
    return round(time.monotonic() - started, 1)


def measure(args: argparse.Namespace, bootstrap: str, bundles: dict[str, Path],
            events: Sequence[tuple[bytes, bytes]]) -> dict[str, Any]:
    topic = f"netevents-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic, f"{topic}-alerts", f"{topic}-dlq", f"{topic}-copy"], partitions=args.partitions)
    started = time.perf_counter()
    ends = produce_keyed(bootstrap, topic, events)
    produce_s = time.perf_counter() - started
    # Unmeasured: a first run paid 2.4 s more group join than later ones (the broker's group coordinator loading).
    warm_up = {name: run_worker(worker_settings(bootstrap, bundles[name], topic, f"win-warm-{name}"), ends)
               for name in ("none", "windows")}
    runs: list[dict[str, Any]] = []
    for pair in range(args.pairs):
        order = ("none", "windows") if pair % 2 == 0 else ("windows", "none")
        for name in order:
            waited = quiet()
            print(f"pair {pair + 1}: worker {name} ...", file=sys.stderr)
            result = run_worker(worker_settings(bootstrap, bundles[name], topic, f"win-{name}"), ends)
            runs.append({"pair": pair + 1, "bundle": name, "quiet_wait_s": waited, **result})
            print(f"pair {pair + 1}: worker {name}: {result['events_per_s']:,.0f} events/s, {result['alerts']} alerts",
                  file=sys.stderr)
    passthrough = None
    if not args.no_passthrough:
        waited = quiet()
        passthrough = {"quiet_wait_s": waited, **run_passthrough(
            worker_settings(bootstrap, bundles["none"], topic, "win-pass"), f"{topic}-copy", ends)}
    pairs = []
    for pair in range(1, args.pairs + 1):
        rate = {r["bundle"]: r["events_per_s"] for r in runs if r["pair"] == pair}
        steady = {r["bundle"]: r["events_per_s_after_join"] for r in runs if r["pair"] == pair}
        pairs.append({"pair": pair, "none": rate["none"], "windows": rate["windows"],
                      "ratio": rate["windows"] / rate["none"], "none_after_join": steady["none"],
                      "windows_after_join": steady["windows"],
                      "ratio_after_join": steady["windows"] / steady["none"]})
    median = {f"{name}{suffix}": statistics.median(r[f"events_per_s{suffix}"] for r in runs if r["bundle"] == name)
              for name in ("none", "windows") for suffix in ("", "_after_join")}
    return {"topic_partitions": {f"{t}[{p}]": o for (t, p), o in sorted(ends.items())},
            "produce_s": round(produce_s, 2),
            "warm_up_events_per_s": {k: v["events_per_s"] for k, v in warm_up.items()},
            "runs": runs, "pairs": pairs, "passthrough": passthrough,
            "median_events_per_s": median, "ratio_of_medians": median["windows"] / median["none"],
            "ratio_of_medians_after_join": median["windows_after_join"] / median["none_after_join"],
            "ratio_median_of_pairs": statistics.median(p["ratio"] for p in pairs)}


def commit_measured() -> str:
    out = subprocess.run(["git", "log", "-1", "--format=%h %cI"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "training", "worker"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + (" (training/ or worker/ with uncommitted changes)" if dirty else "")


def load_text(before: tuple[float, float, float], after: tuple[float, float, float]) -> str:
    """The load averages before and after a run, as the results files say them."""
    return f"{', '.join(f'{x:.2f}' for x in before)} / {', '.join(f'{x:.2f}' for x in after)}"


def write_report(out: Path, name: str, report: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """`out/<name>.json` and `out/<name>.md` (`render` of the report), and the Markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = render(report)
    (out / f"{name}.md").write_text(text)
    print(text)


def render_markdown(report: dict[str, Any]) -> str:
    m = report["measure"]
    s = report["settings"]
    ratio = m["ratio_of_medians"]
    verdict = "met" if ratio >= GOAL else "NOT met"
    out = ["# The worker on a broker: window features vs none, one run (issue 21)", "",
           f"Run {report['date']} on {report['machine']}, commit {report['commit']}; `{report['command']}`.", "",
           f"{s['events']:,} network-scenario events ({s['scenario']}), JSON, mean {s['mean_event_bytes']} bytes, "
           f"produced keyed by `id.orig_h` to one {s['partitions']}-partition topic ({s['entities']:,} entities); "
           "each run is the confluent worker of benchmarks/throughput.py (`run_worker`: Worker + Source + Sink + "
           f"Pipeline as worker/main.py wires them, one process, max batch {s['max_batch']}) reading the whole "
           "topic with a fresh group. `windows` = the bundle trained with `--entity id.orig_h --window 2s "
           f"--window 60s --event-time ts` ({s['model_inputs']['windows']} model inputs), `none` = the same fields "
           f"without windows ({s['model_inputs']['none']} model inputs); both trained by `benchmarks.windows."
           "net_bundles` on the normal events of the scenario's first half.", "",
           "| pair | run | bundle | seconds | events/s | events/s after join | alerts | process ms/batch |",
           "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(m["runs"], 1):
        out.append(f"| {r['pair']} | {i} | {r['bundle']} | {r['seconds']:.2f} | **{r['events_per_s']:,.0f}** | "
                   f"{r['events_per_s_after_join']:,.0f} | {r['alerts']:,} | {r['stage_ms'].get('process', 0):.1f} |")
    out += ["", "| pair | none events/s | windows events/s | with / without | with / without, after join |",
            "|---:|---:|---:|---:|---:|"]
    out += [f"| {p['pair']} | {p['none']:,.0f} | {p['windows']:,.0f} | **{p['ratio']:.2f}** | "
            f"{p['ratio_after_join']:.2f} |" for p in m["pairs"]]
    med = m["median_events_per_s"]
    steady = m["ratio_of_medians_after_join"]
    out += ["", f"- Median events/s: without windows {med['none']:,.0f}, with windows {med['windows']:,.0f}: "
                f"**{ratio:.2f}x** (median of the per-pair ratios {m['ratio_median_of_pairs']:.2f}); target "
                f">= {GOAL}x: **{verdict}**. Leaving out the group join: {med['none_after_join']:,.0f} and "
                f"{med['windows_after_join']:,.0f} events/s, **{steady:.2f}x** "
                f"({'met' if steady >= GOAL else 'NOT met'})."]
    if pt := m["passthrough"]:
        out.append(f"- Pass-through (confluent consume, produce each record, flush, commit) on the same topic: "
                   f"{pt['events_per_s']:,.0f} events/s; worker/pass-through: without windows "
                   f"{med['none'] / pt['events_per_s']:.2f}, with windows {med['windows'] / pt['events_per_s']:.2f}.")
    out += ["- Before the pairs, one unmeasured warm-up run with each bundle (a first run on a fresh broker pays "
            "seconds of group-coordinator loading): " + ", ".join(f"{k} {v:,.0f}" for k, v in
                                                                  m["warm_up_events_per_s"].items()) + " events/s.",
            "- Seconds run from the first poll (group join included) to the commit that reached the end offsets; "
            "\"after join\" leaves out the join. Stage means (ms per batch, `anomaly_batch_stage_seconds`): "
            + "; ".join(f"run {i} {r['bundle']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_ms"].items())
                        for i, r in enumerate(m["runs"], 1)) + ".",
            "- The broker JVM, the producer and the worker share the machine's CPUs with other work (load averages "
            "below); runs alternate, the order swapped each pair, so drift hits both bundles alike. Each run waited "
            f"for a quiet machine (CPU < 15 % over 1 s, at most {QUIET_MAX_S:.0f} s): "
            + ", ".join(f"{r['quiet_wait_s']:g}" for r in m["runs"]) + " s.", "", "## Settings", ""]
    out += [f"- {k}: {v}" for k, v in s.items()]
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.throughput_windows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--pairs", type=int, default=3, help="pairs of runs (without, with windows), alternating")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--hosts", type=int, default=500)
    p.add_argument("--seconds", type=float, default=3600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-passthrough", action="store_true", help="skip the pass-through reference run")
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if min(args.events, args.pairs, args.partitions) < 1:
        p.error("--events, --pairs and --partitions must be positive")
    import logging

    import confluent_kafka

    from training.bundle import load_bundle

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    load_before = os.getloadavg()
    commit = commit_measured()
    frame = netscenario.scenario(hosts=args.hosts, seconds=args.seconds, seed=args.seed)
    events = keyed_events(frame, args.events, args.seconds)
    with tempfile.TemporaryDirectory(prefix="throughput-windows-") as tmp:
        workdir = Path(tmp)
        started = time.perf_counter()
        bundles = net_bundles(frame, args.seconds, workdir, args.seed)
        train_s = time.perf_counter() - started
        widths = {name: load_bundle(path).schema.width for name, path in bundles.items()}
        if args.bootstrap_servers:
            measured = measure(args, args.bootstrap_servers, bundles, events)
        else:
            with local_broker(workdir) as bootstrap:
                measured = measure(args, bootstrap, bundles, events)
    load_after = os.getloadavg()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} Linux, nproc {os.cpu_count()}",
        "command": " ".join(["python -m benchmarks.throughput_windows", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit, "measure": measured,
        "settings": {
            "events": len(events), "scenario": f"{len(frame):,} events of {args.hosts} hosts over "
                                               f"{args.seconds:.0f} s, seed {args.seed}",
            "entities": len({key for key, _ in events}), "partitions": args.partitions,
            "mean_event_bytes": round(sum(len(v) for _, v in events) / len(events), 1),
            "max_batch": 1000, "model_inputs": widths, "training seconds (both bundles)": round(train_s, 1),
            "backlog produce seconds": measured["produce_s"],
            "python": platform.python_version(),
            "confluent-kafka / librdkafka": f"{confluent_kafka.__version__} / {confluent_kafka.libversion()[0]}",
            "broker": args.bootstrap_servers or "started by the benchmark (deploy/kafka/kafka-local.sh, 1 node)",
            "load average (1, 5, 15 min) before / after": load_text(load_before, load_after),
        },
    }
    write_report(args.out, "windows-throughput", report, render_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
