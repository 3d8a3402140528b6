"""Shared fixtures. The Kafka broker starts only when an integration test asks for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.kafka_broker import create_topics, unique_topic
from tests.kafka_broker import kafka_bootstrap as _kafka_bootstrap

BROKER_FIXTURES = {"kafka_bootstrap", "topic_factory"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all-faults", action="store_true",
                     help="run every case of the 3-node fault suite (tests/faults), not only its CI subset")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --all-faults, fault cases marked `faults_full` are deselected (they do not fit CI's budget)."""
    if config.getoption("--all-faults"):
        return
    kept, left = [], []
    for item in items:
        (left if item.get_closest_marker("faults_full") else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Unit tests stay broker-free: only tests marked `integration` may use the Kafka fixtures."""
    used = BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ()))
    if used and item.get_closest_marker("integration") is None:
        pytest.fail(
            f"{item.nodeid} uses {', '.join(sorted(used))} but is not marked "
            "@pytest.mark.integration; move it to tests/integration and mark it",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a real Kafka, shared by the session (see tests/kafka_broker.py)."""
    with _kafka_bootstrap() as bootstrap:
        yield bootstrap


@pytest.fixture
def topic_factory(kafka_bootstrap: str) -> Callable[..., str]:
    """Call with a prefix to get a fresh topic, already created (3 partitions by default)."""

    def make(prefix: str = "test", partitions: int = 3) -> str:
        topic = unique_topic(prefix)
        create_topics(kafka_bootstrap, [topic], partitions=partitions)
        return topic

    return make
