"""Record values as producers write them: JSON, or Avro / Protobuf / JSON Schema framed by a schema registry.

A `Decoder` turns a batch of record values into events (flat field dicts under the data contract) or the
`Invalid` reason each one is not. `--value-format json` is the contract's JSON decoder. The registry
formats follow the Confluent wire format: magic byte 0, a 4-byte big-endian schema id (Protobuf then adds
message indexes), then the payload. confluent-kafka's `SchemaId` reads that framing and its
`SchemaRegistryClient` fetches the writer schema; fastavro decodes Avro, protobuf Protobuf, jsonschema
checks JSON Schema. Each writer schema is fetched once and cached with its decoder.

What is whose fault (a peer's fault is not a record's):

- no magic byte and schema id -> ``no_schema_id``; an id the registry answers 404 for -> ``unknown_schema``;
  a payload that does not decode with its writer schema (or, for JSON Schema, does not validate) ->
  ``undecodable``: dead letters, each with its reason;
- a registry that does not answer (down, slow, 5xx, a refused login) raises `RegistryUnavailable` out
  of the whole batch: the worker backs off, fails readiness and commits nothing (worker/loop.py).

Decoded values mean what their JSON form means (training/nested.py): nested records are dotted paths,
timestamps are epoch seconds. Protobuf fields without presence (proto3 scalars) carry their default
value when unset, as the message does; `optional` fields that are unset are missing.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import orjson

from training.contract import Invalid, Reason, decode_events, fields, instant
from training.nested import FieldClash, plain_record

log = logging.getLogger(__name__)


class ValueFormat(StrEnum):
    JSON = "json"
    AVRO = "avro"
    PROTOBUF = "protobuf"
    JSON_SCHEMA = "json-schema"


VALUE_FORMATS = tuple(value_format.value for value_format in ValueFormat)
#: Writer schemas (with their decoders) kept per decoder; a topic normally sees a handful.
CACHED_SCHEMAS = 1000


class RegistryUnavailable(Exception):  # noqa: N818 - a state, like ConnectionRefused
    """The schema registry did not answer (down, slow, an error of its own): nothing of the batch is decided."""


@dataclass(frozen=True)
class WriterSchema:
    """A schema as the registry serves it: its id, type (AVRO, PROTOBUF, JSON) and text."""

    schema_id: int
    schema_type: str
    text: str


class SchemaSource(Protocol):
    """Where writer schemas come from: `writer_schema(id)` is None when the registry says the id does not exist,
    and raises `RegistryUnavailable` when it cannot say."""

    def writer_schema(self, schema_id: int, value_format: ValueFormat) -> WriterSchema | None: ...


class Decoder(Protocol):
    value_format: ValueFormat

    def decode(self, values: Sequence[bytes | None], max_bytes: int) -> list[dict[str, Any] | Invalid]: ...


class JsonDecoder:
    """`--value-format json`: the data contract's JSON decoder."""

    value_format = ValueFormat.JSON

    def decode(self, values: Sequence[bytes | None], max_bytes: int) -> list[dict[str, Any] | Invalid]:
        return decode_events(values, max_bytes)


#: Reads one payload (the bytes after the framing) into a flat event.
Read = Callable[[io.BytesIO, "list[int] | None"], dict[str, Any]]


class RegistryDecoder:
    """`--value-format avro|protobuf|json-schema`: framing, writer schema by id, payload -> event.

    `on_schema(schema_id, fields)` is called the first time a writer schema is used, with the field paths
    its records can carry (None where the schema does not bound them), so a caller can say which of the
    fields it needs a producer's new schema no longer has.
    """

    def __init__(self, value_format: ValueFormat, schemas: SchemaSource,
                 on_schema: Callable[[int, frozenset[str] | None], None] | None = None) -> None:
        if value_format is ValueFormat.JSON:
            raise ValueError("the json format needs no registry: use JsonDecoder")
        self.value_format: ValueFormat = value_format
        self.schemas = schemas
        self.on_schema = on_schema
        self._readers: OrderedDict[int, Read] = OrderedDict()
        self._framing = "PROTOBUF" if value_format is ValueFormat.PROTOBUF else value_format.name
        self._last: tuple[int, Read] | None = None  # the previous record's schema: a batch mostly has one

    def decode(self, values: Sequence[bytes | None], max_bytes: int) -> list[dict[str, Any] | Invalid]:
        unknown: set[int] = set()  # ids the registry said it lacks, asked once per batch
        return [self._decode(value, max_bytes, unknown) for value in values]

    def _decode(self, value: bytes | None, max_bytes: int, unknown: set[int]) -> dict[str, Any] | Invalid:
        if value is None:
            return Invalid(Reason.TOMBSTONE, f"record has no value (tombstone); expected a {self.value_format} record")
        if len(value) > max_bytes:
            return Invalid(Reason.OVERSIZED, f"record value is {len(value)} bytes, the limit is {max_bytes}")
        indexes: list[int] | None = None
        if self._framing != "PROTOBUF" and len(value) >= 5 and value[0] == 0:
            schema_id = int.from_bytes(value[1:5], "big")  # the common case, read as SchemaId.from_bytes reads it
            payload = io.BytesIO(value)
            payload.seek(5)
        else:  # Protobuf's message indexes, GUIDs and odd records: confluent-kafka's reader of the framing
            from confluent_kafka.schema_registry.common.serde import SchemaId  # not at import: the kafka-python
            # worker loads no confluent-kafka module (tests/unit/test_kafka_imports.py)

            framing = SchemaId(self._framing)
            try:
                payload = framing.from_bytes(io.BytesIO(value))
            except Exception:  # noqa: BLE001 - short, another magic byte, bad message indexes: all the record's
                return Invalid(Reason.NO_SCHEMA_ID, f"record value does not start with a schema registry's magic "
                                                    f"byte 0 and schema id (first byte {value[:1].hex() or 'none'}); "
                                                    f"expected {self.value_format} from a registry serializer")
            if framing.id is None:
                return Invalid(Reason.NO_SCHEMA_ID, "record value names its schema by GUID (magic byte 1); only "
                                                    "schema ids (magic byte 0) are supported")
            schema_id, indexes = framing.id, framing.message_indexes
        if self._last is not None and self._last[0] == schema_id:
            read = self._last[1]
        else:
            found = None if schema_id in unknown else self._reader(schema_id)
            if found is None:
                unknown.add(schema_id)
                return Invalid(Reason.UNKNOWN_SCHEMA, f"schema id {schema_id} does not exist in the schema registry")
            read = found
            self._last = (schema_id, read)
        try:
            return read(payload, indexes)
        except FieldClash as exc:
            return Invalid(Reason.FIELD_CLASH, str(exc), exc.field)
        except Exception as exc:  # noqa: BLE001 - whatever the payload provokes in the decoder is the record's
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return Invalid(Reason.UNDECODABLE, f"record value does not decode as {self.value_format} with its writer "
                                               f"schema {schema_id}: {why}")

    def _reader(self, schema_id: int) -> Read | None:
        """The payload reader of a writer schema (fetched and built once); None if the registry lacks it."""
        read = self._readers.get(schema_id)
        if read is not None:
            self._readers.move_to_end(schema_id)
            return read
        schema = self.schemas.writer_schema(schema_id, self.value_format)
        if schema is None:
            return None
        try:
            read, paths = _BUILDERS[self.value_format](schema)
        except Exception as exc:  # noqa: BLE001 - a schema we cannot use: its records are undecodable, said so
            read, paths = _unusable(schema, exc), None
        self._readers[schema_id] = read
        if len(self._readers) > CACHED_SCHEMAS:
            self._readers.popitem(last=False)
        if self.on_schema is not None:
            self.on_schema(schema_id, paths)
        return read


def _unusable(schema: WriterSchema, exc: Exception) -> Read:
    log.error("writer schema %d (%s) cannot be used: %s", schema.schema_id, schema.schema_type, exc)

    def read(_payload: io.BytesIO, _indexes: list[int] | None) -> dict[str, Any]:
        raise ValueError(f"its writer schema cannot be used: {exc}")

    return read


# --- Avro ---------------------------------------------------------------------------------------

def _avro(schema: WriterSchema) -> tuple[Read, frozenset[str] | None]:
    import fastavro

    parsed = fastavro.parse_schema(json.loads(schema.text))
    simple = _flat_primitive(parsed)

    def read(payload: io.BytesIO, _indexes: list[int] | None) -> dict[str, Any]:
        record = fastavro.schemaless_reader(payload, parsed, None)
        if not isinstance(record, dict):
            raise TypeError(f"the writer schema is not a record but {type(record).__name__}")
        return record if simple else plain_record(record)

    return read, _avro_paths(parsed, "")


_AVRO_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "string"})


def _flat_primitive(schema: Any) -> bool:
    """A record of primitive fields (nullable or not), no logical types: its records are events as they are."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        return False
    for field in schema["fields"]:
        kinds = field["type"] if isinstance(field["type"], list) else [field["type"]]
        if not all(isinstance(kind, str) and kind in _AVRO_PRIMITIVES for kind in kinds):
            return False
    return True


def _avro_paths(schema: Any, prefix: str) -> frozenset[str] | None:
    """The field paths an Avro record schema carries; None where a map makes them open-ended."""
    if isinstance(schema, list):  # a union: the paths of its record branches, or the field itself
        parts = [_avro_paths(branch, prefix) for branch in schema if branch != "null"]
        if any(part is None for part in parts):
            return None
        return frozenset().union(*(part for part in parts if part is not None))
    kind = schema.get("type") if isinstance(schema, dict) else schema
    if kind == "record":
        paths: set[str] = set()
        for field in schema["fields"]:
            inner = _avro_paths(field["type"], f"{prefix}{field['name']}.")
            if inner is None:
                return None
            paths |= inner
        return frozenset(paths)
    if kind == "map":
        return None
    return frozenset({prefix[:-1]}) if prefix else frozenset()


# --- JSON Schema --------------------------------------------------------------------------------

def _json_schema(schema: WriterSchema) -> tuple[Read, frozenset[str] | None]:
    from jsonschema.validators import validator_for

    document = json.loads(schema.text)
    validator = validator_for(document)(document)

    def read(payload: io.BytesIO, _indexes: list[int] | None) -> dict[str, Any]:
        event = orjson.loads(payload.read())
        if not isinstance(event, dict):
            raise TypeError(f"expected a JSON object, got {type(event).__name__}")
        error = next(validator.iter_errors(event), None)
        if error is not None:
            raise ValueError(f"{error.message} at {'/'.join(map(str, error.absolute_path)) or 'the top'}")
        flat = fields(event)
        if isinstance(flat, Invalid):
            raise FieldClash(flat.field or "")
        return flat

    return read, _json_schema_paths(document, "")


def _json_schema_paths(document: Mapping[str, Any], prefix: str) -> frozenset[str] | None:
    """The property paths a JSON Schema object allows; None where other properties are allowed too."""
    properties = document.get("properties")
    if not isinstance(properties, dict) or document.get("additionalProperties", True) is not False:
        return None
    paths: set[str] = set()
    for name, sub in properties.items():
        if isinstance(sub, dict) and sub.get("type") == "object":
            inner = _json_schema_paths(sub, f"{prefix}{name}.")
            if inner is None:
                return None
            paths |= inner
        else:
            paths.add(prefix + name)
    return frozenset(paths)


# --- Protobuf -----------------------------------------------------------------------------------

def _protobuf(schema: WriterSchema) -> tuple[Read, frozenset[str] | None]:
    from google.protobuf import descriptor_pool, json_format
    from google.protobuf.message_factory import GetMessageClass

    pool = descriptor_pool.DescriptorPool()
    file_proto = _file_descriptor(schema.text)
    for dependency in file_proto.dependency:  # the well-known types (timestamp.proto, ...) it imports
        _add_well_known(pool, dependency)
    pool.Add(file_proto)
    file = pool.FindFileByName(file_proto.name)
    classes: dict[tuple[int, ...], tuple[Any, frozenset[str]]] = {}

    def message_class(indexes: list[int] | None) -> tuple[Any, frozenset[str]]:
        """The message class the indexes name, and the paths of its Timestamp fields."""
        key = tuple(indexes or [0])
        if key not in classes:
            descriptor = file.message_types_by_name[file_proto.message_type[key[0]].name]
            for index in key[1:]:
                descriptor = descriptor.nested_types[index]
            classes[key] = GetMessageClass(descriptor), _protobuf_paths(descriptor, "", _TIMESTAMP) or frozenset()
        return classes[key]

    def read(payload: io.BytesIO, indexes: list[int] | None) -> dict[str, Any]:
        cls, timestamps = message_class(indexes)
        message = cls.FromString(payload.read())
        event = plain_record(json_format.MessageToDict(message, preserving_proto_field_name=True,
                                                       always_print_fields_with_no_presence=True))
        for path in timestamps:  # its JSON form is RFC 3339 text; an instant is a number in every format
            if isinstance(event.get(path), str):
                event[path] = instant(event[path])
        return event

    # The fields of any top-level message of the file (a record names its message by index; most files have one).
    messages = [_protobuf_paths(file.message_types_by_name[m.name], "") for m in file_proto.message_type]
    if not messages or any(paths is None for paths in messages):
        return read, None
    return read, frozenset().union(*(paths for paths in messages if paths is not None))


#: How long protoc may take to compile one writer schema.
PROTOC_TIMEOUT_S = 60.0


def _file_descriptor(text: str) -> Any:
    """A registry's Protobuf schema as a FileDescriptorProto: confluent-kafka's serializers register it base64
    encoded; Java's, and registries that ignore ``format=serialized`` (Apicurio), serve ``.proto`` text,
    compiled here by protoc (grpcio-tools), which also knows the well-known types it may import.

    protoc runs in a child process: in this process it crashed (SIGSEGV) next to the protobuf runtime, and
    nothing a producer registers may take the worker down."""
    from google.protobuf import descriptor_pb2

    try:
        return descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        pass
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import grpc_tools

    with tempfile.TemporaryDirectory(prefix="anomaly-proto-") as folder:
        source, compiled = Path(folder, "schema.proto"), Path(folder, "schema.pb")
        source.write_text(text)
        include = Path(grpc_tools.__file__).parent / "_proto"
        done = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{folder}", f"-I{include}",
                               f"--descriptor_set_out={compiled}", "schema.proto"], capture_output=True, text=True,
                              timeout=PROTOC_TIMEOUT_S, check=False)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [f"protoc exited with {done.returncode}"])[-1]
            raise ValueError(f"the writer schema is neither a serialized nor a compilable .proto file ({why}; "
                             f"imports of another subject's schema are not supported)")
        return descriptor_pb2.FileDescriptorSet.FromString(compiled.read_bytes()).file[0]


def _add_well_known(pool: Any, name: str) -> None:
    from google.protobuf import descriptor_pb2, symbol_database

    try:
        pool.FindFileByName(name)
        return
    except KeyError:
        pass
    known = symbol_database.Default().pool.FindFileByName(name)  # imported by protobuf itself
    proto = descriptor_pb2.FileDescriptorProto()
    known.CopyToProto(proto)
    for dependency in proto.dependency:
        _add_well_known(pool, dependency)
    pool.Add(proto)


_TIMESTAMP = "google.protobuf.Timestamp"


def _protobuf_paths(descriptor: Any, prefix: str, only: str | None = None) -> frozenset[str] | None:
    """The field paths a message carries (`only`: those holding that message type); None where a map makes
    them open-ended."""
    paths: set[str] = set()
    for field in descriptor.fields:
        message = field.message_type
        if message is not None and message.GetOptions().map_entry:
            if only is None:
                return None
            continue
        if message is not None and not message.full_name.startswith("google.protobuf.") \
                and not field.is_repeated:
            inner = _protobuf_paths(message, f"{prefix}{field.name}.", only)
            if inner is None:
                return None
            paths |= inner
        elif only is None or (message is not None and message.full_name == only
                              and not field.is_repeated):
            paths.add(prefix + field.name)
    return frozenset(paths)


_BUILDERS: dict[ValueFormat, Callable[[WriterSchema], tuple[Read, frozenset[str] | None]]] = {
    ValueFormat.AVRO: _avro, ValueFormat.JSON_SCHEMA: _json_schema, ValueFormat.PROTOBUF: _protobuf}
