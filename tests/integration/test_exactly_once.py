"""`--delivery exactly-once` on a real broker: SIGKILLed mid-stream three times, every alert is seen once.

A consumer reading the alert and dead-letter topics with `isolation.level=read_committed` must find
exactly one output per input record, although each kill leaves a transaction open (its records are in
the log, aborted when the restarted worker, with the same transactional id, starts). The same history
read with `read_uncommitted` shows the aborted records a kill inside a transaction leaves (printed).
The 3-node fault suite (tests/faults/) covers broker failures and fencing.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from tests.integration.test_worker_e2e import (
    PARTITIONS,
    Topics,
    WorkerProcess,
    committed,
    http_status,
    produce,
    scrape,
    wait_all_committed,
)
from tests.kafka_broker import create_topics, unique_topic, wait_for

#: Left out of CI for time (scripts/slow.sh runs it): CI keeps the same guarantee, a worker SIGKILLed three
#: times mid-stream with exactly-once, in the fault suite's case 1, and test_window_restore's exactly-once case.
pytestmark = [pytest.mark.integration, pytest.mark.slow_integration]

COPIES = 15  # x 200 sample events = 3,000 events, in batches of 50: 60 transactions or more


def read_topic(bootstrap: str, topic: str, isolation: str) -> list[tuple[bytes | None, dict[str, bytes]]]:
    """Every record of `topic` visible at `isolation` (value, headers), read to the end offsets."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique_topic("reader"),
                         "enable.auto.commit": False, "isolation.level": isolation})
    try:
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(PARTITIONS)}
        consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
        out: list[tuple[bytes | None, dict[str, bytes]]] = []

        def at_end() -> bool:
            for message in consumer.consume(num_messages=1000, timeout=0.5):
                if message.error() is None:
                    out.append((message.value(), dict(message.headers() or ())))
            positions = consumer.position([TopicPartition(topic, p) for p in range(PARTITIONS)])
            return all(tp.offset >= ends[tp.partition] for tp in positions if ends[tp.partition] > 0)

        wait_for(at_end, 60, f"reading {topic} ({isolation}) to {ends}", interval=0)
        return out
    finally:
        consumer.close()


@pytest.fixture
def kafka_client() -> str:
    """Exactly-once is confluent-only: `launch_worker` (conftest) runs this module with that client alone."""
    return "confluent"


def eos_args(transactional_id: str) -> list[str]:
    return ["--max-batch", "50", "--session-timeout-s", "6", "--delivery", "exactly-once",
            "--transactional-id", transactional_id]


def test_sigkill_three_times_mid_stream_gives_every_alert_exactly_once(
        kafka_bootstrap: str, sample_events: list[bytes], launch_worker: Callable[..., WorkerProcess]) -> None:
    values = []
    for copy in range(COPIES):
        for value in sample_events:
            event = orjson.loads(value)
            values.append(orjson.dumps({**event, "id": f"{event['id']}/{copy}"}))
    values.insert(len(values) // 2, b'{"duration": 1, "service": ')  # one dead letter, inside a transaction
    t = Topics(unique_topic("eos-in"), unique_topic("eos-alerts"), unique_topic("eos-dlq"), unique_topic("eos"))
    create_topics(kafka_bootstrap, [t.input, t.alerts, t.dead_letters], partitions=PARTITIONS)
    sent = produce(kafka_bootstrap, t.input, values)

    done = 0
    for kill in range(3):
        worker = launch_worker(t, *eos_args("eos-test-0"))  # a restart keeps its transactional id

        def progressed(after: int = done, w: WorkerProcess = worker) -> int | None:
            assert w.proc.poll() is None, f"worker exited with {w.proc.returncode}"
            total = sum(committed(kafka_bootstrap, t.group, t.input).values())
            return total if total > after else None

        done = wait_for(progressed, 90, f"progress before kill {kill + 1}", interval=0.05)
        assert done < len(values), f"the worker finished all {len(values)} events before kill {kill + 1}"
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(timeout=30)

    started = time.monotonic()
    last = launch_worker(t, *eos_args("eos-test-0"))
    wait_all_committed(kafka_bootstrap, t, last, timeout=180)
    print(f"recovered and finished in {time.monotonic() - started:.1f} s after the third kill")

    alerts = [orjson.loads(v) for v, _ in read_topic(kafka_bootstrap, t.alerts, "read_committed")]
    letters = read_topic(kafka_bootstrap, t.dead_letters, "read_committed")
    seen = Counter((a["source"]["partition"], a["source"]["offset"]) for a in alerts)
    seen.update((int(h["dlq.source.partition"]), int(h["dlq.source.offset"])) for _, h in letters)
    expected = {(s.partition, s.offset) for s in sent}
    lost = expected - set(seen)
    duplicated = {k: n for k, n in seen.items() if n > 1}
    unexpected = set(seen) - expected
    uncommitted = len(read_topic(kafka_bootstrap, t.alerts, "read_uncommitted"))
    print(f"exactly-once after 3 SIGKILLs: {len(expected)} inputs, {len(lost)} lost, {len(duplicated)} duplicated, "
          f"{len(unexpected)} unexpected; {uncommitted - len(alerts)} alert records of aborted transactions")
    assert not lost and not duplicated and not unexpected
    assert len(letters) == 1
    # Not asserted: whether a kill landed inside a transaction depends on timing (under load the worker
    # may be between batches). Run with --delivery at-least-once, this test finds duplicates (50 here).

    metrics = scrape(last)
    assert metrics[("anomaly_delivery_mode", (("mode", "exactly-once"),))] == 1
    assert metrics[("anomaly_delivery_mode", (("mode", "at-least-once"),))] == 0
    assert metrics[("anomaly_transactions_total", (("result", "committed"),))] >= 1
    assert http_status(last, "/readyz") == 200
