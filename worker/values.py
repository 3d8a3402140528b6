"""The worker's value format: the decoder `--value-format` asks for, and what a new writer schema tells operators.

With a registry format (avro, protobuf, json-schema) the decoder asks the schema registry for each writer
schema once (training/value_formats.py). `registry` holds whether the registry answered the last time it was
asked (readiness check `schema_registry_ok`, worker/wiring.py); the loop sets it (worker/loop.py). The
first record of each writer schema is checked against the fields the live model reads: a schema that lacks
some is logged, naming the fields and the schema id, and counted
(`anomaly_value_schemas_total{outcome="lacks_fields"}`): its records are scored with those fields missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from training.bundle import Bundle
from training.data import input_kinds
from training.schema_registry import value_decoder
from training.value_formats import Decoder, SchemaSource, ValueFormat
from training.windows import RECORD_TIME
from worker.config import ValueSettings
from worker.health import BrokerStatus
from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)


def model_fields(bundle: Bundle) -> list[str]:
    """The event fields a model reads: its own inputs and what its windows are keyed by and summarise."""
    fields = list(input_kinds(bundle.schema))
    if bundle.windows is not None:
        spec = bundle.windows
        fields += [name for name in (*spec.key_fields, *spec.numeric, *spec.categorical)
                   if name != RECORD_TIME and name not in fields]
    return fields


class ValueDecoding:
    """The decoder of `settings.value_format` (shared by every pipeline, so schemas are fetched once) and the
    registry's status. `needed()`: the fields of the live model (it changes with a promotion)."""

    def __init__(self, settings: ValueSettings, metrics: WorkerMetrics, needed: Callable[[], Collection[str]],
                 schemas: SchemaSource | None = None) -> None:
        self.metrics = metrics
        self.needed = needed
        self.format = ValueFormat(settings.value_format)
        self.registry = BrokerStatus(ok=True)  # until a request fails, nothing says the registry is down
        self.decoder: Decoder = value_decoder(settings, self.check_schema, schemas)

    @property
    def uses_registry(self) -> bool:
        return self.format is not ValueFormat.JSON

    def check_schema(self, schema_id: int, paths: frozenset[str] | None) -> None:
        """A writer schema seen for the first time: say which of the model's fields its records cannot carry."""
        if paths is None:
            outcome, lacking = "open", []
        else:
            lacking = [name for name in self.needed() if name not in paths]
            outcome = "lacks_fields" if lacking else "complete"
        self.metrics.value_schemas.labels(outcome=outcome).inc()
        if lacking:
            log.warning("writer schema %d of the input topic lacks %d field(s) the model reads: %s; its records are "
                        "scored with them missing (imputed). Retrain on the new schema, or restore the field(s) "
                        "in the producer", schema_id, len(lacking), ", ".join(lacking[:10]))
        else:
            log.info("writer schema %d of the input topic: %s", schema_id,
                     "every field the model reads is in it" if paths is not None else "its fields are open-ended")
