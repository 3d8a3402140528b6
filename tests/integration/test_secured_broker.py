"""Every Kafka client of the project against a SASL_SSL broker with ACLs enforced, on least privilege.

One broker for the module (`kafka-local.sh start --secure`: SCRAM-SHA-512 over TLS, StandardAuthorizer,
nothing allowed without an ACL). Each component gets its own SCRAM user holding exactly the ACLs that
docs/security.md lists for it (the table is read from the doc, so the doc and the test cannot drift):
the worker in both delivery modes and with both clients, the feedback reader, `anomaly-replay` and
`anomaly-train --from-kafka` (each side path with both clients, chosen by `--kafka-client`). A principal
missing one ACL, and a wrong password, must give a log line that names the problem, a failing /readyz, no
commit and a process that stays up. The password must never show in the worker's argv, log or /metrics.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from tests.integration.test_worker_e2e import BIN, SAMPLE, WorkerProcess, _free_port
from tests.kafka_broker import REPO_ROOT, Acl, SecuredKafka, secured_kafka, unique_topic, wait_for

pytestmark = pytest.mark.integration

PARTITIONS = 3
TRAIN_ROWS = 600  # replayed, then trained on (about half are normal)
DOC = REPO_ROOT / "docs" / "security.md"
RESOURCE_TYPES = ("TOPIC", "GROUP", "TRANSACTIONAL_ID", "CLUSTER")


# -- the ACLs the doc lists ----------------------------------------------------------------------

def documented_acls() -> dict[str, list[tuple[str, str, str]]]:
    """docs/security.md's ACL table: component -> [(resource type, name template, operation)]."""
    table: dict[str, list[tuple[str, str, str]]] = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1] in RESOURCE_TYPES:
            table.setdefault(cells[0], []).append((cells[1], cells[2].strip("`"), cells[3]))
    assert table, f"no ACL table found in {DOC}"
    return table


def acls_for(components: list[str], names: dict[str, str], leave_out: tuple[tuple[str, str], ...] = ()) -> list[Acl]:
    """The documented ACLs of `components` with `<placeholders>` filled in from `names`, minus `leave_out`
    ((resource type, placeholder) of each ACL to drop)."""
    table = documented_acls()
    out = []
    for component in components:
        assert component in table, f"{DOC} lists no ACLs for {component!r} (it has {sorted(table)})"
        for resource_type, template, operation in table[component]:
            if (resource_type, template) in leave_out:
                continue
            out.append(Acl(resource_type, names[template], operation))
    return out


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kafka() -> Iterator[SecuredKafka]:
    with secured_kafka() as broker:
        yield broker


@dataclass(frozen=True)
class Principal:
    user: str
    password: str
    password_file: Path


@pytest.fixture
def new_principal(kafka: SecuredKafka, tmp_path: Path) -> Callable[[list[Acl]], Principal]:
    def make(acls: list[Acl]) -> Principal:
        user = f"user-{uuid.uuid4().hex[:8]}"
        password = f"pw-{uuid.uuid4().hex}"  # unique: searching logs and argv for it cannot hit anything else
        kafka.add_user(user, password, acls)
        path = tmp_path / f"{user}.password"
        path.write_text(password + "\n")
        path.chmod(0o600)
        return Principal(user, password, path)

    return make


@dataclass(frozen=True)
class Names:
    input: str
    alerts: str
    dead_letters: str
    group: str
    transactional_id: str
    feedback: str

    def placeholders(self) -> dict[str, str]:
        return {"<input-topic>": self.input, "<alert-topic>": self.alerts, "<dead-letter-topic>": self.dead_letters,
                "<group-id>": self.group, "<transactional-id>": self.transactional_id,
                "<feedback-topic>": self.feedback, "<topic>": self.input}


@pytest.fixture
def names(kafka: SecuredKafka) -> Names:
    n = Names(unique_topic("events"), unique_topic("alerts"), unique_topic("dlq"), unique_topic("group"),
              unique_topic("txn"), unique_topic("feedback"))
    kafka.create_topics([n.input, n.alerts, n.dead_letters, n.feedback], partitions=PARTITIONS)
    return n


@pytest.fixture
def launch(alerting_bundle: Path, kafka: SecuredKafka, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(n: Names, who: Principal, *extra: str) -> WorkerProcess:
        port = _free_port()
        cmd = [sys.executable, "-m", "worker.main", "--model", str(alerting_bundle), "--input-topic", n.input,
               "--alert-topic", n.alerts, "--dead-letter-topic", n.dead_letters, "--group-id", n.group,
               "--transactional-id", n.transactional_id, "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
               "--max-wait-ms", "100", "--kafka-timeout-s", "10", "--retry-backoff-max-s", "5",
               *kafka.client_flags(who.user, who.password_file), *extra]
        worker = WorkerProcess(cmd, tmp_path / f"worker-{len(started)}.log", port)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
        print(f"--- {worker.log_path.name} (exit {worker.proc.returncode}) ---\n{worker.output()[-6000:]}")


# -- Kafka helpers (as the admin principal) ------------------------------------------------------

def produce(kafka: SecuredKafka, topic: str, values: list[bytes]) -> None:
    producer = KafkaProducer(acks="all", linger_ms=20, **kafka.kafka_python())  # type: ignore[arg-type]
    try:
        for i, value in enumerate(values):
            producer.send(topic, value=value, partition=i % PARTITIONS)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


def count_records(kafka: SecuredKafka, topic: str) -> int:
    """Committed records in `topic` (read_committed end offsets; transaction markers are not records)."""
    consumer = KafkaConsumer(enable_auto_commit=False, isolation_level="read_committed",
                             **kafka.kafka_python())  # type: ignore[arg-type]
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        count = 0
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            count += sum(len(batch) for batch in consumer.poll(timeout_ms=500).values())
        return count
    finally:
        consumer.close()


def committed(kafka: SecuredKafka, group: str, topic: str) -> dict[int, int]:
    admin = KafkaAdminClient(client_id="tests-offsets", **kafka.kafka_python())  # type: ignore[arg-type]
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    except KafkaError:
        return {}
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}


def http_get(worker: WorkerProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(worker.url(path), timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def alive(worker: WorkerProcess) -> None:
    assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}:\n{worker.output()[-3000:]}"


def assert_no_secret(worker: WorkerProcess, who: Principal) -> None:
    """The password is in none of: the process's argv, its log, its metrics."""
    cmdline = Path(f"/proc/{worker.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "--sasl-password-file" in cmdline and who.password not in cmdline
    assert who.password not in worker.output()
    status, metrics = http_get(worker, "/metrics")
    assert status == 200 and "anomaly_" in metrics and who.password not in metrics


# -- the worker, least privilege -----------------------------------------------------------------

@pytest.mark.parametrize(("client", "delivery"), [("confluent", "at-least-once"), ("confluent", "exactly-once"),
                                                  ("kafka-python", "at-least-once")])
def test_worker_on_least_privilege(kafka: SecuredKafka, names: Names, new_principal: Callable[[list[Acl]], Principal],
                                   launch: Callable[..., WorkerProcess], sample_events: list[bytes], client: str,
                                   delivery: str) -> None:
    components = ["worker", "worker, feedback"] + (["worker, exactly-once"] if delivery == "exactly-once" else [])
    who = new_principal(acls_for(components, names.placeholders()))
    produce(kafka, names.input, sample_events)
    produce(kafka, names.feedback, [b'{"not": "a verdict"}'])
    worker = launch(names, who, "--kafka-client", client, "--delivery", delivery, "--feedback-topic", names.feedback)

    def all_committed() -> bool:
        alive(worker)
        return sum(committed(kafka, names.group, names.input).values()) >= len(sample_events)

    wait_for(all_committed, 120, f"{len(sample_events)} offsets committed by {who.user}", interval=0.5)
    assert count_records(kafka, names.alerts) >= len(sample_events), "every event of the alerting bundle alerts"

    def feedback_read() -> bool:
        return 'anomaly_feedback_rejected_total{reason="malformed"} 1.0' in http_get(worker, "/metrics")[1]

    wait_for(feedback_read, 60, "the feedback reader to read the feedback topic", interval=0.5)
    assert http_get(worker, "/readyz")[0] == 200
    assert_no_secret(worker, who)
    assert "not authorized" not in worker.output()


# -- the worker, one ACL missing or a wrong password ---------------------------------------------

@dataclass(frozen=True)
class Fault:
    client: str
    leave_out: tuple[tuple[str, str], ...]
    wrong_password: bool
    expected: str  # a regular expression the log must match, {placeholders} filled from Names


FAULTS = {
    "no-alert-write": Fault("confluent", (("TOPIC", "<alert-topic>"),), False, r"needs WRITE on TOPIC '{alerts}'"),
    # No WRITE on any topic: librdkafka's idempotent producer fails fatally; it is replaced at each retry.
    "no-write": Fault("confluent", (("TOPIC", "<alert-topic>"), ("TOPIC", "<dead-letter-topic>")), False,
                      r"needs WRITE on TOPIC '{alerts}' and TOPIC '{dead_letters}'"),
    "no-group-read": Fault("confluent", (("GROUP", "<group-id>"),), False, r"needs READ on GROUP '{group}'"),
    "kafka-python-no-group-read": Fault("kafka-python", (("GROUP", "<group-id>"),), False,
                                        r"needs READ on GROUP '{group}'"),
    "kafka-python-no-alert-write": Fault("kafka-python", (("TOPIC", "<alert-topic>"),), False,
                                         r"needs WRITE on TOPIC '{alerts}'"),
    "wrong-password": Fault("confluent", (), True, r"authentication failed: SCRAM-SHA-512 login as '{user}'"),
}


def test_missing_acl_or_wrong_password_is_named_not_ready_and_commits_nothing(
        kafka: SecuredKafka, new_principal: Callable[[list[Acl]], Principal], launch: Callable[..., WorkerProcess],
        sample_events: list[bytes]) -> None:
    """All cases run side by side (one worker each) to keep the module's time down. Each worker stays up,
    retrying: once the missing ACL is added, it delivers and commits without a restart."""
    running = []
    for case, fault in FAULTS.items():
        n = Names(*(unique_topic(f"{case}-{part}") for part in ("events", "alerts", "dlq", "group", "txn", "fb")))
        kafka.create_topics([n.input, n.alerts, n.dead_letters], partitions=PARTITIONS)
        produce(kafka, n.input, sample_events[:20])
        who = new_principal(acls_for(["worker"], n.placeholders(), fault.leave_out))
        if fault.wrong_password:
            who.password_file.write_text("not-" + who.password)
        worker = launch(n, who, "--kafka-client", fault.client)
        expected = fault.expected.format(alerts=re.escape(n.alerts), dead_letters=re.escape(n.dead_letters),
                                         group=re.escape(n.group), user=re.escape(who.user))
        running.append((case, n, who, worker, expected))

    for case, n, who, worker, expected in running:
        def named(worker: WorkerProcess = worker, expected: str = expected) -> bool:
            alive(worker)
            return re.search(expected, worker.output()) is not None

        wait_for(named, 90, f"{case}: a log line matching {expected!r}", interval=0.5)
    for case, n, who, worker, _expected in running:
        def not_ready(worker: WorkerProcess = worker) -> bool:
            alive(worker)
            return http_get(worker, "/readyz")[0] == 503

        wait_for(not_ready, 60, f"{case}: /readyz to answer 503", interval=0.5)
        alive(worker)  # backing off, not crash-looping
        assert committed(kafka, n.group, n.input) == {}, f"{case}: nothing may be committed"
        assert "Traceback" not in worker.output(), f"{case}: a traceback in the log"
        if case == "wrong-password":
            assert_no_secret(worker, who)
            assert ("not-" + who.password) not in worker.output()

    # It was retrying all along: once the missing ACL is added, the same process delivers and commits.
    for case, n, who, worker, _expected in running:
        fault = FAULTS[case]
        if not fault.leave_out:
            continue
        missing = [acl for acl in acls_for(["worker"], n.placeholders())
                   if any((acl.resource_type, acl.name) == (resource_type, n.placeholders()[template])
                          for resource_type, template in fault.leave_out)]
        kafka.add_user(who.user, who.password, missing)  # the same password again, and the missing ACLs
    for case, n, who, worker, _expected in running:
        if not FAULTS[case].leave_out:
            continue

        def recovered(worker: WorkerProcess = worker, n: Names = n) -> bool:
            alive(worker)
            return sum(committed(kafka, n.group, n.input).values()) >= 20

        wait_for(recovered, 90, f"{case}: commits once the ACL is added", interval=0.5)


# -- anomaly-replay and anomaly-train --from-kafka -----------------------------------------------

def run_cli(cmd: list[str | Path], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow_integration("kafka-python")  # for time: CI runs the confluent case (scripts/slow.sh both)
def test_replay_then_train_from_kafka_on_least_privilege(
        kafka: SecuredKafka, names: Names, new_principal: Callable[[list[Acl]], Principal], kafka_client: str,
        tmp_path: Path) -> None:
    replayer = new_principal(acls_for(["anomaly-replay"], names.placeholders()))
    trainer = new_principal(acls_for(["anomaly-train"], names.placeholders()))
    rows = tmp_path / "rows.csv"
    rows.write_text("".join(SAMPLE.open().readlines()[:TRAIN_ROWS + 1]))

    # anomaly-replay with the password from the environment, the way a Kubernetes secretKeyRef passes it.
    flags = [*kafka.client_flags(replayer.user, replayer.password_file), "--kafka-client", kafka_client]
    at = flags.index("--sasl-password-file")
    del flags[at:at + 2]
    replay = run_cli([BIN / "anomaly-replay", "--data", rows, "--topic", names.input, *flags],
                     env={"ANOMALY_SASL_PASSWORD": replayer.password})
    assert replay.returncode == 0, replay.stderr[-3000:]
    assert f"sent {TRAIN_ROWS} events" in replay.stdout
    assert count_records(kafka, names.input) == TRAIN_ROWS

    # The trainer may read the topic but not write it: anomaly-replay as the trainer fails in one line.
    refused = run_cli([BIN / "anomaly-replay", "--data", rows, "--topic", names.input, "--limit", "1",
                       "--kafka-client", kafka_client, *kafka.client_flags(trainer.user, trainer.password_file)])
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"needs WRITE on TOPIC '{names.input}'" in refused.stderr

    train = run_cli([BIN / "anomaly-train", "--from-kafka", "--topic", names.input, "--out", tmp_path / "bundle",
                     "--label-column", "label", "--normal-value", "normal", "--drop", "difficulty", "--epochs", "1",
                     "--ensemble", "1", "--seed", "1", "--kafka-client", kafka_client,
                     *kafka.client_flags(trainer.user, trainer.password_file)])
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    assert f"kafka:{names.input}: {TRAIN_ROWS} events read" in train.stdout
    assert (tmp_path / "bundle" / "manifest.json").is_file()
    for result in (replay, refused, train):
        assert replayer.password not in result.stdout + result.stderr
        assert trainer.password not in result.stdout + result.stderr


def test_train_from_kafka_without_read_fails_in_one_line(
        kafka: SecuredKafka, names: Names, new_principal: Callable[[list[Acl]], Principal], kafka_client: str,
        tmp_path: Path) -> None:
    outsider = new_principal([])
    train = run_cli([BIN / "anomaly-train", "--from-kafka", "--topic", names.input, "--out", tmp_path / "bundle",
                     "--epochs", "1", "--kafka-client", kafka_client,
                     *kafka.client_flags(outsider.user, outsider.password_file)])
    assert train.returncode == 2, train.stdout[-2000:] + train.stderr[-3000:]
    assert train.stderr.startswith("anomaly-train: error:") and train.stderr.count("\n") == 1, train.stderr
    if kafka_client == "confluent":  # kafka-python's metadata shows a topic it may not read as no topic at all
        assert f"needs READ on TOPIC '{names.input}'" in train.stderr
    assert not (tmp_path / "bundle").exists()
    assert outsider.password not in train.stdout + train.stderr
