"""Kafka edge for analyst feedback: read the whole feedback topic, from the beginning, in a thread.

No consumer group and no commits: every worker rebuilds the same verdict ledger from the topic at
start-up (see worker/feedback.py). A topic that does not exist yet is waited for. The client is the
worker's own (`--kafka-client`, worker/kafka/reader.py).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from worker.config import Settings
from worker.kafka.clients import open_reader
from worker.kafka.connection import Connection
from worker.kafka.reader import Message, ReadError, TopicReader, follow

log = logging.getLogger(__name__)


class FeedbackReader:
    """Feeds every record value of `topic` to `on_value` until stopped."""

    def __init__(self, settings: Settings, topic: str, on_value: Callable[[bytes | None], object],
                 open_topic_reader: Callable[[Connection], TopicReader] = open_reader) -> None:
        self.settings, self.topic, self.on_value = settings, topic, on_value
        self._open = open_topic_reader
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
                reader = self._open(Connection.of(self.settings))
                try:
                    follow(reader, self.topic, self._on_message, self._stop, self.settings.broker_check_interval_s)
                finally:
                    reader.close()
                return
            except ReadError as exc:
                log.warning("feedback topic %s: %s; retrying in %.1f s", self.topic, exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.retry_backoff_max_s)

    def _on_message(self, message: Message) -> None:
        self.on_value(message.value)
        self.read += 1
