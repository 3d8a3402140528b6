"""The real schema registry (tests/schema_registry.py) against confluent-kafka's own client and serdes.

What these tests pin down about Apicurio Registry 2.4.2 behind confluent-kafka 2.16's client:
- every writer schema a serializer registers can be fetched by id by a fresh client, and deserialized;
- `format=serialized` is ignored: a schema comes back as stored. The Python ProtobufSerializer stores a
  base64 FileDescriptorProto, so ProtobufDeserializer works; a schema registered as .proto text (as Java
  producers do) comes back as text, which ProtobufDeserializer cannot parse (binascii.Error), while a
  ProtobufDeserializer given no registry client still decodes the payload with its own message class;
- an unknown id is SchemaRegistryError(404, 40403); a stopped registry is httpx2.ConnectError; a hung one
  is httpx2.ReadTimeout only when the client sets `timeout` (without one the call waits until it answers);
- a stopped registry restarted on its port still has its schemas and ids (H2 file storage).
"""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from typing import Any

import httpx2
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass

from tests.schema_registry import SchemaRegistry

pytestmark = pytest.mark.integration

AVRO_SCHEMA = {"type": "record", "name": "Reading", "namespace": "smoke",
               "fields": [{"name": "sensor", "type": "string"}, {"name": "value", "type": "double"}]}
JSON_SCHEMA = {"$schema": "http://json-schema.org/draft-07/schema#", "title": "Reading", "type": "object",
               "properties": {"sensor": {"type": "string"}, "value": {"type": "number"}},
               "required": ["sensor", "value"]}
READING = {"sensor": "s-1", "value": 1.5}


def reading_message_class(package: str) -> Any:
    """A protobuf message class `<package>.Reading` built from a FileDescriptorProto at runtime (no protoc)."""
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    file_proto = descriptor_pb2.FileDescriptorProto(name=f"{package}.proto", package=package, syntax="proto3")
    message = file_proto.message_type.add(name="Reading")
    message.field.add(name="sensor", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING, label=optional)
    message.field.add(name="value", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE, label=optional)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file_proto)
    return GetMessageClass(pool.FindMessageTypeByName(f"{package}.Reading"))


def value_context(topic: str) -> SerializationContext:
    return SerializationContext(topic, MessageField.VALUE)


def schema_id(framed: bytes) -> int:
    """The schema id of a Confluent-framed value: magic byte 0, then a 4-byte big-endian id."""
    assert framed[0] == 0, f"not Confluent framing: {framed[:5]!r}"
    return int.from_bytes(framed[1:5], "big")


def text(schema: Schema) -> str:
    """The schema's text (a registry answer always has one)."""
    assert schema.schema_str is not None
    return schema.schema_str


def client(registry: SchemaRegistry, **conf: Any) -> SchemaRegistryClient:
    """A fresh client: nothing cached from earlier calls."""
    return SchemaRegistryClient({"url": registry.url, **conf})


def test_each_format_registers_and_a_fresh_client_reads_the_writer_schema(schema_registry: SchemaRegistry) -> None:
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    writer = client(schema_registry)
    reading_cls = reading_message_class(f"smoke{uuid.uuid4().hex[:8]}")
    avro = AvroSerializer(writer, json.dumps(AVRO_SCHEMA))(READING, value_context(f"{topic}-avro"))
    proto = ProtobufSerializer(reading_cls, writer)(reading_cls(**READING), value_context(f"{topic}-proto"))
    jsons = JSONSerializer(json.dumps(JSON_SCHEMA), writer)(READING, value_context(f"{topic}-json"))
    ids = {schema_id(avro), schema_id(proto), schema_id(jsons)}
    assert len(ids) == 3, f"three different schemas share ids: {ids}"

    reader = client(schema_registry)
    avro_schema = reader.get_schema(schema_id(avro))
    assert avro_schema.schema_type == "AVRO"
    assert json.loads(text(avro_schema)) == AVRO_SCHEMA
    json_schema = reader.get_schema(schema_id(jsons))
    assert json_schema.schema_type == "JSON"
    assert json.loads(text(json_schema)) == JSON_SCHEMA

    proto_schema = reader.get_schema(schema_id(proto))
    assert proto_schema.schema_type == "PROTOBUF"
    stored = descriptor_pb2.FileDescriptorProto.FromString(base64.standard_b64decode(text(proto_schema)))
    assert [f.name for f in stored.message_type[0].field] == ["sensor", "value"]
    # ProtobufDeserializer asks for format=serialized; Apicurio ignores the format and returns what was stored
    # (here the serializer's base64 FileDescriptorProto, which is what that format means).
    serialized = reader.get_schema(schema_id(proto), fmt="serialized")
    assert serialized.schema_str == proto_schema.schema_str

    decoder = client(schema_registry)
    assert AvroDeserializer(decoder)(avro, value_context(f"{topic}-avro")) == READING
    assert JSONDeserializer(None, schema_registry_client=decoder)(jsons, value_context(f"{topic}-json")) == READING
    decoded = ProtobufDeserializer(reading_cls, {}, decoder)(proto, value_context(f"{topic}-proto"))
    assert (decoded.sensor, decoded.value) == (READING["sensor"], READING["value"])


def test_a_proto_text_schema_is_not_served_in_serialized_format(schema_registry: SchemaRegistry) -> None:
    package = f"smoke{uuid.uuid4().hex[:8]}"
    text = f'syntax = "proto3";\npackage {package};\nmessage Reading {{ string sensor = 1; double value = 2; }}\n'
    registered = client(schema_registry).register_schema(f"{package}-value", Schema(text, "PROTOBUF"))

    assert client(schema_registry).get_schema(registered, fmt="serialized").schema_str == text
    reading_cls = reading_message_class(package)
    # Confluent framing for the first message of the file: magic 0, id, message index list [0] (one 0 byte).
    framed = b"\x00" + registered.to_bytes(4, "big") + b"\x00" + reading_cls(**READING).SerializeToString()
    with pytest.raises(binascii.Error):
        ProtobufDeserializer(reading_cls, {}, client(schema_registry))(framed, value_context(package))
    # Without a registry client the deserializer skips the framing and parses with its own message class.
    decoded = ProtobufDeserializer(reading_cls, {})(framed, value_context(package))
    assert (decoded.sensor, decoded.value) == (READING["sensor"], READING["value"])


def test_an_unknown_id_is_a_404_with_error_code_40403(schema_registry: SchemaRegistry) -> None:
    with pytest.raises(SchemaRegistryError) as raised:
        client(schema_registry).get_schema(2_000_000_000)
    assert (raised.value.http_status_code, raised.value.error_code) == (404, 40403)


def test_a_stopped_registry_refuses_and_comes_back_with_its_schemas(schema_registry: SchemaRegistry) -> None:
    subject = f"restart-{uuid.uuid4().hex[:8]}-value"
    registered = client(schema_registry).register_schema(subject, Schema(json.dumps(AVRO_SCHEMA), "AVRO"))
    url = schema_registry.url
    schema_registry.stop()
    try:
        with pytest.raises(httpx2.ConnectError):
            client(schema_registry, **{"max.retries": 0}).get_schema(registered)
    finally:
        schema_registry.start()
    assert schema_registry.url == url
    again = client(schema_registry).get_schema(registered)
    assert json.loads(text(again)) == AVRO_SCHEMA, schema_registry.log_tail()
    assert client(schema_registry).get_latest_version(subject).schema_id == registered


def test_a_hung_registry_times_out_only_with_a_client_timeout(schema_registry: SchemaRegistry) -> None:
    registered = client(schema_registry).register_schema(
        f"hung-{uuid.uuid4().hex[:8]}-value", Schema(json.dumps(AVRO_SCHEMA), "AVRO"))
    results: list[Any] = []
    untimed = client(schema_registry)
    waiting = threading.Thread(target=lambda: results.append(untimed.get_schema(registered)), daemon=True)
    schema_registry.pause()
    try:
        started = time.monotonic()
        with pytest.raises(httpx2.ReadTimeout):
            client(schema_registry, timeout=1, **{"max.retries": 0}).get_schema(registered)
        assert time.monotonic() - started < 10
        waiting.start()
        waiting.join(2)
        assert waiting.is_alive(), "a client without `timeout` answered while the registry was paused"
    finally:
        schema_registry.resume()
    waiting.join(30)
    assert not waiting.is_alive(), "the client without `timeout` still waits after the registry resumed"
    assert json.loads(text(results[0])) == AVRO_SCHEMA
