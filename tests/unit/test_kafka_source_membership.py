"""KafkaSource replaces a consumer stuck in a group rebalance (a kafka-python 3.0.12 stall seen in CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kafka.structs import ConsumerGroupMetadata, MemberState, TopicPartition

from worker.config import Settings
from worker.errors import RebalanceInProgress
from worker.kafka.kafka_python import KafkaSource


class FakeConsumer:
    """Just enough of KafkaConsumer for poll_batch: no records, a settable group state."""

    def __init__(self, **_: Any) -> None:
        self.state = MemberState.REBALANCING
        self.closed = False
        self.commits: list[dict] = []

    def partitions_for_topic(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.topics = topics

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        return {}

    def group_metadata(self) -> ConsumerGroupMetadata:
        return ConsumerGroupMetadata(group_id="g", state=self.state)

    def close(self, autocommit: bool = True, timeout_ms: int | None = None) -> None:
        self.closed = True

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("in", 0)}

    def commit(self, offsets: dict, timeout_ms: int | None = None) -> None:
        self.commits.append(offsets)


def make_source() -> tuple[KafkaSource, list[FakeConsumer], list[float]]:
    made: list[FakeConsumer] = []
    now = [0.0]

    def factory(**kwargs: Any) -> FakeConsumer:
        made.append(FakeConsumer(**kwargs))
        return made[-1]

    settings = Settings(model=Path("m"), bootstrap_servers="127.0.0.1:1", input_topic="in", alert_topic="al",
                        dead_letter_topic="dl", group_id="g", max_wait_ms=0, rejoin_timeout_s=60)
    return KafkaSource(settings, consumer_factory=factory, clock=lambda: now[0]), made, now


def test_a_rebalance_longer_than_the_rejoin_timeout_replaces_the_consumer() -> None:
    source, made, now = make_source()
    source.poll_batch()                       # rebalancing starts being timed
    now[0] = 59.0
    source.poll_batch()
    assert len(made) == 1
    now[0] = 61.0
    source.poll_batch()
    assert len(made) == 2 and made[0].closed and source.consumer is made[1]
    assert made[1].topics == ["in"]


def test_a_stable_member_is_kept_however_long_it_runs() -> None:
    source, made, now = make_source()
    made[0].state = MemberState.STABLE
    for t in (0.0, 100.0, 1000.0):
        now[0] = t
        source.poll_batch()
    assert len(made) == 1


def test_the_timer_restarts_after_the_member_was_stable() -> None:
    source, made, now = make_source()
    source.poll_batch()
    now[0] = 50.0
    made[0].state = MemberState.STABLE
    source.poll_batch()
    made[0].state = MemberState.REBALANCING
    now[0] = 70.0
    source.poll_batch()                       # a new rebalance: timed from 70 s, not from 0 s
    now[0] = 120.0
    source.poll_batch()
    assert len(made) == 1


def test_no_commit_is_sent_while_the_group_rebalances() -> None:
    source, made, _ = make_source()
    with pytest.raises(RebalanceInProgress):
        source.commit({("in", 0): 5})
    assert made[0].commits == []
    made[0].state = MemberState.STABLE
    source.commit({("in", 0): 5, ("in", 1): 9})   # partition 1 is not ours: left out
    assert [{(tp.topic, tp.partition): om.offset for tp, om in c.items()} for c in made[0].commits] == [{("in", 0): 5}]
