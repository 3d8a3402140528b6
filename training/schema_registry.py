"""The schema registry at the edge: writer schemas by id over HTTP, through confluent-kafka's client.

`RegistrySchemas` is the `SchemaSource` of training/value_formats.py for a real registry (Confluent's, or
any with its API, such as Apicurio's ``/apis/ccompat/v7``). It says "no such schema" only when the
registry answers so (HTTP 404 with the schema-not-found error code); anything else that keeps it from
answering (refused connection, timeout, 5xx, a refused login, a 404 of a wrong URL) is
`RegistryUnavailable`, a peer's fault. Messages never hold the URL's credentials or the password.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from training.value_formats import (
    Decoder,
    JsonDecoder,
    RegistryDecoder,
    RegistryUnavailable,
    SchemaSource,
    ValueFormat,
    WriterSchema,
)

#: Error codes a registry sends with HTTP 404 for an id it does not have (Confluent: 40403 schema not found;
#: confluent-kafka's mock client: 40400).
SCHEMA_NOT_FOUND = frozenset({40400, 40403})


class RegistrySchemas:
    """Writer schemas from a registry through `client` (a confluent-kafka `SchemaRegistryClient`)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    @classmethod
    def connect(cls, config: Mapping[str, Any]) -> RegistrySchemas:
        """A client for `config` (`SchemaRegistryClient` settings: url, basic.auth.user.info, ssl.*, timeout)."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return cls(SchemaRegistryClient(dict(config)))

    def writer_schema(self, schema_id: int, value_format: ValueFormat) -> WriterSchema | None:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        # Protobuf: the registry's serialized form, a FileDescriptorProto (what confluent's deserializer asks for).
        fmt = "serialized" if value_format is ValueFormat.PROTOBUF else None
        try:
            schema = self.client.get_schema(schema_id, fmt=fmt)
        except SchemaRegistryError as exc:
            if exc.http_status_code == 404 and exc.error_code in SCHEMA_NOT_FOUND:
                return None
            raise RegistryUnavailable(f"schema registry answered HTTP {exc.http_status_code} (error code "
                                      f"{exc.error_code}) for schema id {schema_id}") from None
        except Exception as exc:  # noqa: BLE001 - connection refused, timeout, TLS: the registry did not answer
            raise RegistryUnavailable(f"schema registry did not answer for schema id {schema_id}: "
                                      f"{type(exc).__name__}") from None
        return WriterSchema(schema_id, schema.schema_type or "AVRO", schema.schema_str or "")


class ValueOptions(Protocol):
    """What a decoder is built from (worker.config.ValueSettings)."""

    @property
    def value_format(self) -> str: ...

    def registry_config(self) -> dict[str, Any]: ...


def value_decoder(options: ValueOptions, on_schema: Callable[[int, frozenset[str] | None], None] | None = None,
                  schemas: SchemaSource | None = None) -> Decoder:
    """The decoder of `--value-format`, for the worker and `anomaly-train --from-kafka` alike: JSON, or a
    registry format asking `schemas` (by default the registry `options` names)."""
    value_format = ValueFormat(options.value_format)
    if value_format is ValueFormat.JSON:
        return JsonDecoder()
    source = schemas if schemas is not None else RegistrySchemas.connect(options.registry_config())
    return RegistryDecoder(value_format, source, on_schema=on_schema)
