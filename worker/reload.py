"""Hot reload: follow a model repository's current version without stopping the stream.

1. A background thread reads `REPO/CURRENT` every `reload_interval_s` (at once after `request()`,
   which SIGHUP calls).
2. When it names a new version, the thread loads and verifies that bundle, checks that its schema
   fits the running one, and builds and warms up a pipeline for it, all off the consume loop.
3. The loop calls `take()` between two batches and swaps the ready pipeline in: every batch is
   scored by exactly one model, and its alerts carry that model's version.

A version that fails to load or does not fit, or a `CURRENT` that names no version folder inside
`REPO/versions/` (a path out of the repository, a link; `training.repository.current_version` decides),
is refused: the running model keeps scoring, a log line says why,
`anomaly_model_reloads_total{result="refused"}` counts it, and it is not retried until CURRENT
changes again or SIGHUP asks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from training.bundle import Bundle, load_bundle
from training.errors import AnomalyError, BundleError
from training.repository import current_version, version_path
from worker.metrics import WorkerMetrics
from worker.pipeline import Pipeline
from worker.plugin import Plugin

log = logging.getLogger(__name__)


def schema_misfit(running: Bundle, candidate: Bundle) -> str | None:
    """Why `candidate` cannot replace `running` for the same events, or None if it can.

    The fields (names, order and kinds) must be the same; vocabularies and statistics may change,
    as they do with every retraining.
    """
    old = [(f.name, f.kind) for f in running.schema.fields]
    new = [(f.name, f.kind) for f in candidate.schema.fields]
    if old == new:
        return None
    removed = sorted({n for n, _ in old} - {n for n, _ in new})
    added = sorted({n for n, _ in new} - {n for n, _ in old})
    detail = "; ".join(part for part in (f"fields removed: {', '.join(removed)}" if removed else "",
                                         f"fields added: {', '.join(added)}" if added else "") if part)
    return f"its fields differ from the running model's ({detail or 'order or kinds changed'})"


class ModelWatcher(Plugin):
    """Loads promoted versions in the background; the loop takes a ready pipeline between batches."""

    def __init__(self, repo: Path, running: Bundle, build: Callable[[Bundle], Pipeline], metrics: WorkerMetrics,
                 interval_s: float, expected_schema_hash: str | None = None) -> None:
        self.repo, self.build, self.metrics, self.interval_s = Path(repo), build, metrics, interval_s
        self.expected_schema_hash = expected_schema_hash
        self._running = running
        self._attempted = running.path.name
        self._ready: Pipeline | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    def request(self) -> None:
        """Check now (SIGHUP), and retry a version that was refused before."""
        self._attempted = ""
        self._wake.set()

    def take(self) -> Pipeline | None:
        """The pipeline of a newly promoted version, once, or None (called by the loop between batches)."""
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None:
            self._running = ready.bundle
        return ready

    def between_batches(self) -> Pipeline | None:
        return self.take()

    def check(self) -> None:
        """One look at CURRENT; loads a new version if it names one (the background thread calls this)."""
        try:
            version = current_version(self.repo)
        except BundleError as exc:  # CURRENT names no version inside the repository: refused like a bad bundle
            if str(exc) != self._attempted:
                self._attempted = str(exc)
                self._refuse("CURRENT", exc)
            return
        if version is None or version == self._attempted or version == self._running.path.name:
            return
        self._attempted = version
        started = time.perf_counter()
        try:
            bundle = load_bundle(version_path(self.repo, version), self.expected_schema_hash)
            misfit = schema_misfit(self._running, bundle)
            if misfit is not None:
                raise AnomalyError(misfit)
            pipeline = self.build(bundle)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the running model
            self._refuse(version, exc)
            return
        with self._lock:
            self._ready = pipeline
        log.info("model %s loaded and warmed up in %.2f s; it takes over at the next batch", bundle.version,
                 time.perf_counter() - started)

    def _refuse(self, version: str, reason: Exception) -> None:
        log.error("model %s refused, %s keeps scoring: %s", version, self._running.version, reason)
        self.metrics.record_model_reload("refused")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._wake.wait(self.interval_s)
            self._wake.clear()
