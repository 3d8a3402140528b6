"""Offline training: from an event file to a versioned autoencoder bundle, plus batch scoring and evaluation.

The names in `__all__` are the supported Python API (docs/api.md); they are imported on first use, so
`import training` does not load TensorFlow.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from training.bundle import Bundle
    from training.data import Labels, read_frame
    from training.errors import AnomalyError, BundleError, ConfigError, DataError
    from training.model import FitConfig, ScoreConfig
    from training.repository import load_model
    from training.scoring import Scores, score_frame
    from training.threshold import ThresholdConfig
    from training.train import TrainConfig, TrainResult, WindowOptions, train_file, train_frame
    from training.windows import WindowSpec

#: Each supported name and the module that defines it.
_HOMES = {
    "read_frame": "training.data", "Labels": "training.data",
    "TrainConfig": "training.train", "TrainResult": "training.train", "WindowOptions": "training.train",
    "WindowSpec": "training.windows",
    "train_frame": "training.train", "train_file": "training.train",
    "FitConfig": "training.model", "ScoreConfig": "training.model", "ThresholdConfig": "training.threshold",
    "Bundle": "training.bundle", "load_model": "training.repository",
    "Scores": "training.scoring", "score_frame": "training.scoring",
    "AnomalyError": "training.errors", "DataError": "training.errors",
    "BundleError": "training.errors", "ConfigError": "training.errors",
}

__all__ = [
    "AnomalyError", "Bundle", "BundleError", "ConfigError", "DataError", "FitConfig", "Labels", "ScoreConfig",
    "Scores", "ThresholdConfig", "TrainConfig", "TrainResult", "WindowOptions", "WindowSpec", "load_model",
    "read_frame", "score_frame", "train_file", "train_frame",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
