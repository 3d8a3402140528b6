"""Returning freed native memory: when the trimmer trims, and that glibc's malloc_trim really lowers RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tests.unit.test_worker_loop import make_worker
from worker.heap import HeapTrimmer, _glibc_malloc_trim, allocator


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_trims_once_per_interval() -> None:
    clock, calls = Clock(), []
    heap = HeapTrimmer(60.0, trim=lambda pad: calls.append(pad) or 1, clock=clock)
    assert not heap.maybe_trim()          # the interval counts from start-up
    clock.now += 59.9
    assert not heap.maybe_trim()
    clock.now += 0.1
    assert heap.maybe_trim() and calls == [0]
    clock.now += 30
    assert not heap.maybe_trim()
    clock.now += 30
    assert heap.maybe_trim() and calls == [0, 0] and heap.trims == 2


def test_zero_interval_or_no_malloc_trim_never_trims(monkeypatch: pytest.MonkeyPatch) -> None:
    clock, calls = Clock(), []
    off = HeapTrimmer(0.0, trim=lambda pad: calls.append(pad) or 1, clock=clock)
    clock.now += 1e6
    assert not off.enabled and not off.maybe_trim() and calls == []
    monkeypatch.setattr("worker.heap.allocator", lambda: "unknown")  # no glibc malloc to trim
    unavailable = HeapTrimmer(60.0, clock=clock)
    clock.now += 1e6
    assert not unavailable.enabled and not unavailable.maybe_trim()


def test_worker_trims_between_batches() -> None:
    log: list[tuple] = []
    clock, calls = Clock(), []
    heap = HeapTrimmer(10.0, trim=lambda pad: calls.append(("trim", len(log))) or 1, clock=clock)
    worker, *_ = make_worker(log, {0: [b"n", b"A1"]}, CollectorRegistry(), plugins=[heap])
    worker.run_once()
    assert calls == []
    clock.now += 10
    worker.run_once()                     # nothing left: an idle poll trims too
    clock.now += 10
    worker.run_once()
    assert len(calls) == 2


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc_malloc_trim() is None,
                    reason="glibc malloc_trim and /proc are Linux/glibc only")
def test_malloc_trim_returns_freed_pages_that_free_keeps() -> None:
    # Blocks freed below a live one stay resident after free() (glibc only shrinks the top of the heap by
    # itself); malloc_trim hands their pages back. Done in a thread of its own, as librdkafka's are, so the
    # blocks come from that thread's arena rather than the main one.
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    figures: dict[str, float] = {}

    def churn() -> None:
        blocks = []
        for _ in range(40_000):           # 40,000 x 4 KiB = 160 MiB, touched so it is resident
            block = libc.malloc(4096)
            libc.memset(block, 1, 4096)
            blocks.append(block)
        figures["allocated"] = _rss_mib()
        for block in blocks[:-1]:
            libc.free(block)
        figures["freed"] = _rss_mib()
        HeapTrimmer(1.0, clock=lambda: float("inf")).maybe_trim()
        figures["trimmed"] = _rss_mib()
        libc.free(blocks[-1])

    thread = threading.Thread(target=churn)
    thread.start()
    thread.join()
    assert figures["freed"] > figures["allocated"] - 40, figures      # free() alone kept most of it
    assert figures["trimmed"] < figures["freed"] - 100, figures       # the trim gave back over 100 MiB


def test_allocator_is_read_from_the_loaded_libraries(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert allocator(maps) == "jemalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libtcmalloc_minimal.so.4\n")
    assert allocator(maps) == "tcmalloc"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator(maps) in {"glibc", "unknown"}


@pytest.mark.skipif(ctypes.util.find_library("jemalloc") is None,
                    reason="libjemalloc2 not installed (scripts/setup.sh installs it with WITH_JEMALLOC=1)")
def test_under_jemalloc_the_worker_knows_it_and_does_not_trim() -> None:
    # The image preloads jemalloc: glibc's arenas then hold next to nothing and trimming them is wasted.
    out = subprocess.run([sys.executable, "-c", "from worker.heap import allocator, HeapTrimmer; "
                          "print(allocator(), HeapTrimmer(60).enabled)"],
                         env={**os.environ, "LD_PRELOAD": "libjemalloc.so.2"}, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["jemalloc", "False"], out.stderr
