"""Training data from Kafka: a bounded window of JSON events, under the same data contract as files.

The only module of the training package that imports `kafka`. The window is fixed when reading
starts: from `since` (or the beginning of each partition) up to each partition's end offset at that
moment, at most `max_events` events in all; records are decoded exactly as the worker decodes them,
and records that are not JSON objects are skipped and counted (a stream's dead letters), never trained on.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from training.contract import Invalid, decode_event
from training.data import object_frame
from training.errors import DataError

MAX_EVENT_BYTES = 1_048_576


@dataclass(frozen=True)
class Window:
    """The events of a window as a frame, their digest, and what was skipped (by reason)."""

    frame: pd.DataFrame
    sha256: str
    skipped: Counter[str]
    source: str


def read_window(bootstrap_servers: str, topic: str, max_events: int, since_ms: int | None = None,
                timeout_s: float = 30.0) -> Window:
    """Read a bounded window of `topic` (partitions in order, offsets ascending within each)."""
    if max_events < 1:
        raise DataError(f"--max-events must be at least 1, got {max_events}")
    source = f"kafka:{topic}"
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap_servers.split(","), group_id=None,
                                 enable_auto_commit=False, request_timeout_ms=int(timeout_s * 1000),
                                 client_id="anomaly-train")
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
        digest = hashlib.sha256()
        rows: list[dict[str, Any]] = []
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
                    digest.update(message.value or b"")
                    rows.append(event)
    except KafkaError as exc:
        raise DataError(f"{source}: reading failed ({exc})") from exc
    finally:
        consumer.close()
    if not rows:
        raise DataError(f"{source}: the window holds no JSON events (skipped: {dict(skipped) or 'none'})")
    return Window(frame=object_frame(rows), sha256=digest.hexdigest(), skipped=skipped, source=source)


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
