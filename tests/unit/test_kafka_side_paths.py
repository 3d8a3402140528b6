"""The side paths' Kafka edge without a broker: the topic reader's loops (worker/kafka/reader.py) on a fake
reader, and anomaly-replay and anomaly-train --from-kafka handing the same settings to either client.

The same on a real broker, per client: tests/integration/test_train_from_kafka.py, test_secured_broker.py.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from training import cli as train_cli
from training import kafka_window
from training.errors import DataError
from worker import replay
from worker.config import KAFKA_CLIENTS
from worker.kafka import producer_confluent, producer_kafka_python, reader_confluent, reader_kafka_python
from worker.kafka.connection import Connection
from worker.kafka.reader import Message, ReadError, WindowTooSlow, follow, read_window

PASSWORD = "s3cret-for-unit-tests"
FLAGS = ["--security-protocol", "SASL_SSL", "--sasl-mechanism", "SCRAM-SHA-512", "--sasl-username", "svc",
         "--ssl-cafile", "/ca.pem"]
REPO = Path(__file__).resolve().parents[2]


class FakeReader:
    """A topic held in memory, read as the adapters read it: `poll` hands out up to `batch` records."""

    def __init__(self, records: dict[int, list[bytes]], times: dict[int, list[int]] | None = None,
                 batch: int = 2, exists_after: int = 0) -> None:
        self.records, self.times, self.batch = records, times or {}, batch
        self.exists_after = exists_after  # metadata requests answered "no such topic" first
        self.positions: dict[int, int] = {}

    def partitions(self, topic: str) -> list[int] | None:
        if self.exists_after:
            self.exists_after -= 1
            return None
        return sorted(self.records)

    def bounds(self, topic: str, partitions: list[int], since_ms: int | None) -> dict[int, tuple[int, int]]:
        def start(p: int) -> int:
            if since_ms is None:
                return 0
            return next((i for i, t in enumerate(self.times[p]) if t >= since_ms), len(self.records[p]))

        return {p: (start(p), len(self.records[p])) for p in partitions}

    def assign(self, topic: str, starts: Mapping[int, int]) -> None:
        self.positions = dict(starts)

    def poll(self, timeout_s: float) -> list[Message]:
        out = []
        for p, at in self.positions.items():
            chunk = self.records[p][at:at + self.batch]
            out += [Message(p, at + i, value) for i, value in enumerate(chunk)]
            self.positions[p] = at + len(chunk)
        return out

    def position(self, topic: str, partition: int) -> int:
        return self.positions[partition]

    def close(self) -> None:
        pass


def values(messages: list[Message]) -> list[bytes | None]:
    return [m.value for m in messages]


def test_a_window_is_read_partition_by_partition_up_to_the_limit() -> None:
    reader = FakeReader({1: [b"b0", b"b1", b"b2"], 0: [b"a0", b"a1", b"a2"]})
    assert values(list(read_window(reader, "t", 100))) == [b"a0", b"a1", b"a2", b"b0", b"b1", b"b2"]
    assert values(list(read_window(FakeReader(reader.records), "t", 4))) == [b"a0", b"a1", b"a2", b"b0"]


def test_a_window_since_a_time_starts_at_the_first_record_at_or_after_it() -> None:
    reader = FakeReader({0: [b"a0", b"a1"], 1: [b"b0", b"b1"]}, times={0: [10, 20], 1: [5, 30]})
    assert values(list(read_window(reader, "t", 100, since_ms=20))) == [b"a1", b"b1"]
    assert list(read_window(FakeReader(reader.records, reader.times), "t", 100, since_ms=31)) == []


def test_a_window_that_takes_too_long_stops_by_the_clock() -> None:
    class Stuck(FakeReader):
        def poll(self, timeout_s: float) -> list[Message]:
            now[0] += timeout_s
            return []

    now = [0.0]
    with pytest.raises(WindowTooSlow, match="longer than 5 s"):
        list(read_window(Stuck({0: [b"x"]}), "t", 10, timeout_s=5, clock=lambda: now[0]))
    with pytest.raises(ReadError, match="no such topic"):
        list(read_window(FakeReader({}), "t", 10))


def test_follow_waits_for_the_topic_then_feeds_every_record_from_the_beginning() -> None:
    reader, stop, seen = FakeReader({0: [b"a0", b"a1", b"a2"], 1: [b"b0"]}, exists_after=2), threading.Event(), []

    def on_message(message: Message) -> None:
        seen.append(message.value)
        if len(seen) == 4:
            stop.set()

    follow(reader, "t", on_message, stop, topic_wait_s=0.001)
    assert sorted(seen) == [b"a0", b"a1", b"a2", b"b0"] and reader.exists_after == 0


# -- both clients get the same settings ------------------------------------------------------------

class Refused(Exception):
    pass


def refusing_client(client: str, monkeypatch: pytest.MonkeyPatch, made: dict[str, Any]) -> None:
    """Replace `client`'s consumer and producer with ones that record their settings and cannot connect."""
    if client == "kafka-python":
        from kafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

        def consumer(**kwargs: Any) -> Any:
            made.update(kwargs)
            raise KafkaConnectionError()

        class Producer:
            def __init__(self, **kwargs: Any) -> None:
                made.update(kwargs)

            def send(self, topic: str, key: bytes | None, value: bytes) -> Any:
                raise TopicAuthorizationFailedError(topic)

            def close(self, timeout: float) -> None:
                pass

        monkeypatch.setattr(reader_kafka_python, "KafkaConsumer", consumer)
        monkeypatch.setattr(producer_kafka_python, "KafkaProducer", Producer)
        return
    from confluent_kafka import KafkaError, KafkaException

    class Client:
        def __init__(self, conf: dict[str, Any]) -> None:
            made.update(conf)
            self.reports: list[Any] = []

        def list_topics(self, topic: str | None = None, timeout: float = 0) -> Any:
            if "group.id" in made:  # the reader: no broker
                raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Broker transport failure"))
            return None

        def poll(self, timeout: float) -> int:
            return 0

        def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Any) -> None:
            message = type("M", (), {"topic": lambda self: topic})()
            self.reports.append(lambda: on_delivery(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), message))

        def flush(self, timeout: float = 0) -> int:
            for report in self.reports:
                report()
            self.reports = []
            return 0

        def close(self) -> None:
            pass

    monkeypatch.setattr(reader_confluent, "Consumer", Client)
    monkeypatch.setattr(producer_confluent, "Producer", Client)


def password_of(client: str, made: dict[str, Any]) -> Any:
    return made.get("sasl_plain_password" if client == "kafka-python" else "sasl.password")


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_replay_passes_the_security_settings_to_its_producer(client: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    made: dict[str, Any] = {}
    refusing_client(client, monkeypatch, made)
    monkeypatch.setenv("ANOMALY_SASL_PASSWORD", PASSWORD)
    data = tmp_path / "rows.csv"
    data.write_text("a,b\n1,2\n")
    assert replay.main(["--data", str(data), "--topic", "events", "--kafka-client", client, *FLAGS]) == 1
    assert password_of(client, made) == PASSWORD
    assert made.get("ssl_cafile", made.get("ssl.ca.location")) == "/ca.pem"
    err = capsys.readouterr().err
    assert "needs WRITE on TOPIC 'events'" in err and PASSWORD not in err and err.count("\n") == 1


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_train_from_kafka_passes_the_security_settings_to_its_consumer(
        client: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    made: dict[str, Any] = {}
    refusing_client(client, monkeypatch, made)
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    monkeypatch.setenv("ANOMALY_KAFKA_CLIENT", client)  # the variable as well as the flag
    code = train_cli.train_main(["--from-kafka", "--bootstrap-servers", "k:9093", "--topic", "events", "--out",
                                 str(tmp_path / "b"), *FLAGS, "--sasl-password-file", str(password_file)])
    assert code == 2
    assert password_of(client, made) == PASSWORD
    assert made.get("sasl_mechanism", made.get("sasl.mechanism")) == "SCRAM-SHA-512"
    assert made.get("ssl_cafile", made.get("ssl.ca.location")) == "/ca.pem"
    err = capsys.readouterr().err
    assert err.startswith("anomaly-train: error: kafka:events: cannot reach Kafka") and PASSWORD not in err


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_read_window_defaults_to_plaintext(client: str, monkeypatch: pytest.MonkeyPatch) -> None:
    made: dict[str, Any] = {}
    refusing_client(client, monkeypatch, made)
    with pytest.raises(DataError):
        kafka_window.read_window(Connection("k:9092", client=client), "events", 10)
    assert made.get("security_protocol", made.get("security.protocol")) == "PLAINTEXT"
    assert password_of(client, made) is None


def test_the_confluent_worker_never_imports_kafka_python() -> None:
    """The default worker with --feedback-topic, its feedback reader built by the wiring and run until it
    has tried the (absent) broker: kafka-python is not loaded."""
    script = """
import logging, sys, threading
from pathlib import Path
from types import SimpleNamespace
from prometheus_client import CollectorRegistry
import worker.main
from worker.config import from_args
from worker.metrics import WorkerMetrics
from worker.wiring import start_feedback

tried = threading.Event()
class Tried(logging.Handler):
    def emit(self, record): tried.set()
logging.getLogger("worker.kafka.feedback").addHandler(Tried())
settings = from_args(["--model", "m", "--bootstrap-servers", "127.0.0.1:1", "--input-topic", "i", "--alert-topic",
                      "a", "--dead-letter-topic", "d", "--group-id", "g", "--feedback-topic", "fb",
                      "--kafka-timeout-s", "1"], environ={})
assert settings.kafka_client == "confluent"
runtime = SimpleNamespace(settings=settings, bundle=SimpleNamespace(version="v1"), shadow=None,
                          metrics=WorkerMetrics(CollectorRegistry()))
reader = start_feedback(runtime)
assert tried.wait(30), "the feedback reader never tried the broker"
reader.stop()
assert "kafka" not in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] == "kafka")
assert "confluent_kafka" in sys.modules
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


class RefusedLogin:
    """A librdkafka client with a wrong password: metadata fails as a transport error; error_cb says why (in
    poll)."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf

    def list_topics(self, topic: str | None = None, timeout: float = 0) -> None:
        from confluent_kafka import KafkaError, KafkaException

        raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Local: Broker transport failure"))

    def poll(self, timeout: float) -> None:
        from confluent_kafka import KafkaError

        self.conf["error_cb"](KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: Authentication "
                                                                     "failed due to invalid credentials"))

    def close(self) -> None:
        pass


@pytest.mark.parametrize("side", ["reader", "producer"])
def test_confluent_side_paths_name_a_refused_login_without_the_password(side: str) -> None:
    from worker.config import KafkaSecurity, Secret
    from worker.kafka.producer import SendError

    security = KafkaSecurity(protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="svc",
                             sasl_password=Secret(PASSWORD))
    connection = Connection("k:9093", security)
    with pytest.raises((ReadError, SendError), match="authentication failed: SCRAM-SHA-512 login as 'svc'") as caught:
        if side == "reader":
            reader_confluent.ConfluentReader(connection, consumer_factory=RefusedLogin).partitions("t")
        else:
            producer_confluent.ConfluentProducer(connection, producer_factory=RefusedLogin)
    assert PASSWORD not in str(caught.value)
