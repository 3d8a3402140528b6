"""One tiny trained bundle shared by the training tests (training takes seconds, so it happens once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

#: Small and fast: the model only has to exist and be deterministic, not to be good.
TRAIN_ARGS = ["--epochs", "4", "--hidden", "8,3", "--batch-size", "64", "--seed", "7"]


def synthetic_events(n: int = 400, seed: int = 0) -> pd.DataFrame:
    """Events with a heavy-tailed, a normal, a constant and a categorical feature, an id and a label.

    Anomalies (about 10 %) have a shifted latency.
    """
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "event_id": [f"e{i:04d}" for i in range(n)],
        "amount": np.round(rng.lognormal(3.0, 1.5, n), 3),
        "latency": np.round(rng.normal(100.0, 10.0, n), 3),
        "version": 7.0,
        "method": rng.choice(["GET", "POST", "PUT"], n, p=[0.6, 0.3, 0.1]),
        "label": np.where(rng.random(n) < 0.1, "attack", "normal"),
    })
    frame.loc[frame["label"] == "attack", "latency"] += 80.0
    return frame


@dataclass(frozen=True)
class TrainedBundle:
    """A bundle trained by `anomaly-train` on `csv` (which holds `frame`)."""

    path: Path
    csv: Path
    frame: pd.DataFrame
    args: tuple[str, ...]

    @property
    def features(self) -> pd.DataFrame:
        """The frame with only the model's feature columns."""
        return self.frame.drop(columns=["event_id", "label"])


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory: pytest.TempPathFactory) -> TrainedBundle:
    from training.cli import train_main

    root = tmp_path_factory.mktemp("trained")
    frame = synthetic_events()
    csv = root / "events.csv"
    frame.to_csv(csv, index=False)
    args = ("--data", str(csv), "--label-column", "label", "--normal-value", "normal",
            "--drop", "event_id", *TRAIN_ARGS)
    out = root / "bundle"
    assert train_main([*args, "--out", str(out)]) == 0
    return TrainedBundle(path=out, csv=csv, frame=frame, args=args)
