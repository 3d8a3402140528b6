"""A real 3-node KRaft cluster (`kafka-local.sh start --nodes 3`) that tests can hurt and heal.

Each node is a combined broker + controller JVM on loopback; node N listens on `port + N - 1`. Faults
are plain signals to a node's JVM: `kill` (SIGKILL, a crash), `pause` / `resume` (SIGSTOP / SIGCONT,
a grey failure: sockets stay open, nothing answers). `restart` brings a killed node back on its own
storage (`kafka-local.sh start-node`). `heal` undoes every fault, so one cluster serves a whole session.

Example::

    with Cluster.started(tmp_dir) as cluster:
        cluster.create_topics(["events"], leader=2)
        cluster.kill(2)
        wait_for(lambda: cluster.leaders("events") and 2 not in cluster.leaders("events").values(), 60, "...")
        cluster.restart(2)
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from tests.kafka_broker import LauncherError, _run_launcher, wait_for

NODES = (1, 2, 3)
PARTITIONS = 3
#: Admin requests to a paused node must give up quickly rather than hang the test.
ADMIN_TIMEOUT_S = 5.0


class Cluster:
    """Three kafka-local.sh nodes in `run_dir`, client ports `port`..`port + 2`."""

    def __init__(self, run_dir: Path, port: int) -> None:
        self.dir, self.port = run_dir, port
        self.env = {**os.environ, "PYTHON": sys.executable}
        self.killed: set[int] = set()
        self.paused: set[int] = set()

    # -- lifecycle ---------------------------------------------------------------------------------

    @classmethod
    @contextmanager
    def started(cls, run_dir: Path, attempts: int = 3) -> Iterator[Cluster]:
        """Start a fresh cluster on free ports; always stop it (resuming paused nodes first)."""
        _run_launcher(["fetch"], {**os.environ, "PYTHON": sys.executable}, timeout=900)
        cluster: Cluster | None = None
        try:
            for attempt in range(1, attempts + 1):
                cluster = cls(run_dir, _free_port_run(6))
                try:
                    _run_launcher(["start", "--nodes", "3", "--dir", str(run_dir), "--port", str(cluster.port),
                                   "--controller-port", str(cluster.port + 3)], cluster.env, timeout=240)
                    break
                except LauncherError as e:
                    # Another process may take a port between our choosing it and the broker binding it.
                    if "already in use" not in e.stderr or attempt == attempts:
                        raise
            assert cluster is not None
            yield cluster
        finally:
            if cluster is not None:
                cluster.resume_all()  # a stopped JVM ignores SIGTERM until it is continued
            _run_launcher(["stop", "--dir", str(run_dir)], {**os.environ, "PYTHON": sys.executable}, timeout=120)

    @property
    def bootstrap(self) -> str:
        """Bootstrap servers of the nodes that answer (neither killed nor paused)."""
        return ",".join(self.address(n) for n in NODES if n not in self.killed | self.paused)

    def address(self, node: int) -> str:
        return f"127.0.0.1:{self.port + node - 1}"

    def pid(self, node: int) -> int:
        return int((self.dir / f"node-{node}" / "kafka.pid").read_text().strip())

    # -- faults ------------------------------------------------------------------------------------

    def kill(self, node: int) -> None:
        """SIGKILL the node's JVM (a crash: no controlled shutdown) and wait until it is gone."""
        pid = self.pid(node)
        self.resume(node)
        os.kill(pid, signal.SIGKILL)
        self.killed.add(node)
        wait_for(lambda: not _alive(pid), 30, f"node {node} (pid {pid}) to exit after SIGKILL")

    def pause(self, node: int) -> None:
        """SIGSTOP the node's JVM: its sockets stay open but nothing answers (a grey failure)."""
        os.kill(self.pid(node), signal.SIGSTOP)
        self.paused.add(node)

    def resume(self, node: int) -> None:
        if node in self.paused:
            os.kill(self.pid(node), signal.SIGCONT)
            self.paused.discard(node)

    def resume_all(self) -> None:
        for node in sorted(self.paused):
            with suppress(OSError):
                self.resume(node)

    def restart(self, node: int) -> None:
        """Relaunch a killed node on its storage; returns once it answers and sees the running nodes."""
        _run_launcher(["start-node", "--dir", str(self.dir), "--node", str(node)], self.env, timeout=240)
        self.killed.discard(node)

    def heal(self, timeout: float = 180) -> None:
        """Undo every fault and wait until all three brokers are registered and every replica is in sync."""
        hurt = self.paused | self.killed
        self.resume_all()
        for node in sorted(self.killed):
            self.restart(node)
        others = [n for n in NODES if n not in hurt]
        wait_for(lambda: self.fully_replicated(asking=others or None), timeout,
                 "every partition of the cluster to have 3 in-sync replicas", interval=0.5)

    # -- what the cluster says -----------------------------------------------------------------------

    def admin(self) -> AdminClient:
        """A fresh admin client bootstrapped from the nodes that answer.

        Fresh each time: after a node was paused and continued, a long-lived librdkafka admin client
        keeps the leader epochs it cached and answers FENCED_LEADER_EPOCH to every ListOffsets from then on.
        Hold it until its futures resolve: a client that is dropped cancels them.
        """
        return AdminClient({"bootstrap.servers": self.bootstrap, "socket.timeout.ms": int(ADMIN_TIMEOUT_S * 1000)})

    def brokers(self) -> set[int]:
        """Ids of the brokers registered (unfenced) in the cluster's metadata; empty if none answers."""
        try:
            return set(self.admin().list_topics(timeout=ADMIN_TIMEOUT_S).brokers)
        except KafkaException:
            return set()

    def partitions(self, topics: Iterable[str], asking: Iterable[int] | None = None,
                   ) -> dict[tuple[str, int], tuple[int, tuple[int, ...]]]:
        """(topic, partition) -> (leader id or -1, in-sync replica ids), from a metadata request.

        Metadata, not DescribeTopics: librdkafka sends that to the controller it last heard of, and
        waits for it even when that node is the one a test killed. `asking`: only these nodes (a node
        just continued after a pause still serves its stale metadata for a moment).
        """
        if asking is None:
            admin = self.admin()
        else:
            admin = AdminClient({"bootstrap.servers": ",".join(self.address(n) for n in asking),
                                 "socket.timeout.ms": int(ADMIN_TIMEOUT_S * 1000)})
        out: dict[tuple[str, int], tuple[int, tuple[int, ...]]] = {}
        for name in topics:
            topic = admin.list_topics(name, timeout=ADMIN_TIMEOUT_S).topics[name]
            if topic.error is not None:
                raise KafkaException(topic.error)
            for p in topic.partitions.values():
                out[(name, p.id)] = (p.leader, tuple(sorted(p.isrs)))
        return out

    def leaders(self, topic: str) -> dict[int, int]:
        """Partition -> leader id (-1 while there is none); {} if the metadata cannot be read right now."""
        try:
            return {p: leader for (_t, p), (leader, _isr) in self.partitions([topic]).items()}
        except KafkaException:
            return {}

    def fully_replicated(self, asking: Iterable[int] | None = None) -> bool:
        """All three brokers registered and every partition of every topic led, with all 3 replicas in sync."""
        if self.brokers() != set(NODES):
            return False
        try:
            topics = list(self.admin().list_topics(timeout=ADMIN_TIMEOUT_S).topics)
            state = self.partitions(topics, asking)
        except KafkaException:
            return False
        return all(leader in NODES and isr == NODES for leader, isr in state.values())

    # Group and transaction coordinators are asked with kafka-python: librdkafka's admin client aborts the
    # whole process when a coordinator connection drops mid-request (librdkafka issues 4605 and 3663),
    # which is what these tests do to it. A fresh client each time: kafka-python caches coordinators.

    def _coordinator_admin(self) -> KafkaAdminClient:
        return KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="fault-suite",
                                request_timeout_ms=int(ADMIN_TIMEOUT_S * 1000))

    def group_coordinator(self, group: str) -> int | None:
        try:
            admin = self._coordinator_admin()
        except (KafkaError, OSError):
            return None
        try:
            return int(admin._manager.run(admin._find_coordinator_ids, [group])[group])
        except (KafkaError, OSError):
            return None
        finally:
            admin.close()

    def group_members(self, group: str) -> list[set[int]] | None:
        """The assigned input partitions of each member of a Stable group; None while it is not Stable."""
        try:
            admin = self._coordinator_admin()
        except (KafkaError, OSError):
            return None
        try:
            description = admin.describe_groups([group])[group]
        except (KafkaError, OSError):
            return None
        finally:
            admin.close()
        if description.get("error") or description.get("group_state") != "Stable":
            return None
        members = []
        for member in description["members"]:
            assignment = member.get("member_assignment") or {}
            members.append({p for topic in assignment.get("assigned_partitions", []) for p in topic["partitions"]})
        return members

    def committed(self, group: str, topic: str) -> dict[int, int]:
        """The group's committed offsets for `topic`; {} while the coordinator cannot answer."""
        try:
            admin = self._coordinator_admin()
        except (KafkaError, OSError):
            return {}
        try:
            offsets = admin.list_group_offsets({group: None}).get(group, {})
        except (KafkaError, OSError):
            return {}  # the coordinator moving or loading
        finally:
            admin.close()
        return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}

    def transaction(self, transactional_id: str) -> tuple[int, str] | None:
        """(coordinator node, state such as "Ongoing") of a transactional id; None while unknown."""
        try:
            admin = self._coordinator_admin()
        except (KafkaError, OSError):
            return None
        try:
            description = admin.describe_transactions([transactional_id])[transactional_id]
        except (KafkaError, OSError):
            return None
        finally:
            admin.close()
        return int(description.coordinator_id), str(description.state.value)

    # -- topics --------------------------------------------------------------------------------------

    def create_topics(self, names: Iterable[str], leader: int | None = None) -> None:
        """Topics of 3 partitions, replication factor 3, min.insync.replicas=2; all led by `leader` if given."""
        names = list(names)
        topics = []
        for name in names:
            if leader is None:
                topics.append(NewTopic(name, num_partitions=PARTITIONS, replication_factor=3,
                                       config={"min.insync.replicas": "2"}))
            else:
                others = [n for n in NODES if n != leader]
                # The first replica is the preferred leader; alternate the followers' order.
                assignment = [[leader, *(others if p % 2 == 0 else others[::-1])] for p in range(PARTITIONS)]
                topics.append(NewTopic(name, num_partitions=PARTITIONS, replica_assignment=assignment,
                                       config={"min.insync.replicas": "2"}))
        admin = self.admin()  # held until the futures resolve: a dropped client cancels them
        for future in admin.create_topics(topics, request_timeout=30).values():
            future.result()

        def ready() -> bool:
            try:
                state = self.partitions(names)
            except KafkaException:
                return False
            return len(state) == len(names) * PARTITIONS and all(isr == NODES for _l, isr in state.values())

        wait_for(ready, 60, f"topics {names} to have leaders and 3 in-sync replicas", interval=0.2)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _free_port_run(count: int) -> int:
    """A first port of `count` consecutive loopback ports, free right now and below the ephemeral range.

    Below it on purpose: while a node is down, clients keep connecting to its port, and a connect to a
    loopback port inside the ephemeral range can pick that very port as its source and connect to itself
    (TCP self-connect), holding the port so the node cannot bind it when it restarts.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        base = random.randrange(10_000, low - count)
        held: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no run of {count} free loopback ports below {low}")
