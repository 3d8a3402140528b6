"""A worker with a windowed bundle on a real broker: its alerts are anomaly-score's on the same rows.

The bundle is trained by the real `anomaly-train --entity host --window 2s --window 10s --event-time ts`; the
rows are scored by `anomaly-score` from a JSON Lines file (one state, file order) and streamed, keyed by host,
to a three-partition topic with a few malformed records among them (dead letters enter no window).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pytest
from kafka import KafkaProducer

from tests.integration.test_worker_e2e import (
    BIN,
    PARTITIONS,
    Topics,
    WorkerProcess,
    _check_run,
    _free_port,
    read_all,
    scrape,
    wait_all_committed,
)
from tests.kafka_broker import create_topics, unique_topic, wait_for

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
HOSTS = 12


def traffic(n: int, start: float, seed: int) -> list[dict[str, object]]:
    """Ordinary per-host traffic in event-time order (a little jitter, well within the grace period)."""
    rng = np.random.default_rng(seed)
    times = start + np.cumsum(rng.exponential(0.25, n)) + rng.uniform(-0.3, 0.0, n)
    return [{"host": f"10.0.0.{rng.integers(HOSTS)}", "port": str(rng.choice(["22", "80", "443"], p=[0.1, 0.6, 0.3])),
             "bytes": float(np.round(rng.lognormal(6, 0.5), 1)), "ts": float(np.round(t, 3))} for t in times]


def with_burst(rows: list[dict[str, object]], at: int, host: str, n: int) -> list[dict[str, object]]:
    """`n` ordinary-looking events from `host` within a second, inserted after row `at` (a scan, a brute force)."""
    t = float(rows[at]["ts"])  # type: ignore[arg-type]
    burst = [{"host": host, "port": "22", "bytes": 480.0, "ts": round(t + i * 0.02, 3)} for i in range(n)]
    return rows[:at + 1] + burst + rows[at + 1:]


@pytest.fixture(scope="module")
def windowed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]], pd.DataFrame]:
    """(bundle, the rows to stream with their ids, anomaly-score's output for them indexed by id)."""
    root = tmp_path_factory.mktemp("windowed-worker")
    pd.DataFrame(traffic(2000, T0, seed=1)).to_csv(root / "train.csv", index=False)
    bundle = root / "bundle"
    _check_run([BIN / "anomaly-train", "--data", root / "train.csv", "--out", bundle, "--categorical", "port",
                "--entity", "host", "--window", "2s", "--window", "10s", "--event-time", "ts",
                "--epochs", "4", "--seed", "3"])
    rows = with_burst(with_burst(traffic(400, T0 + 3600, seed=2), 120, "10.0.0.3", 40), 300, "10.0.0.7", 25)
    rows = [{"id": f"row-{i}", **row} for i, row in enumerate(rows)]
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    _check_run([BIN / "anomaly-score", "--model", bundle, "--data", root / "rows.jsonl", "--out", root / "scored.csv",
                "--passthrough", "id"])
    scored = pd.read_csv(root / "scored.csv").set_index("id")
    assert 0 < scored["is_anomaly"].sum() < len(scored), "the rows need both anomalies and normals"
    return bundle, rows, scored


@pytest.fixture
def topics(kafka_bootstrap: str) -> Topics:
    t = Topics(unique_topic("events"), unique_topic("alerts"), unique_topic("dlq"), unique_topic("group"))
    create_topics(kafka_bootstrap, [t.input, t.alerts, t.dead_letters], partitions=PARTITIONS)
    return t


@pytest.fixture
def start_windowed(windowed: tuple[Path, list[dict[str, object]], pd.DataFrame], kafka_bootstrap: str,
                   kafka_client: str, tmp_path: Path) -> Iterator[Callable[[Topics], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(t: Topics) -> WorkerProcess:
        port = _free_port()
        cmd = [sys.executable, "-m", "worker.main", "--model", str(windowed[0]), "--kafka-client", kafka_client,
               "--bootstrap-servers", kafka_bootstrap, "--input-topic", t.input, "--alert-topic", t.alerts,
               "--dead-letter-topic", t.dead_letters, "--group-id", t.group, "--metrics-host", "127.0.0.1",
               "--metrics-port", str(port), "--max-wait-ms", "100", "--max-batch", "64", "--kafka-timeout-s", "10",
               "--rejoin-timeout-s", "30"]
        worker = WorkerProcess(cmd, tmp_path / f"worker-{len(started)}.log", port)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
        print(f"--- {worker.log_path.name} (exit {worker.proc.returncode}) ---\n{worker.output()[-6000:]}")


def produce_keyed(bootstrap: str, topic: str, values: list[tuple[bytes, bytes]]) -> dict[bytes, int]:
    """Produce (key, value) pairs in order, partitioned by key as producers usually do; each key's partition."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    try:
        futures = [(key, producer.send(topic, key=key, value=value)) for key, value in values]
        producer.flush(timeout=60)
        partitions = {}
        for key, future in futures:
            partition = future.get(timeout=60).partition
            assert partitions.setdefault(key, partition) == partition
        return partitions
    finally:
        producer.close(timeout=10)


def test_windowed_worker_alerts_equal_anomaly_score(
        windowed: tuple[Path, list[dict[str, object]], pd.DataFrame], kafka_bootstrap: str, topics: Topics,
        start_windowed: Callable[[Topics], WorkerProcess]) -> None:
    _bundle, rows, scored = windowed
    values = [(str(row["host"]).encode(), orjson.dumps(row)) for row in rows]
    for i, bad in enumerate([b'{"host": "10.0.0.3", "ts": ', b'[1, 2]', b'{"host": "10.0.0.3", "bytes": "x"}']):
        values.insert(100 + 50 * i, (b"10.0.0.3", bad))  # dead letters: they must enter no window
    placed = produce_keyed(kafka_bootstrap, topics.input, values)
    assert len(set(placed.values())) > 1, "hosts spread over several partitions"

    worker = start_windowed(topics)
    wait_all_committed(kafka_bootstrap, topics, worker, timeout=120)
    topic = (("topic", topics.input),)
    wait_for(lambda: (scrape(worker).get(("anomaly_events_scored_total", topic)) or 0) >= len(rows), 15,
             f"{len(rows)} events scored")

    alerts = [orjson.loads(r.value) for r in read_all(kafka_bootstrap, topics.alerts)]
    alerted = {a["event_id"]: a for a in alerts}
    expected = set(scored.index[scored["is_anomaly"] == 1])
    assert set(alerted) == expected
    assert len(alerts) == len(alerted), "each anomalous event alerted once"
    for event_id, alert in alerted.items():
        assert alert["score"] == pytest.approx(scored.loc[event_id, "score"], rel=1e-5), event_id
    window_explained = [f for a in alerts for f in a["top_features"] if f["field"].startswith("win:")]
    assert window_explained and all(f["observed"] is not None and "the last " in f["text"] for f in window_explained)

    metrics = scrape(worker)
    assert metrics[("anomaly_window_state_entities", ())] > 0
    assert metrics[("anomaly_window_state_bytes", ())] > 0
    assert metrics[("anomaly_window_entity_partition_changes_total", ())] == 0  # keyed by host
    assert metrics[("anomaly_window_failures_total", ())] == 0
    assert len(read_all(kafka_bootstrap, topics.dead_letters)) == 3
