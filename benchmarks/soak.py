"""Soak: the worker for `--minutes` at half its measured capacity on a 3-node cluster, a broker restarted
every `--restart-every-s`; resident memory over time (its slope), lag, alert counts, the history verdict.

Run (not in CI; about 25 minutes with the defaults)::

    .venv/bin/python -m benchmarks.soak [--minutes 20] [--delivery exactly-once] [--restart-every-s 180]

1. Start a 3-node KRaft cluster (tests/faults/cluster.py, kafka-local.sh) and train a bundle that alerts
   on every scored event, so that the history checker can account for every input record.
2. Capacity: produce `--capacity-events` events, start `anomaly-worker` (`--delivery`) and time it from
   the first commit to the end offsets; the soak offers half of that rate.
3. Soak: a paced producer (idempotent, acks=all; every 40th event malformed) runs for `--minutes`;
   every `--restart-every-s` one broker (in turn 1, 2, 3) is SIGKILLed and started again on its storage.
   Every `--sample-every-s`: the worker's resident memory (VmRSS), the group's lag, alerts published,
   readiness.
4. Stop the load, wait until the group has committed the end offsets, read every input record, alert and
   dead letter (read_committed) and check: lost, duplicated, unexpected (tests/faults/history.py).
5. Memory slope: least squares over the samples after `--warm-up-s`, in MiB per hour, against the
   spread of those samples. Write benchmarks/results/soak.md and soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.throughput import REPO, SAMPLE, sample_rows
from tests.faults.cluster import NODES, Cluster
from tests.faults.harness import Load
from tests.faults.history import check, read_history
from tests.integration.test_worker_e2e import Topics, WorkerProcess, _free_port
from tests.kafka_broker import unique_topic, wait_for


def alerting_bundle(root: Path) -> Path:
    """A bundle whose threshold every event exceeds: each scored event is one alert."""
    import subprocess

    bundle = root / "bundle"
    subprocess.run([str(Path(sys.executable).parent / "anomaly-train"), "--data", str(SAMPLE), "--out", str(bundle),
                    "--label-column", "label", "--normal-value", "normal", "--drop", "difficulty", "--epochs", "2",
                    "--ensemble", "1", "--seed", "1", "--threshold", "1e-9"], check=True, stdout=subprocess.DEVNULL)
    return bundle


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scrape(worker: WorkerProcess) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(worker.url("/metrics"), timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels or sample.name in ("anomaly_alerts_published_total",):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
            elif sample.name in ("anomaly_transactions_total", "anomaly_consumer_lag_events"):
                key = sample.name + "".join(f"{{{v}}}" for v in sample.labels.values())
                out[key] = out.get(key, 0.0) + sample.value
    return out


def readyz(worker: WorkerProcess) -> bool:
    try:
        with urllib.request.urlopen(worker.url("/readyz"), timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--delivery", choices=("at-least-once", "exactly-once"), default="exactly-once")
    p.add_argument("--restart-every-s", type=float, default=180.0)
    p.add_argument("--sample-every-s", type=float, default=10.0)
    p.add_argument("--warm-up-s", type=float, default=180.0)
    p.add_argument("--capacity-events", type=int, default=30_000)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--worker-log", type=Path, help="keep the worker's log (INFO and up) at this path")
    args = p.parse_args(argv)
    templates = [json.dumps(r).encode() for r in sample_rows()]
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(tmp)
        bundle = alerting_bundle(root)
        try:
            with Cluster.started(root / "kafka") as cluster:
                report = soak(cluster, bundle, templates, args, root)
        finally:
            if args.worker_log is not None and (root / "worker.log").exists():
                shutil.copyfile(root / "worker.log", args.worker_log)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "soak.md").write_text(render(report))
    print(render(report))
    return 0 if not report["problems"] else 1


def produce_backlog(bootstrap: str, topic: str, templates: list[bytes], count: int) -> None:
    """`count` events (distinct ids, round-robin over the partitions) before the worker starts."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20,
                         "queue.buffering.max.messages": 1_000_000})
    for n in range(count):
        event = json.loads(templates[n % len(templates)])
        producer.produce(topic, value=json.dumps({**event, "id": f"backlog-{n}"}).encode(), partition=n % 3)
        if n % 10_000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError("the capacity backlog was not delivered")


def port_answers(address: str) -> bool:
    import socket

    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def port_closed(cluster: Cluster, node: int) -> bool:
    return not port_answers(cluster.address(node))


def end_offsets(bootstrap: str, topic: str) -> dict[int, int] | None:
    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_topic("soak-ends"),
                         "socket.timeout.ms": 5000})
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1] for p in range(3)}
    except KafkaException:
        return None
    finally:
        consumer.close()


def lag(cluster: Cluster, t: Topics) -> int | None:
    """End offsets minus the group's committed offsets (None while the cluster cannot say)."""
    ends = end_offsets(cluster.bootstrap, t.input)
    committed = cluster.committed(t.group, t.input)
    if ends is None or not committed:
        return None
    return sum(max(0, end - committed.get(p, 0)) for p, end in ends.items())


def malloc_text(env: dict[str, str]) -> str:
    """How the worker allocated memory: glibc's malloc unless LD_PRELOAD names another allocator."""
    if not env:
        return "glibc malloc, default arenas"
    return ", ".join(f"{k}={v}" for k, v in sorted(env.items()))


def start_worker(t: Topics, bundle: Path, brokers: str, delivery: str, root: Path) -> WorkerProcess:
    port = _free_port()
    cmd = [sys.executable, "-m", "worker.main", "--model", str(bundle), "--bootstrap-servers", brokers,
           "--input-topic", t.input, "--alert-topic", t.alerts, "--dead-letter-topic", t.dead_letters,
           "--group-id", t.group, "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
           "--delivery", delivery, "--transactional-id", f"{t.group}-0", "--log-level", "INFO"]
    return WorkerProcess(cmd, root / "worker.log", port)


def wait_committed(cluster: Cluster, t: Topics, worker: WorkerProcess, timeout: float) -> None:
    def done() -> bool:
        assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
        return lag(cluster, t) == 0

    wait_for(done, timeout, f"group {t.group} to commit the end offsets", interval=0.5)


def soak(cluster: Cluster, bundle: Path, templates: list[bytes], args: argparse.Namespace,
         root: Path) -> dict[str, Any]:
    t = Topics(unique_topic("soak-in"), unique_topic("soak-alerts"), unique_topic("soak-dlq"), unique_topic("soak"))
    cluster.create_topics([t.input, t.alerts, t.dead_letters])
    brokers = ",".join(cluster.address(n) for n in NODES)
    # 2. Capacity, on a backlog produced before the worker starts.
    produce_backlog(cluster.bootstrap, t.input, templates, args.capacity_events)
    worker = start_worker(t, bundle, brokers, args.delivery, root)
    try:
        def first_commit() -> int | None:
            left = lag(cluster, t)
            return left if left is not None and left < args.capacity_events else None

        first = wait_for(first_commit, 300, "the worker's first commit", interval=0.1)
        assert first is not None
        started = time.monotonic()
        wait_committed(cluster, t, worker, 900)
        capacity = first / (time.monotonic() - started)
        rate = max(20, int(capacity / 2) // 20 * 20)
        print(f"capacity {capacity:,.0f} events/s; soaking at {rate:,} events/s for {args.minutes} min",
              file=sys.stderr)
        # 3. Soak.
        load = Load(cluster.bootstrap, t.input, templates, rate=rate)
        load.start()
        samples: list[dict[str, Any]] = []
        restarts: list[dict[str, Any]] = []
        began = time.monotonic()
        next_restart, node = began + args.restart_every_s, 1
        while (now := time.monotonic()) - began < args.minutes * 60:
            assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
            if now >= next_restart:
                killed_at = time.monotonic()
                cluster.kill(node)
                wait_for(partial(port_closed, cluster, node), 60, f"node {node}'s port to close")
                cluster.restart(node)
                restarts.append({"at_s": round(killed_at - began, 1), "node": node,
                                 "down_s": round(time.monotonic() - killed_at, 1)})
                print(f"restarted broker {node} at {killed_at - began:.0f} s", file=sys.stderr)
                node = node % len(NODES) + 1
                next_restart += args.restart_every_s
            metrics = scrape(worker)
            samples.append({"t_s": round(time.monotonic() - began, 1), "rss_mib": round(rss_mib(worker.proc.pid), 1),
                            "lag": lag(cluster, t), "alerts": metrics.get("anomaly_alerts_published_total"),
                            "ready": readyz(worker), "sent": load.sent})
            time.sleep(max(0.0, args.sample_every_s - (time.monotonic() - now)))  # a sampling period, not a wait
        load.stop()
        # 4. Drain and judge.
        cluster.heal()
        wait_committed(cluster, t, worker, 600)
        verdict = check(*read_history(cluster.bootstrap, t.input, t.alerts, t.dead_letters))
        final = scrape(worker)
    finally:
        worker.stop()
    # 5. Memory slope after warm-up.
    warm = [s for s in samples if s["t_s"] >= args.warm_up_s]
    times = np.array([s["t_s"] for s in warm]) / 3600.0
    rss = np.array([s["rss_mib"] for s in warm])
    slope = float(np.polyfit(times, rss, 1)[0]) if len(warm) >= 3 else float("nan")
    edge = max(1, len(warm) // 10)  # the first and the last tenth of the samples after warm-up
    growth = float(np.median(rss[-edge:]) - np.median(rss[:edge])) if len(warm) >= 2 else float("nan")
    lags = [s["lag"] for s in samples if s["lag"] is not None]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} Linux, nproc {os.cpu_count()}",
        "command": " ".join(["python -m benchmarks.soak", *sys.argv[1:]]),
        # The worker inherits these: they choose its memory allocator and how glibc's arenas behave.
        "malloc_env": {k: os.environ[k] for k in ("LD_PRELOAD", "MALLOC_ARENA_MAX", "MALLOC_CONF") if k in os.environ},
        "delivery": args.delivery, "minutes": args.minutes, "capacity_events_per_s": round(capacity, 1),
        "rate_events_per_s": rate, "events_sent": load.sent + args.capacity_events,
        "restarts": restarts, "samples": samples,
        "rss_after_warm_up_mib": {"min": float(rss.min()) if rss.size else None,
                                  "max": float(rss.max()) if rss.size else None,
                                  "slope_mib_per_hour": slope, "growth_mib": growth},
        "lag": {"max": max(lags) if lags else None, "median": float(np.median(lags)) if lags else None},
        "longest_stall_s": longest_stall(samples),
        "alerts_published": final.get("anomaly_alerts_published_total"),
        "transactions": {k: v for k, v in final.items() if k.startswith("anomaly_transactions_total")},
        "verdict": verdict.summary(), "problems": verdict.problems(args.delivery),
        "lost": len(verdict.lost), "duplicated": len(verdict.duplicated),
    }


def longest_stall(samples: Sequence[dict[str, Any]]) -> float:
    """The longest time during which lag was above zero and no alert was published (seconds)."""
    longest, since = 0.0, None
    for before, after in zip(samples, samples[1:], strict=False):
        stalled = bool(after["lag"]) and after["alerts"] == before["alerts"]
        if stalled:
            since = before["t_s"] if since is None else since
            longest = max(longest, after["t_s"] - since)
        else:
            since = None
    return longest


def render(report: dict[str, Any]) -> str:
    rss = report["rss_after_warm_up_mib"]
    lines = ["# Soak: the worker under broker restarts", "",
             f"Run {report['date']} on {report['machine']}; `{report.get('command', 'python -m benchmarks.soak')}`; "
             f"allocator: {malloc_text(report.get('malloc_env', {}))}. "
             f"{report['minutes']:.0f} minutes at {report['rate_events_per_s']:,} events/s (half of the "
             f"{report['capacity_events_per_s']:,.0f} events/s measured first with this bundle), "
             f"`--delivery {report['delivery']}`, a 3-node cluster (rf 3, min.insync.replicas 2), one broker "
             f"SIGKILLed and restarted every few minutes ({len(report['restarts'])} restarts).", "",
             f"- History: {report['verdict']}; **lost {report['lost']}, duplicated {report['duplicated']}**"
             + (f"; problems: {report['problems']}" if report["problems"] else " (no problems for this mode)."),
             f"- Resident memory after warm-up: {rss['min']:.1f} to {rss['max']:.1f} MiB; least-squares slope "
             f"**{rss['slope_mib_per_hour']:+.1f} MiB/hour**; the last tenth of the samples against the first "
             f"(medians): **{rss['growth_mib']:+.1f} MiB**.",
             f"- Lag (events): median {report['lag']['median']}, max {report['lag']['max']}; longest stall (lag "
             f"above zero, no alert published): **{report.get('longest_stall_s', float('nan')):.0f} s**.",
             f"- Alerts published: {report['alerts_published']:,.0f}; transactions: {report['transactions']}.",
             "", "| t (s) | RSS MiB | lag | alerts | ready |", "|---:|---:|---:|---:|---|"]
    for s in report["samples"][::max(1, len(report["samples"]) // 40)]:
        lines.append(f"| {s['t_s']:.0f} | {s['rss_mib']:.1f} | {s['lag']} | {s['alerts']} | {s['ready']} |")
    lines += ["", "Broker restarts: " + ", ".join(f"node {r['node']} at {r['at_s']:.0f} s (back after "
                                                  f"{r['down_s']:.0f} s)" for r in report["restarts"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
