"""Throughput and latency of the streaming worker against a real Kafka broker.

Run::

    .venv/bin/python -m benchmarks.throughput [--events 200000] [--bootstrap-servers HOST:PORT]

1. Start a local broker with deploy/kafka/kafka-local.sh on a free port (unless `--bootstrap-servers`).
2. Train one bundle with `anomaly-train` on data/sample/nsl-kdd-sample.csv (cached under the temp dir).
3. Produce a backlog of `--events` JSON events (the sample's 41 feature fields, rows repeated, distinct `id`).
4. (a) worker: the real `Worker` + Source + Sink of `--kafka-client` (default confluent) + `Pipeline`,
   wired as in worker/main.py, reads the backlog from offset 0 with a fresh group until its committed
   offsets reach the end.
5. (b) pass-through: kafka-python's KafkaSource/KafkaSink consumer and producer objects, plainly:
   poll up to 1000 records, send each unchanged to another topic, flush, commit.
6. (c) naive: the same Worker/Source/Sink, but a pipeline that decodes each event with
   stdlib `json` and scores it with its own 1-row model call, on the first `--naive-events` events.
7. (d) latency: `anomaly-worker` (subprocess) on a fresh topic while `anomaly-replay --rate --timestamp`
   offers half of (a)'s rate for `--latency-seconds`; a consumer of the alert topic measures
   alert arrival time minus the event's `timestamp`.
8. Write `throughput.json` and `throughput.md` (rendered from the same report dict) into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "nsl-kdd-sample.csv"
LAUNCHER = REPO / "deploy" / "kafka" / "kafka-local.sh"
NOT_FEATURES = ("label", "difficulty")
TRAIN_ARGS = ("--drop", "difficulty", "--label-column", "label", "--normal-value", "normal")
PARTITIONS = 3
MAX_BATCH = 1000
GOAL_VS_PASSTHROUGH = 0.7
GOAL_VS_NAIVE = 50.0


def _bin(name: str) -> str:
    """A console script installed next to this interpreter (the project's venv)."""
    return str(Path(sys.executable).parent / name)


# --- broker and bundle ------------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_broker_port() -> int:
    """A port whose controller port (+100, the launcher's default) is free too."""
    for _ in range(200):
        port = random.randint(20_000, 40_000)
        if _port_free(port) and _port_free(port + 100):
            return port
    raise RuntimeError("no free port pair for the local broker")


@contextlib.contextmanager
def local_broker(workdir: Path) -> Iterator[str]:
    """Start a single-node broker with the project's launcher; always stop it."""
    subprocess.run(["bash", str(LAUNCHER), "fetch"], check=True, stdout=subprocess.DEVNULL)
    kafka_dir = workdir / "kafka"
    port = free_broker_port()
    try:
        out = subprocess.run(["bash", str(LAUNCHER), "start", "--dir", str(kafka_dir), "--port", str(port)],
                             check=True, stdout=subprocess.PIPE, text=True)
        yield out.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(LAUNCHER), "stop", "--dir", str(kafka_dir)], check=False,
                       stdout=subprocess.DEVNULL)


def cached_bundle(cache_root: Path) -> Path:
    """Train once per (sample file, training arguments); later runs reuse the bundle."""
    from training.model import FitConfig, default_hidden

    # The model defaults are part of the key, so a change of defaults retrains.
    defaults = f"{FitConfig()!r} {default_hidden(0)!r}"
    key = hashlib.sha256(SAMPLE.read_bytes() + " ".join(TRAIN_ARGS).encode() + defaults.encode()).hexdigest()[:16]
    bundle = cache_root / f"anomaly-throughput-bundle-{key}"
    if not (bundle / "manifest.json").exists():
        print(f"training the benchmark bundle into {bundle}", file=sys.stderr)
        subprocess.run([_bin("anomaly-train"), "--data", str(SAMPLE), "--out", str(bundle), *TRAIN_ARGS],
                       check=True, stdout=subprocess.DEVNULL)
    return bundle


# --- events and topics ------------------------------------------------------------------------------------


def sample_rows() -> list[dict[str, Any]]:
    """The sample's rows as events (typed the way anomaly-replay types them), without label/difficulty."""
    from worker.replay import events

    rows = []
    for _key, value in events(SAMPLE, None, None):
        row = orjson.loads(value)
        for name in (*NOT_FEATURES, "id"):
            row.pop(name, None)
        rows.append(row)
    return rows


def make_events(rows: Sequence[dict[str, Any]], n: int) -> list[bytes]:
    """`n` JSON events: the rows repeated, each with a distinct `id`."""
    return [orjson.dumps({**rows[i % len(rows)], "id": i}) for i in range(n)]


def create_topics(bootstrap: str, names: Sequence[str], partitions: int = PARTITIONS) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="throughput-bench")
    try:
        admin.create_topics([NewTopic(n, partitions, 1) for n in names], timeout_ms=30_000)
    finally:
        admin.close()


def produce(bootstrap: str, topic: str, values: Sequence[bytes]) -> dict[tuple[str, int], int]:
    """Produce the backlog (acks=all) and return the end offset of every partition."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap.split(","), acks="all", linger_ms=20,
                             batch_size=512 * 1024, client_id="throughput-bench")
    try:
        futures = [producer.send(topic, value=v) for v in values]
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)
    ends: dict[tuple[str, int], int] = {}
    for f in futures:
        meta = f.get(timeout=0)
        key = (meta.topic, meta.partition)
        ends[key] = max(ends.get(key, 0), meta.offset + 1)
    return ends


# --- (a) and (c): the worker, in process ------------------------------------------------------------------


class CommitTracker:
    """A Source that delegates to the real one and remembers when it first polled and what it committed."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.committed: dict[tuple[str, int], int] = {}
        self.first_poll: float | None = None
        self.first_records: float | None = None
        self.last_commit: float | None = None
        self.polls = 0

    def poll_batch(self) -> list[Any]:
        if self.first_poll is None:
            self.first_poll = time.perf_counter()
        records: list[Any] = self.source.poll_batch()
        self.polls += 1
        if records and self.first_records is None:
            self.first_records = time.perf_counter()
        return records

    def commit(self, offsets: Any) -> None:
        self.source.commit(offsets)
        self.committed.update(offsets)
        self.last_commit = time.perf_counter()

    def rewind(self, offsets: Any) -> None:
        self.source.rewind(offsets)

    def lag(self) -> dict[tuple[str, int], int]:
        lag: dict[tuple[str, int], int] = self.source.lag()
        return lag

    def assigned(self) -> set[tuple[str, int]]:
        assigned: set[tuple[str, int]] = self.source.assigned()
        return assigned

    def reachable(self) -> bool:
        return bool(self.source.reachable())

    def close(self) -> None:
        self.source.close()

    def reached(self, ends: dict[tuple[str, int], int]) -> bool:
        return all(self.committed.get(k, 0) >= v for k, v in ends.items())


def worker_settings(bootstrap: str, bundle: Path, input_topic: str, tag: str, client: str = "confluent") -> Any:
    from worker.config import Settings

    return Settings(model=bundle, bootstrap_servers=bootstrap, input_topic=input_topic,
                    alert_topic=f"{input_topic}-alerts", dead_letter_topic=f"{input_topic}-dlq",
                    group_id=f"throughput-{tag}-{uuid.uuid4().hex[:8]}", max_batch=MAX_BATCH,
                    client_id=f"throughput-{tag}", kafka_client=client)


def run_worker(settings: Any, ends: dict[tuple[str, int], int], pipeline_class: type | None = None,
               deadline_s: float = 900.0) -> dict[str, Any]:
    """Build the worker exactly as worker/main.py does (worker.wiring); run until all is committed."""
    from worker.pipeline import Pipeline
    from worker.wiring import build_runtime, build_worker

    runtime = build_runtime(settings, pipeline_class or Pipeline)
    runtime.health.broker_ok = True
    worker = build_worker(runtime, wrap_source=CommitTracker)
    tracked = worker.source
    assert isinstance(tracked, CommitTracker)
    alerts = dead = consumed = 0
    stop_at = time.monotonic() + deadline_s
    try:
        while not tracked.reached(ends):
            if time.monotonic() > stop_at:
                raise RuntimeError(f"worker did not commit {ends} within {deadline_s:.0f} s: {tracked.committed}")
            result = worker.run_once()
            if result is not None:
                consumed += result.consumed
                alerts += len(result.alerts)
                dead += len(result.dead_letters)
    finally:
        worker.source.close()
        worker.sink.close()
    assert tracked.first_poll is not None and tracked.first_records is not None and tracked.last_commit
    events = sum(ends.values())
    seconds = tracked.last_commit - tracked.first_poll
    steady = tracked.last_commit - tracked.first_records
    return {"events": events, "consumed": consumed, "alerts": alerts, "dead_letters": dead,
            "seconds": seconds, "events_per_s": events / seconds, "join_seconds": steady and seconds - steady,
            "events_per_s_after_join": events / steady, "polls": tracked.polls}


def naive_pipeline_class() -> type:
    """The design the issue rules out: stdlib json per event and one model call per event."""
    from training.contract import Reason, event_columns
    from worker.alerts import build_alert
    from worker.pipeline import BatchResult, Pipeline
    from worker.records import DeadLetter

    class NaivePipeline(Pipeline):
        def process(self, records: Sequence[Any]) -> Any:
            schema = self.bundle.schema
            alerts, dead, scores = [], [], []
            for record in records:
                try:
                    event = json.loads(record.value)
                except (TypeError, ValueError) as exc:
                    dead.append(DeadLetter(record, Reason.INVALID_JSON, str(exc), self.bundle.version))
                    continue
                if not isinstance(event, dict):
                    dead.append(DeadLetter(record, Reason.NOT_AN_OBJECT, "expected a JSON object", self.bundle.version))
                    continue
                parsed = event_columns([event], schema.kinds)
                if parsed.problems:
                    problem = parsed.problems[0]
                    dead.append(DeadLetter(record, problem.reason, problem.message, self.bundle.version))
                    continue
                matrix = schema.encode(parsed.columns).matrix
                result = self.scorer.score(matrix)
                score = float(result.score[0])
                scores.append(score)
                if score > self.threshold:
                    contributions = self.scorer.explain(result, 0, event, self.top_features)
                    alerts.append(build_alert(record, event, score, self.threshold, self.bundle.version,
                                              contributions, self.clock()))
            return BatchResult(consumed=len(records), alerts=alerts, dead_letters=dead,
                               scores=np.asarray(scores, dtype=np.float64))

    return NaivePipeline


def scoring_only(bundle_dir: Path, values: Sequence[bytes]) -> dict[str, Any]:
    """Events/s of Pipeline.process and of the naive pipeline on in-memory records (no Kafka), batches of 1000."""
    from training.bundle import load_bundle
    from worker.pipeline import Pipeline
    from worker.records import Record

    bundle = load_bundle(bundle_dir, None)
    records = [Record("memory", i % PARTITIONS, i, None, v) for i, v in enumerate(values)]
    batches = [records[i:i + MAX_BATCH] for i in range(0, len(records), MAX_BATCH)]
    out: dict[str, Any] = {"events": len(records)}
    for name, cls in (("batched", Pipeline), ("naive", naive_pipeline_class())):
        pipeline = cls(bundle)
        pipeline.warm_up()
        started = time.perf_counter()
        for batch in batches:
            pipeline.process(batch)
        out[f"{name}_events_per_s"] = len(records) / (time.perf_counter() - started)
    out["batched_vs_naive"] = out["batched_events_per_s"] / out["naive_events_per_s"]
    return out


# --- (b): plain kafka-python pass-through -----------------------------------------------------------------


def run_passthrough(settings: Any, out_topic: str, ends: dict[tuple[str, int], int],
                    deadline_s: float = 900.0) -> dict[str, Any]:
    """Consume, produce each record unchanged, flush, commit; the consumer and producer are the worker's own."""
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    from worker.kafka_io import KafkaSink, KafkaSource

    source, sink = KafkaSource(settings), KafkaSink(settings)
    consumer, producer = source.consumer, sink.producer
    committed: dict[tuple[str, int], int] = {}
    first_poll = first_records = last_commit = None
    polls = 0
    stop_at = time.monotonic() + deadline_s
    try:
        while not all(committed.get(k, 0) >= v for k, v in ends.items()):
            if time.monotonic() > stop_at:
                raise RuntimeError(f"pass-through did not commit {ends} within {deadline_s:.0f} s")
            if first_poll is None:
                first_poll = time.perf_counter()
            polled = consumer.poll(timeout_ms=settings.max_wait_ms, max_records=MAX_BATCH)
            polls += 1
            if not polled:
                continue
            if first_records is None:
                first_records = time.perf_counter()
            futures = [producer.send(out_topic, key=m.key, value=m.value)
                       for batch in polled.values() for m in batch]
            producer.flush(timeout=settings.kafka_timeout_s)
            failed = [f for f in futures if not f.is_done or f.failed()]
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(futures)} pass-through records not acknowledged")
            offsets = {TopicPartition(tp.topic, tp.partition): OffsetAndMetadata(batch[-1].offset + 1, "", -1)
                       for tp, batch in polled.items()}
            consumer.commit(offsets=offsets, timeout_ms=int(settings.kafka_timeout_s * 1000))
            committed.update({(tp.topic, tp.partition): o.offset for tp, o in offsets.items()})
            last_commit = time.perf_counter()
    finally:
        source.close()
        sink.close()
    assert first_poll is not None and first_records is not None and last_commit is not None
    events = sum(ends.values())
    seconds, steady = last_commit - first_poll, last_commit - first_records
    return {"events": events, "seconds": seconds, "events_per_s": events / seconds,
            "join_seconds": seconds - steady, "events_per_s_after_join": events / steady, "polls": polls}


# --- (d): latency at a steady offered load ----------------------------------------------------------------


def _wait_ready(url: str, proc: subprocess.Popen[bytes], deadline_s: float = 120.0) -> None:
    stop_at = time.monotonic() + deadline_s
    while time.monotonic() < stop_at:
        if proc.poll() is not None:
            raise RuntimeError(f"anomaly-worker exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"anomaly-worker not ready at {url} within {deadline_s:.0f} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alert_collector(bootstrap: str, topic: str, latencies: list[float], stop: threading.Event,
                     started: threading.Event) -> None:
    """Assign every partition of the alert topic; per alert, arrival time minus the event's timestamp."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False,
                             auto_offset_reset="earliest", client_id="throughput-latency")
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(PARTITIONS)])
        consumer.poll(timeout_ms=100)
        started.set()
        while not stop.is_set():
            for batch in consumer.poll(timeout_ms=100).values():
                arrived = time.time()
                for m in batch:
                    stamp = orjson.loads(m.value).get("event_timestamp")
                    if stamp:
                        latencies.append(arrived - datetime.fromisoformat(stamp).timestamp())
    finally:
        consumer.close()


def run_latency(bootstrap: str, bundle: Path, rows: Sequence[dict[str, Any]], rate: float, seconds: float,
                workdir: Path, client: str = "confluent") -> dict[str, Any]:
    """anomaly-worker (subprocess) + anomaly-replay --rate --timestamp + an alert-topic consumer."""
    topic = f"latency-{uuid.uuid4().hex[:8]}"
    alert_topic, dlq_topic = f"{topic}-alerts", f"{topic}-dlq"
    create_topics(bootstrap, [topic, alert_topic, dlq_topic])
    n = max(1, int(rate * seconds))
    data = workdir / "latency-events.csv"
    names = list(rows[0])
    with data.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*names, "id"])
        for i in range(n):
            row = rows[i % len(rows)]
            writer.writerow([*(row[k] for k in names), i])
    metrics_port = _free_port()
    worker = subprocess.Popen(
        [_bin("anomaly-worker"), "--model", str(bundle), "--kafka-client", client, "--bootstrap-servers", bootstrap,
         "--input-topic", topic,
         "--alert-topic", alert_topic, "--dead-letter-topic", dlq_topic,
         "--group-id", f"throughput-latency-{uuid.uuid4().hex[:8]}", "--max-batch", str(MAX_BATCH),
         "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL)
    latencies: list[float] = []
    stop, started = threading.Event(), threading.Event()
    collector = threading.Thread(target=_alert_collector, args=(bootstrap, alert_topic, latencies, stop, started),
                                 daemon=True)
    try:
        _wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", worker)
        collector.start()
        if not started.wait(60):
            raise RuntimeError("alert consumer did not start")
        replay = subprocess.run(
            [_bin("anomaly-replay"), "--data", str(data), "--topic", topic, "--bootstrap-servers", bootstrap,
             "--rate", f"{rate:.0f}", "--timestamp"], check=True, stdout=subprocess.PIPE, text=True)
        # Drain: wait until no alert has arrived for 3 s (bounded).
        last, quiet_since, stop_at = -1, time.monotonic(), time.monotonic() + 60
        while time.monotonic() < stop_at and time.monotonic() - quiet_since < 3.0:
            if len(latencies) != last:
                last, quiet_since = len(latencies), time.monotonic()
            time.sleep(0.2)
    finally:
        stop.set()
        if collector.is_alive():
            collector.join(10)
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    values = np.asarray(latencies) * 1000.0
    return {"offered_events_per_s": rate, "events": n, "replay": replay.stdout.strip(), "alerts": int(values.size),
            "p50_ms": float(np.percentile(values, 50)) if values.size else None,
            "p99_ms": float(np.percentile(values, 99)) if values.size else None,
            "max_ms": float(values.max()) if values.size else None}


# --- report -----------------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any]) -> str:
    a, b, c, d = (report[k] for k in ("worker", "passthrough", "naive", "latency"))
    r = report["ratios"]
    client = report["settings"].get("worker Kafka client (a, c, d)", "kafka-python")

    def met(value: float, goal: float) -> str:
        return f"{'met' if value >= goal else 'NOT met'} (goal >= {goal:g})"

    lines = [
        "# Worker throughput and latency",
        "",
        f"Run {report['date']} on {report['machine']}; `{report['command']}`.",
        "",
        "| | what | events | seconds | events/s |",
        "|---|---|---:|---:|---:|",
        f"| (a) | worker ({client}): Worker + "
        f"Source + Sink + Pipeline | {a['events']:,} | {a['seconds']:.2f} "
        f"| **{a['events_per_s']:,.0f}** |",
        f"| (b) | kafka-python pass-through (consume, produce unchanged, flush, commit) | {b['events']:,} "
        f"| {b['seconds']:.2f} | **{b['events_per_s']:,.0f}** |",
        f"| (c) | naive: stdlib json + one model call per event, same Worker/Kafka path | {c['events']:,} "
        f"| {c['seconds']:.2f} | **{c['events_per_s']:,.0f}** |",
        "",
        f"- (a)/(b) = **{r['worker_vs_passthrough']:.2f}**: {met(r['worker_vs_passthrough'], GOAL_VS_PASSTHROUGH)}",
        f"- (a)/(c) = **{r['worker_vs_naive']:.1f}**: {met(r['worker_vs_naive'], GOAL_VS_NAIVE)}",
        f"- Seconds run from the first poll (consumer-group join included: (a) {a['join_seconds']:.2f} s, "
        f"(b) {b['join_seconds']:.2f} s, (c) {c['join_seconds']:.2f} s) to the commit that reached the end "
        f"offsets. Without the join: (a) {a['events_per_s_after_join']:,.0f}, (b) "
        f"{b['events_per_s_after_join']:,.0f}, (c) {c['events_per_s_after_join']:,.0f} events/s.",
        f"- (a) published {a['alerts']:,} alerts ({a['alerts'] / a['events']:.0%} of events) and "
        f"{a['dead_letters']} dead letters; (b) produced every one of its {b['events']:,} records.",
        f"- Scoring path alone (no Kafka; `Pipeline.process` vs the naive pipeline of (c) on the same "
        f"{report['scoring_only']['events']:,} in-memory records, batches of {MAX_BATCH}): "
        f"{report['scoring_only']['batched_events_per_s']:,.0f} vs "
        f"{report['scoring_only']['naive_events_per_s']:,.0f} events/s, "
        f"**{report['scoring_only']['batched_vs_naive']:.1f}x**.",
        "",
        "## End-to-end latency (d)",
        "",
        "| offered events/s | events | alerts measured | p50 ms | p99 ms | max ms |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {d['offered_events_per_s']:,.0f} | {d['events']:,} | {d['alerts']:,} | {_ms(d['p50_ms'])} "
        f"| {_ms(d['p99_ms'])} | {_ms(d['max_ms'])} |",
        "",
        f"anomaly-replay said: `{d['replay']}`.",
        "",
        "## Settings",
        "",
        *[f"- {k}: {v}" for k, v in report["settings"].items()],
        "",
        "## What each figure includes",
        "",
        *[f"- {line}" for line in report["method"]],
        "",
    ]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


METHOD = [
    "Backlog: the rows of data/sample/nsl-kdd-sample.csv (4,000 rows; 41 feature fields, label and difficulty "
    "dropped), repeated with a distinct integer `id`, produced once to a 3-partition topic with acks=all. "
    "(a) and (b) read that same topic, each from offset 0 with a fresh consumer group; (c) reads a "
    "3-partition topic holding the first --naive-events of the same events.",
    "(a): in process, the classes worker/main.py wires: `load_bundle`, `Pipeline` (warmed up), `WorkerMetrics` "
    "on a fresh registry, the Sink and Source of --kafka-client (max_batch 1000, max_wait_ms 200), "
    "`Worker.run_once` in a loop. A thin wrapper around the Source records the first poll and each commit. "
    "Includes decode, validate, encode, one model call per batch, explanations and alert documents for every "
    "alert, producing alerts (acks=all, idempotent), flush, commit, metrics. No HTTP server.",
    "(b): the KafkaConsumer and KafkaProducer objects built by KafkaSource and KafkaSink (so identical "
    "settings: max_poll_records 1000, acks=all, enable_idempotence, linger_ms 5, batch_size 256 KiB), used "
    "plainly: poll(max_records=1000), send every record unchanged to another topic, flush, check every "
    "future, commit the batch's next offsets. It produces every record, while (a) produces only alerts.",
    "(c): the same in-process Worker + Source + Sink as (a), with a Pipeline subclass whose process() "
    "handles one event at a time: `json.loads`, `event_columns` (the data contract) + `schema.encode` of a "
    "1-row batch, `bundle.scorer.score` on that 1-row matrix (one SavedModel call per event), then the same "
    "explanation and alert document for an anomalous event. Kafka batching, publishing and commits are as in (a).",
    "(d): `anomaly-worker` as a subprocess (--max-batch 1000, defaults otherwise) on a fresh 3-partition topic; "
    "`anomaly-replay --rate R --timestamp` (R = half of (a)) stamps `timestamp` (epoch ms, send time) into "
    "each event; a consumer assigned to the alert topic (in this process, no group) records arrival time "
    "minus the alert's `event_timestamp`. Only anomalous events produce alerts, so the alerts are the sample. "
    "Includes the producer's linger (20 ms in anomaly-replay), the worker's micro-batch wait (up to 200 ms) "
    "and the consumer's poll. All four use one clock (same machine).",
    "Everything (broker JVM, worker, producer, consumers) shares this machine's CPUs; other processes may have "
    "been running (see the load averages in Settings), so figures are indicative, and the ratios, measured "
    "minutes apart in one run, are more stable than the absolute numbers.",
]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000, help="backlog size for (a) and (b)")
    p.add_argument("--naive-events", type=int, default=2_000, help="events for the naive design (c)")
    p.add_argument("--latency-seconds", type=float, default=40.0, help="duration of the offered load in (d)")
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument("--kafka-client", choices=("confluent", "kafka-python"), default="confluent",
                   help="client of the worker in (a), (c) and (d); (b) is always kafka-python")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()), help="where the bundle is cached")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.events < 1 or args.naive_events < 1:
        p.error("--events and --naive-events must be positive")

    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    load_before = os.getloadavg()
    bundle = cached_bundle(args.cache_dir)
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        workdir = Path(tmp)
        broker: contextlib.AbstractContextManager[str] = (
            contextlib.nullcontext(args.bootstrap_servers) if args.bootstrap_servers else local_broker(workdir))
        with broker as bootstrap:
            report = _measure(args, bootstrap, bundle, workdir)
    load_after = os.getloadavg()
    report["settings"]["load average (1, 5, 15 min) before / after"] = (
        f"{', '.join(f'{x:.2f}' for x in load_before)} / {', '.join(f'{x:.2f}' for x in load_after)}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "throughput.md").write_text(render_markdown(report))
    print(render_markdown(report))
    return 0


def _step(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    print(f"{name} ...", file=sys.stderr)
    result = fn()
    print(f"{name}: {json.dumps(result)}", file=sys.stderr)
    return result


def _measure(args: argparse.Namespace, bootstrap: str, bundle: Path, workdir: Path) -> dict[str, Any]:
    import kafka

    rows = sample_rows()
    values = make_events(rows, args.events)
    run_id = uuid.uuid4().hex[:8]
    backlog, naive_topic, copy_topic = f"backlog-{run_id}", f"naive-{run_id}", f"passthrough-{run_id}"
    create_topics(bootstrap, [backlog, naive_topic, copy_topic, f"{backlog}-alerts", f"{backlog}-dlq",
                              f"{naive_topic}-alerts", f"{naive_topic}-dlq"])
    started = time.perf_counter()
    ends = produce(bootstrap, backlog, values)
    produce_s = time.perf_counter() - started
    naive_ends = produce(bootstrap, naive_topic, values[:args.naive_events])
    mean_bytes = sum(map(len, values)) / len(values)
    subset = values[:args.naive_events]
    del values
    scoring = _step("scoring path only", lambda: scoring_only(bundle, subset))

    client = args.kafka_client
    worker = _step("(a) worker", lambda: run_worker(
        worker_settings(bootstrap, bundle, backlog, "worker", client), ends))
    passthrough = _step("(b) pass-through", lambda: run_passthrough(
        worker_settings(bootstrap, bundle, backlog, "passthrough", "kafka-python"), copy_topic, ends))
    naive = _step("(c) naive", lambda: run_worker(
        worker_settings(bootstrap, bundle, naive_topic, "naive", client), naive_ends, naive_pipeline_class()))
    latency = _step("(d) latency", lambda: run_latency(
        bootstrap, bundle, rows, worker["events_per_s"] / 2, args.latency_seconds, workdir, client))
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} Linux, nproc {os.cpu_count()}",
        "command": " ".join(["python -m benchmarks.throughput", *sys.argv[1:]]),
        "worker": worker, "passthrough": passthrough, "naive": naive, "latency": latency, "scoring_only": scoring,
        "ratios": {"worker_vs_passthrough": worker["events_per_s"] / passthrough["events_per_s"],
                   "worker_vs_naive": worker["events_per_s"] / naive["events_per_s"],
                   "goal_worker_vs_passthrough": GOAL_VS_PASSTHROUGH, "goal_worker_vs_naive": GOAL_VS_NAIVE},
        "settings": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(), "kafka-python": kafka.__version__,
            "worker Kafka client (a, c, d)": client,
            "broker": "started by benchmark (deploy/kafka/kafka-local.sh, 1 node)" if not args.bootstrap_servers
                      else args.bootstrap_servers,
            "events (a, b)": args.events, "events (c)": args.naive_events,
            "mean event size bytes": round(mean_bytes, 1), "partitions": PARTITIONS,
            "max batch / max wait ms": f"{MAX_BATCH} / 200",
            "backlog produce seconds": round(produce_s, 2),
            "latency load seconds": args.latency_seconds,
            "bundle": str(bundle), "training": "anomaly-train --data data/sample/nsl-kdd-sample.csv "
                                               + " ".join(TRAIN_ARGS),
        },
        "method": METHOD,
    }


if __name__ == "__main__":
    sys.exit(main())
