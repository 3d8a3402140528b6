"""anomaly-replay: produce the rows of a CSV/JSONL/Parquet file as JSON events, for demos and load tests.

It takes the worker's `--bootstrap-servers`, `--kafka-client` and Kafka security flags (`--security-protocol`,
`--sasl-*`, `--ssl-*`; the password from `--sasl-password-file` or `ANOMALY_SASL_PASSWORD`), each also from its
variable (docs/settings.md); its principal needs WRITE on `--topic` (docs/security.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from training.data import iter_frames
from training.errors import AnomalyError
from worker.config import add_security_arguments, env_fallback
from worker.kafka.clients import open_producer
from worker.kafka.connection import Connection
from worker.kafka.producer import SendError

DEFAULT_SERVERS = "127.0.0.1:9092"


def events(path: Path, limit: int | None, key_column: str | None) -> Iterator[tuple[bytes | None, bytes]]:
    """(key, JSON value) per row; NaN becomes null; an `id` (row number) is added when the row has none."""
    sent = 0
    for first_row, chunk in iter_frames(path, 10_000):
        for i, row in enumerate(chunk.to_dict(orient="records")):
            if limit is not None and sent >= limit:
                return
            event: dict[str, Any] = {str(k): _plain(v) for k, v in row.items()}
            event.setdefault("id", first_row + i)
            key = None if key_column is None else str(event.get(key_column)).encode()
            yield key, orjson.dumps(event)
            sent += 1


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if not math.isfinite(number):
            return value
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value.item() if hasattr(value, "item") else value


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anomaly-replay", description=__doc__,
                                epilog=f"--bootstrap-servers defaults to {DEFAULT_SERVERS}.")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    p.add_argument("--limit", type=int, help="stop after this many events")
    p.add_argument("--key-column", help="use this column's value as the record key")
    p.add_argument("--timestamp", action="store_true", help="add the send time as `timestamp` (epoch ms)")
    add_security_arguments(lambda flag, **kw: p.add_argument(flag, **kw), with_servers=True)
    args = p.parse_args(argv)
    try:
        connection = Connection.from_args(env_fallback(args, os.environ), "anomaly-replay", DEFAULT_SERVERS)
        producer = open_producer(connection)
        try:
            started = time.monotonic()
            sent = 0
            for key, value in events(args.data, args.limit, args.key_column):
                if args.timestamp:
                    event = orjson.loads(value)
                    event["timestamp"] = int(time.time() * 1000)
                    value = orjson.dumps(event)
                if args.rate:
                    # Pace against the schedule, not per event, so the long-run rate is exact.
                    ahead = started + sent / args.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                producer.send(args.topic, key, value)
                sent += 1
            producer.flush(60)
        finally:
            producer.close()
        seconds = time.monotonic() - started
        print(f"sent {sent} events to {args.topic} in {seconds:.1f} s ({sent / max(seconds, 1e-9):,.0f} events/s)")
        return 0
    except SendError as exc:
        print(f"anomaly-replay: error: {exc}", file=sys.stderr)
        return 1
    except AnomalyError as exc:
        print(f"anomaly-replay: error: {exc}", file=sys.stderr)
        return 2

if __name__ == "__main__":
    sys.exit(main())
