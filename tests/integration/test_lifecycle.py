"""Living with the worker on a real broker: promotion under load, a refused bundle, alert flood control.

A repository with two versions is trained once per module with the real `anomaly-train --repo`;
each test runs `python -m worker.main` on its own topics and waits on conditions, never on sleeps.
"""

from __future__ import annotations

import shutil
import signal
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
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
    produce,
    read_all,
    scrape,
    wait_all_committed,
)
from tests.kafka_broker import create_topics, unique_topic, wait_for
from training.repository import CURRENT, VERSIONS

pytestmark = pytest.mark.integration
PARTITIONS = 3


@dataclass(frozen=True)
class Repo:
    path: Path
    first: str
    second: str
    rows: pd.DataFrame                  # held-out rows to stream (with an `id` column)
    scored: dict[str, pd.DataFrame]     # anomaly-score's output per version, indexed by id


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    root = tmp_path_factory.mktemp("lifecycle")
    sample = pd.read_csv(SAMPLE).sample(frac=1.0, random_state=11).reset_index(drop=True)
    train, rows = sample.iloc[:1500], sample.iloc[1500:1700].copy()
    train_csv = root / "train.csv"
    train.to_csv(train_csv, index=False)
    path = root / "models"
    for seed in ("3", "4"):
        _check_run([BIN / "anomaly-train", "--data", train_csv, "--repo", path, "--label-column", "label",
                    "--normal-value", "normal", "--drop", "difficulty", "--epochs", "4", "--ensemble", "1",
                    "--seed", seed, "--target-fpr", "0.03"])
    first, second = sorted(p.name for p in (path / VERSIONS).iterdir())
    _check_run([BIN / "anomaly-promote", "--repo", path, first])
    rows.insert(0, "id", [f"row-{i}" for i in range(len(rows))])
    rows_csv = root / "rows.csv"
    rows.to_csv(rows_csv, index=False)
    scored = {}
    for version in (first, second):
        out = root / f"scored-{version}.csv"
        _check_run([BIN / "anomaly-score", "--model", path / VERSIONS / version, "--data", rows_csv, "--out", out,
                    "--passthrough", "id"])
        scored[version] = pd.read_csv(out).set_index("id")
    return Repo(path=path, first=first, second=second, rows=rows, scored=scored)


@pytest.fixture
def start(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def run(t: Topics, model: Path, *extra: str) -> WorkerProcess:
        port = _free_port()
        cmd = [sys.executable, "-m", "worker.main", "--model", str(model), "--bootstrap-servers", kafka_bootstrap,
               "--input-topic", t.input, "--alert-topic", t.alerts, "--dead-letter-topic", t.dead_letters,
               "--group-id", t.group, "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
               "--max-wait-ms", "100", "--max-batch", "100", "--kafka-timeout-s", "10", *extra]
        worker = WorkerProcess(cmd, tmp_path / f"worker-{len(started)}.log", port)
        started.append(worker)
        return worker

    yield run
    for worker in started:
        worker.stop()
        print(f"--- {worker.log_path.name} (exit {worker.proc.returncode}) ---\n{worker.output()[-6000:]}")


@pytest.fixture
def topics(kafka_bootstrap: str) -> Topics:
    t = Topics(unique_topic("events"), unique_topic("alerts"), unique_topic("dlq"), unique_topic("group"))
    create_topics(kafka_bootstrap, [t.input, t.alerts, t.dead_letters], partitions=PARTITIONS)
    return t


def metric(worker: WorkerProcess, name: str, **labels: str) -> float:
    """One sample from the worker's /metrics (0 while it is not serving yet)."""
    assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}:\n{worker.output()[-3000:]}"
    try:
        return scrape(worker).get((name, tuple(sorted(labels.items()))), 0.0)
    except OSError:
        return 0.0


def copies(values: list[bytes], n: int, tag: str) -> list[bytes]:
    """`n` copies of the events, each with a distinct id `<row id>/<tag><copy>`."""
    out = []
    for copy in range(n):
        for value in values:
            event = orjson.loads(value)
            event["id"] = f"{event['id']}/{tag}{copy}"
            out.append(orjson.dumps(event))
    return out


def test_a_promotion_under_load_switches_versions_between_batches_and_loses_nothing(
        repo: Repo, kafka_bootstrap: str, topics: Topics, start: Callable[..., WorkerProcess],
        tmp_path: Path) -> None:
    view = Path(shutil.copytree(repo.path, tmp_path / "models"))
    base = event_values(repo.rows, tmp_path)
    produce(kafka_bootstrap, topics.input, copies(base, 10, "a"))
    worker = start(topics, view, "--reload-interval-s", "0.5")
    wait_for(lambda: metric(worker, "anomaly_events_scored_total", topic=topics.input) >= 500, 120,
             "the first model to score part of the backlog")
    _check_run([BIN / "anomaly-promote", "--repo", view, repo.second])
    # The worker may finish the first backlog before it loads the promotion: wait for the swap, so the
    # second backlog is scored by the second version whatever the worker's speed.
    wait_for(lambda: metric(worker, "anomaly_model_reloads_total", result="loaded") == 1, 60,
             "the promoted version to be loaded")
    produce(kafka_bootstrap, topics.input, copies(base, 10, "b"))
    wait_all_committed(kafka_bootstrap, topics, worker, timeout=180)
    assert metric(worker, "anomaly_model_reloads_total", result="loaded") == 1
    assert metric(worker, "anomaly_model_info", version=repo.second) == 1

    alerts = [orjson.loads(r.value) for r in read_all(kafka_bootstrap, topics.alerts)]
    by_version: dict[str, list[dict]] = defaultdict(list)
    for a in alerts:
        by_version[a["model_version"]].append(a)
    assert set(by_version) == {repo.first, repo.second}, "both versions must have scored part of the stream"
    # Between batches: per partition, everything the first version alerted precedes the second's.
    for p in range(PARTITIONS):
        last_first = max((a["source"]["offset"] for a in by_version[repo.first] if a["source"]["partition"] == p),
                         default=-1)
        first_second = min((a["source"]["offset"] for a in by_version[repo.second]
                            if a["source"]["partition"] == p), default=1 << 62)
        assert last_first < first_second, f"partition {p}: versions interleave"
    # Every alert is what anomaly-score says of that row under the version the alert names.
    for a in alerts:
        row = repo.scored[a["model_version"]].loc[a["event_id"].split("/")[0]]
        assert row["is_anomaly"] == 1
        assert a["score"] == pytest.approx(row["score"], rel=1e-5)
    # Nothing lost: an event anomalous under both versions is alerted, whichever scored it.
    both = set(repo.scored[repo.first].index[repo.scored[repo.first]["is_anomaly"] == 1]) & set(
        repo.scored[repo.second].index[repo.scored[repo.second]["is_anomaly"] == 1])
    alerted = {a["event_id"] for a in alerts}
    expected = {f"{row}/{tag}{c}" for row in both for tag in "ab" for c in range(10)}
    assert expected <= alerted


def test_a_broken_version_is_refused_and_the_running_model_keeps_scoring(
        repo: Repo, kafka_bootstrap: str, topics: Topics, start: Callable[..., WorkerProcess],
        tmp_path: Path) -> None:
    view = Path(shutil.copytree(repo.path, tmp_path / "models"))
    broken = view / VERSIONS / "broken-copy"
    shutil.copytree(view / VERSIONS / repo.second, broken)
    next(broken.rglob("variables.data-*")).write_bytes(b"truncated")
    worker = start(topics, view, "--reload-interval-s", "0.5")
    wait_for(lambda: metric(worker, "anomaly_worker_ready") == 1, 90, "the worker to be ready")
    (view / CURRENT).write_text("broken-copy\n")  # e.g. a half-finished copy promoted by hand
    worker.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: metric(worker, "anomaly_model_reloads_total", result="refused") == 1, 60,
             "the broken version to be refused")
    values = event_values(repo.rows, tmp_path)
    produce(kafka_bootstrap, topics.input, values)
    wait_all_committed(kafka_bootstrap, topics, worker, timeout=120)
    alerts = [orjson.loads(r.value) for r in read_all(kafka_bootstrap, topics.alerts)]
    assert alerts and {a["model_version"] for a in alerts} == {repo.first}
    expected = set(repo.scored[repo.first].index[repo.scored[repo.first]["is_anomaly"] == 1])
    assert {a["event_id"] for a in alerts} == expected
    assert "model broken-copy refused" in worker.output()
    assert worker.proc.poll() is None


def test_a_flood_from_one_key_is_suppressed_and_summarised(
        repo: Repo, kafka_bootstrap: str, topics: Topics, start: Callable[..., WorkerProcess],
        tmp_path: Path) -> None:
    anomalous = repo.scored[repo.first].index[repo.scored[repo.first]["is_anomaly"] == 1]
    rows = repo.rows.set_index("id").loc[anomalous].reset_index()
    values = copies(event_values(rows, tmp_path), 3, "f")
    worker = start(topics, repo.path, "--alert-key-field", "protocol_type", "--alert-cooldown-s", "3")
    produce(kafka_bootstrap, topics.input, values)
    wait_all_committed(kafka_bootstrap, topics, worker, timeout=120)
    entities = set(rows["protocol_type"])

    def summarised() -> list[dict] | None:
        """Every record on the alert topic, once the summaries account for every suppressed alert."""
        records = [orjson.loads(r.value) for r in read_all(kafka_bootstrap, topics.alerts)]
        summed = sum(r["suppressed"] for r in records if r.get("type") == "suppression_summary")
        suppressed = metric(worker, "anomaly_alerts_suppressed_total", topic=topics.input, reason="cooldown")
        return records if suppressed > 0 and summed == suppressed else None

    # The windows end 3 s after their first alert; the idle worker then publishes their summaries.
    records = wait_for(summarised, 60, "summaries of every suppressed alert", interval=1.0)
    alerts = [r for r in records if r.get("type") != "suppression_summary"]
    summaries = [r for r in records if r.get("type") == "suppression_summary"]
    suppressed = metric(worker, "anomaly_alerts_suppressed_total", topic=topics.input, reason="cooldown")
    assert len(values) == len(alerts) + suppressed  # every anomalous event: published or counted
    assert {a["entity"] for a in alerts} == entities and len(alerts) < len(values)
    assert sum(s["suppressed"] for s in summaries) == suppressed
    assert metric(worker, "anomaly_events_scored_total", topic=topics.input) >= len(values)


def test_analyst_feedback_moves_the_precision_metric(
        repo: Repo, kafka_bootstrap: str, topics: Topics, start: Callable[..., WorkerProcess],
        tmp_path: Path) -> None:
    feedback = unique_topic("feedback")
    create_topics(kafka_bootstrap, [feedback], partitions=1)
    worker = start(topics, repo.path, "--feedback-topic", feedback)
    produce(kafka_bootstrap, topics.input, event_values(repo.rows, tmp_path))
    wait_all_committed(kafka_bootstrap, topics, worker, timeout=120)
    alerts = [orjson.loads(r.value) for r in read_all(kafka_bootstrap, topics.alerts)]
    assert len(alerts) >= 4
    ids = [a["alert_id"] for a in alerts[:4]]
    verdicts = [{"alert_id": ids[0], "verdict": "true_positive"}, {"alert_id": ids[1], "verdict": "true_positive"},
                {"alert_id": ids[2], "verdict": "false_positive"}, {"alert_id": ids[3], "verdict": "false_positive"},
                {"alert_id": "not-an-alert", "verdict": "yes"},
                {"alert_id": f"fakever{repo.first}/{topics.input}/0/1", "verdict": "true_positive"},  # never ran
                {"alert_id": ids[3], "verdict": "true_positive"}]  # changed on review: 3 of 4 true, read last
    produce_to(kafka_bootstrap, feedback, [orjson.dumps(v) for v in verdicts])
    wait_for(lambda: metric(worker, "anomaly_alert_precision_ratio", model_version=repo.first) == 0.75, 60,
             "precision 0.75 for the running model")
    assert metric(worker, "anomaly_feedback_rejected_total", reason="malformed") == 1
    assert metric(worker, "anomaly_feedback_rejected_total", reason="unknown_model_version") == 1
    assert metric(worker, "anomaly_feedback_verdicts", model_version=repo.first, verdict="false_positive") == 1


def produce_to(bootstrap: str, topic: str, values: list[bytes]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for value in values:
            producer.send(topic, value=value)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)
