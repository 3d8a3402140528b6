"""A broker that goes away and comes back: the worker reports not-ready, stays alive, resumes, loses nothing.

This test runs its own single-node broker (`kafka-local.sh` in a temporary directory, not the shared
session broker), stops it under a running worker and starts it again on the same storage and ports with
`--keep`, so topics, records and committed offsets survive the outage as they would in production.
Every wait is a condition with a deadline.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pandas as pd
import pytest

from tests.integration.test_worker_e2e import (
    BIN,
    SAMPLE,
    Topics,
    WorkerProcess,
    _check_run,
    _free_port,
    event_values,
    http_status,
    produce,
    read_all,
    scrape,
    wait_all_committed,
)
from tests.kafka_broker import LauncherError, _free_ports, _run_launcher, create_topics, unique_topic, wait_for
from worker.config import KAFKA_CLIENTS

pytestmark = pytest.mark.integration

KAFKA_TIMEOUT_S = 5  # the worker's per-call Kafka timeout: failures surface within seconds


@dataclass(frozen=True)
class Model:
    bundle: Path
    rows: pd.DataFrame       # rows to stream, with an `id` column
    anomalous: set[str]      # ids anomaly-score flags among `rows`


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A small single-autoencoder bundle and anomaly-score's verdict on 400 held-out rows.

    The threshold sits at the 90th percentile of normal scores, so both batches hold dozens of anomalies.
    """
    root = tmp_path_factory.mktemp("outage-model")
    shuffled = pd.read_csv(SAMPLE).sample(frac=1.0, random_state=11).reset_index(drop=True)
    train, rows = shuffled.iloc[:1200], shuffled.iloc[1200:1600].copy()
    train.to_csv(root / "train.csv", index=False)
    bundle = root / "bundle"
    _check_run([BIN / "anomaly-train", "--data", root / "train.csv", "--out", bundle, "--label-column", "label",
                "--normal-value", "normal", "--drop", "difficulty", "--epochs", "3", "--ensemble", "1",
                "--seed", "5", "--threshold-quantile", "0.9"])  # a low threshold: many anomalies to lose
    rows.insert(0, "id", [f"row-{i}" for i in range(len(rows))])
    rows.to_csv(root / "rows.csv", index=False)
    _check_run([BIN / "anomaly-score", "--model", bundle, "--data", root / "rows.csv", "--out",
                root / "scored.csv", "--passthrough", "id"])
    scored = pd.read_csv(root / "scored.csv")
    return Model(bundle, rows, set(scored.loc[scored["is_anomaly"] == 1, "id"]))


class LocalBroker:
    """One kafka-local.sh node in its own directory on fixed ports, so it can be stopped and restarted."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.env = {**os.environ, "PYTHON": sys.executable}
        self.port = self.controller_port = 0
        self.bootstrap = ""

    def start(self, keep: bool = False, attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            if not keep:  # a restart must reuse the ports the storage was formatted with
                self.port, self.controller_port = _free_ports(2)
            args = ["start", "--dir", str(self.dir), "--port", str(self.port),
                    "--controller-port", str(self.controller_port), *(["--keep"] if keep else [])]
            try:
                self.bootstrap = _run_launcher(args, self.env, timeout=180).strip().splitlines()[-1]
                return
            except LauncherError as e:
                # Another process may take a free port between our choosing it and the broker binding it.
                if keep or "already in use" not in e.stderr or attempt == attempts:
                    raise

    def stop(self) -> None:
        _run_launcher(["stop", "--dir", str(self.dir)], self.env, timeout=120)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalBroker]:
    _run_launcher(["fetch"], {**os.environ, "PYTHON": sys.executable}, timeout=900)
    b = LocalBroker(tmp_path / "kafka")
    try:
        b.start()
        yield b
    finally:
        b.stop()  # also after a failed start: never leave a JVM behind


@pytest.fixture
def worker_for(broker: LocalBroker) -> Iterator[list[WorkerProcess]]:
    """Workers the test starts; killed (and their logs printed) before the broker stops."""
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        worker.stop()  # always: never leave a worker behind
        print(f"--- {worker.log_path.name} (exit {worker.proc.returncode}) ---\n{worker.output()[-8000:]}")


def start_worker(model: Model, bootstrap: str, t: Topics, log_path: Path, kafka_client: str) -> WorkerProcess:
    port = _free_port()
    cmd = [sys.executable, "-m", "worker.main", "--model", str(model.bundle), "--kafka-client", kafka_client,
           "--bootstrap-servers", bootstrap,
           "--input-topic", t.input, "--alert-topic", t.alerts, "--dead-letter-topic", t.dead_letters,
           "--group-id", t.group, "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
           "--max-wait-ms", "100", "--kafka-timeout-s", str(KAFKA_TIMEOUT_S), "--shutdown-timeout-s", "10",
           # kafka-python 3.0.12 can stall in a rebalance; the worker replaces such a consumer after this.
           "--rejoin-timeout-s", "30"]
    return WorkerProcess(cmd, log_path, port)


@pytest.mark.slow_integration("kafka-python")  # for time: CI runs the confluent case (scripts/slow.sh both)
@pytest.mark.parametrize("kafka_client", KAFKA_CLIENTS)
def test_broker_outage_reports_not_ready_keeps_running_and_resumes_without_loss(
        model: Model, broker: LocalBroker, worker_for: list[WorkerProcess], tmp_path: Path, kafka_client: str) -> None:
    t = Topics(unique_topic("events"), unique_topic("alerts"), unique_topic("dlq"), unique_topic("group"))
    create_topics(broker.bootstrap, [t.input, t.alerts, t.dead_letters], partitions=3)
    half = len(model.rows) // 2
    batch_a, batch_b = model.rows.iloc[:half], model.rows.iloc[half:]
    values: dict[str, list[bytes]] = {}
    for name, rows in (("A", batch_a), ("B", batch_b)):
        assert len(model.anomalous & set(rows["id"])) >= 10, f"batch {name} needs anomalous rows"
        (tmp_path / name).mkdir()
        values[name] = event_values(rows, tmp_path / name)

    worker = start_worker(model, broker.bootstrap, t, tmp_path / "worker.log", kafka_client)
    worker_for.append(worker)
    wait_for(lambda: http_status(worker, "/readyz") == 200, 60, "/readyz to answer 200 before the outage")
    produce(broker.bootstrap, t.input, values["A"])
    wait_all_committed(broker.bootstrap, t, worker, timeout=30)

    # The broker goes away under an idle worker: not ready, but alive (a liveness restart would not help).
    broker.stop()
    wait_for(lambda: http_status(worker, "/readyz") == 503, 30, "/readyz to answer 503 while the broker is down")
    assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode} when the broker went away"
    assert http_status(worker, "/healthz") == 200
    assert scrape(worker)[("anomaly_worker_ready", ())] == 0

    # The same broker comes back with its storage; the worker resumes on its own.
    broker.start(keep=True)
    produce(broker.bootstrap, t.input, values["B"])
    final = wait_all_committed(broker.bootstrap, t, worker, timeout=60)
    assert sum(final.values()) == len(model.rows)
    wait_for(lambda: http_status(worker, "/readyz") == 200, 30, "/readyz to answer 200 after the outage")
    assert worker.proc.poll() is None and http_status(worker, "/healthz") == 200

    # Nothing lost: every event anomaly-score flags in A and B has an alert (at least once), nothing else does.
    alerts = [orjson.loads(r.value) for r in read_all(broker.bootstrap, t.alerts)]
    alerted = {a["event_id"] for a in alerts}
    assert alerted == model.anomalous, (f"missing alerts for {sorted(model.anomalous - alerted)[:10]}; "
                                        f"unexpected alerts for {sorted(alerted - model.anomalous)[:10]}")
    ids_by_source: dict[tuple[int, int], set[str]] = {}
    for a in alerts:
        ids_by_source.setdefault((a["source"]["partition"], a["source"]["offset"]), set()).add(a["alert_id"])
    assert all(len(ids) == 1 for ids in ids_by_source.values()), "a re-read event must keep its alert id"
    assert read_all(broker.bootstrap, t.dead_letters) == []
