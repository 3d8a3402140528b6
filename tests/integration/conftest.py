"""Fixtures shared by the worker suites that need a bundle alerting on every event (interop, rebalance)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.integration.registry_fixture import schema_registry as schema_registry  # re-exported fixture
from tests.integration.test_worker_e2e import BIN, SAMPLE, Topics, WorkerProcess, _check_run, _free_port, event_values
from worker.config import KAFKA_CLIENTS

EVENTS = 200


def train_alerting_bundle(root: Path) -> Path:
    """Train (in `root`) a small bundle whose threshold every event exceeds: each scored event becomes one alert."""
    pd.read_csv(SAMPLE).iloc[:1000].to_csv(root / "train.csv", index=False)
    _check_run([BIN / "anomaly-train", "--data", root / "train.csv", "--out", root / "bundle", "--label-column",
                "label", "--normal-value", "normal", "--drop", "difficulty", "--epochs", "2", "--ensemble", "1",
                "--seed", "1", "--threshold", "1e-9"])
    return root / "bundle"


@pytest.fixture(scope="module")
def alerting_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small bundle whose threshold every event exceeds: each scored event becomes one alert."""
    return train_alerting_bundle(tmp_path_factory.mktemp("interop-model"))


@pytest.fixture(scope="module")
def sample_events(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    rows = pd.read_csv(SAMPLE).iloc[1000:1000 + EVENTS].copy()
    rows.insert(0, "id", [f"e-{i}" for i in range(len(rows))])
    return event_values(rows.drop(columns=["label", "difficulty"]), tmp_path_factory.mktemp("interop-events"))


@pytest.fixture(params=KAFKA_CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """Each test using it runs once per Kafka client."""
    return str(request.param)


@pytest.fixture
def launch_worker(alerting_bundle: Path, kafka_bootstrap: str, kafka_client: str,
                  tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(t: Topics, *extra: str, env: dict[str, str] | None = None) -> WorkerProcess:
        port = _free_port()
        cmd = [sys.executable, "-m", "worker.main", "--model", str(alerting_bundle), "--kafka-client", kafka_client,
               "--bootstrap-servers", kafka_bootstrap, "--input-topic", t.input, "--alert-topic", t.alerts,
               "--dead-letter-topic", t.dead_letters, "--group-id", t.group, "--metrics-host", "127.0.0.1",
               "--metrics-port", str(port), "--max-wait-ms", "100", "--kafka-timeout-s", "10",
               # kafka-python 3.0.12 can stall in a rebalance; the worker replaces such a consumer after this.
               "--rejoin-timeout-s", "30", *extra]
        worker = WorkerProcess(cmd, tmp_path / f"worker-{len(started)}.log", port, env)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
        print(f"--- {worker.log_path.name} (exit {worker.proc.returncode}) ---\n{worker.output()[-6000:]}")


