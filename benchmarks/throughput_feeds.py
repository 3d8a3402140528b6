"""Two workloads through the same measurements, one run (issue 23, part 4): today's replay of the NSL-KDD sample
(about 57 % attacks, a third of events alert) and a realistic feed of mostly normal events.

Run::

    .venv/bin/python -m benchmarks.throughput_feeds [--events 200000] [--rounds 2] [--attack-share 0.03]

1. The bundle of benchmarks/throughput.py (`cached_bundle`: trained on data/sample/nsl-kdd-sample.csv).
2. The workloads, each `--events` JSON events (rows repeated, each with a distinct `id`):
   `today` = throughput.py's `sample_rows` (its backlog); `realistic` = `realistic_rows`: NSL-KDD's normal
   test rows (the one-class split of ../shared/data/README.md, seed 0, read from ../shared/data, never copied),
   less any row of the sample the bundle was trained on, plus the split's attacks so that they are
   `--attack-share` of the feed, shuffled.
3. Start a local broker (unless `--bootstrap-servers`); produce both backlogs to 3-partition topics.
4. The scoring path alone per workload (benchmarks/scoring_stages.py): `Pipeline.process` on batches of 1000,
   in a child process pinned to one CPU (one core), best and median of `--passes`; then in this process where a
   batch's time goes, stage by stage, and a cProfile of one pass.
5. `--rounds` rounds, the workload order swapped each round: per workload the confluent worker (a) and the
   confluent pass-through (b) of throughput.py (`run_worker`, `run_passthrough`), each from offset 0 with a fresh
   group; the ratio (a)/(b) per round and of the medians.
6. Latency per workload: throughput.py's `run_latency` (anomaly-worker subprocess, a paced producer) at 50 % of
   that workload's median worker rate; p50/p99 of event-to-alert time.
7. Write throughput-feeds.json and throughput-feeds.md into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks import scoring_stages
from benchmarks.quality import NSL_KDD_FILE, one_class_split, shared_data_dir
from benchmarks.throughput import (
    NOT_FEATURES,
    SAMPLE,
    cached_bundle,
    create_topics,
    local_broker,
    make_events,
    produce,
    run_latency,
    run_passthrough,
    run_worker,
    sample_rows,
    worker_settings,
)
from benchmarks.throughput_windows import commit_measured, load_text, quiet, write_report

REPO = Path(__file__).resolve().parents[1]
WORKLOADS = ("today", "realistic")
GOAL_VS_PASSTHROUGH = 0.8
GOAL_SCORING = 100_000.0
LATENCY_SHARE = 0.5


def realistic_rows(data_file: Path, training_sample: Path = SAMPLE, attack_share: float = 0.03,
                   seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Events of NSL-KDD's normal test rows with `attack_share` attacks among them, shuffled, and what was taken.

    1. The one-class split of `data_file` (benchmarks/quality.py `one_class_split`, `seed`): its test normals
       (the normals after the 60 % training cut) and its anomalies, in the split's shuffled order.
    2. Leave out every row whose CSV line is a line of `training_sample` (the bundle was trained on it).
    3. Take the first k anomalies, k = round(normals * share / (1 - share)); shuffle with `default_rng(seed)`.
    Events are typed as anomaly-replay types them (`worker.replay.events`), label and difficulty dropped.
    """
    from worker.replay import events

    if not 0.0 <= attack_share < 1.0:
        raise ValueError(f"attack share must be in [0, 1), got {attack_share}")
    lines = data_file.read_text().splitlines()[1:]
    seen = set(training_sample.read_text().splitlines()[1:])
    labels = np.array([line.rsplit(",", 2)[1] for line in lines])
    split = one_class_split(labels != "normal", seed=seed)
    in_sample = np.fromiter((line in seen for line in lines), dtype=bool, count=len(lines))
    normals = [i for i in split.test[~split.y_test].tolist() if not in_sample[i]]
    attacks = [i for i in split.test[split.y_test].tolist() if not in_sample[i]]
    wanted = round(len(normals) * attack_share / (1.0 - attack_share))
    if wanted > len(attacks):
        raise ValueError(f"{wanted} attacks wanted for a share of {attack_share}, the split has {len(attacks)}")
    chosen = np.random.default_rng(seed).permutation(np.array(normals + attacks[:wanted], dtype=np.intp)).tolist()
    rows = []
    for _key, value in events(data_file, None, None):
        row = orjson.loads(value)
        for name in (*NOT_FEATURES, "id"):
            row.pop(name, None)
        rows.append(row)
    taken = {"file": str(data_file), "test_normals": int((~split.y_test).sum()),
             "left_out_in_training_sample": int((~split.y_test).sum()) - len(normals),
             "normals": len(normals), "attacks": wanted, "attack_share": wanted / len(chosen),
             "attack_labels": dict(sorted(_counts(labels[attacks[:wanted]]).items()))}
    return [rows[i] for i in chosen], taken


def _counts(values: np.ndarray) -> dict[str, int]:
    names, counts = np.unique(values, return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def scoring_pinned(bundle: Path, values: Sequence[bytes], passes: int, workdir: Path) -> dict[str, Any]:
    """benchmarks/scoring_stages.py in a child process pinned to one CPU (the first this process may use): the
    scoring path's passes, its stage times and a profile."""
    data = workdir / f"scoring-{uuid.uuid4().hex[:8]}.jsonl"
    data.write_bytes(b"\n".join(values) + b"\n")
    cpu = min(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-m", "benchmarks.scoring_stages", str(bundle), str(data),
                          "--passes", str(passes), "--cpu", str(cpu)],
                         check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)
    data.unlink()
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def measure(args: argparse.Namespace, bootstrap: str, bundle: Path, values: dict[str, list[bytes]],
            workdir: Path) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    topics = {name: f"feed-{name}-{run_id}" for name in WORKLOADS}
    create_topics(bootstrap, [f"{t}{suffix}" for t in topics.values() for suffix in ("", "-alerts", "-dlq", "-copy")])
    ends = {name: produce(bootstrap, topics[name], values[name]) for name in WORKLOADS}
    scoring: dict[str, Any] = {}
    stages: dict[str, Any] = {}
    profile: dict[str, Any] = {}
    for name in WORKLOADS:
        subset = values[name][:args.scoring_events]
        quiet()
        print(f"scoring path {name} ...", file=sys.stderr)
        child = scoring_pinned(bundle, subset, args.passes, workdir)
        scoring[name], stages[name], profile[name] = child["scoring"], child["stages"], child["profile"]
    runs: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for name in (WORKLOADS if round_ % 2 == 0 else WORKLOADS[::-1]):
            for what in ("worker", "pass-through"):
                waited = quiet()
                print(f"round {round_ + 1}: {what} {name} ...", file=sys.stderr)
                settings = worker_settings(bootstrap, bundle, topics[name], f"feed-{what}-{name}")
                result = (run_worker(settings, ends[name]) if what == "worker"
                          else run_passthrough(settings, f"{topics[name]}-copy", ends[name]))
                runs.append({"round": round_ + 1, "workload": name, "what": what, "quiet_wait_s": waited, **result})
    medians = {name: {what: statistics.median(r["events_per_s"] for r in runs
                                              if r["workload"] == name and r["what"] == what)
                      for what in ("worker", "pass-through")} for name in WORKLOADS}
    ratios = {name: {"of_medians": m["worker"] / m["pass-through"],
                     "per_round": [w["events_per_s"] / p["events_per_s"] for w, p in zip(
                         [r for r in runs if r["workload"] == name and r["what"] == "worker"],
                         [r for r in runs if r["workload"] == name and r["what"] == "pass-through"], strict=True)]}
              for name, m in medians.items()}
    latency = {}
    for name in WORKLOADS:
        quiet()
        print(f"latency {name} ...", file=sys.stderr)
        latency[name] = run_latency(bootstrap, bundle, values[name], medians[name]["worker"] * LATENCY_SHARE,
                                    args.latency_seconds, workdir)
    return {"scoring": scoring, "stages": stages, "profile": profile, "runs": runs, "medians": medians,
            "ratios": ratios, "latency": latency}


def render_markdown(report: dict[str, Any]) -> str:
    m, s, feed = report["measure"], report["settings"], report["realistic_feed"]
    names = {"today": "today's (NSL-KDD sample replay)", "realistic": "realistic (normal test rows + attacks)"}
    out = ["# Two workloads, one run: today's replay and a realistic feed (issue 23)", "",
           f"Run {report['date']} on {report['machine']}, commit {report['commit']}; `{report['command']}`.", "",
           "| workload | attacks | alerts | worker events/s | pass-through events/s | worker / pass-through "
           "| p50 / p99 ms at 50 % | scoring path, one core: best (median) events/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in WORKLOADS:
        worker_runs = [r for r in m["runs"] if r["workload"] == name and r["what"] == "worker"]
        alerts = sum(r["alerts"] for r in worker_runs) / sum(r["events"] for r in worker_runs)
        lat, sc = m["latency"][name], m["scoring"][name]
        out.append(f"| {names[name]} | {s['attack share'][name]:.1%} | {alerts:.1%} "
                   f"| {m['medians'][name]['worker']:,.0f} | {m['medians'][name]['pass-through']:,.0f} "
                   f"| **{m['ratios'][name]['of_medians']:.2f}** | {_ms(lat['p50_ms'])} / {_ms(lat['p99_ms'])} "
                   f"| **{sc['best_events_per_s']:,.0f}** ({sc['median_events_per_s']:,.0f}) |")
    ratio, best = m["ratios"]["realistic"]["of_medians"], m["scoring"]["realistic"]["best_events_per_s"]
    out += ["", "## Targets on the realistic feed", "",
            f"- worker / confluent pass-through = **{ratio:.2f}** (per round: "
            f"{', '.join(f'{x:.2f}' for x in m['ratios']['realistic']['per_round'])}): "
            f"**{'met' if ratio >= GOAL_VS_PASSTHROUGH else 'NOT met'}** (goal >= {GOAL_VS_PASSTHROUGH})",
            f"- scoring path on one core, best of {len(m['scoring']['realistic']['passes'])} passes = "
            f"**{best:,.0f} events/s**: **{'met' if best >= GOAL_SCORING else 'NOT met'}** "
            f"(goal >= {GOAL_SCORING:,.0f})", "",
            "## Where the scoring path's time goes (ms per 1000 events, each stage the best of "
            f"{m['stages']['realistic']['passes']} passes, on the same pinned core)", "",
            "| workload | " + " | ".join(scoring_stages.STAGES) + " | other | `Pipeline.process` | alerts / 1000 |",
            "|---|" + "---:|" * (len(scoring_stages.STAGES) + 3)]
    for name in WORKLOADS:
        st = m["stages"][name]
        per, share = st["seconds_per_1000_events"], st["share_of_process"]
        out.append(f"| {name} | " + " | ".join(f"{per[k] * 1000:.2f} ({share[k]:.0%})"
                                               for k in (*scoring_stages.STAGES, "other"))
                   + f" | {per['process'] * 1000:.2f} | {st['alerts_per_1000_events']:.0f} |")
    out += ["", "cProfile of one `Pipeline.process` pass on the realistic feed, the largest own times:", "",
            "| function | calls | own s | own share |", "|---|---:|---:|---:|"]
    out += [f"| `{row['function']}` | {row['calls']:,} | {row['own_s']:.3f} | {row['own_share']:.1%} |"
            for row in m["profile"]["realistic"]]
    out += ["", "## Runs", "",
            "| round | workload | what | seconds | events/s | after join | alerts | process ms/batch |",
            "|---:|---|---|---:|---:|---:|---:|---:|"]
    out += [f"| {r['round']} | {r['workload']} | {r['what']} | {r['seconds']:.2f} | {r['events_per_s']:,.0f} | "
            f"{r['events_per_s_after_join']:,.0f} | {r.get('alerts', '')} | "
            f"{r.get('stage_ms', {}).get('process', float('nan')):.1f} |" for r in m["runs"]]
    out += ["", "Latency: " + "; ".join(
        f"{name}: offered {d['offered_events_per_s']:,.0f} events/s, {d['alerts']:,} alerts measured, p50 "
        f"{_ms(d['p50_ms'])} ms, p99 {_ms(d['p99_ms'])} ms, max {_ms(d['max_ms'])} ms" for name, d in
        m["latency"].items()) + ".", "",
            "## The realistic feed", "",
            f"NSL-KDD `{Path(feed['file']).name}` read from ../shared/data: the one-class split's "
            f"{feed['test_normals']:,} test normals, less {feed['left_out_in_training_sample']:,} that are rows of "
            f"the benchmark bundle's training sample, leaves {feed['normals']:,}; with {feed['attacks']:,} of the "
            "split's attacks "
            f"({feed['attack_share']:.1%}: " + ", ".join(f"{k} {v}" for k, v in feed["attack_labels"].items())
            + "), shuffled, then repeated with distinct ids to the event count.", "",
            "## Method", "",
            "- Worker = benchmarks/throughput.py's (a): the confluent Worker + Source + Sink + Pipeline wired by "
            "worker.wiring, in process, from offset 0 with a fresh group until its commits reach the end offsets; "
            "pass-through = its (b) with confluent-kafka (poll 1000, produce each record, flush, commit). Medians "
            "over the rounds; the order of the workloads swaps each round; each run waits for a quiet machine "
            "(CPU < 15 % over 1 s, at most 20 s).",
            "- Latency = its (e): anomaly-worker as a subprocess on a fresh topic, a librdkafka producer offering "
            f"{LATENCY_SHARE:.0%} of that workload's median worker rate for {s['latency seconds']:g} s, stamping "
            "the send time; alert arrival minus that time. Only alerts are measured: the realistic feed's sample "
            "is smaller.",
            "- Scoring path, one core = `Pipeline.process` on batches of 1000 in-memory records in a child process "
            "pinned to one CPU before TensorFlow starts (`sched_setaffinity`; all its threads share that CPU), BLAS "
            "single-threaded as in the worker; then in the same child each stage alone on the same batches (the "
            "functions `Pipeline.process` calls, inputs prepared beforehand), and a cProfile of one pass.", "",
            "## Settings", ""]
    out += [f"- {k}: {v}" for k, v in s.items()]
    return "\n".join(out) + "\n"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.throughput_feeds", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000, help="backlog size of each workload")
    p.add_argument("--rounds", type=int, default=2, help="rounds of worker and pass-through runs per workload")
    p.add_argument("--attack-share", type=float, default=0.03, help="share of attacks in the realistic feed")
    p.add_argument("--scoring-events", type=int, default=20_000, help="events for the scoring path alone")
    p.add_argument("--passes", type=int, default=9, help="passes of the scoring path")
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--data", type=Path, help=f"NSL-KDD file (default: shared data dir / {NSL_KDD_FILE})")
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()), help="where the bundle is cached")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if min(args.events, args.rounds, args.scoring_events, args.passes) < 1:
        p.error("--events, --rounds, --scoring-events and --passes must be positive")
    import logging

    import confluent_kafka

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    load_before = os.getloadavg()
    data = args.data or shared_data_dir() / NSL_KDD_FILE
    rows, feed = realistic_rows(data, attack_share=args.attack_share)
    workloads = {"today": sample_rows(), "realistic": rows}
    values = {name: make_events(workloads[name], args.events) for name in WORKLOADS}
    bundle = cached_bundle(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="throughput-feeds-") as tmp:
        workdir = Path(tmp)
        broker: contextlib.AbstractContextManager[str] = (
            contextlib.nullcontext(args.bootstrap_servers) if args.bootstrap_servers else local_broker(workdir))
        with broker as bootstrap:
            measured = measure(args, bootstrap, bundle, values, workdir)
    load_after = os.getloadavg()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} Linux, nproc {os.cpu_count()} (shared with other work)",
        "command": " ".join(["python -m benchmarks.throughput_feeds", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit_measured(), "measure": measured, "realistic_feed": feed,
        "settings": {
            "events per workload": args.events, "rounds": args.rounds, "partitions": 3, "max batch": 1000,
            "attack share": {"today": _sample_attack_share(), "realistic": feed["attack_share"]},
            "distinct rows": {name: len(workloads[name]) for name in WORKLOADS},
            "mean event bytes": {name: round(sum(map(len, values[name])) / len(values[name]), 1)
                                 for name in WORKLOADS},
            "scoring events / passes": f"{args.scoring_events} / {args.passes}",
            "latency seconds": args.latency_seconds, "bundle": str(bundle),
            "python": platform.python_version(),
            "confluent-kafka / librdkafka": f"{confluent_kafka.__version__} / {confluent_kafka.libversion()[0]}",
            "broker": args.bootstrap_servers or "started by the benchmark (deploy/kafka/kafka-local.sh, 1 node)",
            "load average (1, 5, 15 min) before / after": load_text(load_before, load_after),
        },
    }
    write_report(args.out, "throughput-feeds", report, render_markdown)
    return 0


def _sample_attack_share() -> float:
    """Share of the training sample's rows that are attacks (today's workload repeats them)."""
    lines = SAMPLE.read_text().splitlines()[1:]
    return sum(line.rsplit(",", 2)[1] != "normal" for line in lines) / len(lines)


if __name__ == "__main__":
    sys.exit(main())
