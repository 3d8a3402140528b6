"""Liveness and readiness, derived in one place from their sources when a probe or a scrape asks.

Liveness: the loop called `heartbeat()` within `stale_after_seconds` (the clock starts at construction,
so start-up gets one full period). Readiness: every named check holds. `worker/wiring.py` registers the
checks, each read from the component that owns its fact:

- `model_loaded`: a verified bundle is loaded and its pipeline warmed up;
- `partitions_assigned`: the source has at least one input partition (`Source.assigned()`);
- `broker_ok`: the last broker round trip of the loop succeeded (`BrokerStatus`, which the loop updates);
- `batches_decodable`: no partition is held at a record batch the Kafka client cannot decode
  (`Quarantine.held_count()`, worker/kafka/core.py).

`/readyz` names the checks that fail, in the order they were registered; `anomaly_worker_ready` reads
`is_ready()` at scrape time (`WorkerMetrics.follow_readiness`). Checks run on HTTP threads, so each must
be thread-safe; one that raises counts as failing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Check = Callable[[], bool]


class BrokerStatus:
    """Whether the loop's last broker round trip (commit, transaction, reachability check) succeeded."""

    def __init__(self, ok: bool = False) -> None:
        self._ok = ok
        self._lock = threading.Lock()

    @property
    def ok(self) -> bool:
        with self._lock:
            return self._ok

    def set(self, ok: bool) -> None:
        with self._lock:
            self._ok = ok


class Health:
    """What `/healthz` and `/readyz` report; see the module docstring."""

    def __init__(self, stale_after_seconds: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not (math.isfinite(stale_after_seconds) and stale_after_seconds > 0):
            raise ValueError(f"stale_after_seconds must be a positive number, got {stale_after_seconds}")
        self._lock = threading.Lock()
        self._clock = clock
        self._stale_after = stale_after_seconds
        self._last_heartbeat = clock()
        self._checks: dict[str, Check] = {}

    def check(self, name: str, check: Check) -> None:
        """Make readiness depend on `check`; a name registered again keeps its place and takes the new check."""
        with self._lock:
            self._checks[name] = check

    def heartbeat(self) -> None:
        """Record that the loop made progress (call once per poll iteration)."""
        now = self._clock()
        with self._lock:
            self._last_heartbeat = now

    def heartbeat_age_seconds(self) -> float:
        """Seconds since the last heartbeat (or since construction)."""
        now = self._clock()
        with self._lock:
            return max(0.0, now - self._last_heartbeat)

    def is_alive(self) -> bool:
        """True while the last heartbeat is younger than the staleness limit."""
        return self.heartbeat_age_seconds() <= self._stale_after

    def failing_readiness(self) -> list[str]:
        """Names of the readiness checks that do not hold now; empty when ready (never before a check is
        registered: a health object nobody wired is not ready)."""
        with self._lock:
            checks = list(self._checks.items())
        if not checks:
            return ["checks_registered"]
        return [name for name, check in checks if not _holds(name, check)]

    def is_ready(self) -> bool:
        """True when every readiness check holds."""
        return not self.failing_readiness()


def _holds(name: str, check: Check) -> bool:
    try:
        return bool(check())
    except Exception:  # noqa: BLE001 - a probe answers "not ready", it never fails
        log.debug("readiness check %s raised; counted as failing", name, exc_info=True)
        return False
