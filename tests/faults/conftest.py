"""Fixtures of the fault suite: one 3-node cluster per session, healed before and after every case.

Every case runs once per delivery mode. A subset runs in the default `pytest` run (CI); cases
marked `faults_full` run only with `--all-faults` (`scripts/faults.sh`); see docs/faults.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from tests.faults.cluster import Cluster
from tests.faults.harness import Figures, Scenario
from tests.faults.history import DELIVERY_MODES
from tests.integration.conftest import train_alerting_bundle
from tests.integration.test_worker_e2e import SAMPLE, event_values

#: Figures of every case run in this session, printed in the terminal summary.
FIGURES: list[Figures] = []


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A fresh 3-node KRaft cluster on free loopback ports, stopped when the session ends."""
    with Cluster.started(tmp_path_factory.mktemp("kafka-3-nodes")) as c:
        yield c


@pytest.fixture(scope="session")
def fault_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle every event exceeds: each event becomes exactly one alert (or, if malformed, a dead letter)."""
    return train_alerting_bundle(tmp_path_factory.mktemp("fault-model"))


@pytest.fixture(scope="session")
def event_templates(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    rows = pd.read_csv(SAMPLE).iloc[1000:1200].copy()
    rows.insert(0, "id", [f"t-{i}" for i in range(len(rows))])
    return event_values(rows.drop(columns=["label", "difficulty"]), tmp_path_factory.mktemp("fault-events"))


@pytest.fixture(params=DELIVERY_MODES)
def delivery(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def scenario(cluster: Cluster, fault_bundle: Path, event_templates: list[bytes], delivery: str, tmp_path: Path,
             request: pytest.FixtureRequest) -> Iterator[Scenario]:
    """A case on a healthy cluster; afterwards every worker is gone and every node is back and in sync."""
    cluster.heal()
    s = Scenario(cluster, fault_bundle, delivery, tmp_path, request.node.originalname, event_templates)
    try:
        yield s
    finally:
        s.close()
        FIGURES.append(s.figures)
        cluster.heal()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("fault suite figures")
        for figures in FIGURES:
            for line in figures.lines():
                terminalreporter.write_line(line)
