"""kafka-python at the edge: the consumer (micro-batches, commits, lag) and the producer (alerts, dead letters).

A thin adapter over `worker/kafka/core.py` (`worker/kafka/confluent/` is the same on confluent-kafka;
`worker/kafka/__init__.py` picks one). Every blocking call has a timeout. With window state (`restore_with`),
commits carry restore points as metadata and assigned partitions start where the loop says (`core.Starts`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import (
    AuthorizationError,
    CorruptRecordError,
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailedError,
    UnsupportedCodecError,
)
from kafka.structs import MemberState, OffsetAndMetadata

from worker.config import Settings
from worker.errors import BrokerUnavailable, CommitError, DeliveryError, RebalanceInProgress, WorkerError
from worker.kafka import core
from worker.kafka.core import Clock, Offsets, Quarantine, TopicKey
from worker.records import Alert, DeadLetter, Record

log = logging.getLogger(__name__)


def client_options(settings: Settings) -> dict[str, Any]:
    return {"bootstrap_servers": settings.bootstrap_servers.split(","), "client_id": settings.client_id,
            **settings.security.client_options()}


def unreachable(settings: Settings) -> str:
    """Why no client could be made: kafka-python reports a refused SASL login as a lost connection."""
    why = f"no Kafka broker reachable at {settings.bootstrap_servers}"
    if settings.security.sasl_username:
        why += (f" (or it refused the {settings.security.sasl_mechanism} login as "
                f"{settings.security.sasl_username!r}: kafka-python cannot tell the two apart)")
    return why


#: kafka-python's authorization errors, by the resource whose ACL is missing.
DENIALS = ((GroupAuthorizationFailedError, "group"), (TopicAuthorizationFailedError, "topic"),
           (TransactionalIdAuthorizationFailedError, "transactional-id"))


def denied(settings: Settings, exc: AuthorizationError, topic: str, operation: str) -> str:
    """The missing ACL an authorization error means (`operation` on `topic` for a topic error)."""
    for error, denial in DENIALS:
        if isinstance(exc, error):
            return core.denied_for(settings, denial, topic, operation)
    return f"not authorized ({exc}); {core.DOC} lists the ACLs each component needs"


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.source.handle_revoked({(tp.topic, tp.partition) for tp in revoked})

    def on_partitions_assigned(self, assigned: Any) -> None:
        keys = [(tp.topic, tp.partition) for tp in assigned]
        core.log_assigned(keys)
        self.source.starts.add(keys)
        self.source.handle_assigned()


class KafkaSource:
    """Consumer group member that hands out micro-batches and commits exactly the offsets it is given."""

    def __init__(self, settings: Settings, on_revoke: Callable[[set[TopicKey]], None] | None = None,
                 consumer_factory: Callable[..., Any] = KafkaConsumer,
                 clock: Clock = time.monotonic, quarantine: Quarantine | None = None) -> None:
        self.settings = settings
        self.quarantine = quarantine or Quarantine()
        #: Partitions whose first offset the loop decides (window state restore; none without `restore_with`).
        self.starts = core.Starts(clock)
        #: Called inside poll() before partitions go; the loop forgets offsets it failed to commit for them.
        self.handle_revoked = core.Revocations(self.quarantine, on_revoke, forget=self.starts.remove)
        self._factory = consumer_factory
        self._clock = clock
        self._unstable_since: float | None = None
        self._access_log = core.Throttled(log, settings.retry_backoff_max_s, clock)
        #: The assignment as the last poll left it, for readers on other threads (the readiness probe):
        #: KafkaConsumer is not thread-safe.
        self._assignment = core.Assignment(clock)
        self.consumer = self._connect()

    def _connect(self) -> Any:
        """A new consumer subscribed to the input topic."""
        settings = self.settings
        try:
            consumer = self._factory(
                group_id=settings.group_id, enable_auto_commit=False, auto_offset_reset="earliest",
                max_poll_records=settings.max_batch, fetch_max_bytes=64 * 1024 * 1024,
                max_partition_fetch_bytes=core.partition_fetch_bytes(settings),
                request_timeout_ms=int(settings.kafka_timeout_s * 1000),
                bootstrap_timeout_ms=int(settings.kafka_timeout_s * 1000),
                session_timeout_ms=int(settings.session_timeout_s * 1000),
                max_poll_interval_ms=int(settings.max_poll_interval_s * 1000), isolation_level=settings.isolation_level,
                **client_options(settings))
        except KafkaError as exc:
            raise BrokerUnavailable(unreachable(settings)) from exc
        # Know the topic's partitions before the first join, so it does not end with an empty assignment.
        if not consumer.partitions_for_topic(settings.input_topic):
            log.warning("input topic %s has no partitions yet (not created?); waiting for it to appear",
                        settings.input_topic)
        consumer.subscribe(topics=[settings.input_topic], listener=_Rebalance(self))
        return consumer

    def _check_membership(self) -> None:
        """Replace a consumer whose group rebalance has not finished within `rejoin_timeout_s`.

        kafka-python 3.0.12 can stall in a rebalance it started itself (seen here: partitions revoked,
        never re-assigned, no error). Our rebalances finish in seconds, so a long one is a stall.
        """
        state = self.consumer.group_metadata().state
        now = self._clock()
        if state == MemberState.STABLE:
            self._unstable_since = None
            return
        if self._unstable_since is None:
            self._unstable_since = now
            return
        if now - self._unstable_since < self.settings.rejoin_timeout_s:
            return
        log.warning("consumer group member has been %s for %.0f s; replacing the consumer", state,
                    now - self._unstable_since)
        self.close()
        self._unstable_since = None
        self.consumer = self._connect()

    def handle_assigned(self) -> None:
        """Resume partitions still paused though nothing holds them (`core.stale_pauses`)."""
        stale = core.stale_pauses([(tp.topic, tp.partition) for tp in self.consumer.paused()], self.quarantine)
        if stale:
            self.consumer.resume(*(TopicPartition(*key) for key in stale))

    def poll_batch(self) -> list[Record]:
        """Poll until `max_batch` records or `max_wait_ms` have passed.

        Records are never dropped, even when a rebalance inside poll() revokes their partition: the
        batch is still delivered (the next owner may deliver them again, with the same alert ids), and
        `commit` only commits partitions still assigned. Dropping them is not safe: kafka-python may
        keep a partition's position across a rebalance that hands it back, which would skip them. With
        window state (`restore_with`) they are dropped: a partition handed back is read from where the
        loop says, and a record scored without its partition's state could alert where the owner would not.
        """
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000.0
        records: list[Record] = []
        while len(records) < self.settings.max_batch:
            remaining_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            try:
                polled = self.consumer.poll(timeout_ms=remaining_ms,
                                            max_records=self.settings.max_batch - len(records))
            except (UnsupportedCodecError, CorruptRecordError) as exc:
                self._hold_undecodable(exc)
                polled = {}
            except AuthorizationError as exc:
                # Not joined (no group READ) or not fetching (no topic READ): readiness fails, nothing is
                # committed. Wait out the batch window, as a poll would, so the retries are paced.
                self._access_log.error(denied(self.settings, exc, self.settings.input_topic, "READ"))
                time.sleep(max(0.0, deadline - time.monotonic()))
                break
            records.extend(Record(topic=tp.topic, partition=tp.partition, offset=m.offset, key=m.key, value=m.value,
                                  timestamp_ms=m.timestamp, headers=tuple(m.headers or ()),
                                  timestamp_type=m.timestamp_type) for tp, batch in polled.items() for m in batch)
            if self.starts.restore is not None:
                # Also what an earlier poll of this batch gave of a partition assigned again since: it is read
                # again from where the loop says (kafka-python's eager rebalance revokes and re-assigns all).
                records = self._start_undecided(records)
            if remaining_ms == 0:
                break
        self._check_membership()
        self._assignment.replace(self._owned())
        return records

    def restore_with(self, restore: core.Restore) -> None:
        """Commit offsets with `restore.metadata`; `restore.start` decides where partitions assigned from now start."""
        self.starts.restore = restore
        self.starts.add(self._owned())

    def _start_undecided(self, records: list[Record]) -> list[Record]:
        """`core.Starts` steps 1-3: hold back records of undecided partitions, ask, and seek where the loop says."""
        records = self.starts.hold_back(records, self._owned())
        due = self.starts.due()
        if due:
            timeout_ms = int(min(core.START_RETRY_S / 2 if self.starts.asked_before(due) else 2.0,
                                 self.settings.kafka_timeout_s) * 1000)
            answers = self._committed_points(due, timeout_ms, again=self.starts.asked_before(due))
            for (topic, partition), offset in self.starts.decide(answers).items():
                self.consumer.seek(TopicPartition(topic, partition), offset)
        return records

    def _committed_points(self, keys: list[TopicKey], timeout_ms: int,
                          again: bool = False) -> dict[TopicKey, tuple[int, str | None]]:
        """The committed offset (-1: none) and its metadata of each of `keys` that got an answer."""
        out: dict[TopicKey, tuple[int, str | None]] = {}
        for key in keys:
            try:
                answer = self.consumer.committed(TopicPartition(*key), metadata=True, timeout_ms=timeout_ms)
            except KafkaError as exc:  # once per partition, not every retry (an outage would repeat it each second)
                (log.debug if again else log.warning)(
                    "asking for the committed offset of %s failed, asked again later: %s", core.describe(*key), exc)
                continue
            # librdkafka writes metadata with a terminating NUL, which kafka-python keeps.
            out[key] = (-1, None) if answer is None else (answer.offset, (answer.metadata or "").rstrip("\x00") or None)
        return out

    def _hold_undecodable(self, exc: Exception) -> None:
        """Pause the partition whose next batch raised `exc` (see worker/kafka/core.py for the policy).

        kafka-python 3.0.12 raises from poll() without naming the partition; the failing batch is still
        its fetcher's next-in-line partition records, at the offset the consumer is positioned at. Those
        records are drained: left in place, the exhausted iterator would make a later poll() spin forever
        (after the partition is resumed by a rebalance, for instance); a fetch after a re-assignment fails
        again and holds the partition again. An unknown partition stops the worker with the error instead.
        """
        part = getattr(getattr(self.consumer, "_fetcher", None), "_next_partition_records", None)
        tp = getattr(part, "topic_partition", None)
        if tp is None:
            raise WorkerError(f"the Kafka client cannot decode a record batch and did not say where: {exc}") from exc
        offset = int(getattr(part, "next_fetch_offset", -1))
        self.consumer.pause(tp)
        drain = getattr(part, "drain", None)
        if callable(drain):
            drain()
        self.quarantine.hold(tp.topic, tp.partition, offset, f"{type(exc).__name__}: {exc}")

    def assigned(self) -> set[tuple[str, int]]:
        """The assignment as the last poll left it (a rebalance happens inside poll); safe from any thread."""
        return self._assignment.partitions()

    def _owned(self) -> set[TopicKey]:
        return {(tp.topic, tp.partition) for tp in self.consumer.assignment()}

    def commit(self, offsets: Offsets) -> None:
        """Commit next-offsets for partitions still assigned (with their restore points as metadata, if any);
        raises CommitError on failure or timeout."""
        metadata = self.starts.restore.metadata if self.starts.restore is not None else None
        payload = {TopicPartition(t, p): OffsetAndMetadata(o, (metadata((t, p), o) if metadata else None) or "", -1)
                   for (t, p), o in core.assigned_only(offsets, self._owned()).items()}
        if not payload:
            return
        # Committing during a rebalance fails, and with kafka-python 3.0.12 repeated attempts can keep the
        # rebalance from ever finishing; wait for the member to be stable instead.
        if self.consumer.group_metadata().state != MemberState.STABLE:
            raise RebalanceInProgress("consumer group is rebalancing; the commit waits for it to finish")
        try:
            self.consumer.commit(offsets=payload, timeout_ms=int(self.settings.kafka_timeout_s * 1000))
        except KafkaError as exc:
            raise CommitError(f"offset commit failed: {exc}") from exc

    def rewind(self, offsets: Offsets) -> None:
        """Seek back so undelivered records are consumed again."""
        for (topic, partition), offset in core.assigned_only(offsets, self._owned()).items():
            self.consumer.seek(TopicPartition(topic, partition), offset)

    def lag(self) -> dict[TopicKey, int]:
        """High-water mark minus position, per assigned partition (from the last fetch; no extra requests)."""
        out: dict[tuple[str, int], int] = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            try:
                position = self.consumer.position(tp, timeout_ms=1000)
            except KafkaError:
                position = None
            if high is not None and position is not None:
                out[(tp.topic, tp.partition)] = max(0, int(high) - int(position))
        return out

    def reachable(self) -> bool:
        """Whether the group coordinator answers an offset fetch within the Kafka timeout (`core`)."""
        partitions = sorted(self.consumer.assignment()) or [TopicPartition(self.settings.input_topic, 0)]
        return core.coordinator_answers(lambda: self.consumer.committed(
            partitions[0], timeout_ms=int(self.settings.kafka_timeout_s * 1000)), KafkaError)

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False, timeout_ms=int(self.settings.kafka_timeout_s * 1000))
        except KafkaError as exc:
            log.warning("consumer close: %s", exc)


class KafkaSink:
    """Idempotent producer (acks=all): publishes a batch and confirms every record was acknowledged."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        try:
            self.producer = KafkaProducer(
                acks="all", enable_idempotence=True, linger_ms=5, batch_size=256 * 1024,
                compression_type=None if settings.output_compression == "none" else settings.output_compression,
                max_request_size=core.partition_fetch_bytes(settings),
                request_timeout_ms=int(settings.kafka_timeout_s * 1000),
                bootstrap_timeout_ms=int(settings.kafka_timeout_s * 1000),
                delivery_timeout_ms=int(settings.kafka_timeout_s * 1000) + 5_000, **client_options(settings))
        except KafkaError as exc:
            raise BrokerUnavailable(unreachable(settings)) from exc

    def publish(self, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter]) -> None:
        """1. send every alert and dead letter; 2. flush with a timeout; 3. check every acknowledgement."""
        futures = []
        outgoing = core.outgoing_records(self.settings, alerts, dead_letters)
        topics = [topic for topic, _key, _value, _headers in outgoing]
        try:
            for topic, key, value, headers in outgoing:
                futures.append(self.producer.send(topic, key=key, value=value, headers=headers))
            self.producer.flush(timeout=self.settings.kafka_timeout_s)
        except KafkaError as exc:
            raise DeliveryError(f"publishing {len(futures)} records failed: {exc}") from exc
        failed = [(f, topic) for f, topic in zip(futures, topics, strict=True) if not f.is_done or f.failed()]
        if failed:
            future, topic = failed[0]
            first = future.exception if future.is_done else "not acknowledged in time"
            if isinstance(first, AuthorizationError):
                first = denied(self.settings, first, topic, "WRITE")
            raise DeliveryError(f"{len(failed)} of {len(futures)} records were not acknowledged: {first}")

    def close(self) -> None:
        try:
            self.producer.close(timeout=self.settings.kafka_timeout_s)
        except KafkaError as exc:
            log.warning("producer close: %s", exc)
