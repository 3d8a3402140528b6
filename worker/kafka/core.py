"""What both Kafka clients share, written once: partition keys, offsets, the quarantine, record encoding,
access-error wording, and the assignment, pause and revoke bookkeeping. No Kafka client imports here.

Each adapter (`worker/kafka/kafka_python.py`, `worker/kafka/confluent/`) only translates its client's calls
and callbacks into these.

An undecodable record batch (a codec the client lacks, a corrupt batch) must not crash-loop the worker:

1. The client reports it; the source logs `topic[partition]@offset` at ERROR with the way out below.
2. It pauses that partition at that offset and never hands out or commits anything at or past it;
   the other partitions go on.
3. `anomaly_undecodable_batches_total{topic,partition}` counts it, `anomaly_undecodable_partitions`
   shows how many are held, and `/readyz` fails `batches_decodable` until the partition is released
   (revoked, or the process restarted).

The way out (docs/operations.md, "Undecodable record batches"): install the missing codec library (the image has all
four), or, for a corrupt batch, stop the group and move its offset past the batch with
`kafka-consumer-groups.sh --reset-offsets --to-offset N --topic T:P --group G --execute`.

Kafka access problems (a failed SASL authentication, a missing ACL) are the broker's configuration, not a
record's fault: the batch is not delivered (or the consumer does not join), readiness fails, nothing is
committed, and the worker retries with backoff, so an ACL added later is picked up without a restart. Each
message names the principal, the operation and the resource as docs/security.md lists them, and never
holds the password; each adapter maps its client's error codes to these messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import orjson

if TYPE_CHECKING:  # only annotations: `worker.records` imports this module for `describe`
    from worker.config import KafkaSecurity, Settings
    from worker.metrics import WorkerMetrics
    from worker.records import Alert, DeadLetter, Record

log = logging.getLogger(__name__)

#: A partition: (topic, partition).
TopicKey = tuple[str, int]
#: Next offsets to commit (or to seek back to), per partition.
Offsets = Mapping[TopicKey, int]
#: A monotonic clock in seconds; tests pass one they advance.
Clock = Callable[[], float]
#: The commit metadata to send with a partition's next offset (its window state's restore point), or None.
CommitMetadata = Callable[[TopicKey, int], str | None]
#: Where a newly assigned partition is read from, given its committed offset (negative: none) and that
#: commit's metadata: an offset before the committed one (its records are replayed), or None for the committed.
OnStart = Callable[[TopicKey, int, str | None], int | None]
#: (topic, key, value, headers) of one outgoing record.
Outgoing = tuple[str, bytes | None, bytes | None, list[tuple[str, bytes | None]]]

DOC = "docs/security.md"
T = TypeVar("T")
#: How often a partition whose start is not decided asks again for its committed offset (no answer yet).
START_RETRY_S = 1.0


def describe(topic: str, partition: int, offset: int | None = None) -> str:
    """`topic[partition]`, or `topic[partition]@offset`: how every log line names a partition or a record."""
    where = f"{topic}[{partition}]"
    return where if offset is None else f"{where}@{offset}"


def names(keys: Iterable[TopicKey]) -> list[str]:
    """Sorted `topic[partition]` names of `keys`, for a log line."""
    return sorted(describe(topic, partition) for topic, partition in keys)


def partition_fetch_bytes(settings: Settings) -> int:
    """The largest record batch either client fetches from, or produces to, one partition: two events' worth."""
    return max(settings.max_event_bytes * 2, 1024 * 1024)


def outgoing_records(settings: Settings, alerts: Sequence[Alert], dead_letters: Sequence[DeadLetter]) -> list[Outgoing]:
    """(topic, key, value, headers) of every alert and dead letter of a batch, in that order."""
    out: list[Outgoing] = [
        (settings.alert_topic, alert.alert_id.encode(), orjson.dumps(alert.document),
         [("model.version", alert.document["model_version"].encode())]) for alert in alerts]
    out += [(settings.dead_letter_topic, letter.record.key, letter.record.value, letter.kafka_headers())
            for letter in dead_letters]
    return out


def assigned_only(offsets: Mapping[TopicKey, T], mine: Container[TopicKey]) -> dict[TopicKey, T]:
    """The part of `offsets` for partitions in `mine`: commits and seeks never touch a partition not ours."""
    return {key: offset for key, offset in offsets.items() if key in mine}


# -- access errors ---------------------------------------------------------------------------------

def principal(security: KafkaSecurity) -> str:
    """The broker's name for this client: `User:<sasl user>`, or a description without SASL."""
    return f"User:{security.sasl_username}" if security.sasl_username else "this client (no SASL user)"


def denied(security: KafkaSecurity, operation: str, resource_type: str, name: str, *more: str) -> str:
    """`not authorized: User:w needs WRITE on TOPIC 'alerts' ...` for a missing ACL (or several: `more` names)."""
    resources = " and ".join(f"{resource_type} {n!r}" for n in (name, *more))
    return (f"not authorized: {principal(security)} needs {operation} on {resources}; "
            f"add {'those ACLs' if more else 'that ACL'} ({DOC} lists what each component needs)")


def denied_for(settings: Settings, denial: str, topic: str | None, operation: str) -> str:
    """The missing ACL of a `denial` ("topic", "group" or "transactional-id") as `denied` words it."""
    security = settings.security
    if denial == "group":
        return denied(security, "READ", "GROUP", settings.group_id)
    if denial == "transactional-id":
        return denied(security, "WRITE", "TRANSACTIONAL_ID", settings.transactional_id_or_default)
    return denied(security, operation, "TOPIC", topic or "?")


def authentication_failed(security: KafkaSecurity, bootstrap_servers: str, detail: str) -> str:
    """The message for a refused SASL login; `detail` is the client's own (password-free) reason."""
    return (f"authentication failed: {security.sasl_mechanism} login as {security.sasl_username!r} at "
            f"{bootstrap_servers} was refused ({detail}); check --sasl-username and the password "
            f"(--sasl-password-file or ANOMALY_SASL_PASSWORD)")


class Throttled:
    """Logs each distinct message at most once per `interval_s`: a missing ACL fails every retry."""

    def __init__(self, logger: logging.Logger, interval_s: float, clock: Clock = time.monotonic) -> None:
        self.logger, self.interval_s, self._clock = logger, interval_s, clock
        self._last: dict[str, float] = {}

    def error(self, message: str, key: str | None = None) -> None:
        """Log `message` unless one with the same `key` (default: the message) was logged within the interval."""
        now, key = self._clock(), key or message
        last = self._last.get(key)
        if last is None or now - last >= self.interval_s:
            self._last[key] = now
            self.logger.error("%s", message)


# -- the quarantine --------------------------------------------------------------------------------

class Quarantine:
    """Partitions held at a record batch the Kafka client cannot decode; readiness and the held-partitions
    gauge read `held_count()` when asked (worker/health.py)."""

    def __init__(self, metrics: WorkerMetrics | None = None) -> None:
        self.metrics = metrics
        self.held: dict[TopicKey, int] = {}

    def hold(self, topic: str, partition: int, offset: int, error: object) -> None:
        """Record that `topic[partition]` cannot get past `offset` (the caller pauses it)."""
        log.error("record batch at %s cannot be decoded (%s); partition paused there, the others go on. "
                  "Install the missing codec library, or stop the group and reset the partition's offset past "
                  "the batch (docs/operations.md: Undecodable record batches)",
                  describe(topic, partition, offset), error)
        self.held[(topic, partition)] = offset
        if self.metrics is not None:
            self.metrics.record_undecodable_batch(topic, partition)

    def release(self, partitions: Iterable[TopicKey]) -> None:
        """Forget partitions that are no longer ours (revoked or lost)."""
        for tp in list(partitions):
            self.held.pop(tp, None)

    def limit(self, topic: str, partition: int) -> int | None:
        """The offset `topic[partition]` is held at, or None."""
        return self.held.get((topic, partition))

    def held_count(self) -> int:
        """How many partitions are held; safe from any thread (one `len` of a dict is atomic in CPython)."""
        return len(self.held)


# -- assignment, pauses, revocations ------------------------------------------------------------------

class Assignment:
    """The partitions assigned to this member, each with the time it was assigned (or last re-added).

    Kept from the client's rebalance callbacks (or each poll), so the readiness probe's thread can read it
    without calling into a client that is not thread-safe.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self._since: dict[TopicKey, float] = {}
        self._lock = threading.Lock()

    def add(self, keys: Iterable[TopicKey]) -> None:
        """`keys` are assigned (again) now."""
        now = self.clock()
        with self._lock:
            self._since.update({key: now for key in keys})

    def remove(self, keys: Iterable[TopicKey]) -> None:
        with self._lock:
            for key in keys:
                self._since.pop(key, None)

    def replace(self, keys: Iterable[TopicKey]) -> None:
        """The assignment is exactly `keys` (those already assigned keep their time)."""
        now = self.clock()
        with self._lock:
            self._since = {key: self._since.get(key, now) for key in keys}

    def partitions(self) -> set[TopicKey]:
        with self._lock:
            return set(self._since)

    def since(self) -> dict[TopicKey, float]:
        """When each partition was assigned."""
        with self._lock:
            return dict(self._since)

    def __contains__(self, key: object) -> bool:
        return key in self._since

    def __bool__(self) -> bool:
        return bool(self._since)


def stale_pauses(paused: Iterable[TopicKey], quarantine: Quarantine) -> list[TopicKey]:
    """Partitions given back still paused though nothing holds them: resume them (logged here).

    Both clients keep an application pause through a rebalance that takes a partition away and gives it
    back (kafka-python 3.0.12, librdkafka 2.16), while the revocation released its hold: left paused, it
    would never be fetched again, and nothing would report it. Resumed, a batch that still cannot be decoded
    fails the next fetch and holds it again.
    """
    stale = [key for key in paused if quarantine.limit(*key) is None]
    if stale:
        log.info("resuming %s: paused before the rebalance, not held now", names(stale))
    return stale


class Revocations:
    """What happens when partitions go (revoked or lost): the quarantine forgets them, then the loop's hook
    (it forgets offsets it failed to commit for them)."""

    def __init__(self, quarantine: Quarantine, on_revoke: Callable[[set[TopicKey]], None] | None,
                 forget: Callable[[set[TopicKey]], None] | None = None) -> None:
        self.quarantine, self.on_revoke, self.forget = quarantine, on_revoke, forget

    def __call__(self, partitions: set[TopicKey]) -> None:
        """1. log; 2. the client's own records of them (`forget`); 3. the quarantine; 4. the loop's hook."""
        log.info("partitions revoked: %s", names(partitions))
        if self.forget is not None:
            self.forget(partitions)
        self.quarantine.release(partitions)
        if self.on_revoke is not None:
            self.on_revoke(partitions)


def coordinator_answers(question: Callable[[], object],
                        failures: type[BaseException] | tuple[type[BaseException], ...]) -> bool:
    """Whether the group coordinator answers `question` (an offset fetch bounded by the Kafka timeout).

    The coordinator is the broker every commit needs. An idle consumer's poll returns nothing whether or
    not a broker is there, so this is the loop's only sign of an outage between batches.
    """
    try:
        question()
    except failures as exc:
        log.debug("group coordinator not reachable: %s", exc)
        return False
    return True


def log_assigned(keys: Iterable[TopicKey]) -> None:
    log.info("partitions assigned: %s", names(keys))


# -- where restored partitions start ----------------------------------------------------------------

@dataclass(frozen=True)
class Restore:
    """The loop's part in restoring window state (worker/loop.py): where a partition starts, and the
    metadata each committed offset carries (the restore point it is rebuilt from)."""

    start: OnStart
    metadata: CommitMetadata


class Starts:
    """Assigned partitions whose first offset the loop decides (`Restore.start`), until it has.

    1. A partition assigned, or restarted by the client adapter, is undecided: none of its records is
       handed out (`hold_back`); the first one held back is remembered. Nor are those of a partition revoked.
    2. The adapter asks for the committed offsets and metadata of those `due()` (again after
       `START_RETRY_S` for a partition that got no answer) and gives the answers to `decide`.
    3. `decide` asks the loop for each answered partition and returns where each must be read from now:
       the loop's offset, or the committed offset (or the first held back, with nothing committed) when
       records were held back. The adapter seeks there before the next fetch is handed out.

    Without a `Restore` (no window state) nothing is ever undecided and the adapters ask nothing.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.clock = clock
        self.restore: Restore | None = None
        self._due: dict[TopicKey, float] = {}
        self._held: dict[TopicKey, int] = {}
        self._unanswered: set[TopicKey] = set()

    def add(self, keys: Iterable[TopicKey]) -> None:
        """`keys` start over: ask for them at once."""
        if self.restore is None:
            return
        now = self.clock()
        self._due.update({key: now for key in keys})

    def remove(self, keys: Iterable[TopicKey]) -> None:
        for key in keys:
            self._due.pop(key, None)
            self._held.pop(key, None)
            self._unanswered.discard(key)

    def __bool__(self) -> bool:
        return bool(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def hold_back(self, records: list[Record], assigned: Container[TopicKey]) -> list[Record]:
        """`records` without those of undecided partitions (step 1), nor of partitions no longer `assigned`.

        A record of a partition revoked during the poll would be scored without its window state (the next
        owner scores it with the state); and dropping it skips nothing, since a partition assigned again is
        always read from where the loop says."""
        kept = []
        for record in records:
            key = (record.topic, record.partition)
            if key in self._due:
                self._held[key] = min(self._held.get(key, record.offset), record.offset)
            elif key in assigned:
                kept.append(record)
        return kept

    def due(self) -> list[TopicKey]:
        now = self.clock()
        return sorted(key for key, due in self._due.items() if due <= now)

    def asked_before(self, keys: Iterable[TopicKey]) -> bool:
        """Whether every one of `keys` was asked for and got no answer (the adapter asks more briefly then)."""
        return all(key in self._unanswered for key in keys)

    def decide(self, answers: Mapping[TopicKey, tuple[int, str | None]]) -> dict[TopicKey, int]:
        """Step 3: where each answered partition is read from now (only those that must seek)."""
        assert self.restore is not None, "nothing is undecided without a Restore"
        seeks: dict[TopicKey, int] = {}
        for key in self.due():
            if key not in answers:
                self._due[key] = self.clock() + START_RETRY_S
                self._unanswered.add(key)
                continue
            self._unanswered.discard(key)
            committed, metadata = answers[key]
            start = self.restore.start(key, committed, metadata)
            held = self._held.pop(key, None)
            del self._due[key]
            if start is not None and start != committed:
                seeks[key] = start
            elif held is not None:
                seeks[key] = committed if committed >= 0 else held
        return seeks
