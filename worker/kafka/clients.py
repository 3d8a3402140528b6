"""Which client serves the side paths: the adapter of `Connection.client` (`--kafka-client`), importing only
that client's library (the confluent worker never loads kafka-python)."""

from __future__ import annotations

from worker.kafka.connection import Connection
from worker.kafka.producer import RecordProducer
from worker.kafka.reader import TopicReader


def open_reader(connection: Connection) -> TopicReader:
    """A topic reader (worker/kafka/reader.py) of the connection's client."""
    if connection.client == "confluent":
        from worker.kafka.reader_confluent import ConfluentReader

        return ConfluentReader(connection)
    from worker.kafka.reader_kafka_python import KafkaPythonReader

    return KafkaPythonReader(connection)


def open_producer(connection: Connection) -> RecordProducer:
    """A record producer (worker/kafka/producer.py) of the connection's client."""
    if connection.client == "confluent":
        from worker.kafka.producer_confluent import ConfluentProducer

        return ConfluentProducer(connection)
    from worker.kafka.producer_kafka_python import KafkaPythonProducer

    return KafkaPythonProducer(connection)
