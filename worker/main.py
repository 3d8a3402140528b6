"""anomaly-worker: wiring (settings, bundle, metrics, HTTP, Kafka), signals and the main loop.

Start-up: load and verify the bundle (a bad bundle stops the process with a one-line error), serve
/metrics, /healthz and /readyz, connect to Kafka (retrying with backoff while the broker is away),
then run `worker.loop.Worker` until SIGTERM/SIGINT. On a signal the current batch is finished,
flushed and committed, the clients are closed, and the process exits 0; if that takes longer than
`--shutdown-timeout-s` it exits 1 without committing anything more.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from prometheus_client import CollectorRegistry

from training.bundle import Bundle
from training.errors import AnomalyError
from worker.config import Settings
from worker.http import HealthState
from worker.metrics import WorkerMetrics

log = logging.getLogger("worker")


def _watchdog(deadline_s: float, done: threading.Event) -> None:
    if not done.wait(deadline_s):
        log.error("shutdown did not finish within %.0f s; exiting without further commits", deadline_s)
        logging.shutdown()
        os._exit(1)


def observability(settings: Settings, bundle: Bundle) -> tuple[CollectorRegistry, WorkerMetrics, HealthState]:
    """A fresh registry with the worker's metrics initialised for this model and topic, and health state."""
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.set_model(bundle.version, bundle.threshold.value)
    metrics.declare_topic(settings.input_topic)
    metrics.declare_fields(bundle.schema.names)
    health = HealthState()
    health.model_loaded = True
    return registry, metrics, health


def run(argv: Sequence[str] | None = None) -> int:
    from training.bundle import load_bundle
    from worker.config import from_args
    from worker.errors import BrokerUnavailable
    from worker.http import start_http_server
    from worker.loop import Backoff, Worker
    from worker.pipeline import Pipeline

    settings = from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python is chatty at INFO; its debug output is there when the worker runs at DEBUG.
    client_level = logging.DEBUG if settings.log_level.upper() == "DEBUG" else logging.WARNING
    logging.getLogger("kafka").setLevel(client_level)
    logging.getLogger("librdkafka").setLevel(client_level)

    stop = threading.Event()
    done = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            return
        log.info("received %s: finishing the current batch, then exiting", signal.Signals(signum).name)
        stop.set()
        threading.Thread(target=_watchdog, args=(settings.shutdown_timeout_s, done), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    bundle = load_bundle(settings.model, settings.expected_schema_hash)
    pipeline = Pipeline(bundle, settings.max_event_bytes, settings.top_features,
                        alert_headers=settings.alert_headers)
    pipeline.warm_up()
    registry, metrics, health = observability(settings, bundle)
    server = start_http_server(settings.metrics_host, settings.metrics_port, registry, health)
    log.info("model %s loaded from %s (threshold %.6g, %d fields); metrics on %s/metrics",
             bundle.version, settings.model, bundle.threshold.value, len(bundle.schema.fields), server.url)

    from worker.edge import Quarantine, open_sink, open_source
    from worker.loop import Sink, Source

    source: Source | None = None
    sink: Sink | None = None
    quarantine = Quarantine(metrics, health)
    worker_ref: list[Worker] = []
    backoff = Backoff(stop, maximum_s=settings.retry_backoff_max_s)
    try:
        while not stop.is_set() and (source is None or sink is None):
            try:
                sink = sink or open_sink(settings)
                source = open_source(settings, on_revoke=lambda parts: worker_ref[0].on_revoke(parts)
                                     if worker_ref else None, quarantine=quarantine)
            except BrokerUnavailable as exc:
                health.heartbeat()
                health.broker_ok = False
                log.warning("%s; retrying in %.1f s", exc, backoff.delay_s)
                backoff.wait()
        if source is None or sink is None:
            return 0
        health.broker_ok = True
        worker = Worker(source, sink, pipeline, metrics, health, settings.input_topic, stop,
                        settings.retry_backoff_max_s)
        worker_ref.append(worker)
        log.info("consuming %s as group %s with %s (%s); alerts -> %s, dead letters -> %s (%s)",
                 settings.input_topic, settings.group_id, settings.kafka_client, settings.isolation_level,
                 settings.alert_topic, settings.dead_letter_topic, settings.output_compression)
        worker.run()
        log.info("stopped after finishing the current batch")
        return 0
    finally:
        metrics.set_ready(False)
        if source is not None:
            source.close()
        if sink is not None:
            sink.close()
        server.shutdown()
        done.set()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except AnomalyError as exc:
        print(f"anomaly-worker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
