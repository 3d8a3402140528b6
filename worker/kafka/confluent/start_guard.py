"""Where each partition starts, and restarting partitions that never start fetching (librdkafka's gaps).

Where a partition starts is decided here, not by librdkafka's `auto.offset.reset` (set to "error"; see
`StartGuard.start_reset`): librdkafka also resets a partition whose committed offset exists but is held by
an open transaction, whenever the assignment changes while it asks for it. Time comes from the injected clock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, KafkaException, TopicPartition

from worker.config import Settings
from worker.errors import WorkerError
from worker.kafka.core import Assignment, Clock, Quarantine, TopicKey, describe, names

log = logging.getLogger(__name__)

#: The longest `start_reset` holds the loop asking for committed offsets (usually one round trip).
COMMITTED_TIMEOUT_S = 2.0
#: How often a partition without a position asks again for a committed offset an open transaction holds.
PARKED_RETRY_S = 1.0
#: The longest one such repeated question holds the loop (see `StartGuard.stable_committed`).
PARKED_ASK_S = PARKED_RETRY_S / 2


def _names(partitions: list[TopicPartition]) -> list[str]:
    return names((tp.topic, tp.partition) for tp in partitions)


class StartGuard:
    """Starts partitions librdkafka found no position for, and re-adds partitions stuck without a fetch.

    Works on the source's `assignment` and `quarantine`; `attach` gives it the consumer, whose
    `stats_cb` is `on_stats`.
    """

    def __init__(self, settings: Settings, assignment: Assignment, quarantine: Quarantine, clock: Clock,
                 on_restart: Callable[[Iterable[TopicKey]], None] | None = None) -> None:
        self.settings, self.assignment, self.quarantine, self.clock = settings, assignment, quarantine, clock
        #: Told which partitions this guard started again from their committed offsets (`Starts.add`: their
        #: window state is restored again, since a replay under way would be cut short).
        self.on_restart = on_restart
        self.consumer: Any = None
        self._next_fetch_check = 0.0
        #: librdkafka's fetch state of each partition of the input topic, from its latest statistics, and when.
        self._fetch_states: dict[TopicKey, str] = {}
        self._stats_at = float("-inf")
        #: Partitions stopped without a position until their committed offset is known, and when to ask next.
        self._parked: dict[TopicKey, float] = {}

    def attach(self, consumer: Any) -> None:
        self.consumer = consumer

    def parked(self) -> set[TopicKey]:
        """Partitions stopped until their committed offset is known."""
        return set(self._parked)

    def due(self) -> list[TopicKey]:
        """Parked partitions whose committed offset is to be asked for again now."""
        now = self.clock()
        return [key for key, due in self._parked.items() if due <= now]

    def forget(self, keys: Iterable[TopicKey]) -> None:
        """Partitions revoked (the next owner decides where they start), or started by the source itself."""
        for key in keys:
            self._parked.pop(key, None)

    def on_stats(self, text: str) -> None:
        """Keep each input partition's `fetch_state` from librdkafka's statistics (served inside poll)."""
        try:
            partitions = orjson.loads(text)["topics"][self.settings.input_topic]["partitions"]
            states = {(self.settings.input_topic, int(p)): str(v["fetch_state"]) for p, v in partitions.items()
                      if int(p) >= 0}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return  # no statistics for the topic yet (nothing assigned), or a format we do not know
        self._fetch_states, self._stats_at = states, self.clock()

    def fetch_check_interval_s(self) -> float:
        return min(self.settings.kafka_timeout_s, 5.0)

    def restart_unfetched(self) -> None:
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
        now = self.clock()
        if now < self._next_fetch_check or not self.assignment:
            return
        wait_s = self.settings.kafka_timeout_s
        self._next_fetch_check = now + self.fetch_check_interval_s()

        def waiting(key: TopicKey, since: float) -> bool:
            if now - since < wait_s or self.quarantine.limit(*key) is not None or key in self._parked:
                return False
            if self._stats_at > since and self._fetch_states.get(key, "active") != "active":
                return True
            return bool(self.consumer.get_watermark_offsets(TopicPartition(*key), cached=True)[1] < 0)

        unfetched = [TopicPartition(*key) for key, since in self.assignment.since().items() if waiting(key, since)]
        if not unfetched:
            return
        log.warning("partitions %s assigned %.0f s ago or more have not started fetching (fetch states %s; "
                    "committed offsets not known yet: a dead owner's open transaction, or a lost answer, "
                    "librdkafka #5586); re-adding them so their committed offsets are fetched again",
                    _names(unfetched), wait_s,
                    sorted({self._fetch_states.get((tp.topic, tp.partition), "unknown") for tp in unfetched}))
        self.re_add(unfetched)
        self._restarted(unfetched)

    def re_add(self, partitions: list[TopicPartition]) -> None:
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
        self.assignment.add((tp.topic, tp.partition) for tp in partitions)

    def start_reset(self, failed: Mapping[TopicKey, int | None]) -> None:
        """Start partitions librdkafka found no position for (`auto.offset.reset` "error"), by this worker's policy.

        `failed` maps each to the offset that could not be fetched, or None when librdkafka had no committed
        offset for it. That "none" is not always true: when the assignment changes (a cooperative rebalance,
        or `restart_unfetched`) while librdkafka retries an OffsetFetch answered UNSTABLE_OFFSET_COMMIT
        (an open transaction holds the group's offsets, as after a worker died inside one), librdkafka 2.16
        drops the answer and starts the partition as if nothing were committed. With "earliest" that read
        the partition again from its start: duplicates for an exactly-once worker, all of retention for a
        long-lived group. So the committed offset is asked for again, a stable one (`stable_committed`):

        - committed: start there;
        - nothing committed (a new group): start at the earliest offset;
        - not known yet (the transaction is still open, or no answer): leave the partition stopped and ask
          again in `PARKED_RETRY_S`. Re-adding it for librdkafka to ask would change the assignment again
          while its earlier question is still being retried, and start the same reset over;
        - an offset out of range (records deleted by retention before this group read them, or a recreated
          topic): start at the earliest offset, with a warning that names what was skipped.
        """
        out_of_range = {key: offset for key, offset in failed.items() if offset is not None and offset >= 0}
        keys = [key for key in failed if key in self.assignment and self.quarantine.limit(*key) is None]
        committed = self.stable_committed([key for key in keys if key not in out_of_range])
        starts: list[TopicPartition] = []
        now = self.clock()
        for key in keys:
            if (offset := out_of_range.get(key)) is not None:
                low = self._low_watermark(key)
                where = f"offset {offset} of {describe(*key)} is out of range"
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
                    log.warning("%s has no position and its committed offset is not known yet (an open "
                                "transaction holds it?): it waits, asking every %.0f s", describe(*key), PARKED_RETRY_S)
                self._parked[key] = now + PARKED_RETRY_S
            elif position >= 0:
                if key in self._parked:
                    log.info("%s: its committed offset %d is known now; starting there", describe(*key), position)
                else:
                    log.warning("librdkafka started %s as if nothing were committed (the assignment changed "
                                "while a transaction held its offset); starting at the committed offset %d instead",
                                describe(*key), position)
                starts.append(TopicPartition(*key, position))
            else:
                log.info("%s has no committed offset: reading from the earliest", describe(*key))
                starts.append(TopicPartition(*key, OFFSET_BEGINNING))
        for tp in starts:
            self._parked.pop((tp.topic, tp.partition), None)
        if starts:
            self.re_add(starts)
            # Out of range, the earliest offset is the best start a restore can have too: it is kept.
            self._restarted([tp for tp in starts if (tp.topic, tp.partition) not in out_of_range])

    def _restarted(self, partitions: list[TopicPartition]) -> None:
        if self.on_restart is not None and partitions:
            self.on_restart([(tp.topic, tp.partition) for tp in partitions])

    def stable_committed(self, keys: list[TopicKey]) -> dict[TopicKey, int]:
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
        parked = all(key in self._parked for key in keys)
        return {key: offset for key, (offset, _) in self.committed_points(keys, again=parked).items()}

    def committed_points(self, keys: list[TopicKey], again: bool = False) -> dict[TopicKey, tuple[int, str | None]]:
        """`stable_committed`'s answer with each commit's metadata; `again`: the keys were asked before."""
        if not keys:
            return {}
        timeout = min(PARKED_ASK_S if again else COMMITTED_TIMEOUT_S, self.settings.kafka_timeout_s)
        try:
            answer = self.consumer.committed([TopicPartition(*key) for key in keys], timeout=timeout)
        except KafkaException as exc:  # timed out (still unstable, or no coordinator yet): asked again later
            # Once per partition, not every retry of a parked one (a broker outage would repeat it each second).
            (log.debug if again else log.warning)(
                "asking for the committed offsets of %s failed: %s", names(keys), exc)
            return {}
        return {(tp.topic, tp.partition): (tp.offset, tp.metadata or None) for tp in answer if tp.error is None}

    def _low_watermark(self, key: TopicKey) -> int | None:
        try:
            timeout = min(COMMITTED_TIMEOUT_S, self.settings.kafka_timeout_s)
            return int(self.consumer.get_watermark_offsets(TopicPartition(*key), timeout=timeout)[0])
        except KafkaException:
            return None
