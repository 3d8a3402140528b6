"""Both Kafka clients keep the loop's Source/Sink contract, checked the same way on a real broker.

Every test runs once per client (`confluent`, `kafka-python`); the commit/rewind/lag check also runs
against the in-memory fake the loop's unit tests use, so they cannot pass on behaviour the real clients
lack. Checked: poll limits and wait, record fields, commit of
exactly the given offsets, rewind, lag, reachability, revocation to a joining member, publishing with
headers, a broker-refused record raising DeliveryError, and read_committed skipping aborted transactions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from kafka.admin import KafkaAdminClient

from tests.fakes import TOPIC, FakeSource
from tests.kafka_broker import create_topics, unique_topic, wait_for
from worker.config import KAFKA_CLIENTS, Settings
from worker.errors import BrokerUnavailable, DeliveryError
from worker.kafka import open_sink, open_source
from worker.loop import Sink, Source
from worker.records import Alert, DeadLetter, Record

pytestmark = pytest.mark.integration


@pytest.fixture(params=KAFKA_CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def settings(bootstrap: str, client: str, topic: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"model": Path("unused"), "bootstrap_servers": bootstrap, "input_topic": topic,
                              "alert_topic": f"{topic}-alerts", "dead_letter_topic": f"{topic}-dlq",
                              "group_id": unique_topic("contract-group"), "kafka_client": client,
                              "kafka_timeout_s": 10.0, "max_wait_ms": 200, "max_batch": 10,
                              # kafka-python 3.0.12 can stall in a rebalance; the source replaces such a
                              # consumer after this long, well inside the tests' deadlines.
                              "rejoin_timeout_s": 20.0}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def opened() -> Iterator[list[Source | Sink]]:
    """Sources and sinks a test opens; closed afterwards."""
    clients: list[Source | Sink] = []
    yield clients
    for c in clients:
        c.close()


def produce(bootstrap: str, topic: str, count: int, partition: int = 0, **fields: Any) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in range(count):
        producer.produce(topic, value=b'{"i": %d}' % i, partition=partition, **fields)
    assert producer.flush(30) == 0


def drain(source: Source, count: int, timeout: float = 90) -> list[Record]:
    got: list[Record] = []

    def enough() -> bool:
        got.extend(source.poll_batch())
        return len(got) >= count

    wait_for(enough, timeout, f"{count} records polled", interval=0)
    return got


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    finally:
        admin.close()
    return {tp.partition: m.offset for tp, m in offsets.items() if tp.topic == topic and m.offset >= 0}


def test_poll_respects_max_batch_and_max_wait_and_maps_record_fields(
        client: str, kafka_bootstrap: str, opened: list, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("contract-poll", partitions=1)
    produce(kafka_bootstrap, topic, 25, key=b"\x00\xff\xfekey", headers=[("trace", b"\x01\x02"), ("empty", None)])
    source = open_source(settings(kafka_bootstrap, client, topic))
    opened.append(source)
    records = drain(source, 25)
    # In order; a rebalance may deliver some again (at least once), never skip one.
    assert sorted({r.offset for r in records}) == list(range(25))
    assert all(r.key == b"\x00\xff\xfekey" and r.value == b'{"i": %d}' % r.offset for r in records)
    assert records[0].headers == (("trace", b"\x01\x02"), ("empty", None))
    assert records[0].timestamp_type == 0 and abs(records[0].timestamp_ms / 1000 - time.time()) < 300

    assert source.poll_batch() == []
    started = time.monotonic()
    assert source.poll_batch() == []
    waited = time.monotonic() - started
    assert 0.1 <= waited < 3, f"an empty poll waits about max_wait_ms (200 ms), took {waited:.2f} s"

    produce(kafka_bootstrap, topic, 25)
    seen: set[int] = set()

    def all_new_ones() -> bool:
        batch = source.poll_batch()
        assert len(batch) <= 10, "never more than max_batch"
        seen.update(r.offset for r in batch)
        return seen >= set(range(25, 50))

    wait_for(all_new_ones, 90, "the next 25 records in batches of at most 10", interval=0)


class FakeHarness:
    """The loop's unit-test fake behind the same checks: it must not promise what the real clients lack."""

    topic = TOPIC

    def __init__(self) -> None:
        self.data: dict[int, list[bytes]] = {0: [], 1: []}
        self.source: FakeSource | None = None

    def produce(self, partition: int, count: int) -> None:
        values = self.data[partition]
        values.extend(b'{"i": %d}' % (len(values) + i) for i in range(count))

    def open(self, max_batch: int) -> Source:
        self.source = FakeSource([], self.data, max_batch)
        return self.source

    def committed(self) -> dict[int, int]:
        assert self.source is not None
        return {p: o for (_, p), o in self.source.committed.items()}


class BrokerHarness:
    def __init__(self, client: str, bootstrap: str, topic: str) -> None:
        self.client, self.bootstrap, self.topic = client, bootstrap, topic
        self.group = ""

    def produce(self, partition: int, count: int) -> None:
        produce(self.bootstrap, self.topic, count, partition=partition)

    def open(self, max_batch: int) -> Source:
        s = settings(self.bootstrap, self.client, self.topic, max_batch=max_batch)
        self.group = s.group_id
        return open_source(s)

    def committed(self) -> dict[int, int]:
        return committed(self.bootstrap, self.group, self.topic)


@pytest.fixture(params=["fake", *KAFKA_CLIENTS])
def harness(request: pytest.FixtureRequest) -> FakeHarness | BrokerHarness:
    """Every Source the loop runs against: the unit tests' fake and both real clients on a real broker."""
    if request.param == "fake":
        return FakeHarness()
    bootstrap = request.getfixturevalue("kafka_bootstrap")
    topic = unique_topic("contract-commit")
    create_topics(bootstrap, [topic], partitions=2)
    return BrokerHarness(str(request.param), bootstrap, topic)


def test_commit_stores_exactly_the_given_offsets_rewind_re_reads_and_lag_counts_the_rest(
        harness: FakeHarness | BrokerHarness, opened: list) -> None:
    topic = harness.topic
    harness.produce(0, 30)
    harness.produce(1, 5)
    source = harness.open(max_batch=10)
    opened.append(source)
    batches: list[list[Record]] = []

    def everything() -> bool:
        batches.append(source.poll_batch())
        return len({(r.partition, r.offset) for b in batches for r in b}) >= 35

    wait_for(everything, 90, "35 records polled", interval=0)
    assert max(len(b) for b in batches) <= 10, "never more than max_batch"
    assert source.assigned() == {(topic, 0), (topic, 1)}

    # The confluent source commits asynchronously: the offsets reach the group within a round trip.
    source.commit({(topic, 0): 7, (topic, 1): 5, ("not-ours", 0): 3})
    wait_for(lambda: harness.committed() == {0: 7, 1: 5}, 15, "offsets 7 and 5 committed")
    source.commit({(topic, 0): 12})
    wait_for(lambda: harness.committed() == {0: 12, 1: 5}, 15, "only what was given, nothing more")

    source.rewind({(topic, 0): 20})
    again = drain(source, 10)
    assert [(r.partition, r.offset) for r in again] == [(0, o) for o in range(20, 30)]
    wait_for(lambda: source.lag() == {(topic, 0): 0, (topic, 1): 0}, 15, "lag 0 at the end of both partitions")
    source.rewind({(topic, 0): 25})
    assert [r.offset for r in drain(source, 5)] == list(range(25, 30))
    assert source.reachable()


@pytest.mark.slow_integration("kafka-python")  # for time: CI runs the fake and confluent cases (scripts/slow.sh all)
def test_a_joining_member_takes_partitions_through_revocation(
        client: str, kafka_bootstrap: str, opened: list, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("contract-revoke", partitions=4)
    for p in range(4):
        produce(kafka_bootstrap, topic, 5, partition=p)
    s = settings(kafka_bootstrap, client, topic, max_batch=100)
    revoked: list[set[tuple[str, int]]] = []
    first = open_source(s, on_revoke=revoked.append)
    opened.append(first)
    drain(first, 20)
    first.commit({(topic, p): 5 for p in range(4)})
    second = open_source(s)
    opened.append(second)

    def split() -> bool:
        first.poll_batch()
        second.poll_batch()
        a, b = first.assigned(), second.assigned()
        return bool(a) and bool(b) and not a & b and len(a | b) == 4

    wait_for(split, 90, "the four partitions split between two members", interval=0)
    taken = second.assigned()
    assert revoked and taken <= set().union(*revoked), "the first member was told before its partitions moved"
    first.commit({tp: 5 for tp in taken})  # no longer ours: skipped, not an error
    assert first.reachable() and second.reachable()


def test_no_broker_is_broker_unavailable(client: str) -> None:
    """What main retries with backoff, said within about the Kafka timeout."""
    s = settings("127.0.0.1:1", client, unique_topic("contract-nobroker"), kafka_timeout_s=2.0)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        open_sink(s)
    with pytest.raises(BrokerUnavailable):
        open_source(s)
    assert time.monotonic() - started < 20


def _alert(topic: str, offset: int) -> Alert:
    record = Record(topic, 0, offset, b"k", b"{}")
    return Alert(alert_id=f"m1/{topic}/0/{offset}", record=record,
                 document={"alert_id": f"m1/{topic}/0/{offset}", "model_version": "m1", "score": 2.0})


def test_publish_delivers_alerts_and_dead_letters_with_headers_and_a_refused_record_raises(
        client: str, kafka_bootstrap: str, opened: list) -> None:
    base = unique_topic("contract-sink")
    s = settings(kafka_bootstrap, client, base, max_event_bytes=64 * 1024)
    create_topics(kafka_bootstrap, [s.alert_topic, s.dead_letter_topic], partitions=1)
    sink = open_sink(s)
    opened.append(sink)
    bad = Record(base, 2, 41, b"\xffkey", b"not json", headers=(("trace", b"t-1"),))
    sink.publish([_alert(base, 40)], [DeadLetter(record=bad, reason="invalid_json", error="boom", model_version="m1")])

    reader = open_source(settings(kafka_bootstrap, client, s.alert_topic, max_batch=100))
    opened.append(reader)
    [alert] = drain(reader, 1)
    assert alert.key == f"m1/{base}/0/40".encode() and orjson.loads(alert.value or b"")["score"] == 2.0
    assert dict(alert.headers)["model.version"] == b"m1"
    letters = open_source(settings(kafka_bootstrap, client, s.dead_letter_topic, max_batch=100))
    opened.append(letters)
    [letter] = drain(letters, 1)
    headers = dict(letter.headers)
    assert (letter.key, letter.value) == (b"\xffkey", b"not json")
    assert headers["trace"] == b"t-1", "the input record's own headers are kept"
    assert headers["dlq.reason"] == b"invalid_json" and headers["dlq.source.offset"] == b"41"

    # The broker refuses a record larger than the topic allows: no acknowledgement, so DeliveryError.
    small = unique_topic("contract-small")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics({small: {"num_partitions": 1, "configs": {"max.message.bytes": "1024"}}})
        admin.wait_for_topics([small], timeout_ms=30_000)
    finally:
        admin.close()
    refusing = open_sink(settings(kafka_bootstrap, client, base, dead_letter_topic=small, compression="none",
                                  max_event_bytes=64 * 1024))
    opened.append(refusing)
    huge = Record(base, 0, 1, None, b"x" * 20_000)
    with pytest.raises(DeliveryError):
        refusing.publish([], [DeadLetter(record=huge, reason="oversized", error="too big")])


def test_read_committed_skips_aborted_transactions(
        client: str, kafka_bootstrap: str, opened: list, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("contract-txn", partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": unique_topic("txn")})
    producer.init_transactions(30)
    for outcome in ("aborted", "committed"):
        producer.begin_transaction()
        for i in range(5):
            producer.produce(topic, value=f"{outcome}-{i}".encode(), partition=0)
        assert producer.flush(30) == 0  # in the log before the abort (abort alone would drop unsent records)
        if outcome == "aborted":
            producer.abort_transaction(30)
        else:
            producer.commit_transaction(30)
    for level, expected in (("read_committed", {f"committed-{i}" for i in range(5)}),
                            ("read_uncommitted", {f"{o}-{i}" for o in ("aborted", "committed") for i in range(5)})):
        source = open_source(settings(kafka_bootstrap, client, topic, isolation_level=level, max_batch=100))
        opened.append(source)
        got = {(r.value or b"").decode() for r in drain(source, len(expected))}
        assert got == expected, level


def test_log_append_time_topics_give_the_broker_time(client: str, kafka_bootstrap: str, opened: list) -> None:
    topic = unique_topic("contract-logappend")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics({topic: {"num_partitions": 1, "configs": {"message.timestamp.type": "LogAppendTime"}}})
        admin.wait_for_topics([topic], timeout_ms=30_000)
    finally:
        admin.close()
    produce(kafka_bootstrap, topic, 1, timestamp=1)  # the producer's 1970 time is replaced by the broker's
    source = open_source(settings(kafka_bootstrap, client, topic))
    opened.append(source)
    [record] = drain(source, 1)
    assert record.timestamp_type == 1 and abs(record.timestamp_ms / 1000 - time.time()) < 300
