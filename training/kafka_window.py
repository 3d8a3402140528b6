"""Training data from Kafka: a bounded window of JSON events, under the same data contract as files.

The only module of the training package that imports `kafka`. The window is fixed when reading
starts: from `since` (or the beginning of each partition) up to each partition's end offset at that
moment, at most `max_events` events in all; records are decoded exactly as the worker decodes them,
and records that are not JSON objects are skipped and counted (a stream's dead letters), never trained on.
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
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from training.contract import Invalid, build_columns, decode_event
from training.data import infer_kinds, object_frame, raw_values
from training.errors import DataError
from worker.config import KafkaSecurity

MAX_EVENT_BYTES = 1_048_576


@dataclass(frozen=True)
class Window:
    """The events of a window as a frame, their digest, and what was skipped (by reason).

    `values` and `positions` are each event's record value and (partition, offset), row by row: what the
    digest covers and what a skip names.
    """

    frame: pd.DataFrame
    sha256: str
    skipped: Counter[str]
    source: str
    values: list[bytes] = field(repr=False)
    positions: list[tuple[int, int]] = field(repr=False)


def read_window(bootstrap_servers: str, topic: str, max_events: int, since_ms: int | None = None,
                timeout_s: float = 30.0, security: KafkaSecurity | None = None) -> Window:
    """Read a bounded window of `topic` (partitions in order, offsets ascending within each).

    `security`: the worker's client security settings (TLS, SASL); the principal needs READ on `topic`
    and no group ACL (no consumer group is used).
    """
    if max_events < 1:
        raise DataError(f"--max-events must be at least 1, got {max_events}")
    source = f"kafka:{topic}"
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers.split(","), group_id=None,
                                 enable_auto_commit=False, request_timeout_ms=int(timeout_s * 1000),
                                 client_id="anomaly-train", **(security or KafkaSecurity()).client_options())
    except KafkaError as exc:
        raise DataError(f"{source}: cannot reach Kafka at {bootstrap_servers} ({exc})") from exc
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise DataError(f"{source}: no such topic on {bootstrap_servers}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        ends = consumer.end_offsets(tps)
        starts = consumer.beginning_offsets(tps)
        if since_ms is not None:
            found = consumer.offsets_for_times({tp: since_ms for tp in tps})
            starts = {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in tps}
        rows: list[dict[str, Any]] = []
        values: list[bytes] = []
        positions: list[tuple[int, int]] = []
        skipped: Counter[str] = Counter()
        deadline = time.monotonic() + max(timeout_s, 1.0) * 10
        for tp in tps:  # one partition at a time: a deterministic row order for the splits
            if starts[tp] >= ends[tp]:
                continue
            consumer.assign([tp])
            consumer.seek(tp, starts[tp])
            while consumer.position(tp) < ends[tp] and len(rows) + sum(skipped.values()) < max_events:
                if time.monotonic() > deadline:
                    raise DataError(f"{source}: reading the window took too long; use a smaller --max-events")
                for message in consumer.poll(timeout_ms=1000).get(tp, []):
                    if message.offset >= ends[tp] or len(rows) + sum(skipped.values()) >= max_events:
                        break
                    event = decode_event(message.value, MAX_EVENT_BYTES)
                    if isinstance(event, Invalid):
                        skipped[event.reason.value] += 1
                        continue
                    rows.append(event)
                    values.append(message.value or b"")
                    positions.append((tp.partition, message.offset))
    except KafkaError as exc:
        raise DataError(f"{source}: reading failed ({exc})") from exc
    finally:
        consumer.close()
    if not rows:
        raise DataError(f"{source}: the window holds no JSON events (skipped: {dict(skipped) or 'none'})")
    return Window(frame=object_frame(rows), sha256=_digest(values), skipped=skipped, source=source, values=values,
                  positions=positions)


def skip_contract_breaches(window: Window, ignored: Sequence[str], categorical: Sequence[str],
                           log: Callable[[str], None] = print) -> Window:
    """The window without the events whose values break the data contract, counted by reason in `skipped`.

    The feature columns are the frame's columns less `ignored` (--drop and the label column), their kinds
    those training infers (`--categorical` first). Skipping a row can change an inferred kind, so this
    repeats until no row breaks the contract. One line per reason names the first such record.
    """
    frame, values, positions, skipped = window.frame, window.values, window.positions, Counter(window.skipped)
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
            first.setdefault(problem.reason.value, f"{window.source}[{partition}]@{offset}: {problem.message}")
        keep = [row for row in range(len(frame)) if row not in problems]
        values, positions = [values[row] for row in keep], [positions[row] for row in keep]
        frame = object_frame([_event(value) for value in values])  # as if the skipped records were never read
    if len(frame) == len(window.frame):
        return window
    for reason, example in first.items():
        log(f"skipped {skipped[reason] - window.skipped[reason]} events that break the data contract "
            f"({reason}), as the worker would dead-letter them; the first: {example}")
    if frame.empty:
        raise DataError(f"{window.source}: no event of the window fits the data contract "
                        f"(skipped: {dict(skipped)})")
    return replace(window, frame=frame, sha256=_digest(values), skipped=skipped, values=values, positions=positions)


def _event(value: bytes) -> dict[str, Any]:
    """A record value of the window, decoded again (it decoded to an object when the window was read)."""
    event = decode_event(value, MAX_EVENT_BYTES)
    assert not isinstance(event, Invalid), "a window keeps only records that decode to JSON objects"
    return event


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
