"""Window state across restarts, rebalances and retries, rebuilt from the input topic itself (no local files).

A model with window features keeps one state per assigned partition in memory (worker/windows.py). Kafka
keeps what rebuilds it, in the consumer group's committed offsets (as Kafka Streams keeps stream time, KIP-353):

1. Every commit of a partition's next offset c (the loop's step 4, a retried or final commit, or the
   exactly-once transaction) carries as Kafka commit metadata the restore point of c
   (`PartitionWindows.commit_metadata`): replaying the offsets [point, c) from the point's clock rebuilds
   exactly the state the worker had at c (`WindowState.restore_point` says why).
2. When a partition is assigned (or restarted by the source), the source reads its committed offset and
   metadata and asks `start` (worker/kafka/core.py, `Starts`): the state starts at the point's clock and
   the partition is read from the point. Without metadata (a first start, an older worker) the state starts
   empty at the committed offset.
3. Records before the committed offset go to `Pipeline.replay` (no scoring, alerts, dead letters or
   commits: `split`), gathered over polls into chunks of up to `REPLAY_CHUNK` records (a window step costs
   about an entity's history per entity and call, so large chunks restore several times faster); a
   partition's chunk is replayed before any of its records is scored. From the committed offset on they are
   scored as usual. Lag counts only what is past the committed offset (`lags`).
4. A batch read again (its delivery or its transaction failed) had entered the state already: the state
   starts again from the restore point of the batch's first offset (`rewind_points`), as in step 2.

What is not exact: an entity evicted by the entity or byte limit before c may be back after a restore (its
events since the point are replayed), and a point older than the partition's retention replays what is left.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.window_state import RestorePoint
from worker.kafka.core import Offsets, TopicKey, describe
from worker.records import Record

if TYPE_CHECKING:
    from worker.windows import PartitionWindows

log = logging.getLogger(__name__)

#: Replayed records gathered before they go to the windows at once (and their most bytes): 500-record batches
#: replayed 24,000 events/s, 20,000-record chunks 66,000-85,000, 50,000 about 100,000 (benchmarks/window_restore.py:
#: 1,000 hosts, 100 events each in one 30 m window; the chunk costs ~200 bytes a record besides its value).
REPLAY_CHUNK = 50_000
REPLAY_CHUNK_BYTES = 32 * 1024 * 1024


@dataclass
class Replay:
    """A partition whose window state is being rebuilt: its records before `until` are replayed."""

    start: int
    until: int
    started: float  # when the restore was decided
    next: int  # the offset after the last one replayed
    events: int = 0
    first: float | None = None  # when the first replayed records arrived


class Restorer:
    """The loop's side of the protocol: which partitions are being restored, and what is replayed.

    `windows` gives the live model's window state, None for a model without windows; `replay` feeds records
    to it (`Pipeline.replay`). Both are read at each call: a model swap changes them.
    """

    def __init__(self, windows: Callable[[], PartitionWindows | None], replay: Callable[[Sequence[Record]], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.windows, self.replay, self.clock = windows, replay, clock
        self.restoring: dict[TopicKey, Replay] = {}
        self._chunk: list[Record] = []  # replayed records not given to the windows yet, in arrival order
        self._chunk_bytes = 0

    def __bool__(self) -> bool:
        return bool(self.restoring)

    def metadata(self, key: TopicKey, next_offset: int) -> str | None:
        """Step 1: the commit metadata of `next_offset`."""
        windows = self.windows()
        return None if windows is None else windows.commit_metadata(key, next_offset)

    def committed(self, offsets: Offsets) -> None:
        """Step 1, after a commit succeeded: the states forget what no later restore needs."""
        if (windows := self.windows()) is not None:
            windows.committed(offsets)

    def start(self, key: TopicKey, committed: int, metadata: str | None) -> int | None:
        """Step 2: where `key` is read from (None: its committed offset; negative: none committed)."""
        self._forget({key})
        windows = self.windows()
        if windows is None:
            return None
        point = RestorePoint.decode(metadata) if committed >= 0 else None
        if point is not None and point.offset > committed:
            log.warning("%s: the restore point in its commit metadata (%s) is past the committed offset (offsets "
                        "reset by hand?); its window state starts empty", describe(*key, committed), metadata)
            point = None
        windows.assign(key, point)
        if committed < 0:
            log.info("%s has no committed offset: its window state starts empty", describe(*key))
            return None
        if point is None or point.offset == committed:
            log.info("%s starts at its committed offset with %s", describe(*key, committed),
                     "an empty window state (no restore point in its commit metadata)" if point is None else
                     "its window state's clock (nothing to replay)")
            return None
        self.restoring[key] = Replay(point.offset, committed, self.clock(), point.offset)
        log.info("restoring the window state of %s: replaying offsets %d to %d before scoring from %d",
                 describe(*key), point.offset, committed - 1, committed)
        return point.offset

    def split(self, records: list[Record]) -> list[Record]:
        """Step 3: replay the records before their partition's committed offset; return the rest, to score."""
        live: list[Record] = []
        replay: list[Record] = []
        for record in records:
            restore = self.restoring.get((record.topic, record.partition))
            (replay if restore is not None and record.offset < restore.until else live).append(record)
        if replay:
            arrived = self.clock()
            for record in replay:
                restore = self.restoring[(record.topic, record.partition)]
                restore.first = arrived if restore.first is None else restore.first
                restore.events += 1
                restore.next = record.offset + 1
                self._chunk_bytes += len(record.value or b"")
            self._chunk += replay
        scoring = {(record.topic, record.partition) for record in live}
        done = [key for key, restore in self.restoring.items() if key in scoring or restore.next >= restore.until]
        if done or len(self._chunk) >= REPLAY_CHUNK or self._chunk_bytes >= REPLAY_CHUNK_BYTES:
            self._replay_chunk()
        for key in done:
            self._done(key, self.restoring.pop(key))
        return live

    def _replay_chunk(self) -> None:
        chunk, self._chunk, self._chunk_bytes = self._chunk, [], 0
        if chunk:
            self.replay(chunk)

    def _forget(self, keys: set[TopicKey]) -> None:
        """Partitions restored again or revoked: what was gathered of them is not replayed."""
        for key in keys:
            self.restoring.pop(key, None)
        if self._chunk and any((r.topic, r.partition) in keys for r in self._chunk):
            self._chunk = [r for r in self._chunk if (r.topic, r.partition) not in keys]
            self._chunk_bytes = sum(len(r.value or b"") for r in self._chunk)

    def _done(self, key: TopicKey, restore: Replay) -> None:
        now = self.clock()
        first = restore.started if restore.first is None else restore.first
        log.info("window state of %s restored: %d events (offsets %d to %d) in %.2f s, %.0f events/s once the first "
                 "arrived (%.2f s after the restore began); scoring from %d", describe(*key), restore.events,
                 restore.start, restore.until - 1, now - restore.started,
                 restore.events / (now - first) if now > first else float("inf"), first - restore.started,
                 restore.until)

    def rewind_points(self, firsts: Offsets) -> dict[TopicKey, int]:
        """Step 4: where batches that start at `firsts` are read again from."""
        windows = self.windows()
        if windows is None:
            return dict(firsts)
        out: dict[TopicKey, int] = {}
        for key, first in firsts.items():
            point = RestorePoint.decode(windows.commit_metadata(key, first))
            windows.assign(key, point)
            out[key] = first if point is None else point.offset
            if out[key] < first:
                self.restoring[key] = Replay(out[key], first, self.clock(), out[key])
            else:
                self.restoring.pop(key, None)
        return out

    def revoke(self, keys: set[TopicKey]) -> None:
        self._forget(keys)
        if (windows := self.windows()) is not None:
            windows.revoke(keys)

    def lags(self, lags: Mapping[TopicKey, int]) -> dict[TopicKey, int]:
        """Step 3: per partition, the events past its committed offset (what a restore replays is not behind)."""
        out = dict(lags)
        for key, restore in self.restoring.items():
            if key in out:
                out[key] = max(0, out[key] - max(0, restore.until - restore.next))
        return out
