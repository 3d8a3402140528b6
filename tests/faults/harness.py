"""What every fault case needs around the cluster: worker processes, a steady load, readiness sampling,
recovery timing, and the final history check with its printed figures.

A case reads as: start workers, start the load, wait for progress, inject faults inside
`scenario.fault(...)` (which times the recovery: until the group has committed every record produced
before the fault), then `scenario.finish()` (stop the load, wait until the group committed the end
offsets, read the history, check it against the delivery mode, print the figures).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from confluent_kafka import IsolationLevel, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import OffsetSpec

from tests.faults.cluster import NODES, PARTITIONS, Cluster
from tests.faults.history import EXACTLY_ONCE, Verdict, check, read_history
from tests.integration.test_worker_e2e import Topics, WorkerProcess, _free_port
from tests.kafka_broker import unique_topic, wait_for

#: Events per second the load produces (a few thousand per case).
RATE_PER_S = 150
#: Every n-th event is malformed (a number field holding text): the worker dead-letters it.
MALFORMED_EVERY = 40
#: Consumer session timeout of the workers: a dead or paused member leaves the group after this.
SESSION_TIMEOUT_S = 8
#: Generous: three JVMs and the workers share two cores.
RECOVERY_TIMEOUT_S = 180


@dataclass
class Figures:
    """What a case prints: the checker's counts, how long recovery took, readiness during the faults."""

    case: str
    delivery: str
    verdict: Verdict | None = None
    timings: list[tuple[str, float]] = field(default_factory=list)
    readiness: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        head = f"{self.case} [{self.delivery}] in {self.seconds:.0f} s"
        if self.verdict is not None:
            v = self.verdict
            head += (f": {v.inputs} events, {v.outputs} outputs, lost {len(v.lost)}, duplicated {len(v.duplicated)} "
                     f"({v.extra_outputs} extra), conflicting {len(v.conflicting)}, unexpected {len(v.unexpected)}")
        out = [head]
        out += [f"    {label}: {seconds:.1f} s" for label, seconds in self.timings]
        out += [f"    readyz {line}" for line in self.readiness]
        out += [f"    {note}" for note in self.notes]
        return out


class Load:
    """Produces events round-robin over the input partitions at `rate` per second until stopped.

    Every event gets a unique `id`; every `MALFORMED_EVERY`-th one is malformed (a dead letter).
    The producer is idempotent with acks=all and retries through broker faults for minutes.
    """

    def __init__(self, bootstrap: str, topic: str, templates: list[bytes], rate: int = RATE_PER_S) -> None:
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate
        self.templates = [orjson.loads(t) for t in templates]
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            producer = Producer({"bootstrap.servers": self.bootstrap, "acks": "all", "enable.idempotence": True,
                                 "linger.ms": 5, "message.timeout.ms": RECOVERY_TIMEOUT_S * 1000})
            tick = 1 / 20
            next_at = time.monotonic()
            while not self._stop.is_set():
                for _ in range(self.rate // 20):
                    producer.produce(self.topic, value=self._event(self.sent), partition=self.sent % PARTITIONS,
                                     on_delivery=self._report)
                    self.sent += 1
                producer.poll(0)
                next_at += tick
                self._stop.wait(max(0.0, next_at - time.monotonic()))
            left = producer.flush(RECOVERY_TIMEOUT_S)
            if left:
                self.failures.append(f"{left} events not delivered at the end")
        except BaseException as exc:  # noqa: BLE001 - surfaced by stop()
            self._error = exc

    def _event(self, n: int) -> bytes:
        event = dict(self.templates[n % len(self.templates)])
        event["id"] = f"ev-{n}"
        if n % MALFORMED_EVERY == MALFORMED_EVERY - 1:
            event["duration"] = "long"  # wrong_type
        return orjson.dumps(event)

    def _report(self, error: object, _message: object) -> None:
        if error is not None:
            self.failures.append(str(error))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(RECOVERY_TIMEOUT_S + 30)
        if self._error is not None:
            raise self._error
        assert not self._thread.is_alive(), "the load producer did not finish"
        assert not self.failures, f"the load producer could not deliver: {self.failures[:3]}"


class ReadinessProbe:
    """Samples each worker's `/readyz` a few times a second (observation only, never synchronisation).

    One thread per worker process, so a paused worker (whose probe hangs until its timeout) does not
    slow the samples of the others; a thread ends with its process.
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, str, str]] = []  # (monotonic time, worker, status)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def watch(self, name: str, worker: WorkerProcess) -> None:
        thread = threading.Thread(target=self._run, args=(name, worker), name=f"readyz-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run(self, name: str, worker: WorkerProcess) -> None:
        while worker.proc.poll() is None and not self._stop.wait(0.25):
            self.samples.append((time.monotonic(), name, _readyz(worker)))

    def summary(self, start: float, end: float) -> str:
        """Per worker, how often each status was seen between `start` and `end`."""
        per: dict[str, Counter[str]] = {}
        for t, name, status in self.samples:
            if start <= t <= end:
                per.setdefault(name, Counter())[status] += 1
        return "; ".join(f"{name}: " + ", ".join(f"{s} x{n}" for s, n in sorted(c.items()))
                         for name, c in sorted(per.items())) or "no samples"

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


def _readyz(worker: WorkerProcess) -> str:
    try:
        with urllib.request.urlopen(worker.url("/readyz"), timeout=1) as response:
            return "ready" if response.status == 200 else str(response.status)
    except urllib.error.HTTPError as exc:
        return "not-ready" if exc.code == 503 else str(exc.code)
    except OSError:
        return "no-answer"  # killed, paused, or still starting


class Scenario:
    """One fault case: its topics (rf 3, min.insync.replicas 2), workers, load, timings and verdict."""

    def __init__(self, cluster: Cluster, bundle: Path, delivery: str, tmp_path: Path, case: str,
                 templates: list[bytes]) -> None:
        self.cluster, self.bundle, self.delivery, self.tmp_path = cluster, bundle, delivery, tmp_path
        self.templates = templates
        self.topics = Topics(unique_topic("events"), unique_topic("alerts"), unique_topic("dlq"),
                             unique_topic("group"))
        self.figures = Figures(case, delivery)
        self.workers: list[tuple[str, WorkerProcess]] = []
        self.deliberately_ended: set[int] = set()  # pids we killed on purpose
        self.paused: set[int] = set()
        self.probe = ReadinessProbe()
        self.load: Load | None = None
        self.started_at = time.monotonic()

    # -- set-up ----------------------------------------------------------------------------------------

    @property
    def all_brokers(self) -> str:
        """Every node, as a deployment lists them: clients find the live ones themselves."""
        return ",".join(self.cluster.address(n) for n in NODES)

    def create_topics(self, leader: int | None = None) -> None:
        t = self.topics
        self.cluster.create_topics([t.input, t.alerts, t.dead_letters], leader=leader)

    def transactional_id(self, name: str) -> str:
        """Distinct per worker, stable across its restarts."""
        return f"{self.topics.group}-{name}"

    def start_worker(self, name: str) -> WorkerProcess:
        """Start worker `name` (again, after a kill: same client and transactional id)."""
        t, port = self.topics, _free_port()
        cmd = [sys.executable, "-m", "worker.main", "--model", str(self.bundle), "--kafka-client", "confluent",
               "--bootstrap-servers", self.all_brokers, "--input-topic", t.input, "--alert-topic", t.alerts,
               "--dead-letter-topic", t.dead_letters, "--group-id", t.group, "--client-id", name,
               "--metrics-host", "127.0.0.1", "--metrics-port", str(port), "--max-wait-ms", "100",
               "--kafka-timeout-s", "10", "--shutdown-timeout-s", "10",
               "--session-timeout-s", str(SESSION_TIMEOUT_S), "--delivery", self.delivery]
        if self.delivery == EXACTLY_ONCE:
            # The worker's default transaction timeout (60 s) outlasts case 6's pause, so the paused worker's
            # transaction is still open when it wakes, and the group generation (KIP-447) must fence it.
            cmd += ["--transactional-id", self.transactional_id(name)]
        runs = sum(1 for n, _w in self.workers if n == name)
        worker = WorkerProcess(cmd, self.tmp_path / f"{name}-{runs}.log", port)
        self.workers.append((name, worker))
        self.probe.watch(name, worker)
        return worker

    def start_load(self) -> None:
        self.load = Load(self.all_brokers, self.topics.input, self.templates)
        self.load.start()

    # -- faults ------------------------------------------------------------------------------------------

    def kill_worker(self, worker: WorkerProcess) -> None:
        self.deliberately_ended.add(worker.proc.pid)
        self.resume_worker(worker)
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(timeout=30)

    def pause_worker(self, worker: WorkerProcess) -> None:
        worker.proc.send_signal(signal.SIGSTOP)
        self.paused.add(worker.proc.pid)

    def resume_worker(self, worker: WorkerProcess) -> None:
        if worker.proc.pid in self.paused:
            worker.proc.send_signal(signal.SIGCONT)
            self.paused.discard(worker.proc.pid)

    @contextmanager
    def fault(self, label: str) -> Iterator[None]:
        """Time a fault: from entering the block until the group has committed every record produced before it.

        Readiness sampled over the same window is added to the figures.
        """
        marks = self.input_end_offsets()
        started = time.monotonic()
        yield
        self.wait_committed(marks, RECOVERY_TIMEOUT_S, f"recovery from {label}")
        ended = time.monotonic()
        self.figures.timings.append((f"{label}: recovered (all earlier events committed) after", ended - started))
        self.figures.readiness.append(f"during {label}: {self.probe.summary(started, ended)}")

    def timed(self, label: str, condition: Callable[[], object], timeout: float = RECOVERY_TIMEOUT_S,
              since: float | None = None) -> float:
        """Wait for `condition` and record how long it took (from `since`, default now)."""
        start = time.monotonic() if since is None else since
        wait_for(condition, timeout, label, interval=0.2)
        seconds = time.monotonic() - start
        self.figures.timings.append((label, seconds))
        return seconds

    # -- observations ------------------------------------------------------------------------------------

    def input_end_offsets(self) -> dict[int, int]:
        def ends() -> dict[int, int] | None:
            try:
                admin = self.cluster.admin()
                futures = admin.list_offsets(
                    {TopicPartition(self.topics.input, p): OffsetSpec.latest() for p in range(PARTITIONS)},
                    isolation_level=IsolationLevel.READ_UNCOMMITTED, request_timeout=10)
                return {tp.partition: f.result().offset for tp, f in futures.items()}
            except KafkaException:
                return None  # a leader moving

        return wait_for(ends, RECOVERY_TIMEOUT_S, f"the end offsets of {self.topics.input}", interval=0.5)

    def assert_workers_alive(self) -> None:
        for name, worker in self.workers:
            if worker.proc.pid not in self.deliberately_ended:
                assert worker.proc.poll() is None, (
                    f"worker {name} exited with {worker.proc.returncode}:\n{worker.output()[-3000:]}")

    def caught_up(self, marks: dict[int, int]) -> bool:
        """Whether the group has committed at least `marks` on every input partition."""
        self.assert_workers_alive()
        got = self.cluster.committed(self.topics.group, self.topics.input)
        return all(got.get(p, 0) >= end for p, end in marks.items())

    def wait_committed(self, marks: dict[int, int], timeout: float, what: str) -> None:
        wait_for(lambda: self.caught_up(marks), timeout, f"{what}: group {self.topics.group} to commit {marks}",
                 interval=0.25)

    def wait_progress(self) -> None:
        """Wait until the group has committed events produced after this call (the workers are processing)."""
        marks = {p: max(1, o + 1) for p, o in self.input_end_offsets().items()}
        self.timed("workers started, first events committed", lambda: self.caught_up(marks))

    def members(self) -> list[set[int]] | None:
        """Assigned input partitions of each member, sorted; None while the group is not Stable."""
        members = self.cluster.group_members(self.topics.group)
        return None if members is None else sorted(members, key=sorted)

    def led_without(self, node: int) -> bool:
        """Every partition of the case's topics has a leader, and it is not `node`."""
        t = self.topics
        try:
            state = self.cluster.partitions([t.input, t.alerts, t.dead_letters])
        except KafkaException:
            return False
        return all(leader in NODES and leader != node for leader, _isr in state.values())

    def in_sync(self, recovering: int) -> bool:
        """Every partition of the case's topics has all 3 replicas in sync, say the nodes other than `recovering`."""
        t = self.topics
        try:
            state = self.cluster.partitions([t.input, t.alerts, t.dead_letters],
                                            asking=[n for n in NODES if n != recovering])
        except KafkaException:
            return False
        return all(isr == NODES for _leader, isr in state.values())

    def note_coordinators(self) -> None:
        """Record where the group coordinator is (a fault there too changes what the case shows)."""
        self.figures.notes.append(f"group coordinator: broker {self.cluster.group_coordinator(self.topics.group)}")

    # -- the end -----------------------------------------------------------------------------------------

    def finish(self) -> Verdict:
        """Stop the load, wait until the group committed the end offsets, read and check the history."""
        assert self.load is not None
        self.load.stop()
        ends = self.input_end_offsets()
        assert sum(ends.values()) == self.load.sent, f"produced {self.load.sent} events, the topic holds {ends}"
        self.wait_committed(ends, RECOVERY_TIMEOUT_S, "the end")
        t = self.topics
        verdict = check(*read_history(self.cluster.bootstrap, t.input, t.alerts, t.dead_letters,
                                      timeout=RECOVERY_TIMEOUT_S))
        self.figures.verdict = verdict
        self.figures.seconds = time.monotonic() - self.started_at
        print("\n".join(self.figures.lines()))
        assert verdict.inputs == self.load.sent
        problems = verdict.problems(self.delivery)
        assert not problems, f"{self.delivery} broken: " + "; ".join(problems)
        return verdict

    def close(self) -> None:
        """Always: no worker left running (a paused one is continued first), logs printed, load stopped."""
        self.probe.close()
        if self.load is not None:
            self.load._stop.set()
        for name, worker in self.workers:
            with suppress(OSError):
                self.resume_worker(worker)
            worker.stop()
            print(f"--- {name}: {worker.log_path.name} (exit {worker.proc.returncode}) ---\n{worker.output()[-4000:]}")
        if self.figures.seconds == 0.0:
            self.figures.seconds = time.monotonic() - self.started_at
