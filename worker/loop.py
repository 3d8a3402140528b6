"""The consume-score-publish-commit loop, written against two narrow interfaces (Source, Sink).

Order of side effects for every micro-batch (this order is the at-least-once guarantee):

0. Between two batches: the plugins' housekeeping (heap trim), and a newly promoted model swapped in, if
   the repository watcher has one ready.
1. Poll a micro-batch from the source (at most `max_batch` records or `max_wait_ms`).
2. Process it in memory: decode, validate, score, build alerts and dead letters (no I/O; with a registry
   value format, decoding may ask the schema registry for a writer schema: if it does not answer, nothing
   of the batch is decided, the source is rewound to its first offsets and it is read again after a
   backoff, with `registry` (readiness) down until it answers); then each
   plugin sees it in order: a shadow model (if configured) scores it too, for metrics only; flood
   control (if configured) decides which alerts to publish and adds summaries of suppressed ones.
3. Publish those alerts and every dead letter, flush, and check that each one was acknowledged.
4. Only then commit the batch's next offsets. If step 3 failed, nothing is committed: the source is
   rewound to the batch's first offsets and the batch is read again after a backoff.
   If step 4 fails, the offsets stay pending and are committed with the next batch (or on revoke).
   The confluent source sends the commit asynchronously (it is confirmed while the next batch is
   processed; a failure is sent again and raised by the next commit, see worker/kafka/confluent/source.py).
5. The plugins keep what they decided at step 2 (flood control's windows); then metrics are updated
   and the plugins see the delivered batch (drift).

Side consumers meet the loop only through `worker/plugin.py`'s hooks, called at these steps; liveness is
a heartbeat per iteration, and readiness reads `broker` (set at steps 3 and 4 and by the idle check) when
a probe asks (worker/health.py).

Exactly-once (`--delivery exactly-once`, a `TransactionalSink`): steps 3 and 4 are one Kafka
transaction holding the batch's alerts, dead letters and next offsets. If it is aborted, nothing of it
is visible to `read_committed` consumers and the source is rewound as after a failed step 3; nothing is
ever pending, so there is no separate commit.

An empty poll commits whatever is pending. With nothing pending it asks the source, at most every
`broker_check_interval_s`, whether the broker still answers (`Source.reachable`): an idle consumer
otherwise never learns that its broker went away, and readiness would stay green through an outage.
Then the plugins may publish (flood control's summaries of windows that ended while idle).

Because step 4 runs before the next poll, a rebalance (which happens inside poll) normally finds every
delivered offset committed (or, with the confluent source, its commit on the way); offsets left pending
by a failed commit are dropped for revoked partitions (their next owner re-reads them). A stop request
finishes the current batch first.

With window state (a model with window features), every commit carries the partition's restore point as
metadata, a partition assigned is first replayed from the point its commit names, and a batch read again
first rebuilds the state it had entered: worker/restore.py. Records replayed are never scored, published or
committed; a poll that holds only those is an idle pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from training.value_formats import RegistryUnavailable
from worker.errors import CommitError, DeliveryError, RebalanceInProgress
from worker.health import BrokerStatus, Health
from worker.kafka.core import Offsets, Restore, TopicKey, describe
from worker.metrics import WorkerMetrics
from worker.pipeline import BatchResult, Pipeline
from worker.plugin import Plugin
from worker.records import Alert, DeadLetter, Record
from worker.restore import Restorer

if TYPE_CHECKING:
    from worker.windows import PartitionWindows

log = logging.getLogger(__name__)

#: A batch stage or an idle pass slower than this is logged with its parts: it shows where a stalled loop
#: waits (every Kafka call is bounded by the Kafka timeout, but several in a row are not).
SLOW_S = 5.0


class Source(Protocol):
    def poll_batch(self) -> list[Record]: ...
    def commit(self, offsets: Offsets) -> None: ...
    def rewind(self, offsets: Offsets) -> None: ...
    def lag(self) -> dict[tuple[str, int], int]: ...
    def assigned(self) -> set[tuple[str, int]]: ...
    def reachable(self) -> bool: ...
    def close(self) -> None: ...


class Sink(Protocol):
    def publish(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter]) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class TransactionalSink(Sink, Protocol):
    """A sink that commits the consumer's offsets itself, atomically with the batch's records."""

    def publish_and_commit(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter],
                           offsets: Offsets) -> None: ...


@runtime_checkable
class Restoring(Protocol):
    """A source, or a transactional sink, whose commits carry window restore points (worker/restore.py)."""

    def restore_with(self, restore: Restore) -> None: ...


def next_offsets(records: Sequence[Record]) -> dict[tuple[str, int], int]:
    """Per partition, the offset to commit: last offset + 1."""
    out: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        out[key] = max(out.get(key, -1), r.offset + 1)
    return out


def first_offsets(records: Sequence[Record]) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        out[key] = min(out.get(key, r.offset), r.offset)
    return out


class Backoff:
    """Exponential backoff whose waits end early when a stop is requested."""

    def __init__(self, stop: threading.Event, initial_s: float = 0.5, maximum_s: float = 30.0) -> None:
        self.stop, self.initial_s, self.maximum_s = stop, initial_s, maximum_s
        self.delay_s = initial_s

    def wait(self) -> None:
        self.stop.wait(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.maximum_s)

    def reset(self) -> None:
        self.delay_s = self.initial_s


@dataclass(frozen=True)
class Pacing:
    """How the loop waits: backoff after a failed delivery, and how often an idle loop asks for the broker."""

    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    broker_check_interval_s: float = 2.0


class Worker:
    """Runs micro-batches until `stop` is set; see the module docstring for the order of side effects.

    `health` gets a heartbeat every iteration (liveness); `broker` holds whether the last broker round trip
    succeeded (readiness reads it); `plugins` are the batch's side consumers (worker/plugin.py), called in order.
    """

    def __init__(self, source: Source, sink: Sink, pipeline: Pipeline, metrics: WorkerMetrics, input_topic: str,
                 health: Health, broker: BrokerStatus, stop: threading.Event | None = None,
                 pacing: Pacing = Pacing(), plugins: Sequence[Plugin] = (),
                 registry: BrokerStatus | None = None) -> None:
        self.source, self.sink, self.pipeline = source, sink, pipeline
        self.metrics, self.input_topic = metrics, input_topic
        self.health, self.broker, self.registry = health, broker, registry
        self.stop = stop or threading.Event()
        self.backoff = Backoff(self.stop, initial_s=pacing.backoff_initial_s, maximum_s=pacing.backoff_max_s)
        self.broker_check_interval_s = pacing.broker_check_interval_s
        self.plugins = tuple(plugins)
        self.pending: dict[tuple[str, int], int] = {}
        #: Window state: partitions being restored, and the metadata commits carry (worker/restore.py).
        self.restorer = Restorer(self._windows, lambda records: self.pipeline.replay(records))
        self._restores = False  # whether the source (and a transactional sink) carry restore points yet
        self._follow_windows()
        self._commit_failing = False
        self._last_lag = 0.0
        self._last_broker_check = time.monotonic()
        self._stages: dict[str, float] = {}  # seconds per stage of the current batch (metrics)

    def swap_model(self, pipeline: Pipeline) -> None:
        """Score from the next batch on with `pipeline` (a new model version); the plugins follow it."""
        started = time.perf_counter()
        old = self.pipeline.bundle.version
        self.pipeline = pipeline
        for plugin in self.plugins:
            plugin.on_model(pipeline)
        self.metrics.set_model(pipeline.bundle.version, pipeline.threshold)
        self.metrics.record_model_reload("loaded")
        self._follow_windows()
        log.info("model %s replaced %s between two batches (%.3f ms)", pipeline.bundle.version, old,
                 (time.perf_counter() - started) * 1000)

    def on_revoke(self, partitions: set[tuple[str, int]]) -> None:
        """Forget delivered-but-uncommitted offsets of partitions being revoked (called from inside poll).

        Offsets are normally committed at the end of every batch, before the next poll, so a rebalance
        (which happens inside poll) finds nothing pending. Something is pending only when the last commit
        failed; committing again from inside the rebalance callback can wedge kafka-python 3.0's group
        join, so the next owner re-reads those records instead (duplicates with the same alert ids).
        """
        mine = sorted(k for k in self.pending if k in partitions)
        if mine:
            log.warning("partitions %s revoked with uncommitted delivered offsets; the next owner re-reads them",
                        ", ".join(describe(t, p, self.pending[(t, p)]) for t, p in mine))
        for k in mine:
            self.pending.pop(k, None)
        self.restorer.revoke(partitions)

    def _windows(self) -> PartitionWindows | None:
        """The live model's window state; None for a model without windows."""
        return getattr(self.pipeline, "windows", None) if getattr(self.pipeline, "spec", None) is not None else None

    def _follow_windows(self) -> None:
        """With a model with windows, the source and a transactional sink carry restore points from now on."""
        if self._restores or self._windows() is None:
            return
        restore = Restore(start=self.on_start, metadata=self.restorer.metadata)
        for end in (self.source, self.sink):
            if isinstance(end, Restoring):
                end.restore_with(restore)
        self._restores = True

    def on_start(self, key: TopicKey, committed: int, metadata: str | None) -> int | None:
        """Where a partition assigned (or restarted) is read from (worker/restore.py, step 2); called by the
        source inside poll. Offsets still pending for it are dropped: it is read again from its committed one."""
        self.pending.pop(key, None)
        return self.restorer.start(key, committed, metadata)

    def run(self) -> None:
        while not self.stop.is_set():
            self.run_once()

    def run_once(self) -> BatchResult | None:
        """One micro-batch through steps 0-5; returns the batch result, or None if nothing was polled."""
        self.health.heartbeat()
        for plugin in self.plugins:
            if (update := plugin.between_batches()) is not None:                  # 0
                self.swap_model(update)
        polled = time.perf_counter()
        records = self.source.poll_batch()                                         # 1
        if self.restorer and records:
            records = self.restorer.split(records)                                 # 1: replay restored state
        if not records:
            self._idle(polled)
            return None
        started = time.perf_counter()
        self._stages = {"poll": started - polled}
        try:
            result = self.pipeline.process(records)                                # 2
        except RegistryUnavailable as exc:
            self._registry_down(records, exc)
            return None
        if self.registry is not None:
            self.registry.set(True)
        alerts = result.alerts
        for plugin in self.plugins:
            alerts = plugin.on_processed(records, result, alerts)                  # 2: shadow, flood control
        self._stages["process"] = time.perf_counter() - started
        if isinstance(self.sink, TransactionalSink):
            delivered = self._publish_and_commit(self.sink, records, alerts, result)  # 3 + 4, one transaction
        else:
            delivered = self._publish_then_commit(records, alerts, result)         # 3, then 4
        if not delivered:
            return None
        for plugin in self.plugins:
            plugin.on_delivered()                                                  # 5
        try:
            recording = time.perf_counter()
            self._record(result, alerts, recording - started)
            self._stages["record"] = time.perf_counter() - recording
            self.metrics.observe_stages(self._stages)
            self._warn_if_slow("batch", self._stages)
        except Exception:  # noqa: BLE001 - metrics never take the worker down after a commit
            log.exception("updating metrics for a batch failed; the batch itself is delivered and committed")
        return result

    def _idle(self, polled: float) -> None:
        """An empty poll: commit what is pending (or ask for the broker), then let the plugins publish."""
        checking = time.perf_counter()
        if self.pending:
            self._commit_pending()
        else:
            self._check_broker()
        self._publish_while_idle()
        self._update_lag()
        self._warn_if_slow("idle pass", {"poll": checking - polled, "checks": time.perf_counter() - checking})

    def _publish_then_commit(self, records: Sequence[Record], alerts: Sequence[Alert], result: BatchResult) -> bool:
        """Step 3, publish and confirm, then step 4; if step 3 fails, rewind the batch and back off (False)."""
        started = time.perf_counter()
        try:
            self.sink.publish(alerts, result.dead_letters)
        except DeliveryError as exc:
            self._read_again(records, f"not delivered, will be read again: {exc}")
            return False
        published = time.perf_counter()
        self._stages["publish"] = published - started
        self.pending.update(next_offsets(records))
        self._commit_pending()
        self._stages["commit"] = time.perf_counter() - published
        return True

    def _publish_and_commit(self, sink: TransactionalSink, records: Sequence[Record], alerts: Sequence[Alert],
                            result: BatchResult) -> bool:
        """Steps 3 + 4 as one transaction; if it is aborted, rewind the batch and back off (returns False)."""
        started = time.perf_counter()
        try:
            sink.publish_and_commit(alerts, result.dead_letters, next_offsets(records))
        except DeliveryError as exc:
            self.metrics.record_transaction("aborted", time.perf_counter() - started)
            self._read_again(records, f"not committed, will be read again: {exc}")
            return False
        self.metrics.record_transaction("committed", time.perf_counter() - started)
        self._stages["publish"] = time.perf_counter() - started
        self.restorer.committed(next_offsets(records))
        self.metrics.record_commit()
        self.broker.set(True)
        self.backoff.reset()
        return True

    def _read_again(self, records: Sequence[Record], why: str) -> None:
        """Nothing of the batch is committed: mark the broker down, rewind to its first offsets, back off."""
        log.error("batch of %d records %s", len(records), why)
        self.metrics.record_kafka_error("produce")
        self.broker.set(False)
        self.source.rewind(self.restorer.rewind_points(first_offsets(records)))
        self.backoff.wait()

    def _registry_down(self, records: Sequence[Record], exc: RegistryUnavailable) -> None:
        """The schema registry did not answer: nothing of the batch is decided, so it is read again after a
        backoff, as after a failed delivery; readiness fails until the registry answers."""
        log.warning("batch of %d records not decoded, will be read again: %s", len(records), exc)
        self.metrics.registry_failures.inc()
        if self.registry is not None:
            self.registry.set(False)
        self.source.rewind(self.restorer.rewind_points(first_offsets(records)))
        self.backoff.wait()

    def _commit_pending(self) -> None:
        if not self.pending:
            return
        self._last_broker_check = time.monotonic()  # a commit is a round trip too: no idle check needed soon
        try:
            self.source.commit(self.pending)
        except RebalanceInProgress as exc:
            log.debug("offsets %s stay pending: %s", self._describe(self.pending), exc)
            return
        except CommitError as exc:
            if not self._commit_failing:
                log.warning("offsets %s stay pending: %s", self._describe(self.pending), exc)
            self._commit_failing = True
            self.metrics.record_commit_failure()
            self.broker.set(False)
            return
        if self._commit_failing:
            log.info("commits succeed again: %s", self._describe(self.pending))
            self._commit_failing = False
        self.restorer.committed(self.pending)
        self.pending.clear()
        self.metrics.record_commit()
        self.broker.set(True)
        self.backoff.reset()

    def _check_broker(self) -> None:
        """While idle, learn whether the broker answers from a bounded round trip (a commit does this while busy)."""
        now = time.monotonic()
        if now - self._last_broker_check < self.broker_check_interval_s:
            return
        ok = self.source.reachable()
        self._last_broker_check = time.monotonic()
        if ok and not self.broker.ok:
            log.info("broker reachable again")
            self.backoff.reset()
        elif not ok and self.broker.ok:
            log.warning("broker not reachable; not ready until it answers again")
        if not ok:
            self.metrics.record_kafka_error("poll")
        self.broker.set(ok)

    def _publish_while_idle(self) -> None:
        """While idle, publish what the plugins release now (flood control: summaries of ended windows); what
        is not delivered is released again later."""
        alerts = [alert for plugin in self.plugins for alert in plugin.on_idle()]
        if not alerts:
            return
        try:
            self.sink.publish(alerts, [])
        except DeliveryError as exc:
            log.warning("%d alerts not delivered while idle, retried later: %s", len(alerts), exc)
            self.metrics.record_kafka_error("produce")
            return
        for plugin in self.plugins:
            plugin.on_delivered()

    def _record(self, result: BatchResult, published: Sequence[Alert], seconds: float) -> None:
        topic = self.input_topic
        self.metrics.record_consumed(topic, result.consumed)
        for letter in result.dead_letters:
            self.metrics.record_dead_letter(topic, letter.reason)
        if result.isolated:
            self.metrics.record_isolated(topic, result.isolated)
        if result.scored:
            self.metrics.observe_scores(topic, result.scores)
        self.metrics.record_missing_values(result.missing)
        if published:
            self.metrics.record_alerts_published(topic, len(published))
            now = time.time()
            self.metrics.observe_end_to_end_latency(
                now - np.array([a.event_time_s for a in published if a.event_time_s is not None], dtype=np.float64))
        self.metrics.observe_batch(result.consumed, seconds)
        self._update_lag()
        for plugin in self.plugins:
            plugin.on_batch(result)

    @staticmethod
    def _warn_if_slow(what: str, seconds: Mapping[str, float]) -> None:
        if max(seconds.values(), default=0.0) >= SLOW_S:
            log.warning("slow %s: %s", what, ", ".join(f"{stage} {s:.1f} s" for stage, s in seconds.items()))

    def _update_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag >= 1.0:
            self._last_lag = now
            self.metrics.set_consumer_lag(self.restorer.lags(self.source.lag()) if self.restorer else self.source.lag())

    @staticmethod
    def _describe(offsets: Offsets) -> str:
        return ", ".join(describe(t, p, o) for (t, p), o in sorted(offsets.items()))
