"""Registry value formats: records written by confluent-kafka's own serializers decode to the events their JSON
form decodes to; framing, unknown ids and undecodable payloads are dead letters; a registry that does not
answer is a peer fault raised out of the batch (training/value_formats.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import MockSchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given, settings
from hypothesis import strategies as st

from training.contract import Invalid, Reason
from training.schema_registry import RegistrySchemas
from training.value_formats import (
    JsonDecoder,
    RegistryDecoder,
    RegistryUnavailable,
    ValueFormat,
    WriterSchema,
)

TOPIC = "events"
CONTEXT = SerializationContext(TOPIC, MessageField.VALUE)

AVRO = json.dumps({"type": "record", "name": "Flow", "namespace": "test", "fields": [
    {"name": "proto", "type": ["null", "string"], "default": None},
    {"name": "flow", "type": {"type": "record", "name": "Counters", "fields": [
        {"name": "pkts_toserver", "type": "long"},
        {"name": "bytes_toserver", "type": ["null", "double"], "default": None}]}},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
]})

JSON_SCHEMA = json.dumps({
    "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "Flow", "type": "object",
    "properties": {
        "proto": {"type": ["string", "null"]},
        "flow": {"type": "object", "properties": {"pkts_toserver": {"type": "integer"},
                                                  "bytes_toserver": {"type": ["number", "null"]}},
                 "required": ["pkts_toserver"], "additionalProperties": False},
        "ts": {"type": "string"}},
    "required": ["flow"], "additionalProperties": False})


def flow_message_class() -> Any:
    """A Protobuf message built at run time (no protoc): Flow {string proto; Counters flow; Timestamp ts}."""
    proto = descriptor_pb2.FileDescriptorProto(name="flow.proto", package="test", syntax="proto3",
                                               dependency=["google/protobuf/timestamp.proto"])
    counters = proto.message_type.add(name="Counters")
    counters.field.add(name="pkts_toserver", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    counters.field.add(name="bytes_toserver", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE,
                       label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, proto3_optional=True,
                       oneof_index=0)
    counters.oneof_decl.add(name="_bytes_toserver")
    flow = proto.message_type.add(name="Flow")
    flow.field.add(name="proto", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                   label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    flow.field.add(name="flow", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                   type_name=".test.Counters", label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    flow.field.add(name="ts", number=3, type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                   type_name=".google.protobuf.Timestamp", label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    flow.field.add(name="tags", number=4, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                   label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED)
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindMessageTypeByName("test.Flow")
    except KeyError:
        pool.Add(proto)
        descriptor = pool.FindMessageTypeByName("test.Flow")
    return GetMessageClass(descriptor)


def event(pkts: int, octets: float | None, proto: str | None = "TCP") -> dict[str, Any]:
    return {"proto": proto, "flow": {"pkts_toserver": pkts, "bytes_toserver": octets}, "ts": 1714564800500,
            "tags": ["x"]}


def serialize(fmt: ValueFormat, client: Any, value: dict[str, Any]) -> bytes:
    """`value` written by confluent-kafka's serializer of `fmt` (it registers the schema with `client`)."""
    if fmt is ValueFormat.AVRO:
        return AvroSerializer(client, AVRO)(value, CONTEXT)
    if fmt is ValueFormat.JSON_SCHEMA:
        body = {**value, "ts": "2024-05-01T12:00:00.5Z"}
        body.pop("tags")
        return JSONSerializer(JSON_SCHEMA, client)(body, CONTEXT)
    cls = flow_message_class()
    message = cls(proto=value["proto"] or "", tags=value["tags"])
    message.flow.pkts_toserver = value["flow"]["pkts_toserver"]
    if value["flow"]["bytes_toserver"] is not None:
        message.flow.bytes_toserver = value["flow"]["bytes_toserver"]
    message.ts.FromMilliseconds(value["ts"])
    return ProtobufSerializer(cls, client, {"use.deprecated.format": False})(message, CONTEXT)


class Counting(RegistrySchemas):
    """The real edge over confluent-kafka's mock registry client, counting fetches."""

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.fetched: list[int] = []

    def writer_schema(self, schema_id: int, value_format: ValueFormat) -> WriterSchema | None:
        self.fetched.append(schema_id)
        return super().writer_schema(schema_id, value_format)


FORMATS = [ValueFormat.AVRO, ValueFormat.PROTOBUF, ValueFormat.JSON_SCHEMA]


@pytest.mark.parametrize("fmt", FORMATS)
def test_serializer_output_decodes_to_the_flat_event_and_the_schema_is_fetched_once(fmt: ValueFormat) -> None:
    client = MockSchemaRegistryClient({"url": "mock://"})
    values = [serialize(fmt, client, event(3, 180.0)), serialize(fmt, client, event(4, None, None))]
    seen: list[tuple[int, frozenset[str] | None]] = []
    schemas = Counting(client)
    decoder = RegistryDecoder(fmt, schemas, on_schema=lambda sid, paths: seen.append((sid, paths)))
    first, second = decoder.decode(values, 1 << 20)
    assert first["flow.pkts_toserver"] in (3, "3") and first["flow.bytes_toserver"] == 180.0
    assert first["proto"] == "TCP"
    assert first["ts"] in (1714564800.5, "2024-05-01T12:00:00.5Z")  # the same instant (an Avro timestamp, text)
    assert second.get("flow.bytes_toserver") is None  # unset (optional in Protobuf) or null: missing
    assert not second.get("proto")  # proto3's unset string is "" (missing under the contract); Avro/JSON: null
    decoder.decode(values, 1 << 20)
    assert len(schemas.fetched) == 1 and len(seen) == 1  # fetched and announced once
    assert seen[0][1] is None or {"flow.pkts_toserver", "flow.bytes_toserver", "proto"} <= seen[0][1]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**40), st.one_of(st.none(), st.floats(0, 1e12)),
                          st.one_of(st.none(), st.sampled_from(["TCP", "UDP", " icmp ", "NA"]))), min_size=1,
                max_size=8))
def test_avro_events_mean_what_their_json_form_means(rows: list[tuple[int, float | None, str | None]]) -> None:
    """Parity with JSON: the same values, written as Avro by confluent's serializer and as JSON, decode alike."""
    from training.contract import CATEGORICAL, NUMERIC, event_columns

    client = MockSchemaRegistryClient({"url": "mock://"})
    events = [event(*row) for row in rows]
    avro = RegistryDecoder(ValueFormat.AVRO, RegistrySchemas(client)).decode(
        [serialize(ValueFormat.AVRO, client, e) for e in events], 1 << 20)
    as_json = JsonDecoder().decode([json.dumps({**e, "ts": "2024-05-01T12:00:00.5Z"}).encode() for e in events],
                                   1 << 20)
    kinds = {"flow.pkts_toserver": NUMERIC, "flow.bytes_toserver": NUMERIC, "proto": CATEGORICAL, "ts": NUMERIC}
    left, right = event_columns(avro, kinds), event_columns(as_json, kinds)  # type: ignore[arg-type]
    assert left.problems.keys() == right.problems.keys()
    for name in kinds:
        assert repr(left.columns[name].tolist()) == repr(right.columns[name].tolist()), name


def test_framing_unknown_ids_and_bad_payloads_are_the_records_fault() -> None:
    client = MockSchemaRegistryClient({"url": "mock://"})
    good = serialize(ValueFormat.AVRO, client, event(1, 2.0))
    decoder = RegistryDecoder(ValueFormat.AVRO, RegistrySchemas(client))
    decoded = decoder.decode([b'{"plain": "json"}', b"\x00\x00", good[:1] + (999).to_bytes(4, "big") + good[5:],
                              good[:-3] + b"\xff\xff\xff", None, good], 1 << 20)
    reasons = [item.reason if isinstance(item, Invalid) else None for item in decoded]
    assert reasons == [Reason.NO_SCHEMA_ID, Reason.NO_SCHEMA_ID, Reason.UNKNOWN_SCHEMA, Reason.UNDECODABLE,
                       Reason.TOMBSTONE, None]
    assert "schema id 999 does not exist" in decoded[2].message  # type: ignore[union-attr]


def test_a_json_schema_payload_that_breaks_its_schema_is_undecodable() -> None:
    client = MockSchemaRegistryClient({"url": "mock://"})
    good = serialize(ValueFormat.JSON_SCHEMA, client, event(1, 2.0))
    bad = good[:5] + json.dumps({"flow": {"pkts_toserver": "many"}}).encode()
    decoded = RegistryDecoder(ValueFormat.JSON_SCHEMA, RegistrySchemas(client)).decode([bad, good[:5] + b"{"], 4096)
    assert [d.reason for d in decoded] == [Reason.UNDECODABLE, Reason.UNDECODABLE]  # type: ignore[union-attr]
    assert "pkts_toserver" in decoded[0].message  # type: ignore[union-attr]


class Down:
    """A registry that does not answer."""

    def get_schema(self, schema_id: int, **_: Any) -> Schema:
        raise ConnectionRefusedError("[Errno 111] Connection refused")


class WrongUrl:
    def get_schema(self, schema_id: int, **_: Any) -> Schema:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        raise SchemaRegistryError(404, -1, "HTTP 404 Not Found")


@pytest.mark.parametrize("client", [Down(), WrongUrl()])
def test_a_registry_that_cannot_answer_is_a_peer_fault_not_a_dead_letter(client: Any) -> None:
    framed = b"\x00" + (7).to_bytes(4, "big") + b"\x02"
    with pytest.raises(RegistryUnavailable, match="schema id 7"):
        RegistryDecoder(ValueFormat.AVRO, RegistrySchemas(client)).decode([framed], 4096)


def test_schema_evolution_keeps_scoring_and_names_what_a_new_schema_lacks() -> None:
    """Added optional field, removed field, int widened to long: each writer schema decodes its own records."""
    client = MockSchemaRegistryClient({"url": "mock://"})
    v1 = {"type": "record", "name": "Pay", "fields": [{"name": "amount", "type": "int"},
                                                      {"name": "mcc", "type": "string"}]}
    v2 = {"type": "record", "name": "Pay", "fields": [{"name": "amount", "type": "long"},
                                                      {"name": "channel", "type": ["null", "string"], "default": None}]}
    first = AvroSerializer(client, json.dumps(v1), conf={"auto.register.schemas": True})({"amount": 5, "mcc": "5411"},
                                                                                        CONTEXT)
    second = AvroSerializer(client, json.dumps(v2))({"amount": 2**40, "channel": "web"}, CONTEXT)
    seen: dict[int, frozenset[str] | None] = {}
    decoder = RegistryDecoder(ValueFormat.AVRO, RegistrySchemas(client), on_schema=seen.__setitem__)
    assert decoder.decode([first, second], 4096) == [{"amount": 5, "mcc": "5411"},
                                                    {"amount": 2**40, "channel": "web"}]
    assert sorted(map(sorted, seen.values())) == [["amount", "channel"], ["amount", "mcc"]]  # type: ignore[arg-type]


class Served:
    """A registry serving one schema as text (as Apicurio serves a Java producer's .proto)."""

    def __init__(self, schema: WriterSchema) -> None:
        self.schema = schema

    def writer_schema(self, schema_id: int, value_format: ValueFormat) -> WriterSchema | None:
        return self.schema if schema_id == self.schema.schema_id else None


PROTO_TEXT = """syntax = "proto3";
package test;
import "google/protobuf/timestamp.proto";
message Flow {
  string proto = 1;
  Counters flow = 2;
  google.protobuf.Timestamp ts = 3;
  repeated string tags = 4;
}
message Counters {
  int64 pkts_toserver = 1;
  optional double bytes_toserver = 2;
}
"""


def test_a_protobuf_schema_served_as_proto_text_is_compiled_and_a_broken_one_dead_letters() -> None:
    cls = flow_message_class()
    message = cls(proto="UDP", tags=["a"])
    message.flow.pkts_toserver = 9
    message.ts.FromMilliseconds(1714564800500)
    framed = b"\x00" + (5).to_bytes(4, "big") + b"\x00" + message.SerializeToString()  # message index [0]: Flow
    decoded = RegistryDecoder(ValueFormat.PROTOBUF, Served(WriterSchema(5, "PROTOBUF", PROTO_TEXT))).decode(
        [framed], 4096)
    assert decoded == [{"proto": "UDP", "flow.pkts_toserver": "9", "ts": 1714564800.5, "tags": ["a"]}]
    broken = RegistryDecoder(ValueFormat.PROTOBUF, Served(WriterSchema(5, "PROTOBUF", "message {"))).decode(
        [framed, framed], 4096)
    assert [d.reason for d in broken] == [Reason.UNDECODABLE] * 2  # type: ignore[union-attr]
    assert "writer schema cannot be used" in broken[0].message  # type: ignore[union-attr]
