"""Kafka edge for analyst feedback: read the whole feedback topic, from the beginning, in a thread.

No consumer group and no commits: every worker rebuilds the same verdict ledger from the topic at
start-up (see worker/feedback.py). A topic that does not exist yet is waited for.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from worker.config import Settings
from worker.kafka.kafka_python import client_options

log = logging.getLogger(__name__)


class FeedbackReader:
    """Feeds every record value of `topic` to `on_value` until stopped."""

    def __init__(self, settings: Settings, topic: str, on_value: Callable[[bytes | None], object]) -> None:
        self.settings, self.topic, self.on_value = settings, topic, on_value
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feedback-reader", daemon=True)
        self.read = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.settings.kafka_timeout_s + 5)

    def _run(self) -> None:
        backoff = self.settings.retry_backoff_initial_s
        while not self._stop.is_set():
            try:
                self._consume()
                return
            except KafkaError as exc:
                log.warning("feedback topic %s: %s; retrying in %.1f s", self.topic, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.retry_backoff_max_s)

    def _consume(self) -> None:
        consumer = KafkaConsumer(group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
                                 request_timeout_ms=int(self.settings.kafka_timeout_s * 1000),
                                 **client_options(self.settings))
        try:
            partitions = None
            while partitions is None and not self._stop.is_set():
                partitions = consumer.partitions_for_topic(self.topic)
                if partitions is None:
                    self._stop.wait(self.settings.broker_check_interval_s)  # the topic may be created later
            if partitions is None:
                return
            tps = [TopicPartition(self.topic, p) for p in sorted(partitions)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            log.info("reading analyst feedback from %s (%d partitions)", self.topic, len(tps))
            while not self._stop.is_set():
                for batch in consumer.poll(timeout_ms=500).values():
                    for message in batch:
                        self.on_value(message.value)
                        self.read += 1
        finally:
            consumer.close()
