"""Alert flood control: a per-entity cooldown and a global alert budget, applied only to publishing.

Scoring, dead letters and commits never change: a suppressed alert is counted (by reason) and folded
into a summary alert for its entity and window, which says how many were suppressed and the worst
score. Off unless `--alert-cooldown-s` or `--max-alerts-per-s` is set.

- Cooldown (`--alert-key-field F --alert-cooldown-s S`): the first alert of an entity (the event's
  field F; events without it share one entity) is published and opens a window of S seconds; later
  alerts of that entity inside the window are suppressed. When the window has ended, a summary alert
  is published if anything was suppressed.
- Budget (`--max-alerts-per-s R`): a token bucket of R alerts per second (burst R, at least 1) over
  every entity; alerts beyond it are suppressed into their entity's window the same way.

The loop's `FloodGate` plugin asks for a `Decision` before publishing (step 2; while idle, for the
summaries of ended windows) and applies it only after the broker acknowledged, so a batch that is
published again after a failed delivery is judged the same way again.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from worker.alerts import ALERT_SCHEMA_VERSION
from worker.metrics import WorkerMetrics
from worker.plugin import Plugin
from worker.records import Alert, Record

if TYPE_CHECKING:
    from worker.pipeline import BatchResult

COOLDOWN = "cooldown"
RATE_LIMIT = "rate_limit"
SUPPRESSION_REASONS = (COOLDOWN, RATE_LIMIT)
#: The entity of events that lack the key field (or when no key field is configured).
NO_ENTITY = "*"


@dataclass
class _Window:
    start: float
    end: float
    cooldown: bool = False  # opened by a published alert (suppresses the entity) or only to count budget excess
    suppressed: int = 0
    worst: Alert | None = None
    worst_score: float = -math.inf
    reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _State:
    windows: dict[str, _Window] = field(default_factory=dict)
    tokens: float = 0.0
    refilled_at: float | None = None


@dataclass(frozen=True)
class Decision:
    """What to publish for one batch, and the flood-control state to keep once it is delivered."""

    publish: list[Alert]
    summaries: list[Alert]
    suppressed: dict[str, int]
    state: _State


class FloodControl:
    """Decides which alerts to publish; see the module docstring."""

    def __init__(self, key_field: str | None, cooldown_s: float, max_alerts_per_s: float) -> None:
        if cooldown_s < 0 or max_alerts_per_s < 0 or not math.isfinite(cooldown_s + max_alerts_per_s):
            raise ValueError("cooldown and alert budget must be finite and >= 0 (0 turns them off)")
        self.key_field, self.cooldown_s, self.rate = key_field, cooldown_s, max_alerts_per_s
        self.burst = max(1.0, max_alerts_per_s)
        self._state = _State(tokens=self.burst)

    def entity(self, alert: Alert) -> str:
        value = alert.document.get("entity") if self.key_field else None
        return NO_ENTITY if value is None else str(value)

    def decide(self, alerts: Sequence[Alert], now: float) -> Decision:
        """Which of `alerts` to publish at time `now` (epoch seconds), plus summaries of ended windows."""
        state = copy.deepcopy(self._state)
        summaries = self._close_windows(state, now)
        publish: list[Alert] = []
        suppressed = dict.fromkeys(SUPPRESSION_REASONS, 0)
        self._refill(state, now)
        for alert in alerts:
            entity = self.entity(alert)
            window = state.windows.get(entity)
            if window is not None and window.cooldown:
                reason = COOLDOWN
            elif self.rate and state.tokens < 1.0:
                reason = RATE_LIMIT
            else:
                if self.rate:
                    state.tokens -= 1.0
                if self.cooldown_s:
                    if window is None:
                        window = state.windows[entity] = _Window(start=now, end=now)
                    window.cooldown, window.end = True, max(window.end, now + self.cooldown_s)
                publish.append(alert)
                continue
            if window is None:  # suppressed by the budget alone: open a window to count it in
                window = state.windows[entity] = _Window(start=now, end=now + max(self.cooldown_s, 1.0))
            window.suppressed += 1
            window.reasons[reason] = window.reasons.get(reason, 0) + 1
            suppressed[reason] += 1
            score = float(alert.document.get("score", -math.inf))
            if score > window.worst_score:
                window.worst, window.worst_score = alert, score
        return Decision(publish=publish, summaries=summaries, suppressed=suppressed, state=state)

    def apply(self, decision: Decision) -> None:
        """Keep the state of a decision whose alerts were delivered."""
        self._state = decision.state

    def _refill(self, state: _State, now: float) -> None:
        if not self.rate:
            return
        if state.refilled_at is not None:
            state.tokens = min(self.burst, state.tokens + max(0.0, now - state.refilled_at) * self.rate)
        state.refilled_at = now

    def _close_windows(self, state: _State, now: float) -> list[Alert]:
        summaries = []
        for entity, window in list(state.windows.items()):
            if now < window.end:
                continue
            del state.windows[entity]
            if window.suppressed and window.worst is not None:
                summaries.append(summary_alert(entity, window, self.key_field))
        return summaries


class FloodGate(Plugin):
    """Flood control in the loop: decides what a batch (or an idle pass) publishes, keeps it once delivered."""

    def __init__(self, control: FloodControl, metrics: WorkerMetrics, topic: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.control, self.metrics, self.topic, self.clock = control, metrics, topic, clock
        self._decision: Decision | None = None  # the last decision, until its alerts are acknowledged

    def on_processed(self, records: Sequence[Record], result: BatchResult, alerts: list[Alert]) -> list[Alert]:
        return self._decide(alerts)

    def on_idle(self) -> list[Alert]:
        return self._decide([])

    def on_delivered(self) -> None:
        decision, self._decision = self._decision, None
        if decision is None:
            return
        self.control.apply(decision)
        for reason, count in decision.suppressed.items():
            if count:
                self.metrics.record_alerts_suppressed(self.topic, reason, count)
        if decision.summaries:
            self.metrics.record_alert_summaries(self.topic, len(decision.summaries))

    def _decide(self, alerts: Sequence[Alert]) -> list[Alert]:
        self._decision = self.control.decide(alerts, self.clock())
        return self._decision.publish + self._decision.summaries


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def summary_alert(entity: str, window: _Window, key_field: str | None) -> Alert:
    """One alert saying how many alerts of `entity` were suppressed in `window`, and the worst of them."""
    worst = window.worst
    assert worst is not None
    version = worst.document["model_version"]
    ident = f"{version}/summary/{entity}/{int(window.start * 1000)}"
    document: dict[str, Any] = {
        "alert_id": ident,
        "schema_version": ALERT_SCHEMA_VERSION,
        "type": "suppression_summary",
        "model_version": version,
        "entity": None if entity == NO_ENTITY else entity,
        "entity_field": key_field,
        "window_start": _iso(window.start),
        "window_end": _iso(window.end),
        "suppressed": window.suppressed,
        "suppressed_by_reason": dict(window.reasons),
        "worst_score": worst.document["score"],
        "worst_alert_id": worst.alert_id,
        "threshold": worst.document["threshold"],
    }
    return Alert(alert_id=ident, record=worst.record, document=document, event_time_s=None)
