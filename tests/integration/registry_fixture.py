"""The `schema_registry` fixture: one real schema registry (Apicurio, see tests/schema_registry.py) per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.schema_registry import SchemaRegistry, fetch, started_registry


@pytest.fixture(scope="session")
def schema_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SchemaRegistry]:
    """A running registry; `.url` is the Confluent-compatible base URL, `.log_path` its output.

    Shared by the session: a test that stops or pauses it starts or resumes it again before it ends
    (`start()` reuses the port and the stored schemas).
    """
    fetch()
    registry = started_registry(tmp_path_factory.mktemp("schema-registry"))
    try:
        yield registry
    finally:
        registry.stop()
