"""Every Prometheus metric the worker exports, behind typed helpers the pipeline calls. Nothing else creates
metrics: a `WorkerMetrics` is built on an injected `CollectorRegistry` (tests: a fresh one, `get_sample_value`).
Labels stay low-cardinality: topic, partition, dead-letter and feedback reason, schema field, Kafka operation,
window and schema outcome and the current model version."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from training.contract import Reason
from training.window_state import OUTCOMES as WINDOW_OUTCOMES
from worker.config import DELIVERY_MODES
from worker.feedback import VERDICTS as FEEDBACK_VERDICTS
from worker.feedback import Rejection
from worker.histogram import ArrayHistogram

DEAD_LETTER_REASONS: tuple[str, ...] = tuple(reason.value for reason in Reason)
FEEDBACK_REJECTIONS: tuple[str, ...] = tuple(reason.value for reason in Rejection)
KAFKA_OPERATIONS: tuple[str, ...] = ("poll", "produce", "commit")
VALUE_SCHEMA_OUTCOMES: tuple[str, ...] = ("complete", "lacks_fields", "open")
MODEL_RELOAD_RESULTS: tuple[str, ...] = ("loaded", "refused")
TRANSACTION_RESULTS: tuple[str, ...] = ("committed", "aborted")
#: Where a batch's time goes: waiting in poll, scoring, publishing with acks, committing offsets
#: (exactly-once: "publish" is the whole transaction, offsets included), recording metrics and drift.
BATCH_STAGES: tuple[str, ...] = ("poll", "process", "publish", "commit", "record")
TRANSACTION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
BATCH_DURATION_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                             10.0, 30.0)
END_TO_END_LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                                 60.0, 120.0, 300.0)
SCORE_RATIO_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0,
                                          50.0)


class WorkerMetrics:
    """All worker metrics, registered on `registry`.

    `score_buckets` are the upper bounds of `anomaly_score_ratio` (score / threshold, so 1.0 is
    the alerting threshold); they must be positive, increasing and include 1.0.
    """

    def __init__(self, registry: CollectorRegistry, score_buckets: Sequence[float] | None = None) -> None:
        buckets = tuple(float(b) for b in (SCORE_RATIO_BUCKETS if score_buckets is None else score_buckets))
        if not buckets or any(b <= 0 or not math.isfinite(b) for b in buckets):
            raise ValueError(f"score buckets must be positive finite numbers, got {list(buckets)}")
        if any(b2 <= b1 for b1, b2 in zip(buckets, buckets[1:], strict=False)):
            raise ValueError(f"score buckets must be strictly increasing, got {list(buckets)}")
        if 1.0 not in buckets:
            raise ValueError(f"score buckets must include 1.0 (the threshold), got {list(buckets)}")

        self._topics: set[str] = set()
        self._model_version: str | None = None
        self._threshold_value = math.nan
        self._lag_partitions: set[tuple[str, str]] = set()

        self.events_consumed = Counter(
            "anomaly_events_consumed", "Records polled from the input topic, before decoding.",
            ["topic"], registry=registry,
        )
        self.events_scored = Counter(
            "anomaly_events_scored", "Events that passed validation and were scored by the model.",
            ["topic"], registry=registry,
        )
        self.alerts_published = Counter(
            "anomaly_alerts_published", "Alerts delivered to the alert topic, by input topic.",
            ["topic"], registry=registry,
        )
        self.dead_letters = Counter(
            "anomaly_dead_letters", "Records sent to the dead-letter topic, by input topic and reason.",
            ["topic", "reason"], registry=registry,
        )
        self.isolated_records = Counter(
            "anomaly_isolated_records",
            "Records isolated by bisecting a batch that failed as a whole (each also a processing_error dead letter).",
            ["topic"], registry=registry,
        )
        self.missing_values = Counter(
            "anomaly_missing_values", "Schema fields absent or null in scored events (imputed).",
            ["field"], registry=registry,
        )
        self.batch_size = Histogram(
            "anomaly_batch_size_events", "Records per polled batch.",
            buckets=BATCH_SIZE_BUCKETS, registry=registry,
        )
        self.batch_duration = Histogram(
            "anomaly_batch_duration_seconds", "Wall time of one batch, from decode to offset commit.",
            buckets=BATCH_DURATION_BUCKETS, registry=registry,
        )
        # One value per alert and per scored event: observed a batch at a time.
        self.end_to_end_latency = ArrayHistogram(
            "anomaly_end_to_end_latency_seconds", "Event timestamp to alert published.",
            buckets=END_TO_END_LATENCY_BUCKETS, registry=registry,
        )
        self.score_ratio = ArrayHistogram(
            "anomaly_score_ratio", "Anomaly score divided by the model threshold (1.0 = threshold).",
            buckets=buckets, registry=registry,
        )
        self.threshold = Gauge(
            "anomaly_threshold", "Alerting threshold of the loaded model, in score units.",
            registry=registry,
        )
        self.model_info = Gauge(
            "anomaly_model_info", "1 for the version of the loaded model bundle.",
            ["version"], registry=registry,
        )
        self.score_drift_psi = Gauge(
            "anomaly_score_drift_psi",
            "Population stability index of recent scores against the training score histogram.",
            registry=registry,
        )
        self.field_drift_psi = Gauge(
            "anomaly_field_drift_psi",
            "Population stability index of each field's recent values against its training distribution.",
            ["field"], registry=registry,
        )
        self.consumer_lag = Gauge(
            "anomaly_consumer_lag_events", "End offset minus committed offset per assigned partition.",
            ["topic", "partition"], registry=registry,
        )
        self.last_commit_timestamp = Gauge(
            "anomaly_last_commit_timestamp_seconds", "Unix time of the last successful offset commit.",
            registry=registry,
        )
        self.commits = Counter("anomaly_commits", "Successful offset commits.", registry=registry)
        self.commit_failures = Counter(
            "anomaly_commit_failures", "Failed offset commits.", registry=registry
        )
        self.kafka_errors = Counter(
            "anomaly_kafka_errors", "Kafka client errors, by operation (poll, produce, commit).",
            ["operation"], registry=registry,
        )
        self.undecodable_batches = Counter(
            "anomaly_undecodable_batches",
            "Record batches the Kafka client could not decode; their partition is held (see worker/kafka/core.py).",
            ["topic", "partition"], registry=registry,
        )
        self.undecodable_partitions = Gauge(
            "anomaly_undecodable_partitions", "Partitions held at a record batch the Kafka client cannot decode.",
            registry=registry,
        )
        self.worker_ready = Gauge(
            "anomaly_worker_ready", "1 when every readiness check of /readyz holds (model loaded, partitions "
            "assigned, broker reachable, no partition held at an undecodable batch).",
            registry=registry,
        )

        self.alerts_suppressed = Counter(
            "anomaly_alerts_suppressed", "Alerts not published by flood control (cooldown, rate_limit); "
            "scoring and commits are unaffected.", ["topic", "reason"], registry=registry,
        )
        self.alert_summaries = Counter(
            "anomaly_alert_summaries_published", "Summary alerts of suppressed alerts, per entity and window.",
            ["topic"], registry=registry,
        )
        self.shadow_model_info = Gauge(
            "anomaly_shadow_model_info", "1 for the version of the shadow (candidate) model, if one is scoring.",
            ["version"], registry=registry,
        )
        self.shadow_events_scored = Counter(
            "anomaly_shadow_events_scored", "Events the shadow model scored.", ["topic"], registry=registry,
        )
        self.shadow_alerts = Counter(
            "anomaly_shadow_alerts", "Alerts the shadow model would have raised (never published).",
            ["topic"], registry=registry,
        )
        self.shadow_failures = Counter(
            "anomaly_shadow_failures", "Batches the shadow model failed to score (the live path went on).",
            ["topic"], registry=registry,
        )
        self.shadow_agreement = Gauge(
            "anomaly_shadow_agreement_ratio",
            "Share of recent events on which the live and shadow models agree (both alert or neither).",
            registry=registry,
        )
        self.shadow_score_correlation = Gauge(
            "anomaly_shadow_score_correlation", "Pearson correlation of live and shadow scores on recent events.",
            registry=registry,
        )
        self.feedback_verdicts = Gauge(
            "anomaly_feedback_verdicts", "Alerts with an analyst verdict, by the model version that raised them.",
            ["model_version", "verdict"], registry=registry,
        )
        self.alert_precision = Gauge(
            "anomaly_alert_precision_ratio",
            "True positives / alerts with a verdict, per model version (analyst feedback).",
            ["model_version"], registry=registry,
        )
        self.feedback_rejected = Counter(
            "anomaly_feedback_rejected",
            "Feedback messages skipped, by reason: not a verdict on an alert id (malformed), or on a model "
            "version this worker cannot have run (unknown_model_version).",
            ["reason"], registry=registry,
        )
        for reason in FEEDBACK_REJECTIONS:
            self.feedback_rejected.labels(reason=reason)
        self.model_reloads = Counter(
            "anomaly_model_reloads", "Promoted model versions swapped in (loaded) or refused, by result.",
            ["result"], registry=registry,
        )
        self.batch_stage_duration = Histogram(
            "anomaly_batch_stage_seconds",
            "Wall time of each stage of a batch: poll (waiting for records), process, publish, commit, "
            "record (metrics and drift).",
            ["stage"], buckets=BATCH_DURATION_BUCKETS, registry=registry,
        )
        self.delivery_mode = Gauge(
            "anomaly_delivery_mode", "1 for the worker's delivery mode (at-least-once or exactly-once).",
            ["mode"], registry=registry,
        )
        self.transactions = Counter(
            "anomaly_transactions", "Exactly-once: batch transactions (alerts, dead letters, offsets), by result.",
            ["result"], registry=registry,
        )
        self.transaction_duration = Histogram(
            "anomaly_transaction_duration_seconds",
            "Exactly-once: from beginning a batch's transaction to its commit (or abort).",
            buckets=TRANSACTION_BUCKETS, registry=registry,
        )
        # Window state (worker/windows.py): outcomes of the time and key rules (docs/windows.md), size, restores.
        self.window_events = Counter("anomaly_window_events", "Events that met a window rule, by outcome (late, "
                                     "no_time, absurd_time, ahead, no_entity, long_key, evicted, truncated).",
                                     ["outcome"], registry=registry)
        self.window_state_entities = Gauge("anomaly_window_state_entities", "Entities in the window state, all "
                                           "assigned partitions together.", registry=registry)
        self.window_state_bytes = Gauge("anomaly_window_state_bytes", "Estimated memory of the window state, all "
                                        "assigned partitions together.", registry=registry)
        self.window_restored_events = Counter("anomaly_window_restored_events", "Events replayed into the window "
                                              "state after an assignment or a restart.", registry=registry)
        self.window_partition_changes = Counter(
            "anomaly_window_entity_partition_changes", "Entity keys seen on another partition than before: the "
            "input topic is not keyed by entity, so window features are not exact.", registry=registry)
        self.window_failures = Counter("anomaly_window_failures", "Batches whose window step failed (scored with "
                                       "window features missing; their partitions' state restarted).",
                                       registry=registry)

        self.registry_failures = Counter("anomaly_schema_registry_failures", "Batches read again because the schema "
                                         "registry did not answer; nothing of them was committed.", registry=registry)
        self.value_schemas = Counter("anomaly_value_schemas", "Writer schemas first seen on the input topic: complete, "
                                     "lacks_fields (lacks fields the model reads), open (maps).", ["outcome"],
                                     registry=registry)

        for operation in KAFKA_OPERATIONS:
            self.kafka_errors.labels(operation=operation)
        for outcome in VALUE_SCHEMA_OUTCOMES:
            self.value_schemas.labels(outcome=outcome)
        for outcome in WINDOW_OUTCOMES:
            self.window_events.labels(outcome=outcome)
        for result in TRANSACTION_RESULTS:
            self.transactions.labels(result=result)
        for stage in BATCH_STAGES:
            self.batch_stage_duration.labels(stage=stage)
        for result in MODEL_RELOAD_RESULTS:
            self.model_reloads.labels(result=result)
        self.shadow_agreement.set(math.nan)  # no shadow model: no comparison (0 would read as "disagrees")
        self.shadow_score_correlation.set(math.nan)

    # -- label sets ---------------------------------------------------------------------------

    def declare_topic(self, topic: str) -> None:
        """Create every per-topic series at 0 so rates exist before the first event."""
        if topic in self._topics:
            return
        self._topics.add(topic)
        self.events_consumed.labels(topic=topic)
        self.events_scored.labels(topic=topic)
        self.alerts_published.labels(topic=topic)
        self.isolated_records.labels(topic=topic)
        self.alert_summaries.labels(topic=topic)
        for reason in ("cooldown", "rate_limit"):
            self.alerts_suppressed.labels(topic=topic, reason=reason)
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(topic=topic, reason=reason)

    def declare_fields(self, fields: Iterable[str]) -> None:
        """Create `anomaly_missing_values_total` at 0 for each schema field."""
        for field in fields:
            self.missing_values.labels(field=field)

    # -- per batch ----------------------------------------------------------------------------

    def record_consumed(self, topic: str, count: int = 1) -> None:
        """Count records polled from `topic`, valid or not."""
        self.declare_topic(topic)
        self.events_consumed.labels(topic=topic).inc(_non_negative(count, "consumed count"))

    def record_dead_letter(self, topic: str, reason: Reason, count: int = 1) -> None:
        """Count records from `topic` sent to the dead-letter topic for `reason` (a `Reason`, so the label
        set stays bounded; this never raises for a reason it has not declared, it runs after a commit)."""
        self.declare_topic(topic)
        self.dead_letters.labels(topic=topic, reason=str(reason)).inc(_non_negative(count, "dead-letter count"))

    def record_isolated(self, topic: str, count: int) -> None:
        """Count records isolated by bisecting a failed batch."""
        self.declare_topic(topic)
        self.isolated_records.labels(topic=topic).inc(_non_negative(count, "isolated count"))

    def record_missing_values(self, counts: Mapping[str, int]) -> None:
        """Count imputed values per schema field (fields with 0 are skipped)."""
        for field, count in counts.items():
            if count:
                self.missing_values.labels(field=field).inc(_non_negative(count, f"missing count of {field}"))

    def observe_scores(self, topic: str, scores: Iterable[float]) -> None:
        """Count scored events and observe each score relative to the current threshold.

        Requires `set_model` first: the ratio is meaningless without a threshold.
        """
        if self._model_version is None:
            raise RuntimeError("observe_scores called before set_model: no threshold to compare against")
        self.declare_topic(topic)
        values = np.asarray(scores if isinstance(scores, np.ndarray) else list(scores), dtype=np.float64)
        self.score_ratio.observe_many(values / self._threshold_value)  # NaN and inf ratios are left out
        self.events_scored.labels(topic=topic).inc(values.size)

    def record_alerts_published(self, topic: str, count: int = 1) -> None:
        """Count alerts delivered for events from input `topic`."""
        self.declare_topic(topic)
        self.alerts_published.labels(topic=topic).inc(_non_negative(count, "alert count"))

    def observe_end_to_end_latency(self, seconds: Iterable[float]) -> None:
        """Observe event-timestamp-to-publish latencies; negative values (clock skew) count as 0."""
        values = np.asarray(seconds if isinstance(seconds, np.ndarray) else list(seconds), dtype=np.float64)
        self.end_to_end_latency.observe_many(np.maximum(values, 0.0))

    def observe_stages(self, seconds: Mapping[str, float]) -> None:
        """Observe how long each stage of one batch took (`BATCH_STAGES`)."""
        for stage, value in seconds.items():
            if stage not in BATCH_STAGES:
                raise ValueError(f"unknown batch stage {stage!r}; expected one of {BATCH_STAGES}")
            self.batch_stage_duration.labels(stage=stage).observe(_non_negative(value, f"{stage} duration"))

    def observe_batch(self, size: int, duration_seconds: float) -> None:
        """Observe one batch: its record count and its decode-to-commit wall time."""
        self.batch_size.observe(_non_negative(size, "batch size"))
        self.batch_duration.observe(_non_negative(duration_seconds, "batch duration"))

    # -- model and drift ----------------------------------------------------------------------

    def set_model(self, version: str, threshold: float) -> None:
        """Publish the loaded model: threshold gauge and `anomaly_model_info{version}` = 1.

        The previous version's series is removed, so exactly one version is ever labelled.
        """
        if not version:
            raise ValueError("model version must be a non-empty string")
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold must be a positive finite number, got {threshold}")
        if self._model_version is not None and self._model_version != version:
            self.model_info.remove(self._model_version)
        self._model_version = version
        self._threshold_value = float(threshold)
        self.model_info.labels(version=version).set(1)
        self.threshold.set(threshold)

    def record_alerts_suppressed(self, topic: str, reason: str, count: int) -> None:
        """Count alerts flood control kept from the alert topic."""
        self.alerts_suppressed.labels(topic=topic, reason=reason).inc(_non_negative(count, "suppressed count"))

    def record_alert_summaries(self, topic: str, count: int) -> None:
        """Count published suppression summaries."""
        self.alert_summaries.labels(topic=topic).inc(_non_negative(count, "summary count"))

    def set_shadow_model(self, version: str) -> None:
        """Publish the shadow model's version (one series)."""
        self.shadow_model_info.clear()
        self.shadow_model_info.labels(version=version).set(1)

    def record_shadow(self, topic: str, scored: int, alerts: int, agreement: float, correlation: float) -> None:
        """One batch scored by the shadow model, and the running comparison with the live one."""
        self.shadow_events_scored.labels(topic=topic).inc(_non_negative(scored, "shadow scored"))
        self.shadow_alerts.labels(topic=topic).inc(_non_negative(alerts, "shadow alerts"))
        self.shadow_agreement.set(agreement)
        self.shadow_score_correlation.set(correlation)

    def record_shadow_failure(self, topic: str) -> None:
        self.shadow_failures.labels(topic=topic).inc()

    def set_feedback(self, version: str, counts: Mapping[str, int]) -> None:
        """Publish the verdict counts of one model version and its precision."""
        for verdict, count in counts.items():
            self.feedback_verdicts.labels(model_version=version, verdict=verdict).set(count)
        total = sum(counts.values())
        if total:
            self.alert_precision.labels(model_version=version).set(counts.get("true_positive", 0) / total)

    def clear_feedback(self, version: str) -> None:
        """Remove the series of a model version that left the feedback ledger."""
        for verdict in FEEDBACK_VERDICTS:
            with contextlib.suppress(KeyError):
                self.feedback_verdicts.remove(version, verdict)
        with contextlib.suppress(KeyError):
            self.alert_precision.remove(version)

    def record_feedback_rejected(self, reason: Rejection) -> None:
        """Count a skipped feedback message (a `Rejection`, so the label set stays bounded)."""
        self.feedback_rejected.labels(reason=str(reason)).inc()

    def record_model_reload(self, result: str) -> None:
        """Count a promoted version that was swapped in ("loaded") or refused ("refused")."""
        self.model_reloads.labels(result=result).inc()

    def set_field_drift_psi(self, psi: Mapping[str, float]) -> None:
        """Publish the PSI of each followed field (fields without a value yet are skipped)."""
        for name, value in psi.items():
            if math.isfinite(value):
                self.field_drift_psi.labels(field=name).set(value)

    def set_score_drift_psi(self, psi: float) -> None:
        """Publish the latest PSI of live scores against training scores."""
        self.score_drift_psi.set(psi)

    # -- window state -------------------------------------------------------------------------

    def record_window_outcomes(self, counts: Mapping[str, int]) -> None:
        """Count events by window outcome (one of `training.window_state.OUTCOMES`, so the label set stays bounded)."""
        for outcome, count in counts.items():
            if outcome not in WINDOW_OUTCOMES:
                raise ValueError(f"unknown window outcome {outcome!r}; expected one of {WINDOW_OUTCOMES}")
            self.window_events.labels(outcome=outcome).inc(_non_negative(count, f"{outcome} count"))

    def follow_window_state(self, entities: Callable[[], int], size_bytes: Callable[[], int]) -> None:
        """Read the window state's entity count and estimated bytes from their owner at scrape time."""
        self.window_state_entities.set_function(lambda: float(entities()))
        self.window_state_bytes.set_function(lambda: float(size_bytes()))

    # -- Kafka --------------------------------------------------------------------------------

    def set_consumer_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Replace per-partition lag with `lags` ({(topic, partition): events}).

        Partitions missing from `lags` (revoked) lose their series instead of freezing.
        """
        current = {(topic, str(partition)) for topic, partition in lags}
        for topic, partition_label in self._lag_partitions - current:
            self.consumer_lag.remove(topic, partition_label)
        for (topic, partition), lag in lags.items():
            self.consumer_lag.labels(topic=topic, partition=str(partition)).set(max(0, lag))
        self._lag_partitions = current

    def record_commit(self, timestamp: float | None = None) -> None:
        """Count a successful commit and stamp its Unix time (now by default)."""
        self.commits.inc()
        self.last_commit_timestamp.set(time.time() if timestamp is None else timestamp)

    def set_delivery_mode(self, mode: str) -> None:
        """Publish `anomaly_delivery_mode{mode}` = 1 for `mode` and 0 for the other."""
        if mode not in DELIVERY_MODES:
            raise ValueError(f"unknown delivery mode {mode!r}; expected one of {DELIVERY_MODES}")
        for each in DELIVERY_MODES:
            self.delivery_mode.labels(mode=each).set(1 if each == mode else 0)

    def record_transaction(self, result: str, seconds: float) -> None:
        """Count a committed or aborted batch transaction and observe how long it took."""
        if result not in TRANSACTION_RESULTS:
            raise ValueError(f"unknown transaction result {result!r}; expected one of {TRANSACTION_RESULTS}")
        self.transactions.labels(result=result).inc()
        self.transaction_duration.observe(_non_negative(seconds, "transaction duration"))

    def record_commit_failure(self) -> None:
        """Count a failed commit; it is also counted as a Kafka error on `commit`.

        Do not also call `record_kafka_error("commit")` for the same failure.
        """
        self.commit_failures.inc()
        self.kafka_errors.labels(operation="commit").inc()

    def record_kafka_error(self, operation: str) -> None:
        """Count a Kafka client error on `operation` (poll, produce or commit)."""
        if operation not in KAFKA_OPERATIONS:
            raise ValueError(f"unknown Kafka operation {operation!r}; expected one of {KAFKA_OPERATIONS}")
        self.kafka_errors.labels(operation=operation).inc()

    def record_undecodable_batch(self, topic: str, partition: int) -> None:
        """Count a record batch of `topic[partition]` that the Kafka client could not decode."""
        self.undecodable_batches.labels(topic=topic, partition=str(partition)).inc()

    def follow_undecodable_partitions(self, count: Callable[[], int]) -> None:
        """Read how many partitions are held at an undecodable batch from `count`, at scrape time."""
        self.undecodable_partitions.set_function(lambda: float(count()))

    def follow_readiness(self, ready: Callable[[], bool]) -> None:
        """Read readiness (1 or 0) from `ready` at scrape time (`worker.health.Health.is_ready`); 0 until then."""
        self.worker_ready.set_function(lambda: 1.0 if ready() else 0.0)


def _non_negative(value: float, what: str) -> float:
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value
