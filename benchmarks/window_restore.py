"""How fast a worker rebuilds a partition's window state from the input topic after a restart (issue 21).

1. Train a small bundle with one per-host window of `--window` (default 30m) and two summarised fields.
2. Send `--events` events (default 100,000, 100 per second of event time, over 1,000 hosts) to a one-partition
   topic: all of them inside one window, so the restore point of the last commit is the partition's start.
3. A worker reads them all and commits; it is SIGKILLed.
4. A second worker starts: its log line `window state of ... restored: N events ... in S s, R events/s once
   the first arrived` is the figure (the time from the restore's decision to the last replayed record, and
   the replay rate once records flow).

Needs a broker (KAFKA_BOOTSTRAP_SERVERS, or tests/kafka_broker.py starts one). Prints one line per client:

    .venv/bin/python -m benchmarks.window_restore [--events 100000] [--client confluent --client kafka-python]
"""

from __future__ import annotations

import argparse
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import orjson
import pandas as pd
from confluent_kafka import Producer

from tests.integration.test_worker_e2e import BIN, Topics, WorkerProcess, _check_run, _free_port, committed
from tests.kafka_broker import create_topics, kafka_bootstrap, unique_topic, wait_for

T0 = 1_750_000_000.0
RESTORED = re.compile(r"restored: (\d+) events \(offsets (\d+) to (\d+)\) in ([\d.]+) s, (\d+) events/s")


def events(n: int, seed: int, hosts: int = 1000, per_s: float = 100.0) -> list[dict[str, object]]:
    rnd = random.Random(seed)
    return [{"host": f"h{rnd.randrange(hosts)}", "bytes": round(rnd.lognormvariate(6, 0.5)),
             "service": rnd.choice(["http", "dns", "ssh"]), "ts": round(T0 + i / per_s, 3)} for i in range(n)]


def train(root: Path, window: str) -> Path:
    pd.DataFrame(events(5000, seed=1)).to_csv(root / "train.csv", index=False)
    _check_run([BIN / "anomaly-train", "--data", root / "train.csv", "--out", root / "bundle", "--drop", "host",
                "--entity", "host", "--window", window, "--event-time", "ts", "--window-field", "bytes",
                "--window-field", "service", "--epochs", "2", "--ensemble", "1", "--seed", "1"])
    return root / "bundle"


def run(bootstrap: str, bundle: Path, client: str, stream: list[dict[str, object]], logs: Path) -> str:
    t = Topics(unique_topic("restore-in"), unique_topic("restore-alerts"), unique_topic("restore-dlq"),
               unique_topic("restore"))
    create_topics(bootstrap, [t.input, t.alerts, t.dead_letters], partitions=1)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 50})
    for event in stream:
        producer.produce(t.input, value=orjson.dumps(event), partition=0)
    assert producer.flush(120) == 0

    def start(n: int) -> WorkerProcess:
        cmd = [sys.executable, "-m", "worker.main", "--model", str(bundle), "--kafka-client", client,
               "--bootstrap-servers", bootstrap, "--input-topic", t.input, "--alert-topic", t.alerts,
               "--dead-letter-topic", t.dead_letters, "--group-id", t.group, "--metrics-host", "127.0.0.1",
               "--metrics-port", str(_free_port()), "--kafka-timeout-s", "10", "--session-timeout-s", "6"]
        return WorkerProcess(cmd, logs / f"{client}-{n}.log", 0)

    first = start(0)
    try:
        wait_for(lambda: committed(bootstrap, t.group, t.input).get(0, 0) >= len(stream), 600, "the first worker",
                 interval=0.5)
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.stop()
    second = start(1)
    try:
        found = wait_for(lambda: RESTORED.search(second.output()), 600, "the restore", interval=0.2)
    finally:
        second.stop()
    assert found is not None
    n, low, high, seconds, rate = found.groups()
    return (f"{client}: {n} events (offsets {low}-{high}) restored in {float(seconds):.2f} s, {int(rate):,} events/s "
            f"once the first arrived")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--window", default="30m")
    parser.add_argument("--client", action="append", choices=["confluent", "kafka-python"])
    args = parser.parse_args(argv)
    stream = events(args.events, seed=2)
    with tempfile.TemporaryDirectory(prefix="window-restore-") as tmp, kafka_bootstrap() as bootstrap:
        root = Path(tmp)
        started = time.monotonic()
        bundle = train(root, args.window)
        print(f"bundle trained in {time.monotonic() - started:.0f} s; {args.events:,} events in one {args.window} "
              f"window of one partition", flush=True)
        for client in args.client or ["confluent", "kafka-python"]:
            print(run(bootstrap, bundle, client, stream, root), flush=True)


if __name__ == "__main__":
    main()
