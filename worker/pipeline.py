"""One micro-batch from records to alerts and dead letters. Pure: no Kafka, no HTTP, no files.

decode -> validate -> features -> scale -> model -> score -> threshold -> alert
(publishing and committing happen afterwards, in worker/loop.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.bundle import Bundle
from training.features import Invalid, events_to_columns, validate_event
from worker.alerts import build_alert
from worker.decode import decode
from worker.records import Alert, DeadLetter, Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """What a batch produced; every input record is accounted for as scored or dead-lettered."""

    consumed: int
    alerts: list[Alert]
    dead_letters: list[DeadLetter]
    scores: np.ndarray
    missing: dict[str, int] = field(default_factory=dict)

    @property
    def scored(self) -> int:
        return int(self.scores.size)


class Pipeline:
    """Scores micro-batches with one model call per batch."""

    def __init__(self, bundle: Bundle, max_event_bytes: int = 1_048_576, top_features: int = 3,
                 clock: Callable[[], float] = time.time, alert_headers: Sequence[str] = ()) -> None:
        self.bundle = bundle
        self.scorer = bundle.scorer
        self.threshold = bundle.threshold.value
        self.max_event_bytes = max_event_bytes
        self.top_features = top_features
        self.clock = clock
        self.alert_headers = tuple(alert_headers)

    def warm_up(self) -> None:
        """Trace the model once so the first real batch does not pay for it."""
        self.scorer.score(np.zeros((1, self.bundle.schema.width), dtype=np.float32))

    def process(self, records: Sequence[Record]) -> BatchResult:
        schema = self.bundle.schema
        # decode + validate: each record becomes an event to score or a dead letter.
        events: list[dict[str, Any]] = []
        sources: list[Record] = []
        dead: list[DeadLetter] = []
        for record in records:
            event = decode(record.value, self.max_event_bytes)
            problem = event if isinstance(event, Invalid) else validate_event(event, schema)
            if problem is not None:
                log.warning("dead letter %s: %s (%s)", record.where, problem.reason, problem.message)
                dead.append(DeadLetter(record=record, reason=problem.reason, error=problem.message,
                                       model_version=self.bundle.version))
                continue
            assert isinstance(event, dict)
            events.append(event)
            sources.append(record)
        if not events:
            return BatchResult(consumed=len(records), alerts=[], dead_letters=dead, scores=np.empty(0))
        # features + scale -> model -> score: one model call for the whole batch.
        columns = events_to_columns(events, schema)
        encoded = schema.encode(columns)
        scores = self.scorer.score(encoded.matrix)
        # threshold -> alert, explained by the fields with the largest share of the error.
        now = self.clock()
        flagged = np.flatnonzero(scores.score > self.threshold).tolist()
        explained = self.scorer.explain_rows(scores, flagged, [events[i] for i in flagged], self.top_features)
        alerts = [build_alert(sources[i], events[i], float(scores.score[i]), self.threshold, self.bundle.version,
                              contributions, now, self.alert_headers)
                  for i, contributions in zip(flagged, explained, strict=True)]
        return BatchResult(consumed=len(records), alerts=alerts, dead_letters=dead, scores=scores.score,
                           missing={k: v for k, v in encoded.missing.items() if v})
