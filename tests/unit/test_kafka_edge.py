"""The Kafka edge without a broker: client settings, and holding a partition at an undecodable batch.

The same behaviour on a real broker is in tests/integration/test_kafka_contract.py and test_interop.py.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from kafka.errors import KafkaTimeoutError, UnsupportedCodecError
from kafka.structs import ConsumerGroupMetadata, MemberState, TopicPartition
from prometheus_client import CollectorRegistry

from tests.fakes import FakeClock
from training.errors import ConfigError
from worker.config import Settings, from_args
from worker.errors import CommitError, DeliveryError, RebalanceInProgress, WorkerError
from worker.health import BrokerStatus, Health
from worker.kafka.confluent import ConfluentSink, ConfluentSource
from worker.kafka.confluent.start_guard import COMMITTED_TIMEOUT_S, PARKED_ASK_S, PARKED_RETRY_S
from worker.kafka.core import Quarantine
from worker.kafka.kafka_python import KafkaSource
from worker.metrics import WorkerMetrics
from worker.records import DeadLetter, Record

REQUIRED = ["--model", "m", "--bootstrap-servers", "k:9092", "--input-topic", "in", "--alert-topic", "al",
            "--dead-letter-topic", "dl", "--group-id", "g"]


def settings(**overrides: Any) -> Settings:
    return Settings(model=Path("m"), bootstrap_servers="127.0.0.1:1", input_topic="in", alert_topic="al",
                    dead_letter_topic="dl", group_id="g", **{"max_wait_ms": 0, **overrides})


# -- settings ------------------------------------------------------------------------------------

def test_client_isolation_and_compression_defaults_flags_and_environment() -> None:
    s = from_args(REQUIRED, environ={})
    assert (s.kafka_client, s.isolation_level, s.output_compression, s.alert_headers) == (
        "confluent", "read_committed", "zstd", ())
    assert from_args([*REQUIRED, "--kafka-client", "kafka-python"], environ={}).output_compression == "none"
    s = from_args([*REQUIRED, "--kafka-client", "kafka-python", "--compression", "zstd", "--alert-headers",
                   "trace-id, tenant"], environ={"ANOMALY_ISOLATION_LEVEL": "READ_UNCOMMITTED"})
    assert (s.kafka_client, s.isolation_level, s.compression, s.alert_headers) == (
        "kafka-python", "read_uncommitted", "zstd", ("trace-id", "tenant"))
    with pytest.raises(ConfigError, match="--kafka-client must be one of"):
        from_args(REQUIRED, environ={"ANOMALY_KAFKA_CLIENT": "java"})
    with pytest.raises(ConfigError, match="compression must be one of"):
        settings(compression="brotli")


def test_sasl_and_tls_map_onto_both_clients() -> None:
    s = from_args([*REQUIRED, "--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-256",
                   "--sasl-username", "svc", "--ssl-cafile", "/ca.pem", "--ssl-certfile", "/c.pem",
                   "--ssl-keyfile", "/k.pem"], environ={"ANOMALY_SASL_PASSWORD": "pw"})
    python_opts = s.security.client_options()
    assert (python_opts["security_protocol"], python_opts["sasl_mechanism"], python_opts["sasl_plain_username"],
            python_opts["sasl_plain_password"], python_opts["ssl_cafile"]) == (
        "SASL_SSL", "SCRAM-SHA-256", "svc", "pw", "/ca.pem")
    assert s.security.librdkafka_config() == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-256", "sasl.username": "svc",
        "sasl.password": "pw", "ssl.ca.location": "/ca.pem", "ssl.certificate.location": "/c.pem",
        "ssl.key.location": "/k.pem", "ssl.endpoint.identification.algorithm": "https"}
    assert settings().security.librdkafka_config() == {"security.protocol": "PLAINTEXT"}


# -- the quarantine ------------------------------------------------------------------------------

def test_a_held_partition_is_counted_and_fails_readiness_until_released() -> None:
    from worker.wiring import readiness

    registry = CollectorRegistry()
    metrics, health, broker = WorkerMetrics(registry), Health(), BrokerStatus(ok=True)
    quarantine = Quarantine(metrics)
    source = SimpleNamespace(assigned=lambda: {("in", 0), ("in", 1), ("in", 2)})
    readiness(health, broker, metrics, source, quarantine)  # type: ignore[arg-type]  # wired as build_worker does
    quarantine.hold("in", 2, 40, "codec missing")
    assert quarantine.limit("in", 2) == 40 and quarantine.limit("in", 1) is None
    assert health.failing_readiness() == ["batches_decodable"]
    assert registry.get_sample_value("anomaly_undecodable_batches_total", {"topic": "in", "partition": "2"}) == 1
    assert registry.get_sample_value("anomaly_undecodable_partitions") == 1
    assert registry.get_sample_value("anomaly_worker_ready") == 0
    quarantine.release({("in", 2)})
    assert health.is_ready() and registry.get_sample_value("anomaly_undecodable_partitions") == 0
    assert registry.get_sample_value("anomaly_worker_ready") == 1


class FakePythonConsumer:
    """KafkaConsumer whose next batch of partition 1 cannot be decoded, as kafka-python 3.0.12 reports it."""

    #: kafka-python's own fetcher state, where `KafkaSource` finds the batch it could not decode.
    _fetcher = type("Fetcher", (), {"_next_partition_records": type(
        "PartitionRecords", (), {"topic_partition": TopicPartition("in", 1), "next_fetch_offset": 17})})()

    def __init__(self, **_: Any) -> None:
        self.held: list[TopicPartition] = []

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1}

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.listener = listener

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        if not self.held:
            raise UnsupportedCodecError("Libraries for zstd compression codec not found")
        return {}

    def pause(self, *partitions: TopicPartition) -> None:
        self.held.extend(partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self.held)

    def resume(self, *partitions: TopicPartition) -> None:
        self.held = [tp for tp in self.held if tp not in partitions]

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("in", 0), TopicPartition("in", 1)}

    def group_metadata(self) -> ConsumerGroupMetadata:
        return ConsumerGroupMetadata(group_id="g", state=MemberState.STABLE)


def test_kafka_python_pauses_the_partition_it_cannot_decode_instead_of_raising() -> None:
    quarantine = Quarantine()
    source = KafkaSource(settings(kafka_client="kafka-python"), consumer_factory=FakePythonConsumer,
                         quarantine=quarantine)
    assert source.assigned() == set(), "no poll yet: nothing assigned"
    assert source.poll_batch() == []
    assert source.consumer.held == [TopicPartition("in", 1)]
    assert quarantine.held == {("in", 1): 17}
    assert source.assigned() == {("in", 0), ("in", 1)}  # as the poll left it, readable from any thread
    source.handle_revoked({("in", 1)})
    assert quarantine.held == {}


def test_kafka_python_resumes_a_partition_a_rebalance_gives_back_still_paused_so_it_is_held_again() -> None:
    # kafka-python 3.0.12 keeps the pause through the rebalance, while the revocation released the hold: left
    # so, the partition was never fetched again and nothing reported it (the interop test, 2 of 9 runs).
    quarantine = Quarantine()
    source = KafkaSource(settings(kafka_client="kafka-python"), consumer_factory=FakePythonConsumer,
                         quarantine=quarantine)
    source.poll_batch()
    listener = source.consumer.listener
    listener.on_partitions_revoked([TopicPartition("in", 0), TopicPartition("in", 1)])
    listener.on_partitions_assigned([TopicPartition("in", 0), TopicPartition("in", 1)])
    assert source.consumer.held == [], "resumed: nothing holds it now"
    source.poll_batch()
    assert quarantine.held == {("in", 1): 17}, "its batch still cannot be decoded: held again"
    listener.on_partitions_assigned([TopicPartition("in", 0), TopicPartition("in", 1)])
    assert source.consumer.held == [TopicPartition("in", 1)], "a partition still held stays paused"


class FakeMessage:
    def __init__(self, partition: int, offset: int | None, error: KafkaError | None = None) -> None:
        self.part, self.at, self.err = partition, offset, error

    def error(self) -> KafkaError | None:
        return self.err

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return self.part

    def offset(self) -> int | None:
        return self.at

    def key(self) -> bytes | None:
        return None

    def value(self) -> bytes:
        return b"{}"

    def timestamp(self) -> tuple[int, int]:
        return (2, 1_700_000_000_000)  # LogAppendTime

    def headers(self) -> list | None:
        return None


class FakeConfluentConsumer:
    def __init__(self, messages: list[FakeMessage], commit_error: KafkaError | None = None) -> None:
        self.messages, self.commit_error = messages, commit_error
        self.paused: list = []
        self.conf: dict[str, Any] = {}

    def made(self, conf: dict[str, Any]) -> FakeConfluentConsumer:
        """The source's consumer factory: keeps the configuration, callbacks included."""
        self.conf = conf
        return self

    def stats(self, text: str) -> None:
        """librdkafka serving its statistics inside a poll."""
        self.conf["stats_cb"](text)

    def list_topics(self, timeout: float) -> None:
        return None

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        """Assigns partitions 0 and 1 through the callback (librdkafka would, inside a later poll)."""
        from confluent_kafka import TopicPartition as TP

        self.callbacks = callbacks
        callbacks["on_assign"](self, [TP("in", 0), TP("in", 1)])

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        out, self.messages = self.messages, []
        return out

    def pause(self, partitions: list) -> None:
        self.paused.extend((tp.topic, tp.partition) for tp in partitions)

    def resume(self, partitions: list) -> None:
        for tp in partitions:
            self.paused.remove((tp.topic, tp.partition))

    def get_watermark_offsets(self, tp: Any, cached: bool) -> tuple[int, int]:
        return 0, 10

    def commit(self, offsets: list, asynchronous: bool) -> list:
        if self.commit_error is not None:
            raise KafkaException(self.commit_error)
        return offsets


class AskedConsumer(FakeConfluentConsumer):
    """Answers `committed` (the coordinator's offset fetch) unless `down`; records what it was asked."""

    def __init__(self) -> None:
        super().__init__([])
        self.down, self.asked = False, []  # type: ignore[var-annotated]

    def committed(self, partitions: list, timeout: float) -> list:
        self.asked.append(([(tp.topic, tp.partition) for tp in partitions], timeout))
        if self.down:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return partitions


class AskedPythonConsumer(FakePythonConsumer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.down, self.asked = False, []  # type: ignore[var-annotated]

    def committed(self, partition: TopicPartition, timeout_ms: int) -> int:
        self.asked.append((partition, timeout_ms))
        if self.down:
            raise KafkaTimeoutError("no coordinator")
        return 0


def test_both_clients_ask_the_coordinator_for_an_offset_to_tell_whether_it_is_reachable() -> None:
    confluent = AskedConsumer()
    source = ConfluentSource(settings(kafka_timeout_s=3.0), consumer_factory=confluent.made)
    assert source.reachable()
    confluent.down = True
    assert not source.reachable()
    assert confluent.asked == [([("in", 0)], 3.0)] * 2, "the lowest assigned partition, within the Kafka timeout"
    python = KafkaSource(settings(kafka_client="kafka-python", kafka_timeout_s=3.0),
                         consumer_factory=AskedPythonConsumer)
    assert python.reachable()
    python.consumer.down = True
    assert not python.reachable()
    assert python.consumer.asked == [(TopicPartition("in", 0), 3000)] * 2


def test_confluent_holds_a_partition_at_an_undecodable_batch_and_hands_out_nothing_past_it() -> None:
    bad = KafkaError(KafkaError._BAD_COMPRESSION, "Decompression (codec 0x4) of message at 5 failed")
    messages = [FakeMessage(0, 0), FakeMessage(1, 3), FakeMessage(1, 4), FakeMessage(1, 5, bad),
                FakeMessage(1, 9), FakeMessage(0, 1)]
    quarantine = Quarantine()
    consumer = FakeConfluentConsumer(messages)
    source = ConfluentSource(settings(), quarantine=quarantine, consumer_factory=lambda conf: consumer)
    records = source.poll_batch()
    assert [(r.partition, r.offset) for r in records] == [(0, 0), (1, 3), (1, 4), (0, 1)]
    assert records[0].timestamp_type == 1 and records[0].timestamp_ms == 1_700_000_000_000
    assert consumer.paused == [("in", 1)] and quarantine.held == {("in", 1): 5}


def test_confluent_resumes_a_partition_a_rebalance_gives_back_still_paused_so_it_is_held_again() -> None:
    # librdkafka 2.16 keeps an application pause through a cooperative rebalance that takes the partition
    # away and gives it back (checked on a broker), while the revocation released the hold: left so, the
    # partition would never be fetched again and nothing would report it.
    from confluent_kafka import TopicPartition as TP

    bad = KafkaError(KafkaError._BAD_COMPRESSION, "Decompression (codec 0x4) of message at 5 failed")
    quarantine = Quarantine()
    consumer = FakeConfluentConsumer([FakeMessage(1, 5, bad)])
    source = ConfluentSource(settings(), quarantine=quarantine, consumer_factory=lambda conf: consumer)
    source.poll_batch()
    assert consumer.paused == [("in", 1)] and quarantine.held == {("in", 1): 5}
    callbacks = consumer.callbacks
    callbacks["on_revoke"](consumer, [TP("in", 1)])
    callbacks["on_assign"](consumer, [TP("in", 1)])
    assert consumer.paused == [], "resumed: nothing holds it now"
    consumer.messages = [FakeMessage(1, 5, bad)]
    source.poll_batch()
    assert quarantine.held == {("in", 1): 5}, "its batch still cannot be decoded: held again"
    callbacks["on_assign"](consumer, [TP("in", 0), TP("in", 1)])
    assert consumer.paused == [("in", 1)], "a partition still held stays paused"


def test_confluent_commit_during_a_rebalance_waits() -> None:
    consumer = FakeConfluentConsumer([], commit_error=KafkaError(KafkaError.REBALANCE_IN_PROGRESS))
    source = ConfluentSource(settings(), consumer_factory=lambda conf: consumer)
    with pytest.raises(RebalanceInProgress):
        source.commit({("in", 0): 5})


class CommitRecordingConsumer(FakeConfluentConsumer):
    """Records each commit; the results of asynchronous ones are served (as librdkafka does) in consume."""

    def __init__(self) -> None:
        super().__init__([])
        self.commits: list[tuple[dict[tuple[str, int], int], bool]] = []
        self.results: list[tuple[KafkaError | None, list]] = []

    def commit(self, offsets: list, asynchronous: bool) -> list:
        self.commits.append(({(tp.topic, tp.partition): tp.offset for tp in offsets}, asynchronous))
        return offsets

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        while self.results:
            error, partitions = self.results.pop(0)
            self.conf["on_commit"](error, partitions)
        return super().consume(num_messages, timeout)

    def answer(self, error: KafkaError | None, offsets: dict[int, int], partition_error: KafkaError | None = None,
               ) -> None:
        from types import SimpleNamespace

        # librdkafka's TopicPartition, whose `error` a test cannot set.
        self.results.append((error, [SimpleNamespace(topic="in", partition=p, offset=o, error=partition_error)
                                     for p, o in offsets.items()]))

    def close(self) -> None:
        pass


def async_source() -> tuple[ConfluentSource, CommitRecordingConsumer]:
    consumer = CommitRecordingConsumer()

    def factory(conf: dict[str, Any]) -> CommitRecordingConsumer:
        consumer.conf = conf
        return consumer
    return ConfluentSource(settings(), consumer_factory=factory), consumer


def test_confluent_commits_asynchronously_and_reports_a_failure_at_the_next_commit_sending_it_again() -> None:
    source, consumer = async_source()
    source.commit({("in", 0): 5, ("in", 1): 3, ("not-ours", 0): 1})
    assert consumer.commits == [({("in", 0): 5, ("in", 1): 3}, True)]
    consumer.answer(None, {0: 5}, partition_error=KafkaError(KafkaError.REQUEST_TIMED_OUT))
    consumer.answer(None, {1: 3})
    source.poll_batch()  # serves both results; the failed one is sent again at once
    assert consumer.commits[-1] == ({("in", 0): 5}, True)
    with pytest.raises(CommitError, match="earlier offset commit failed"):
        source.commit({("in", 1): 8})
    assert consumer.commits[-1] == ({("in", 1): 8}, True)
    source.commit({("in", 1): 9})  # reported once
    consumer.answer(None, {0: 5})
    consumer.answer(None, {1: 9})
    source.poll_batch()
    source.close()
    assert all(asynchronous for _, asynchronous in consumer.commits), "all confirmed: no final commit"


def test_confluent_sends_everything_unconfirmed_again_after_a_failure_without_partitions() -> None:
    source, consumer = async_source()
    source.commit({("in", 0): 5, ("in", 1): 3})
    consumer.results.append((KafkaError(KafkaError._TRANSPORT), []))
    source.poll_batch()
    assert consumer.commits == [({("in", 0): 5, ("in", 1): 3}, True)] * 2, "sent again"
    with pytest.raises(CommitError, match="earlier offset commit failed"):
        source.commit({})


def test_confluent_ignores_the_failure_of_a_commit_a_later_one_supersedes() -> None:
    source, consumer = async_source()
    source.commit({("in", 0): 5})
    source.commit({("in", 0): 9})
    consumer.answer(KafkaError(KafkaError.REBALANCE_IN_PROGRESS), {0: 5})
    consumer.answer(None, {0: 9})
    source.poll_batch()
    source.commit({("in", 1): 2})  # no CommitError: offset 9 of partition 0 is committed
    assert [c for c, _ in consumer.commits] == [{("in", 0): 5}, {("in", 0): 9}, {("in", 1): 2}]


def test_confluent_close_commits_what_is_unconfirmed_synchronously_but_not_revoked_partitions() -> None:
    source, consumer = async_source()
    source.commit({("in", 0): 5, ("in", 1): 7})
    consumer.answer(None, {0: 5})
    source.poll_batch()
    source.commit({("in", 0): 6})
    source.handle_revoked({("in", 0)})  # its next owner decides where partition 0 resumes
    source.close()
    assert consumer.commits[-1] == ({("in", 1): 7}, False)


def test_confluent_confirms_in_flight_commits_of_revoked_partitions_but_not_of_lost_ones() -> None:
    from confluent_kafka import TopicPartition as TP

    source, consumer = async_source()
    source.commit({("in", 0): 5, ("in", 1): 7})
    consumer.callbacks["on_revoke"](consumer, [TP("in", 0)])
    assert consumer.commits[-1] == ({("in", 0): 5}, False), "partition 0's next owner starts at 5"
    assert source.assigned() == {("in", 1)}
    consumer.callbacks["on_lost"](consumer, [TP("in", 1)])
    assert len(consumer.commits) == 2, "a lost partition may have another owner already: nothing committed"
    assert source.assigned() == set()


def test_confluent_close_after_every_commit_is_confirmed_commits_nothing_more() -> None:
    source, consumer = async_source()
    source.commit({("in", 0): 5})
    consumer.answer(None, {0: 5})
    source.poll_batch()
    source.close()
    assert consumer.commits == [({("in", 0): 5}, True)]


class FakeProducer:
    """Acknowledges every record except those to `refuse`, whose delivery report carries an error."""

    def __init__(self, refuse: str) -> None:
        self.refuse = refuse
        self.reports: list = []

    def list_topics(self, timeout: float) -> None:
        return None

    def produce(self, topic: str, value: bytes | None, key: bytes | None, headers: list, on_delivery: Any) -> None:
        error = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if topic == self.refuse else None
        self.reports.append((on_delivery, error))

    def flush(self, timeout: float) -> int:
        for report, error in self.reports:
            report(error, None)
        self.reports = []
        return 0


def test_confluent_a_failed_delivery_report_raises_delivery_error() -> None:
    sink = ConfluentSink(settings(), producer_factory=lambda conf: FakeProducer(refuse="dl"))
    letter = DeadLetter(record=Record("in", 0, 1, None, b"x"), reason="oversized", error="big")
    sink.publish([], [])
    with pytest.raises(DeliveryError, match="1 of 1 records were not acknowledged"):
        sink.publish([], [letter])


class TimedConsumer(FakeConfluentConsumer):
    """Logs each consume call's timeout; the first call finds `queued` messages waiting."""

    def __init__(self, queued: int) -> None:
        super().__init__([FakeMessage(0, i) for i in range(queued)])
        self.calls: list[tuple[int, float]] = []

    def consume(self, num_messages: int, timeout: float) -> list[FakeMessage]:
        self.calls.append((num_messages, timeout))
        out, self.messages = self.messages[:num_messages], self.messages[num_messages:]
        return out


def test_confluent_records_queued_during_processing_wait_only_the_rest_of_the_window() -> None:
    consumer, clock = TimedConsumer(queued=3), FakeClock()
    source = ConfluentSource(settings(max_wait_ms=200, max_batch=10), consumer_factory=consumer.made, clock=clock)
    clock.advance(0.15)  # the previous batch took 150 ms to process
    assert len(source.poll_batch()) == 3
    (first, wait_now), (rest, wait_more) = consumer.calls
    assert (first, wait_now, rest) == (10, 0, 7)
    assert 0 < wait_more <= 0.05 + 1e-3, "only what remains of the 200 ms window since the last poll returned"


def test_confluent_waits_a_whole_window_when_nothing_is_queued_and_not_at_all_for_a_full_batch() -> None:
    consumer, clock = TimedConsumer(queued=0), FakeClock()
    source = ConfluentSource(settings(max_wait_ms=200, max_batch=4), consumer_factory=consumer.made, clock=clock)
    clock.advance(10.0)
    source.poll_batch()
    assert consumer.calls == [(4, 0), (4, 0.2)]
    consumer.calls.clear()
    consumer.messages = [FakeMessage(0, i) for i in range(4)]
    assert len(source.poll_batch()) == 4
    assert consumer.calls == [(4, 0)]


class StalledConsumer(FakeConfluentConsumer):
    """Partition 0 has been fetched (a high-water mark is known); partition 1 never was (librdkafka #5586)."""

    def __init__(self) -> None:
        super().__init__([])
        self.high = {0: 42, 1: -1001}
        self.calls: list[tuple[str, list[int]]] = []
        self.refuse_assign = False

    def get_watermark_offsets(self, tp: Any, cached: bool) -> tuple[int, int]:
        assert cached, "the check must not cost a broker round trip"
        return 0, self.high[tp.partition]

    def incremental_unassign(self, partitions: list) -> None:
        self.calls.append(("unassign", [tp.partition for tp in partitions]))

    def incremental_assign(self, partitions: list) -> None:
        if self.refuse_assign:
            raise KafkaException(KafkaError(KafkaError._STATE))
        assert all(tp.offset < 0 for tp in partitions), "no offset: librdkafka fetches the committed one"
        self.calls.append(("assign", [tp.partition for tp in partitions]))


#: How often the source looks for partitions that do not fetch, with the Kafka timeout of `stalled_source`.
FETCH_CHECK_S = 5.0


def stalled_source(consumer: StalledConsumer, assigned_ago_s: float) -> tuple[ConfluentSource, FakeClock]:
    """A source whose partitions 0 and 1 were assigned `assigned_ago_s` ago (its Kafka timeout: 10 s)."""
    clock = FakeClock()
    source = ConfluentSource(settings(kafka_timeout_s=10.0), consumer_factory=consumer.made, clock=clock)
    clock.advance(assigned_ago_s)
    return source, clock


def test_confluent_re_adds_a_partition_assigned_a_kafka_timeout_ago_that_never_started_fetching() -> None:
    consumer = StalledConsumer()
    source, clock = stalled_source(consumer, assigned_ago_s=11.0)
    source.poll_batch()
    assert consumer.calls == [("unassign", [1]), ("assign", [1])], "only the partition never fetched"
    clock.advance(FETCH_CHECK_S)
    source.poll_batch()
    assert len(consumer.calls) == 2, "a re-added partition gets another Kafka timeout before the next try"


def test_confluent_leaves_young_fetched_and_held_partitions_alone() -> None:
    consumer = StalledConsumer()
    source, _ = stalled_source(consumer, assigned_ago_s=5.0)
    source.poll_batch()
    assert consumer.calls == [], "assigned less than a Kafka timeout ago: the answer may still come"
    source, _ = stalled_source(consumer, assigned_ago_s=11.0)
    source.quarantine.hold("in", 1, 7, "corrupt")
    source.poll_batch()
    assert consumer.calls == [], "a partition held at an undecodable batch is paused on purpose"
    source, _ = stalled_source(consumer, assigned_ago_s=11.0)
    source.handle_revoked({("in", 1)})
    source.poll_batch()
    assert consumer.calls == [], "a revoked partition is not ours to re-add"
    assert source.assigned() == {("in", 0)}, "the assignment follows the rebalance callbacks"


def librdkafka_stats(states: dict[int, str], topic: str = "in") -> str:
    """librdkafka's statistics JSON, cut to what the source reads (STATISTICS.md: topics.partitions)."""
    partitions = {str(p): {"partition": p, "fetch_state": state, "hi_offset": 42} for p, state in states.items()}
    partitions["-1"] = {"partition": -1, "fetch_state": "none", "hi_offset": -1001}  # the internal UA partition
    return json.dumps({"name": "anomaly-worker#consumer-1", "type": "consumer",
                       "topics": {topic: {"topic": topic, "partitions": partitions}}})


def test_confluent_re_adds_a_partition_given_back_that_waits_though_its_old_high_water_mark_is_cached() -> None:
    # After a rebalance returns partitions a worker had, librdkafka keeps their high-water marks: only the
    # fetch state ("stopped" while the committed offset is awaited) shows that partition 0 does not fetch.
    consumer = StalledConsumer()
    consumer.high[1] = 42
    source, _ = stalled_source(consumer, assigned_ago_s=11.0)
    consumer.stats(librdkafka_stats({0: "stopped", 1: "active"}))
    source.poll_batch()
    assert consumer.calls == [("unassign", [0]), ("assign", [0])]


def test_confluent_ignores_fetch_states_reported_before_the_assignment_or_unreadable() -> None:
    from confluent_kafka import TopicPartition as TP

    consumer = StalledConsumer()
    consumer.high[1] = 42
    source, clock = stalled_source(consumer, assigned_ago_s=0.0)
    consumer.stats(librdkafka_stats({0: "stopped", 1: "stopped"}))  # the state of the partitions' previous life
    clock.advance(1.0)
    consumer.callbacks["on_assign"](consumer, [TP("in", 0), TP("in", 1)])  # a rebalance gives them back
    clock.advance(11.0)
    source.poll_batch()
    assert consumer.calls == []
    consumer.stats(librdkafka_stats({0: "stopped"}, topic="another-topic"))
    consumer.stats("not json")
    clock.advance(FETCH_CHECK_S)
    source.poll_batch()
    assert consumer.calls == [], "statistics without the input topic change nothing"


def test_confluent_stops_when_a_partition_taken_out_cannot_be_re_added() -> None:
    consumer = StalledConsumer()
    consumer.refuse_assign = True
    source, _ = stalled_source(consumer, assigned_ago_s=11.0)
    with pytest.raises(WorkerError, match=r"cannot re-add partitions \['in\[1\]'\]"):
        source.poll_batch()


def test_confluent_prefetches_a_few_batches_not_librdkafkas_default_backlog() -> None:
    seen: list[dict[str, Any]] = []

    def factory(conf: dict[str, Any]) -> FakeConfluentConsumer:
        seen.append(conf)
        return FakeConfluentConsumer([])

    ConfluentSource(settings(max_batch=500), consumer_factory=factory)
    ConfluentSource(settings(max_event_bytes=40 * 1024 * 1024), consumer_factory=factory)
    small, big = seen
    assert small["queued.min.messages"] == 1000 and small["queued.max.messages.kbytes"] == 32 * 1024
    assert small["fetch.queue.backoff.ms"] <= 50, "a full buffer must not stall the loop (librdkafka: 1,000 ms)"
    assert big["max.partition.fetch.bytes"] == 80 * 1024 * 1024 <= big["fetch.max.bytes"], \
        "one fetch must still fit the largest event allowed"
    assert big["queued.max.messages.kbytes"] * 1024 == big["fetch.max.bytes"]


# -- where a partition starts: the source's policy, not librdkafka's auto.offset.reset -------------------------

NO_POSITION = KafkaError(KafkaError._AUTO_OFFSET_RESET, "no previously committed offset available")
OUT_OF_RANGE = KafkaError(KafkaError._AUTO_OFFSET_RESET, "fetch failed: Broker: Offset out of range")


class ResettingConsumer(FakeConfluentConsumer):
    """librdkafka reporting partitions it found no position for; records how the source restarts them.

    `committed` answers from `offsets` (an offset, or a KafkaError for the partition; absent: nothing
    committed), or raises `down` (librdkafka's timeout while it retries an unstable answer, no coordinator).
    """

    def __init__(self, messages: list[FakeMessage], offsets: dict[int, int | KafkaError]) -> None:
        super().__init__(messages)
        self.offsets = offsets
        self.down: KafkaError | None = None
        self.calls: list[tuple[str, list[tuple[int, int]]]] = []
        self.asked: list[tuple[list[int], float]] = []

    def committed(self, partitions: list, timeout: float) -> list[SimpleNamespace]:
        """Like `Consumer.committed`: the partitions with their offsets, a partition's error on it."""
        self.asked.append(([tp.partition for tp in partitions], timeout))
        if self.down is not None:
            raise KafkaException(self.down)
        answer = []
        for tp in partitions:
            value = self.offsets.get(tp.partition, -1001)
            error = value if isinstance(value, KafkaError) else None
            answer.append(SimpleNamespace(topic=tp.topic, partition=tp.partition,
                                          offset=-1001 if error else value, error=error, metadata=None))
        return answer

    def incremental_unassign(self, partitions: list) -> None:
        self.calls.append(("unassign", [(tp.partition, tp.offset) for tp in partitions]))

    def incremental_assign(self, partitions: list) -> None:
        self.calls.append(("assign", [(tp.partition, tp.offset) for tp in partitions]))

    def get_watermark_offsets(self, tp: Any, cached: bool = False, timeout: float | None = None) -> tuple[int, int]:
        return 120, 200


def resetting_source(messages: list[FakeMessage], offsets: dict[int, int | KafkaError], clock: FakeClock | None = None,
                     **overrides: Any) -> tuple[ConfluentSource, ResettingConsumer]:
    consumer = ResettingConsumer(messages, offsets)
    source = ConfluentSource(settings(**overrides), consumer_factory=consumer.made, clock=clock or FakeClock())
    return source, consumer


def test_confluent_leaves_no_partition_to_librdkafkas_reset() -> None:
    seen: list[dict[str, Any]] = []
    ConfluentSource(settings(), consumer_factory=lambda conf: seen.append(conf) or FakeConfluentConsumer([]))
    assert seen[0]["auto.offset.reset"] == "error", "librdkafka would also reset a partition whose offset it lost"


def test_confluent_starts_a_partition_without_position_at_its_committed_offset_or_else_the_earliest() -> None:
    # librdkafka 2.16 reports partition 0 without a position although 7 is committed (the assignment changed
    # while an open transaction held it); partition 1 of a new group has nothing committed.
    seen: list[dict[str, Any]] = []
    consumer = ResettingConsumer([FakeMessage(0, None, NO_POSITION), FakeMessage(1, None, NO_POSITION)], {0: 7})
    source = ConfluentSource(settings(), consumer_factory=lambda conf: seen.append(conf) or consumer)
    assert source.poll_batch() == []
    assert consumer.asked == [([0, 1], COMMITTED_TIMEOUT_S)], "one question, to the consumer's own coordinator"
    assert seen[0]["isolation.level"] == "read_committed", "so librdkafka asks for stable offsets"
    assert consumer.calls == [("unassign", [(0, -1001), (1, -1001)]), ("assign", [(0, 7), (1, -2)])], \
        "partition 0 at its committed offset, partition 1 at the beginning"


def test_confluent_asks_no_admin_client_for_committed_offsets(monkeypatch: pytest.MonkeyPatch) -> None:
    # The admin API's ListConsumerGroupOffsets can crash the process (SIGSEGV) when the coordinator moves
    # (librdkafka #5040); tests/faults/test_committed_offsets.py shows the consumer's way survives it.
    import confluent_kafka.admin

    from worker.kafka.confluent import start_guard

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the source must not create an admin client")

    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", refuse)
    monkeypatch.setattr(confluent_kafka, "AdminClient", refuse, raising=False)
    monkeypatch.setattr(start_guard, "AdminClient", refuse, raising=False)
    source, consumer = resetting_source([FakeMessage(0, None, NO_POSITION)], {0: 7})
    source.poll_batch()
    assert consumer.calls == [("unassign", [(0, -1001)]), ("assign", [(0, 7)])]


@pytest.mark.parametrize("held", [KafkaError(KafkaError.UNSTABLE_OFFSET_COMMIT), None],
                         ids=["answered-unstable", "timed-out-retrying-unstable"])
def test_confluent_keeps_a_partition_whose_committed_offset_a_transaction_holds_stopped_until_it_is_known(
        held: KafkaError | None, caplog: pytest.LogCaptureFixture) -> None:
    # librdkafka (read_committed) retries an "unstable" answer until the call's timeout, then raises
    # _TIMED_OUT; an exhausted retry leaves the error on the partition. Neither means "nothing committed".
    # A Kafka timeout shorter than PARKED_RETRY_S, so the look for partitions that do not fetch comes first.
    clock, timeout_s = FakeClock(), PARKED_RETRY_S * 0.8
    source, consumer = resetting_source([FakeMessage(0, None, NO_POSITION)], {} if held is None else {0: held},
                                        clock, kafka_timeout_s=timeout_s)
    if held is None:
        consumer.down = KafkaError(KafkaError._TIMED_OUT, "Local: Timed out")
    clock.advance(60.0)
    source.poll_batch()
    assert consumer.calls == [], "not started: its offset is unknown"
    assert "not known yet" in caplog.text
    consumer.stats(librdkafka_stats({0: "none", 1: "active"}))  # long assigned and not fetching
    clock.advance(timeout_s)  # the next look for partitions that do not fetch
    source.poll_batch()
    assert consumer.calls == [], "not re-added either: a re-add while librdkafka asks starts the reset over"
    assert len(consumer.asked) == 1, "asked again only after PARKED_RETRY_S"
    clock.advance(PARKED_RETRY_S)  # due
    source.poll_batch()
    assert consumer.calls == [] and ("in", 0) in source.start_guard.parked(), "still held: still waiting"
    assert consumer.asked[1] == ([0], PARKED_ASK_S), "a parked partition's question holds the loop less long"
    clock.advance(PARKED_RETRY_S)
    consumer.down, consumer.offsets[0] = None, 7  # the transaction committed
    source.poll_batch()
    assert consumer.calls == [("unassign", [(0, -1001)]), ("assign", [(0, 7)])]
    assert source.start_guard.parked() == set()


def test_confluent_reads_a_partition_from_the_earliest_when_its_offset_is_out_of_range_and_says_what_was_lost(
        caplog: pytest.LogCaptureFixture) -> None:
    source, consumer = resetting_source([FakeMessage(1, 100, OUT_OF_RANGE)], {})
    source.poll_batch()
    assert consumer.asked == [], "an out-of-range offset was committed: nothing to ask"
    assert consumer.calls == [("unassign", [(1, -1001)]), ("assign", [(1, -2)])]
    assert "offset 100 of in[1] is out of range (earliest now 120)" in caplog.text
    assert "deleted by retention were never read" in caplog.text


def test_confluent_ignores_a_missing_position_of_a_partition_no_longer_assigned() -> None:
    source, consumer = resetting_source([FakeMessage(0, None, NO_POSITION)],
                                        {0: KafkaError(KafkaError.UNSTABLE_OFFSET_COMMIT)})
    source.poll_batch()
    assert ("in", 0) in source.start_guard.parked()
    source.handle_revoked({("in", 0)})
    assert source.start_guard.parked() == set()
    consumer.messages = [FakeMessage(0, None, NO_POSITION)]  # reported before the revocation reached librdkafka
    source.poll_batch()
    assert consumer.calls == [] and len(consumer.asked) == 1


def test_confluent_keeps_asking_while_no_broker_answers_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    source, consumer = resetting_source([FakeMessage(0, None, NO_POSITION)], {0: 7}, clock)
    consumer.down = KafkaError(KafkaError._TRANSPORT)
    with caplog.at_level(logging.INFO, logger="worker.kafka.confluent"):
        source.poll_batch()
        for _ in range(3):
            clock.advance(PARKED_RETRY_S)  # due
            source.poll_batch()
        assert consumer.calls == [], "started nowhere while its committed offset is unknown"
        assert caplog.text.count("asking for the committed offsets of ['in[0]'] failed") == 1
        consumer.down = None
        clock.advance(PARKED_RETRY_S)
        source.poll_batch()
    assert consumer.calls == [("unassign", [(0, -1001)]), ("assign", [(0, 7)])]
    assert "its committed offset 7 is known now" in caplog.text
