"""The confluent-kafka (librdkafka) producers: the loop's plain `Sink` and the exactly-once `TransactionalSink`.

Both produce what `core.outgoing_records` encodes, with the properties of `client.producer_config`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from confluent_kafka import KafkaError, KafkaException, Producer

from worker.config import Settings
from worker.errors import BrokerUnavailable, DeliveryError, TransactionAborted, WorkerError
from worker.kafka.confluent.client import (
    Guarded,
    LoginWatch,
    check_reachable,
    denied,
    kafka_error,
    offset_with,
    producer_config,
)
from worker.kafka.core import Clock, CommitMetadata, Offsets, Restore, outgoing_records
from worker.kafka.core import denied as missing_acl
from worker.records import Alert, DeadLetter

log = logging.getLogger(__name__)

#: A transaction slower than this is logged with the time of each step.
SLOW_TRANSACTION_S = 5.0


class ConfluentSink:
    """Idempotent producer (acks=all): publishes a batch and confirms every record was acknowledged.

    A producer that failed fatally (its idempotent producer id refused: no WRITE on any topic) is
    replaced at the next batch, so a grant takes effect without a restart.
    """

    def __init__(self, settings: Settings, producer_factory: Callable[[dict[str, Any]], Any] = Producer) -> None:
        self.settings, self._factory = settings, producer_factory
        self.producer: Any = self._start_producer()

    def _start_producer(self) -> Any:
        login = LoginWatch()
        producer = Guarded(self._factory({**producer_config(self.settings), "error_cb": login}))
        check_reachable(producer, self.settings, login)
        return producer

    def publish(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter]) -> None:
        """1. produce every alert and dead letter; 2. flush with a timeout; 3. check every delivery report."""
        if self.producer is None:
            try:
                self.producer = self._start_producer()
            except BrokerUnavailable as exc:
                raise DeliveryError(f"no producer yet: {exc}") from exc
        failures: list[str] = []
        acknowledged = 0

        def report(error: KafkaError | None, message: Any) -> None:
            nonlocal acknowledged
            if error is None:
                acknowledged += 1
            else:
                topic = message.topic() if message is not None else None
                failures.append(denied(self.settings, error, topic, "WRITE") or error.str())

        outgoing = outgoing_records(self.settings, alerts, dead_letters)
        target = None
        try:
            for target, key, value, headers in outgoing:
                self._produce(target, key, value, headers, report)
            remaining = self.producer.flush(self.settings.kafka_timeout_s)
        except SystemError as exc:
            # A fatal error raised inside flush breaks the binding's callbacks: the next delivery report
            # fails with a SystemError (caused by the KafkaException, or with none at all). The producer is
            # in no known state, so it is replaced like a fatally failed one.
            cause = kafka_error(exc.__cause__) if isinstance(exc.__cause__, KafkaException) else None
            raise self._failed_fatally(len(outgoing), cause or KafkaError(KafkaError._FATAL)) from exc
        except (KafkaException, BufferError) as exc:
            error = kafka_error(exc)
            if error is not None and (error.fatal() or error.code() == KafkaError._FATAL):
                raise self._failed_fatally(len(outgoing), error) from exc
            why = (denied(self.settings, error, target, "WRITE") if error is not None else None) or exc
            raise DeliveryError(f"publishing {len(outgoing)} records failed: {why}") from exc
        if failures or remaining or acknowledged != len(outgoing):
            first = failures[0] if failures else "not acknowledged in time"
            raise DeliveryError(f"{len(outgoing) - acknowledged} of {len(outgoing)} records were not "
                                f"acknowledged: {first}")

    def _produce(self, topic: str, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes | None]],
                 report: Callable[[KafkaError | None, Any], None]) -> None:
        try:
            self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)
        except BufferError:
            # The local queue is full: let deliveries drain (serving their reports), then try once more.
            self.producer.flush(self.settings.kafka_timeout_s)
            self.producer.produce(topic, value=value, key=key, headers=headers, on_delivery=report)

    def _failed_fatally(self, records: int, error: KafkaError) -> DeliveryError:
        """Drop the producer (a new one starts with the next batch); say why, naming a missing ACL."""
        reason = error
        if error.code() == KafkaError._FATAL:  # all produce() says; the reason is an event poll raises
            try:
                self.producer.poll(0)
            except (KafkaException, SystemError) as exc:
                reason = kafka_error(exc) or error
        self.producer = None
        why = reason.str()
        if reason.code() == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
            # Without WRITE on any topic, the idempotent producer cannot get its producer id.
            missing = missing_acl(self.settings.security, "WRITE", "TOPIC", self.settings.alert_topic,
                                    self.settings.dead_letter_topic)
            why = f"{missing} ({why})"
        return DeliveryError(f"publishing {records} records failed: {why}; the producer failed fatally and is "
                             f"replaced for the next try")

    def close(self) -> None:
        if self.producer is None:
            return
        remaining = self.producer.flush(self.settings.kafka_timeout_s)
        if remaining:
            log.warning("producer close: %d records not delivered", remaining)


class ConfluentTransactionalSink:
    """Exactly-once: a batch's alerts, dead letters and consumer offsets commit in one Kafka transaction.

    For every batch (`publish_and_commit`):

    1. begin a transaction;
    2. produce every alert and dead letter into it;
    3. add the batch's next offsets with the consumer's current group metadata (KIP-447): the group
       coordinator refuses them if this member's generation is stale, which fences a zombie (a worker
       paused while its partitions moved) whatever its transactional id. With window state
       (`restore_with`), each offset carries its restore point as metadata, committed with it;
    4. commit the transaction (which flushes). Consumers reading the output with
       `isolation.level=read_committed` see the batch's records only now, and all of them.

    A failure that leaves the transaction abortable aborts it and raises `TransactionAborted` (a
    `DeliveryError`: the loop rewinds and reads the batch again, and nothing of it was visible). A commit
    whose outcome is unknown (a retriable error, e.g. a timeout) is retried until the broker answers or the
    transaction timeout has passed.

    A fatal producer error (fenced: the coordinator aborted our transaction at its timeout while this
    worker was paused, or librdkafka lost the transaction's state when a coordinator died) replaces the
    producer: a new one with the same transactional id calls `init_transactions`, which aborts whatever
    was open, and the batch is read again (`TransactionAborted`). Fenced `MAX_FENCED` times within
    `FENCED_WINDOW_S`, the worker stops (`WorkerError`): another live worker uses the same id.
    """

    MAX_FENCED = 3
    FENCED_WINDOW_S = 300.0

    def __init__(self, settings: Settings, group_metadata: Callable[[], Any],
                 producer_factory: Callable[[dict[str, Any]], Any] = Producer, clock: Clock = time.monotonic) -> None:
        self.settings, self.group_metadata, self._clock = settings, group_metadata, clock
        self.transactional_id = settings.transactional_id_or_default
        self._factory = producer_factory
        self._fatal_at: list[float] = []
        self._metadata: CommitMetadata | None = None
        self.producer: Any = None
        try:
            self.producer = self._start_producer()
        except KafkaException as exc:
            error = kafka_error(exc)
            why = (denied(settings, error, None, "WRITE") if error is not None else None) or exc
            raise BrokerUnavailable(f"cannot start transactions as {self.transactional_id!r}: {why}") from exc
        log.info("exactly-once delivery: transactional id %s", self.transactional_id)

    def _start_producer(self) -> Any:
        """A transactional producer; `init_transactions` fences an earlier one with this id and aborts (or
        completes) its open transaction."""
        login = LoginWatch()
        producer = Guarded(self._factory({
            **producer_config(self.settings), "transactional.id": self.transactional_id,
            "transaction.timeout.ms": int(self.settings.transaction_timeout_s * 1000), "error_cb": login}))
        check_reachable(producer, self.settings, login)
        producer.init_transactions(self.settings.kafka_timeout_s)
        return producer

    def restore_with(self, restore: Restore) -> None:
        """Send each offset with `restore.metadata` (the partition's restore point)."""
        self._metadata = restore.metadata

    def publish(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter]) -> None:
        """Records that belong to no input offsets (suppression summaries) in a transaction of their own."""
        self.publish_and_commit(alerts, dead_letters, {})

    def publish_and_commit(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter],
                           offsets: Offsets) -> None:
        """Steps 1-4 of the class docstring: all of it becomes visible, or none of it."""
        if self.producer is None:
            self._replace_producer()
        timeout = self.settings.kafka_timeout_s
        outgoing = outgoing_records(self.settings, alerts, dead_letters)
        steps = {"produce": self._clock()}
        try:
            self.producer.begin_transaction()                                             # 1
            for target, key, value, headers in outgoing:                                  # 2
                self._produce(target, key, value, headers)
            steps["send offsets"] = self._clock()
            if offsets:                                                                    # 3
                metadata = self._metadata
                self.producer.send_offsets_to_transaction(
                    [offset_with(t, p, o, metadata((t, p), o) if metadata else None) for (t, p), o in offsets.items()],
                    self.group_metadata(), timeout)
        except (KafkaException, BufferError) as exc:
            self._abort(f"publishing {len(outgoing)} records and {len(offsets)} offsets failed", exc)
        steps["commit"] = self._clock()
        self._commit(len(outgoing))                                                        # 4
        steps["end"] = self._clock()
        if steps["end"] - steps["produce"] >= SLOW_TRANSACTION_S:
            # Which broker answer took so long (a coordinator just restarted, leaders moving, ...).
            times = list(steps.values())
            log.warning("slow transaction of %d records: %s", len(outgoing), ", ".join(
                f"{name} {after - before:.1f} s"
                for name, before, after in zip(list(steps)[:-1], times[:-1], times[1:], strict=True)))

    def _produce(self, topic: str, key: bytes | None, value: bytes | None,
                 headers: list[tuple[str, bytes | None]]) -> None:
        try:
            self.producer.produce(topic, value=value, key=key, headers=headers)
        except BufferError:
            # The local queue is full: send what is queued (the transaction stays open), then once more.
            self.producer.flush(self.settings.kafka_timeout_s)
            self.producer.produce(topic, value=value, key=key, headers=headers)

    def _commit(self, records: int) -> None:
        deadline = self._clock() + self.settings.transaction_timeout_s + self.settings.kafka_timeout_s
        while True:
            try:
                self.producer.commit_transaction(self.settings.kafka_timeout_s)
                return
            except KafkaException as exc:
                error = kafka_error(exc)
                if error is None or error.fatal() or error.txn_requires_abort():
                    self._abort(f"committing a transaction of {records} records failed", exc)
                if self._clock() >= deadline:
                    raise WorkerError(f"the outcome of a transaction of {records} records is still unknown "
                                      f"after the transaction timeout: {exc}; a restart with the same "
                                      f"transactional id resolves it") from exc
                log.warning("transaction commit not confirmed yet (%s); retrying", error)

    def _abort(self, what: str, exc: BaseException) -> NoReturn:
        error = kafka_error(exc)
        if error is not None and error.fatal():
            self._fatal(what, error, exc)
        try:
            self.producer.abort_transaction(self.settings.kafka_timeout_s)
        except KafkaException as abort_exc:
            abort_error = kafka_error(abort_exc)
            if abort_error is not None and abort_error.fatal():
                self._fatal(f"{what}, then aborting", abort_error, abort_exc)
            raise TransactionAborted(f"{what} ({exc}); the abort did not complete either ({abort_exc}), the "
                                     f"broker aborts the transaction after its timeout") from exc
        raise TransactionAborted(f"{what}; transaction aborted: {exc}") from exc

    def _fatal(self, what: str, error: KafkaError, exc: BaseException) -> NoReturn:
        """Replace a producer that failed fatally (see the class docstring), unless it keeps being fenced."""
        now = self._clock()
        self._fatal_at = [t for t in self._fatal_at if now - t < self.FENCED_WINDOW_S] + [now]
        if len(self._fatal_at) >= self.MAX_FENCED:
            raise WorkerError(f"{what}: {error}. The producer failed fatally {len(self._fatal_at)} times in "
                              f"{self.FENCED_WINDOW_S:.0f} s: another worker probably runs with transactional id "
                              f"{self.transactional_id!r} (give each replica its own --transactional-id)") from exc
        log.warning("%s: %s; replacing the transactional producer (its open transaction is aborted) and "
                    "reading the batch again", what, error)
        self._close_producer()
        try:
            self._replace_producer()
        except TransactionAborted as replace_exc:
            raise TransactionAborted(f"{what}: {error}; {replace_exc}") from exc
        raise TransactionAborted(f"{what}: {error}; the producer was replaced and its transaction aborted") from exc

    def _replace_producer(self) -> None:
        """Start a new producer; while that fails, the batch is retried later (`TransactionAborted`)."""
        try:
            self.producer = self._start_producer()
        except (KafkaException, BrokerUnavailable) as exc:
            self.producer = None
            raise TransactionAborted(f"no transactional producer yet: {exc}") from exc

    def _close_producer(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            try:
                producer.flush(0)
            except (KafkaException, RuntimeError) as exc:
                log.debug("closing a failed producer: %s", exc)

    def close(self) -> None:
        if self.producer is None:
            return
        try:
            remaining = self.producer.flush(self.settings.kafka_timeout_s)
        except (KafkaException, RuntimeError) as exc:
            log.warning("producer close: %s", exc)
            return
        if remaining:
            log.warning("producer close: %d records not delivered", remaining)

