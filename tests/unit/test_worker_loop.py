"""Worker loop order of side effects, against in-memory Source/Sink fakes: poll -> publish -> commit."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tests.fakes import TOPIC, FakeSource
from training.value_formats import RegistryUnavailable
from worker.alerts import build_alert
from worker.drift import DriftWatch, FieldDrift
from worker.errors import DeliveryError, TransactionAborted
from worker.health import BrokerStatus, Health
from worker.loop import Backoff, Pacing, Worker
from worker.metrics import WorkerMetrics
from worker.pipeline import BatchResult
from worker.plugin import Plugin
from worker.records import Alert, DeadLetter, Record

MODEL = "m1"


class FakeSink:
    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.fail_publishes = 0
        self.alerts: list[Alert] = []
        self.dead_letters: list[DeadLetter] = []

    def close(self) -> None:
        self.log.append(("close_sink",))

    def publish(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter]) -> None:
        if self.fail_publishes:
            self.fail_publishes -= 1
            self.log.append(("publish-failed", len(alerts), len(dead_letters)))
            raise DeliveryError("1 of 2 records were not acknowledged: timed out")
        self.alerts.extend(alerts)
        self.dead_letters.extend(dead_letters)
        self.log.append(("publish", [a.alert_id for a in alerts], [d.record.offset for d in dead_letters]))


class FakePipeline:
    """b"bad" -> dead letter; a value starting with b"A" -> alert (score 5 > threshold 1); else normal."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = log
        self.bundle = SimpleNamespace(version=MODEL, histogram=SimpleNamespace(edges=[0.0, 1.0, 2.0], counts=[5, 5]),
                                      schema=SimpleNamespace(fields=()), field_histograms={})
        self.stop_after_process: threading.Event | None = None
        self.registry_down = 0  # batches that meet a schema registry that does not answer

    def process(self, records: Sequence[Record]) -> BatchResult:
        self.log.append(("process", len(records)))
        if self.registry_down:
            self.registry_down -= 1
            raise RegistryUnavailable("schema registry did not answer for schema id 1: ConnectError")
        dead = [DeadLetter(r, "invalid_json", "not JSON", MODEL) for r in records if r.value == b"bad"]
        good = [r for r in records if r.value != b"bad"]
        alerts = [build_alert(r, {}, 5.0, 1.0, MODEL, [], 0.0) for r in good if r.value and r.value.startswith(b"A")]
        scores = np.array([5.0 if r.value and r.value.startswith(b"A") else 0.5 for r in good])
        if self.stop_after_process is not None:
            self.stop_after_process.set()
        return BatchResult(consumed=len(records), alerts=alerts, dead_letters=dead, scores=scores)


@pytest.fixture
def log() -> list[tuple]:
    return []


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def make_worker(log: list[tuple], partitions: dict[int, list[bytes]], registry: CollectorRegistry,
                max_batch: int = 4, broker_check_interval_s: float = 2.0, plugins: Sequence[Plugin] = (),
                field_drift: Callable[[Any], FieldDrift] | None = None,
                ) -> tuple[Worker, FakeSource, FakeSink, FakePipeline]:
    """A worker on fakes, its readiness wired as worker/wiring.py wires it; `plugins` come before the drift."""
    from worker.wiring import readiness

    source, sink, pipeline = FakeSource(log, partitions, max_batch), FakeSink(log), FakePipeline(log)
    metrics = WorkerMetrics(registry)
    metrics.set_model(MODEL, 1.0)
    health, broker = Health(), BrokerStatus()
    pacing = Pacing(backoff_initial_s=0.001, backoff_max_s=0.001,  # no real waiting in unit tests
                    broker_check_interval_s=broker_check_interval_s)
    drift = DriftWatch(metrics, pipeline.bundle, field_drift=field_drift)  # type: ignore[arg-type]
    worker = Worker(source, sink, pipeline, metrics, TOPIC, health, broker, threading.Event(),  # type: ignore[arg-type]
                    pacing=pacing, plugins=[*plugins, drift])
    readiness(health, broker, metrics, source)
    return worker, source, sink, pipeline


def kinds(log: list[tuple]) -> list[str]:
    return [entry[0] for entry in log]


def test_poll_then_process_then_publish_then_commit(log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, sink, _ = make_worker(log, {0: [b"n", b"A1", b"bad"], 1: [b"A2"]}, registry)
    result = worker.run_once()
    assert result is not None and result.consumed == 4
    assert kinds(log) == ["poll", "process", "publish", "commit"]
    assert log[2] == ("publish", [f"{MODEL}/{TOPIC}/0/1", f"{MODEL}/{TOPIC}/1/0"], [2])
    assert log[3] == ("commit", {(TOPIC, 0): 3, (TOPIC, 1): 1})  # next offset = last + 1
    assert worker.pending == {}
    assert registry.get_sample_value("anomaly_events_consumed_total", {"topic": TOPIC}) == 4
    assert registry.get_sample_value("anomaly_alerts_published_total", {"topic": TOPIC}) == 2
    assert registry.get_sample_value("anomaly_dead_letters_total", {"topic": TOPIC, "reason": "invalid_json"}) == 1
    assert registry.get_sample_value("anomaly_commits_total") == 1
    for stage in ("poll", "process", "publish", "commit", "record"):
        assert registry.get_sample_value("anomaly_batch_stage_seconds_count", {"stage": stage}) == 1, stage


def test_empty_poll_publishes_and_commits_nothing(log: list[tuple], registry: CollectorRegistry) -> None:
    worker, _, _, _ = make_worker(log, {0: []}, registry)
    assert worker.run_once() is None
    assert kinds(log) == ["poll"]


def test_delivery_failure_commits_nothing_rewinds_and_replays_with_the_same_ids(
        log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, sink, _ = make_worker(log, {0: [b"A0", b"n", b"A2", b"bad", b"A4"], 1: [b"A0"]}, registry,
                                          max_batch=3)
    worker.run_once()  # partition 0 offsets 0-2 delivered and committed
    assert source.committed == {(TOPIC, 0): 3}
    del log[:]
    sink.fail_publishes = 1
    assert worker.run_once() is None
    assert kinds(log) == ["poll", "process", "publish-failed", "rewind"]
    assert log[0] == ("poll", [(0, 3), (0, 4), (1, 0)])
    assert log[3] == ("rewind", {(TOPIC, 0): 3, (TOPIC, 1): 0})  # the batch's first offsets
    assert source.committed == {(TOPIC, 0): 3}, "nothing may be committed that was not delivered"
    assert worker.pending == {}
    assert registry.get_sample_value("anomaly_kafka_errors_total", {"operation": "produce"}) == 1
    assert registry.get_sample_value("anomaly_events_consumed_total", {"topic": TOPIC}) == 3  # first batch only
    assert worker.broker.ok is False

    del log[:]
    result = worker.run_once()  # the same batch again, now delivered
    assert result is not None
    assert kinds(log) == ["poll", "process", "publish", "commit"]
    assert log[0] == ("poll", [(0, 3), (0, 4), (1, 0)])
    assert log[2] == ("publish", [f"{MODEL}/{TOPIC}/0/4", f"{MODEL}/{TOPIC}/1/0"], [3])
    assert source.committed == {(TOPIC, 0): 5, (TOPIC, 1): 1}
    ids = [a.alert_id for a in sink.alerts]
    assert ids == [f"{MODEL}/{TOPIC}/0/0", f"{MODEL}/{TOPIC}/0/2", f"{MODEL}/{TOPIC}/0/4", f"{MODEL}/{TOPIC}/1/0"]
    assert worker.broker.ok is True


def test_a_registry_that_does_not_answer_decides_nothing_of_the_batch_until_it_does(
        log: list[tuple], registry: CollectorRegistry) -> None:
    """A peer's fault, not the records': no dead letter, no alert, no commit; rewound, not ready, read again."""
    from worker.wiring import readiness

    worker, source, sink, pipeline = make_worker(log, {0: [b"A0", b"bad", b"n"]}, registry)
    status = BrokerStatus(ok=True)
    worker.registry = status
    readiness(worker.health, worker.broker, worker.metrics, source, registry=status)
    pipeline.registry_down = 2
    for _ in range(2):
        del log[:]
        assert worker.run_once() is None
        assert kinds(log) == ["poll", "process", "rewind"]
        assert log[2] == ("rewind", {(TOPIC, 0): 0})
    assert sink.alerts == [] and sink.dead_letters == [] and source.committed == {}
    assert "schema_registry_ok" in worker.health.failing_readiness()
    assert registry.get_sample_value("anomaly_schema_registry_failures_total") == 2
    del log[:]
    assert worker.run_once() is not None  # the registry answers again: the same records, decided once
    assert kinds(log) == ["poll", "process", "publish", "commit"]
    assert [a.alert_id for a in sink.alerts] == [f"{MODEL}/{TOPIC}/0/0"] and len(sink.dead_letters) == 1
    assert source.committed == {(TOPIC, 0): 3} and status.ok


def test_commit_failure_keeps_offsets_pending_until_the_next_batch(
        log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, _, _ = make_worker(log, {0: [b"n"] * 3, 1: [b"n"] * 5}, registry, max_batch=4)
    source.fail_commits = 1
    result = worker.run_once()
    assert result is not None  # delivered: the batch is done even though the commit failed
    assert kinds(log) == ["poll", "process", "publish", "commit-failed"]
    assert worker.pending == {(TOPIC, 0): 3, (TOPIC, 1): 1}
    assert source.committed == {}
    assert registry.get_sample_value("anomaly_commit_failures_total") == 1
    assert registry.get_sample_value("anomaly_kafka_errors_total", {"operation": "commit"}) == 1
    assert worker.broker.ok is False

    del log[:]
    worker.run_once()  # partition 1 offsets 1-4: its commit carries the pending partition 0 too
    assert kinds(log) == ["poll", "process", "publish", "commit"]
    assert log[-1] == ("commit", {(TOPIC, 0): 3, (TOPIC, 1): 5})
    assert worker.pending == {}
    assert worker.broker.ok is True


def test_pending_offsets_are_committed_on_an_empty_poll(log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, _, _ = make_worker(log, {0: [b"n", b"n"]}, registry)
    source.fail_commits = 1
    worker.run_once()
    assert source.committed == {}
    del log[:]
    assert worker.run_once() is None
    assert kinds(log) == ["poll", "commit"]
    assert source.committed == {(TOPIC, 0): 2}


def test_idle_worker_turns_not_ready_while_the_broker_is_unreachable_and_ready_when_it_answers(
        log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, _, _ = make_worker(log, {0: [b"n"]}, registry, broker_check_interval_s=0.0)
    worker.run_once()
    assert worker.health.is_ready() and registry.get_sample_value("anomaly_worker_ready") == 1
    source.broker_up = False
    del log[:]
    assert worker.run_once() is None
    assert log == [("poll", []), ("reachable", False)]
    assert worker.health.failing_readiness() == ["broker_ok"]
    assert registry.get_sample_value("anomaly_worker_ready") == 0
    assert registry.get_sample_value("anomaly_kafka_errors_total", {"operation": "poll"}) == 1
    source.broker_up = True
    worker.run_once()
    assert worker.health.is_ready() and registry.get_sample_value("anomaly_worker_ready") == 1


def test_idle_broker_check_is_rate_limited_and_skipped_while_offsets_are_pending(
        log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, _, _ = make_worker(log, {0: [b"n"]}, registry, broker_check_interval_s=3600.0)
    source.broker_up = False
    worker.run_once()
    worker.run_once()
    assert "reachable" not in kinds(log)  # within the interval: no extra round trips
    worker.broker_check_interval_s = 0.0
    source.data[(TOPIC, 0)].append(b"n")
    source.fail_commits = 1
    worker.run_once()  # the commit fails: offsets stay pending
    del log[:]
    worker.run_once()  # the retried commit is the round trip; no separate check
    assert kinds(log) == ["poll", "commit"]
    assert worker.broker.ok is True


def test_on_revoke_drops_pending_offsets_of_the_revoked_partitions_only_without_committing(
        log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, _, _ = make_worker(log, {0: [b"n"] * 2, 1: [b"n"] * 2, 2: [b"n"] * 2}, registry, max_batch=6)
    source.fail_commits = 1
    worker.run_once()
    assert worker.pending == {(TOPIC, 0): 2, (TOPIC, 1): 2, (TOPIC, 2): 2}
    del log[:]
    worker.on_revoke({(TOPIC, 1), (TOPIC, 2), ("other", 0)})
    # No commit from inside the rebalance callback: the next owner re-reads from the last commit.
    assert log == []
    assert worker.pending == {(TOPIC, 0): 2}
    worker.run_once()
    assert ("commit", {(TOPIC, 0): 2}) in log


def test_on_revoke_without_pending_offsets_commits_nothing(log: list[tuple], registry: CollectorRegistry) -> None:
    worker, _, _, _ = make_worker(log, {0: [b"n"]}, registry)
    worker.run_once()
    del log[:]
    worker.on_revoke({(TOPIC, 0)})
    assert log == []


def test_stop_event_ends_run_after_the_input_is_drained(log: list[tuple], registry: CollectorRegistry) -> None:
    values = [b"A", b"n", b"bad", b"n", b"A", b"n", b"n"]
    worker, source, sink, _ = make_worker(log, {0: values, 1: values[:3]}, registry, max_batch=3)
    source.on_empty = worker.stop
    runner = threading.Thread(target=worker.run, daemon=True)
    runner.start()
    runner.join(timeout=30)
    assert not runner.is_alive(), "run() did not return after stop was set"
    assert source.committed == {(TOPIC, 0): len(values), (TOPIC, 1): 3}
    assert len(sink.alerts) == 3 and len(sink.dead_letters) == 2
    # Every commit comes after the publish of the batch it commits.
    order = kinds(log)
    for i, kind in enumerate(order):
        if kind == "commit":
            assert order[i - 1] == "publish"


def test_stop_requested_during_a_batch_finishes_that_batch(log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, _, pipeline = make_worker(log, {0: [b"A", b"n", b"n", b"n", b"n"]}, registry, max_batch=2)
    pipeline.stop_after_process = worker.stop
    worker.run()  # returns: stop was set while the first batch was being processed
    assert kinds(log) == ["poll", "process", "publish", "commit"]
    assert source.committed == {(TOPIC, 0): 2}


def test_stop_interrupts_the_backoff_after_a_delivery_failure(log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, sink, _ = make_worker(log, {0: [b"A"]}, registry)
    worker.backoff = Backoff(worker.stop, initial_s=3600, maximum_s=3600)
    sink.fail_publishes = 1
    worker.stop.set()  # a stop already requested: the hour-long wait returns at once
    assert worker.run_once() is None
    assert kinds(log) == ["poll", "process", "publish-failed", "rewind"]
    assert source.committed == {}


def test_a_rebalance_defers_the_commit_without_marking_the_broker_down(
        log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, _, _ = make_worker(log, {0: [b"n", b"n"]}, registry)
    worker.broker.set(True)
    source.rebalancing = True
    worker.run_once()
    assert worker.pending == {(TOPIC, 0): 2}
    assert worker.broker.ok and registry.get_sample_value("anomaly_commit_failures_total") == 0
    source.rebalancing = False
    worker.run_once()
    assert worker.pending == {} and source.committed == {(TOPIC, 0): 2}


# -- exactly-once: a transactional sink commits the offsets itself ---------------------------------

class FakeTransactionalSink(FakeSink):
    """Records and offsets of a batch become visible together, or (aborted) not at all."""

    def __init__(self, log: list[tuple], source: FakeSource) -> None:
        super().__init__(log)
        self.source = source
        self.abort_next = 0

    def publish_and_commit(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter],
                           offsets: Mapping[tuple[str, int], int]) -> None:
        if self.abort_next:
            self.abort_next -= 1
            self.log.append(("transaction-aborted", dict(offsets)))
            raise TransactionAborted("send_offsets_to_transaction: ILLEGAL_GENERATION; transaction aborted")
        self.alerts.extend(alerts)
        self.dead_letters.extend(dead_letters)
        self.source.committed.update(offsets)
        self.log.append(("transaction", [a.alert_id for a in alerts], [d.record.offset for d in dead_letters],
                         dict(offsets)))


def make_transactional_worker(log: list[tuple], partitions: dict[int, list[bytes]], registry: CollectorRegistry,
                              max_batch: int = 3) -> tuple[Worker, FakeSource, FakeTransactionalSink]:
    worker, source, _sink, _ = make_worker(log, partitions, registry, max_batch=max_batch)
    sink = FakeTransactionalSink(log, source)
    worker.sink = sink
    return worker, source, sink


def test_exactly_once_publishes_records_and_offsets_in_one_transaction_and_never_commits_itself(
        log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, sink = make_transactional_worker(log, {0: [b"n", b"A1", b"bad"], 1: [b"A2"]}, registry,
                                                     max_batch=4)
    assert worker.run_once() is not None
    assert kinds(log) == ["poll", "process", "transaction"]  # no separate commit
    assert log[2] == ("transaction", [f"{MODEL}/{TOPIC}/0/1", f"{MODEL}/{TOPIC}/1/0"], [2],
                      {(TOPIC, 0): 3, (TOPIC, 1): 1})
    assert worker.pending == {}
    assert registry.get_sample_value("anomaly_transactions_total", {"result": "committed"}) == 1
    assert registry.get_sample_value("anomaly_transactions_total", {"result": "aborted"}) == 0
    assert registry.get_sample_value("anomaly_transaction_duration_seconds_count") == 1
    assert registry.get_sample_value("anomaly_commits_total") == 1
    stages = {stage: registry.get_sample_value("anomaly_batch_stage_seconds_count", {"stage": stage})
              for stage in ("poll", "process", "publish", "commit", "record")}
    assert stages == {"poll": 1, "process": 1, "publish": 1, "commit": 0, "record": 1}  # offsets in "publish"


def test_an_aborted_transaction_rewinds_and_the_batch_is_delivered_once_afterwards(
        log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, sink = make_transactional_worker(log, {0: [b"A0", b"n", b"A2", b"A3"]}, registry)
    sink.abort_next = 1
    assert worker.run_once() is None
    assert kinds(log) == ["poll", "process", "transaction-aborted", "rewind"]
    assert log[3] == ("rewind", {(TOPIC, 0): 0})
    assert source.committed == {} and sink.alerts == []
    assert worker.broker.ok is False
    assert registry.get_sample_value("anomaly_transactions_total", {"result": "aborted"}) == 1
    assert not registry.get_sample_value("anomaly_events_consumed_total", {"topic": TOPIC})  # counted once delivered
    del log[:]
    while worker.run_once() is not None:
        pass
    assert [a.alert_id for a in sink.alerts] == [f"{MODEL}/{TOPIC}/0/{i}" for i in (0, 2, 3)]  # each once
    assert source.committed == {(TOPIC, 0): 4}
    assert "commit" not in kinds(log)
    assert worker.broker.ok is True
    assert registry.get_sample_value("anomaly_transactions_total", {"result": "committed"}) == 2


def test_a_slow_batch_stage_or_idle_pass_is_logged_with_its_parts(
        log: list[tuple], registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # A loop that stops making progress must say where it waits: several bounded Kafka calls in a row
    # (an offset fetch of 30 s, then another) are otherwise invisible between two batches.
    worker, source, _, pipeline = make_worker(log, {0: [b"n", b"A1"]}, registry, broker_check_interval_s=0.0)
    clock = [1000.0]
    monkeypatch.setattr("worker.loop.time.perf_counter", lambda: clock[0])
    process = pipeline.process

    def slow_process(records: Sequence[Record]) -> BatchResult:
        clock[0] += 6.0
        return process(records)

    def slow_reachable() -> bool:
        clock[0] += 30.0
        return True

    monkeypatch.setattr(pipeline, "process", slow_process)
    monkeypatch.setattr(source, "reachable", slow_reachable)
    with caplog.at_level("WARNING", logger="worker.loop"):
        worker.run_once()
        assert "slow batch: poll 0.0 s, process 6.0 s, publish 0.0 s, commit 0.0 s" in caplog.text
        worker.run_once()  # nothing left: the idle pass asks the broker, which takes 30 s
        assert "slow idle pass: poll 0.0 s, checks 30.0 s" in caplog.text
    caplog.clear()
    fast, *_ = make_worker([], {0: [b"n", b"A1"]}, CollectorRegistry(), broker_check_interval_s=0.0)
    with caplog.at_level("WARNING", logger="worker.loop"):
        fast.run_once()
        fast.run_once()
    assert "slow" not in caplog.text


def test_field_drift_gauges_are_set_when_enough_rows_are_held_or_the_interval_passed_while_idle(
        log: list[tuple], registry: CollectorRegistry) -> None:
    from tests.kafka_broker import wait_for
    from tests.unit.test_drift import small_field_drift

    worker, source, _, pipeline = make_worker(log, {0: [b"n"] * 12}, registry, field_drift=lambda _bundle:
                                              small_field_drift(flush_rows=8, flush_interval_s=0.3))
    process = pipeline.process

    def with_columns(records: Sequence[Record]) -> BatchResult:
        ports = np.array(["80"] * len(records), dtype=object)
        return dataclasses.replace(process(records), columns={
            "bytes": np.array([r.offset * 0.25 for r in records]), "port": ports})
    pipeline.process = with_columns  # type: ignore[method-assign]

    def gauge() -> float | None:
        return registry.get_sample_value("anomaly_field_drift_psi", {"field": "bytes"})

    worker.run_once()
    assert gauge() is None, "4 of 8 rows held"
    worker.run_once()
    assert gauge() is not None and gauge() > 0, "8 rows: binned and published"
    first = gauge()
    worker.run_once()  # 4 more rows held, then nothing left to read
    assert gauge() == first
    wait_for(lambda: worker.run_once() is None and gauge() != first, 10, "an idle pass publishing the held rows")


# -- plugins: the side consumers meet the batch at fixed steps -------------------------------------

class RecordingPlugin(Plugin):
    """Logs each hook into the loop's log; keeps only the first alert, as flood control might."""

    def __init__(self, log: list[tuple]) -> None:
        self.log = log

    def between_batches(self) -> None:
        self.log.append(("between_batches",))

    def on_processed(self, records: Sequence[Record], result: BatchResult, alerts: list[Alert]) -> list[Alert]:
        self.log.append(("on_processed", len(alerts)))
        return alerts[:1]

    def on_idle(self) -> list[Alert]:
        self.log.append(("on_idle",))
        return []

    def on_delivered(self) -> None:
        self.log.append(("on_delivered",))

    def on_batch(self, result: BatchResult) -> None:
        self.log.append(("on_batch", result.consumed))


def test_plugins_are_called_at_their_steps_and_choose_what_is_published(
        log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, sink, _ = make_worker(log, {0: [b"A0", b"A1", b"n"]}, registry,
                                          plugins=[RecordingPlugin(log)])
    worker.run_once()
    assert kinds(log) == ["between_batches", "poll", "process", "on_processed", "publish", "commit",
                          "on_delivered", "on_batch"]
    assert [a.alert_id for a in sink.alerts] == [f"{MODEL}/{TOPIC}/0/0"]
    assert registry.get_sample_value("anomaly_alerts_published_total", {"topic": TOPIC}) == 1
    del log[:]
    worker.run_once()  # an empty poll: nothing to publish, so nothing is delivered
    assert kinds(log) == ["between_batches", "poll", "on_idle"]


def test_a_plugin_keeps_nothing_of_a_batch_that_was_not_delivered(
        log: list[tuple], registry: CollectorRegistry) -> None:
    worker, source, sink, _ = make_worker(log, {0: [b"A0"]}, registry, plugins=[RecordingPlugin(log)])
    sink.fail_publishes = 1
    assert worker.run_once() is None
    assert kinds(log) == ["between_batches", "poll", "process", "on_processed", "publish-failed", "rewind"]


def test_wiring_builds_the_plugins_the_settings_ask_for_in_the_loops_order(registry: CollectorRegistry) -> None:
    from worker.flood import FloodGate
    from worker.heap import HeapTrimmer
    from worker.wiring import plugins

    settings = SimpleNamespace(heap_trim_interval_s=60.0, alert_cooldown_s=0.0, max_alerts_per_s=0.0,
                               alert_key_field=None, input_topic=TOPIC)
    runtime = SimpleNamespace(settings=settings, watcher=None, shadow=None, metrics=WorkerMetrics(registry),
                              bundle=FakePipeline([]).bundle)
    assert [type(p) for p in plugins(runtime)] == [HeapTrimmer, DriftWatch]  # type: ignore[arg-type]
    settings.alert_cooldown_s = 30.0
    assert [type(p) for p in plugins(runtime)] == [HeapTrimmer, FloodGate, DriftWatch]  # type: ignore[arg-type]
