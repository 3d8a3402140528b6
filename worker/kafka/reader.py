"""Reading a topic without a consumer group, for the side paths: the feedback reader follows a topic from the
beginning, anomaly-train --from-kafka reads a bounded window.

`TopicReader` is the one small interface; each client has a thin adapter (`reader_confluent.py`,
`reader_kafka_python.py`) that only translates calls and errors, and `clients.open_reader` picks one. The loops
that use it are written once, here, so both clients read the same records in the same order. No consumer group
is joined and nothing is committed: the principal needs READ on the topic only (docs/security.md).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from worker.errors import WorkerError
from worker.kafka.core import Clock

log = logging.getLogger(__name__)


class ReadError(WorkerError):
    """Reading failed; the message says why (an unreachable broker, a missing ACL, a refused login)."""


class WindowTooSlow(ReadError):
    """A bounded window was not read within its time."""


@dataclass(frozen=True)
class Message:
    partition: int
    offset: int
    value: bytes | None
    timestamp_ms: int | None = None  # the record's timestamp (None when the broker has none)


class TopicReader(Protocol):
    """One client's consumer, assigned partitions by hand. Every method raises ReadError for the client's errors."""

    def partitions(self, topic: str) -> list[int] | None:
        """The topic's partitions in order; None when there is no such topic (yet)."""

    def bounds(self, topic: str, partitions: list[int], since_ms: int | None) -> dict[int, tuple[int, int]]:
        """(start, end) offset per partition: start is the first offset at or after `since_ms` (end when there
        is none), or the beginning without it; end is the next offset to be written now."""

    def assign(self, topic: str, starts: Mapping[int, int]) -> None:
        """Read these partitions (only these) from these offsets."""

    def poll(self, timeout_s: float) -> list[Message]:
        """The next records (of assigned partitions, offsets ascending within each); [] after `timeout_s`."""

    def position(self, topic: str, partition: int) -> int:
        """The offset of the next record of an assigned partition: past every record and marker read so far."""

    def close(self) -> None: ...


def read_window(reader: TopicReader, topic: str, limit: int, since_ms: int | None = None,
                timeout_s: float = 300.0, clock: Clock = time.monotonic) -> Iterator[Message]:
    """The records of `topic` from `since_ms` (or the beginning) up to each partition's end when called, at
    most `limit` of them: partition by partition in order, offsets ascending within each (a deterministic
    order). ReadError when there is no such topic or it takes longer than `timeout_s`."""
    partitions = reader.partitions(topic)
    if not partitions:
        raise ReadError("no such topic (or it has no partitions)")
    bounds = reader.bounds(topic, partitions, since_ms)
    deadline, read = clock() + timeout_s, 0
    for partition in partitions:
        start, end = bounds[partition]
        if start >= end:
            continue
        reader.assign(topic, {partition: start})
        while read < limit and reader.position(topic, partition) < end:
            if clock() > deadline:
                raise WindowTooSlow(f"reading the window took longer than {timeout_s:g} s")
            for message in reader.poll(1.0):
                if message.partition != partition or message.offset >= end or read >= limit:
                    break
                yield message
                read += 1


def follow(reader: TopicReader, topic: str, on_message: Callable[[Message], object], stop: threading.Event,
           topic_wait_s: float, poll_s: float = 0.5) -> None:
    """Feed every record of `topic`, from the beginning of each partition, to `on_message` until `stop` is set.

    A topic that does not exist yet is asked for again every `topic_wait_s`.
    """
    partitions = None
    while not partitions:
        if stop.is_set():
            return
        partitions = reader.partitions(topic)
        if not partitions:
            stop.wait(topic_wait_s)
    reader.assign(topic, {partition: start for partition, (start, _end) in
                          reader.bounds(topic, partitions, None).items()})
    log.info("reading %s from the beginning (%d partitions)", topic, len(partitions))
    while not stop.is_set():
        for message in reader.poll(poll_s):
            on_message(message)
