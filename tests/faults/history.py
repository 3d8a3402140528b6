"""The history checker: every input record against every alert and dead letter the worker published.

With a bundle that alerts on every scored event, each input record must come out exactly once, as
one alert or one dead letter, named by its source coordinates (`topic`, `partition`, `offset`):

- **lost**: an input record with neither an alert nor a dead letter;
- **duplicated**: an input record with more than one output (at-least-once allows these);
- **conflicting**: a duplicated input record whose outputs differ (another alert id, or an alert and a
  dead letter): a duplicate must be the same output again, so a consumer can drop it by id;
- **unexpected**: an output naming no input record, or disagreeing with the one it names (an alert id
  not of the form `{model_version}/{topic}/{partition}/{offset}` of its source, another event id).

`check` is pure (unit-tested on hand-made histories in tests/unit/test_fault_history.py);
`read_history` reads the three topics from a real cluster with `isolation.level=read_committed`.

Example::

    verdict = check(*read_history(bootstrap, "events", "alerts", "dlq"))
    assert not verdict.problems("exactly-once"), verdict.summary()
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import orjson
from confluent_kafka import Consumer, IsolationLevel, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from tests.kafka_broker import wait_for

AT_LEAST_ONCE = "at-least-once"
EXACTLY_ONCE = "exactly-once"
DELIVERY_MODES = (AT_LEAST_ONCE, EXACTLY_ONCE)

#: (topic, partition, offset) of an input record.
Coord = tuple[str, int, int]


@dataclass(frozen=True)
class InputRecord:
    coord: Coord
    event_id: str | None  # the event's `id`; None when the value is not a JSON object with one


@dataclass(frozen=True)
class Output:
    """One alert or dead letter, reduced to what the checker compares."""

    kind: str               # "alert" or "dead_letter"
    where: str              # its own place, `topic[partition]@offset`, for reports
    source: Coord | None    # the input record it names; None if it names none readably
    output_id: str          # the alert id, or `dead_letter:{reason}`
    event_id: str | None = None  # alerts only: the event id the document carries


def alert_output(value: bytes | None, where: str) -> Output:
    """An alert document as published on the alert topic."""
    try:
        document = orjson.loads(value or b"")
        source = document["source"]
        coord: Coord | None = (str(source["topic"]), int(source["partition"]), int(source["offset"]))
        output_id = str(document["alert_id"])
        event_id = document.get("event_id")
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return Output("alert", where, None, f"unreadable:{where}")
    return Output("alert", where, coord, output_id, None if event_id is None else str(event_id))


def dead_letter_output(headers: Sequence[tuple[str, bytes | None]], where: str) -> Output:
    """A dead letter: its `dlq.*` headers name the source record (the last value of a name wins)."""
    named = {name: (value or b"").decode("utf-8", "replace") for name, value in headers}
    try:
        coord: Coord | None = (named["dlq.source.topic"], int(named["dlq.source.partition"]),
                               int(named["dlq.source.offset"]))
    except (KeyError, ValueError):
        coord = None
    return Output("dead_letter", where, coord, f"dead_letter:{named.get('dlq.reason', '?')}")


def input_record(topic: str, partition: int, offset: int, value: bytes | None) -> InputRecord:
    try:
        event = orjson.loads(value or b"")
    except orjson.JSONDecodeError:
        event = None
    event_id = event.get("id") if isinstance(event, dict) else None
    return InputRecord((topic, partition, offset), None if event_id is None else str(event_id))


@dataclass(frozen=True)
class Verdict:
    inputs: int
    outputs: int
    lost: list[Coord]
    duplicated: dict[Coord, list[Output]]
    conflicting: dict[Coord, list[Output]]
    unexpected: list[tuple[Output, str]]  # the output and why

    @property
    def extra_outputs(self) -> int:
        """Outputs beyond one per input record (how many duplicates a consumer would see)."""
        return sum(len(outs) - 1 for outs in self.duplicated.values())

    def problems(self, delivery: str) -> list[str]:
        """What breaks the guarantee of `delivery`: exactly-once allows nothing, at-least-once duplicates."""
        if delivery not in DELIVERY_MODES:
            raise ValueError(f"delivery must be one of {', '.join(DELIVERY_MODES)}, got {delivery!r}")
        out = []
        if self.lost:
            out.append(f"{len(self.lost)} input records lost, e.g. {_coords(self.lost[:5])}")
        if self.unexpected:
            out.append(f"{len(self.unexpected)} unexpected outputs, e.g. "
                       + "; ".join(f"{o.where} ({why})" for o, why in self.unexpected[:5]))
        if self.conflicting:
            out.append(f"{len(self.conflicting)} input records with differing outputs, e.g. "
                       + "; ".join(f"{_coords([c])}: {[o.output_id for o in outs]}"
                                   for c, outs in list(self.conflicting.items())[:5]))
        if delivery == EXACTLY_ONCE and self.duplicated:
            out.append(f"{len(self.duplicated)} input records published more than once "
                       f"({self.extra_outputs} extra outputs), e.g. {_coords(list(self.duplicated)[:5])}")
        return out

    def summary(self) -> str:
        return (f"{self.inputs} inputs, {self.outputs} outputs: lost {len(self.lost)}, duplicated "
                f"{len(self.duplicated)} ({self.extra_outputs} extra outputs), conflicting {len(self.conflicting)}, "
                f"unexpected {len(self.unexpected)}")


def check(inputs: Iterable[InputRecord], alerts: Iterable[Output], dead_letters: Iterable[Output]) -> Verdict:
    """Match every output to the input record it names; see the module docstring for the verdicts."""
    by_coord: dict[Coord, InputRecord] = {}
    for record in inputs:
        if record.coord in by_coord:
            raise ValueError(f"input record {_coords([record.coord])} given twice")
        by_coord[record.coord] = record
    matched: dict[Coord, list[Output]] = defaultdict(list)
    unexpected: list[tuple[Output, str]] = []
    outputs = 0
    for output in [*alerts, *dead_letters]:
        outputs += 1
        why = _mismatch(output, by_coord)
        if why:
            unexpected.append((output, why))
        else:
            assert output.source is not None
            matched[output.source].append(output)
    duplicated = {c: outs for c, outs in matched.items() if len(outs) > 1}
    conflicting = {c: outs for c, outs in duplicated.items()
                   if len({(o.kind, o.output_id) for o in outs}) > 1}
    lost = sorted(c for c in by_coord if c not in matched)
    return Verdict(len(by_coord), outputs, lost, duplicated, conflicting, unexpected)


def _mismatch(output: Output, inputs: dict[Coord, InputRecord]) -> str:
    """Why `output` does not belong to the input record it names ("" if it does)."""
    if output.source is None:
        return "names no source record"
    record = inputs.get(output.source)
    if record is None:
        return f"source {_coords([output.source])} is no input record"
    if output.kind == "alert":
        topic, partition, offset = output.source
        if not output.output_id.endswith(f"/{topic}/{partition}/{offset}"):
            return f"alert id {output.output_id!r} is not that of its source"
        if output.event_id != record.event_id:
            return f"event id {output.event_id!r}, but the source record holds {record.event_id!r}"
    return ""


def _coords(coords: Iterable[Coord]) -> str:
    return ", ".join(f"{t}[{p}]@{o}" for t, p, o in coords)


# -- reading a real cluster --------------------------------------------------------------------------

def read_history(bootstrap: str, input_topic: str, alert_topic: str, dead_letter_topic: str,
                 timeout: float = 120) -> tuple[list[InputRecord], list[Output], list[Output]]:
    """Every input record, alert and dead letter, read to the end with `isolation.level=read_committed`.

    1. Wait (up to `timeout`) until no output partition has an open transaction (last stable offset =
       high watermark): a transaction still open (a zombie's, until it is fenced or times out) would
       hide records that may yet commit or abort.
    2. Read each topic from the beginning to its end offsets.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    outputs = [alert_topic, dead_letter_topic]
    wait_for(lambda: _settled(admin, outputs), timeout, f"no open transaction on {outputs}", interval=0.5)
    inputs = [input_record(*r[:3], r[3]) for r in _read_to_end(bootstrap, admin, input_topic, timeout)]
    alerts = [alert_output(value, f"{t}[{p}]@{o}") for t, p, o, value, _h in
              _read_to_end(bootstrap, admin, alert_topic, timeout)]
    letters = [dead_letter_output(headers, f"{t}[{p}]@{o}") for t, p, o, _v, headers in
               _read_to_end(bootstrap, admin, dead_letter_topic, timeout)]
    return inputs, alerts, letters


def _partitions(admin: AdminClient, topic: str) -> list[TopicPartition]:
    metadata = admin.list_topics(topic, timeout=30).topics[topic]
    if metadata.error is not None:
        raise KafkaException(metadata.error)
    return [TopicPartition(topic, p) for p in sorted(metadata.partitions)]


def _end_offsets(admin: AdminClient, tps: list[TopicPartition], isolation: IsolationLevel) -> dict[int, int]:
    futures = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, isolation_level=isolation,
                                 request_timeout=30)
    return {tp.partition: future.result().offset for tp, future in futures.items()}


def _settled(admin: AdminClient, topics: list[str]) -> bool:
    try:
        for topic in topics:
            tps = _partitions(admin, topic)
            if (_end_offsets(admin, tps, IsolationLevel.READ_COMMITTED)
                    != _end_offsets(admin, tps, IsolationLevel.READ_UNCOMMITTED)):
                return False
    except KafkaException:
        return False  # a leader moving: ask again
    return True


def _read_to_end(bootstrap: str, admin: AdminClient, topic: str, timeout: float,
                 ) -> list[tuple[str, int, int, bytes | None, list[tuple[str, bytes | None]]]]:
    """(topic, partition, offset, value, headers) of every committed record below the current end offsets."""
    tps = _partitions(admin, topic)
    ends = _end_offsets(admin, tps, IsolationLevel.READ_COMMITTED)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"history-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "enable.partition.eof": True})
    out = []
    try:
        consumer.assign([TopicPartition(tp.topic, tp.partition, 0) for tp in tps])
        # A partition is read once the consumer reached its end (EOF), or holds nothing at all.
        todo = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topic} to its end offsets {ends} in {timeout:g}s")
            for message in consumer.consume(num_messages=10_000, timeout=0.5):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        if message.offset() >= ends[message.partition()]:
                            todo.discard(message.partition())
                        continue
                    raise KafkaException(error)
                if message.offset() < ends[message.partition()]:
                    out.append((topic, message.partition(), message.offset(), message.value(),
                                list(message.headers() or [])))
    finally:
        consumer.close()
    return out
