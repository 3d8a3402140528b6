"""Rebalancing under load: two workers on a 4-partition topic, a third joins, one leaves mid-stream.

Events keep arriving the whole time. Afterwards every event has an alert (the bundle alerts on every scored
event), a record delivered twice carries the same alert id, the group committed to the end, and no member
stalled (no consumer replaced after a stuck rebalance, every remaining member holds partitions).
"""

from __future__ import annotations

import json
import signal
import threading
from collections import defaultdict
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from tests.integration.test_interop import kcat_consume, topics
from tests.integration.test_worker_e2e import WorkerProcess, committed, http_status
from tests.kafka_broker import wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 4
RATE_PER_S = 300


class Load:
    """Produces events round-robin over the partitions at about `RATE_PER_S` until stopped."""

    def __init__(self, bootstrap: str, topic: str, events: list[bytes]) -> None:
        self.bootstrap, self.topic, self.events = bootstrap, topic, events
        self.sent: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        n = 0
        while not self.stop.wait(1 / 20):
            for _ in range(RATE_PER_S // 20):
                event_id = f"ev-{n}"
                value = self.events[n % len(self.events)].replace(b'"e-', f'"{event_id}-'.encode(), 1)
                producer.produce(self.topic, value=value, partition=n % PARTITIONS)
                self.sent.append(f"{event_id}-{n % len(self.events)}")
                n += 1
            producer.poll(0)
        assert producer.flush(30) == 0

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(60)


@pytest.mark.slow_integration("kafka-python")  # for time: CI runs the confluent case (scripts/slow.sh both)
def test_a_member_joins_and_one_leaves_under_load_without_loss_or_stall(
        kafka_bootstrap: str, sample_events: list[bytes], launch_worker: Callable[..., WorkerProcess]) -> None:
    t = topics(kafka_bootstrap, partitions=PARTITIONS)
    ready = 200

    def progress(minimum: int) -> Callable[[], bool]:
        return lambda: sum(committed(kafka_bootstrap, t.group, t.input).values()) >= minimum

    with Load(kafka_bootstrap, t.input, sample_events) as load:
        first, second = launch_worker(t), launch_worker(t)
        for w in (first, second):
            wait_for(lambda w=w: http_status(w, "/readyz") == ready, 90, "two members, each with partitions")
        wait_for(progress(1000), 60, "1000 events committed by two members")
        third = launch_worker(t)
        wait_for(lambda: http_status(third, "/readyz") == ready, 90, "the third member to get partitions")
        wait_for(progress(len(load.sent)), 60, "the group to catch up with three members")
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(timeout=30) == 0
        wait_for(progress(len(load.sent)), 60, "the group to catch up after a member left")
    produced = set(load.sent)

    def all_committed() -> bool:
        assert second.proc.poll() is None and third.proc.poll() is None, "a member exited"
        return sum(committed(kafka_bootstrap, t.group, t.input).values()) >= len(produced)

    wait_for(all_committed, 90, f"all {len(produced)} events committed")
    for w in (second, third):
        assert http_status(w, "/readyz") == ready, "every remaining member holds partitions"
    for w in (first, second, third):
        assert "replacing the consumer" not in w.output(), "a member stalled in a rebalance"

    documents = [json.loads(a["payload"]) for a in kcat_consume(kafka_bootstrap, t.alerts)]
    assert {d["event_id"] for d in documents} == produced, "every event alerted, nothing lost"
    ids_by_source: dict[tuple[int, int], set[str]] = defaultdict(set)
    for d in documents:
        ids_by_source[(d["source"]["partition"], d["source"]["offset"])].add(d["alert_id"])
    assert all(len(ids) == 1 for ids in ids_by_source.values()), "a duplicate carries the same alert id"
    print(f"\n{len(produced)} events, {len(documents)} alerts ({len(documents) - len(produced)} duplicates)")
