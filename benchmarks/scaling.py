"""N anomaly-worker processes on N partitions, N = 1, 2, ... (issue 23, part 3): events/s per process, scaling
efficiency, and the CPU the broker and each worker use meanwhile.

Run::

    .venv/bin/python -m benchmarks.scaling [--events 200000] [--processes 1 2] [--repeats 2]

1. The bundle and the events of benchmarks/throughput.py (`cached_bundle`, `sample_rows` + `make_events`).
2. Start a local broker (unless `--bootstrap-servers`; then `--broker-pid` names its process for the CPU figures).
3. For each repeat, for each N (the order of the Ns reversed every other repeat), `run_processes`: as
   throughput.py's (f), generalised from two processes on four partitions to N on N:
   1. create a fresh N-partition topic; start N `anomaly-worker` processes in one group; wait until all are
      ready and the group has N members each holding a partition;
   2. read the CPU time (utime + stime, /proc/<pid>/stat) of the broker, of each worker and of this process;
   3. produce the events round-robin over the partitions (librdkafka, acks=all) and start the clock;
   4. poll the group's committed offsets every 0.1 s until they reach the end; stop the clock, read the CPU
      times again.
4. Per N the median events/s over the repeats; per process = that / N; efficiency = rate(N) / (N * rate(1)).
5. Write scaling.json and scaling.md into `--out`.
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
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.throughput import (
    _start_worker,
    _stop_worker,
    _wait_ready,
    cached_bundle,
    create_topics,
    local_broker,
    make_events,
    sample_rows,
)
from benchmarks.throughput_windows import commit_measured, quiet

REPO = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far, all its threads (/proc/<pid>/stat utime + stime)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name (field 2) may hold spaces; the fields after its closing parenthesis are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def efficiency(rates: dict[int, float]) -> dict[int, float]:
    """rate(N) / (N * rate(1)) for each N: 1.0 is linear scaling."""
    if 1 not in rates:
        raise ValueError(f"efficiency needs the rate of one process, got N = {sorted(rates)}")
    return {n: rate / (n * rates[1]) for n, rate in rates.items()}


def broker_pid(kafka_dir: Path) -> int:
    """The pid of the local broker node that throughput.py's `local_broker` started under `kafka_dir`."""
    return int((kafka_dir / "node-1" / "kafka.pid").read_text().strip())


def run_processes(bootstrap: str, bundle: Path, values: Sequence[bytes], n: int, broker: int | None,
                  deadline_s: float = 600.0) -> dict[str, Any]:
    """`n` anomaly-worker processes in one group on a fresh `n`-partition topic (steps 3.1-3.4 of the module)."""
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient

    topic, group = f"scale{n}-{uuid.uuid4().hex[:8]}", f"scaling-{n}-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic, f"{topic}-alerts", f"{topic}-dlq"], partitions=n)
    workers = []
    watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    admin = AdminClient({"bootstrap.servers": bootstrap})
    partitions = [TopicPartition(topic, p) for p in range(n)]
    try:
        for _ in range(n):
            workers.append(_start_worker(bootstrap, bundle, topic, group, "confluent"))
        for proc, port in workers:
            _wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        stop_at = time.monotonic() + 120
        while True:
            members = admin.describe_consumer_groups([group])[group].result(timeout=10).members
            if sum(1 for m in members if m.assignment.topic_partitions) == n:
                break
            if time.monotonic() > stop_at:
                raise RuntimeError(f"group {group} did not settle on {n} members with partitions")
            time.sleep(0.2)
        pids = [proc.pid for proc, _port in workers]
        cpu0 = _cpu(pids, broker)
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20,
                             "queue.buffering.max.messages": 1_000_000})
        started = time.perf_counter()
        for i, value in enumerate(values):
            while True:
                try:
                    producer.produce(topic, value=value, partition=i % n)
                    break
                except BufferError:  # the local queue is full: let deliveries drain it
                    producer.poll(0.05)
            if i % 10_000 == 0:
                producer.poll(0)
        producer.flush(120)
        produced = time.perf_counter() - started
        done_at_produced = _committed(watcher, partitions)
        stop_at = time.monotonic() + deadline_s
        while True:
            if time.monotonic() > stop_at:
                raise RuntimeError(f"{n} workers did not commit {len(values)} events within {deadline_s:.0f} s")
            for proc, _port in workers:
                if proc.poll() is not None:
                    raise RuntimeError(f"anomaly-worker exited with {proc.returncode}")
            if _committed(watcher, partitions) >= len(values):
                seconds = time.perf_counter() - started
                break
            time.sleep(0.1)
        cpu1 = _cpu(pids, broker)
    finally:
        for proc, _port in workers:
            _stop_worker(proc)
        watcher.close()
    workers_cpu = [b - a for a, b in zip(cpu0["workers"], cpu1["workers"], strict=True)]
    broker_cpu = None if broker is None else cpu1["broker"][0] - cpu0["broker"][0]
    own = cpu1["bench"][0] - cpu0["bench"][0]
    others = cpu1["machine"][0] - cpu0["machine"][0] - sum(workers_cpu) - (broker_cpu or 0.0) - own
    after = seconds - produced
    return {"processes": n, "partitions": n, "events": len(values), "seconds": seconds,
            "events_per_s": len(values) / seconds, "events_per_s_per_process": len(values) / seconds / n,
            "produce_seconds": produced, "committed_when_produced": done_at_produced,
            "events_per_s_after_produce": (len(values) - done_at_produced) / after if after > 0 else None,
            "worker_cpu_seconds": workers_cpu, "worker_cores": [c / seconds for c in workers_cpu],
            "broker_cpu_seconds": broker_cpu, "broker_cores": None if broker_cpu is None else broker_cpu / seconds,
            "bench_process_cores": own / seconds, "other_processes_cores": others / seconds}


def _cpu(workers: Sequence[int], broker: int | None) -> dict[str, list[float]]:
    """CPU seconds so far of each worker, of the broker (if known) and of this process."""
    own = os.times()
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    busy = (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS  # all CPUs, less idle and iowait
    return {"workers": [cpu_seconds(pid) for pid in workers],
            "broker": [] if broker is None else [cpu_seconds(broker)], "bench": [own.user + own.system],
            "machine": [busy]}


def _committed(watcher: Any, partitions: list[Any]) -> int:
    return sum(max(tp.offset, 0) for tp in watcher.committed(partitions, timeout=10))


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per N: median events/s over its runs, per process, efficiency, median CPU figures."""
    ns = sorted({r["processes"] for r in runs})
    rates = {n: statistics.median(r["events_per_s"] for r in runs if r["processes"] == n) for n in ns}
    eff = efficiency(rates) if 1 in rates else {}
    lines = []
    for n in ns:
        mine = [r for r in runs if r["processes"] == n]
        broker = [r["broker_cores"] for r in mine if r["broker_cores"] is not None]
        lines.append({"processes": n, "runs": len(mine), "events_per_s": rates[n],
                      "events_per_s_per_process": rates[n] / n, "efficiency": eff.get(n),
                      "events_per_s_runs": [r["events_per_s"] for r in mine],
                      "worker_cores_each": statistics.median(c for r in mine for c in r["worker_cores"]),
                      "broker_cores": statistics.median(broker) if broker else None,
                      "broker_cpu_seconds_per_100k_events": statistics.median(
                          100_000 * r["broker_cpu_seconds"] / r["events"] for r in mine)
                      if broker else None,
                      "bench_process_cores": statistics.median(r["bench_process_cores"] for r in mine)})
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    out = ["# Worker processes and cores: N processes on N partitions (issue 23)", "",
           f"Run {report['date']} on {report['machine']}, commit {report['commit']}; `{report['command']}`.", "",
           "| processes = partitions | events/s | events/s per process | efficiency | each worker's CPU (cores) "
           "| broker CPU (cores) | broker CPU s per 100k events | runs (events/s) |",
           "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for line in report["summary"]:
        eff = "n/a" if line["efficiency"] is None else f"**{line['efficiency']:.2f}**"
        broker = _maybe(line["broker_cores"], ".2f")
        per_100k = _maybe(line["broker_cpu_seconds_per_100k_events"], ".2f")
        out.append(f"| {line['processes']} | {line['events_per_s']:,.0f} | **{line['events_per_s_per_process']:,.0f}**"
                   f" | {eff} | {line['worker_cores_each']:.2f} | {broker} | {per_100k} "
                   f"| {', '.join(f'{x:,.0f}' for x in line['events_per_s_runs'])} |")
    out += ["", "- Efficiency = rate(N) / (N x rate(1)), from the medians over the runs. CPU in cores = CPU seconds "
            "(utime + stime of /proc/<pid>/stat, all threads) over the measured seconds; a worker's median over its "
            "runs and processes. The benchmark process (producer + offset watcher) used "
            + ", ".join(f"{line['bench_process_cores']:.2f}" for line in report["summary"])
            + f" cores at N = {', '.join(str(line['processes']) for line in report['summary'])}.",
            f"- The machine has {s['nproc']} cores, shared by the broker JVM, the workers, the producer and other "
            "work (load averages below): from N = nproc on the processes compete for cores, so efficiency there "
            "says what this machine gives, not what a worker would do with a core of its own.",
            "- Seconds run from the first produced record to the group's last commit (the producer overlaps the "
            "first seconds; the workers joined beforehand). \"Other processes\" = the machine's busy CPU "
            "(/proc/stat) less the workers, the broker and the benchmark: work this benchmark did not start.",
            "", "## Runs", "",
            "| N | seconds | events/s | after the producer finished | produce s | worker cores | broker cores "
            "| other processes' cores |",
            "|---:|---:|---:|---:|---:|---|---:|---:|"]
    out += [f"| {r['processes']} | {r['seconds']:.2f} | {r['events_per_s']:,.0f} | "
            f"{_maybe(r['events_per_s_after_produce'], ',.0f')} | {r['produce_seconds']:.2f} | "
            f"{', '.join(f'{c:.2f}' for c in r['worker_cores'])} | {_maybe(r['broker_cores'], '.2f')} "
            f"| {_maybe(r.get('other_processes_cores'), '.2f')} |"
            for r in report["runs"]]
    out += ["", "## Settings", ""]
    out += [f"- {k}: {v}" for k, v in s.items()]
    return "\n".join(out) + "\n"


def _maybe(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--processes", type=int, nargs="+", help="the Ns (default: 1 up to the machine's cores)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument("--broker-pid", type=int, help="with --bootstrap-servers: the broker's pid, for its CPU use")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()), help="where the bundle is cached")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    ns = sorted(set(args.processes or range(1, (os.cpu_count() or 1) + 1)))
    if min(args.events, args.repeats, *ns) < 1:
        p.error("--events, --repeats and --processes must be positive")
    import logging

    import confluent_kafka

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    load_before = os.getloadavg()
    bundle = cached_bundle(args.cache_dir)
    values = make_events(sample_rows(), args.events)
    runs = []
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        workdir = Path(tmp)
        broker: contextlib.AbstractContextManager[str] = (
            contextlib.nullcontext(args.bootstrap_servers) if args.bootstrap_servers else local_broker(workdir))
        with broker as bootstrap:
            pid = args.broker_pid if args.bootstrap_servers else broker_pid(workdir / "kafka")
            for repeat in range(args.repeats):
                for n in (ns if repeat % 2 == 0 else ns[::-1]):
                    waited = quiet()
                    print(f"repeat {repeat + 1}: {n} process(es) ...", file=sys.stderr)
                    result = run_processes(bootstrap, bundle, values, n, pid)
                    runs.append({"repeat": repeat + 1, "quiet_wait_s": waited, **result})
                    print(f"  {result['events_per_s']:,.0f} events/s", file=sys.stderr)
    load_after = os.getloadavg()
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} Linux, nproc {os.cpu_count()} (shared with other work)",
        "command": " ".join(["python -m benchmarks.scaling", *(sys.argv[1:] if argv is None else argv)]),
        "commit": commit_measured(), "runs": runs, "summary": summarise(runs),
        "settings": {
            "nproc": os.cpu_count(), "events per run": args.events, "repeats": args.repeats,
            "worker": "anomaly-worker --kafka-client confluent --max-batch 1000 (200 ms batch window)",
            "events": "benchmarks/throughput.py's backlog (NSL-KDD sample rows repeated, 41 fields)",
            "bundle": str(bundle), "python": platform.python_version(),
            "confluent-kafka / librdkafka": f"{confluent_kafka.__version__} / {confluent_kafka.libversion()[0]}",
            "broker": args.bootstrap_servers or "started by the benchmark (deploy/kafka/kafka-local.sh, 1 node)",
            "seconds waited for a quiet machine before each run": ", ".join(f"{r['quiet_wait_s']:g}" for r in runs),
            "load average (1, 5, 15 min) before / after": (
                f"{', '.join(f'{x:.2f}' for x in load_before)} / {', '.join(f'{x:.2f}' for x in load_after)}"),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "scaling.md").write_text(render_markdown(report))
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
