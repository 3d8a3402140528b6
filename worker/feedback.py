"""Analyst feedback: verdicts on published alerts become per-model-version precision metrics.

A feedback message is a JSON object ``{"alert_id": "...", "verdict": "true_positive" | "false_positive"}``
on `--feedback-topic`. The alert id is the one the worker published,
``<model version>/<topic>/<partition>/<offset>`` (see `worker.alerts.alert_id`), so each verdict
counts for the version that raised the alert: ``anomaly_feedback_verdicts{model_version, verdict}``
and ``anomaly_alert_precision_ratio{model_version}`` = true positives / all verdicts. The last
verdict for an alert wins (an analyst may change their mind).

Which versions count. Anyone who can write to the feedback topic chooses the version label, so a
verdict counts only for a version this worker could have run:

1. the versions it loaded at start-up (the live model and the `--shadow-model`), and
2. when `--model` is a model repository, every version in it (``REPO/versions/<version>/``): the
   ones it ran before a restart, the ones it hot-reloads later, and those another worker on the
   same repository promoted first. A version removed from the repository stops counting for new
   verdicts.

The topic is read from the beginning at start-up, after the model is loaded, so older verdicts on
versions still in the repository keep counting. Anything else is skipped and counted in
``anomaly_feedback_rejected_total{reason}``: ``malformed`` (not a verdict on an alert id) or
``unknown_model_version``.

Bounds: the ledger keeps the latest `max_alerts` verdicts (the oldest leaves first; about 100 bytes
each, whatever the id's length), and precision for at most `max_versions` versions: a version with
no verdict left in the window, or the one whose latest verdict is the oldest when a new version
needs room, leaves the ledger and its series go.

Every worker reads the whole feedback topic from the beginning at start-up (no consumer group), so
workers on the same repository report the same figures; dashboards take the max over workers.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Iterable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from training.repository import VERSIONS

if TYPE_CHECKING:
    from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

VERDICTS = ("true_positive", "false_positive")

#: `worker.alerts.alert_id`: version (a directory name), a legal Kafka topic name, partition, offset.
ALERT_ID = re.compile(r"(?P<version>[^/\x00]{1,255})/[A-Za-z0-9._-]{1,249}/[0-9]{1,10}/[0-9]{1,19}")


class Rejection(StrEnum):
    """Why a feedback message was skipped (the `reason` label of `anomaly_feedback_rejected_total`)."""

    MALFORMED = "malformed"
    UNKNOWN_MODEL_VERSION = "unknown_model_version"


class KnownVersions:
    """The model versions this worker could have run: those it loaded, and those of its repository."""

    def __init__(self, loaded: Iterable[str], repository: Path | None = None) -> None:
        self.loaded = frozenset(loaded)
        self.repository = Path(repository) if repository is not None else None

    def __contains__(self, version: object) -> bool:
        if not isinstance(version, str):
            return False
        if version in self.loaded:
            return True
        if self.repository is None or version.startswith(".") or "/" in version:
            return False  # "." and ".." would name the versions folder and the repository itself
        try:
            return (self.repository / VERSIONS / version).is_dir()
        except (OSError, ValueError):
            return False


class FeedbackLedger:
    """The latest verdict per alert id, and precision per known model version, published to metrics."""

    def __init__(self, metrics: WorkerMetrics, known: KnownVersions, max_alerts: int = 1_000_000,
                 max_versions: int = 50) -> None:
        if max_alerts < 1 or max_versions < 1:
            raise ValueError(f"max_alerts and max_versions must be at least 1, got {max_alerts} and {max_versions}")
        self.metrics, self.known = metrics, known
        self.max_alerts, self.max_versions = max_alerts, max_versions
        self._verdicts: dict[bytes, tuple[str, str]] = {}  # alert key -> (model version, verdict), oldest first
        self._counts: OrderedDict[str, dict[str, int]] = OrderedDict()  # version -> verdict -> alerts
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}  # one shared tuple per (version, verdict)

    def add(self, value: bytes | None) -> bool:
        """Take one feedback message; False (and a counter, by reason) if it does not count."""
        verdict = parse(value)
        if verdict is None:
            self.metrics.record_feedback_rejected(Rejection.MALFORMED)
            return False
        alert_id, version, outcome = verdict
        if version not in self._counts and version not in self.known:
            self.metrics.record_feedback_rejected(Rejection.UNKNOWN_MODEL_VERSION)
            return False
        touched, key = {version}, _key(alert_id)
        previous = self._verdicts.pop(key, None)
        if previous is None and len(self._verdicts) >= self.max_alerts:  # the oldest verdict leaves the window
            previous = self._verdicts.pop(next(iter(self._verdicts)))
        if previous is not None:
            self._counts[previous[0]][previous[1]] -= 1
            touched.add(previous[0])
        if version not in self._counts:
            if len(self._counts) >= self.max_versions:
                touched.add(self._evict_oldest_version())
            self._counts[version] = dict.fromkeys(VERDICTS, 0)
        self._counts.move_to_end(version)
        self._counts[version][outcome] += 1
        self._verdicts[key] = self._pairs.setdefault((version, outcome), (version, outcome))
        for name in touched:
            self._publish(name)
        return True

    def precision(self, version: str) -> float | None:
        counts = self._counts.get(version, {})
        total = sum(counts.values())
        return counts.get("true_positive", 0) / total if total else None

    def versions(self) -> list[str]:
        """The versions with verdicts in the ledger, least recently verdicted first."""
        return list(self._counts)

    def _evict_oldest_version(self) -> str:
        """Drop the version whose latest verdict is the oldest, with all its verdicts (rare: O(max_alerts))."""
        oldest = next(iter(self._counts))
        del self._counts[oldest]
        self._verdicts = {k: v for k, v in self._verdicts.items() if v[0] != oldest}
        self._pairs = {k: v for k, v in self._pairs.items() if k[0] != oldest}
        log.info("analyst feedback: model version %s left the ledger to make room for a newer one (at most %d "
                 "versions)", oldest, self.max_versions)
        return oldest

    def _publish(self, version: str) -> None:
        counts = self._counts.get(version)
        if counts is not None and sum(counts.values()) > 0:
            self.metrics.set_feedback(version, counts)
            return
        self._counts.pop(version, None)
        self._pairs = {k: v for k, v in self._pairs.items() if k[0] != version}
        self.metrics.clear_feedback(version)


def _key(alert_id: str) -> bytes:
    """A 16-byte digest of an alert id: a window entry costs the same however long the id is."""
    return hashlib.blake2b(alert_id.encode(), digest_size=16).digest()


def parse(value: bytes | None) -> tuple[str, str, str] | None:
    """(alert id, model version, verdict) of a feedback message, or None if it is not one."""
    if value is None:
        return None
    try:
        message: Any = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(message, dict):
        return None
    alert_id, verdict = message.get("alert_id"), message.get("verdict")
    if not isinstance(alert_id, str) or verdict not in VERDICTS:
        return None
    match = ALERT_ID.fullmatch(alert_id)
    if match is None:
        return None
    return alert_id, match["version"], verdict
