"""Building a worker from settings: the one place main and the benchmarks assemble the product.

`build_runtime` limits BLAS to the loop's thread, loads and verifies the bundle, builds the pipeline
(warmed up), a fresh metrics registry and the health checks; `build_worker` connects a source and a sink
to it and plugs in the batch's side consumers (`plugins`). Kafka stays behind the `connect` callable, so
the benchmarks can wrap the source and the tests can pass fakes.

Readiness is registered here, once, as named checks read from their owners when a probe or a scrape
asks (worker/health.py): nothing pushes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry

from training.bundle import Bundle, load_bundle
from training.repository import is_repository, resolve_model
from worker.config import Settings
from worker.drift import DriftWatch
from worker.feedback import FeedbackLedger, KnownVersions
from worker.flood import FloodControl, FloodGate
from worker.health import BrokerStatus, Health
from worker.heap import HeapTrimmer
from worker.kafka import Quarantine, open_sink, open_source, open_transactional_sink
from worker.loop import Pacing, Sink, Source, Worker
from worker.metrics import WorkerMetrics
from worker.pipeline import Pipeline
from worker.plugin import Plugin
from worker.reload import ModelWatcher
from worker.shadow import ShadowScorer
from worker.threads import single_threaded_blas
from worker.values import ValueDecoding, model_fields
from worker.windows import PartitionWindows

#: Called with the partitions being revoked (inside the consumer's poll).
OnRevoke = Callable[[set[tuple[str, int]]], None]
#: Makes the source and sink for a worker; raises `BrokerUnavailable` while no broker answers.
Connect = Callable[[Settings, OnRevoke], tuple[Source, Sink]]


@dataclass(frozen=True)
class Runtime:
    """Everything a worker needs besides Kafka."""

    settings: Settings
    bundle: Bundle
    pipeline: Pipeline
    registry: CollectorRegistry
    metrics: WorkerMetrics
    health: Health
    broker: BrokerStatus  # the loop's last broker round trip; main sets it while it connects
    watcher: ModelWatcher | None = None  # set when --model is a repository: follows its current version
    shadow: ShadowScorer | None = None  # set with --shadow-model
    #: The live model's window state, one per assigned partition (worker/windows.py; empty for a model without
    #: windows). Every live pipeline shares it: a promoted model with the same windows keeps it, one with other
    #: windows resets it at its first batch.
    windows: PartitionWindows | None = None
    #: The `--value-format` decoder every pipeline shares, and the schema registry's status (worker/values.py).
    values: ValueDecoding | None = None


def observability(settings: Settings, bundle: Bundle) -> tuple[CollectorRegistry, WorkerMetrics, Health, BrokerStatus]:
    """A fresh registry with the worker's metrics initialised for this model and topic, and the health checks.

    Until `build_worker` connects a source, no partition is assigned and none is held.
    """
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.set_model(bundle.version, bundle.threshold.value)
    metrics.set_delivery_mode(settings.delivery)
    metrics.declare_topic(settings.input_topic)
    metrics.declare_fields(bundle.schema.names)
    health, broker = Health(stale_after_seconds=settings.liveness_timeout_s), BrokerStatus()
    readiness(health, broker, metrics)
    return registry, metrics, health, broker


def readiness(health: Health, broker: BrokerStatus, metrics: WorkerMetrics, source: Source | None = None,
              quarantine: Quarantine | None = None, registry: BrokerStatus | None = None) -> None:
    """Register the readiness checks, in the order `/readyz` names them, and point the gauges at them.

    Without a source yet no partition is assigned; without a quarantine none is held. A model is loaded:
    a runtime exists only once its bundle is verified and its pipeline warm. With a registry value format,
    `schema_registry_ok`: the registry answered the last time a batch needed it.
    """
    health.check("model_loaded", lambda: True)
    health.check("partitions_assigned", (lambda: bool(source.assigned())) if source is not None else lambda: False)
    health.check("broker_ok", lambda: broker.ok)
    held = quarantine.held_count if quarantine is not None else lambda: 0
    health.check("batches_decodable", lambda: held() == 0)
    if registry is not None:
        health.check("schema_registry_ok", lambda: registry.ok)
    metrics.follow_readiness(health.is_ready)
    metrics.follow_undecodable_partitions(held)


def build_runtime(settings: Settings, pipeline_class: type[Pipeline] = Pipeline) -> Runtime:
    """Load and verify the bundle (a repository's current version; a bad one raises BundleError), build and
    warm up the pipeline; with a repository, a watcher that follows promotions (started by the caller).
    BLAS runs single-threaded from here on (worker/threads.py)."""
    single_threaded_blas()
    bundle = load_bundle(resolve_model(settings.model), settings.expected_schema_hash)
    registry, metrics, health, broker = observability(settings, bundle)
    windows = PartitionWindows(bundle.windows, settings.window_max_entities, settings.window_max_bytes, metrics)
    metrics.follow_window_state(windows.entity_count, windows.estimated_bytes)
    live: list[Pipeline] = []  # the pipeline scoring now (a promotion replaces it)
    values = ValueDecoding(settings.values, metrics, lambda: model_fields(live[-1].bundle if live else bundle))

    def make_pipeline(bundle: Bundle, shared: PartitionWindows = windows) -> Pipeline:
        pipeline = pipeline_class(bundle, settings.max_event_bytes, settings.top_features,
                                  entity_field=settings.alert_key_field, alert_headers=settings.alert_headers,
                                  windows=shared, decoder=values.decoder)
        pipeline.warm_up()
        if shared is windows:
            live.append(pipeline)
            del live[:-1]
        return pipeline

    pipeline = make_pipeline(bundle)
    watcher = ModelWatcher(settings.model, bundle, make_pipeline, metrics, settings.reload_interval_s,
                           settings.expected_schema_hash) if is_repository(settings.model) else None
    shadow = None
    if settings.shadow_model is not None:  # its windows are its own: the live state is the live model's
        candidate = load_bundle(resolve_model(settings.shadow_model))
        own = PartitionWindows(candidate.windows, settings.window_max_entities, settings.window_max_bytes)
        shadow = ShadowScorer(make_pipeline(candidate, own), metrics, settings.input_topic)
    return Runtime(settings=settings, bundle=bundle, pipeline=pipeline, registry=registry, metrics=metrics,
                   health=health, broker=broker, watcher=watcher, shadow=shadow, windows=windows, values=values)


def kafka_connect(settings: Settings, on_revoke: OnRevoke, quarantine: Quarantine | None = None) -> tuple[Source, Sink]:
    """The product's Kafka source and sink, of `settings.kafka_client` (see worker/kafka/__init__.py)."""
    if settings.exactly_once:
        source = open_source(settings, on_revoke=on_revoke, quarantine=quarantine)
        try:
            return source, open_transactional_sink(settings, source)
        except BaseException:
            source.close()
            raise
    sink = open_sink(settings)
    try:
        return open_source(settings, on_revoke=on_revoke, quarantine=quarantine), sink
    except BaseException:
        sink.close()
        raise


def build_worker(runtime: Runtime, connect: Connect | None = None, stop: threading.Event | None = None,
                 wrap_source: Callable[[Source], Source] | None = None) -> Worker:
    """Connect a source and sink and assemble the loop (revocations reach the worker that owns the offsets).

    Without `connect`, the product's Kafka clients, whose undecodable batches show in this runtime's metrics
    and readiness. Readiness follows this worker's source from here on.
    """
    settings = runtime.settings
    owner: list[Worker] = []
    quarantine = Quarantine(runtime.metrics)
    connect = connect or (lambda s, on_revoke: kafka_connect(s, on_revoke, quarantine))
    source, sink = connect(settings, lambda partitions: owner[0].on_revoke(partitions) if owner else None)
    source = wrap_source(source) if wrap_source else source
    pacing = Pacing(backoff_initial_s=settings.retry_backoff_initial_s, backoff_max_s=settings.retry_backoff_max_s,
                    broker_check_interval_s=settings.broker_check_interval_s)
    registry = runtime.values.registry if runtime.values is not None and runtime.values.uses_registry else None
    worker = Worker(source, sink, runtime.pipeline, runtime.metrics, settings.input_topic, runtime.health,
                    runtime.broker, stop, pacing=pacing, plugins=plugins(runtime), registry=registry)
    owner.append(worker)
    readiness(runtime.health, runtime.broker, runtime.metrics, source, quarantine, registry)
    return worker


def plugins(runtime: Runtime) -> list[Plugin]:
    """The batch's side consumers the settings ask for, in the order the loop calls them (worker/plugin.py)."""
    settings = runtime.settings
    chosen: list[Plugin] = [HeapTrimmer(settings.heap_trim_interval_s)]
    if runtime.watcher is not None:
        chosen.append(runtime.watcher)
    if runtime.shadow is not None:
        chosen.append(runtime.shadow)
    if settings.alert_cooldown_s or settings.max_alerts_per_s:
        control = FloodControl(settings.alert_key_field, settings.alert_cooldown_s, settings.max_alerts_per_s)
        chosen.append(FloodGate(control, runtime.metrics, settings.input_topic))
    chosen.append(DriftWatch(runtime.metrics, runtime.bundle))
    return chosen


class Stoppable(Protocol):
    def stop(self) -> None: ...


def start_feedback(runtime: Runtime) -> Stoppable | None:
    """With --feedback-topic: a background reader feeding analyst verdicts to the precision metrics.

    Verdicts count for the versions loaded here and, with a repository, for its versions (worker/feedback.py)."""
    topic = runtime.settings.feedback_topic
    if topic is None:
        return None
    from worker.kafka.feedback import FeedbackReader

    loaded = {runtime.bundle.version} | ({runtime.shadow.pipeline.bundle.version} if runtime.shadow else set())
    model = runtime.settings.model
    known = KnownVersions(loaded, repository=model if is_repository(model) else None)
    reader = FeedbackReader(runtime.settings, topic, FeedbackLedger(runtime.metrics, known).add)
    reader.start()
    return reader
