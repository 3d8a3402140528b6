"""confluent-kafka (librdkafka) at the edge: the same Source and Sink as `worker/kafka_io.py`, on librdkafka.

The only module of the worker that imports `confluent_kafka`; `worker/edge.py` picks it for
`--kafka-client confluent` (the default). Offsets are stored and committed only by the loop
(`enable.auto.commit` and `enable.auto.offset.store` off), the group uses cooperative-sticky
(incremental) rebalancing, and every blocking call has a timeout (`socket.timeout.ms` bounds commits
that wait for a coordinator).

Offset commits are asynchronous: the loop hands `commit` the offsets of a batch whose every record is
acknowledged, and librdkafka sends them while the next batch is processed (a synchronous commit held the
loop for a coordinator round trip, about a sixth of a batch's time at full speed). A failure is reported
when librdkafka serves the commit's result inside the next poll: the offsets are sent again and the next
`commit` raises CommitError, so the loop counts it and marks the broker down as for a synchronous one.
`close`, and a rebalance for the partitions it revokes, commit synchronously whatever is not confirmed yet.
A crash loses at most the commits in flight, so their records are read again: duplicates with the same
alert ids, never a gap.

Where a partition starts is decided here, not by librdkafka's `auto.offset.reset` (set to "error"; see
`_start_reset`): librdkafka also resets a partition whose committed offset exists but is held by an open
transaction, whenever the assignment changes while it asks for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_LOG_APPEND_TIME,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

from worker import access
from worker.config import Settings
from worker.edge import Quarantine
from worker.errors import (
    BrokerUnavailable,
    CommitError,
    DeliveryError,
    RebalanceInProgress,
    TransactionAborted,
    WorkerError,
)
from worker.records import Alert, DeadLetter, Record

log = logging.getLogger(__name__)
librdkafka_log = logging.getLogger("librdkafka")

#: A transaction slower than this is logged with the time of each step.
SLOW_TRANSACTION_S = 5.0

Offsets = Mapping[tuple[str, int], int]

#: Consumer errors that mean "this record batch cannot be decoded" (codec missing, corrupt batch).
UNDECODABLE = frozenset({KafkaError._BAD_COMPRESSION, KafkaError._BAD_MSG, KafkaError._NOT_IMPLEMENTED})
#: Commit errors that mean "the group is rebalancing": the offsets stay pending, as with kafka-python.
REBALANCING = frozenset({KafkaError.REBALANCE_IN_PROGRESS, KafkaError.ILLEGAL_GENERATION})
#: The longest `_start_reset` holds the loop asking for committed offsets (usually one round trip).
COMMITTED_TIMEOUT_S = 2.0
#: How often a partition without a position asks again for a committed offset an open transaction holds.
PARKED_RETRY_S = 1.0
#: The longest one such repeated question holds the loop (see `ConfluentSource._stable_committed`).
PARKED_ASK_S = PARKED_RETRY_S / 2
#: The most the consumer buffers ahead of the loop (and fetches in one request).
PREFETCH_MAX_BYTES = 32 * 1024 * 1024
#: How long librdkafka waits before fetching again once that buffer is full (its default is 1,000 ms).
FETCH_QUEUE_BACKOFF_MS = 20


def client_config(settings: Settings) -> dict[str, Any]:
    """Properties every librdkafka client of the worker shares: brokers, id, security, timeouts, logging."""
    return {"bootstrap.servers": settings.bootstrap_servers, "client.id": settings.client_id,
            "socket.timeout.ms": int(settings.kafka_timeout_s * 1000), "logger": librdkafka_log,
            **settings.security.librdkafka_config()}


def _names(partitions: Sequence[TopicPartition]) -> list[str]:
    return _keys([(tp.topic, tp.partition) for tp in partitions])


def _keys(keys: Sequence[tuple[str, int]]) -> list[str]:
    return sorted(f"{topic}[{partition}]" for topic, partition in keys)


class LoginWatch:
    """A client's `error_cb` that remembers a refused SASL login (then calls `on_error`, if any).

    A metadata request of a client whose login was refused fails as a mere transport failure; the
    reason reaches only this callback, served inside poll.
    """

    def __init__(self, on_error: Callable[[KafkaError], None] | None = None) -> None:
        self.on_error = on_error
        self.refused: KafkaError | None = None

    def __call__(self, error: KafkaError) -> None:
        if error.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            self.refused = error
        if self.on_error is not None:
            self.on_error(error)


def _check_reachable(client: Any, settings: Settings, login: LoginWatch | None = None) -> None:
    """librdkafka connects lazily; ask for metadata so an absent broker is BrokerUnavailable, as with kafka-python.

    With the client's `login` watch, a refused login says so (`authentication failed: ...`).
    """
    try:
        client.list_topics(timeout=settings.kafka_timeout_s)
    except KafkaException as exc:
        if login is not None:
            client.poll(0)  # serves error_cb
            if login.refused is not None:
                raise BrokerUnavailable(access.authentication_failed(
                    settings.security, settings.bootstrap_servers, login.refused.str())) from exc
        raise BrokerUnavailable(f"no Kafka broker reachable at {settings.bootstrap_servers}: {exc}") from exc


class ConfluentSource:
    """Consumer group member that hands out micro-batches and commits exactly the offsets it is given."""

    def __init__(self, settings: Settings, on_revoke: Callable[[set[tuple[str, int]]], None] | None = None,
                 quarantine: Quarantine | None = None,
                 consumer_factory: Callable[[dict[str, Any]], Any] = Consumer) -> None:
        self.settings = settings
        self._on_revoke = on_revoke
        self.quarantine = quarantine or Quarantine()
        self._fatal: KafkaError | None = None
        self._last_return = time.monotonic()
        #: The current assignment: when each partition was assigned (or last re-added, `_restart_unfetched`).
        self._assigned_at: dict[tuple[str, int], float] = {}
        self._assignment_lock = threading.Lock()  # `assigned()` is read by the readiness probe's thread too
        self._next_fetch_check = 0.0
        #: librdkafka's fetch state of each partition of the input topic, from its latest statistics, and when.
        self._fetch_states: dict[tuple[str, int], str] = {}
        self._stats_at = float("-inf")
        #: Offsets handed to librdkafka whose commit is not confirmed yet, and those among them that failed.
        self._unconfirmed: dict[tuple[str, int], int] = {}
        self._failed: set[tuple[str, int]] = set()
        self._commit_failure: str | None = None  # the first failure since the last `commit` call
        #: Partitions stopped without a position until their committed offset is known, and when to ask next.
        self._parked: dict[tuple[str, int], float] = {}
        #: Partitions this source paused at an undecodable batch (librdkafka keeps a pause until resumed).
        self._paused: set[tuple[str, int]] = set()
        self._login = LoginWatch(self._on_client_error)
        self._access_log = access.Throttled(log, settings.retry_backoff_max_s)
        partition_fetch_bytes = max(settings.max_event_bytes * 2, 1024 * 1024)
        prefetch_bytes = max(PREFETCH_MAX_BYTES, partition_fetch_bytes)
        self.consumer = consumer_factory({
            **client_config(settings), "group.id": settings.group_id,
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            # librdkafka reports instead of resetting; `_start_reset` applies the worker's policy (earliest).
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
            "max.partition.fetch.bytes": partition_fetch_bytes,
            # A fetch waits at most one batch window for data, so a quiet topic adds no latency beyond it.
            "fetch.wait.max.ms": max(1, min(500, settings.max_wait_ms)),
            "error_cb": self._login, "on_commit": self._on_commit,
            # Statistics name each partition's fetch state; `_restart_unfetched` looks for stuck ones.
            "statistics.interval.ms": int(self._fetch_check_interval_s() * 1000), "stats_cb": self._on_stats,
        })
        try:
            _check_reachable(self.consumer, settings, self._login)
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

    def _on_stats(self, text: str) -> None:
        """Keep each input partition's `fetch_state` from librdkafka's statistics (served inside poll)."""
        try:
            partitions = orjson.loads(text)["topics"][self.settings.input_topic]["partitions"]
            states = {(self.settings.input_topic, int(p)): str(v["fetch_state"]) for p, v in partitions.items()
                      if int(p) >= 0}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return  # no statistics for the topic yet (nothing assigned), or a format we do not know
        self._fetch_states, self._stats_at = states, time.monotonic()

    def _fetch_check_interval_s(self) -> float:
        return min(self.settings.kafka_timeout_s, 5.0)

    def _assigned(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # librdkafka applies the (incremental) assignment itself after this callback.
        log.info("partitions assigned: %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in partitions))
        now = time.monotonic()
        with self._assignment_lock:
            self._assigned_at.update({(tp.topic, tp.partition): now for tp in partitions})
        self._resume_released(partitions)

    def _resume_released(self, partitions: list[TopicPartition]) -> None:
        """Resume partitions given back that this source paused and nothing holds now.

        librdkafka (2.16) keeps an application pause through a rebalance that takes a partition away and
        gives it back, while the revocation released its hold: left paused, it would never be fetched again,
        and nothing would report it. Resumed, a batch that still cannot be decoded fails the next fetch and
        holds it again.
        """
        stale = [tp for tp in partitions if (tp.topic, tp.partition) in self._paused
                 and self.quarantine.limit(tp.topic, tp.partition) is None]
        if stale:
            log.info("resuming %s: paused before the rebalance, not held now", _names(stale))
            self.consumer.resume([TopicPartition(tp.topic, tp.partition) for tp in stale])
            self._paused.difference_update((tp.topic, tp.partition) for tp in stale)

    def _revoked(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """Partitions handed back in a rebalance: first confirm their commits still in flight, so their next
        owner starts after what this worker delivered (a commit from this callback is librdkafka's way)."""
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._confirm_unconfirmed(keys, "revoked partitions")
        self.handle_revoked(keys)

    def _lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        """Partitions lost (the membership expired): another member may own them already; commit nothing."""
        self.handle_revoked({(tp.topic, tp.partition) for tp in partitions})

    def handle_revoked(self, partitions: set[tuple[str, int]]) -> None:
        """Called inside poll before partitions go; the loop forgets offsets it failed to commit for them."""
        log.info("partitions revoked: %s", sorted(f"{t}[{p}]" for t, p in partitions))
        for key in partitions:
            with self._assignment_lock:
                self._assigned_at.pop(key, None)
            self._unconfirmed.pop(key, None)  # the next owner decides; a late result for it is ignored
            self._parked.pop(key, None)
            self._failed.discard(key)
        self.quarantine.release(partitions)
        if self._on_revoke is not None:
            self._on_revoke(partitions)

    def poll_batch(self) -> list[Record]:
        """Poll until `max_batch` records or `max_wait_ms` have passed.

        As with kafka-python, records of a partition revoked during the poll are still delivered (the
        next owner may deliver them again, with the same alert ids); `commit` skips revoked partitions.
        """
        self._restart_unfetched()
        records: list[Record] = []
        messages = self._consume()  # serves the results of earlier commits, too
        if self._failed:
            self._retry_failed_commits()
        held = self.quarantine.held
        resets: dict[tuple[str, int], int | None] = {}
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
        if self._parked:
            now = time.monotonic()
            resets.update({key: None for key, due in self._parked.items() if due <= now and key not in resets})
        if resets:
            self._start_reset(resets)
        if self._fatal is not None:
            raise WorkerError(f"the Kafka client failed fatally: {self._fatal}")
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
        remaining_s = window_s - (time.monotonic() - self._last_return) if messages else window_s
        if len(messages) < self.settings.max_batch and remaining_s > 0:
            messages += self.consumer.consume(num_messages=self.settings.max_batch - len(messages),
                                              timeout=remaining_s)
        self._last_return = time.monotonic()
        return messages

    def _restart_unfetched(self) -> None:
        """Restart partitions assigned a Kafka timeout ago that are not fetching.

        librdkafka starts fetching an assigned partition once it has its committed offset. If that
        OffsetFetch is answered NOT_COORDINATOR for the whole request (the group coordinator moved), the
        partition is left waiting for an answer forever and no later assignment gets its offsets either
        (librdkafka #5586, open): the worker stays up while the lag grows. Taking such partitions out of
        the assignment and adding them back makes librdkafka ask again. A partition whose previous owner
        died inside a transaction also waits (until that transaction times out); asking again is
        harmless there.

        A partition is not fetching if the client has never had a high-water mark for it, or if statistics
        taken since it was assigned show a fetch state other than `active`. The second matters after a
        rebalance gives a worker back partitions it had: librdkafka keeps their old high-water marks, so
        only the fetch state tells that they wait (the way a coordinator move after a broker restart
        stalled a soak for 170 s).
        """
        now = time.monotonic()
        if now < self._next_fetch_check or not self._assigned_at:
            return
        wait_s = self.settings.kafka_timeout_s
        self._next_fetch_check = now + self._fetch_check_interval_s()

        def waiting(key: tuple[str, int], since: float) -> bool:
            if now - since < wait_s or self.quarantine.limit(*key) is not None or key in self._parked:
                return False
            if self._stats_at > since and self._fetch_states.get(key, "active") != "active":
                return True
            return bool(self.consumer.get_watermark_offsets(TopicPartition(*key), cached=True)[1] < 0)

        unfetched = [TopicPartition(*key) for key, since in self._assigned_at.items() if waiting(key, since)]
        if not unfetched:
            return
        log.warning("partitions %s assigned %.0f s ago or more have not started fetching (fetch states %s; "
                    "committed offsets not known yet: a dead owner's open transaction, or a lost answer, "
                    "librdkafka #5586); re-adding them so their committed offsets are fetched again",
                    _names(unfetched), wait_s,
                    sorted({self._fetch_states.get((tp.topic, tp.partition), "unknown") for tp in unfetched}))
        self._re_add(unfetched)

    def _re_add(self, partitions: list[TopicPartition]) -> None:
        """Take `partitions` out of the assignment and add them back, each at its offset (none: the committed)."""
        try:
            self.consumer.incremental_unassign([TopicPartition(tp.topic, tp.partition) for tp in partitions])
        except KafkaException as exc:
            log.warning("taking partitions %s out failed, tried again in %.0f s: %s", _names(partitions),
                        self.settings.kafka_timeout_s, exc)
            return
        try:
            self.consumer.incremental_assign(partitions)
        except KafkaException as exc:
            # Out of the assignment but still ours in the group: nobody would read them. A restart does.
            raise WorkerError(f"cannot re-add partitions {_names(partitions)} to the assignment: {exc}") from exc
        now = time.monotonic()
        with self._assignment_lock:
            self._assigned_at.update({(tp.topic, tp.partition): now for tp in partitions})

    def _start_reset(self, failed: Mapping[tuple[str, int], int | None]) -> None:
        """Start partitions librdkafka found no position for (`auto.offset.reset` "error"), by this worker's policy.

        `failed` maps each to the offset that could not be fetched, or None when librdkafka had no committed
        offset for it. That "none" is not always true: when the assignment changes (a cooperative rebalance,
        or `_restart_unfetched`) while librdkafka retries an OffsetFetch answered UNSTABLE_OFFSET_COMMIT
        (an open transaction holds the group's offsets, as after a worker died inside one), librdkafka 2.16
        drops the answer and starts the partition as if nothing were committed. With "earliest" that read
        the partition again from its start: duplicates for an exactly-once worker, all of retention for a
        long-lived group. So the committed offset is asked for again, a stable one (`_stable_committed`):

        - committed: start there;
        - nothing committed (a new group): start at the earliest offset;
        - not known yet (the transaction is still open, or no answer): leave the partition stopped and ask
          again in `PARKED_RETRY_S`. Re-adding it for librdkafka to ask would change the assignment again
          while its earlier question is still being retried, and start the same reset over;
        - an offset out of range (records deleted by retention before this group read them, or a recreated
          topic): start at the earliest offset, with a warning that names what was skipped.
        """
        out_of_range = {key: offset for key, offset in failed.items() if offset is not None and offset >= 0}
        keys = [key for key in failed if key in self._assigned_at and self.quarantine.limit(*key) is None]
        committed = self._stable_committed([key for key in keys if key not in out_of_range])
        starts: list[TopicPartition] = []
        now = time.monotonic()
        for key in keys:
            if (offset := out_of_range.get(key)) is not None:
                low = self._low_watermark(key)
                where = f"offset {offset} of {key[0]}[{key[1]}] is out of range"
                if low is None:
                    why = where
                elif offset < low:
                    why = f"{where} (earliest now {low}): {low - offset} records deleted by retention were never read"
                else:
                    why = f"{where} (earliest now {low}): past the partition's end, it was recreated or truncated"
                log.warning("%s; reading from the earliest offset", why)
                starts.append(TopicPartition(*key, OFFSET_BEGINNING))
            elif (position := committed.get(key)) is None:
                if key not in self._parked:
                    log.warning("%s[%d] has no position and its committed offset is not known yet (an open "
                                "transaction holds it?): it waits, asking every %.0f s", *key, PARKED_RETRY_S)
                self._parked[key] = now + PARKED_RETRY_S
            elif position >= 0:
                if key in self._parked:
                    log.info("%s[%d]: its committed offset %d is known now; starting there", *key, position)
                else:
                    log.warning("librdkafka started %s[%d] as if nothing were committed (the assignment changed "
                                "while a transaction held its offset); starting at the committed offset %d instead",
                                *key, position)
                starts.append(TopicPartition(*key, position))
            else:
                log.info("%s[%d] has no committed offset: reading from the earliest", *key)
                starts.append(TopicPartition(*key, OFFSET_BEGINNING))
        for tp in starts:
            self._parked.pop((tp.topic, tp.partition), None)
        if starts:
            self._re_add(starts)

    def _stable_committed(self, keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        """The group's committed offsets of `keys` (negative: none); a partition whose offset an open
        transaction holds, or that got no answer, is missing.

        The consumer's own `committed` asks the group coordinator librdkafka already follows, and survives
        it moving. (The admin API's ListConsumerGroupOffsets, used before, can crash the process with
        SIGSEGV on NOT_COORDINATOR: librdkafka #5040, confluent-kafka-python #1982; see docs/faults.md.)
        With `isolation.level=read_committed` (the default) it asks for stable offsets and retries an
        "unstable" answer until its timeout, so a timeout or an error means "not known yet", never "nothing
        committed"; read_uncommitted gets what librdkafka itself would start the partition from.

        The loop waits for the answer, at most the Kafka timeout and: `COMMITTED_TIMEOUT_S` for a first
        question (a coordinator just found may take a few round trips), `PARKED_ASK_S` when every partition
        asked is parked (an open transaction makes each question last its whole bound, every
        `PARKED_RETRY_S`: so the loop keeps two thirds of its time for the other partitions).
        """
        if not keys:
            return {}
        parked = all(key in self._parked for key in keys)
        timeout = min(PARKED_ASK_S if parked else COMMITTED_TIMEOUT_S, self.settings.kafka_timeout_s)
        try:
            answer = self.consumer.committed([TopicPartition(*key) for key in keys], timeout=timeout)
        except KafkaException as exc:  # timed out (still unstable, or no coordinator yet): asked again later
            # Once per partition, not every retry of a parked one (a broker outage would repeat it each second).
            (log.debug if parked else log.warning)(
                "asking for the committed offsets of %s failed: %s", _keys(keys), exc)
            return {}
        return {(tp.topic, tp.partition): tp.offset for tp in answer if tp.error is None}

    def _low_watermark(self, key: tuple[str, int]) -> int | None:
        try:
            timeout = min(COMMITTED_TIMEOUT_S, self.settings.kafka_timeout_s)
            return int(self.consumer.get_watermark_offsets(TopicPartition(*key), timeout=timeout)[0])
        except KafkaException:
            return None

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
            if (denied := _denied(self.settings, error, self.settings.input_topic, "READ")) is not None:
                self._access_log.error(denied)  # not assigned, so readiness fails until the ACL is added
                return
            log.warning("consumer error on %s[%s]: %s", topic, partition, error)

    def assigned(self) -> set[tuple[str, int]]:
        """The current assignment, as the rebalance callbacks left it.

        `Consumer.assignment()` is a round trip to librdkafka's main thread (about 5 ms on a busy
        machine), and the loop asks for the assignment on every batch. Safe from any thread.
        """
        with self._assignment_lock:
            return set(self._assigned_at)

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
        wanted = {key: self._unconfirmed[key] for key in self._failed}
        wanted.update(offsets)
        payload = [TopicPartition(t, p, o) for (t, p), o in wanted.items() if (t, p) in mine]
        if not payload:
            return
        try:
            self.consumer.commit(offsets=payload, asynchronous=True)
        except KafkaException as exc:
            error = _kafka_error(exc)
            if error is not None and error.code() in REBALANCING:
                raise RebalanceInProgress(f"consumer group is rebalancing: {error}") from exc
            raise CommitError(f"offset commit failed: {exc}") from exc
        for tp in payload:
            self._unconfirmed[(tp.topic, tp.partition)] = tp.offset
            self._failed.discard((tp.topic, tp.partition))

    def _retry_failed_commits(self) -> None:
        """Send failed commits again (also while idle, when the loop has nothing new to commit)."""
        try:
            self._send_commit({})
        except (CommitError, RebalanceInProgress) as exc:
            log.debug("offsets %s not sent again yet: %s", sorted(self._failed), exc)

    def _confirm_unconfirmed(self, partitions: set[tuple[str, int]], what: str) -> None:
        """Commit the unconfirmed offsets of `partitions` synchronously (a revoke, or close)."""
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._unconfirmed.items() if (t, p) in partitions]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("offsets %s of %s not confirmed; their records will be read again (same alert ids): %s",
                        ", ".join(sorted(f"{tp.topic}[{tp.partition}]@{tp.offset}" for tp in offsets)), what, exc)
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
            if self._unconfirmed.get(key) != tp.offset:
                continue  # revoked since, or a later commit of the partition is on its way: that one decides
            failure = error if error is not None and error.code() != KafkaError._NO_OFFSET else tp.error
            if failure is None:
                del self._unconfirmed[key]
                self._failed.discard(key)
                continue
            if not self._failed and self._commit_failure is None:
                log.warning("offset commit of %s[%d]@%d failed, sent again with the next commit: %s",
                            tp.topic, tp.partition, tp.offset, failure)
            self._failed.add(key)
            self._commit_failure = self._commit_failure or str(failure)

    def rewind(self, offsets: Offsets) -> None:
        """Seek back so undelivered records are consumed again (librdkafka drops what it had prefetched)."""
        mine = self.assigned()
        for (topic, partition), offset in offsets.items():
            if (topic, partition) in mine:
                try:
                    self.consumer.seek(TopicPartition(topic, partition, offset))
                except KafkaException as exc:
                    # Going on would skip the undelivered records; a restart re-reads them from the commit.
                    raise WorkerError(f"cannot seek {topic}[{partition}] back to {offset}: {exc}") from exc

    def lag(self) -> dict[tuple[str, int], int]:
        """High-water mark minus position, per assigned partition (cached from fetches; no extra requests)."""
        out: dict[tuple[str, int], int] = {}
        for tp in self.consumer.position([TopicPartition(t, p) for t, p in self._assigned_at]):
            if tp.offset < 0:
                continue  # nothing consumed yet
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), cached=True)
            if high >= 0:
                out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        return out

    def reachable(self) -> bool:
        """Whether the group coordinator answers an offset fetch within the Kafka timeout."""
        topic, partition = min(self._assigned_at, default=(self.settings.input_topic, 0))
        try:
            self.consumer.committed([TopicPartition(topic, partition)],
                                    timeout=self.settings.kafka_timeout_s)
        except KafkaException as exc:
            log.debug("group coordinator not reachable: %s", exc)
            return False
        return True

    def close(self) -> None:
        """Commit what is not confirmed yet (synchronously), then leave the group."""
        self._confirm_unconfirmed(set(self._assigned_at), "the final commit")
        try:
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close: %s", exc)


def producer_config(settings: Settings) -> dict[str, Any]:
    """Idempotent producer (acks=all) properties shared by the plain and the transactional sink."""
    return {**client_config(settings), "acks": "all", "enable.idempotence": True, "linger.ms": 5,
            "compression.type": settings.output_compression,
            "message.max.bytes": max(settings.max_event_bytes * 2, 1024 * 1024),
            "request.timeout.ms": int(settings.kafka_timeout_s * 1000),
            "message.timeout.ms": int(settings.kafka_timeout_s * 1000) + 5_000}


Outgoing = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes | None]]]


def outgoing_records(settings: Settings, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter]) -> list[Outgoing]:
    """(topic, key, value, headers) of every alert and dead letter of a batch, in that order."""
    out: list[Outgoing] = [
        (settings.alert_topic, alert.alert_id.encode(), orjson.dumps(alert.document),
         [("model.version", alert.document["model_version"].encode())]) for alert in alerts]
    out += [(settings.dead_letter_topic, letter.record.key, letter.record.value, letter.kafka_headers())
            for letter in dead_letters]
    return out


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
        producer = self._factory({**producer_config(self.settings), "error_cb": login})
        _check_reachable(producer, self.settings, login)
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
                failures.append(_denied(self.settings, error, topic, "WRITE") or error.str())

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
            cause = _kafka_error(exc.__cause__) if isinstance(exc.__cause__, KafkaException) else None
            raise self._failed_fatally(len(outgoing), cause or KafkaError(KafkaError._FATAL)) from exc
        except (KafkaException, BufferError) as exc:
            error = _kafka_error(exc)
            if error is not None and (error.fatal() or error.code() == KafkaError._FATAL):
                raise self._failed_fatally(len(outgoing), error) from exc
            why = (_denied(self.settings, error, target, "WRITE") if error is not None else None) or exc
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
                reason = _kafka_error(exc) or error
        self.producer = None
        why = reason.str()
        if reason.code() == KafkaError.CLUSTER_AUTHORIZATION_FAILED:
            # Without WRITE on any topic, the idempotent producer cannot get its producer id.
            missing = access.denied(self.settings.security, "WRITE", "TOPIC", self.settings.alert_topic,
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
       paused while its partitions moved) whatever its transactional id;
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
                 producer_factory: Callable[[dict[str, Any]], Any] = Producer) -> None:
        self.settings, self.group_metadata = settings, group_metadata
        self.transactional_id = settings.transactional_id_or_default
        self._factory = producer_factory
        self._fatal_at: list[float] = []
        self.producer: Any = None
        try:
            self.producer = self._start_producer()
        except KafkaException as exc:
            error = _kafka_error(exc)
            why = (_denied(settings, error, None, "WRITE") if error is not None else None) or exc
            raise BrokerUnavailable(f"cannot start transactions as {self.transactional_id!r}: {why}") from exc
        log.info("exactly-once delivery: transactional id %s", self.transactional_id)

    def _start_producer(self) -> Any:
        """A transactional producer; `init_transactions` fences an earlier one with this id and aborts (or
        completes) its open transaction."""
        login = LoginWatch()
        producer = self._factory({
            **producer_config(self.settings), "transactional.id": self.transactional_id,
            "transaction.timeout.ms": int(self.settings.transaction_timeout_s * 1000), "error_cb": login})
        _check_reachable(producer, self.settings, login)
        producer.init_transactions(self.settings.kafka_timeout_s)
        return producer

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
        steps = {"produce": time.monotonic()}
        try:
            self.producer.begin_transaction()                                             # 1
            for target, key, value, headers in outgoing:                                  # 2
                self._produce(target, key, value, headers)
            steps["send offsets"] = time.monotonic()
            if offsets:                                                                    # 3
                self.producer.send_offsets_to_transaction(
                    [TopicPartition(t, p, o) for (t, p), o in offsets.items()], self.group_metadata(), timeout)
        except (KafkaException, BufferError) as exc:
            self._abort(f"publishing {len(outgoing)} records and {len(offsets)} offsets failed", exc)
        steps["commit"] = time.monotonic()
        self._commit(len(outgoing))                                                        # 4
        steps["end"] = time.monotonic()
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
        deadline = time.monotonic() + self.settings.transaction_timeout_s + self.settings.kafka_timeout_s
        while True:
            try:
                self.producer.commit_transaction(self.settings.kafka_timeout_s)
                return
            except KafkaException as exc:
                error = _kafka_error(exc)
                if error is None or error.fatal() or error.txn_requires_abort():
                    self._abort(f"committing a transaction of {records} records failed", exc)
                if time.monotonic() >= deadline:
                    raise WorkerError(f"the outcome of a transaction of {records} records is still unknown "
                                      f"after the transaction timeout: {exc}; a restart with the same "
                                      f"transactional id resolves it") from exc
                log.warning("transaction commit not confirmed yet (%s); retrying", error)

    def _abort(self, what: str, exc: BaseException) -> NoReturn:
        error = _kafka_error(exc)
        if error is not None and error.fatal():
            self._fatal(what, error, exc)
        try:
            self.producer.abort_transaction(self.settings.kafka_timeout_s)
        except KafkaException as abort_exc:
            abort_error = _kafka_error(abort_exc)
            if abort_error is not None and abort_error.fatal():
                self._fatal(f"{what}, then aborting", abort_error, abort_exc)
            raise TransactionAborted(f"{what} ({exc}); the abort did not complete either ({abort_exc}), the "
                                     f"broker aborts the transaction after its timeout") from exc
        raise TransactionAborted(f"{what}; transaction aborted: {exc}") from exc

    def _fatal(self, what: str, error: KafkaError, exc: BaseException) -> NoReturn:
        """Replace a producer that failed fatally (see the class docstring), unless it keeps being fenced."""
        now = time.monotonic()
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


def _denied(settings: Settings, error: KafkaError, topic: str | None, operation: str) -> str | None:
    """The missing ACL an authorization error means (`operation` on `topic` for a topic), else None."""
    code, security = error.code(), settings.security
    if code == KafkaError.TOPIC_AUTHORIZATION_FAILED:
        return access.denied(security, operation, "TOPIC", topic or "?")
    if code == KafkaError.GROUP_AUTHORIZATION_FAILED:
        return access.denied(security, "READ", "GROUP", settings.group_id)
    if code == KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED:
        return access.denied(security, "WRITE", "TRANSACTIONAL_ID", settings.transactional_id_or_default)
    return None


def _kafka_error(exc: BaseException) -> KafkaError | None:
    return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
