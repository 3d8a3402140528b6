"""WorkerMetrics: names, labels and helper semantics, read back with get_sample_value."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from worker.metrics import DEAD_LETTER_REASONS, KAFKA_OPERATIONS, WorkerMetrics


@pytest.fixture()
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture()
def metrics(registry: CollectorRegistry) -> WorkerMetrics:
    return WorkerMetrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_declared_topic_has_every_series_at_zero(registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
    metrics.declare_topic("events")
    for name in ("anomaly_events_consumed_total", "anomaly_events_scored_total", "anomaly_alerts_published_total"):
        assert value(registry, name, topic="events") == 0.0
    for reason in DEAD_LETTER_REASONS:
        assert value(registry, "anomaly_dead_letters_total", topic="events", reason=reason) == 0.0
    for operation in KAFKA_OPERATIONS:
        assert value(registry, "anomaly_kafka_errors_total", operation=operation) == 0.0
    assert value(registry, "anomaly_commits_total") == 0.0
    assert value(registry, "anomaly_worker_ready") == 0.0


def test_dead_letter_counts_by_reason_and_pre_initialises_the_others(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    metrics.record_consumed("events", 5)
    metrics.record_dead_letter("events", "invalid_json", 2)
    assert value(registry, "anomaly_events_consumed_total", topic="events") == 5.0
    assert value(registry, "anomaly_dead_letters_total", topic="events", reason="invalid_json") == 2.0
    assert value(registry, "anomaly_dead_letters_total", topic="events", reason="non_finite") == 0.0


def test_dead_letter_counting_never_raises_after_a_commit(registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
    # The loop counts dead letters after committing; a reason it did not declare must not crash it there.
    metrics.record_dead_letter("events", "bad")  # type: ignore[arg-type]
    assert value(registry, "anomaly_dead_letters_total", topic="events", reason="bad") == 1.0


def test_scores_are_observed_relative_to_threshold(registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
    metrics.set_model("v1", threshold=2.0)
    metrics.observe_scores("events", [0.5, 2.0, 3.0, 30.0])
    assert value(registry, "anomaly_events_scored_total", topic="events") == 4.0
    assert value(registry, "anomaly_score_ratio_count") == 4.0
    assert value(registry, "anomaly_score_ratio_sum") == pytest.approx(0.25 + 1.0 + 1.5 + 15.0)
    assert value(registry, "anomaly_score_ratio_bucket", le="1.0") == 2.0  # 0.25 and exactly 1.0
    assert value(registry, "anomaly_score_ratio_bucket", le="1.5") == 3.0
    assert value(registry, "anomaly_score_ratio_bucket", le="+Inf") == 4.0


def test_non_finite_scores_are_counted_but_do_not_poison_the_histogram(
    registry: CollectorRegistry, metrics: WorkerMetrics
) -> None:
    metrics.set_model("v1", threshold=1.0)
    metrics.observe_scores("events", [math.nan, math.inf, 0.5])
    assert value(registry, "anomaly_events_scored_total", topic="events") == 3.0
    assert value(registry, "anomaly_score_ratio_sum") == 0.5


def test_scores_need_a_model(metrics: WorkerMetrics) -> None:
    with pytest.raises(RuntimeError, match="before set_model"):
        metrics.observe_scores("events", [1.0])


def test_model_change_keeps_only_the_current_version(registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
    metrics.set_model("v1", threshold=0.5)
    metrics.set_model("v2", threshold=0.7)
    assert value(registry, "anomaly_model_info", version="v1") is None
    assert value(registry, "anomaly_model_info", version="v2") == 1.0
    assert value(registry, "anomaly_threshold") == 0.7


@pytest.mark.parametrize("threshold", [0.0, -1.0, math.nan, math.inf])
def test_invalid_threshold_is_rejected(metrics: WorkerMetrics, threshold: float) -> None:
    with pytest.raises(ValueError, match="threshold must be a positive finite number"):
        metrics.set_model("v1", threshold)


def test_consumer_lag_replaces_revoked_partitions(registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
    metrics.set_consumer_lag({("events", 0): 10, ("events", 1): 20})
    metrics.set_consumer_lag({("events", 1): 5})
    assert value(registry, "anomaly_consumer_lag_events", topic="events", partition="0") is None
    assert value(registry, "anomaly_consumer_lag_events", topic="events", partition="1") == 5.0


def test_commits_and_failures(registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
    metrics.record_commit(timestamp=1_700_000_000.0)
    metrics.record_commit_failure()
    metrics.record_kafka_error("produce")
    assert value(registry, "anomaly_commits_total") == 1.0
    assert value(registry, "anomaly_last_commit_timestamp_seconds") == 1_700_000_000.0
    assert value(registry, "anomaly_commit_failures_total") == 1.0
    assert value(registry, "anomaly_kafka_errors_total", operation="commit") == 1.0
    assert value(registry, "anomaly_kafka_errors_total", operation="produce") == 1.0
    with pytest.raises(ValueError, match="unknown Kafka operation"):
        metrics.record_kafka_error("fetch")


def test_batch_latency_missing_values_drift_and_ready(registry: CollectorRegistry, metrics: WorkerMetrics) -> None:
    metrics.observe_batch(size=250, duration_seconds=0.03)
    metrics.record_alerts_published("events", 2)
    metrics.observe_end_to_end_latency([0.2, -1.0])
    metrics.declare_fields(["amount", "country"])
    metrics.record_missing_values({"amount": 3, "country": 0})
    metrics.set_score_drift_psi(0.31)
    metrics.follow_readiness(lambda: True)
    assert value(registry, "anomaly_batch_size_events_bucket", le="500.0") == 1.0
    assert value(registry, "anomaly_batch_size_events_bucket", le="200.0") == 0.0
    assert value(registry, "anomaly_batch_duration_seconds_sum") == pytest.approx(0.03)
    assert value(registry, "anomaly_alerts_published_total", topic="events") == 2.0
    assert value(registry, "anomaly_end_to_end_latency_seconds_count") == 2.0
    assert value(registry, "anomaly_end_to_end_latency_seconds_bucket", le="0.005") == 1.0  # skew clamped to 0
    assert value(registry, "anomaly_missing_values_total", field="amount") == 3.0
    assert value(registry, "anomaly_missing_values_total", field="country") == 0.0
    assert value(registry, "anomaly_score_drift_psi") == 0.31
    assert value(registry, "anomaly_worker_ready") == 1.0


def test_custom_score_buckets_are_used_and_validated(registry: CollectorRegistry) -> None:
    metrics = WorkerMetrics(registry, score_buckets=[0.5, 1.0, 2.0])
    metrics.set_model("v1", 1.0)
    metrics.observe_scores("events", [1.5])
    assert value(registry, "anomaly_score_ratio_bucket", le="2.0") == 1.0
    with pytest.raises(ValueError, match="must include 1.0"):
        WorkerMetrics(CollectorRegistry(), score_buckets=[0.5, 2.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        WorkerMetrics(CollectorRegistry(), score_buckets=[1.0, 0.5])


def test_two_instances_on_separate_registries_count_independently() -> None:
    first_registry, second_registry = CollectorRegistry(), CollectorRegistry()
    first, second = WorkerMetrics(first_registry), WorkerMetrics(second_registry)  # no duplicate-name error
    first.record_consumed("events", 3)
    second.record_consumed("events", 1)
    second.record_commit(timestamp=1.0)
    assert value(first_registry, "anomaly_events_consumed_total", topic="events") == 3.0
    assert value(second_registry, "anomaly_events_consumed_total", topic="events") == 1.0
    assert value(first_registry, "anomaly_commits_total") == 0.0
    assert value(second_registry, "anomaly_commits_total") == 1.0
