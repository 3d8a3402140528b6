"""The streaming worker: Kafka events in micro-batches -> scores -> alerts and dead letters -> commit.

The names in `__all__` are the supported Python API (docs/api.md); they are imported on first use, so
`import worker` does not load TensorFlow or a Kafka client.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.config import Settings, from_args
    from worker.errors import BrokerUnavailable, WorkerError
    from worker.loop import Sink, Source, Worker
    from worker.pipeline import Pipeline
    from worker.wiring import Runtime, build_runtime, build_worker

#: Each supported name and the module that defines it.
_HOMES = {
    "Settings": "worker.config", "from_args": "worker.config",
    "Runtime": "worker.wiring", "build_runtime": "worker.wiring", "build_worker": "worker.wiring",
    "Worker": "worker.loop", "Source": "worker.loop", "Sink": "worker.loop",
    "Pipeline": "worker.pipeline",
    "WorkerError": "worker.errors", "BrokerUnavailable": "worker.errors",
}

__all__ = [
    "BrokerUnavailable", "Pipeline", "Runtime", "Settings", "Sink", "Source", "Worker", "WorkerError",
    "build_runtime", "build_worker", "from_args",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'worker' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
