"""Which codec the worker should use for alerts and dead letters: bytes sent and publish time per codec.

Run::

    .venv/bin/python -m benchmarks.output_compression [--alerts 20000] [--bootstrap-servers HOST:PORT]

1. Start a local broker (deploy/kafka/kafka-local.sh, unless `--bootstrap-servers`).
2. Build `--alerts` alert documents with the worker's own `build_alert` from the NSL-KDD sample rows
   (three explaining fields each, as the default `--top-features`), plus one dead letter per 50 alerts.
3. For each codec, publish them through the worker's sink (`ConfluentSink`, batches of 1000 as the loop
   does) to fresh topics; bytes sent are librdkafka's `txbytes` statistics for the producer.
4. Write `output_compression.json` and `.md` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.throughput import local_broker, sample_rows

REPO = Path(__file__).resolve().parents[1]
BATCH = 1000


def build_outputs(n: int) -> tuple[list[Any], list[Any]]:
    from training.contract import Reason
    from training.scoring import Contribution
    from worker.alerts import build_alert
    from worker.records import DeadLetter, Record

    rows = sample_rows()
    alerts, letters = [], []
    for i in range(n):
        row = {**rows[i % len(rows)], "id": f"flow-{i}"}
        record = Record("flows", i % 3, i, f"host-{i % 97}".encode(), b"", timestamp_ms=1_764_000_000_000 + i)
        fields = [k for k, v in row.items() if isinstance(v, int | float)][:3]
        contributions = [Contribution(field=f, share=0.5 / (j + 1), observed=float(row[f]), expected=0.25 * j).to_dict()
                         for j, f in enumerate(fields)]
        alerts.append(build_alert(record, row, 4.2 + i % 7, 1.5, "20261129T120000Z-0123abcd", contributions,
                                  1_764_000_001.0 + i))
        if i % 50 == 0:
            letters.append(DeadLetter(record=Record("flows", 0, i, None, json.dumps(row).encode()[:-5]),
                                      reason=Reason.INVALID_JSON, error="unexpected end of data", model_version="m"))
    return alerts, letters


def measure(bootstrap: str, codec: str, alerts: Sequence[Any], letters: Sequence[Any]) -> dict[str, Any]:
    from confluent_kafka import Producer

    from worker.config import Settings
    from worker.kafka.confluent import ConfluentSink

    stats: list[dict[str, Any]] = []
    topic = f"compression-{codec}-{uuid.uuid4().hex[:8]}"
    settings = Settings(model=Path("unused"), bootstrap_servers=bootstrap, input_topic=topic,
                        alert_topic=f"{topic}-alerts", dead_letter_topic=f"{topic}-dlq", group_id=topic,
                        compression=codec)
    sink = ConfluentSink(settings, producer_factory=lambda conf: Producer(
        {**conf, "statistics.interval.ms": 100, "stats_cb": lambda s: stats.append(json.loads(s))}))
    sink.publish(alerts[:10], [])  # topics created and metadata known before timing
    started = time.perf_counter()
    for i in range(0, len(alerts), BATCH):
        sink.publish(alerts[i:i + BATCH], letters[i // 50:(i + BATCH) // 50])
    seconds = time.perf_counter() - started
    stats.clear()
    deadline = time.monotonic() + 5
    while not stats and time.monotonic() < deadline:
        sink.producer.poll(0.2)
    sink.close()
    sent = sum(b["txbytes"] for b in stats[-1]["brokers"].values())
    payload = sum(len(json.dumps(a.document)) for a in alerts)
    return {"codec": codec, "bytes_sent": sent, "payload_bytes": payload, "seconds": seconds,
            "records_per_s": (len(alerts) + len(letters)) / seconds}


def render(report: dict[str, Any]) -> str:
    rows = report["codecs"]
    none = next(r for r in rows if r["codec"] == "none")
    lines = ["# Output compression (alerts and dead letters)", "",
             f"{report['alerts']:,} alert documents + {report['dead_letters']:,} dead letters through "
             f"`ConfluentSink`, batches of {BATCH}; bytes sent = librdkafka `txbytes` (requests to the broker, "
             "including protocol overhead). One local broker, same run.", "",
             "| codec | bytes sent | saved vs none | publish time (s) | records/s |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        saved = 1 - r["bytes_sent"] / none["bytes_sent"]
        lines.append(f"| {r['codec']} | {r['bytes_sent']:,} | {saved:.0%} | {r['seconds']:.2f} "
                     f"| {r['records_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alerts", type=int, default=20_000)
    p.add_argument("--bootstrap-servers")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    alerts, letters = build_outputs(args.alerts)
    from worker.config import COMPRESSION_CODECS

    def run(bootstrap: str) -> list[dict[str, Any]]:
        return [measure(bootstrap, codec, alerts, letters) for codec in COMPRESSION_CODECS]

    if args.bootstrap_servers:
        codecs = run(args.bootstrap_servers)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-compression-") as tmp, local_broker(Path(tmp)) as bootstrap:
            codecs = run(bootstrap)
    report = {"alerts": len(alerts), "dead_letters": len(letters), "codecs": codecs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "output_compression.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    (args.out / "output_compression.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
