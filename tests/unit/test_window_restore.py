"""The window state restore protocol without a broker (worker/restore.py, core.Starts, the sources' part).

A small window model over in-memory partitions: each record is `host,epoch-seconds`; an event alerts when its
host has at least `BURST` events in the last 10 s. The same protocol on a real broker, both clients:
tests/integration/test_window_restore.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from confluent_kafka import TopicPartition as ConfluentPartition
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as PythonPartition
from prometheus_client import CollectorRegistry

from tests.fakes import FakeClock
from training.window_state import RestorePoint, WindowInputs
from training.windows import build_spec
from worker.alerts import build_alert
from worker.config import Settings
from worker.errors import DeliveryError
from worker.health import BrokerStatus, Health
from worker.kafka.confluent import ConfluentSource, ConfluentTransactionalSink
from worker.kafka.core import START_RETRY_S, Offsets, Restore, Starts, TopicKey
from worker.kafka.kafka_python import KafkaSource
from worker.loop import Worker
from worker.metrics import WorkerMetrics
from worker.pipeline import BatchResult
from worker.records import Alert, DeadLetter, Record
from worker.restore import Restorer
from worker.windows import PartitionWindows

TOPIC = "in"
BURST = 4
SPEC = build_spec(["host"], ["10s"], "ts", {"host": "categorical", "ts": "numeric"}, grace_s=0.0)


def stream(partition: int, n: int) -> list[bytes]:
    """`n` events a second apart; every 7 seconds one host starts a burst of 6 events, 0.5 s apart."""
    out, t = [], 1_750_000_000.0
    for i in range(n):
        t += 1.0 if i % 7 else 0.5
        host = f"burst{partition}-{i // 7}" if i % 7 < 6 and i % 14 >= 7 else f"h{partition}-{i % 5}"
        out.append(f"{host},{t}".encode())
    return out


def inputs(records: Sequence[Record]) -> WindowInputs:
    fields = [(r.value or b"").decode().split(",") for r in records]
    return WindowInputs(times=np.array([float(f[1]) for f in fields]), keys=[[f[0] for f in fields]],
                        numeric=np.empty((len(records), 0)), categorical=[])


class WindowPipeline:
    """The pipeline's window part only: an event alerts when its host's 10 s window holds `BURST` events."""

    def __init__(self, windows: PartitionWindows) -> None:
        self.windows, self.spec = windows, SPEC
        self.bundle = SimpleNamespace(version="m1", histogram=SimpleNamespace(edges=[0.0, 1.0], counts=[1]),
                                      schema=SimpleNamespace(fields=()), field_histograms={})
        self.replayed: list[tuple[int, int]] = []

    def process(self, records: Sequence[Record]) -> BatchResult:
        counts = self.windows.features(records, inputs(records))[:, 0]
        alerts = [build_alert(r, {}, float(c), BURST - 0.5, "m1", [], 0.0) for r, c in zip(records, counts, strict=True)
                  if c >= BURST]
        return BatchResult(consumed=len(records), alerts=alerts, dead_letters=[], scores=counts)

    def replay(self, records: Sequence[Record]) -> None:
        self.replayed += [(r.partition, r.offset) for r in records]
        self.windows.replay(records, inputs(records))


class Kafka:
    """Partitions and the group's committed offsets with their metadata, shared by successive members."""

    def __init__(self, partitions: dict[int, list[bytes]]) -> None:
        self.data = {(TOPIC, p): values for p, values in partitions.items()}
        self.committed: dict[TopicKey, tuple[int, str | None]] = {}


class RestoringSource:
    """A consumer of `Kafka` that, like both real sources, asks `Restore.start` where each partition starts."""

    def __init__(self, kafka: Kafka, per_partition: int = 3) -> None:
        self.kafka, self.per_partition = kafka, per_partition
        self.restore: Restore | None = None
        self.position: dict[TopicKey, int] = {}

    def restore_with(self, restore: Restore) -> None:
        self.restore = restore

    def poll_batch(self) -> list[Record]:
        for key in self.kafka.data:
            if key not in self.position:  # assigned
                committed, metadata = self.kafka.committed.get(key, (-1, None))
                start = self.restore.start(key, committed, metadata) if self.restore else None
                self.position[key] = start if start is not None else max(committed, 0)
        out: list[Record] = []
        for key, values in sorted(self.kafka.data.items()):
            end = min(len(values), self.position[key] + self.per_partition)
            out += [Record(key[0], key[1], offset, None, values[offset]) for offset in range(self.position[key], end)]
            self.position[key] = end
        return out

    def commit(self, offsets: Offsets) -> None:
        for key, offset in offsets.items():
            self.kafka.committed[key] = (offset, self.restore.metadata(key, offset) if self.restore else None)

    def rewind(self, offsets: Offsets) -> None:
        self.position.update(offsets)

    def lag(self) -> dict[TopicKey, int]:
        return {key: len(values) - self.position.get(key, 0) for key, values in self.kafka.data.items()}

    def assigned(self) -> set[TopicKey]:
        return set(self.kafka.data)

    def reachable(self) -> bool:
        return True

    def close(self) -> None: ...


class Sink:
    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.fail = 0

    def publish(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter]) -> None:
        if self.fail:
            self.fail -= 1
            raise DeliveryError("not acknowledged")
        self.alerts += alerts

    def close(self) -> None: ...


def worker(source: Any, sink: Sink, windows: PartitionWindows | None = None) -> tuple[Worker, WindowPipeline]:
    pipeline = WindowPipeline(windows or PartitionWindows(SPEC, 1000, None))
    metrics = WorkerMetrics(CollectorRegistry())
    metrics.set_model("m1", BURST - 0.5)
    loop = Worker(source, sink, pipeline, metrics, TOPIC, Health(), BrokerStatus())  # type: ignore[arg-type]
    loop.backoff.wait = lambda: None  # type: ignore[method-assign]
    return loop, pipeline


def drain(loop: Worker, batches: int = 1000) -> None:
    """Run `batches` polls, or until everything is read and committed."""
    for _ in range(batches):
        if not any(loop.source.lag().values()) and not loop.pending:
            return
        loop.run_once()


def alerted(sink: Sink) -> set[tuple[int, int]]:
    return {(a.record.partition, a.record.offset) for a in sink.alerts}


DATA = {0: stream(0, 120), 1: stream(1, 90)}


def uninterrupted() -> set[tuple[int, int]]:
    sink = Sink()
    drain(worker(RestoringSource(Kafka(DATA)), sink)[0])
    assert len(sink.alerts) > 20, "the stream has bursts the windows see"
    return alerted(sink)


@pytest.mark.parametrize("batches", [3, 7, 12, 20])
def test_a_restarted_worker_rebuilds_its_window_state_from_the_commit_metadata_and_alerts_the_same(
        batches: int) -> None:
    kafka, sink = Kafka(DATA), Sink()
    drain(worker(RestoringSource(kafka), sink)[0], batches)  # then killed: its state is gone
    points = {key: RestorePoint.decode(metadata) for key, (_, metadata) in kafka.committed.items()}
    assert all(point is not None for point in points.values()), "every commit carries a restore point"
    restarted, pipeline = worker(RestoringSource(kafka), sink)
    drain(restarted)
    assert alerted(sink) == uninterrupted()
    assert pipeline.replayed, "records before the committed offsets were replayed"
    assert all(offset < kafka.committed[(TOPIC, p)][0] for p, offset in pipeline.replayed)


def test_replayed_records_are_never_scored_published_or_committed() -> None:
    kafka, sink = Kafka(DATA), Sink()
    drain(worker(RestoringSource(kafka), sink)[0], 10)
    before = dict(kafka.committed)
    scored_before = len(sink.alerts)
    restarted, pipeline = worker(RestoringSource(kafka), sink)
    commits: list[dict[TopicKey, int]] = []
    restarted.source.commit = lambda offsets, real=restarted.source.commit: (  # type: ignore[method-assign]
        commits.append(dict(offsets)), real(offsets))[1]
    drain(restarted)
    assert all(offset >= before[key][0] for c in commits for key, offset in c.items()), "never behind the commit"
    scored = {(a.record.partition, a.record.offset) for a in sink.alerts[scored_before:]}
    assert not scored & set(pipeline.replayed)


def test_without_metadata_a_partition_starts_empty_at_its_committed_offset() -> None:
    kafka, sink = Kafka(DATA), Sink()
    kafka.committed = {(TOPIC, 0): (40, None), (TOPIC, 1): (30, "not a restore point")}
    restarted, pipeline = worker(RestoringSource(kafka), sink)
    drain(restarted)
    assert pipeline.replayed == [] and min(o for _, o in alerted(sink)) >= 30


def test_a_batch_whose_delivery_failed_is_read_again_from_its_restore_point_with_the_same_alerts() -> None:
    sink = Sink()
    loop, pipeline = worker(RestoringSource(Kafka(DATA)), sink)
    drain(loop, 8)
    sink.fail = 2  # the next batch is not delivered twice; it had entered the window state each time
    drain(loop)
    assert pipeline.replayed, "the state was rebuilt from the restore point of the failed batch"
    assert alerted(sink) == uninterrupted()


def test_a_revoked_partition_loses_its_state_and_restore_and_lag_counts_only_past_the_commit() -> None:
    kafka = Kafka(DATA)
    drain(worker(RestoringSource(kafka), Sink())[0], 12)
    loop, _ = worker(RestoringSource(kafka), Sink())
    assert loop.restorer.split(loop.source.poll_batch()) == [], "assigned: the first records are replayed"
    assert set(loop.restorer.restoring) == {(TOPIC, 0), (TOPIC, 1)}
    lags = loop.source.lag()
    committed = {key: offset for key, (offset, _) in kafka.committed.items()}
    assert loop.restorer.lags(lags) == {key: len(DATA[key[1]]) - committed[key] for key in lags}
    loop.on_revoke({(TOPIC, 0)})
    assert set(loop.restorer.restoring) == {(TOPIC, 1)} and (TOPIC, 0) not in loop.pipeline.windows.states


# -- core.Starts: the adapters' bookkeeping ----------------------------------------------------------------

def record(partition: int, offset: int) -> Record:
    return Record(TOPIC, partition, offset, None, b"")


def test_starts_holds_back_undecided_partitions_and_seeks_where_the_loop_says() -> None:
    clock, asked = FakeClock(), []

    def start(key: TopicKey, committed: int, metadata: str | None) -> int | None:
        asked.append((key, committed, metadata))
        return 3 if metadata else None

    starts = Starts(clock)
    starts.add([(TOPIC, 0)])
    assert not starts, "without a Restore nothing waits"
    starts.restore = Restore(start=start, metadata=lambda key, offset: None)
    starts.add([(TOPIC, 0), (TOPIC, 1), (TOPIC, 2)])
    kept = starts.hold_back([record(0, 10), record(1, 7), record(1, 8), record(2, 5), record(3, 1), record(4, 2)],
                            assigned={(TOPIC, 0), (TOPIC, 1), (TOPIC, 2), (TOPIC, 3)})
    assert kept == [record(3, 1)], "partition 4 was revoked: its record is dropped"
    seeks = starts.decide({(TOPIC, 0): (10, "w1:3::0"), (TOPIC, 1): (7, None)})
    assert seeks == {(TOPIC, 0): 3, (TOPIC, 1): 7}, "to the point; back to the committed offset (records held)"
    assert asked == [((TOPIC, 0), 10, "w1:3::0"), ((TOPIC, 1), 7, None)]
    assert (TOPIC, 2) in starts and starts.due() == [] and starts.asked_before([(TOPIC, 2)])
    clock.advance(START_RETRY_S)
    assert starts.due() == [(TOPIC, 2)]
    assert starts.decide({(TOPIC, 2): (-1001, None)}) == {(TOPIC, 2): 5}, "nothing committed: the first held back"
    assert not starts


# -- the sources and the transactional sink ----------------------------------------------------------------

def settings(**overrides: Any) -> Settings:
    return Settings(model=Path("m"), bootstrap_servers="127.0.0.1:1", input_topic=TOPIC, alert_topic="al",
                    dead_letter_topic="dl", group_id="g", **{"max_wait_ms": 0, **overrides})


class Message:
    def __init__(self, partition: int, offset: int) -> None:
        self.part, self.at = partition, offset

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self.part

    def offset(self) -> int:
        return self.at

    def key(self) -> None:
        return None

    def value(self) -> bytes:
        return b"{}"

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)

    def headers(self) -> None:
        return None


class ConfluentConsumer:
    """Assigns partitions 0 and 1 when subscribed; answers `committed` with metadata; records the rest."""

    def __init__(self, committed: dict[int, tuple[int, str]]) -> None:
        self.stored = committed
        self.messages: list[Message] = []
        self.calls: list[tuple[str, Any]] = []
        self.conf: dict[str, Any] = {}

    def made(self, conf: dict[str, Any]) -> ConfluentConsumer:
        self.conf = conf
        return self

    def list_topics(self, timeout: float) -> None:
        return None

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def assign_now(self) -> None:
        self.callbacks["on_assign"](self, [ConfluentPartition(TOPIC, 0), ConfluentPartition(TOPIC, 1)])

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        out, self.messages = self.messages, []
        return out

    def committed(self, partitions: list, timeout: float) -> list:
        return [SimpleNamespace(topic=tp.topic, partition=tp.partition, error=None,
                                offset=self.stored.get(tp.partition, (-1001, ""))[0],
                                metadata=self.stored.get(tp.partition, (-1001, ""))[1]) for tp in partitions]

    def incremental_unassign(self, partitions: list) -> None:
        self.calls.append(("unassign", [tp.partition for tp in partitions]))

    def incremental_assign(self, partitions: list) -> None:
        self.calls.append(("assign", [(tp.partition, tp.offset) for tp in partitions]))

    def commit(self, offsets: list, asynchronous: bool) -> None:
        self.calls.append(("commit", [(tp.partition, tp.offset, tp.metadata) for tp in offsets]))

    def close(self) -> None:
        self.calls.append(("close", None))


def test_confluent_source_starts_assigned_partitions_where_the_loop_says_and_commits_restore_points() -> None:
    consumer = ConfluentConsumer({0: (50, "w1:20:1750000000000:0"), 1: (9, "")})
    source = ConfluentSource(settings(), consumer_factory=consumer.made, clock=FakeClock())
    decided: list[tuple[TopicKey, int, str | None]] = []

    def start(key: TopicKey, committed: int, metadata: str | None) -> int | None:
        decided.append((key, committed, metadata))
        point = RestorePoint.decode(metadata)
        return point.offset if point else None

    source.restore_with(Restore(start=start, metadata=lambda key, offset: f"w1:{offset - 1}::0"))
    consumer.assign_now()
    consumer.messages = [Message(0, 50), Message(1, 9), Message(1, 10)]
    assert source.poll_batch() == [], "nothing of an undecided partition is handed out"
    assert decided == [((TOPIC, 0), 50, "w1:20:1750000000000:0"), ((TOPIC, 1), 9, None)]
    assert consumer.calls == [("unassign", [0, 1]), ("assign", [(0, 20), (1, 9)])], \
        "partition 0 from its restore point; partition 1 back to its committed offset (records were held back)"
    consumer.messages = [Message(0, 20), Message(1, 9)]
    assert [(r.partition, r.offset) for r in source.poll_batch()] == [(0, 20), (1, 9)]
    source.commit({(TOPIC, 0): 21})
    assert consumer.calls[-1] == ("commit", [(0, 21, "w1:20::0")])
    source.close()
    assert consumer.calls[-2:] == [("commit", [(0, 21, "w1:20::0")]), ("close", None)], \
        "the final synchronous commit of an unconfirmed offset keeps its metadata"


def test_confluent_source_restores_again_a_partition_its_start_guard_restarts() -> None:
    consumer = ConfluentConsumer({0: (50, "w1:20::0")})
    source = ConfluentSource(settings(), consumer_factory=consumer.made, clock=FakeClock())
    source.restore_with(Restore(start=lambda key, committed, metadata: 20, metadata=lambda key, offset: None))
    consumer.assign_now()
    source.poll_batch()
    assert not source._starts
    source.start_guard.on_restart([(TOPIC, 0)])  # e.g. re-added at its committed offset after a stall
    assert (TOPIC, 0) in source._starts


class PythonConsumer:
    def __init__(self, committed: dict[int, OffsetAndMetadata | None]) -> None:
        self.stored = committed
        self.seeks: list[tuple[int, int]] = []
        self.commits: list[dict] = []

    def committed(self, partition: PythonPartition, metadata: bool, timeout_ms: int) -> OffsetAndMetadata | None:
        assert metadata
        return self.stored.get(partition.partition)

    def seek(self, partition: PythonPartition, offset: int) -> None:
        self.seeks.append((partition.partition, offset))

    def commit(self, offsets: dict, timeout_ms: int) -> None:
        self.commits.append({tp.partition: (m.offset, m.metadata) for tp, m in offsets.items()})

    def assignment(self) -> set[PythonPartition]:
        return {PythonPartition(TOPIC, 0), PythonPartition(TOPIC, 1)}

    def group_metadata(self) -> SimpleNamespace:
        from kafka.structs import MemberState
        return SimpleNamespace(state=MemberState.STABLE)


def test_kafka_python_source_seeks_to_the_restore_point_and_commits_restore_points() -> None:
    source = KafkaSource.__new__(KafkaSource)
    source.settings, source.starts = settings(kafka_client="kafka-python"), Starts(FakeClock())
    # librdkafka's metadata ends in a NUL that kafka-python keeps: a group the confluent client committed for.
    consumer = PythonConsumer({0: OffsetAndMetadata(50, "w1:20::0\x00", -1), 1: None})
    source.consumer = consumer
    seen: list[tuple[TopicKey, int, str | None]] = []

    def start(key: TopicKey, committed: int, metadata: str | None) -> int | None:
        seen.append((key, committed, metadata))
        point = RestorePoint.decode(metadata)
        return point.offset if point else None

    source.restore_with(Restore(start=start, metadata=lambda key, offset: f"w1:{offset}::0"))
    kept = source._start_undecided([Record(TOPIC, 0, 50, None, b""), Record(TOPIC, 1, 0, None, b"")])
    assert kept == [] and seen == [((TOPIC, 0), 50, "w1:20::0"), ((TOPIC, 1), -1, None)]
    assert sorted(consumer.seeks) == [(0, 20), (1, 0)]
    source.commit({(TOPIC, 0): 60})
    assert consumer.commits == [{0: (60, "w1:60::0")}]


def test_the_transactional_sink_sends_each_offset_with_its_restore_point() -> None:
    sent: list[list[tuple[int, int, str | None]]] = []

    class Producer:
        def __init__(self, conf: dict[str, Any]) -> None: ...
        def list_topics(self, timeout: float) -> None: ...
        def init_transactions(self, timeout: float) -> None: ...
        def begin_transaction(self) -> None: ...
        def commit_transaction(self, timeout: float) -> None: ...

        def send_offsets_to_transaction(self, offsets: list, group: Any, timeout: float) -> None:
            sent.append([(tp.partition, tp.offset, tp.metadata) for tp in offsets])

    sink = ConfluentTransactionalSink(settings(delivery="exactly-once"), lambda: None, producer_factory=Producer)
    sink.publish_and_commit([], [], {(TOPIC, 0): 8})
    sink.restore_with(Restore(start=lambda *_: None, metadata=lambda key, offset: f"w1:{offset - 5}::0"))
    sink.publish_and_commit([], [], {(TOPIC, 0): 9, (TOPIC, 1): 4})
    assert sent == [[(0, 8, None)], [(0, 9, "w1:4::0"), (1, 4, "w1:-1::0")]]


def test_restorer_ignores_a_point_past_the_committed_offset_and_a_model_without_windows() -> None:
    windows = PartitionWindows(SPEC, 1000, None)
    restorer = Restorer(lambda: windows, lambda records: None)
    assert restorer.start((TOPIC, 0), 10, "w1:12::0") is None, "offsets reset by hand: start empty"
    assert restorer.start((TOPIC, 0), 10, "w1:4:1750000000000:0") == 4
    assert restorer.restoring[(TOPIC, 0)].until == 10
    plain = Restorer(lambda: None, lambda records: None)
    assert plain.start((TOPIC, 0), 10, "w1:4::0") is None and plain.metadata((TOPIC, 0), 10) is None


def test_replayed_records_are_gathered_into_chunks_and_those_of_a_revoked_partition_dropped() -> None:
    windows, chunks = PartitionWindows(SPEC, 1000, None), []
    restorer = Restorer(lambda: windows, lambda records: chunks.append([(r.partition, r.offset) for r in records]))
    values = stream(0, 40)
    assert restorer.start((TOPIC, 0), 30, "w1:0::0") == 0 and restorer.start((TOPIC, 1), 30, "w1:0::0") == 0
    polled = [Record(TOPIC, p, o, None, values[o]) for o in range(10) for p in (0, 1)]
    assert restorer.split(polled) == [] and chunks == [], "gathered, not replayed yet"
    restorer.revoke({(TOPIC, 1)})
    live = restorer.split([Record(TOPIC, 0, o, None, values[o]) for o in range(10, 32)])
    assert [r.offset for r in live] == [30, 31]
    assert chunks == [[(0, o) for o in range(30)]], "one chunk, before any record of the partition is scored"
    assert not restorer
