"""The confluent source's question for committed offsets survives its group coordinator being killed.

`StartGuard.stable_committed` (worker/kafka/confluent/start_guard.py) runs in a child process
(`tests/faults/committed_loop.py`) in a tight loop, for a group with committed offsets and
`isolation.level=read_committed`, while the test SIGKILLs the broker that coordinates the group, waits
for the coordinator to move, restarts the broker and moves leadership back to it (a preferred leader
election), several times. The child must never die
by a signal and must answer the committed offsets again after each move. The admin API's
ListConsumerGroupOffsets, which the source used before, can SIGSEGV the process there (librdkafka #5040,
confluent-kafka-python #1982). See docs/faults.md.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka import KafkaException as ConfluentKafkaException
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from tests.faults.cluster import ADMIN_TIMEOUT_S, NODES, PARTITIONS, Cluster
from tests.faults.conftest import FIGURES
from tests.faults.harness import Figures
from tests.kafka_broker import unique_topic, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

REPO = Path(__file__).resolve().parents[2]
#: How many times the coordinator is killed and brought back.
ROUNDS = 3
#: The group's committed offsets, per partition (records exist past them).
COMMITTED = {0: 5, 1: 6, 2: 7}
#: Killing a coordinator moves it within a session timeout or two; a node restarts in well under a minute.
MOVE_TIMEOUT_S = 90


class CommittedLoop:
    """The child process and the answers it printed, `(time.monotonic(), {partition: offset})`."""

    def __init__(self, bootstrap: str, topic: str, group: str, stderr: Path) -> None:
        self.stderr_path = stderr
        self.answers: list[tuple[float, dict[int, int]]] = []
        self._stderr = stderr.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.faults.committed_loop", bootstrap, topic, group],
            cwd=REPO, stdout=subprocess.PIPE, stderr=self._stderr)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = orjson.loads(raw)
            self.answers.append((float(line["at"]), {int(p): int(o) for p, o in line["offsets"].items()}))

    def alive(self) -> None:
        """Fail at once, naming the signal, if the child died."""
        code = self.process.poll()
        if code is not None:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            tail = self.stderr_path.read_text(errors="replace")[-3000:]
            raise AssertionError(f"the committed-offsets loop died by {how} after {len(self.answers)} "
                                 f"answers; its stderr ends:\n{tail}")

    def answered_since(self, since: float) -> bool:
        """Whether the child answered every committed offset after `since` (checking it is alive first)."""
        self.alive()
        return any(at > since and offsets == COMMITTED for at, offsets in reversed(self.answers))

    def stop(self) -> int:
        """SIGTERM; the loop closes its source and exits 0."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)
        self._stderr.close()
        return int(self.process.returncode)


@pytest.fixture
def loop_topic(cluster: Cluster) -> Iterator[tuple[str, str]]:
    """A topic with 10 records per partition and a group that committed `COMMITTED`; the cluster healed."""
    cluster.heal()
    topic, group = unique_topic("committed"), unique_topic("committed-group")
    cluster.create_topics([topic])
    producer = Producer({"bootstrap.servers": cluster.bootstrap, "enable.idempotence": True})
    for partition in range(PARTITIONS):
        for i in range(10):
            producer.produce(topic, value=b"%d" % i, partition=partition)
    assert producer.flush(30) == 0
    committer = Consumer({"bootstrap.servers": cluster.bootstrap, "group.id": group})
    offsets = [TopicPartition(topic, p, o) for p, o in COMMITTED.items()]

    def committed() -> bool:  # a fresh cluster's coordinator may still be loading its offsets
        try:
            committer.commit(offsets=offsets, asynchronous=False)
        except ConfluentKafkaException as exc:
            if not exc.args[0].retriable():
                raise
            return False
        return True

    wait_for(committed, 60, "the group's first commit")
    committer.close()
    try:
        yield topic, group
    finally:
        cluster.heal()


def test_committed_offsets_are_answered_while_the_group_coordinator_is_killed_and_comes_back(
        cluster: Cluster, loop_topic: tuple[str, str], tmp_path: Path) -> None:
    topic, group = loop_topic
    figures = Figures("committed offsets while the coordinator moves", "read_committed")
    FIGURES.append(figures)
    began = time.monotonic()
    child = CommittedLoop(cluster.bootstrap, topic, group, tmp_path / "committed-loop.stderr")
    try:
        timed(figures, "first answer", lambda: child.answered_since(began), began)
        for round_ in range(1, ROUNDS + 1):
            victim = wait_for(lambda: coordinator(cluster, group), MOVE_TIMEOUT_S, "the group's coordinator")
            killed_at = time.monotonic()
            cluster.kill(victim)
            timed(figures, f"#{round_} coordinator {victim} killed: moved",
                  lambda: coordinator(cluster, group) not in (None, victim), killed_at)
            moved_at = time.monotonic()
            timed(figures, f"#{round_} answered by the new coordinator", lambda: child.answered_since(moved_at),
                  moved_at)
            restarted_at = time.monotonic()
            cluster.restart(victim)
            wait_for(cluster.fully_replicated, MOVE_TIMEOUT_S, f"node {victim} back in every ISR", interval=0.5)
            elect_preferred_leaders(cluster)
            # The coordinator goes back to the restarted node if it is the preferred leader of the group's
            # partition of __consumer_offsets (NOT_COORDINATOR from the node that coordinated meanwhile).
            back = coordinator(cluster, group)
            figures.notes.append(f"#{round_} after the restart and a preferred election the coordinator is {back}")
            settled_at = time.monotonic()
            timed(figures, f"#{round_} node {victim} restarted: answered",
                  lambda: child.answered_since(settled_at), restarted_at)
        child.alive()
        figures.notes.append(f"{len(child.answers)} answers in {time.monotonic() - began:.0f} s, "
                             f"{ROUNDS} coordinator kills")
    finally:
        code = child.stop()
        figures.seconds = time.monotonic() - began
    assert code == 0, f"the loop ended with {code} (negative: killed by that signal)"


def timed(figures: Figures, what: str, condition: Callable[[], bool], since: float) -> None:
    wait_for(condition, MOVE_TIMEOUT_S, what, interval=0.2)
    figures.timings.append((what, time.monotonic() - since))


def coordinator(cluster: Cluster, group: str) -> int | None:
    """The group's coordinator, or None while unknown or on a node that is down."""
    node = cluster.group_coordinator(group)
    return node if node in NODES and node not in cluster.killed else None


def elect_preferred_leaders(cluster: Cluster) -> None:
    """Move every __consumer_offsets leadership back to its preferred replica (kafka-python: see cluster.py)."""
    with suppress(KafkaError, OSError):
        admin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap, client_id="fault-suite",
                                 request_timeout_ms=int(ADMIN_TIMEOUT_S * 1000))
        try:
            admin.elect_leaders(0, ["__consumer_offsets"], timeout_ms=int(ADMIN_TIMEOUT_S * 1000),
                                raise_errors=False)
        finally:
            admin.close()
