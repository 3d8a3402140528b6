"""Registry value formats on a real schema registry (Apicurio) and a real broker.

Events are nested (`{"id": ..., "conn": {...NSL-KDD fields...}}`) and written by confluent-kafka's own
serializers (Avro, Protobuf), not ours. The worker's alerts must be exactly `anomaly-score`'s on the same
rows as nested JSON Lines; `anomaly-train --from-kafka` on the Avro topic must learn the same fields as from
the file; and a registry stopped mid-stream must leave the batch undecided (not ready, nothing committed,
no dead letter) until it is started again, then every event is decided once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass

from tests.alert_schema import assert_valid_alerts
from tests.integration.test_worker_e2e import (
    BIN,
    SAMPLE,
    Topics,
    WorkerProcess,
    _check_run,
    _free_port,
    committed,
    create_topics,
    http_status,
    produce,
    read_all,
    scrape,
    wait_all_committed,
)
from tests.kafka_broker import REPO_ROOT, unique_topic, wait_for
from tests.schema_registry import SchemaRegistry

pytestmark = pytest.mark.integration

CATEGORICAL = ("protocol_type", "service", "flag")


@dataclass(frozen=True)
class NestedModel:
    bundle: Path
    rows: list[dict[str, Any]]  # nested events (id at the top, the NSL-KDD fields under "conn")
    anomalous: set[str]         # ids anomaly-score flags
    scores: dict[str, float]    # anomaly-score's score per id
    fields: list[str]           # the bundle's feature names


def nested(row: dict[str, Any], event_id: str) -> dict[str, Any]:
    return {"id": event_id, "conn": {k: (str(v) if k in CATEGORICAL else float(v)) for k, v in row.items()}}


@pytest.fixture(scope="module")
def nested_model(tmp_path_factory: pytest.TempPathFactory) -> NestedModel:
    """A bundle trained on nested JSON Lines, and anomaly-score's verdicts on held-out nested rows."""
    root = tmp_path_factory.mktemp("value-formats")
    sample = pd.read_csv(SAMPLE).drop(columns=["difficulty"]).sample(frac=1.0, random_state=11)
    train = [nested({k: v for k, v in r.items() if k != "label"}, f"t-{i}") | {"label": r["label"]}
             for i, r in enumerate(sample.iloc[:1200].to_dict("records"))]
    held = [nested(r, f"row-{i}") for i, r in enumerate(sample.iloc[1200:1400].drop(columns=["label"])
                                                       .to_dict("records"))]
    (root / "train.jsonl").write_text("\n".join(json.dumps(e) for e in train))
    (root / "rows.jsonl").write_text("\n".join(json.dumps(e) for e in held))
    _check_run([BIN / "anomaly-train", "--data", root / "train.jsonl", "--out", root / "bundle", "--label-column",
                "label", "--normal-value", "normal", "--drop", "id", "--epochs", "4", "--ensemble", "1", "--seed", "2"])
    _check_run([BIN / "anomaly-score", "--model", root / "bundle", "--data", root / "rows.jsonl", "--out",
                root / "scored.csv", "--passthrough", "id"])
    scored = pd.read_csv(root / "scored.csv").set_index("id")
    anomalous = set(scored.index[scored["is_anomaly"] == 1])
    assert 0 < len(anomalous) < len(held), "the held-out rows need both anomalies and normals"
    fields = [f["name"] for f in json.loads((root / "bundle" / "features.json").read_text())["fields"]]
    assert "conn.src_bytes" in fields and "conn.service" in fields  # nested fields are paths
    return NestedModel(root / "bundle", held, anomalous, scored["score"].to_dict(), fields)


# -- the producers: confluent-kafka's own serializers ---------------------------------------------

def avro_schema(extra: bool = False) -> str:
    names = [c for c in pd.read_csv(SAMPLE, nrows=1).columns if c not in ("label", "difficulty")]
    conn = [{"name": n, "type": "string" if n in CATEGORICAL else "double"} for n in names]
    fields: list[dict[str, Any]] = [{"name": "id", "type": "string"},
                                    {"name": "conn", "type": {"type": "record", "name": "Conn", "fields": conn}}]
    if extra:  # schema v2: an added optional field (a compatible evolution)
        fields.append({"name": "sensor", "type": ["null", "string"], "default": None})
    return json.dumps({"type": "record", "name": "Connection", "namespace": "anomaly.test", "fields": fields})


def protobuf_classes() -> tuple[Any, Any]:
    """The Connection message and its nested Conn, built at run time from a descriptor (no protoc)."""
    names = [c for c in pd.read_csv(SAMPLE, nrows=1).columns if c not in ("label", "difficulty")]
    proto = descriptor_pb2.FileDescriptorProto(name="e2e_connection.proto", package="anomaly.e2e", syntax="proto3")
    conn = proto.message_type.add(name="Conn")
    kind = descriptor_pb2.FieldDescriptorProto
    for number, name in enumerate(names, start=1):
        conn.field.add(name=name, number=number, label=kind.LABEL_OPTIONAL,
                       type=kind.TYPE_STRING if name in CATEGORICAL else kind.TYPE_DOUBLE)
    top = proto.message_type.add(name="Connection")
    top.field.add(name="id", number=1, type=kind.TYPE_STRING, label=kind.LABEL_OPTIONAL)
    top.field.add(name="conn", number=2, type=kind.TYPE_MESSAGE, type_name=".anomaly.e2e.Conn",
                  label=kind.LABEL_OPTIONAL)
    pool = descriptor_pool.Default()
    try:
        pool.FindMessageTypeByName("anomaly.e2e.Connection")
    except KeyError:
        pool.Add(proto)
    return (GetMessageClass(pool.FindMessageTypeByName("anomaly.e2e.Connection")),
            GetMessageClass(pool.FindMessageTypeByName("anomaly.e2e.Conn")))


def serialized(fmt: str, url: str, topic: str, events: list[dict[str, Any]], extra: bool = False) -> list[bytes]:
    client = SchemaRegistryClient({"url": url})
    context = SerializationContext(topic, MessageField.VALUE)
    if fmt == "avro":
        avro = AvroSerializer(client, avro_schema(extra))
        return [avro(e | ({"sensor": "s1"} if extra else {}), context) for e in events]
    connection, conn = protobuf_classes()
    proto = ProtobufSerializer(connection, client, {"use.deprecated.format": False})
    return [proto(connection(id=e["id"], conn=conn(**e["conn"])), context) for e in events]


# -- the worker ------------------------------------------------------------------------------------

@pytest.fixture
def run_worker(nested_model: NestedModel, kafka_bootstrap: str, schema_registry: SchemaRegistry,
               tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(t: Topics, fmt: str) -> WorkerProcess:
        port = _free_port()
        cmd = [sys.executable, "-m", "worker.main", "--model", str(nested_model.bundle), "--bootstrap-servers",
               kafka_bootstrap, "--input-topic", t.input, "--alert-topic", t.alerts, "--dead-letter-topic",
               t.dead_letters, "--group-id", t.group, "--metrics-host", "127.0.0.1", "--metrics-port", str(port),
               "--max-wait-ms", "100", "--max-batch", "50", "--kafka-timeout-s", "10", "--value-format", fmt,
               "--schema-registry-url", schema_registry.url, "--schema-registry-timeout-s", "2",
               "--retry-backoff-max-s", "1"]
        worker = WorkerProcess(cmd, tmp_path / f"worker-{len(started)}.log", port)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
        print(f"--- {worker.log_path.name} (exit {worker.proc.returncode}) ---\n{worker.output()[-6000:]}")


def new_topics(kafka_bootstrap: str) -> Topics:
    t = Topics(unique_topic("vf-events"), unique_topic("vf-alerts"), unique_topic("vf-dlq"), unique_topic("vf-group"))
    create_topics(kafka_bootstrap, [t.input, t.alerts, t.dead_letters], partitions=3)
    return t


def alerts_of(kafka_bootstrap: str, t: Topics) -> list[dict[str, Any]]:
    alerts = [json.loads(record.value) for record in read_all(kafka_bootstrap, t.alerts)]
    assert_valid_alerts(alerts)
    return alerts


@pytest.mark.parametrize("fmt", ["avro", "protobuf"])
def test_alerts_from_registry_records_are_anomaly_scores_on_the_same_rows(
        fmt: str, nested_model: NestedModel, kafka_bootstrap: str, schema_registry: SchemaRegistry,
        run_worker: Callable[..., WorkerProcess]) -> None:
    t = new_topics(kafka_bootstrap)
    produce(kafka_bootstrap, t.input, serialized(fmt, schema_registry.url, t.input, nested_model.rows))
    worker = run_worker(t, fmt)
    wait_all_committed(kafka_bootstrap, t, worker, timeout=120)
    alerts = alerts_of(kafka_bootstrap, t)
    assert {a["event_id"] for a in alerts} == nested_model.anomalous
    assert len(alerts) == len(nested_model.anomalous)
    for alert in alerts:
        assert alert["score"] == pytest.approx(nested_model.scores[alert["event_id"]], rel=1e-4)
    assert read_all(kafka_bootstrap, t.dead_letters) == []
    metrics = scrape(worker)
    assert metrics[("anomaly_value_schemas_total", (("outcome", "complete"),))] == 1


def test_training_from_an_avro_topic_learns_the_fields_the_file_gives(
        nested_model: NestedModel, kafka_bootstrap: str, schema_registry: SchemaRegistry, tmp_path: Path) -> None:
    topic = unique_topic("vf-train")
    create_topics(kafka_bootstrap, [topic], partitions=3)
    produce(kafka_bootstrap, topic, serialized("avro", schema_registry.url, topic, nested_model.rows))
    result = subprocess.run([str(BIN / "anomaly-train"), "--from-kafka", "--bootstrap-servers", kafka_bootstrap,
                             "--topic", topic, "--value-format", "avro", "--schema-registry-url", schema_registry.url,
                             "--out", str(tmp_path / "from-topic"), "--drop", "id", "--epochs", "1",
                             "--ensemble", "1"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{len(nested_model.rows)} events read" in result.stdout + result.stderr
    schema = json.loads((tmp_path / "from-topic" / "features.json").read_text())
    assert [f["name"] for f in schema["fields"]] == nested_model.fields


def test_a_registry_stopped_mid_stream_holds_the_batch_until_it_returns_and_loses_nothing(
        nested_model: NestedModel, kafka_bootstrap: str, schema_registry: SchemaRegistry,
        run_worker: Callable[..., WorkerProcess]) -> None:
    t = new_topics(kafka_bootstrap)
    first, second = nested_model.rows[:100], nested_model.rows[100:]
    produce(kafka_bootstrap, t.input, serialized("avro", schema_registry.url, t.input, first))
    worker = run_worker(t, "avro")
    wait_all_committed(kafka_bootstrap, t, worker, timeout=120)
    # Schema v2 (an added optional field) is registered now, its records produced while the registry is down:
    # the worker has never seen its id, so it must ask the registry for it.
    later = serialized("avro", schema_registry.url, t.input, second, extra=True)
    before = committed(kafka_bootstrap, t.group, t.input)
    schema_registry.stop()
    try:
        produce(kafka_bootstrap, t.input, later)
        wait_for(lambda: http_status(worker, "/readyz") == 503, 60, "the worker to turn not ready")
        wait_for(lambda: scrape(worker).get(("anomaly_schema_registry_failures_total", ()), 0) >= 2, 60,
                 "the worker to retry the undecided batch")
        assert committed(kafka_bootstrap, t.group, t.input) == before, "nothing may be committed while undecided"
        assert read_all(kafka_bootstrap, t.dead_letters) == [], "a registry outage is no record's fault"
    finally:
        schema_registry.start()
    wait_all_committed(kafka_bootstrap, t, worker, timeout=120)
    wait_for(lambda: http_status(worker, "/readyz") == 200, 60, "the worker to be ready again")
    alerts = alerts_of(kafka_bootstrap, t)
    assert sorted(a["event_id"] for a in alerts) == sorted(nested_model.anomalous), "every event decided once"
    assert read_all(kafka_bootstrap, t.dead_letters) == []
    assert worker.proc.poll() is None
