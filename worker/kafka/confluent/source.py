"""The confluent-kafka (librdkafka) consumer: the loop's `Source`, a thin adapter over `worker/kafka/core.py`.

Offsets are stored and committed only by the loop (`enable.auto.commit` and `enable.auto.offset.store`
off), the group uses cooperative-sticky (incremental) rebalancing, and every blocking call has a timeout
(`socket.timeout.ms` bounds commits that wait for a coordinator).

Offset commits are asynchronous: the loop hands `commit` the offsets of a batch whose every record is
acknowledged, and librdkafka sends them while the next batch is processed (a synchronous commit held the
loop for a coordinator round trip, about a sixth of a batch's time at full speed). A failure is reported
when librdkafka serves the commit's result inside the next poll: the offsets are sent again and the next
`commit` raises CommitError, so the loop counts it and marks the broker down as for a synchronous one.
`close`, and a rebalance for the partitions it revokes, commit synchronously whatever is not confirmed yet.
A crash loses at most the commits in flight, so their records are read again: duplicates with the same
alert ids, never a gap.

Where a partition starts, and restarting one that never starts fetching, is `start_guard.StartGuard`'s job.
With window state (`restore_with`), each commit carries the partition's restore point as its metadata, and
a partition assigned is read first from the point its committed metadata names (`core.Starts`), so the loop
can rebuild its state before it scores anything new.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import (
    TIMESTAMP_LOG_APPEND_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)

from worker.config import Settings
from worker.errors import BrokerUnavailable, CommitError, RebalanceInProgress, WorkerError
from worker.kafka.confluent.client import (
    LoginWatch,
    check_reachable,
    client_config,
    denied,
    kafka_error,
    offset_with,
)
from worker.kafka.confluent.start_guard import StartGuard
from worker.kafka.core import (
    Assignment,
    Clock,
    Offsets,
    Quarantine,
    Restore,
    Revocations,
    Starts,
    Throttled,
    TopicKey,
    assigned_only,
    coordinator_answers,
    describe,
    log_assigned,
    partition_fetch_bytes,
    stale_pauses,
)
from worker.records import Record

log = logging.getLogger(__name__)

#: Consumer errors that mean "this record batch cannot be decoded" (codec missing, corrupt batch).
UNDECODABLE = frozenset({KafkaError._BAD_COMPRESSION, KafkaError._BAD_MSG, KafkaError._NOT_IMPLEMENTED})
#: Commit errors that mean "the group is rebalancing": the offsets stay pending, as with kafka-python.
REBALANCING = frozenset({KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION})
#: The most the consumer buffers ahead of the loop (and fetches in one request).
PREFETCH_MAX_BYTES = 32 * 1024 * 1024
#: How long librdkafka waits before fetching again once that buffer is full (its default is 1,000 ms).
FETCH_QUEUE_BACKOFF_MS = 20


class ConfluentSource:
    """Consumer group member that hands out micro-batches and commits exactly the offsets it is given."""

    def __init__(self, settings: Settings, on_revoke: Callable[[set[TopicKey]], None] | None = None,
                 quarantine: Quarantine | None = None,
                 consumer_factory: Callable[[dict[str, Any]], Any] = Consumer,
                 clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self.quarantine = quarantine or Quarantine()
        self._clock = clock
        self._fatal: KafkaError | None = None
        self._last_return = clock()
        #: The current assignment: when each partition was assigned (or last re-added, `restart_unfetched`).
        #: `assigned()` is read by the readiness probe's thread too.
        self._assignment = Assignment(clock)
        #: Partitions whose first offset the loop decides (window state restore; none without `restore_with`).
        self._starts = Starts(clock)
        self.start_guard = StartGuard(settings, self._assignment, self.quarantine, clock, on_restart=self._starts.add)
        #: Offsets (and their metadata) handed to librdkafka whose commit is not confirmed yet, and those among
        #: them that failed.
        self._unconfirmed: dict[TopicKey, tuple[int, str | None]] = {}
        self._failed: set[TopicKey] = set()
        self._commit_failure: str | None = None  # the first failure since the last `commit` call
        #: Partitions this source paused at an undecodable batch (librdkafka keeps a pause until resumed).
        self._paused: set[TopicKey] = set()
        #: Called inside poll before partitions go; the loop forgets offsets it failed to commit for them.
        self.handle_revoked = Revocations(self.quarantine, on_revoke, forget=self._forget)
        self._login = LoginWatch(self._on_client_error)
        self._access_log = Throttled(log, settings.retry_backoff_max_s, clock)
        fetch_bytes = partition_fetch_bytes(settings)
        prefetch_bytes = max(PREFETCH_MAX_BYTES, fetch_bytes)
        self.consumer = consumer_factory({
            **client_config(settings), "group.id": settings.group_id,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            # librdkafka reports instead of resetting; `StartGuard.start_reset` applies the worker's policy.
            "auto.offset.reset": "error",
            "isolation.level": settings.isolation_level, "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": int(settings.session_timeout_s * 1000),
            "max.poll.interval.ms": int(settings.max_poll_interval_s * 1000),
            # Prefetch a few batches, not librdkafka's default 100,000 messages per partition (up to 64 MiB):
            # a backlog after an outage would otherwise set the worker's memory high-water mark. With so
            # small a queue, librdkafka's default 1 s pause after reaching it would starve the loop
            # (6,500 instead of 50,000 events/s through a plain consume-produce-commit loop here).
            "queued.min.messages": max(2 * settings.max_batch, 1000), "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS,
            "queued.max.messages.kbytes": prefetch_bytes // 1024, "fetch.max.bytes": prefetch_bytes,
            "max.partition.fetch.bytes": fetch_bytes,
            # A fetch waits at most one batch window for data, so a quiet topic adds no latency beyond it.
            "fetch.wait.max.ms": max(1, min(500, settings.max_wait_ms)),
            "error_cb": self._login, "on_commit": self._on_commit,
            # Statistics name each partition's fetch state; `restart_unfetched` looks for stuck ones.
            "statistics.interval.ms": int(self.start_guard.fetch_check_interval_s() * 1000),
            "stats_cb": self.start_guard.on_stats,
        })
        self.start_guard.attach(self.consumer)
        try:
            check_reachable(self.consumer, settings, self._login)
        except BrokerUnavailable:
            self.consumer.close()
            raise
        self.consumer.subscribe([settings.input_topic], on_assign=self._assigned, on_revoke=self._revoked,
                                on_lost=self._lost)

    def _on_client_error(self, error: KafkaError) -> None:
        """librdkafka recovers from most errors by itself (broker down, coordinator moved); fatal ones stop us."""
        if error.fatal():
            self._fatal = error
        log.debug("kafka client error: %s", error)

    def _assigned(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # librdkafka applies the (incremental) assignment itself after this callback.
        keys = [(tp.topic, tp.partition) for tp in partitions]
        log_assigned(keys)
        self._assignment.add(keys)
        self._starts.add(keys)
        # Given back still paused by this source though nothing holds them now (`core.stale_pauses`).
        stale = stale_pauses([key for key in keys if key in self._paused], self.quarantine)
        if stale:
            self.consumer.resume([TopicPartition(*key) for key in stale])
            self._paused.difference_update(stale)

    def _revoked(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """Partitions handed back in a rebalance: first confirm their commits still in flight, so their next
        owner starts after what this worker delivered (a commit from this callback is librdkafka's way)."""
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._confirm_unconfirmed(keys, "revoked partitions")
        self.handle_revoked(keys)

    def _lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """Partitions lost (the membership expired): another member may own them already; commit nothing."""
        self.handle_revoked({(tp.topic, tp.partition) for tp in partitions})

    def _forget(self, partitions: set[TopicKey]) -> None:
        """This source's records of partitions going (`core.Revocations` step 2)."""
        self._assignment.remove(partitions)
        self._starts.remove(partitions)
        for key in partitions:
            self._unconfirmed.pop(key, None)  # the next owner decides; a late result for it is ignored
            self._failed.discard(key)
        self.start_guard.forget(partitions)

    def poll_batch(self) -> list[Record]:
        """Poll until `max_batch` records or `max_wait_ms` have passed.

        As with kafka-python, records of a partition revoked during the poll are still delivered (the
        next owner may deliver them again, with the same alert ids); `commit` skips revoked partitions.
        With window state they are dropped (`core.Starts.hold_back`).
        """
        self.start_guard.restart_unfetched()
        records: list[Record] = []
        messages = self._consume()  # serves the results of earlier commits, too
        if self._failed:
            self._retry_failed_commits()
        held = self.quarantine.held
        resets: dict[TopicKey, int | None] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._AUTO_OFFSET_RESET and message.partition() is not None:
                    resets[(message.topic(), message.partition())] = message.offset()
                else:
                    self._on_message_error(message, error, records)
                continue
            topic, partition, offset = message.topic(), message.partition(), message.offset()
            if held and (limit := held.get((topic, partition))) is not None and offset >= limit:
                continue  # queued before the partition was held: never past an undecodable batch
            kind, timestamp = message.timestamp()
            headers = message.headers()
            # Positional (topic, partition, offset, key, value, timestamp_ms, headers, timestamp_type): this
            # runs for every record.
            records.append(Record(topic, partition, offset, message.key(), message.value(),
                                  None if kind == TIMESTAMP_NOT_AVAILABLE else timestamp,
                                  tuple(headers) if headers else (), 1 if kind == TIMESTAMP_LOG_APPEND_TIME else 0))
        resets.update({key: None for key in self.start_guard.due() if key not in resets})
        if resets:
            self.start_guard.start_reset(resets)
        if self._fatal is not None:
            raise WorkerError(f"the Kafka client failed fatally: {self._fatal}")
        if self._starts.restore is not None:
            records = self._start_undecided(records)
        return records

    def restore_with(self, restore: Restore) -> None:
        """Commit offsets with `restore.metadata`; `restore.start` decides where partitions assigned from now start."""
        self._starts.restore = restore
        self._starts.add(self._assignment.partitions())

    def _start_undecided(self, records: list[Record]) -> list[Record]:
        """`core.Starts` steps 1-3: hold back records of undecided partitions, ask, and seek where the loop says.

        The seek is a re-add at the offset (`StartGuard.re_add`): it works whether or not the partition has
        started fetching, and librdkafka drops what it had prefetched from before."""
        records = self._starts.hold_back(records, self._assignment)
        due = self._starts.due()
        if not due:
            return records
        answers = self.start_guard.committed_points(due, again=self._starts.asked_before(due))
        seeks = self._starts.decide(answers)
        self.start_guard.forget(answers)  # started here: nothing left for the guard to wait for
        if seeks:
            self.start_guard.re_add([TopicPartition(t, p, o) for (t, p), o in sorted(seeks.items())])
        return records

    def _consume(self) -> list[Any]:
        """Up to `max_batch` messages; none waits in this worker longer than the batch window.

        1. Take what is queued already: it arrived since the last poll returned, while that batch was
           processed, so it has waited that long.
        2. If that is less than a batch, wait for more only for what remains of the window counted from
           the last poll's return (the whole window when nothing was queued).

        A plain `consume(max_batch, window)` would hold the first record for the processing time plus a
        whole window.
        """
        window_s = self.settings.max_wait_ms / 1000.0
        messages: list[Any] = self.consumer.consume(num_messages=self.settings.max_batch, timeout=0)
        remaining_s = window_s - (self._clock() - self._last_return) if messages else window_s
        if len(messages) < self.settings.max_batch and remaining_s > 0:
            messages += self.consumer.consume(num_messages=self.settings.max_batch - len(messages),
                                              timeout=remaining_s)
        self._last_return = self._clock()
        return messages

    def _on_message_error(self, message: Any, error: KafkaError, records: list[Record]) -> None:
        topic, partition = message.topic(), message.partition()
        if error.code() in UNDECODABLE and topic is not None and partition is not None and partition >= 0:
            offset = int(message.offset() or 0)
            self.consumer.pause([TopicPartition(topic, partition)])
            self._paused.add((topic, partition))
            records[:] = [r for r in records if (r.topic, r.partition) != (topic, partition) or r.offset < offset]
            self.quarantine.hold(topic, partition, offset, error.str())
        elif error.code() != KafkaError._PARTITION_EOF:
            if error.fatal():
                raise WorkerError(f"the Kafka client failed fatally: {error}")
            if (denial := denied(self.settings, error, self.settings.input_topic, "READ")) is not None:
                self._access_log.error(denial)  # not assigned, so readiness fails until the ACL is added
                return
            log.warning("consumer error on %s[%s]: %s", topic, partition, error)

    def assigned(self) -> set[TopicKey]:
        """The current assignment, as the rebalance callbacks left it.

        `Consumer.assignment()` is a round trip to librdkafka's main thread (about 5 ms on a busy
        machine), and the loop asks for the assignment on every batch. Safe from any thread.
        """
        return self._assignment.partitions()

    def group_metadata(self) -> Any:
        """This member's current group metadata (generation included), for transactional offset commits."""
        return self.consumer.consumer_group_metadata()

    def commit(self, offsets: Offsets) -> None:
        """Send next-offsets for partitions still assigned (asynchronously; see the module docstring).

        Raises RebalanceInProgress or CommitError if librdkafka refuses them at once, and CommitError if a
        commit sent earlier failed (its offsets are sent again with these).
        """
        self._send_commit(offsets)
        failure, self._commit_failure = self._commit_failure, None
        if failure is not None:
            raise CommitError(f"an earlier offset commit failed ({failure}); its offsets were sent again")

    def _send_commit(self, offsets: Offsets) -> None:
        """Commit `offsets` and the failed unconfirmed ones asynchronously, for partitions still assigned."""
        mine = self.assigned()
        metadata = self._starts.restore.metadata if self._starts.restore is not None else None
        wanted = {key: self._unconfirmed[key] for key in self._failed}
        wanted.update({key: (offset, metadata(key, offset) if metadata else None)
                       for key, offset in assigned_only(offsets, mine).items()})
        payload = [offset_with(t, p, o, m) for (t, p), (o, m) in assigned_only(wanted, mine).items()]
        if not payload:
            return
        try:
            self.consumer.commit(offsets=payload, asynchronous=True)
        except KafkaException as exc:
            error = kafka_error(exc)
            if error is not None and error.code() in REBALANCING:
                raise RebalanceInProgress(f"consumer group is rebalancing: {error}") from exc
            raise CommitError(f"offset commit failed: {exc}") from exc
        for tp in payload:
            self._unconfirmed[(tp.topic, tp.partition)] = (tp.offset, tp.metadata)
            self._failed.discard((tp.topic, tp.partition))

    def _retry_failed_commits(self) -> None:
        """Send failed commits again (also while idle, when the loop has nothing new to commit)."""
        try:
            self._send_commit({})
        except (CommitError, RebalanceInProgress) as exc:
            log.debug("offsets %s not sent again yet: %s", sorted(self._failed), exc)

    def _confirm_unconfirmed(self, partitions: set[TopicKey], what: str) -> None:
        """Commit the unconfirmed offsets of `partitions` synchronously (a revoke, or close)."""
        offsets = [offset_with(t, p, o, m) for (t, p), (o, m) in self._unconfirmed.items() if (t, p) in partitions]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("offsets %s of %s not confirmed; their records will be read again (same alert ids): %s",
                        ", ".join(sorted(describe(tp.topic, tp.partition, tp.offset) for tp in offsets)), what, exc)
            return
        for tp in offsets:
            self._unconfirmed.pop((tp.topic, tp.partition), None)
            self._failed.discard((tp.topic, tp.partition))

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The result of an asynchronous commit (served inside poll): confirm it, or keep it to send again.

        A request that failed as a whole may come back without its partitions: then everything unconfirmed
        is sent again (a repeated commit of the same offsets is harmless)."""
        if error is not None and error.code() != KafkaError._NO_OFFSET and not partitions:
            if not self._failed and self._commit_failure is None:
                log.warning("offset commit failed, sent again with the next commit: %s", error)
            self._failed.update(self._unconfirmed)
            self._commit_failure = self._commit_failure or str(error)
            return
        for tp in partitions or []:
            key = (tp.topic, tp.partition)
            if self._unconfirmed.get(key, (None, None))[0] != tp.offset:
                continue  # revoked since, or a later commit of the partition is on its way: that one decides
            failure = error if error is not None and error.code() != KafkaError._NO_OFFSET else tp.error
            if failure is None:
                del self._unconfirmed[key]
                self._failed.discard(key)
                continue
            if not self._failed and self._commit_failure is None:
                log.warning("offset commit of %s failed, sent again with the next commit: %s",
                            describe(tp.topic, tp.partition, tp.offset), failure)
            self._failed.add(key)
            self._commit_failure = self._commit_failure or str(failure)

    def rewind(self, offsets: Offsets) -> None:
        """Seek back so undelivered records are consumed again (librdkafka drops what it had prefetched)."""
        for (topic, partition), offset in assigned_only(offsets, self.assigned()).items():
            try:
                self.consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:
                # Going on would skip the undelivered records; a restart re-reads them from the commit.
                raise WorkerError(f"cannot seek {describe(topic, partition)} back to {offset}: {exc}") from exc

    def lag(self) -> dict[TopicKey, int]:
        """High-water mark minus position, per assigned partition (cached from fetches; no extra requests)."""
        out: dict[TopicKey, int] = {}
        for tp in self.consumer.position([TopicPartition(t, p) for t, p in self._assignment.partitions()]):
            if tp.offset < 0:
                continue  # nothing consumed yet
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
            if high >= 0:
                out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        return out

    def reachable(self) -> bool:
        """Whether the group coordinator answers an offset fetch within the Kafka timeout (`core`)."""
        topic, partition = min(self._assignment.partitions(), default=(self.settings.input_topic, 0))
        return coordinator_answers(lambda: self.consumer.committed(
            [TopicPartition(topic, partition)], timeout=self.settings.kafka_timeout_s), KafkaException)

    def close(self) -> None:
        """Commit what is not confirmed yet (synchronously), then leave the group."""
        self._confirm_unconfirmed(self._assignment.partitions(), "the final commit")
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close: %s", exc)

