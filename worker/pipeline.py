"""One micro-batch from records to alerts and dead letters. Pure: no Kafka, no HTTP, no files.

decode -> validate -> window features -> features -> scale -> model -> score -> threshold -> alert
(publishing and committing happen afterwards, in worker/loop.py).

No record can stop the batch: whatever one record holds, it is scored or becomes a dead letter with a
reason. Records are decoded by the `--value-format`'s decoder (training/value_formats.py); a schema
registry that does not answer is no record's fault: `RegistryUnavailable` leaves the whole batch undecided
(the loop reads it again later). A failure that belongs to one record (its alert cannot be built)
dead-letters that record as `processing_error`; a failure of a whole-batch step is isolated by bisecting
the batch until the record that causes it is found. Only a failure that a known-good row also meets (the model itself is
broken) stops the worker, with nothing committed.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from training.bundle import Bundle
from training.contract import Invalid, Reason, event_columns
from training.data import input_kinds, with_windows
from training.value_formats import Decoder, JsonDecoder, RegistryUnavailable
from training.window_state import DEFAULT_MAX_ENTITIES
from training.windows import WindowSpec, window_inputs
from worker.alerts import build_alert
from worker.errors import ModelFailure
from worker.records import Alert, DeadLetter, Record
from worker.windows import DEFAULT_MAX_BYTES, PartitionWindows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchResult:
    """What a batch produced; every input record is accounted for as scored or dead-lettered."""

    consumed: int
    alerts: list[Alert]
    dead_letters: list[DeadLetter]
    scores: np.ndarray
    missing: dict[str, int] = field(default_factory=dict)
    isolated: int = 0  # records found by bisecting a batch whose processing failed as a whole
    # What the plugins read (worker/plugin.py), not the loop: shadow scoring matches scores by record,
    # field drift bins the parsed values.
    scored_records: list[Record] = field(default_factory=list)  # the record of each score, in order
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # parsed fields of the scored events

    @property
    def scored(self) -> int:
        return int(self.scores.size)

    def __add__(self, other: BatchResult) -> BatchResult:
        missing = dict(self.missing)
        for name, count in other.missing.items():
            missing[name] = missing.get(name, 0) + count
        return BatchResult(consumed=self.consumed + other.consumed, alerts=self.alerts + other.alerts,
                           dead_letters=self.dead_letters + other.dead_letters,
                           scores=np.concatenate([self.scores, other.scores]), missing=missing,
                           isolated=self.isolated + other.isolated,
                           scored_records=self.scored_records + other.scored_records,
                           columns={name: np.concatenate([self.columns[name], values]) if name in self.columns
                                    else values for name, values in other.columns.items()} or self.columns)


def settle_heap() -> None:
    """Collect garbage, then exempt every object alive now from later collections (`gc.freeze`).

    A loaded TensorFlow model is hundreds of thousands of objects, and every full collection walked them all: a
    0.3 s pause about every 100,000 events (a batch's events live through young collections and count towards
    the next full one). Frozen objects are never collected, so unfreezing first lets a model replaced since the
    last call be freed; the one full collection here is paid at load time.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def describe(exc: BaseException) -> str:
    """`ExceptionClass: message`, the text a processing_error dead letter carries."""
    return f"{type(exc).__name__}: {exc}"


class Pipeline:
    """Scores micro-batches with one model call per batch.

    With a bundle trained with window features (`bundle.windows`), each batch's valid events also go through
    `windows` (one state per partition, worker/windows.py; the pipeline makes its own if none is given) once,
    before the model step and outside the bisecting retry, so no event enters a window twice.
    """

    def __init__(self, bundle: Bundle, max_event_bytes: int = 1_048_576, top_features: int = 3,
                 clock: Callable[[], float] = time.time, entity_field: str | None = None,
                 alert_headers: Sequence[str] = (), windows: PartitionWindows | None = None,
                 decoder: Decoder | None = None) -> None:
        self.bundle = bundle
        self.entity_field = entity_field
        self.alert_headers = tuple(alert_headers)
        self.scorer = bundle.scorer
        self.threshold = bundle.threshold.value
        self.max_event_bytes = max_event_bytes
        self.top_features = top_features
        self.clock = clock
        self.spec: WindowSpec | None = getattr(bundle, "windows", None)
        if windows is None:
            windows = PartitionWindows(self.spec, DEFAULT_MAX_ENTITIES, DEFAULT_MAX_BYTES)
        self.windows = windows
        self.decoder: Decoder = JsonDecoder() if decoder is None else decoder
        # The contract parses the event's own fields; window features are computed, never read from the event.
        self._kinds = input_kinds(bundle.schema)

    def warm_up(self) -> None:
        """Ready for the first batch: trace the model once, then `settle_heap`, so batches pay for neither."""
        self._score_zeros()
        settle_heap()

    def _score_zeros(self) -> None:
        self.scorer.score(np.zeros((1, self.bundle.schema.width), dtype=np.float32))

    def process(self, records: Sequence[Record]) -> BatchResult:
        """Score a batch; if that fails as a whole, bisect it so only the offending records are dead letters."""
        self.windows.reset(self.spec)  # a newly swapped-in model with other windows starts them afresh
        return self._isolate(records, None)

    def replay(self, records: Sequence[Record]) -> None:
        """Restore: `records` enter the window state as `process` would put them, without scoring or publishing.

        Decoded and checked by the same code as when scored; what would be a dead letter enters no window."""
        self.windows.reset(self.spec)
        if self.spec is None or not records:
            return
        try:
            self._window_step(records, self._parse(records, letters=False), replay=True)
        except RegistryUnavailable as exc:  # their windows cannot be rebuilt now: start them afresh, counted
            self.windows.discard(records, exc)
        except Exception:  # noqa: BLE001 - a record the contract chokes on: one by one, as the bisecting retry would
            for record in records:
                try:
                    batch = self._parse([record], letters=False)
                except RegistryUnavailable as exc:
                    self.windows.discard(records, exc)
                    return
                except Exception:  # noqa: BLE001, S112 - it would be a processing_error dead letter: no window
                    continue
                self._window_step([record], batch, replay=True)

    def _isolate(self, records: Sequence[Record], windows: np.ndarray | None) -> BatchResult:
        """`_process`, bisecting a failure; `windows` (one row per record) are the window features once computed."""
        try:
            batch = None
            if windows is None:
                batch = self._parse(records)
                windows = self._window_step(records, batch)
            return self._process(records, batch, windows)
        except RegistryUnavailable:
            raise  # a peer's fault, not a record's: the whole batch is read again
        except Exception as exc:  # noqa: BLE001 - isolate whatever one record provokes
            if len(records) > 1:
                middle = len(records) // 2
                log.warning("batch of %d records failed (%s); bisecting to isolate the record",
                            len(records), describe(exc))
                return (self._isolate(records[:middle], None if windows is None else windows[:middle])
                        + self._isolate(records[middle:], None if windows is None else windows[middle:]))
            self._check_model(exc)
            record = records[0]
            log.error("dead letter %s: processing_error (%s)", record.where, describe(exc))
            letter = DeadLetter(record=record, reason=Reason.PROCESSING_ERROR, error=describe(exc),
                                model_version=self.bundle.version)
            return BatchResult(consumed=1, alerts=[], dead_letters=[letter], scores=np.empty(0), isolated=1)

    def _check_model(self, cause: Exception) -> None:
        """A record fails alone: make sure the model still scores a known-good row, else it is not the record."""
        try:
            self._score_zeros()
        except Exception as exc:  # noqa: BLE001
            raise ModelFailure(f"the model fails on a known-good row ({describe(exc)}) after "
                               f"{describe(cause)}; restart the worker or deploy another bundle") from cause

    def _parse(self, records: Sequence[Record], letters: bool = True) -> _Parsed:
        """decode (bytes -> event object, or a dead letter) -> validate (the data contract, the whole batch at once).

        `letters=False` (a replay) makes no dead letters of the invalid records, it only leaves them out."""
        decoded = self.decoder.decode([record.value for record in records], self.max_event_bytes)
        dead = [(position, self._dead_letter(records[position], event)) for position, event in enumerate(decoded)
                if letters and isinstance(event, Invalid)]
        positions = [position for position, event in enumerate(decoded) if not isinstance(event, Invalid)]
        events = [event for event in decoded if not isinstance(event, Invalid)]
        parsed = event_columns(events, self._kinds)
        for row, problem in parsed.problems.items() if letters else ():
            dead.append((positions[row], self._dead_letter(records[positions[row]], problem)))
        valid = parsed.valid_rows().tolist()
        columns = parsed.columns if len(valid) == parsed.rows else parsed.take(np.asarray(valid, dtype=np.intp))
        return _Parsed(dead=dead, positions=positions, events=events, valid=valid, columns=columns)

    def _window_step(self, records: Sequence[Record], batch: _Parsed, replay: bool = False) -> np.ndarray:
        """The window features of the batch's valid events (one row per record, NaN for the others); never raises.

        If it fails unexpectedly the batch is scored with window features missing (as for an event whose
        entity is unknown), the partitions' states are dropped (they may be half advanced) and it is counted."""
        out = np.full((len(records), self.windows.width), np.nan)
        if self.spec is None or not batch.valid:
            return out
        chosen = [records[batch.positions[v]] for v in batch.valid]
        try:
            events = [batch.events[v] for v in batch.valid]
            wanted = (*self.spec.key_fields, *self.spec.numeric, *self.spec.categorical)
            raw = {name: [event.get(name) for event in events] for name in wanted if name not in batch.columns}
            times = np.array([np.nan if r.timestamp_ms is None else r.timestamp_ms / 1000.0 for r in chosen])
            inputs = window_inputs(self.spec, raw, batch.columns, len(chosen), times)
            if replay:
                self.windows.replay(chosen, inputs)
            else:
                out[[batch.positions[v] for v in batch.valid]] = self.windows.features(chosen, inputs)
        except Exception as exc:  # noqa: BLE001 - a window failure must not stop or stall the stream
            self.windows.discard(chosen, exc)
        return out

    def _process(self, records: Sequence[Record], batch: _Parsed | None, windows: np.ndarray) -> BatchResult:
        schema = self.bundle.schema
        batch = self._parse(records) if batch is None else batch
        dead, positions, events, valid = batch.dead, batch.positions, batch.events, batch.valid
        alerts: list[Alert] = []
        scores = np.empty(0)
        missing: dict[str, int] = {}
        columns: dict[str, np.ndarray] = {}
        if valid:
            # window features join the parsed fields -> scale -> model -> score: one model call for the batch.
            columns = batch.columns if self.spec is None else \
                with_windows(batch.columns, windows[[positions[v] for v in valid]], self.spec)
            encoded = schema.encode(columns)
            result = self.scorer.score(encoded.matrix)
            scores = result.score
            missing = {k: v for k, v in encoded.missing.items() if v}
            # threshold -> alert, explained by the fields with the largest share of the error.
            now = self.clock()
            flagged_rows = np.flatnonzero(scores > self.threshold)
            flagged = flagged_rows.tolist()
            flagged_events = [events[valid[i]] for i in flagged]
            observed = flagged_events if self.spec is None else [
                {**event, **{name: _plain_float(columns[name][i]) for name in self.spec.names}}
                for i, event in zip(flagged, flagged_events, strict=True)]
            explained = self.scorer.explain_documents(result, flagged, observed, self.top_features)
            for i, score, event, top_features in zip(flagged, scores[flagged_rows].tolist(), flagged_events,
                                                      explained, strict=True):
                record = records[positions[valid[i]]]
                try:
                    alerts.append(build_alert(record, event, score, self.threshold, self.bundle.version,
                                              top_features, now, self.entity_field, self.alert_headers))
                except Exception as exc:  # noqa: BLE001 - this record's alert only
                    dead.append((positions[valid[i]], self._dead_letter(
                        record, Invalid(Reason.PROCESSING_ERROR, f"building the alert failed: {describe(exc)}"))))
        dead.sort(key=lambda item: item[0])
        return BatchResult(consumed=len(records), alerts=alerts, dead_letters=[d for _, d in dead], scores=scores,
                           missing=missing, scored_records=[records[positions[v]] for v in valid], columns=columns)

    def _dead_letter(self, record: Record, problem: Invalid) -> DeadLetter:
        log.warning("dead letter %s: %s (%s)", record.where, problem.reason, problem.message)
        return DeadLetter(record=record, reason=problem.reason, error=problem.message,
                          model_version=self.bundle.version)


@dataclass
class _Parsed:
    """A batch after decode and validate: dead letters so far (by position), the decoded events and which
    of them are valid, and the valid events' parsed columns."""

    dead: list[tuple[int, DeadLetter]]
    positions: list[int]  # record position of each decoded event
    events: list[dict[str, Any]]
    valid: list[int]  # indices into events
    columns: dict[str, np.ndarray]


def _plain_float(value: float) -> float | None:
    return None if value != value else float(value)
