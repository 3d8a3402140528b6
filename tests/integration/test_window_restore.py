"""Window state across a SIGKILL, a rebalance and exactly-once delivery: the alerts equal an uninterrupted run's.

The model has per-host window features (30 s) and alerts on bursts: in each partition one ordinary host at a
time sends an event every 0.9 s of event time among the ordinary traffic (10 events/s over 300 hosts), another
host every 20 s. A burst event alone looks like any other; it is anomalous only through its host's window (about
80 % of burst events alert, 3-4 % of the others). So at any point of the stream every partition is inside a
burst, and a worker that lost its window state at a restart or a partition move would miss alerts of the bursts
under way (a run with the restore points dropped from the commits misses 10-22 of them here).

Each test sends the first half of the stream, interrupts the worker that reads it (SIGKILL, or a second worker
joining so partitions move), sends the second half and lets the group finish. The alerts, as the set of
(partition, offset) they are for, must equal those of one uninterrupted worker on the same stream (module
fixture). At-least-once may repeat an alert (same id); with exactly-once none may repeat.

CI runs the exactly-once case (a window restore after a SIGKILL); the SIGKILL cases of both clients and the
rebalance case are marked `slow_integration` for time and run with scripts/slow.sh.
"""

from __future__ import annotations

import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pandas as pd
import pytest
from confluent_kafka import Producer

from tests.integration.test_exactly_once import read_topic
from tests.integration.test_worker_e2e import (
    BIN,
    PARTITIONS,
    Topics,
    WorkerProcess,
    _check_run,
    _free_port,
    committed,
    end_offsets,
    scrape,
)
from tests.kafka_broker import create_topics, unique_topic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 6000
HOSTS = 300
T0 = 1_750_000_000.0
BURST_S = 20
#: A worker processes in batches this small, so a kill finds it mid-stream.
MAX_BATCH = "50"

Launch = Callable[..., WorkerProcess]


def events(n: int, seed: int, bursts: bool) -> list[dict[str, object]]:
    """`n` events 0.1 s of event time apart; with `bursts`, every third belongs to the burst of its partition."""
    rnd = random.Random(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        t = T0 + 0.1 * (i + 1)
        if bursts and i % 3 == 0:
            # Each partition changes its burst host at another time: no point of the stream is near the start
            # of every partition's burst (where a lost window state would change nothing yet).
            partition = (i // 3) % PARTITIONS
            epoch = int((t - T0 + (partition + 0.5) * BURST_S / PARTITIONS) // BURST_S)
            host = (7 * epoch * PARTITIONS + partition) % HOSTS  # an ordinary host of that partition
        else:
            host = rnd.randrange(HOSTS)
        out.append({"id": f"{'b' if bursts and i % 3 == 0 else 'n'}{i}", "host": f"h{host}",
                    "bytes": round(rnd.lognormvariate(6, 0.5)), "service": rnd.choice(["http", "dns", "ssh"]),
                    "ts": round(t, 3)})
    return out


def partition_of(event: dict[str, object]) -> int:
    """Keyed by host, as a producer keying the topic by entity would (the windows are exact then)."""
    return int(str(event["host"])[1:]) % PARTITIONS


def positions(stream: list[dict[str, object]]) -> list[tuple[int, int]]:
    """(partition, offset) of each event of `stream` sent in order to a new topic."""
    sent: Counter[int] = Counter()
    out = []
    for event in stream:
        partition = partition_of(event)
        out.append((partition, sent[partition]))
        sent[partition] += 1
    return out


@pytest.fixture(scope="module")
def windowed_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("window-model")
    pd.DataFrame(events(6000, seed=1, bursts=False)).to_csv(root / "train.csv", index=False)
    _check_run([BIN / "anomaly-train", "--data", root / "train.csv", "--out", root / "bundle", "--drop", "id",
                "--drop", "host", "--entity", "host", "--window", "30s", "--event-time", "ts", "--window-field",
                "bytes", "--window-field", "service", "--epochs", "5", "--ensemble", "1", "--seed", "1"])
    return root / "bundle"


@pytest.fixture(scope="module")
def stream() -> list[dict[str, object]]:
    return events(EVENTS, seed=2, bursts=True)


def produce(bootstrap: str, topic: str, stream: list[dict[str, object]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    for event in stream:
        producer.produce(topic, value=orjson.dumps(event), key=str(event["host"]).encode(),
                         partition=partition_of(event))
    assert producer.flush(60) == 0


def new_topics(bootstrap: str, prefix: str) -> Topics:
    t = Topics(unique_topic(f"{prefix}-in"), unique_topic(f"{prefix}-alerts"), unique_topic(f"{prefix}-dlq"),
               unique_topic(prefix))
    create_topics(bootstrap, [t.input, t.alerts, t.dead_letters], partitions=PARTITIONS)
    return t


def launcher(bundle: Path, bootstrap: str, log_dir: Path, started: list[WorkerProcess]) -> Launch:
    def start(t: Topics, client: str, *extra: str) -> WorkerProcess:
        port = _free_port()
        cmd = [sys.executable, "-m", "worker.main", "--model", str(bundle), "--kafka-client", client,
               "--bootstrap-servers", bootstrap, "--input-topic", t.input, "--alert-topic", t.alerts,
               "--dead-letter-topic", t.dead_letters, "--group-id", t.group, "--metrics-host", "127.0.0.1",
               "--metrics-port", str(port), "--max-wait-ms", "100", "--max-batch", MAX_BATCH, "--kafka-timeout-s",
               "10", "--session-timeout-s", "6", "--rejoin-timeout-s", "30", *extra]
        worker = WorkerProcess(cmd, log_dir / f"worker-{len(started)}.log", port)
        started.append(worker)
        return worker
    return start


def stop_all(started: list[WorkerProcess]) -> None:
    for worker in started:
        worker.stop()
        print(f"--- {worker.log_path.name} (exit {worker.proc.returncode}) ---\n{worker.output()[-4000:]}")


@pytest.fixture
def launch(windowed_bundle: Path, kafka_bootstrap: str, tmp_path: Path) -> Iterator[Launch]:
    started: list[WorkerProcess] = []
    yield launcher(windowed_bundle, kafka_bootstrap, tmp_path, started)
    stop_all(started)


def wait_committed(bootstrap: str, t: Topics, workers: list[WorkerProcess], timeout: float = 90) -> None:
    """Until the group has committed every partition to its end (every worker still running)."""
    ends = end_offsets(bootstrap, t.input)

    def done() -> bool:
        for worker in workers:
            assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
        got = committed(bootstrap, t.group, t.input)
        return all(got.get(p, 0) >= end for p, end in ends.items())

    wait_for(done, timeout, f"group {t.group} to commit {ends}", interval=0.2)


def alerted(bootstrap: str, t: Topics) -> Counter[tuple[int, int]]:
    """How many alerts each input record (partition, offset) got, as `read_committed` consumers see them."""
    alerts = [orjson.loads(value) for value, _ in read_topic(bootstrap, t.alerts, "read_committed")]
    return Counter((a["source"]["partition"], a["source"]["offset"]) for a in alerts)


def kill_after_progress(bootstrap: str, t: Topics, worker: WorkerProcess) -> int:
    """SIGKILL `worker` once it has committed records of every partition; how many were committed then."""
    def progressed() -> int | None:
        assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
        got = committed(bootstrap, t.group, t.input)
        return sum(got.values()) if len(got) == PARTITIONS and min(got.values()) >= 300 else None

    done = int(wait_for(progressed, 60, "the first commit", interval=0.05))
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(timeout=30)
    return done


def restored_events(worker: WorkerProcess) -> float:
    return scrape(worker).get(("anomaly_window_restored_events_total", ()), 0.0)


@pytest.fixture(scope="module")
def uninterrupted(windowed_bundle: Path, kafka_bootstrap: str, stream: list[dict[str, object]],
                  tmp_path_factory: pytest.TempPathFactory) -> set[tuple[int, int]]:
    """The records one worker reading the whole stream without interruption alerts on."""
    started: list[WorkerProcess] = []
    try:
        t = new_topics(kafka_bootstrap, "win-ref")
        produce(kafka_bootstrap, t.input, stream)
        worker = launcher(windowed_bundle, kafka_bootstrap, tmp_path_factory.mktemp("win-ref"), started)(
            t, "confluent")
        wait_committed(kafka_bootstrap, t, [worker])
        seen = alerted(kafka_bootstrap, t)
    finally:
        stop_all(started)
    bursts = {where for where, e in zip(positions(stream), stream, strict=True) if str(e["id"]).startswith("b")}
    assert len(seen) > 500 and len(set(seen) & bursts) > 0.6 * len(bursts), "the model alerts on the bursts"
    return set(seen)


def compare(name: str, got: Counter[tuple[int, int]], expected: set[tuple[int, int]]) -> None:
    missing, extra = expected - set(got), set(got) - expected
    repeated = sum(n - 1 for n in got.values())
    print(f"{name}: {len(expected)} alerts expected, {len(missing)} missing, {len(extra)} unexpected, "
          f"{repeated} repeated")
    assert not missing and not extra, f"missing {sorted(missing)[:10]}, unexpected {sorted(extra)[:10]}"


@pytest.mark.slow_integration
@pytest.mark.parametrize("client", ["confluent", "kafka-python"])
def test_sigkill_and_restart_give_the_alerts_of_an_uninterrupted_run(
        kafka_bootstrap: str, stream: list[dict[str, object]], uninterrupted: set[tuple[int, int]], launch: Launch,
        client: str) -> None:
    t = new_topics(kafka_bootstrap, "win-kill")
    produce(kafka_bootstrap, t.input, stream[:EVENTS // 2])
    done = kill_after_progress(kafka_bootstrap, t, launch(t, client))
    produce(kafka_bootstrap, t.input, stream[EVENTS // 2:])
    started = time.monotonic()
    worker = launch(t, client)
    wait_committed(kafka_bootstrap, t, [worker])
    print(f"killed after {done} records committed; the restarted worker finished in "
          f"{time.monotonic() - started:.1f} s")
    compare(f"SIGKILL ({client})", alerted(kafka_bootstrap, t), uninterrupted)  # at-least-once: repeats allowed
    assert restored_events(worker) > 0, "the restarted worker replayed records into its window state"


@pytest.mark.slow_integration
def test_a_partition_moved_by_a_rebalance_keeps_its_window_state(
        kafka_bootstrap: str, stream: list[dict[str, object]], uninterrupted: set[tuple[int, int]],
        launch: Launch) -> None:
    t = new_topics(kafka_bootstrap, "win-move")
    produce(kafka_bootstrap, t.input, stream[:EVENTS // 2])
    first = launch(t, "confluent")
    wait_committed(kafka_bootstrap, t, [first])  # its window state holds the first half
    second = launch(t, "confluent")
    wait_for(lambda: "restored:" in second.output() or "starts at its committed offset" in second.output(), 60,
             "a partition to move to the second worker", interval=0.2)
    produce(kafka_bootstrap, t.input, stream[EVENTS // 2:])
    wait_committed(kafka_bootstrap, t, [first, second])
    assert "partitions revoked" in first.output()
    compare("rebalance", alerted(kafka_bootstrap, t), uninterrupted)
    assert restored_events(second) > 0, "the partitions' new owner replayed records into its window state"


def test_exactly_once_after_a_sigkill_gives_each_alert_of_an_uninterrupted_run_once(
        kafka_bootstrap: str, stream: list[dict[str, object]], uninterrupted: set[tuple[int, int]],
        launch: Launch) -> None:
    t = new_topics(kafka_bootstrap, "win-eos")
    eos = ("--delivery", "exactly-once", "--transactional-id", f"{t.group}-0")
    produce(kafka_bootstrap, t.input, stream[:EVENTS // 2])
    kill_after_progress(kafka_bootstrap, t, launch(t, "confluent", *eos))
    produce(kafka_bootstrap, t.input, stream[EVENTS // 2:])
    worker = launch(t, "confluent", *eos)
    wait_committed(kafka_bootstrap, t, [worker])
    got = alerted(kafka_bootstrap, t)
    compare("exactly-once SIGKILL", got, uninterrupted)
    assert max(got.values()) == 1, "exactly-once: no alert twice"
    assert restored_events(worker) > 0, "the restarted worker replayed records into its window state"
