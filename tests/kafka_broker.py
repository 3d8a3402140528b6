"""A real Kafka broker for integration tests, and small helpers to use it.

Where the broker comes from, first match wins:

1. ``KAFKA_BOOTSTRAP_SERVERS`` is set: use that cluster (CI service, ``kafka-local.sh start``).
2. A Docker engine answers: testcontainers' ``KafkaContainer`` (KRaft).
3. Otherwise: ``deploy/kafka/kafka-local.sh`` runs Kafka from Maven Central jars (Java 17 + Maven)
   on free loopback ports in a temporary directory, and stops it afterwards.

Example::

    with kafka_bootstrap() as bootstrap:
        topic = unique_topic("events")
        create_topics(bootstrap, [topic])

`secured_kafka()` always uses the launcher: one broker with a SASL_SSL listener (SCRAM-SHA-512) and ACLs
enforced, whose `SecuredKafka` adds SCRAM users and ACLs through its admin principal.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from kafka.admin import KafkaAdminClient

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = REPO_ROOT / "deploy" / "kafka" / "kafka-local.sh"
DOCKER_SOCKETS = (Path("/var/run/docker.sock"), Path.home() / ".docker" / "run" / "docker.sock")
TESTCONTAINERS_IMAGE = os.environ.get("KAFKA_TEST_IMAGE", "confluentinc/cp-kafka:7.6.0")

log = logging.getLogger(__name__)
T = TypeVar("T")


@contextmanager
def kafka_bootstrap() -> Iterator[str]:
    """Yield the bootstrap servers of a running Kafka; stop it afterwards if we started it."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if external:
        log.info("using Kafka from KAFKA_BOOTSTRAP_SERVERS=%s", external)
        yield external
    elif docker_available():
        with _testcontainers_kafka() as bootstrap:
            yield bootstrap
    else:
        with _local_kafka() as bootstrap:
            yield bootstrap


def docker_available(timeout: float = 3.0) -> bool:
    """True if a Docker engine answers a ping; cheap when there is no socket at all."""
    if not os.environ.get("DOCKER_HOST") and not any(p.exists() for p in DOCKER_SOCKETS):
        return False
    try:
        import docker

        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as e:  # noqa: BLE001 - any failure means "no usable engine"
        log.info("Docker engine not usable (%s); falling back to the local launcher", e)
        return False


@contextmanager
def _testcontainers_kafka() -> Iterator[str]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers < 4.13 only has the old module path
        from testcontainers.kafka import KafkaContainer

    log.info("starting Kafka with testcontainers (%s)", TESTCONTAINERS_IMAGE)
    with KafkaContainer(TESTCONTAINERS_IMAGE).with_kraft() as container:
        yield container.get_bootstrap_server()


class LauncherError(RuntimeError):
    """kafka-local.sh failed; the message carries the end of its stderr (which has the log tail)."""

    def __init__(self, args: list[str], returncode: int, stderr: str) -> None:
        super().__init__(f"kafka-local.sh {' '.join(args)} exited {returncode}:\n{stderr[-4000:]}")
        self.stderr = stderr


@contextmanager
def _local_kafka(attempts: int = 3) -> Iterator[str]:
    """Run deploy/kafka/kafka-local.sh on free ports in a temporary directory."""
    env = {**os.environ, "PYTHON": sys.executable}
    _run_launcher(["fetch"], env, timeout=900)
    with tempfile.TemporaryDirectory(prefix="kafka-test-") as run_dir:
        try:
            yield _start_local(run_dir, env, attempts)
        finally:
            # Also after a failed or interrupted start: never leave a JVM behind.
            _run_launcher(["stop", "--dir", run_dir], env, timeout=120)


def _start_local(run_dir: str, env: dict[str, str], attempts: int, *options: str) -> str:
    """The last stdout line of `kafka-local.sh start OPTIONS` on free ports (retried if one is taken)."""
    for attempt in range(1, attempts + 1):
        port, controller_port = _free_ports(2)
        args = ["start", *options, "--dir", run_dir, "--port", str(port), "--controller-port", str(controller_port)]
        try:
            return _run_launcher(args, env, timeout=180).strip().splitlines()[-1]
        except LauncherError as e:
            # Another process may take a port between our choosing it and the broker binding it.
            if "already in use" not in e.stderr or attempt == attempts:
                raise
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Acl:
    """One ALLOW rule: `operation` on resource `resource_type` `name` (a literal name, or a prefix)."""

    resource_type: str  # TOPIC, GROUP, TRANSACTIONAL_ID, CLUSTER
    name: str
    operation: str      # READ, WRITE, DESCRIBE, ...
    prefixed: bool = False


@dataclass(frozen=True)
class SecuredKafka:
    """A running SASL_SSL broker with ACLs enforced, and what a client needs to reach it."""

    bootstrap: str
    cafile: str
    mechanism: str
    admin_user: str
    admin_password: str = field(repr=False)

    def client_flags(self, user: str, password_file: Path) -> list[str]:
        """Worker/anomaly-replay/anomaly-train flags for `user` (the password is read from the file)."""
        return ["--bootstrap-servers", self.bootstrap, "--security-protocol", "SASL_SSL", "--sasl-mechanism",
                self.mechanism, "--sasl-username", user, "--sasl-password-file", str(password_file),
                "--ssl-cafile", self.cafile]

    def kafka_python(self, user: str | None = None, password: str | None = None) -> dict[str, object]:
        """kafka-python client options (default: the admin principal, which is a super user)."""
        return {"bootstrap_servers": self.bootstrap, "security_protocol": "SASL_SSL", "sasl_mechanism": self.mechanism,
                "sasl_plain_username": user or self.admin_user, "sasl_plain_password": password or self.admin_password,
                "ssl_cafile": self.cafile}

    def librdkafka(self, user: str | None = None, password: str | None = None) -> dict[str, str | int | float | bool]:
        """confluent-kafka configuration (default: the admin principal)."""
        return {"bootstrap.servers": self.bootstrap, "security.protocol": "SASL_SSL", "sasl.mechanism": self.mechanism,
                "sasl.username": user or self.admin_user, "sasl.password": password or self.admin_password,
                "ssl.ca.location": self.cafile}

    def add_user(self, user: str, password: str, acls: Iterable[Acl] = ()) -> None:
        """Create (or update) SCRAM user `user` and allow it exactly `acls`, both through the admin API."""
        from confluent_kafka.admin import (
            AclBinding,
            AclOperation,
            AclPermissionType,
            AdminClient,
            ResourcePatternType,
            ResourceType,
            ScramCredentialInfo,
            ScramMechanism,
            UserScramCredentialUpsertion,
        )

        admin = AdminClient(self.librdkafka())
        mechanism = ScramMechanism[self.mechanism.replace("-", "_")]
        upsert = UserScramCredentialUpsertion(user, ScramCredentialInfo(mechanism, 4096), password.encode())
        for future in admin.alter_user_scram_credentials([upsert], request_timeout=30).values():
            future.result()
        bindings = [AclBinding(ResourceType[a.resource_type], a.name,
                               ResourcePatternType.PREFIXED if a.prefixed else ResourcePatternType.LITERAL,
                               f"User:{user}", "*", AclOperation[a.operation], AclPermissionType.ALLOW)
                    for a in acls]
        if bindings:
            for future in admin.create_acls(bindings, request_timeout=30).values():
                future.result()

    def create_topics(self, names: Iterable[str], partitions: int = 3) -> list[str]:
        """Create topics as the admin principal and wait until every partition has a leader."""
        names = list(names)
        admin = KafkaAdminClient(client_id="tests-create-topics", **self.kafka_python())  # type: ignore[arg-type]
        try:
            admin.create_topics({name: {"num_partitions": partitions} for name in names}, timeout_ms=30_000)
            admin.wait_for_topics(names, timeout_ms=30_000)
        finally:
            admin.close()
        return names


@contextmanager
def secured_kafka(attempts: int = 3) -> Iterator[SecuredKafka]:
    """Run `kafka-local.sh start --secure` on free ports in a temporary directory; stop it afterwards."""
    env = {**os.environ, "PYTHON": sys.executable}
    _run_launcher(["fetch"], env, timeout=900)
    with tempfile.TemporaryDirectory(prefix="kafka-secure-test-") as run_dir:
        try:
            client = json.loads(_start_local(run_dir, env, attempts, "--secure"))
            yield SecuredKafka(bootstrap=client["bootstrap_servers"], cafile=client["ssl_cafile"],
                               mechanism=client["sasl_mechanism"], admin_user=client["admin_username"],
                               admin_password=Path(client["admin_password_file"]).read_text().strip())
        finally:
            _run_launcher(["stop", "--dir", run_dir], env, timeout=120)


def _run_launcher(args: list[str], env: dict[str, str], timeout: float) -> str:
    """Run the launcher; return its stdout (the bootstrap servers for `start`)."""
    result = subprocess.run(
        ["bash", str(LAUNCHER), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise LauncherError(args, result.returncode, result.stderr)
    log.info("kafka-local.sh %s: %s", args[0], result.stderr.strip())
    return result.stdout


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def unique_topic(prefix: str = "test") -> str:
    """A topic name no other test (or earlier run against the same cluster) uses."""
    safe = re.sub(r"[^a-zA-Z0-9._-]", "-", prefix)
    return f"{safe}-{uuid.uuid4().hex[:12]}"


def create_topics(bootstrap: str, names: Iterable[str], partitions: int = 3, timeout: float = 30.0) -> list[str]:
    """Create topics with the cluster's default replication and wait until every partition has a leader."""
    names = list(names)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tests-create-topics")
    try:
        admin.create_topics(
            {name: {"num_partitions": partitions} for name in names}, timeout_ms=int(timeout * 1000)
        )
        admin.wait_for_topics(names, timeout_ms=int(timeout * 1000))
    finally:
        admin.close()
    return names


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``condition`` until it returns something truthy and return it, or fail after ``timeout`` s.

    Raises AssertionError naming ``what`` (e.g. "all 100 messages consumed") on timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
