"""Throughput and latency of the streaming worker against a real Kafka broker, both Kafka clients, one run.

Run::

    .venv/bin/python -m benchmarks.throughput [--events 200000] [--bootstrap-servers HOST:PORT]

1. Start a local broker with deploy/kafka/kafka-local.sh on a free port (unless `--bootstrap-servers`).
2. Train one bundle with `anomaly-train` on data/sample/nsl-kdd-sample.csv (cached under the temp dir).
3. Produce a backlog of `--events` JSON events (the sample's 41 feature fields, rows repeated, distinct `id`).
4. (d) scoring path alone: `Pipeline.process` on in-memory records, batches of 1000, no Kafka.
5. For each client (confluent-kafka, kafka-python):
   (a) worker: the real `Worker` + Source + Sink + `Pipeline`, wired by worker.wiring as worker/main.py
   does, reads the backlog from offset 0 with a fresh group until its committed offsets reach the end;
   (b) pass-through: the same client's consumer and producer, plainly: poll up to 1000 records, produce
   each unchanged to another topic, flush, commit.
6. (c) naive: the confluent worker with a pipeline that decodes each event with stdlib `json` and scores
   it with its own 1-row model call, on the first `--naive-events` events.
7. (e) latency: `anomaly-worker` (subprocess) on a fresh topic while a paced librdkafka producer offers
   50 % and then 90 % of (a)'s confluent rate; a consumer of the alert topic measures alert arrival time
   minus the event's `timestamp`.
8. (f) two `anomaly-worker` processes in one group on a 4-partition topic.
9. Write `throughput.json` and `throughput.md` (rendered from the same report dict) into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any, cast

import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "nsl-kdd-sample.csv"
LAUNCHER = REPO / "deploy" / "kafka" / "kafka-local.sh"
NOT_FEATURES = ("label", "difficulty")
TRAIN_ARGS = ("--drop", "difficulty", "--label-column", "label", "--normal-value", "normal")
PARTITIONS = 3
CLIENTS = ("confluent", "kafka-python")
MAX_BATCH = 1000
BATCH_WINDOW_MS = 200
GOAL_VS_PASSTHROUGH = 0.8
GOAL_SCORING = 60_000.0
#: The kafka-python worker before issue 9 (benchmarks/results/throughput.md at 03a7083, 200,000 events).
PREVIOUS_KAFKA_PYTHON = {"events_per_s": 4_702, "worker_vs_passthrough": 1.62,
                         "run": "2026-11-29 12:21, 200,000 events"}


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
    from training.model import default_hidden
    from training.train import TrainConfig

    # The training defaults (model and score) are part of the key, so a change of defaults retrains.
    defaults = f"{TrainConfig()!r} {default_hidden(0)!r}"
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
        self.saw_commit(offsets)

    def saw_commit(self, offsets: Any) -> None:
        """Offsets are committed (by this source, or in a transaction by `TransactionTracker`)."""
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


class TransactionTracker:
    """An exactly-once Sink that delegates to the real one and tells the `CommitTracker` what it committed."""

    def __init__(self, sink: Any, tracker: CommitTracker) -> None:
        self.sink, self.tracker = sink, tracker

    def publish(self, alerts: Any, dead_letters: Any) -> None:
        self.sink.publish(alerts, dead_letters)

    def publish_and_commit(self, alerts: Any, dead_letters: Any, offsets: Any) -> None:
        self.sink.publish_and_commit(alerts, dead_letters, offsets)
        self.tracker.saw_commit(offsets)

    def close(self) -> None:
        self.sink.close()


def worker_settings(bootstrap: str, bundle: Path, input_topic: str, tag: str, client: str = "confluent",
                    delivery: str = "at-least-once") -> Any:
    from worker.config import Settings

    group = f"throughput-{tag}-{uuid.uuid4().hex[:8]}"
    return Settings(model=bundle, bootstrap_servers=bootstrap, input_topic=input_topic,
                    alert_topic=f"{input_topic}-alerts", dead_letter_topic=f"{input_topic}-dlq",
                    group_id=group, max_batch=MAX_BATCH, client_id=f"throughput-{tag}", kafka_client=client,
                    delivery=delivery, transactional_id=group)


def run_worker(settings: Any, ends: dict[tuple[str, int], int], pipeline_class: type | None = None,
               deadline_s: float = 900.0) -> dict[str, Any]:
    """Build the worker exactly as worker/main.py does (worker.wiring); run until all is committed."""
    from worker.pipeline import Pipeline
    from worker.wiring import build_runtime, build_worker

    runtime = build_runtime(settings, pipeline_class or Pipeline)
    runtime.broker.set(True)
    from worker.loop import TransactionalSink

    worker = build_worker(runtime, wrap_source=CommitTracker)
    tracked = worker.source
    assert isinstance(tracked, CommitTracker)
    if isinstance(worker.sink, TransactionalSink):
        worker.sink = TransactionTracker(worker.sink, tracked)
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
    from prometheus_client import generate_latest

    stages = stage_means_from_text(generate_latest(runtime.registry).decode())
    assert tracked.first_poll is not None and tracked.first_records is not None and tracked.last_commit
    events = sum(ends.values())
    seconds = tracked.last_commit - tracked.first_poll
    steady = tracked.last_commit - tracked.first_records
    return {"events": events, "consumed": consumed, "alerts": alerts, "dead_letters": dead,
            "seconds": seconds, "events_per_s": events / seconds, "join_seconds": steady and seconds - steady,
            "events_per_s_after_join": events / steady, "polls": tracked.polls, "stage_ms": stages}


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
                    contributions = [c.to_dict() for c in self.scorer.explain(result, 0, event, self.top_features)]
                    alerts.append(build_alert(record, event, score, self.threshold, self.bundle.version,
                                              contributions, self.clock()))
            return BatchResult(consumed=len(records), alerts=alerts, dead_letters=dead,
                               scores=np.asarray(scores, dtype=np.float64))

    return NaivePipeline


def scoring_only(bundle_dir: Path, values: Sequence[bytes], naive_events: int, passes: int = 9) -> dict[str, Any]:
    """Events/s of Pipeline.process (all `values`) and of the naive pipeline (the first `naive_events`) on
    in-memory records (no Kafka), batches of 1000. The batched figure is the median of `passes` passes
    over the events (a long-running worker's steady state); the first pass after `warm_up` is reported
    too (earlier runs reported only that one)."""
    from training.bundle import load_bundle
    from worker.pipeline import Pipeline
    from worker.records import Record
    from worker.threads import single_threaded_blas

    single_threaded_blas()  # as the worker runs (worker.wiring.build_runtime)
    bundle = load_bundle(bundle_dir, None)
    records = [Record("memory", i % PARTITIONS, i, None, v) for i, v in enumerate(values)]
    out: dict[str, Any] = {"events": len(records), "naive_events": min(naive_events, len(records))}
    for name, cls, subset, rounds in (("batched", Pipeline, records, passes),
                                      ("naive", naive_pipeline_class(), records[:naive_events], 1)):
        batches = [subset[i:i + MAX_BATCH] for i in range(0, len(subset), MAX_BATCH)]
        pipeline = cls(bundle)
        pipeline.warm_up()
        rates = []
        for _ in range(rounds):
            started = time.perf_counter()
            for batch in batches:
                pipeline.process(batch)
            rates.append(len(subset) / (time.perf_counter() - started))
        out[f"{name}_events_per_s"] = float(np.median(rates))
        if name == "batched":
            out["batched_first_pass_events_per_s"] = rates[0]
            out["batched_pass_events_per_s"] = rates
    out["batched_vs_naive"] = out["batched_events_per_s"] / out["naive_events_per_s"]
    return out


# --- (b): plain kafka-python pass-through -----------------------------------------------------------------


def run_passthrough(settings: Any, out_topic: str, ends: dict[tuple[str, int], int],
                    deadline_s: float = 900.0) -> dict[str, Any]:
    """Consume, produce each record unchanged, flush, commit; the client is `settings.kafka_client`."""
    if settings.kafka_client == "confluent":
        return _passthrough_confluent(settings, out_topic, ends, deadline_s)
    return _passthrough_kafka_python(settings, out_topic, ends, deadline_s)


def _passthrough_kafka_python(settings: Any, out_topic: str, ends: dict[tuple[str, int], int],
                              deadline_s: float) -> dict[str, Any]:
    """kafka-python: the consumer and producer built by KafkaSource and KafkaSink, used plainly."""
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    from worker.kafka.kafka_python import KafkaSink, KafkaSource

    source, sink = KafkaSource(settings), KafkaSink(settings)
    consumer, producer = source.consumer, sink.producer
    clock = _PassClock(ends, deadline_s)
    try:
        while not clock.done():
            polled = consumer.poll(timeout_ms=settings.max_wait_ms, max_records=MAX_BATCH)
            clock.polled(bool(polled))
            if not polled:
                continue
            futures = [producer.send(out_topic, key=m.key, value=m.value)
                       for batch in polled.values() for m in batch]
            producer.flush(timeout=settings.kafka_timeout_s)
            failed = [f for f in futures if not f.is_done or f.failed()]
            if failed:
                raise RuntimeError(f"{len(failed)} of {len(futures)} pass-through records not acknowledged")
            offsets = {TopicPartition(tp.topic, tp.partition): OffsetAndMetadata(batch[-1].offset + 1, "", -1)
                       for tp, batch in polled.items()}
            consumer.commit(offsets=offsets, timeout_ms=int(settings.kafka_timeout_s * 1000))
            clock.committed({(tp.topic, tp.partition): o.offset for tp, o in offsets.items()})
    finally:
        source.close()
        sink.close()
    return clock.result()


def _passthrough_confluent(settings: Any, out_topic: str, ends: dict[tuple[str, int], int],
                           deadline_s: float) -> dict[str, Any]:
    """confluent-kafka: the Consumer and Producer built by ConfluentSource and ConfluentSink, used plainly.

    That consumer has `auto.offset.reset` "error" (the source applies its own start policy): librdkafka
    reports each partition of this fresh group as having no position, and the loop starts it at the
    earliest offset, which is what the source does for a group with nothing committed.
    """
    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    from worker.kafka.confluent import ConfluentSink, ConfluentSource

    source, sink = ConfluentSource(settings), ConfluentSink(settings)
    consumer, producer = source.consumer, sink.producer
    clock = _PassClock(ends, deadline_s)
    failures: list[Any] = []
    acked = 0

    def report(error: Any, _message: Any) -> None:
        nonlocal acked
        if error is None:
            acked += 1
        else:
            failures.append(error)

    try:
        while not clock.done():
            polled = consumer.consume(num_messages=MAX_BATCH, timeout=settings.max_wait_ms / 1000.0)
            messages = [m for m in polled if m.error() is None]
            unstarted = [TopicPartition(m.topic(), m.partition(), OFFSET_BEGINNING) for m in polled
                         if m.error() is not None and m.error().code() == KafkaError._AUTO_OFFSET_RESET]
            if unstarted:
                consumer.incremental_unassign([TopicPartition(tp.topic, tp.partition) for tp in unstarted])
                consumer.incremental_assign(unstarted)
            clock.polled(bool(messages))
            if not messages:
                continue
            acked, nexts = 0, {}
            for m in messages:
                try:
                    producer.produce(out_topic, key=m.key(), value=m.value(), on_delivery=report)
                except BufferError:
                    producer.flush(settings.kafka_timeout_s)
                    producer.produce(out_topic, key=m.key(), value=m.value(), on_delivery=report)
                nexts[(m.topic(), m.partition())] = m.offset() + 1
            producer.flush(settings.kafka_timeout_s)
            if failures or acked != len(messages):
                raise RuntimeError(f"{len(messages) - acked} of {len(messages)} pass-through records not acknowledged")
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in nexts.items()], asynchronous=False)
            clock.committed(nexts)
    finally:
        source.close()
        sink.close()
    return clock.result()


class _PassClock:
    """First poll, first records and last commit of a pass-through; done when the commits reach the ends."""

    def __init__(self, ends: dict[tuple[str, int], int], deadline_s: float) -> None:
        self.ends, self.deadline_s = ends, deadline_s
        self.stop_at = time.monotonic() + deadline_s
        self.commits: dict[tuple[str, int], int] = {}
        self.first_poll: float | None = None
        self.first_records: float | None = None
        self.last_commit: float | None = None
        self.polls = 0

    def done(self) -> bool:
        if all(self.commits.get(k, 0) >= v for k, v in self.ends.items()):
            return True
        if time.monotonic() > self.stop_at:
            raise RuntimeError(f"pass-through did not commit {self.ends} within {self.deadline_s:.0f} s")
        if self.first_poll is None:
            self.first_poll = time.perf_counter()
        return False

    def polled(self, records: bool) -> None:
        self.polls += 1
        if records and self.first_records is None:
            self.first_records = time.perf_counter()

    def committed(self, offsets: dict[tuple[str, int], int]) -> None:
        self.commits.update(offsets)
        self.last_commit = time.perf_counter()

    def result(self) -> dict[str, Any]:
        assert self.first_poll is not None and self.first_records is not None and self.last_commit is not None
        events = sum(self.ends.values())
        seconds, steady = self.last_commit - self.first_poll, self.last_commit - self.first_records
        return {"events": events, "seconds": seconds, "events_per_s": events / seconds,
                "join_seconds": seconds - steady, "events_per_s_after_join": events / steady, "polls": self.polls}


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
    """Assign every partition of the alert topic (confluent-kafka, no group); per alert, arrival time minus
    the event's timestamp."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"latency-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "fetch.wait.max.ms": 10})
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        consumer.consume(num_messages=1, timeout=0.1)
        started.set()
        while not stop.is_set():
            messages = consumer.consume(num_messages=10_000, timeout=0.05)
            arrived = time.time()
            for m in messages:
                if m.error() is None:
                    stamp = orjson.loads(cast(bytes, m.value())).get("event_timestamp")
                    if stamp:
                        latencies.append(arrived - datetime.fromisoformat(stamp).timestamp())
    finally:
        consumer.close()


def offer_load(bootstrap: str, topic: str, path: str, rate: str) -> None:
    """Send the JSON lines of `path` to `topic` at `rate` events/s with `timestamp` (epoch ms, send time).

    Run as its own process by run_latency. anomaly-replay (kafka-python) tops out near 2,700 events/s on
    this machine, below the rates (e) offers, so the load comes from librdkafka (acks=all, linger 5 ms).
    """
    from confluent_kafka import Producer

    values = Path(path).read_bytes().splitlines()
    per_s = float(rate)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                         "queue.buffering.max.messages": 1_000_000})
    started = time.monotonic()
    for sent, value in enumerate(values):
        ahead = started + sent / per_s - time.monotonic()
        if ahead > 0.002:
            time.sleep(ahead)
            producer.poll(0)
        stamped = value[:-1] + b',"timestamp":%d}' % int(time.time() * 1000)
        producer.produce(topic, value=stamped)
    producer.flush(60)
    seconds = time.monotonic() - started
    print(f"sent {len(values)} events to {topic} in {seconds:.1f} s ({len(values) / seconds:,.0f} events/s)")


def _start_worker(bootstrap: str, bundle: Path, topic: str, group: str, client: str) -> tuple[Any, int]:
    metrics_port = _free_port()
    proc = subprocess.Popen(
        [_bin("anomaly-worker"), "--model", str(bundle), "--kafka-client", client, "--bootstrap-servers", bootstrap,
         "--input-topic", topic, "--alert-topic", f"{topic}-alerts", "--dead-letter-topic", f"{topic}-dlq",
         "--group-id", group, "--max-batch", str(MAX_BATCH),
         "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL)
    return proc, metrics_port


def _stop_worker(proc: Any) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_latency(bootstrap: str, bundle: Path, values: Sequence[bytes], rate: float, seconds: float,
                workdir: Path, client: str = "confluent") -> dict[str, Any]:
    """anomaly-worker (subprocess) + a paced librdkafka producer (subprocess) + an alert-topic consumer."""
    topic = f"latency-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic, f"{topic}-alerts", f"{topic}-dlq"])
    n = max(1, int(rate * seconds))
    data = workdir / f"{topic}.jsonl"
    data.write_bytes(b"\n".join(values[i % len(values)] for i in range(n)) + b"\n")
    worker, metrics_port = _start_worker(bootstrap, bundle, topic, f"throughput-latency-{uuid.uuid4().hex[:8]}",
                                         client)
    latencies: list[float] = []
    stop, started = threading.Event(), threading.Event()
    collector = threading.Thread(target=_alert_collector, args=(bootstrap, f"{topic}-alerts", latencies, stop,
                                                                started), daemon=True)
    try:
        _wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", worker)
        collector.start()
        if not started.wait(60):
            raise RuntimeError("alert consumer did not start")
        load = subprocess.run(
            [sys.executable, "-c", OFFER_LOAD, bootstrap, topic, str(data), f"{rate:.0f}"],
            check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)
        # Drain: wait until no alert has arrived for 3 s (bounded).
        last, quiet_since, stop_at = -1, time.monotonic(), time.monotonic() + 60
        while time.monotonic() < stop_at and time.monotonic() - quiet_since < 3.0:
            if len(latencies) != last:
                last, quiet_since = len(latencies), time.monotonic()
            time.sleep(0.2)
        stages = stage_means_ms(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        stop.set()
        if collector.is_alive():
            collector.join(10)
        _stop_worker(worker)
    ms = np.asarray(latencies) * 1000.0
    return {"offered_events_per_s": rate, "events": n, "load": load.stdout.strip(), "alerts": int(ms.size),
            "p50_ms": float(np.percentile(ms, 50)) if ms.size else None,
            "p99_ms": float(np.percentile(ms, 99)) if ms.size else None,
            "max_ms": float(ms.max()) if ms.size else None, "stage_means_ms": stages}


def stage_means_ms(metrics_url: str) -> dict[str, float]:
    """Mean milliseconds per batch in each stage, from the worker's `anomaly_batch_stage_seconds`."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        return stage_means_from_text(response.read().decode())


def stage_means_from_text(text: str) -> dict[str, float]:
    """`stage_means_ms` of a Prometheus exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "anomaly_batch_stage_seconds_sum":
                sums[sample.labels["stage"]] = sample.value
            elif sample.name == "anomaly_batch_stage_seconds_count":
                counts[sample.labels["stage"]] = sample.value
    return {stage: 1000.0 * sums[stage] / counts[stage] for stage in sums if counts.get(stage)}


OFFER_LOAD = "import sys; from benchmarks.throughput import offer_load; offer_load(*sys.argv[1:])"


# --- (f): two worker processes, one group, four partitions ------------------------------------------------


def run_two_workers(bootstrap: str, bundle: Path, values: Sequence[bytes], client: str = "confluent",
                    deadline_s: float = 600.0) -> dict[str, Any]:
    """Two anomaly-worker processes in one group on a fresh 4-partition topic.

    1. Start both workers and wait until both are ready and the group has two members with partitions.
    2. Produce `values` (librdkafka, acks=all) and start the clock.
    3. Poll the group's committed offsets every 0.1 s; stop the clock when they reach the end offsets.
    """
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient

    topic, group = f"two-{uuid.uuid4().hex[:8]}", f"throughput-two-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, [topic, f"{topic}-alerts", f"{topic}-dlq"], partitions=4)
    workers = [_start_worker(bootstrap, bundle, topic, group, client) for _ in range(2)]
    watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        for proc, port in workers:
            _wait_ready(f"http://127.0.0.1:{port}/readyz", proc)
        stop_at = time.monotonic() + 120
        while True:
            group_info = admin.describe_consumer_groups([group])[group].result(timeout=10)
            if sum(1 for m in group_info.members if m.assignment.topic_partitions) == 2:
                break
            if time.monotonic() > stop_at:
                raise RuntimeError(f"group {group} did not settle on two members with partitions")
            time.sleep(0.2)
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20})
        started = time.perf_counter()
        for i, value in enumerate(values):
            producer.produce(topic, value=value, partition=i % 4)
            if i % 10_000 == 0:
                producer.poll(0)
        producer.flush(120)
        produced = time.perf_counter() - started
        partitions = [TopicPartition(topic, p) for p in range(4)]
        stop_at = time.monotonic() + deadline_s
        while True:
            if time.monotonic() > stop_at:
                raise RuntimeError(f"two workers did not commit {len(values)} events within {deadline_s:.0f} s")
            for proc, _port in workers:
                if proc.poll() is not None:
                    raise RuntimeError(f"anomaly-worker exited with {proc.returncode}")
            done = sum(max(tp.offset, 0) for tp in watcher.committed(partitions, timeout=10))
            if done >= len(values):
                seconds = time.perf_counter() - started
                break
            time.sleep(0.1)
    finally:
        for proc, _port in workers:
            _stop_worker(proc)
        watcher.close()
    return {"events": len(values), "seconds": seconds, "events_per_s": len(values) / seconds,
            "produce_seconds": produced, "partitions": 4, "workers": 2, "client": client}


# --- report -----------------------------------------------------------------------------------------------


def render_markdown(report: dict[str, Any]) -> str:
    w, b, c, sc, two = (report[k] for k in ("worker", "passthrough", "naive", "scoring_only", "two_workers"))
    wc = w["confluent"]
    r = report["ratios"]
    w_pass_confluent = b["confluent"]["events_per_s"]

    def met(value: float, goal: float, below: bool = False) -> str:
        ok = value <= goal if below else value >= goal
        return f"{'met' if ok else 'NOT met'} (goal {'<=' if below else '>='} {goal:g})"

    def row(tag: str, what: str, x: dict[str, Any]) -> str:
        return (f"| {tag} | {what} | {x['events']:,} | {x['seconds']:.2f} | **{x['events_per_s']:,.0f}** "
                f"| {x.get('events_per_s_after_join', x['events_per_s']):,.0f} |")

    lines = [
        "# Worker throughput and latency",
        "",
        f"Run {report['date']} on {report['machine']}; `{report['command']}`.",
        "",
        "| | what | events | seconds | events/s | events/s after join |",
        "|---|---|---:|---:|---:|---:|",
        row("(a)", "worker, confluent-kafka: Worker + Source + Sink + Pipeline", w["confluent"]),
        row("(a)", "worker, kafka-python: the same", w["kafka-python"]),
        row("(b)", "pass-through, confluent-kafka (consume, produce every record, flush, commit)",
            b["confluent"]),
        row("(b)", "pass-through, kafka-python: the same", b["kafka-python"]),
        row("(c)", "naive (confluent-kafka): stdlib json + one model call per event", c),
        f"| (d) | scoring path alone (`Pipeline.process`, no Kafka, batches of {MAX_BATCH}) | {sc['events']:,} "
        f"| | **{sc['batched_events_per_s']:,.0f}** | |",
        f"| (d) | naive scoring alone (one event at a time, no Kafka) | {sc['naive_events']:,} "
        f"| | {sc['naive_events_per_s']:,.0f} | |",
        row("(f)", f"two anomaly-worker processes ({two['client']}), one group, 4 partitions", two),
        "",
        "## Ratios and targets",
        "",
        f"- (a)/(b) confluent-kafka = **{r['worker_vs_passthrough_confluent']:.2f}**: "
        f"{met(r['worker_vs_passthrough_confluent'], GOAL_VS_PASSTHROUGH)}",
        f"- (a)/(b) kafka-python = **{r['worker_vs_passthrough_kafka_python']:.2f}** "
        f"(previous run: {PREVIOUS_KAFKA_PYTHON['worker_vs_passthrough']:.2f})",
        f"- (a) confluent / (a) kafka-python = **{r['confluent_vs_kafka_python']:.2f}**",
        f"- (a)/(c) = **{r['worker_vs_naive']:.1f}** (confluent worker vs the naive design on the same client)",
        f"- (d) scoring path alone = **{sc['batched_events_per_s']:,.0f} events/s**: "
        f"{met(sc['batched_events_per_s'], GOAL_SCORING)}; (a) confluent / (d) = **{r['worker_vs_scoring']:.2f}**; "
        f"(d) / naive scoring = {sc['batched_vs_naive']:.1f}x. (d) is the median of "
        f"{len(sc.get('batched_pass_events_per_s', [0]))} passes over the same events "
        f"({', '.join(f'{x:,.0f}' for x in sc.get('batched_pass_events_per_s', []))}); the first pass after "
        f"warm-up (the only figure earlier runs reported) ran "
        f"{sc.get('batched_first_pass_events_per_s', sc['batched_events_per_s']):,.0f} events/s, the fastest "
        f"pass (least disturbed by other work on the machine) "
        f"{max(sc.get('batched_pass_events_per_s', [sc['batched_events_per_s']])):,.0f}",
        f"- (d)/(b) confluent-kafka = **{sc['batched_events_per_s'] / w_pass_confluent:.2f}**: the ceiling of "
        "(a)/(b), what the worker would reach if polling, publishing and committing cost it nothing",
        f"- (f)/(a) confluent = **{r['two_workers_vs_worker']:.2f}** (two processes, 4 partitions, against one "
        "in-process worker, 3 partitions; both share these 2 cores with the broker)",
        f"- kafka-python path now {w['kafka-python']['events_per_s']:,.0f} events/s, "
        f"{r['kafka_python_vs_previous']:.2f}x its previous figure ({PREVIOUS_KAFKA_PYTHON['events_per_s']:,} "
        f"events/s, {PREVIOUS_KAFKA_PYTHON['run']}); against its own pass-through "
        f"{r['worker_vs_passthrough_kafka_python']:.2f} vs {PREVIOUS_KAFKA_PYTHON['worker_vs_passthrough']:.2f} then.",
        "- Seconds run from the first poll (consumer-group join included) to the commit that reached the end "
        "offsets; the last column leaves out the join. (f) runs from the first produced record to the group's "
        "last commit (produce overlaps; the workers joined beforehand).",
        f"- (a) confluent published {wc['alerts']:,} alerts ({wc['alerts'] / wc['events']:.0%}) "
        f"and {wc['dead_letters']} dead letters; (b) produced every one of its records.",
        "",
        f"## End-to-end latency (e): anomaly-worker ({report['settings']['worker Kafka client (c, e, f)']}), "
        f"batch window {BATCH_WINDOW_MS} ms",
        "",
        "| load | offered events/s | events | alerts measured | p50 ms | p99 ms | max ms | p99 target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        *[f"| {name} of (a) | {d['offered_events_per_s']:,.0f} | {d['events']:,} | {d['alerts']:,} "
          f"| {_ms(d['p50_ms'])} | {_ms(d['p99_ms'])} | {_ms(d['max_ms'])} "
          f"| {met(d['p99_ms'] or float('inf'), BATCH_WINDOW_MS + 50, below=True) if name == '50 %' else ''} |"
          for name, d in report["latency"].items()],
        "",
        "Where a batch's time goes inside the worker (mean ms per batch, from `anomaly_batch_stage_seconds`): "
        "poll = waiting for records (up to the batch window), process = decode to alert documents, publish = "
        "produce and wait for every ack, commit = offsets, record = metrics and drift.",
        "",
        *[f"- (a) {client}, at full speed: " + ", ".join(f"{stage} {value:.1f}" for stage, value in
                                                       w[client].get("stage_ms", {}).items())
          for client in ("confluent", "kafka-python")],
        *[f"- load {name}: " + ", ".join(f"{stage} {value:.1f}" for stage, value in d.get("stage_means_ms", {}).items())
          for name, d in report["latency"].items()],
        "",
        *[f"- load {name}: `{d['load']}`" for name, d in report["latency"].items()],
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
    "(a) and (b), with each client, read that same topic, each from offset 0 with a fresh consumer group; (c) "
    "reads a 3-partition topic holding the first --naive-events of the same events.",
    "(a): in process, built by worker.wiring exactly as worker/main.py builds it: `load_bundle`, `Pipeline` "
    "(warmed up), `WorkerMetrics` on a fresh registry, the Sink and Source of the client (max_batch 1000, "
    "max_wait_ms 200), `Worker.run_once` in a loop. A thin wrapper around the Source records the first poll "
    "and each commit. Includes decode, validate, encode, one model call per batch, explanations and alert "
    "documents for every alert, producing alerts (acks=all, idempotent), flush, commit, metrics. No HTTP server.",
    "(b): the consumer and producer objects the worker's Source and Sink build for that client (so identical "
    "settings: batches of 1000, acks=all, idempotence, linger 5 ms), used plainly: poll up to 1000 records, "
    "produce every record unchanged to another topic, flush, check every acknowledgement, commit the batch's "
    "next offsets synchronously. It produces every record, while (a) produces only alerts (about a third).",
    "(c): the same in-process Worker + Source + Sink as (a) (confluent-kafka), with a Pipeline subclass whose "
    "process() handles one event at a time: `json.loads`, `event_columns` (the data contract) + `schema.encode` "
    "of a 1-row batch, `bundle.scorer.score` on that 1-row matrix (one SavedModel call per event), then the same "
    "explanation and alert document for an anomalous event. Kafka batching, publishing and commits are as in (a).",
    "(d): `Pipeline.process` on in-memory records of the backlog's first --scoring-events events, batches of "
    "1000, after warm-up; no Kafka, no metrics. The naive line runs (c)'s pipeline on the first --naive-events.",
    "(e): `anomaly-worker` as a subprocess (--max-batch 1000, defaults otherwise: 200 ms batch window) on a "
    "fresh 3-partition topic; a separate process sends the backlog's events at 50 % and then 90 % of (a)'s "
    "confluent rate with librdkafka (acks=all, linger 5 ms), stamping `timestamp` (epoch ms, send time) into "
    "each event (anomaly-replay, on kafka-python, cannot offer more than about 2,700 events/s here); a "
    "confluent-kafka consumer assigned to the alert topic in this process records arrival time minus the "
    "alert's `event_timestamp`. Only anomalous events produce alerts, so the alerts are the sample. All use one "
    "clock (same machine).",
    "(f): two `anomaly-worker` processes in one group on a fresh 4-partition topic; once both are ready and the "
    "group has two members with partitions, this process produces the events (librdkafka, round-robin over the "
    "partitions) and polls the group's committed offsets every 0.1 s until they reach the end.",
    "Everything (broker JVM, worker, producer, consumers) shares this machine's CPUs; other processes may have "
    "been running (see the load averages in Settings), so figures are indicative, and the ratios, measured "
    "minutes apart in one run, are more stable than the absolute numbers.",
]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=200_000, help="backlog size for (a), (b) and (f)")
    p.add_argument("--naive-events", type=int, default=2_000, help="events for the naive design (c)")
    p.add_argument("--scoring-events", type=int, default=20_000, help="events for the scoring path alone (d)")
    p.add_argument("--latency-seconds", type=float, default=20.0, help="duration of each offered load in (e)")
    p.add_argument("--bootstrap-servers", help="use this broker instead of starting one")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()), help="where the bundle is cached")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if min(args.events, args.naive_events, args.scoring_events) < 1:
        p.error("--events, --naive-events and --scoring-events must be positive")

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


def _cpu_busy(window_s: float) -> float:
    """Share of the machine's CPU time spent busy over the next `window_s` seconds (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        return sum(values), values[3] + values[4]  # total, idle + iowait
    total0, idle0 = sample()
    time.sleep(window_s)  # the measurement window itself, not synchronisation
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


#: Seconds each step waited for the machine to go quiet (see `_step`), for the report.
QUIET_WAITS: dict[str, float] = {}


def _step(name: str, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run one measurement once the machine is quiet: CPU under 15 % busy over a second, or after 60 s.

    Producing the backlog leaves the broker writing and collecting garbage for a while; a step started at
    once measured the scoring path at 28,531-46,002 events/s in one run, rising pass after pass."""
    started = time.monotonic()
    while _cpu_busy(1.0) > 0.15 and time.monotonic() - started < 60.0:
        pass
    QUIET_WAITS[name] = round(time.monotonic() - started, 1)
    print(f"{name} ...", file=sys.stderr)
    result = fn(*args)
    print(f"{name}: {json.dumps(result)}", file=sys.stderr)
    return result


def _measure(args: argparse.Namespace, bootstrap: str, bundle: Path, workdir: Path) -> dict[str, Any]:
    import confluent_kafka
    import kafka

    rows = sample_rows()
    values = make_events(rows, args.events)
    run_id = uuid.uuid4().hex[:8]
    backlog, naive_topic = f"backlog-{run_id}", f"naive-{run_id}"
    copies = {client: f"passthrough-{client}-{run_id}" for client in CLIENTS}
    create_topics(bootstrap, [backlog, naive_topic, *copies.values(), f"{backlog}-alerts", f"{backlog}-dlq",
                              f"{naive_topic}-alerts", f"{naive_topic}-dlq"])
    started = time.perf_counter()
    ends = produce(bootstrap, backlog, values)
    produce_s = time.perf_counter() - started
    naive_ends = produce(bootstrap, naive_topic, values[:args.naive_events])
    mean_bytes = sum(map(len, values)) / len(values)
    scoring = _step("(d) scoring path only", lambda: scoring_only(bundle, values[:args.scoring_events],
                                                                   args.naive_events))
    worker: dict[str, dict[str, Any]] = {}
    passthrough: dict[str, dict[str, Any]] = {}
    for client in CLIENTS:
        worker[client] = _step(f"(a) worker {client}", run_worker,
                               worker_settings(bootstrap, bundle, backlog, f"worker-{client}", client), ends)
        passthrough[client] = _step(
            f"(b) pass-through {client}", run_passthrough,
            worker_settings(bootstrap, bundle, backlog, f"passthrough-{client}", client), copies[client], ends)
    naive = _step("(c) naive", lambda: run_worker(
        worker_settings(bootstrap, bundle, naive_topic, "naive", "confluent"), naive_ends, naive_pipeline_class()))
    rate = worker["confluent"]["events_per_s"]
    latency = {f"{share:.0%}".replace("%", " %"): _step(
        f"(e) latency at {share:.0%}", run_latency, bootstrap, bundle, values, rate * share, args.latency_seconds,
        workdir, "confluent") for share in (0.5, 0.9)}
    two = _step("(f) two workers", lambda: run_two_workers(bootstrap, bundle, values, "confluent"))
    a, kp = worker["confluent"]["events_per_s"], worker["kafka-python"]["events_per_s"]
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} Linux, nproc {os.cpu_count()}",
        "command": " ".join(["python -m benchmarks.throughput", *sys.argv[1:]]),
        "worker": worker, "passthrough": passthrough, "naive": naive, "scoring_only": scoring,
        "latency": latency, "two_workers": two,
        "ratios": {
            "worker_vs_passthrough_confluent": a / passthrough["confluent"]["events_per_s"],
            "worker_vs_passthrough_kafka_python": kp / passthrough["kafka-python"]["events_per_s"],
            "confluent_vs_kafka_python": a / kp,
            "worker_vs_naive": a / naive["events_per_s"],
            "worker_vs_scoring": a / scoring["batched_events_per_s"],
            "two_workers_vs_worker": two["events_per_s"] / a,
            "kafka_python_vs_previous": kp / PREVIOUS_KAFKA_PYTHON["events_per_s"],
            "goal_worker_vs_passthrough_confluent": GOAL_VS_PASSTHROUGH, "goal_scoring_events_per_s": GOAL_SCORING,
            "goal_p99_ms_at_half": BATCH_WINDOW_MS + 50,
        },
        "settings": {
            "nproc": os.cpu_count(),
            "python": platform.python_version(), "kafka-python": kafka.__version__,
            "confluent-kafka / librdkafka": f"{confluent_kafka.__version__} / {confluent_kafka.libversion()[0]}",
            "worker Kafka client (c, e, f)": "confluent",
            "broker": "started by benchmark (deploy/kafka/kafka-local.sh, 1 node)" if not args.bootstrap_servers
                      else args.bootstrap_servers,
            "events (a, b, f)": args.events, "events (c)": args.naive_events, "events (d)": args.scoring_events,
            "mean event size bytes": round(mean_bytes, 1), "partitions": PARTITIONS,
            "max batch / max wait ms": f"{MAX_BATCH} / {BATCH_WINDOW_MS}",
            "backlog produce seconds": round(produce_s, 2),
            "seconds waited for a quiet machine (CPU < 15 % over 1 s, at most 60) before each step":
                ", ".join(f"{k} {v:g}" for k, v in QUIET_WAITS.items()),
            "latency load seconds (each)": args.latency_seconds,
            "bundle": str(bundle), "training": "anomaly-train --data data/sample/nsl-kdd-sample.csv "
                                               + " ".join(TRAIN_ARGS),
        },
        "method": METHOD,
    }


if __name__ == "__main__":
    sys.exit(main())
