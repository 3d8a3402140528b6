"""Analyst feedback: verdicts become per-model-version precision; the last verdict per alert wins."""

from __future__ import annotations

import orjson
from prometheus_client import CollectorRegistry

from worker.feedback import FeedbackLedger, parse
from worker.metrics import WorkerMetrics


def verdict(alert_id: str, outcome: str) -> bytes:
    return orjson.dumps({"alert_id": alert_id, "verdict": outcome})


def test_precision_per_model_version_from_the_latest_verdict_per_alert() -> None:
    registry = CollectorRegistry()
    ledger = FeedbackLedger(WorkerMetrics(registry))
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
    ledger = FeedbackLedger(WorkerMetrics(registry))
    for bad in [None, b"nope", b"[1]", orjson.dumps({"alert_id": "v1/x", "verdict": "maybe"}),
                orjson.dumps({"alert_id": "no-version", "verdict": "true_positive"})]:
        assert not ledger.add(bad)
    assert registry.get_sample_value("anomaly_feedback_rejected_total") == 5
    assert parse(verdict("v9/t/0/1", "false_positive")) == ("v9/t/0/1", "v9", "false_positive")


def test_the_ledger_window_forgets_the_oldest_alerts() -> None:
    ledger = FeedbackLedger(WorkerMetrics(CollectorRegistry()), max_alerts=2)
    ledger.add(verdict("v1/t/0/1", "false_positive"))
    ledger.add(verdict("v1/t/0/2", "true_positive"))
    ledger.add(verdict("v1/t/0/3", "true_positive"))
    assert ledger.precision("v1") == 1.0
