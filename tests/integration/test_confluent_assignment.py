"""A partition that librdkafka has assigned but does not fetch is re-added, on a real broker.

librdkafka fetches a new partition only once it knows the committed offset. Here that offset is held
back for real: an open transaction has sent offsets for the group (KIP-447), so the broker answers
"unstable" until the transaction ends, exactly as when a worker dies inside a transaction. The source
re-adds the partition after a Kafka timeout (its guard against librdkafka #5586, where the answer is
lost and the partition would wait forever) and, once the transaction commits, reads from the offset
the transaction committed: nothing skipped, nothing read twice. A re-add while librdkafka asks for the
held offset made librdkafka 2.16 start the partition from its beginning; the source catches that
(librdkafka's `auto.offset.reset` is "error") and asks again. The second test gives the worker back a
partition it had read before, the case where only librdkafka's fetch state shows that it waits. The last
test gives the source back a partition it held at an undecodable batch, which librdkafka keeps paused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.integration.test_kafka_contract import produce
from tests.kafka_broker import create_topics, unique_topic, wait_for
from worker.config import Settings
from worker.kafka.confluent import ConfluentSource
from worker.kafka.core import Quarantine
from worker.records import Record

pytestmark = pytest.mark.integration


def source_settings(bootstrap: str, topic: str, group: str, **overrides: float) -> Settings:
    """A confluent source's settings for `topic` in `group` (no model: only the source runs)."""
    return Settings(model=Path("unused"), bootstrap_servers=bootstrap, input_topic=topic,
                    alert_topic=f"{topic}-alerts", dead_letter_topic=f"{topic}-dlq", group_id=group,
                    kafka_client="confluent", **overrides)


def settled_after_a_re_add(log_text: str) -> bool:
    """The source re-added the partition and then either found librdkafka had started it without its
    committed offset (the assignment changed while librdkafka asked for it: from offset 0, with librdkafka's
    own "earliest") and stopped it to wait, or had to re-add it once more."""
    return "not started fetching" in log_text and (
        "has no position and its committed offset is not known yet" in log_text
        or log_text.count("not started fetching") >= 2)


def test_a_partition_waiting_for_its_committed_offset_is_re_added_and_resumes_where_committed(
        kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    topic, group = unique_topic("unfetched"), unique_topic("unfetched-group")
    create_topics(kafka_bootstrap, [topic], partitions=1)
    produce(kafka_bootstrap, topic, 10)
    metadata = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    txn = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": unique_topic("holder")})
    txn.init_transactions(30)
    txn.begin_transaction()
    txn.send_offsets_to_transaction([TopicPartition(topic, 0, 7)], metadata.consumer_group_metadata(), 30)
    settings = source_settings(kafka_bootstrap, topic, group, kafka_timeout_s=2.0, max_wait_ms=200, max_batch=10)
    source = ConfluentSource(settings)
    got: list[Record] = []
    try:
        def re_added() -> bool:
            got.extend(source.poll_batch())
            return bool(got) or settled_after_a_re_add(caplog.text)

        with caplog.at_level(logging.WARNING, logger="worker.kafka.confluent"):
            wait_for(re_added, 60, "the source to re-add the partition it cannot fetch yet", interval=0)
        assert got == [], "nothing may be read before the committed offset is known"
        assert source.assigned() == {(topic, 0)}, "re-added, not lost"
        txn.commit_transaction(30)

        def read_all() -> bool:
            got.extend(source.poll_batch())
            return len(got) >= 3

        wait_for(read_all, 60, "the records after the offset the transaction committed", interval=0)
        assert [r.offset for r in got] == [7, 8, 9]
    finally:
        source.close()
        metadata.close()


def test_a_partition_given_back_that_waits_for_its_committed_offset_is_re_added(
        kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    # The worker reads the partition, then loses its membership (no poll for longer than max.poll.interval,
    # as after a long stall) while a transaction holds the group's offsets back; rejoining gives it the same
    # partition back. librdkafka still has the old high-water mark cached, so only its fetch state says that
    # the partition waits.
    topic, group = unique_topic("given-back"), unique_topic("given-back-group")
    create_topics(kafka_bootstrap, [topic], partitions=1)
    produce(kafka_bootstrap, topic, 10)
    settings = source_settings(kafka_bootstrap, topic, group, kafka_timeout_s=2.0, max_wait_ms=200, max_batch=10,
                               session_timeout_s=6.0, max_poll_interval_s=7.0)
    source = ConfluentSource(settings)
    metadata = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    txn = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": unique_topic("holder")})
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    got: list[Record] = []
    try:
        def read(count: int) -> bool:
            got.extend(source.poll_batch())
            return len(got) >= count

        wait_for(lambda: read(10), 60, "the first read of the partition", interval=0)
        assert source.consumer.get_watermark_offsets(TopicPartition(topic, 0), cached=True)[1] == 10
        txn.init_transactions(30)
        txn.begin_transaction()
        txn.send_offsets_to_transaction([TopicPartition(topic, 0, 7)], metadata.consumer_group_metadata(), 30)

        def left_the_group() -> bool:
            described = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
            return not described.members

        wait_for(left_the_group, 60, "the worker to leave the group after max.poll.interval without a poll")
        got.clear()
        with caplog.at_level(logging.WARNING, logger="worker.kafka.confluent"):
            wait_for(lambda: read(1) or settled_after_a_re_add(caplog.text), 60,
                     "the source to re-add the partition given back", interval=0)
        assert got == [], "nothing may be read before the committed offset is known"
        assert "stopped" in caplog.text, "the fetch state showed it"
        assert source.consumer.get_watermark_offsets(TopicPartition(topic, 0), cached=True)[1] == 10, \
            "the old high-water mark was still cached: the fetch state is what caught it"
        txn.commit_transaction(30)
        wait_for(lambda: read(3), 60, "the records after the offset the transaction committed", interval=0)
        assert [r.offset for r in got] == [7, 8, 9]
    finally:
        source.close()
        metadata.close()


def test_a_committed_offset_retention_deleted_resumes_at_the_earliest_and_names_what_was_never_read(
        kafka_bootstrap: str, caplog: pytest.LogCaptureFixture) -> None:
    topic, group = unique_topic("retention"), unique_topic("retention-group")
    create_topics(kafka_bootstrap, [topic], partitions=1)
    produce(kafka_bootstrap, topic, 10)
    committer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    committer.commit(offsets=[TopicPartition(topic, 0, 2)], asynchronous=False)
    committer.close()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, 5)], request_timeout=30).values():
        future.result()  # offsets 0-4 are gone, as retention would remove them
    settings = source_settings(kafka_bootstrap, topic, group, kafka_timeout_s=5.0, max_wait_ms=200, max_batch=10)
    source = ConfluentSource(settings)
    got: list[Record] = []
    try:
        def read_all() -> bool:
            got.extend(source.poll_batch())
            return len(got) >= 5

        with caplog.at_level(logging.WARNING, logger="worker.kafka.confluent"):
            wait_for(read_all, 60, "the records retention left", interval=0)
        assert [r.offset for r in got] == [5, 6, 7, 8, 9]
        assert f"offset 2 of {topic}[0] is out of range (earliest now 5)" in caplog.text
        assert "deleted by retention were never read" in caplog.text
    finally:
        source.close()


class _UndecodableOnce(Consumer):  # type: ignore[misc]
    """The real client, except that its first consume reports each partition's first batch as undecodable.

    librdkafka here has every codec, and the broker validates what it stores, so a real undecodable batch
    cannot be provoked; the rebalance and librdkafka's pause state under test are real.
    """

    def __init__(self, config: dict, topic: str, partitions: int) -> None:
        super().__init__(config)
        self.pending = [_Undecodable(topic, p) for p in range(partitions)]

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list:
        if self.pending and self.assignment():
            injected, self.pending = self.pending, []
            return [*injected, *super().consume(num_messages=num_messages, timeout=0)]
        return list(super().consume(num_messages=num_messages, timeout=timeout))


class _Undecodable:
    """A consume result as librdkafka gives it for a batch it cannot decompress."""

    def __init__(self, topic: str, partition: int) -> None:
        self.name, self.number = topic, partition

    def error(self) -> KafkaError:
        return KafkaError(KafkaError._BAD_COMPRESSION, "Decompression (codec 0x4) of message at 0 failed")

    def topic(self) -> str:
        return self.name

    def partition(self) -> int:
        return self.number

    def offset(self) -> int:
        return 0


def test_a_held_partition_a_rebalance_gives_back_is_read_again(kafka_bootstrap: str) -> None:
    """librdkafka keeps the source's pause of a held partition through a rebalance that takes it away and
    gives it back, while the revocation released the hold: unless the source resumes it, it is never read."""
    topic, group = unique_topic("held-back"), unique_topic("held-back-group")
    create_topics(kafka_bootstrap, [topic], partitions=2)
    for partition in (0, 1):
        produce(kafka_bootstrap, topic, 5, partition=partition)
    settings = source_settings(kafka_bootstrap, topic, group, session_timeout_s=6.0, max_wait_ms=200)
    quarantine = Quarantine()
    source = ConfluentSource(settings, quarantine=quarantine,
                             consumer_factory=lambda config: _UndecodableOnce(config, topic, 2))
    other = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False,
                      "partition.assignment.strategy": "cooperative-sticky", "session.timeout.ms": 6000})
    got: list[Record] = []
    try:
        wait_for(lambda: got.extend(source.poll_batch()) or len(quarantine.held) == 2, 60,
                 "both partitions held at their undecodable batch", interval=0)
        assert got == [], "nothing handed out past an undecodable batch"
        other.subscribe([topic])

        def one_moved() -> bool:
            got.extend(source.poll_batch())
            other.consume(10, 0.1)  # the joining member's rebalance callbacks run inside its consume
            return len(source.assigned()) == 1

        wait_for(one_moved, 60, "one partition moved to the joining member", interval=0)
        moved = {(topic, 0), (topic, 1)} - source.assigned()
        assert len(moved) == 1
        other.close()
        wait_for(lambda: got.extend(source.poll_batch()) or len(source.assigned()) == 2, 60,
                 "the partition given back", interval=0)
        wait_for(lambda: got.extend(source.poll_batch()) or len(got) >= 5, 30,
                 "the partition given back read from its start", interval=0)
        assert {(r.topic, r.partition) for r in got} == moved and [r.offset for r in got] == [0, 1, 2, 3, 4]
        assert set(quarantine.held) == {(topic, 0), (topic, 1)} - moved, "the one it kept stays held"
    finally:
        source.close()
