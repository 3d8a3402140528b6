"""A seeded uniform sample of a data set read in chunks: training on more rows than fit in memory.

Every row read gets a key, a uniform random number from a generator seeded with the training seed, drawn in
row order. The sample is the rows with the smallest keys (a bottom-k sample, reservoir sampling's
vectorised form): every subset of the rows is equally likely, the same seed picks the same rows, and the
chunk size does not change which (keys depend only on a row's place in the data).

With labels, normal rows and labelled anomalies are sampled apart: at most `max_rows` normal rows, and the
anomalies whose keys fall under the normal sample's largest key (so both are kept at the same rate and the
evaluation sees the data's share of anomalies), at most `max_rows` of them. Data with no more than
`max_rows` rows of either kind is kept whole, in file order: training on it is training on the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.errors import ConfigError

#: Default of `anomaly-train --max-rows` (docs/training.md, "More rows than memory": why a million).
DEFAULT_MAX_ROWS = 1_000_000
#: Rows per chunk read (Parquet row batches of this size are what reading a whole file concatenates).
CHUNK_ROWS = 65_536
#: Second word of the key generator's seed, so the keys are not the split shuffle's numbers.
_KEY_STREAM = 0x5A4D


class Reservoir:
    """The rows with the `capacity` smallest keys offered so far, in pieces compacted now and then."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ceiling = np.inf  # the capacity-th smallest key once full: no larger key can enter
        self._pieces: list[tuple[pd.DataFrame, np.ndarray, np.ndarray]] = []
        self._held = 0

    def offer(self, frame: pd.DataFrame, keys: np.ndarray, rows: np.ndarray, ceiling: float = np.inf) -> None:
        """Keep those of `frame`'s rows (numbered `rows` in the data) whose keys may be among the smallest."""
        keep = keys < min(self.ceiling, ceiling)
        if not keep.any():
            return
        if not keep.all():
            frame, keys, rows = frame[keep], keys[keep], rows[keep]
        self._pieces.append((frame, keys, rows))
        self._held += len(keys)
        if self._held >= 2 * self.capacity:  # amortised: a compaction at most per `capacity` new rows
            self._compact()

    def _compact(self) -> None:
        frame, keys, rows = self._joined()
        if len(keys) > self.capacity:
            smallest = np.argpartition(keys, self.capacity - 1)[:self.capacity]
            frame, keys, rows = frame.iloc[smallest], keys[smallest], rows[smallest]
        if len(keys) >= self.capacity:
            self.ceiling = float(keys.max())
        self._pieces = [(frame, keys, rows)] if len(keys) else []
        self._held = len(keys)

    def _joined(self) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        if len(self._pieces) == 1:
            return self._pieces[0]
        return (pd.concat([piece[0] for piece in self._pieces], ignore_index=True),
                np.concatenate([piece[1] for piece in self._pieces]),
                np.concatenate([piece[2] for piece in self._pieces]))

    def taken(self, ceiling: float = np.inf) -> tuple[pd.DataFrame, np.ndarray]:
        """The sample (keys under `ceiling` only) and its rows' numbers in the data; empties the reservoir."""
        if not self._pieces:
            return pd.DataFrame(), np.array([], dtype=np.int64)
        self._compact()
        frame, keys, rows = self._pieces[0]
        self._pieces, self._held = [], 0
        if not (keep := keys < ceiling).all():
            frame, rows = frame[keep], rows[keep]
        return frame, rows


@dataclass(frozen=True)
class Sample:
    """The rows kept, in data order, and what was read to keep them."""

    frame: pd.DataFrame
    rows_read: int
    normal_rows_read: int
    normal_rows_kept: int
    seed: int

    @property
    def whole(self) -> bool:
        """Every row read was kept: the frame is the data."""
        return len(self.frame) == self.rows_read

    def describe(self) -> str:
        """How the statistics were fitted, for the log, the manifest and the report."""
        if self.whole:
            return f"all {self.rows_read} rows read"
        anomalies = self.rows_read - self.normal_rows_read
        kept_anomalies = len(self.frame) - self.normal_rows_kept
        return (f"uniform sample (seed {self.seed}) of {self.normal_rows_kept} of {self.normal_rows_read} normal rows"
                + (f" and {kept_anomalies} of {anomalies} labelled anomalies" if anomalies else "")
                + "; column kinds fitted on the sample, vocabularies, scaling and histograms on its training split")


def sample_rows(chunks: Iterable[pd.DataFrame], max_rows: int, seed: int,
                normal_rows: Callable[[pd.DataFrame, int], np.ndarray] | None = None,
                refuse_over: str | None = None) -> Sample:
    """Read `chunks` once and keep a seeded uniform sample of at most `max_rows` normal rows (module doc).

    `normal_rows(chunk, first_row)`: which rows are normal (None: all are). `refuse_over`: a reason the data
    must be kept whole; more than `max_rows` rows then stop the read with a ConfigError saying it.
    """
    if max_rows < 1:
        raise ConfigError(f"--max-rows must be at least 1, got {max_rows}")
    keys_of = np.random.default_rng([seed, _KEY_STREAM])
    normals, anomalies = Reservoir(max_rows), Reservoir(max_rows)
    read = normal_read = 0
    names: dict[str, None] = {}  # columns in order of first appearance (JSON Lines chunks may differ)
    for chunk in chunks:
        names.update(dict.fromkeys(chunk.columns))
        n = len(chunk)
        if n == 0:
            continue
        if refuse_over is not None and read + n > max_rows:
            raise ConfigError(f"more than --max-rows {max_rows} rows: {refuse_over}; raise --max-rows above the "
                              f"data's row count or train on less data")
        chunk = chunk.reset_index(drop=True)
        keys = keys_of.random(n)
        rows = np.arange(read, read + n)
        normal = normal_rows(chunk, read + 1) if normal_rows is not None else np.ones(n, dtype=bool)
        if normal.all():
            normals.offer(chunk, keys, rows)
        else:
            normals.offer(chunk[normal], keys[normal], rows[normal])
            anomalies.offer(chunk[~normal], keys[~normal], rows[~normal], ceiling=normals.ceiling)
        read += n
        normal_read += int(normal.sum())
    normal_frame, normal_at = normals.taken()
    ceiling = normals.ceiling  # anomalies at the normal rows' rate (all of them while the normals all fit)
    anomaly_frame, anomaly_at = anomalies.taken(ceiling)
    pieces = [piece for piece in (normal_frame, anomaly_frame) if len(piece)]
    frame = pd.concat(pieces, ignore_index=True) if len(pieces) > 1 else pieces[0] if pieces else pd.DataFrame()
    order = np.argsort(np.concatenate([normal_at, anomaly_at]), kind="stable")
    if not (order == np.arange(len(order))).all():
        frame = frame.iloc[order]
    if list(frame.columns) != (ordered := [name for name in names if name in frame.columns]):
        frame = frame[ordered]
    return Sample(frame.reset_index(drop=True), read, normal_read, len(normal_frame), seed)
