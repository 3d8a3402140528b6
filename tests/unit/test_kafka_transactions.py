"""The exactly-once sink without a broker: the order of transaction calls, and what each failure becomes.

On a real broker: tests/integration/test_exactly_once.py and the fault suite (tests/faults/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from tests.fakes import FakeClock
from training.errors import ConfigError
from worker.config import Settings, from_args
from worker.errors import TransactionAborted, WorkerError
from worker.kafka.confluent import ConfluentTransactionalSink
from worker.records import DeadLetter, Record

REQUIRED = ["--model", "m", "--bootstrap-servers", "k:9092", "--input-topic", "in", "--alert-topic", "al",
            "--dead-letter-topic", "dl", "--group-id", "g"]
GROUP_METADATA = object()


def settings(**overrides: Any) -> Settings:
    return Settings(model=Path("m"), bootstrap_servers="127.0.0.1:1", input_topic="in", alert_topic="al",
                    dead_letter_topic="dl", group_id="g", kafka_timeout_s=1.0,
                    **{"delivery": "exactly-once", **overrides})


class FakeTransactionalProducer:
    """Logs each call; `fail[call]` is a list of errors the next calls of that name raise, in order."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self.calls: list[str] = []
        self.fail: dict[str, list[KafkaError]] = {}
        self.offsets: list[tuple[list, Any]] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.fail.get(name):
            raise KafkaException(self.fail[name].pop(0))

    def list_topics(self, timeout: float) -> None:
        return None

    def init_transactions(self, timeout: float) -> None:
        self._call("init")

    def begin_transaction(self) -> None:
        self._call("begin")

    def produce(self, topic: str, value: bytes | None, key: bytes | None, headers: list) -> None:
        self._call(f"produce:{topic}")

    def send_offsets_to_transaction(self, offsets: list, metadata: Any, timeout: float) -> None:
        self._call("offsets")
        self.offsets.append(([(tp.topic, tp.partition, tp.offset) for tp in offsets], metadata))

    def commit_transaction(self, timeout: float) -> None:
        self._call("commit")

    def abort_transaction(self, timeout: float) -> None:
        self._call("abort")

    def flush(self, timeout: float) -> int:
        return 0


def sink_with(producer: list[FakeTransactionalProducer], clock: FakeClock | None = None,
              **overrides: Any) -> ConfluentTransactionalSink:
    def factory(conf: dict[str, Any]) -> FakeTransactionalProducer:
        producer.append(FakeTransactionalProducer(conf))
        return producer[-1]

    return ConfluentTransactionalSink(settings(**overrides), lambda: GROUP_METADATA, producer_factory=factory,
                                      clock=clock or FakeClock())


LETTER = DeadLetter(record=Record("in", 0, 7, None, b"x"), reason="invalid_json", error="not JSON")


def test_a_batch_is_one_transaction_holding_its_records_and_offsets_in_order() -> None:
    made: list[FakeTransactionalProducer] = []
    sink = sink_with(made, transactional_id="workers-0", transaction_timeout_s=45.0)
    producer = made[0]
    assert producer.conf["transactional.id"] == "workers-0"
    assert producer.conf["transaction.timeout.ms"] == 45_000
    assert producer.conf["enable.idempotence"] is True and producer.conf["acks"] == "all"
    assert producer.calls == ["init"]  # fences an earlier instance with the same id at start
    sink.publish_and_commit([], [LETTER], {("in", 0): 8, ("in", 2): 3})
    assert producer.calls[1:] == ["begin", "produce:dl", "offsets", "commit"]
    assert producer.offsets == [([("in", 0, 8), ("in", 2, 3)], GROUP_METADATA)]


def test_a_slow_transaction_is_logged_with_the_time_of_each_step(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A soak stall was a single transaction taking 70 s; the log must say whether the offsets or the
    # commit waited (a coordinator that has just restarted, leaders moving).
    clock = FakeClock(500.0)
    made: list[FakeTransactionalProducer] = []
    sink = sink_with(made, clock)
    producer = made[0]
    original = producer.commit_transaction

    def slow_commit(timeout: float) -> None:
        clock.advance(42.0)
        original(timeout)

    monkeypatch.setattr(producer, "commit_transaction", slow_commit)
    with caplog.at_level("WARNING", logger="worker.kafka.confluent"):
        sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    assert "slow transaction of 1 records: produce 0.0 s, send offsets 0.0 s, commit 42.0 s" in caplog.text
    caplog.clear()
    monkeypatch.setattr(producer, "commit_transaction", original)
    sink.publish_and_commit([], [LETTER], {("in", 0): 9})
    assert "slow transaction" not in caplog.text


def test_records_without_offsets_are_a_transaction_of_their_own() -> None:
    made: list[FakeTransactionalProducer] = []
    sink = sink_with(made)
    sink.publish([], [LETTER])
    assert made[0].calls[1:] == ["begin", "produce:dl", "commit"]


def test_a_stale_generation_aborts_the_transaction_fencing_the_zombie() -> None:
    made: list[FakeTransactionalProducer] = []
    sink = sink_with(made)
    made[0].fail["offsets"] = [KafkaError(KafkaError.ILLEGAL_GENERATION, "stale member", txn_requires_abort=True)]
    with pytest.raises(TransactionAborted, match="transaction aborted"):
        sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    assert made[0].calls[1:] == ["begin", "produce:dl", "offsets", "abort"]
    sink.publish_and_commit([], [LETTER], {("in", 0): 8})  # the producer is usable again
    assert made[0].calls[-1] == "commit"


def test_a_commit_that_failed_abortably_is_aborted() -> None:
    made: list[FakeTransactionalProducer] = []
    sink = sink_with(made)
    made[0].fail["commit"] = [KafkaError(KafkaError._MSG_TIMED_OUT, "delivery failed", txn_requires_abort=True)]
    with pytest.raises(TransactionAborted):
        sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    assert made[0].calls[-2:] == ["commit", "abort"]


def test_a_commit_whose_outcome_is_unknown_is_retried_not_aborted() -> None:
    made: list[FakeTransactionalProducer] = []
    sink = sink_with(made)
    made[0].fail["commit"] = [KafkaError(KafkaError._TIMED_OUT, "no answer", retriable=True)] * 2
    sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    assert made[0].calls[1:] == ["begin", "produce:dl", "offsets", "commit", "commit", "commit"]


def test_a_fatal_error_replaces_the_producer_and_the_batch_is_read_again() -> None:
    made: list[FakeTransactionalProducer] = []
    sink = sink_with(made, transactional_id="workers-0")
    # The coordinator aborted our transaction at its timeout while this worker was paused: fenced.
    made[0].fail["commit"] = [KafkaError(KafkaError._FENCED, "producer fenced", fatal=True)]
    with pytest.raises(TransactionAborted, match="producer was replaced"):
        sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    assert "abort" not in made[0].calls  # a fatal error leaves nothing to abort on the old producer
    assert len(made) == 2 and made[1].calls == ["init"], "a new producer with the same id aborts what was open"
    assert made[1].conf["transactional.id"] == "workers-0"
    sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    assert made[1].calls[-1] == "commit"


def test_a_fatal_abort_after_a_lost_coordinator_replaces_the_producer_too() -> None:
    made: list[FakeTransactionalProducer] = []
    sink = sink_with(made)
    made[0].fail["offsets"] = [KafkaError(KafkaError._TRANSPORT, "broker transport failure", txn_requires_abort=True)]
    made[0].fail["abort"] = [KafkaError(KafkaError.INVALID_TXN_STATE, "invalid state", fatal=True)]
    with pytest.raises(TransactionAborted, match="producer was replaced"):
        sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    assert len(made) == 2


def test_a_producer_fenced_again_and_again_stops_the_worker_with_what_to_fix() -> None:
    made: list[FakeTransactionalProducer] = []
    sink = sink_with(made, transactional_id="workers-0")
    for attempt in range(ConfluentTransactionalSink.MAX_FENCED):
        made[-1].fail["commit"] = [KafkaError(KafkaError._FENCED, "producer fenced", fatal=True)]
        if attempt < ConfluentTransactionalSink.MAX_FENCED - 1:
            with pytest.raises(TransactionAborted):
                sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    with pytest.raises(WorkerError, match="another worker probably runs with transactional id 'workers-0'"):
        sink.publish_and_commit([], [LETTER], {("in", 0): 8})


def test_while_no_producer_can_be_started_batches_are_aborted_not_lost() -> None:
    reachable = [True]
    broken: list[FakeTransactionalProducer] = []

    def factory(conf: dict[str, Any]) -> FakeTransactionalProducer:
        producer = FakeTransactionalProducer(conf)
        if not reachable[0]:
            producer.fail["init"] = [KafkaException(KafkaError(KafkaError._TIMED_OUT, "no coordinator")).args[0]]
            broken.append(producer)
        return producer

    sink = ConfluentTransactionalSink(settings(), lambda: GROUP_METADATA, producer_factory=factory)
    sink.producer.fail["commit"] = [KafkaError(KafkaError._FENCED, "producer fenced", fatal=True)]
    reachable[0] = False
    with pytest.raises(TransactionAborted, match="no transactional producer yet"):
        sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    assert sink.producer is None
    with pytest.raises(TransactionAborted, match="no transactional producer yet"):
        sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    reachable[0] = True
    sink.publish_and_commit([], [LETTER], {("in", 0): 8})
    assert sink.producer is not None and sink.producer.calls[-1] == "commit"
    sink.close()


def test_delivery_settings_flags_environment_and_validation() -> None:
    s = from_args(REQUIRED, environ={})
    assert (s.delivery, s.exactly_once, s.transaction_timeout_s) == ("at-least-once", False, 60.0)
    assert s.transactional_id_or_default.startswith("g-")  # group id + host name
    s = from_args([*REQUIRED, "--delivery", "exactly-once", "--transactional-id", "w-1"], environ={})
    assert (s.exactly_once, s.transactional_id_or_default) == (True, "w-1")
    s = from_args(REQUIRED, environ={"ANOMALY_DELIVERY": "exactly-once", "ANOMALY_TRANSACTIONAL_ID": "w-2",
                                     "ANOMALY_TRANSACTION_TIMEOUT_S": "30"})
    assert (s.exactly_once, s.transactional_id_or_default, s.transaction_timeout_s) == (True, "w-2", 30.0)
    with pytest.raises(ConfigError, match="needs --kafka-client confluent"):
        settings(kafka_client="kafka-python")
    with pytest.raises(ConfigError, match="--delivery must be one of"):
        settings(delivery="at-most-once")
    with pytest.raises(ConfigError, match="at most 900"):
        settings(transaction_timeout_s=3600.0)
