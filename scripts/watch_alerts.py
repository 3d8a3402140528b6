"""Print alerts from the alert topic as one readable line each (demo helper).

Usage: python scripts/watch_alerts.py --bootstrap-servers HOST:PORT --topic alerts [--limit N] [--timeout-s S]
"""

from __future__ import annotations

import argparse
import time

import orjson
from kafka import KafkaConsumer


def line(alert: dict) -> str:
    top = ", ".join(f"{f['field']}={f['observed']} (expected {f['expected']}, {f['share']:.0%})"
                    for f in alert["top_features"])
    src = alert["source"]
    return (f"ALERT {src['topic']}[{src['partition']}]@{src['offset']} event {alert['event_id']}: "
            f"score {alert['score']:.4g} = {alert['score_ratio']:.1f}x threshold; {top}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bootstrap-servers", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--limit", type=int, default=15, help="alerts to print in full (then only a count)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="stop after this long without new alerts")
    args = p.parse_args()
    consumer = KafkaConsumer(args.topic, bootstrap_servers=args.bootstrap_servers.split(","),
                             auto_offset_reset="earliest", consumer_timeout_ms=int(args.timeout_s * 1000))
    seen = 0
    started = time.monotonic()
    for message in consumer:
        seen += 1
        if seen <= args.limit:
            print(line(orjson.loads(message.value)), flush=True)
        elif seen % 500 == 0:
            print(f"... {seen} alerts so far ({time.monotonic() - started:.0f} s)", flush=True)
    print(f"{seen} alerts received on {args.topic}", flush=True)
    consumer.close()


if __name__ == "__main__":
    main()
