"""Analyst feedback: verdicts become per-model-version precision; the last verdict per alert wins."""

from __future__ import annotations

from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry, generate_latest

from worker.feedback import FeedbackLedger, KnownVersions, parse
from worker.metrics import WorkerMetrics


def verdict(alert_id: str, outcome: str) -> bytes:
    return orjson.dumps({"alert_id": alert_id, "verdict": outcome})


def ledger_on(registry: CollectorRegistry, *versions: str, **bounds: int) -> FeedbackLedger:
    return FeedbackLedger(WorkerMetrics(registry), KnownVersions(versions or ("v1", "v2")), **bounds)


def series(registry: CollectorRegistry, name: str) -> int:
    return sum(len(m.samples) for m in registry.collect() if m.name == name)


def rejected(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("anomaly_feedback_rejected_total", {"reason": reason})


def test_precision_per_model_version_from_the_latest_verdict_per_alert() -> None:
    registry = CollectorRegistry()
    ledger = ledger_on(registry)
    for message in [verdict("v1/events/0/1", "true_positive"), verdict("v1/events/0/2", "false_positive"),
                    verdict("v1/events/0/3", "true_positive"), verdict("v2/events/0/9", "false_positive"),
                    verdict("v1/events/0/2", "true_positive")]:  # the analyst changed their mind
        assert ledger.add(message)
    assert ledger.precision("v1") == 1.0 and ledger.precision("v2") == 0.0 and ledger.precision("v3") is None
    value = registry.get_sample_value
    assert value("anomaly_alert_precision_ratio", {"model_version": "v1"}) == 1.0
    assert value("anomaly_feedback_verdicts", {"model_version": "v1", "verdict": "true_positive"}) == 3
    assert value("anomaly_feedback_verdicts", {"model_version": "v1", "verdict": "false_positive"}) == 0
    assert value("anomaly_alert_precision_ratio", {"model_version": "v2"}) == 0.0


def test_malformed_feedback_is_counted_and_skipped() -> None:
    registry = CollectorRegistry()
    ledger = ledger_on(registry)
    for bad in [None, b"nope", b"[1]", orjson.dumps({"alert_id": "v1/x", "verdict": "maybe"}),
                orjson.dumps({"alert_id": "no-version", "verdict": "true_positive"}),
                verdict("v1/events/0/" + "9" * 100_000, "true_positive"),  # not an offset: nothing that long is kept
                verdict("v1/bad topic/0/1", "true_positive"), verdict("v1/events/x/1", "true_positive")]:
        assert not ledger.add(bad)
    assert rejected(registry, "malformed") == 8 and rejected(registry, "unknown_model_version") == 0
    assert parse(verdict("v9/t/0/1", "false_positive")) == ("v9/t/0/1", "v9", "false_positive")
    assert ledger.versions() == []


def test_verdicts_on_made_up_model_versions_are_rejected_and_add_no_series() -> None:
    """Issue 19 row 2: 20,000 verdicts naming made-up versions made 20,000 series and a 4.6 MB /metrics."""
    registry = CollectorRegistry()
    ledger = ledger_on(registry, "v1")
    baseline = len(generate_latest(registry))
    for i in range(20_000):
        assert not ledger.add(verdict(f"fakever{i}/events/0/{i}", "true_positive"))
    assert ledger.add(verdict("v1/events/0/1", "false_positive"))
    assert rejected(registry, "unknown_model_version") == 20_000 and rejected(registry, "malformed") == 0
    assert series(registry, "anomaly_alert_precision_ratio") == 1
    assert series(registry, "anomaly_feedback_verdicts") == 2
    assert len(generate_latest(registry)) < baseline + 1_000
    assert ledger.versions() == ["v1"]


def test_a_repository_s_versions_count_even_when_this_worker_never_loaded_them(tmp_path: Path) -> None:
    """Verdicts from before a restart, or on a version promoted after start-up, are legitimate history."""
    (tmp_path / "versions" / "old").mkdir(parents=True)
    registry = CollectorRegistry()
    known = KnownVersions({"live"}, repository=tmp_path)
    ledger = FeedbackLedger(WorkerMetrics(registry), known)
    assert ledger.add(verdict("old/events/0/1", "true_positive"))
    assert ledger.add(verdict("live/events/0/2", "true_positive"))
    assert not ledger.add(verdict("new/events/0/3", "true_positive"))
    (tmp_path / "versions" / "new").mkdir()  # promoted by another worker's operator since
    assert ledger.add(verdict("new/events/0/3", "false_positive"))
    for outside in ("..", ".", ".incoming-1234"):  # the repository, the versions folder, a bundle being written
        assert not ledger.add(verdict(f"{outside}/events/0/4", "true_positive"))
    assert rejected(registry, "unknown_model_version") == 4
    assert ledger.versions() == ["old", "live", "new"]
    assert "old" in known and "gone" not in known
    assert "v1" in KnownVersions({"v1"}) and ".." not in KnownVersions({"v1"})  # no repository: loaded only


def test_the_ledger_window_forgets_the_oldest_alerts_and_their_version_s_series() -> None:
    registry = CollectorRegistry()
    ledger = ledger_on(registry, max_alerts=2)
    ledger.add(verdict("v1/t/0/1", "false_positive"))
    ledger.add(verdict("v1/t/0/2", "true_positive"))
    ledger.add(verdict("v1/t/0/3", "true_positive"))
    assert ledger.precision("v1") == 1.0
    ledger.add(verdict("v2/t/0/4", "false_positive"))
    ledger.add(verdict("v2/t/0/5", "false_positive"))  # v1's last verdict leaves the window
    assert ledger.versions() == ["v2"] and ledger.precision("v1") is None
    value = registry.get_sample_value
    assert value("anomaly_alert_precision_ratio", {"model_version": "v1"}) is None
    assert value("anomaly_feedback_verdicts", {"model_version": "v1", "verdict": "true_positive"}) is None
    assert value("anomaly_alert_precision_ratio", {"model_version": "v2"}) == 0.0


def test_at_most_max_versions_are_kept_the_least_recently_verdicted_leaves() -> None:
    registry = CollectorRegistry()
    ledger = ledger_on(registry, "v1", "v2", "v3", max_versions=2)
    ledger.add(verdict("v1/t/0/1", "true_positive"))
    ledger.add(verdict("v2/t/0/2", "true_positive"))
    ledger.add(verdict("v1/t/0/3", "false_positive"))  # v1 verdicted again: v2 is now the oldest
    ledger.add(verdict("v3/t/0/4", "true_positive"))
    assert ledger.versions() == ["v1", "v3"]
    assert series(registry, "anomaly_alert_precision_ratio") == 2
    assert registry.get_sample_value("anomaly_alert_precision_ratio", {"model_version": "v2"}) is None
    assert ledger.add(verdict("v2/t/0/2", "false_positive"))  # comes back with only what it gets from now on
    assert ledger.versions() == ["v3", "v2"] and ledger.precision("v2") == 0.0
