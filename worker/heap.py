"""The worker's native heap: which allocator serves it, and returning freed memory to the system.

Broker restarts make librdkafka's threads allocate and free buffers (reconnects, re-fetches, retried
transactions). Under glibc's malloc that memory stays resident and fragmented: with each restart the
bytes in use stay flat while free-but-resident bytes and RSS grow; under jemalloc
(`LD_PRELOAD=libjemalloc.so.2`, as the image does) RSS levels off (the soak runs:
benchmarks/results/soak-trim.md, benchmarks/results/soak.md). Under glibc the worker calls
`malloc_trim(0)` regularly, which returns the whole free pages but not the fragments; under another
allocator, or a C library without it (musl, macOS), it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from collections.abc import Callable
from pathlib import Path

from worker.plugin import Plugin

log = logging.getLogger(__name__)


def allocator(maps: Path = Path("/proc/self/maps")) -> str:
    """`jemalloc` or `tcmalloc` if one is loaded (it then serves malloc: only LD_PRELOAD loads it this
    early), else `glibc` where malloc_trim exists, else `unknown`."""
    try:
        mapped = maps.read_text()
    except OSError:
        mapped = ""
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in mapped:
            return name
    return "glibc" if _glibc_malloc_trim() is not None else "unknown"


def _glibc_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer(Plugin):
    """`malloc_trim(0)` at most every `interval_s` (0: never), called between batches by the loop; off
    when another allocator serves malloc (glibc's arenas then hold next to nothing).

    One trim walks the heap (milliseconds for a fragmented one), once a minute by default.
    """

    def __init__(self, interval_s: float, trim: Callable[[int], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._trim = trim if trim is not None else _glibc_malloc_trim() if allocator() == "glibc" else None
        self._clock = clock
        self._last = clock()
        self.trims = 0

    def between_batches(self) -> None:
        self.maybe_trim()

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0 and self._trim is not None

    def maybe_trim(self) -> bool:
        """Trim if `interval_s` has passed since the last trim; True if it trimmed."""
        if not self.enabled or self._clock() - self._last < self.interval_s:
            return False
        assert self._trim is not None
        started = time.perf_counter()
        released = self._trim(0)
        self._last = self._clock()
        self.trims += 1
        log.debug("malloc_trim: %s in %.1f ms", "released memory" if released else "nothing to release",
                  (time.perf_counter() - started) * 1000)
        return True
