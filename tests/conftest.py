"""Shared fixtures. The Kafka broker starts only when an integration test asks for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.kafka_broker import create_topics, unique_topic
from tests.kafka_broker import kafka_bootstrap as _kafka_bootstrap

BROKER_FIXTURES = {"kafka_bootstrap", "topic_factory", "schema_registry"}
#: Markers of tests left out of the default run (CI), each with the option that runs them.
OUTSIDE_CI = {"faults_full": "--all-faults", "slow_integration": "--all-slow"}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--all-faults", action="store_true",
                     help="run every case of the 3-node fault suite (tests/faults), not only its CI subset")
    parser.addoption("--all-slow", action="store_true",
                     help="also run the integration tests marked `slow_integration` (scripts/slow.sh)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked with one of `OUTSIDE_CI` are deselected unless its option is given (they do not fit CI's budget).

    A marker with arguments leaves out only the parametrized cases with one of them as a parameter value:
    `@pytest.mark.slow_integration("kafka-python")` keeps the case of the other client in CI.
    """
    left_out = [marker for marker, option in OUTSIDE_CI.items() if not config.getoption(option)]
    kept, left = [], []
    for item in items:
        (left if any(_marked(item, m) for m in left_out) else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept


def _marked(item: pytest.Item, name: str) -> bool:
    marker = item.get_closest_marker(name)
    if marker is None or not marker.args:
        return marker is not None
    callspec = getattr(item, "callspec", None)
    return callspec is not None and bool(set(marker.args) & {str(v) for v in callspec.params.values()})


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
