"""Child process of `test_committed_offsets.py`: the confluent source asking for committed offsets in a loop.

Run as `python -m tests.faults.committed_loop BOOTSTRAP TOPIC GROUP`. It builds the worker's
`ConfluentSource` (a member of GROUP, `isolation.level=read_committed`), then, until SIGTERM, polls a
batch and asks `StartGuard.stable_committed` for every partition of TOPIC, the question the source asks for a
partition without a position. Each answer is one JSON line on stdout: `{"at": <time.monotonic()>,
"offsets": {partition: offset}}`, only the partitions whose committed offset came back. SIGTERM ends
the loop, closes the source and exits 0; a crash in the client shows as death by a signal.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import orjson

from worker.config import Settings
from worker.kafka.confluent import ConfluentSource

PARTITIONS = 3


def main(bootstrap: str, topic: str, group: str) -> int:
    faulthandler.enable()  # a native crash prints where it happened before the signal ends the process
    stopping = False

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    settings = Settings(model=Path("unused"), bootstrap_servers=bootstrap, input_topic=topic,
                        alert_topic=f"{topic}-alerts", dead_letter_topic=f"{topic}-dlq", group_id=group,
                        kafka_client="confluent", isolation_level="read_committed", kafka_timeout_s=10.0,
                        max_wait_ms=50)
    source = ConfluentSource(settings)
    keys = [(topic, p) for p in range(PARTITIONS)]
    try:
        while not stopping:
            source.poll_batch()
            answer = source.start_guard.stable_committed(keys)
            line = {"at": time.monotonic(), "offsets": {str(p): o for (_t, p), o in answer.items()}}
            sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
            sys.stdout.flush()
    finally:
        source.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
