"""Training data from Kafka: a bounded window of events, under the same data contract as files.

The records come through the worker's topic reader (worker/kafka/reader.py), so either Kafka client
(`--kafka-client`) with the worker's security settings reads the same records in the same order; the window
is a pure function of them. It is fixed when reading starts: from `since` (or the beginning of each
partition) up to each partition's end offset at that moment, at most `max_events` events in all; records
are decoded exactly as the worker decodes them (`--value-format`: JSON, or a schema registry format), and
records that do not decode to events are skipped and counted (a stream's dead letters), never trained on.
`skip_contract_breaches` then skips, and counts by reason, the events whose values break the data
contract (`training.contract`) under the kinds training infers, such as an array where a feature
belongs: the worker would dead-letter them, so a file would be refused but a stream is not.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from training.contract import Invalid, build_columns
from training.data import infer_kinds, object_frame, raw_values
from training.errors import DataError
from training.value_formats import Decoder, JsonDecoder, RegistryUnavailable
from worker.kafka.clients import open_reader
from worker.kafka.connection import Connection
from worker.kafka.core import describe
from worker.kafka.reader import ReadError, TopicReader, WindowTooSlow
from worker.kafka.reader import read_window as read_records

MAX_EVENT_BYTES = 1_048_576


@dataclass(frozen=True)
class Window:
    """The events of a window as a frame, their digest, and what was skipped (by reason).

    `values` and `positions` are each event's record value and (partition, offset), row by row: what the
    digest covers and what a skip names; `timestamps_ms` each record's timestamp (window features read it
    for `--event-time @record`).
    """

    frame: pd.DataFrame
    sha256: str
    skipped: Counter[str]
    source: str
    values: list[bytes] = field(repr=False)
    positions: list[tuple[int, int]] = field(repr=False)
    timestamps_ms: list[int | None] = field(default_factory=list, repr=False)
    events: list[dict[str, Any]] = field(default_factory=list, repr=False)  # each value decoded


def read_window(connection: Connection, topic: str, max_events: int, since_ms: int | None = None,
                open_topic_reader: Callable[[Connection], TopicReader] = open_reader,
                decoder: Decoder | None = None) -> Window:
    """Read a bounded window of `topic` (partitions in order, offsets ascending within each).

    `connection`: where Kafka is, which client and the worker's security settings (TLS, SASL); the principal
    needs READ on `topic` and no group ACL (no consumer group is used). `decoder`: the `--value-format`'s
    (training/value_formats.py; JSON by default), as the worker decodes; a schema registry that does not
    answer stops the command with a one-line error (nothing is trained on part of a window).
    """
    decoder = JsonDecoder() if decoder is None else decoder
    if max_events < 1:
        raise DataError(f"--max-events must be at least 1, got {max_events}")
    source = f"kafka:{topic}"
    rows: list[dict[str, Any]] = []
    values: list[bytes] = []
    positions: list[tuple[int, int]] = []
    timestamps: list[int | None] = []
    skipped: Counter[str] = Counter()
    try:
        reader = open_topic_reader(connection)
        try:
            for message in read_records(reader, topic, max_events, since_ms, max(connection.timeout_s, 1.0) * 10):
                event = decoder.decode([message.value], MAX_EVENT_BYTES)[0]
                if isinstance(event, Invalid):
                    skipped[event.reason.value] += 1
                    continue
                rows.append(event)
                values.append(message.value or b"")
                positions.append((message.partition, message.offset))
                timestamps.append(message.timestamp_ms)
        finally:
            reader.close()
    except WindowTooSlow as exc:
        raise DataError(f"{source}: {exc}; use a smaller --max-events") from exc
    except ReadError as exc:
        raise DataError(f"{source}: {exc}") from exc
    except RegistryUnavailable as exc:
        raise DataError(f"{source}: {exc}; nothing was trained, run it again when the registry answers") from None
    if not rows:
        raise DataError(f"{source}: the window holds no {decoder.value_format} events "
                        f"(skipped: {dict(skipped) or 'none'})")
    return Window(frame=object_frame(rows), sha256=_digest(values), skipped=skipped, source=source, values=values,
                  positions=positions, timestamps_ms=timestamps, events=rows)


def skip_contract_breaches(window: Window, ignored: Sequence[str], categorical: Sequence[str],
                           log: Callable[[str], None] = print) -> Window:
    """The window without the events whose values break the data contract, counted by reason in `skipped`.

    The feature columns are the frame's columns less `ignored` (--drop and the label column), their kinds
    those training infers (`--categorical` first). Skipping a row can change an inferred kind, so this
    repeats until no row breaks the contract. One line per reason names the first such record.
    """
    frame, values, positions, skipped = window.frame, window.values, window.positions, Counter(window.skipped)
    events = window.events
    timestamps = window.timestamps_ms
    first: dict[str, str] = {}
    while True:
        features = frame.drop(columns=[name for name in ignored if name in frame.columns])
        if features.shape[1] == 0:  # training says what is wrong with that
            break
        kinds = infer_kinds(features, categorical)
        problems = build_columns({name: raw_values(features[name]) for name in kinds}, kinds, len(features)).problems
        if not problems:
            break
        for row, problem in problems.items():
            skipped[problem.reason.value] += 1
            partition, offset = positions[row]
            first.setdefault(problem.reason.value, f"{describe(window.source, partition, offset)}: {problem.message}")
        keep = [row for row in range(len(frame)) if row not in problems]
        values, positions = [values[row] for row in keep], [positions[row] for row in keep]
        timestamps = [timestamps[row] for row in keep] if timestamps else timestamps
        events = [events[row] for row in keep]
        frame = object_frame(events)  # as if the skipped records were never read
    if len(frame) == len(window.frame):
        return window
    for reason, example in first.items():
        log(f"skipped {skipped[reason] - window.skipped[reason]} events that break the data contract "
            f"({reason}), as the worker would dead-letter them; the first: {example}")
    if frame.empty:
        raise DataError(f"{window.source}: no event of the window fits the data contract "
                        f"(skipped: {dict(skipped)})")
    return replace(window, frame=frame, sha256=_digest(values), skipped=skipped, values=values, positions=positions,
                   timestamps_ms=timestamps, events=events)


def _digest(values: Sequence[bytes]) -> str:
    """SHA-256 of the record values trained on, in window order."""
    digest = hashlib.sha256()
    for value in values:
        digest.update(value)
    return digest.hexdigest()


def parse_since(text: str, now_s: float | None = None) -> int:
    """`--since`: an ISO-8601 time, or a duration back from now such as 90m, 24h or 7d -> epoch ms."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    now_s = time.time() if now_s is None else now_s
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        return int((now_s - float(text[:-1]) * units[text[-1]]) * 1000)
    from datetime import UTC, datetime

    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise DataError(f"--since {text!r}: expected an ISO-8601 time or a duration like 24h, 90m, 7d") from exc
    return int((parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp() * 1000)
