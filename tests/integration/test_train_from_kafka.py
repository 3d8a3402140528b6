"""anomaly-train --from-kafka: a bounded window of a real topic trains the same bundle as the same rows in a file,
with either Kafka client (`kafka_client`, tests/integration/conftest.py), which read the same window."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest

from tests.integration.test_worker_e2e import BIN, SAMPLE, _check_run
from tests.kafka_broker import create_topics, unique_topic
from training.bundle import load_bundle
from training.kafka_window import read_window
from worker.config import KAFKA_CLIENTS
from worker.kafka.connection import Connection

pytestmark = pytest.mark.integration


COMMON = ["--label-column", "label", "--normal-value", "normal", "--epochs", "3", "--ensemble", "1", "--seed", "5"]


@pytest.fixture(scope="module")
def file_rows(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, list[bytes], Path]:
    """Rows as events, and the bundle trained on them from a file (once for both clients)."""
    root = tmp_path_factory.mktemp("from-file")
    rows = pd.read_csv(SAMPLE).head(1200).drop(columns=["difficulty"])
    events = [orjson.dumps(r) for r in rows.to_dict(orient="records")]
    jsonl = root / "rows.jsonl"
    jsonl.write_bytes(b"".join(e + b"\n" for e in events))
    _check_run([BIN / "anomaly-train", "--data", jsonl, "--out", root / "bundle", *COMMON])
    return rows, events, root / "bundle"


def test_training_from_a_topic_equals_training_from_the_same_rows_in_a_file(
        kafka_bootstrap: str, kafka_client: str, file_rows: tuple[pd.DataFrame, list[bytes], Path],
        tmp_path: Path) -> None:
    rows, events, from_file = file_rows
    topic = unique_topic("training")
    create_topics(kafka_bootstrap, [topic], partitions=1)
    # Junk in the stream is skipped and reported, never trained on.
    send(kafka_bootstrap, topic, [b"not json", *events[:600], None, b"[1]", *events[600:]])

    from_kafka = tmp_path / "from-kafka"
    _check_run([BIN / "anomaly-train", "--from-kafka", "--bootstrap-servers", kafka_bootstrap, "--topic", topic,
                "--kafka-client", kafka_client, "--out", from_kafka, *COMMON])

    a, b = load_bundle(from_file), load_bundle(from_kafka)
    assert json.loads((a.path / "features.json").read_text()) == json.loads((b.path / "features.json").read_text())
    assert a.threshold.value == pytest.approx(b.threshold.value, rel=1e-6)
    assert a.manifest.training["rows"] == b.manifest.training["rows"] == len(rows)
    matrix = a.schema.encode({k: v for k, v in _columns(a, rows).items()}).matrix
    np.testing.assert_allclose(a.scorer.score(matrix).score, b.scorer.score(matrix).score, rtol=1e-6)


def test_a_bounded_window_stops_at_max_events(kafka_bootstrap: str, kafka_client: str, tmp_path: Path) -> None:
    rows = pd.read_csv(SAMPLE).head(900).drop(columns=["difficulty", "label"])
    topic = unique_topic("window")
    create_topics(kafka_bootstrap, [topic], partitions=3)
    send(kafka_bootstrap, topic, [orjson.dumps(r) for r in rows.to_dict(orient="records")])
    out = tmp_path / "m"
    _check_run([BIN / "anomaly-train", "--from-kafka", "--bootstrap-servers", kafka_bootstrap, "--topic", topic,
                "--max-events", "500", "--since", "1h", "--kafka-client", kafka_client, "--out", out, "--epochs", "2",
                "--ensemble", "1"])
    assert load_bundle(out).manifest.training["rows"] == 500


def test_an_event_whose_feature_holds_an_array_is_skipped_not_fatal(kafka_bootstrap: str, kafka_client: str,
                                                                     tmp_path: Path) -> None:
    """Issue 19 row 11: one such record stopped the whole training; the worker would dead-letter it."""
    import subprocess

    rows = pd.read_csv(SAMPLE).head(600).drop(columns=["difficulty", "label"])
    events = [orjson.dumps(r) for r in rows.to_dict(orient="records")]
    bad = orjson.dumps({**rows.iloc[0].to_dict(), "src_bytes": [1, 2]})
    topic = unique_topic("array")
    create_topics(kafka_bootstrap, [topic], partitions=1)
    send(kafka_bootstrap, topic, [*events[:300], bad, *events[300:]])
    out = tmp_path / "m"
    result = subprocess.run([str(BIN / "anomaly-train"), "--from-kafka", "--bootstrap-servers", kafka_bootstrap,
                             "--topic", topic, "--kafka-client", kafka_client, "--out", str(out), "--epochs", "2",
                             "--ensemble", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"kafka:{topic}: {len(events)} events read; 1 records skipped (wrong_type 1)" in result.stdout
    assert f"the first: kafka:{topic}[0]@300: field 'src_bytes' must be a number, got array" in result.stdout
    assert load_bundle(out).manifest.training["rows"] == len(events)


def test_both_clients_read_the_same_window(kafka_bootstrap: str) -> None:
    """The window is a pure function of the records: same rows, positions, skips and digest with either client,
    over several partitions, from a time, up to a limit."""
    rows = pd.read_csv(SAMPLE).head(400).drop(columns=["difficulty", "label"])
    topic = unique_topic("parity")
    create_topics(kafka_bootstrap, [topic], partitions=3)
    send(kafka_bootstrap, topic, [b"junk", *(orjson.dumps(r) for r in rows.to_dict(orient="records")), b"[2]"])
    for since, limit in ((None, 1000), (0, 250)):
        windows = [read_window(Connection(kafka_bootstrap, client=client), topic, limit, since)
                   for client in KAFKA_CLIENTS]
        first = windows[0]
        assert len(first.values) == (len(rows) if since is None else limit - sum(first.skipped.values()))
        for other in windows[1:]:
            assert (other.sha256, other.positions, other.skipped) == (first.sha256, first.positions, first.skipped)
            pd.testing.assert_frame_equal(other.frame, first.frame)


def _columns(bundle: object, rows: pd.DataFrame) -> dict:
    from training.data import raw_columns

    return raw_columns(rows, bundle.schema.kinds, Path("rows"))  # type: ignore[attr-defined]


def send(bootstrap: str, topic: str, values: list[bytes | None]) -> None:
    """Produce in order (round-robin over partitions would reorder a multi-partition topic)."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    try:
        partitions = sorted(producer.partitions_for(topic))
        for i, value in enumerate(values):
            producer.send(topic, value=value, key=b"tombstone" if value is None else None,
                          partition=partitions[i * len(partitions) // len(values)])
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


def test_window_features_from_a_topic_read_the_record_timestamps_partition_by_partition(
        kafka_bootstrap: str, kafka_client: str, tmp_path: Path) -> None:
    """Issue 21: --event-time @record windows each partition in offset order at its records' timestamps; with
    timestamps equal to the events' own time field the features are those of --event-time ts."""
    from kafka import KafkaProducer

    from tests.unit.test_windows_training import START, traffic

    rows = traffic(hosts=4, seconds=300.0, bursts=2)
    rows["ts"] += round(time.time() - 3600 - START)  # within the broker's retention, which goes by timestamp
    topic = unique_topic("windows")
    create_topics(kafka_bootstrap, [topic], partitions=2)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=20)
    try:  # keyed by host, as producers usually key: each host's events on one partition, in time order
        for row in rows.to_dict(orient="records"):
            producer.send(topic, value=orjson.dumps(row), key=row["src_host"].encode(),
                          partition=int(row["src_host"].rsplit(".", 1)[1]) % 2,
                          timestamp_ms=round(row["ts"] * 1000))
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)

    bundles = {}
    for time_field in ("@record", "ts"):
        out = tmp_path / time_field.strip("@")
        _check_run([BIN / "anomaly-train", "--from-kafka", "--bootstrap-servers", kafka_bootstrap, "--topic", topic,
                    "--kafka-client", kafka_client, "--out", out, "--entity", "src_host", "--window", "2s",
                    "--window", "60s", "--event-time", time_field, "--drop", "ts", *COMMON])
        bundles[time_field] = load_bundle(out)
    record, own = bundles["@record"], bundles["ts"]
    assert record.windows is not None and record.windows.time_field == "@record"
    assert record.manifest.training["window_outcomes"] == {}  # every record had a usable timestamp
    assert record.manifest.training["rows"] == len(rows)
    fields = {f["name"]: f for f in json.loads((record.path / "features.json").read_text())["fields"]}
    assert {f["name"]: f for f in json.loads((own.path / "features.json").read_text())["fields"]} == fields
    assert fields["win:src_host:60s:count"]["high"] >= 10  # a host's history, counted within its partition
