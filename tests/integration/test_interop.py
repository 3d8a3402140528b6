"""Interoperability with producers and consumers that are not this project's: kcat (librdkafka) and a
transactional producer, against the real worker process with each Kafka client (issue 12).

1. Codecs: kcat produces the same 200 JSON events with each codec Kafka defines, one partition per codec
   of one topic (as one worker per codec topic would see them, with one worker start per client). Every
   partition must be consumed to its end (200/200 by committed offset), with the worker running and ready.
   The measured table is printed (`pytest -s`).
2. Record shapes: kcat keys, headers and tombstones; keys of any bytes, 1970 and future record timestamps,
   absurd event timestamps; one aborted and one committed upstream transaction (kcat cannot abort, so
   confluent-kafka's transactional producer writes those). Only committed events are scored.
3. A batch the client cannot decode (kafka-python with its zstd library hidden) holds only its partition.
4. Outputs read back with kcat: alert documents (JSON, `model.version` header, selected input headers)
   and dead letters (original key and headers kept, `dlq.reason`).

The bundle alerts on every scored event (`--threshold 1e-9`), so the alerts are exactly the scored events.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from confluent_kafka import Producer

from tests.integration.test_worker_e2e import (
    Topics,
    WorkerProcess,
    committed,
    http_status,
    scrape,
)
from tests.kafka_broker import create_topics, unique_topic, wait_for
from worker.config import COMPRESSION_CODECS

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("kcat") is None,
                       reason="kcat not on PATH; install it with scripts/install-kcat.sh (CI does)"),
]

EVENTS_PER_CODEC = 200  # = len(sample_events)
ALERT_HEADERS = ("trace", "tenant")


def topics(bootstrap: str, partitions: int) -> Topics:
    t = Topics(unique_topic("interop-in"), unique_topic("interop-alerts"), unique_topic("interop-dlq"),
               unique_topic("interop-group"))
    create_topics(bootstrap, [t.input], partitions=partitions)
    create_topics(bootstrap, [t.alerts, t.dead_letters], partitions=1)
    return t


def kcat_produce(bootstrap: str, topic: str, lines: list[bytes], *options: str) -> None:
    """kcat in producer mode, one record per line, batched (linger) so compressed batches hold many records."""
    result = subprocess.run(["kcat", "-b", bootstrap, "-t", topic, "-P", "-X", "linger.ms=100", *options],
                            input=b"\n".join(lines) + b"\n", capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")


def kcat_consume(bootstrap: str, topic: str) -> list[dict]:
    """Every record of `topic` as kcat's JSON envelope (key, payload, headers as a name/value list)."""
    result = subprocess.run(["kcat", "-b", bootstrap, "-t", topic, "-C", "-J", "-e", "-q", "-o", "beginning"],
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def headers_of(envelope: dict) -> dict[str, str | None]:
    flat = envelope.get("headers") or []
    return dict(zip(flat[::2], flat[1::2], strict=True))


def test_every_codec_from_kcat_is_consumed_by_a_running_worker(
        kafka_bootstrap: str, kafka_client: str, sample_events: list[bytes],
        launch_worker: Callable[..., WorkerProcess]) -> None:
    t = topics(kafka_bootstrap, partitions=len(COMPRESSION_CODECS))
    for partition, codec in enumerate(COMPRESSION_CODECS):
        kcat_produce(kafka_bootstrap, t.input, sample_events, "-z", codec, "-p", str(partition))
    worker = launch_worker(t)

    def all_consumed() -> bool:
        assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
        got = committed(kafka_bootstrap, t.group, t.input)
        return all(got.get(p, 0) >= EVENTS_PER_CODEC for p in range(len(COMPRESSION_CODECS)))

    try:
        wait_for(all_consumed, 120, "every codec's partition committed to its end", interval=0.5)
    finally:
        got = committed(kafka_bootstrap, t.group, t.input)
        running = worker.proc.poll() is None and http_status(worker, "/healthz") == 200
        print(f"\n| producer codec (kcat) | consumed ({kafka_client}) | worker |\n|---|---:|---|")
        for partition, codec in enumerate(COMPRESSION_CODECS):
            print(f"| {codec} | {got.get(partition, 0)}/{EVENTS_PER_CODEC} | "
                  f"{'running' if running else f'exited {worker.proc.returncode}'} |")
    wait_for(lambda: http_status(worker, "/readyz") == 200, 30, "/readyz 200: no partition held")
    metrics = scrape(worker)
    topic_label = (("topic", t.input),)
    assert metrics[("anomaly_events_scored_total", topic_label)] >= EVENTS_PER_CODEC * len(COMPRESSION_CODECS)
    assert metrics[("anomaly_undecodable_partitions", ())] == 0

    alerts = kcat_consume(kafka_bootstrap, t.alerts)  # compressed by the worker (zstd with confluent), read by kcat
    documents = [json.loads(a["payload"]) for a in alerts]
    assert {d["source"]["partition"] for d in documents} == set(range(len(COMPRESSION_CODECS)))
    assert {(d["source"]["partition"], d["event_id"]) for d in documents} == {
        (p, f"e-{i}") for p in range(len(COMPRESSION_CODECS)) for i in range(EVENTS_PER_CODEC)}
    assert all(a["key"] == d["alert_id"] and headers_of(a)["model.version"] == d["model_version"]
               for a, d in zip(alerts, documents, strict=True))


def test_keys_headers_tombstones_timestamps_and_transactions_from_other_producers(
        kafka_bootstrap: str, kafka_client: str, sample_events: list[bytes],
        launch_worker: Callable[..., WorkerProcess]) -> None:
    t = topics(kafka_bootstrap, partitions=1)
    # Transactions first, so the log ends with plain records and the group can commit to its end.
    txn = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": unique_topic("interop-txn")})
    txn.init_transactions(30)
    for outcome in ("aborted", "committed"):
        txn.begin_transaction()
        for i, value in enumerate(sample_events[:20]):
            txn.produce(t.input, value=value.replace(b'"e-', f'"txn-{outcome}-{i}-'.encode(), 1), partition=0)
        assert txn.flush(30) == 0  # in the log before the outcome
        if outcome == "aborted":
            txn.abort_transaction(30)
        else:
            txn.commit_transaction(30)

    kcat_produce(kafka_bootstrap, t.input,
                 [f"k-{i}|".encode() + v.replace(b'"e-', b'"kcat-', 1) for i, v in enumerate(sample_events[:20])],
                 "-K", "|", "-H", "trace=abc-123", "-H", "tenant=t1", "-z", "zstd")
    kcat_produce(kafka_bootstrap, t.input, [b"gone-1|", b"gone-2|"], "-K", "|", "-Z", "-H", "trace=tomb")
    kcat_produce(kafka_bootstrap, t.input, [b"bad|{not json"], "-K", "|", "-H", "trace=bad-1")
    plain = Producer({"bootstrap.servers": kafka_bootstrap})
    now_ms = int(time.time() * 1000)
    shaped = {"binary-key": (b"\x00\xff\xfe", None, b""), "old": (None, 1, b""),
              "future": (None, now_ms + 30 * 60 * 1000, b""),
              "absurd": (None, None, b', "timestamp": 1e20'), "year-9999": (None, None, b', "timestamp": "9999-12-31"')}
    for name, (key, timestamp, extra) in shaped.items():
        value = sample_events[0].replace(b'"e-0"', f'"{name}"'.encode(), 1)[:-1] + extra + b"}"
        plain.produce(t.input, value=value, key=key, partition=0, **({"timestamp": timestamp} if timestamp else {}))
    assert plain.flush(30) == 0

    worker = launch_worker(t, "--alert-headers", ",".join(ALERT_HEADERS))
    expected_alerts = {f"txn-committed-{i}-{i}" for i in range(20)} | {f"kcat-{i}" for i in range(20)} | set(shaped)
    by_event: dict[str, dict] = {}

    def alerts_in() -> bool:
        assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
        by_event.update({d["event_id"]: {**d, "_kafka": a} for a in kcat_consume(kafka_bootstrap, t.alerts)
                         for d in [json.loads(a["payload"])]})
        return set(by_event) >= expected_alerts

    wait_for(alerts_in, 120, f"{len(expected_alerts)} alerts", interval=0.5)
    assert set(by_event) == expected_alerts, "aborted transactions are never scored"
    kcat_alert = by_event["kcat-3"]
    assert kcat_alert["event_key"] == "k-3" and kcat_alert["headers"] == {"trace": "abc-123", "tenant": "t1"}
    assert by_event["binary-key"]["event_key_base64"] == "AP/+"
    assert by_event["old"]["event_timestamp"] == "1970-01-01T00:00:00.001+00:00"
    assert by_event["future"]["event_timestamp"] > by_event["kcat-3"]["event_timestamp"]
    assert by_event["absurd"]["event_timestamp"] is not None  # the record's time, not 1e20
    assert by_event["year-9999"]["event_timestamp"] is not None

    def letters_in() -> list[dict]:
        got = kcat_consume(kafka_bootstrap, t.dead_letters)
        return got if len(got) >= 3 else []

    letters = {envelope["key"]: envelope for envelope in wait_for(letters_in, 60, "3 dead letters")}
    assert set(letters) == {"gone-1", "gone-2", "bad"}
    for key in ("gone-1", "gone-2"):
        headers = headers_of(letters[key])
        assert letters[key]["payload"] is None, "a tombstone stays a tombstone"
        assert headers["dlq.reason"] == "tombstone" and headers["trace"] == "tomb"
    bad = headers_of(letters["bad"])
    assert letters["bad"]["payload"] == "{not json"
    assert bad["dlq.reason"] == "invalid_json" and bad["trace"] == "bad-1"
    assert bad["dlq.source.topic"] == t.input

    metrics = scrape(worker)
    assert metrics[("anomaly_dead_letters_total", (("reason", "tombstone"), ("topic", t.input)))] == 2
    assert http_status(worker, "/readyz") == 200


@pytest.mark.parametrize("kafka_client", ["kafka-python"])
def test_a_batch_the_client_cannot_decode_holds_its_partition_and_the_worker_keeps_running(
        kafka_bootstrap: str, sample_events: list[bytes], launch_worker: Callable[..., WorkerProcess],
        tmp_path: Path) -> None:
    """An image without a codec library (simulated: `zstandard` cannot be imported) must not crash-loop."""
    hide = tmp_path / "hide-zstd"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['zstandard'] = None  # import fails\n")
    t = topics(kafka_bootstrap, partitions=2)
    kcat_produce(kafka_bootstrap, t.input, sample_events[:50], "-p", "0")
    kcat_produce(kafka_bootstrap, t.input, sample_events[:50], "-p", "1", "-z", "zstd")
    worker = launch_worker(t, env={"PYTHONPATH": str(hide)})

    def held() -> bool:
        assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
        return f"record batch at {t.input}[1]@0 cannot be decoded" in worker.output()

    wait_for(held, 60, "the zstd partition to be held")
    wait_for(lambda: committed(kafka_bootstrap, t.group, t.input).get(0) == 50, 60, "partition 0 consumed")
    assert 1 not in committed(kafka_bootstrap, t.group, t.input), "nothing committed past the batch"
    # A rebalance releases the partition and the next fetch holds it again: wait for the held state.
    wait_for(lambda: http_status(worker, "/readyz") == 503, 30, "/readyz 503 while the partition is held")
    assert http_status(worker, "/healthz") == 200
    metrics = scrape(worker)
    assert metrics[("anomaly_undecodable_batches_total", (("partition", "1"), ("topic", t.input)))] >= 1
    assert metrics[("anomaly_undecodable_partitions", ())] == 1
    assert worker.proc.poll() is None
