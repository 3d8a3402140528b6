"""confluent-kafka (librdkafka) at the edge, split by job over `worker/kafka/core.py`.

`source` (the consumer and its asynchronous-commit records), `start_guard` (where a partition starts,
and partitions that never start fetching), `sinks` (the plain and the transactional producer), and
`client` (what they share): the loop's source and sinks; the side paths' reader and producer are
`worker/kafka/reader_confluent.py` and `producer_confluent.py`.
"""

from worker.kafka.confluent.sinks import ConfluentSink, ConfluentTransactionalSink
from worker.kafka.confluent.source import ConfluentSource

__all__ = ["ConfluentSink", "ConfluentSource", "ConfluentTransactionalSink"]
