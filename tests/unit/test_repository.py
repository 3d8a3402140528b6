"""Model repository and hot reload: versions side by side, atomic promotion and rollback, and a worker
that swaps a promoted version in between two batches (or refuses it and keeps scoring)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from tests.fakes import ListSink, ListSource
from tests.unit.conftest import TRAIN_ARGS, TrainedBundle
from tests.unit.test_cli import assert_user_error, run
from training.bundle import MANIFEST, load_bundle
from training.cli import evaluate_main, promote_main, score_main, train_main
from training.errors import BundleError
from training.features import FeatureSchema
from training.repository import CURRENT, VERSIONS, current_version, resolve_model
from worker.drift import DriftWatch
from worker.health import BrokerStatus, Health
from worker.loop import Worker
from worker.metrics import WorkerMetrics
from worker.pipeline import Pipeline
from worker.records import Record
from worker.reload import ModelWatcher


@pytest.fixture(scope="module")
def repo(trained_bundle: TrainedBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with two versions trained by `anomaly-train --repo` (seeds 7 and 8); the second is current."""
    root = tmp_path_factory.mktemp("repo") / "models"
    args = [a for a in trained_bundle.args if a not in TRAIN_ARGS] + ["--epochs", "3", "--hidden", "8,3",
                                                                      "--ensemble", "1"]
    assert train_main([*args, "--repo", str(root), "--seed", "7"]) == 0
    assert current_version(root) is None  # written, not promoted
    assert train_main([*args, "--repo", str(root), "--seed", "8", "--promote"]) == 0
    return root


def versions(repo: Path) -> list[str]:
    """Version names, oldest first."""
    paths = [p for p in (repo / VERSIONS).iterdir() if not p.name.startswith(".")]
    return [p.name for p in sorted(paths, key=lambda p: json.loads((p / MANIFEST).read_text())["created_at"])]


def test_train_writes_versions_and_promote_switches_and_rolls_back(repo: Path, capsys) -> None:
    first, second = versions(repo)
    assert current_version(repo) == second and resolve_model(repo) == repo / VERSIONS / second
    assert load_bundle(repo / VERSIONS / first).version == first  # a version is named by its bundle's id
    assert run(promote_main, ["--repo", repo, first], capsys)[0] == 0
    assert current_version(repo) == first
    assert run(promote_main, ["--repo", repo, "--rollback"], capsys)[0] == 0
    assert current_version(repo) == second
    code, out, _ = run(promote_main, ["--repo", repo, "--list"], capsys)
    assert code == 0 and f"* {second}" in out and f"  {first}" in out
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_promote_refuses_unknown_and_broken_versions(repo: Path, capsys) -> None:
    before = current_version(repo)
    assert_user_error(run(promote_main, ["--repo", repo, "nope"], capsys), "anomaly-promote", "no version 'nope'")
    broken = repo / VERSIONS / "broken"
    shutil.copytree(repo / VERSIONS / versions(repo)[0], broken)
    (broken / "threshold.json").write_text('{"value": 1}')
    try:
        assert_user_error(run(promote_main, ["--repo", repo, "broken"], capsys), "anomaly-promote",
                          "threshold.json does not match its hash")
    finally:
        shutil.rmtree(broken)
    assert current_version(repo) == before


def test_train_refuses_a_repo_that_is_not_one(tmp_path: Path, trained_bundle: TrainedBundle, capsys) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("x")
    result = run(train_main, [*trained_bundle.args, "--repo", tmp_path / "site"], capsys)
    assert_user_error(result, "anomaly-train", "is not a model repository")
    assert_user_error(run(train_main, [*trained_bundle.args, "--out", tmp_path / "b", "--promote"], capsys),
                      "anomaly-train", "--promote needs --repo")


# --- the worker follows promotions ------------------------------------------------------------------

def outliers(first: int, n: int) -> list[Record]:
    event = {"amount": 1e6, "latency": 5000.0, "version": 7.0, "method": "PUT"}
    return [Record("events", 0, first + i, None, orjson.dumps(event)) for i in range(n)]


def test_a_promoted_version_takes_over_between_two_batches(repo: Path) -> None:
    first, second = versions(repo)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    running = load_bundle(repo / VERSIONS / first)
    metrics.set_model(running.version, running.threshold.value)
    repo_view = repo.parent / "view"
    shutil.copytree(repo, repo_view, dirs_exist_ok=True)
    (repo_view / CURRENT).write_text(first + "\n")
    watcher = ModelWatcher(repo_view, running, lambda b: Pipeline(b), metrics, interval_s=3600)
    source, sink = ListSource([outliers(0, 5), outliers(5, 5), outliers(10, 5)]), ListSink()
    drift = DriftWatch(metrics, running)
    worker = Worker(source, sink, Pipeline(running), metrics, "events", Health(), BrokerStatus(), threading.Event(),
                    plugins=[watcher, drift])
    worker.run_once()
    (repo_view / CURRENT).write_text(second + "\n")  # what anomaly-promote does, atomically
    watcher.check()  # the background thread's step, run here so the test decides when
    worker.run_once()
    worker.run_once()
    scored_by = [a.document["model_version"] for a in sink.alerts]
    assert scored_by == [first] * 5 + [second] * 10  # every event once, each batch by one model
    assert source.committed == {("events", 0): 15}
    assert registry.get_sample_value("anomaly_model_info", {"version": second}) == 1
    assert registry.get_sample_value("anomaly_model_info", {"version": first}) is None
    assert registry.get_sample_value("anomaly_model_reloads_total", {"result": "loaded"}) == 1
    edges = load_bundle(repo / VERSIONS / second).histogram.edges
    assert drift.scores._inner_edges.tolist() == edges[1:-1]  # the drift baseline follows the model


@pytest.mark.parametrize("damage", ["tamper", "fields"])
def test_a_broken_or_misfitting_version_is_refused_and_the_old_model_keeps_scoring(
        repo: Path, tmp_path: Path, damage: str) -> None:
    first = versions(repo)[0]
    view = Path(shutil.copytree(repo, tmp_path / "repo"))
    candidate = view / VERSIONS / "candidate"
    shutil.copytree(view / VERSIONS / first, candidate)
    if damage == "tamper":
        (candidate / "features.json").write_text((candidate / "features.json").read_text() + " ")
    else:  # a consistent bundle (hashes fixed) for other fields
        features = json.loads((candidate / "features.json").read_text())
        features["fields"][0]["name"] = "bytes_out"
        (candidate / "features.json").write_text(json.dumps(features))
        manifest = json.loads((candidate / MANIFEST).read_text())
        manifest["files"]["features.json"] = hashlib.sha256((candidate / "features.json").read_bytes()).hexdigest()
        manifest["schema_sha256"] = FeatureSchema.from_dict(features).schema_hash()
        (candidate / MANIFEST).write_text(json.dumps(manifest))
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    running = load_bundle(view / VERSIONS / first)
    (view / CURRENT).write_text("candidate\n")
    watcher = ModelWatcher(view, running, lambda b: Pipeline(b), metrics, interval_s=3600)
    watcher.check()
    assert watcher.take() is None
    assert registry.get_sample_value("anomaly_model_reloads_total", {"result": "refused"}) == 1
    watcher.check()  # not retried until CURRENT changes or SIGHUP
    assert registry.get_sample_value("anomaly_model_reloads_total", {"result": "refused"}) == 1
    watcher.request()
    watcher.check()
    assert registry.get_sample_value("anomaly_model_reloads_total", {"result": "refused"}) == 2


# --- shadow scoring -------------------------------------------------------------------------------------

def test_a_shadow_model_scores_every_batch_but_publishes_nothing(repo: Path, trained_bundle: TrainedBundle) -> None:
    from worker.shadow import ShadowScorer

    first, second = versions(repo)
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    live = load_bundle(repo / VERSIONS / first)
    metrics.set_model(live.version, live.threshold.value)
    shadow = ShadowScorer(Pipeline(load_bundle(repo / VERSIONS / second)), metrics, "events")
    rows = trained_bundle.features.head(40).to_dict(orient="records")
    batch = outliers(0, 5) + [Record("events", 0, 5 + i, None, orjson.dumps(r)) for i, r in enumerate(rows)]
    batch.append(Record("events", 0, 100, None, b"not json"))
    source, sink = ListSource([batch]), ListSink()
    worker = Worker(source, sink, Pipeline(live), metrics, "events", Health(), BrokerStatus(), threading.Event(),
                    plugins=[shadow])
    result = worker.run_once()
    assert result is not None
    assert {a.document["model_version"] for a in sink.alerts} == {first}  # only the live model publishes
    assert len(sink.alerts) == len(result.alerts)
    value = registry.get_sample_value
    assert value("anomaly_shadow_model_info", {"version": second}) == 1
    assert value("anomaly_shadow_events_scored_total", {"topic": "events"}) == 45
    assert value("anomaly_shadow_alerts_total", {"topic": "events"}) >= 5  # the outliers alert in both models
    assert 0.5 <= value("anomaly_shadow_agreement_ratio", {}) <= 1.0
    assert value("anomaly_shadow_score_correlation", {}) > 0.5


def test_a_failing_shadow_model_never_stops_the_live_path(repo: Path) -> None:
    from worker.shadow import ShadowScorer

    first = versions(repo)[0]
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    live = load_bundle(repo / VERSIONS / first)
    metrics.set_model(live.version, live.threshold.value)
    candidate = Pipeline(load_bundle(repo / VERSIONS / first))
    candidate.process = lambda records: (_ for _ in ()).throw(RuntimeError("candidate broke"))  # type: ignore
    source, sink = ListSource([outliers(0, 3)]), ListSink()
    worker = Worker(source, sink, Pipeline(live), metrics, "events", Health(), BrokerStatus(), threading.Event(),
                    plugins=[ShadowScorer(candidate, metrics, "events")])
    worker.run_once()
    assert len(sink.alerts) == 3 and source.committed == {("events", 0): 3}
    assert registry.get_sample_value("anomaly_shadow_failures_total", {"topic": "events"}) == 1


# --- issue 19: CURRENT and promotions.jsonl are data to check, links are never followed -------------------

@pytest.fixture()
def repo_copy(repo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(repo, tmp_path / "site" / "models"))


@pytest.mark.parametrize("current", ["../../m1", "absolute", "linked"])
def test_current_naming_anything_but_a_version_inside_the_repository_is_refused(
        repo_copy: Path, capsys, caplog: pytest.LogCaptureFixture, current: str) -> None:
    first, second = versions(repo_copy)
    outside = Path(shutil.copytree(repo_copy / VERSIONS / first, repo_copy.parent.parent / "m1"))
    if current == "absolute":
        current = str(outside)
    elif current == "linked":
        (repo_copy / VERSIONS / "linked").symlink_to(outside, target_is_directory=True)
    (repo_copy / CURRENT).write_text(current + "\n")
    with pytest.raises(BundleError, match=f"CURRENT names {re.escape(repr(current))}"):
        current_version(repo_copy)
    with pytest.raises(BundleError, match="CURRENT names"):
        resolve_model(repo_copy)
    code, out, err = run(promote_main, ["--repo", repo_copy, "--list"], capsys)
    assert_user_error((code, out, err), "anomaly-promote", "CURRENT names")
    assert f"  {first}" in out and f"  {second}" in out and "*" not in out  # what to promote instead
    # The worker keeps its model, says why once, and tries again only when asked.
    registry = CollectorRegistry()
    running = load_bundle(repo_copy / VERSIONS / second)
    watcher = ModelWatcher(repo_copy, running, lambda b: Pipeline(b), WorkerMetrics(registry), interval_s=3600)
    watcher.check()
    assert watcher.take() is None
    assert registry.get_sample_value("anomaly_model_reloads_total", {"result": "refused"}) == 1
    assert f"keeps scoring: {repo_copy}: CURRENT names" in caplog.text
    watcher.check()
    assert registry.get_sample_value("anomaly_model_reloads_total", {"result": "refused"}) == 1
    watcher.request()
    watcher.check()
    assert registry.get_sample_value("anomaly_model_reloads_total", {"result": "refused"}) == 2
    # A good CURRENT again: the watcher follows it.
    (repo_copy / CURRENT).write_text(first + "\n")
    watcher.check()
    ready = watcher.take()
    assert ready is not None and ready.bundle.version == first


@pytest.mark.parametrize("line", ["not json", "[1, 2]", '{"at": "2026-12-01"}', "[" * 100_000])
def test_rollback_names_a_bad_line_of_the_promotion_history(repo_copy: Path, capsys, line: str) -> None:
    before = current_version(repo_copy)
    number = len((repo_copy / "promotions.jsonl").read_text().splitlines()) + 1
    with (repo_copy / "promotions.jsonl").open("a") as fh:
        fh.write(line + "\n")
    assert_user_error(run(promote_main, ["--repo", repo_copy, "--rollback"], capsys), "anomaly-promote",
                      f"promotions.jsonl, line {number}: not a promotion record", "promote a version by name")
    assert current_version(repo_copy) == before


def test_promote_never_appends_through_a_link_planted_as_the_history(repo_copy: Path, tmp_path: Path,
                                                                     capsys) -> None:
    first = versions(repo_copy)[0]
    before = current_version(repo_copy)
    mine = tmp_path / "mine.txt"
    mine.write_text("keep me\n")
    (repo_copy / "promotions.jsonl").unlink()
    (repo_copy / "promotions.jsonl").symlink_to(mine)
    assert_user_error(run(promote_main, ["--repo", repo_copy, first], capsys), "anomaly-promote",
                      "promotions.jsonl: cannot be written", "nothing was promoted")
    assert mine.read_text() == "keep me\n" and current_version(repo_copy) == before


@pytest.mark.parametrize("main", [score_main, evaluate_main])
def test_every_command_taking_model_accepts_a_repository(repo: Path, trained_bundle: TrainedBundle,
                                                         tmp_path: Path, capsys, main: Callable) -> None:
    current = current_version(repo)
    argv = ["--model", repo, "--data", trained_bundle.csv]
    if main is score_main:
        argv += ["--out", tmp_path / "scores.csv"]
    else:
        argv += ["--label-column", "label", "--normal-value", "normal", "--report-dir", tmp_path / "report"]
    code, out, err = run(main, argv, capsys)
    assert code == 0, err
    assert f"model {current}" in out
