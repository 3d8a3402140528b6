"""The broker fixture gives a real Kafka: produce, consume in a group, commit, read the commit back."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient

from tests.kafka_broker import unique_topic, wait_for

pytestmark = pytest.mark.integration

N_MESSAGES = 100


def test_produce_consume_commit_round_trip(kafka_bootstrap: str, topic_factory: Callable[..., str]) -> None:
    topic = topic_factory("broker-round-trip")
    group = unique_topic("broker-round-trip-group")
    sent = {f"event-{i}".encode() for i in range(N_MESSAGES)}

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    try:
        futures = [producer.send(topic, key=str(i % 7).encode(), value=v) for i, v in enumerate(sorted(sent))]
        producer.flush(timeout=30)
        metadata = [f.get(timeout=30) for f in futures]
    finally:
        producer.close(timeout=10)
    per_partition = Counter(m.partition for m in metadata)
    assert sum(per_partition.values()) == N_MESSAGES
    assert len(per_partition) > 1, f"keys should spread over partitions, got {dict(per_partition)}"
    for partition, count in per_partition.items():
        offsets = sorted(m.offset for m in metadata if m.partition == partition)
        assert offsets == list(range(count)), f"partition {partition} offsets not contiguous from 0"

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received: list[bytes] = []
    try:

        def all_consumed() -> bool:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend(r.value for r in records)
            return len(received) >= N_MESSAGES

        wait_for(all_consumed, timeout=60, what=f"{N_MESSAGES} messages consumed from {topic}")
        consumer.commit()
    finally:
        consumer.close()
    assert sorted(received) == sorted(sent), "every message exactly once, byte for byte"

    expected = {TopicPartition(topic, p): n for p, n in per_partition.items()}

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        committed = admin.list_group_offsets({group: None})[group]
    finally:
        admin.close()
    assert {tp: om.offset for tp, om in committed.items() if om.offset >= 0} == expected

    # A new member of the same group resumes exactly at the commit, which is the end of the log.
    checker = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    try:
        partitions = list(expected)
        assert checker.end_offsets(partitions) == expected
        assert {tp: checker.committed(tp) for tp in partitions} == expected
        checker.assign(partitions)
        assert {tp: checker.position(tp) for tp in partitions} == expected
    finally:
        checker.close()
