"""Shadow scoring: a candidate model scores every batch next to the live one and never pages anyone.

The candidate's alerts are not published; what it would have done is exported as metrics so a
dashboard can compare it with the live model before it is promoted: its alert rate, the share of
events on which both models agree (alert or not), and the correlation of their scores over the last
`window` events scored by both. A candidate that fails never affects the live path: the failure is
logged and counted, and the batch goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from worker.metrics import WorkerMetrics
from worker.pipeline import BatchResult, Pipeline, describe
from worker.plugin import Plugin
from worker.records import Alert, Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Comparison:
    """Live and candidate verdicts on the events both scored in one batch."""

    scored: int
    candidate_alerts: int
    agreement: float
    correlation: float


class ShadowScorer(Plugin):
    """Scores batches with a candidate pipeline and compares it with the live result."""

    def __init__(self, pipeline: Pipeline, metrics: WorkerMetrics, topic: str, window: int = 10_000) -> None:
        self.pipeline, self.metrics, self.topic = pipeline, metrics, topic
        self._live = np.empty(0)
        self._candidate = np.empty(0)
        self._agree = np.empty(0, dtype=bool)
        self._window = window
        metrics.set_shadow_model(pipeline.bundle.version)

    def on_processed(self, records: Sequence[Record], result: BatchResult, alerts: list[Alert]) -> list[Alert]:
        self.compare(records, result)
        return alerts

    def compare(self, records: Sequence[Record], live: BatchResult) -> Comparison | None:
        """Score `records` with the candidate and fold the comparison with `live` into the metrics."""
        try:
            candidate = self.pipeline.process(records)
        except Exception as exc:  # noqa: BLE001 - the candidate never stops the live path
            log.error("shadow model %s failed on a batch: %s", self.pipeline.bundle.version, describe(exc))
            self.metrics.record_shadow_failure(self.topic)
            return None
        live_scores, live_flags = _by_offset(live)
        cand_scores, cand_flags = _by_offset(candidate)
        both = sorted(set(live_scores) & set(cand_scores))
        a = np.array([live_scores[k] for k in both])
        b = np.array([cand_scores[k] for k in both])
        agree = np.array([live_flags[k] == cand_flags[k] for k in both], dtype=bool)
        self._live = np.concatenate([self._live, a])[-self._window:]
        self._candidate = np.concatenate([self._candidate, b])[-self._window:]
        self._agree = np.concatenate([self._agree, agree])[-self._window:]
        comparison = Comparison(scored=len(both), candidate_alerts=len(candidate.alerts),
                                agreement=float(self._agree.mean()) if self._agree.size else float("nan"),
                                correlation=_correlation(self._live, self._candidate))
        self.metrics.record_shadow(self.topic, candidate.scored, len(candidate.alerts), comparison.agreement,
                                   comparison.correlation)
        return comparison


def _by_offset(result: BatchResult) -> tuple[dict[tuple[int, int], float], dict[tuple[int, int], bool]]:
    """Score and alert flag per (partition, offset) of the records a result scored."""
    alerted = {(a.record.partition, a.record.offset) for a in result.alerts}
    keys = [(r.partition, r.offset) for r in result.scored_records]
    scores = dict(zip(keys, result.scores.tolist(), strict=True))
    return scores, {k: k in alerted for k in scores}


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])
