"""anomaly-worker: wiring (settings, bundle, metrics, HTTP, Kafka), signals and the main loop.

Start-up (assembled by `worker.wiring`): load and verify the bundle, serve /metrics, /healthz and
/readyz, connect to Kafka (retrying with backoff while the broker is away), then run
`worker.loop.Worker` until SIGTERM/SIGINT. A bad flag, bundle, web.config or metrics port stops the
process with a one-line error and exit code 2. On a signal the current batch is finished, flushed and
committed, the clients are closed, and the process exits 0; if that takes longer than
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
from typing import TYPE_CHECKING

from training.errors import AnomalyError, ConfigError

if TYPE_CHECKING:  # importing the loop imports TensorFlow, which must wait for the log level (tf_runtime)
    from worker.loop import Worker

log = logging.getLogger("worker")


def _watchdog(deadline_s: float, done: threading.Event) -> None:
    if not done.wait(deadline_s):
        log.error("shutdown did not finish within %.0f s; exiting without further commits", deadline_s)
        logging.shutdown()
        os._exit(1)


def run(argv: Sequence[str] | None = None) -> int:
    from worker.config import from_args
    from worker.errors import BrokerUnavailable
    from worker.heap import allocator
    from worker.http import start_http_server
    from worker.loop import Backoff
    from worker.web_config import WebConfig, load_web_config
    from worker.wiring import build_runtime, build_worker, start_feedback

    settings = from_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python is chatty at INFO; its debug output is there when the worker runs at DEBUG.
    client_level = logging.DEBUG if settings.log_level.upper() == "DEBUG" else logging.WARNING
    logging.getLogger("kafka").setLevel(client_level)
    logging.getLogger("librdkafka").setLevel(client_level)
    # Before the bundle loads (seconds): a bad web.config is a one-line error at once.
    web = WebConfig() if settings.metrics_web_config is None else load_web_config(settings.metrics_web_config)

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

    runtime = build_runtime(settings)
    if runtime.watcher is not None:
        watcher = runtime.watcher
        signal.signal(signal.SIGHUP, lambda _signum, _frame: watcher.request())
        watcher.start()
        log.info("following the current version of repository %s (every %.0f s, or on SIGHUP)", settings.model,
                 settings.reload_interval_s)
    bundle, health = runtime.bundle, runtime.health
    try:
        server = start_http_server(settings.metrics_host, settings.metrics_port, runtime.registry, health,
                                   max_connections=settings.http_max_connections,
                                   idle_timeout_s=settings.http_idle_timeout_s,
                                   request_timeout_s=settings.http_request_timeout_s, web=web)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} "
                          f"({exc.strerror or exc}); choose another --metrics-port or --metrics-host") from exc
    log.info("model %s loaded from %s (threshold %.6g, %d fields); metrics on %s/metrics",
             bundle.version, settings.model, bundle.threshold.value, len(bundle.schema.fields), server.url)
    if (malloc := allocator()) == "glibc":
        log.info("memory allocator: glibc malloc, heap trimmed every %.0f s; jemalloc keeps memory flatter "
                 "through broker restarts (LD_PRELOAD=libjemalloc.so.2, see docs/operations.md)",
                 settings.heap_trim_interval_s)
    else:
        log.info("memory allocator: %s", malloc)

    feedback = start_feedback(runtime)
    worker: Worker | None = None
    backoff = Backoff(stop, initial_s=settings.retry_backoff_initial_s, maximum_s=settings.retry_backoff_max_s)
    try:
        while not stop.is_set() and worker is None:
            try:
                worker = build_worker(runtime, stop=stop)
            except BrokerUnavailable as exc:
                health.heartbeat()
                runtime.broker.set(False)
                log.warning("%s; retrying in %.1f s", exc, backoff.delay_s)
                backoff.wait()
        if worker is None:
            return 0
        runtime.broker.set(True)
        log.info("consuming %s as group %s with %s (%s); alerts -> %s, dead letters -> %s (%s), %s",
                 settings.input_topic, settings.group_id, settings.kafka_client, settings.isolation_level,
                 settings.alert_topic, settings.dead_letter_topic, settings.output_compression, settings.delivery)
        worker.run()
        log.info("stopped after finishing the current batch")
        return 0
    finally:
        health.check("running", lambda: False)  # stopping: not ready, whatever the clients still say
        if runtime.watcher is not None:
            runtime.watcher.stop()
        if feedback is not None:
            feedback.stop()
        if worker is not None:
            for client in (worker.source, worker.sink):
                try:
                    client.close()
                except Exception:  # noqa: BLE001 - closing must not hide why the worker stops
                    log.exception("closing %s failed", type(client).__name__)
        server.shutdown()
        done.set()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker; every user error (flag, bundle, port) is one line on stderr and exit code 2."""
    try:
        return run(argv)
    except AnomalyError as exc:
        print(f"anomaly-worker: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
