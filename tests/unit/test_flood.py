"""Flood control: per-entity cooldown, global budget, summaries; it changes what is published, never commits."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry

from tests.fakes import ListSink, ListSource
from worker.errors import DeliveryError
from worker.flood import COOLDOWN, RATE_LIMIT, FloodControl, FloodGate
from worker.health import BrokerStatus, Health
from worker.loop import Worker
from worker.metrics import WorkerMetrics
from worker.pipeline import BatchResult
from worker.records import Alert, DeadLetter, Record


def alert(offset: int, host: str | None, score: float = 2.0) -> Alert:
    record = Record("events", 0, offset, None, b"{}")
    document = {"alert_id": f"v1/events/0/{offset}", "model_version": "v1", "score": score, "threshold": 1.0,
                "entity": host}
    return Alert(alert_id=document["alert_id"], record=record, document=document)


def ids(alerts: list[Alert]) -> list[str]:
    return [a.alert_id for a in alerts]


def test_cooldown_publishes_the_first_alert_per_entity_and_summarises_the_rest() -> None:
    flood = FloodControl("host", cooldown_s=60, max_alerts_per_s=0)
    first = flood.decide([alert(0, "a"), alert(1, "a", 9.0), alert(2, "b"), alert(3, "a")], now=1000.0)
    assert ids(first.publish) == ["v1/events/0/0", "v1/events/0/2"]
    assert first.suppressed == {COOLDOWN: 2, RATE_LIMIT: 0} and not first.summaries
    flood.apply(first)
    inside = flood.decide([alert(4, "a")], now=1059.0)
    assert not inside.publish and inside.suppressed[COOLDOWN] == 1
    flood.apply(inside)
    after = flood.decide([alert(5, "a")], now=1060.0)
    assert ids(after.publish) == ["v1/events/0/5"]  # a new window opens
    (summary,) = after.summaries
    doc = summary.document
    assert doc["type"] == "suppression_summary" and doc["entity"] == "a" and doc["suppressed"] == 3
    assert doc["worst_score"] == 9.0 and doc["worst_alert_id"] == "v1/events/0/1"
    assert summary.alert_id == "v1/summary/a/1000000"  # deterministic: a replay is recognisable


def test_budget_limits_all_entities_and_refills_over_time() -> None:
    flood = FloodControl(None, cooldown_s=0, max_alerts_per_s=2)
    burst = flood.decide([alert(i, None) for i in range(5)], now=100.0)
    assert len(burst.publish) == 2 and burst.suppressed == {COOLDOWN: 0, RATE_LIMIT: 3}
    flood.apply(burst)
    later = flood.decide([alert(5, None)], now=101.0)
    assert len(later.publish) == 1
    (summary,) = later.summaries  # the window of the rate-limited ones has ended
    assert summary.document["suppressed"] == 3 and summary.document["suppressed_by_reason"] == {RATE_LIMIT: 3}
    assert summary.document["entity"] is None


def test_a_decision_not_applied_leaves_the_state_unchanged() -> None:
    flood = FloodControl("host", cooldown_s=60, max_alerts_per_s=0)
    flood.decide([alert(0, "a")], now=0.0)  # delivery failed: not applied
    again = flood.decide([alert(0, "a")], now=1.0)
    assert ids(again.publish) == ["v1/events/0/0"]


def test_settings_validate() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        FloodControl("h", -1, 0)


class AlertEverything:
    """A pipeline stand-in: every record is an alert about host 'noisy'."""

    class bundle:  # noqa: N801 - mimics Pipeline.bundle
        version = "v1"

        class histogram:  # noqa: N801
            edges, counts = [0.0, 1.0, 2.0], [5, 5]

        class schema:  # noqa: N801
            fields = ()

        field_histograms: dict = {}

    threshold = 1.0

    def process(self, records: list[Record]) -> BatchResult:
        import numpy as np

        return BatchResult(consumed=len(records), alerts=[alert(r.offset, "noisy") for r in records], dead_letters=[],
                           scores=np.full(len(records), 2.0))


def test_the_loop_commits_every_record_and_counts_what_it_suppressed() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.set_model("v1", 1.0)
    source, sink = ListSource([[Record("events", 0, i, None, b"{}") for i in range(50)]]), ListSink()
    gate = FloodGate(FloodControl("host", cooldown_s=3600, max_alerts_per_s=0), metrics, "events")
    worker = Worker(source, sink, AlertEverything(), metrics, "events", Health(), BrokerStatus(),  # type: ignore[arg-type]
                    threading.Event(), plugins=[gate])
    worker.run_once()
    assert ids(sink.alerts) == ["v1/events/0/0"]
    assert source.committed == {("events", 0): 50}
    assert registry.get_sample_value("anomaly_alerts_suppressed_total", {"topic": "events", "reason": COOLDOWN}) == 49
    assert registry.get_sample_value("anomaly_alerts_published_total", {"topic": "events"}) == 1
    assert registry.get_sample_value("anomaly_events_scored_total", {"topic": "events"}) == 50


class FlakySink(ListSink):
    """Fails the next `failures` publishes."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def publish(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter]) -> None:
        if self.failures:
            self.failures -= 1
            raise DeliveryError("not acknowledged: timed out")
        super().publish(alerts, dead_letters)


def test_an_idle_loop_publishes_the_summary_of_an_ended_window_and_retries_it_until_delivered() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.set_model("v1", 1.0)
    now = [1000.0]
    gate = FloodGate(FloodControl("host", cooldown_s=60, max_alerts_per_s=0), metrics, "events", clock=lambda: now[0])
    source, sink = ListSource([[Record("events", 0, i, None, b"{}") for i in range(5)]]), FlakySink()
    worker = Worker(source, sink, AlertEverything(), metrics, "events", Health(), BrokerStatus(),  # type: ignore[arg-type]
                    threading.Event(), plugins=[gate])
    worker.run_once()
    assert ids(sink.alerts) == ["v1/events/0/0"]
    worker.run_once()  # idle inside the window: nothing to publish
    assert len(sink.alerts) == 1
    now[0] += 61
    sink.failures = 1
    worker.run_once()  # the window ended: its summary is due, but the broker does not acknowledge it
    assert len(sink.alerts) == 1
    assert registry.get_sample_value("anomaly_alert_summaries_published_total", {"topic": "events"}) == 0
    assert registry.get_sample_value("anomaly_kafka_errors_total", {"operation": "produce"}) == 1
    worker.run_once()  # the same summary again, now delivered, and kept as delivered
    (summary,) = sink.alerts[1:]
    assert summary.document["type"] == "suppression_summary" and summary.document["suppressed"] == 4
    assert registry.get_sample_value("anomaly_alert_summaries_published_total", {"topic": "events"}) == 1
    worker.run_once()
    assert len(sink.alerts) == 2, "a delivered summary is not published again"
