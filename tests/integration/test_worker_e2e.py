"""The real worker process against a real broker: parity with anomaly-score, dead letters, metrics, crashes.

One bundle is trained per module with the real `anomaly-train` CLI; every test runs `python -m worker.main`
as a subprocess on its own topics and consumer group, once per Kafka client (`--kafka-client`), and waits
on conditions (committed offsets, metrics) with deadlines, never on sleeps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pandas as pd
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError
from prometheus_client.parser import text_string_to_metric_families

from tests.alert_schema import assert_valid_alerts
from tests.kafka_broker import REPO_ROOT, create_topics, unique_topic, wait_for
from worker.config import KAFKA_CLIENTS
from worker.replay import events as replay_events

pytestmark = pytest.mark.integration

SAMPLE = REPO_ROOT / "data" / "sample" / "nsl-kdd-sample.csv"
BIN = Path(sys.executable).parent
MAX_EVENT_BYTES = 4096
SHUTDOWN_TIMEOUT_S = 20
PARTITIONS = 3

#: Malformed values and the dead-letter reason each must get.
MALFORMED: list[tuple[bytes, str]] = [
    (b'{"duration": 1, "service": ', "invalid_json"),
    (b'{"service": "http\xff\xfe"}', "invalid_utf8"),
    (b'[{"duration": 1}]', "not_an_object"),
    (b'{"hello": "world", "id": "no-features"}', "no_features"),
    (b'{"duration": "long", "service": "http"}', "wrong_type"),
    (b'{"duration": null, "service": "NA", "id": "all-missing"}', "no_features"),
    (b'{"duration": NaN, "service": "http"}', "non_finite"),
    (b'{"duration": 1, "padding": "' + b"x" * (MAX_EVENT_BYTES + 100) + b'"}', "oversized"),
]


# -- fixtures ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Model:
    bundle: Path
    rows: pd.DataFrame          # held-out rows to stream (with an `id` column)
    scored: pd.DataFrame        # anomaly-score's output for `rows`, indexed by id


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    root = tmp_path_factory.mktemp("worker-e2e")
    sample = pd.read_csv(SAMPLE)
    shuffled = sample.sample(frac=1.0, random_state=7).reset_index(drop=True)
    train, rows = shuffled.iloc[:1500], shuffled.iloc[1500:1800].copy()
    train_csv = root / "train.csv"
    train.to_csv(train_csv, index=False)
    bundle = root / "bundle"
    _check_run([BIN / "anomaly-train", "--data", train_csv, "--out", bundle, "--label-column", "label",
                "--normal-value", "normal", "--drop", "difficulty", "--epochs", "5", "--seed", "3"])
    rows.insert(0, "id", [f"row-{i}" for i in range(len(rows))])
    rows_csv = root / "rows.csv"
    rows.to_csv(rows_csv, index=False)
    scored_csv = root / "scored.csv"
    _check_run([BIN / "anomaly-score", "--model", bundle, "--data", rows_csv, "--out", scored_csv,
                "--passthrough", "id"])
    scored = pd.read_csv(scored_csv).set_index("id")
    assert 0 < scored["is_anomaly"].sum() < len(scored), "the held-out rows need both anomalies and normals"
    return Model(bundle=bundle, rows=rows, scored=scored)


def _check_run(cmd: list) -> None:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, f"{cmd[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def event_values(rows: pd.DataFrame, tmp: Path) -> list[bytes]:
    """The rows as the JSON events anomaly-replay would send (same code path)."""
    path = tmp / f"events-{len(rows)}.csv"
    rows.to_csv(path, index=False)
    return [value for _key, value in replay_events(path, None, None)]


@dataclass
class Topics:
    input: str
    alerts: str
    dead_letters: str
    group: str


@pytest.fixture
def topics(kafka_bootstrap: str) -> Topics:
    t = Topics(unique_topic("events"), unique_topic("alerts"), unique_topic("dlq"), unique_topic("group"))
    create_topics(kafka_bootstrap, [t.input, t.alerts, t.dead_letters], partitions=PARTITIONS)
    return t


class WorkerProcess:
    def __init__(self, cmd: list[str], log_path: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.log_path, self.port = log_path, port
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(params=KAFKA_CLIENTS)
def kafka_client(request: pytest.FixtureRequest) -> str:
    """Every worker test runs once per Kafka client."""
    return str(request.param)


@pytest.fixture
def start_worker(model: Model, kafka_bootstrap: str, tmp_path: Path, kafka_client: str,
                 request: pytest.FixtureRequest) -> Iterator[Callable[[Topics], WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(t: Topics) -> WorkerProcess:
        port = _free_port()
        cmd = [sys.executable, "-m", "worker.main", "--model", str(model.bundle), "--kafka-client", kafka_client,
               "--bootstrap-servers", kafka_bootstrap, "--input-topic", t.input, "--alert-topic", t.alerts,
               "--dead-letter-topic", t.dead_letters, "--group-id", t.group, "--metrics-host", "127.0.0.1",
               "--metrics-port", str(port), "--max-wait-ms", "100", "--max-event-bytes", str(MAX_EVENT_BYTES),
               "--shutdown-timeout-s", str(SHUTDOWN_TIMEOUT_S), "--kafka-timeout-s", "10",
               # kafka-python 3.0.12 can stall in a rebalance; the worker replaces such a consumer after this.
               "--rejoin-timeout-s", "30"]
        worker = WorkerProcess(cmd, tmp_path / f"worker-{len(started)}.log", port)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()  # always: never leave a worker behind
        # Shown by pytest when the test failed.
        print(f"--- {worker.log_path.name} (exit {worker.proc.returncode}) ---\n{worker.output()[-6000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- Kafka helpers -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sent:
    value: bytes
    partition: int
    offset: int


def produce(bootstrap: str, topic: str, values: list[bytes]) -> list[Sent]:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=512 * 1024,
                             max_request_size=8 * 1024 * 1024)
    try:
        futures = [producer.send(topic, value=v, partition=i % PARTITIONS) for i, v in enumerate(values)]
        producer.flush(timeout=60)
        meta = [f.get(timeout=60) for f in futures]
    finally:
        producer.close(timeout=10)
    return [Sent(v, m.partition, m.offset) for v, m in zip(values, meta, strict=True)]


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: o for tp, o in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="tests-offsets")
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
    except KafkaError:  # e.g. the coordinator is still loading right after the broker started: nothing yet
        return {}
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if tp.topic == topic and meta.offset >= 0}


def wait_all_committed(bootstrap: str, t: Topics, worker: WorkerProcess, timeout: float) -> dict[int, int]:
    ends = end_offsets(bootstrap, t.input)

    def done() -> dict[int, int] | None:
        assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
        got = committed(bootstrap, t.group, t.input)
        return got if all(got.get(p, 0) >= end for p, end in ends.items()) else None

    return wait_for(done, timeout, f"group {t.group} to commit {ends}", interval=0.25)


@dataclass(frozen=True)
class Consumed:
    value: bytes
    key: bytes | None
    headers: dict[str, bytes]


def read_all(bootstrap: str, topic: str) -> list[Consumed]:
    """Every record currently in `topic` (up to the end offsets at the time of the call)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_bytes=64 * 1024 * 1024)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[Consumed] = []
        deadline = time.monotonic() + 60
        while any(consumer.position(tp) < ends[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            for batch in consumer.poll(timeout_ms=500).values():
                out.extend(Consumed(m.value, m.key, dict(m.headers)) for m in batch)
        return out
    finally:
        consumer.close()


def scrape(worker: WorkerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(worker.url("/metrics"), timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def http_status(worker: WorkerProcess, path: str) -> int:
    try:
        with urllib.request.urlopen(worker.url(path), timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def anomalous_ids(model: Model) -> set[str]:
    return set(model.scored.index[model.scored["is_anomaly"] == 1])


# -- tests ---------------------------------------------------------------------------------------

def test_alerts_match_anomaly_score_and_bad_events_are_dead_lettered(
        model: Model, kafka_bootstrap: str, topics: Topics, start_worker: Callable[[Topics], WorkerProcess],
        tmp_path: Path) -> None:
    good = event_values(model.rows, tmp_path)
    # Poison pills that used to stop the partition for good: event times no datetime can hold.
    for i, when in enumerate(["9999-12-31T23:59:59-12:00", 1e20, -1e12]):
        good[i] = orjson.dumps({**orjson.loads(good[i]), "timestamp": when})
    values = list(good)
    for i, (bad, _reason) in enumerate(MALFORMED):  # spread the bad ones through the stream
        values.insert(1 + i * (len(good) // len(MALFORMED)), bad)
    sent = produce(kafka_bootstrap, topics.input, values)

    worker = start_worker(topics)
    wait_for(lambda: http_status(worker, "/readyz") == 200, 90, "/readyz to answer 200")
    wait_all_committed(kafka_bootstrap, topics, worker, timeout=90)
    topic_label = (("topic", topics.input),)
    # At least once: a rebalance while the group forms may deliver a record twice (same alert id).
    wait_for(lambda: (scrape(worker).get(("anomaly_events_consumed_total", topic_label)) or 0) >= len(values), 15,
             f"anomaly_events_consumed_total >= {len(values)}")
    assert http_status(worker, "/readyz") == 200 and http_status(worker, "/healthz") == 200

    # Parity: the alerted events are exactly the rows anomaly-score flags, with the same scores.
    alerts = [orjson.loads(r.value) for r in read_all(kafka_bootstrap, topics.alerts)]
    assert_valid_alerts(alerts)
    alerted = {a["event_id"]: a for a in alerts}
    assert set(alerted) == anomalous_ids(model)
    same_id: dict[str, set] = {}
    for a in alerts:
        same_id.setdefault(a["alert_id"], set()).add(a["event_id"])
    assert all(len(ids) == 1 for ids in same_id.values()), "a duplicate alert must carry the same alert id"
    assert len(same_id) == len(alerted), "one alert id per anomalous event"
    for event_id, alert in alerted.items():
        assert alert["score"] == pytest.approx(model.scored.loc[event_id, "score"], rel=1e-5)
        assert alert["score"] > alert["threshold"]
        assert alert["top_features"] and alert["top_features"][0]["field"] in model.rows.columns
    by_value = {s.value: s for s in sent}
    for alert in alerts:
        source = alert["source"]
        assert source["topic"] == topics.input
        original = next(s for s in sent if (s.partition, s.offset) == (source["partition"], source["offset"]))
        assert orjson.loads(original.value)["id"] == alert["event_id"]
        assert alert["alert_id"].endswith(f"/{topics.input}/{source['partition']}/{source['offset']}")

    # Dead letters: original bytes, reason and source coordinates.
    letters = read_all(kafka_bootstrap, topics.dead_letters)
    got = {letter.value: letter.headers for letter in letters}
    assert set(got) == {bad for bad, _ in MALFORMED}
    for bad, reason in MALFORMED:
        assert bad in got, f"{reason} event missing from the dead-letter topic"
        headers, origin = got[bad], by_value[bad]
        assert headers["dlq.reason"] == reason.encode()
        assert headers["dlq.source.topic"] == topics.input.encode()
        assert headers["dlq.source.partition"] == str(origin.partition).encode()
        assert headers["dlq.source.offset"] == str(origin.offset).encode()
        assert headers["dlq.error"]

    # The metrics agree exactly with what reached the topics (duplicates included).
    metrics = scrape(worker)
    consumed = metrics[("anomaly_events_consumed_total", topic_label)]
    scored = metrics[("anomaly_events_scored_total", topic_label)]
    assert consumed >= len(values) and scored >= len(good)
    assert consumed - scored == len(letters)
    assert metrics[("anomaly_alerts_published_total", topic_label)] == len(alerts)
    for _bad, reason in MALFORMED:
        key = ("anomaly_dead_letters_total", (("reason", reason), ("topic", topics.input)))
        assert metrics[key] == sum(1 for x in letters if x.headers["dlq.reason"] == reason.encode()) >= 1, reason
    assert metrics[("anomaly_dead_letters_total", (("reason", "processing_error"), ("topic", topics.input)))] == 0
    assert metrics[("anomaly_worker_ready", ())] == 1
    assert http_status(worker, "/readyz") == 200


@pytest.fixture(scope="module")
def backlog(model: Model, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[Sent]]:
    """A topic with ~15k events (held-out rows repeated under distinct ids) and a bad event every 1000."""
    base = event_values(model.rows, tmp_path_factory.mktemp("backlog"))
    values: list[bytes] = []
    for copy in range(50):
        for value in base:
            event = orjson.loads(value)
            event["id"] = f"{event['id']}/{copy}"
            values.append(orjson.dumps(event))
            if len(values) % 1000 == 999:
                values.append(MALFORMED[len(values) // 1000 % len(MALFORMED)][0])
    topic = unique_topic("backlog")
    create_topics(kafka_bootstrap, [topic], partitions=PARTITIONS)
    return topic, produce(kafka_bootstrap, topic, values)


def _topics_on(kafka_bootstrap: str, input_topic: str) -> Topics:
    t = Topics(input_topic, unique_topic("alerts"), unique_topic("dlq"), unique_topic("group"))
    create_topics(kafka_bootstrap, [t.alerts, t.dead_letters], partitions=PARTITIONS)
    return t


def _wait_partly_committed(kafka_bootstrap: str, t: Topics, worker: WorkerProcess, total: int) -> int:
    def progress() -> int:
        assert worker.proc.poll() is None, f"worker exited with {worker.proc.returncode}"
        return sum(committed(kafka_bootstrap, t.group, t.input).values())

    done = wait_for(progress, 90, "a first offset commit", interval=0.05)
    assert done < total, f"the worker finished all {total} events before it could be interrupted"
    return done


@pytest.mark.slow_integration("kafka-python")  # for time: CI runs the confluent case (scripts/slow.sh both)
def test_sigkill_mid_stream_loses_nothing(model: Model, kafka_bootstrap: str, backlog: tuple[str, list[Sent]],
                                         start_worker: Callable[[Topics], WorkerProcess]) -> None:
    topic, sent = backlog
    t = _topics_on(kafka_bootstrap, topic)
    first = start_worker(t)
    _wait_partly_committed(kafka_bootstrap, t, first, len(sent))
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=30)

    # The same group again: it resumes from the last commit (after the dead member's session expires).
    second = start_worker(t)
    wait_all_committed(kafka_bootstrap, t, second, timeout=150)

    alerts = [orjson.loads(r.value) for r in read_all(kafka_bootstrap, t.alerts)]
    assert_valid_alerts(alerts)
    ids_by_source: dict[tuple[int, int], set[str]] = defaultdict(set)
    for a in alerts:
        ids_by_source[(a["source"]["partition"], a["source"]["offset"])].add(a["alert_id"])
    assert all(len(ids) == 1 for ids in ids_by_source.values()), "a replayed event must keep its alert id"

    anomalous = anomalous_ids(model)
    expected = set()
    for s in sent:
        if not any(s.value == b for b, _ in MALFORMED):
            event_id = orjson.loads(s.value)["id"]
            if event_id.split("/")[0] in anomalous:
                expected.add(event_id)
    alerted = {a["event_id"] for a in alerts}
    assert expected, "the backlog needs anomalies"
    assert alerted == expected, (f"{len(expected - alerted)} anomalous events never alerted; "
                                 f"{len(alerted - expected)} unexpected alerts")

    bad = {(s.partition, s.offset) for s in sent if any(s.value == b for b, _ in MALFORMED)}
    letters = {(int(r.headers["dlq.source.partition"]), int(r.headers["dlq.source.offset"]))
               for r in read_all(kafka_bootstrap, t.dead_letters)}
    assert bad and letters == bad


def test_sigterm_finishes_the_batch_commits_and_exits_zero(
        model: Model, kafka_bootstrap: str, backlog: tuple[str, list[Sent]],
        start_worker: Callable[[Topics], WorkerProcess]) -> None:
    topic, sent = backlog
    t = _topics_on(kafka_bootstrap, topic)
    worker = start_worker(t)
    _wait_partly_committed(kafka_bootstrap, t, worker, len(sent))
    signalled = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    rc = worker.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 10)
    elapsed = time.monotonic() - signalled
    assert rc == 0, f"exit code {rc}"
    assert elapsed < SHUTDOWN_TIMEOUT_S, f"took {elapsed:.1f} s to stop"
    assert "stopped after finishing the current batch" in worker.output()

    # Everything consumed was committed: the alerts and dead letters published are exactly those of the
    # events below the committed offsets (a batch handled but not committed would show up above them).
    final = committed(kafka_bootstrap, t.group, t.input)
    anomalous = anomalous_ids(model)
    expected_alerts, expected_letters = set(), set()
    for s in sent:
        if s.offset >= final.get(s.partition, 0):
            continue
        if any(s.value == b for b, _ in MALFORMED):
            expected_letters.add((s.partition, s.offset))
        elif orjson.loads(s.value)["id"].split("/")[0] in anomalous:
            expected_alerts.add((s.partition, s.offset))
    alerts = [orjson.loads(r.value) for r in read_all(kafka_bootstrap, t.alerts)]
    assert_valid_alerts(alerts)
    got_alerts = [(a["source"]["partition"], a["source"]["offset"]) for a in alerts]
    assert len(got_alerts) == len(set(got_alerts)), "no duplicates in a clean shutdown"
    assert set(got_alerts) == expected_alerts
    letters = {(int(r.headers["dlq.source.partition"]), int(r.headers["dlq.source.offset"]))
               for r in read_all(kafka_bootstrap, t.dead_letters)}
    assert letters == expected_letters
