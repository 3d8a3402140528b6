"""Analyst feedback: verdicts on published alerts become per-model-version precision metrics.

A feedback message is a JSON object ``{"alert_id": "...", "verdict": "true_positive" | "false_positive"}``
on `--feedback-topic`. The alert id starts with the model version that raised it (see
`worker.alerts.alert_id`), so each verdict counts for that version:
``anomaly_feedback_verdicts_total{model_version, verdict}`` and
``anomaly_alert_precision_ratio{model_version}`` = true positives / all verdicts. The last verdict
for an alert wins (an analyst may change their mind); a malformed message is counted and skipped.

Every worker reads the whole feedback topic from the beginning at start-up (no consumer group), so
each reports the same figures; dashboards take the max over workers.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

VERDICTS = ("true_positive", "false_positive")


class FeedbackLedger:
    """The latest verdict per alert id, and precision per model version, published to metrics."""

    def __init__(self, metrics: WorkerMetrics, max_alerts: int = 1_000_000) -> None:
        self.metrics = metrics
        self.max_alerts = max_alerts
        self._verdicts: dict[str, tuple[str, str]] = {}  # alert id -> (model version, verdict)
        self._counts: dict[str, dict[str, int]] = {}     # model version -> verdict -> alerts

    def add(self, value: bytes | None) -> bool:
        """Take one feedback message; False (and a counter) if it is not a verdict on an alert."""
        verdict = parse(value)
        if verdict is None:
            self.metrics.record_feedback_rejected()
            return False
        alert_id, version, outcome = verdict
        previous = self._verdicts.pop(alert_id, None)
        if previous is not None:
            self._count(*previous, -1)
        elif len(self._verdicts) >= self.max_alerts:  # the oldest alert's verdict leaves the window
            self._count(*self._verdicts.pop(next(iter(self._verdicts))), -1)
        self._verdicts[alert_id] = (version, outcome)
        self._count(version, outcome, +1)
        return True

    def precision(self, version: str) -> float | None:
        counts = self._counts.get(version, {})
        total = sum(counts.values())
        return counts.get("true_positive", 0) / total if total else None

    def _count(self, version: str, outcome: str, delta: int) -> None:
        counts = self._counts.setdefault(version, dict.fromkeys(VERDICTS, 0))
        counts[outcome] += delta
        self.metrics.set_feedback(version, counts)


def parse(value: bytes | None) -> tuple[str, str, str] | None:
    """(alert id, model version, verdict) of a feedback message, or None if it is not one."""
    if value is None:
        return None
    try:
        message: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict):
        return None
    alert_id, verdict = message.get("alert_id"), message.get("verdict")
    if not isinstance(alert_id, str) or verdict not in VERDICTS or "/" not in alert_id:
        return None
    return alert_id, alert_id.split("/", 1)[0], verdict
