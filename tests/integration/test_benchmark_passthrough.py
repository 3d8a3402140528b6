"""The throughput benchmark's pass-through (b) reads a fresh group's backlog to the end with either client.

It uses the consumer the worker's Source builds, plainly; when that consumer's start policy changed
(librdkafka reports a partition without a position instead of resetting it), the confluent pass-through
waited forever for records and the benchmark hung. This runs it on a small backlog.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.throughput import produce, run_passthrough, worker_settings
from tests.kafka_broker import create_topics, unique_topic
from worker.config import KAFKA_CLIENTS

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("client", KAFKA_CLIENTS)
def test_the_pass_through_reads_and_commits_a_fresh_groups_backlog(kafka_bootstrap: str, client: str) -> None:
    topic = unique_topic("passthrough")
    create_topics(kafka_bootstrap, [topic, f"{topic}-copy"], partitions=3)
    ends = produce(kafka_bootstrap, topic, [b'{"n": %d}' % i for i in range(300)])
    settings = worker_settings(kafka_bootstrap, Path("unused"), topic, "test", client=client)

    result = run_passthrough(settings, f"{topic}-copy", ends, deadline_s=60.0)

    assert result["events"] == 300 == sum(ends.values())
    assert result["polls"] >= 1
