"""The published alert schema (docs/alert.schema.json) for the tests that check alerts: loaded here and only here."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

ALERT_SCHEMA_PATH = Path(__file__).resolve().parents[1] / "docs" / "alert.schema.json"


@cache
def _schema_text() -> str:
    return ALERT_SCHEMA_PATH.read_text(encoding="utf-8")


def alert_schema() -> dict[str, Any]:
    """A fresh copy of the schema (callers may change it)."""
    return dict(json.loads(_schema_text()))


def alert_validator(schema: Mapping[str, Any] | None = None) -> Draft202012Validator:
    """A draft 2020-12 validator of `schema` (the published one by default) that also checks formats."""
    return Draft202012Validator(alert_schema() if schema is None else schema,
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def on_the_wire(document: Mapping[str, Any]) -> Any:
    """The document as a consumer reads it: serialised as the worker does (orjson) and parsed back."""
    return orjson.loads(orjson.dumps(document))


def assert_valid_alerts(documents: Iterable[Mapping[str, Any]], schema: Mapping[str, Any] | None = None) -> None:
    """Every document, as it goes on the wire, validates; the failure names each invalid alert and why."""
    validator = alert_validator(schema)
    problems = [f"{document.get('alert_id')!r}: {error.message} (at {error.json_path})"
                for document in documents for error in validator.iter_errors(on_the_wire(document))]
    assert not problems, f"alerts that break {ALERT_SCHEMA_PATH.name}:\n" + "\n".join(problems[:20])
