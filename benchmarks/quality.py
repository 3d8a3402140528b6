"""Detection quality: the product's detector, scored through its bundle, against IsolationForest, PyOD KNN,
PyOD ECOD, PyOD AutoEncoder and the previous product default (the autoencoder alone).

Run::

    .venv/bin/python -m benchmarks.quality [--datasets 6_cardio nsl-kdd] [--out benchmarks/results]

1. Find every ADBench `.npz` and NSL-KDD under the shared data directory (`shared_data_dir`).
2. Split each data set once with `one_class_split`; every method gets the same rows.
3. Fit each method on the train rows, score the test rows, record ROC-AUC, PR-AUC and seconds; for the
   product's detector also keep the two score parts of every test row.
4. From those parts, the leave-one-set-out table: for each set, the distance weight that is best on the
   other sets, scored on the held-out set.
5. Time a 1,000-row model call and measure the bundle on NSL-KDD (41 fields), and one training run on all
   NSL-KDD normal rows.
6. Write `quality.json` and `quality.md` (rendered from the same report dict) into `--out`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

SHARED_DATA_ENV = "ANOMALY_SHARED_DATA"
NSL_KDD_FILE = Path("nsl-kdd") / "KDDTrain+_20Percent.csv"
NSL_KDD_CATEGORICAL = ("protocol_type", "service", "flag")
NSL_KDD_NOT_FEATURES = ("label", "difficulty")
OURS = "detector"
METHODS = (OURS, "previous", "iforest", "knn", "ecod", "pyod_ae")
METHOD_TITLES = {OURS: "Ours (AE + kNN)", "previous": "Previous default (AE)", "iforest": "IsolationForest",
                 "knn": "PyOD KNN", "ecod": "PyOD ECOD", "pyod_ae": "PyOD AutoEncoder"}
PEERS = ("iforest", "knn", "ecod", "pyod_ae")
#: A metric gap below this between ours and the best peer is reported as a tie, not a loss.
TIE = 1e-3
#: Distance weights measured from the score parts (0 = reconstruction only, 1 = distance only).
WEIGHT_GRID = tuple(round(0.1 * i, 1) for i in range(11))
#: The leave-one-set-out choice keeps the reconstruction term (docs/preprocessing.md): w at most this.
MAX_CHOSEN_WEIGHT = 0.9
#: Rows of the timed model call, as in the issue's latency target.
LATENCY_ROWS = 1_000

PROTOCOL = (
    "One-class protocol (shared/data/README.md): with `numpy.random.default_rng(0)`, shuffle the normal rows, "
    "then the anomalous rows, separately. Train on the first 60 % of the shuffled normals (at most 20,000 rows, "
    "normal rows only). Test on the normals after the 60 % cut (at most 20,000) plus the first anomalies (at most "
    "5,000), shuffled with the same generator. Every method sees the same train and test rows. Scores: higher = "
    "more anomalous. Metrics: ROC-AUC and PR-AUC (average precision) of the score on the test rows.\n\n"
    "Inputs per method. Ours and the previous default: the raw feature columns as a DataFrame (NSL-KDD: "
    "`label` and `difficulty` dropped; `protocol_type`, `service`, `flag` inferred categorical), trained with "
    "`train_frame` and the product defaults (`TrainConfig()`, `FitConfig(seed=0)`; the previous default is the "
    "same with `ScoreConfig(distance_weight=0)`, the reconstruction term alone; the product splits its train rows "
    "70/15/15 into fit/validation/calibration itself), then scored by loading the written bundle and calling its "
    "SavedModel signature, as users run it. The previous default trains the very same autoencoders (same seeds, "
    "data and deterministic ops), so unless `--train-previous` is given its metrics are taken from the detector's "
    "reconstruction part of the score (w = 0 below), which ranks rows exactly as its score does; its fit and score "
    "times are then not measured separately. IsolationForest (scikit-learn, `random_state=0`, default parameters), "
    "PyOD KNN (default parameters: k=5, largest distance), PyOD ECOD and PyOD AutoEncoder (default parameters): "
    "NSL-KDD's 3 categorical columns one-hot encoded (fitted on train, unseen categories all-zero) and the numeric "
    "columns standardized (fitted on train); ADBench features standardized (fitted on train).\n\n"
    "Times are wall-clock seconds on this machine. Product fit = the whole product training run (its own "
    "splits, early-stopped fit, SavedModel export, threshold calibration, bundle and report writing) plus loading "
    "the bundle; score = encoding the test frame and calling the signature. Peer fit = preprocessing and fit "
    "(PyOD KNN also scores its train rows there); score = preprocessing and scoring the test rows."
)


def shared_data_dir() -> Path:
    """`../shared/data` next to the repository, unless the ANOMALY_SHARED_DATA environment variable says where."""
    override = os.environ.get(SHARED_DATA_ENV)
    return Path(override) if override else Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --- protocol -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Row indices of one data set: `train` holds only normals; `y_test` is True where a test row is an anomaly."""

    train: np.ndarray
    test: np.ndarray
    y_test: np.ndarray


def one_class_split(is_anomaly: np.ndarray, seed: int = 0, train_fraction: float = 0.6, max_train: int = 20_000,
                    max_test_normal: int = 20_000, max_anomalies: int = 5_000) -> Split:
    """The one-class protocol of shared/data/README.md, as row indices.

    1. Shuffle the normal indices, then the anomalous indices, with one `default_rng(seed)`.
    2. Train = the first `train_fraction` of the normals, at most `max_train`.
    3. Test = the normals after that cut (at most `max_test_normal`) plus the first `max_anomalies` anomalies,
       shuffled with the same generator.
    """
    y = np.asarray(is_anomaly, dtype=bool)
    if y.ndim != 1:
        raise ValueError(f"is_anomaly must be 1-D, got shape {y.shape}")
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    rng = np.random.default_rng(seed)
    normals = rng.permutation(np.flatnonzero(~y))
    anomalies = rng.permutation(np.flatnonzero(y))
    cut = int(round(train_fraction * normals.size))
    test = rng.permutation(np.concatenate([normals[cut:cut + max_test_normal], anomalies[:max_anomalies]]))
    return Split(train=normals[:min(cut, max_train)], test=test, y_test=y[test])


# --- data sets ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """Feature columns only (no label), which rows are anomalies, and which columns are categorical."""

    name: str
    frame: pd.DataFrame
    is_anomaly: np.ndarray
    categorical: tuple[str, ...] = ()


def load_adbench(path: Path) -> Dataset:
    """An ADBench `.npz` (keys X, y with 1 = anomaly) as a frame of numeric columns x0..x{d-1}."""
    with np.load(path) as data:
        features, labels = np.asarray(data["X"], dtype=np.float64), np.asarray(data["y"])
    frame = pd.DataFrame(features, columns=[f"x{i}" for i in range(features.shape[1])])
    return Dataset(name=path.stem, frame=frame, is_anomaly=labels.astype(bool))


def load_nsl_kdd(path: Path) -> Dataset:
    """NSL-KDD: anomalies are rows whose label is not 'normal'; label and difficulty are not features."""
    frame = pd.read_csv(path)
    is_anomaly = frame["label"].to_numpy() != "normal"
    return Dataset(name="nsl-kdd", frame=frame.drop(columns=list(NSL_KDD_NOT_FEATURES)), is_anomaly=is_anomaly,
                   categorical=NSL_KDD_CATEGORICAL)


def find_datasets(root: Path) -> dict[str, Callable[[], Dataset]]:
    """Loaders by data set name, ADBench in file-name order then NSL-KDD; loaded only when called."""
    loaders: dict[str, Callable[[], Dataset]] = {
        p.stem: partial(load_adbench, p) for p in sorted((root / "adbench").glob("*.npz"))}
    if (root / NSL_KDD_FILE).is_file():
        loaders["nsl-kdd"] = lambda: load_nsl_kdd(root / NSL_KDD_FILE)
    if not loaders:
        raise SystemExit(f"no data sets under {root}; set {SHARED_DATA_ENV} to the shared data directory")
    return loaders


# --- methods ------------------------------------------------------------------------------------------------


class Detector(Protocol):
    def fit(self, train: pd.DataFrame) -> None: ...

    def score(self, test: pd.DataFrame) -> np.ndarray: ...


def frame_sha256(frame: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes()).hexdigest()


class Product:
    """The product: `train_frame` writes a bundle; scores come from the loaded bundle's SavedModel signature."""

    def __init__(self, config: Any, workdir: Path) -> None:
        self.config = config
        self.out_dir = workdir / "bundle"
        self._bundle: Any = None
        self.parts: dict[str, np.ndarray] = {}

    def fit(self, train: pd.DataFrame) -> None:
        from training.bundle import load_bundle
        from training.train import train_frame

        train_frame(train, self.out_dir, self.config, data_sha256=frame_sha256(train), log=lambda _: None)
        self._bundle = load_bundle(self.out_dir)
        _ = self._bundle.scorer  # load the SavedModel now, so scoring time is scoring only

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        from training.data import encode_frame

        return np.asarray(encode_frame(self._bundle.schema, frame, Path("<test>")))

    def score(self, test: pd.DataFrame) -> np.ndarray:
        scores = self._bundle.scorer.score(self.encode(test))
        self.parts = scores.parts
        return np.asarray(scores.score)

    def bundle_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.out_dir.rglob("*") if p.is_file())

    def call_seconds(self, frame: pd.DataFrame, repeats: int = 30) -> float:
        """Median seconds of one signature call on `frame` (encoded beforehand), after a warm-up call."""
        matrix = self.encode(frame)
        scorer = self._bundle.scorer
        scorer.score(matrix)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            scorer.score(matrix)
            times.append(time.perf_counter() - started)
        return float(np.median(times))


class PeerFeatures:
    """Peers' inputs: categorical columns one-hot encoded, numeric columns standardized, both fitted on train."""

    def __init__(self, categorical: Sequence[str]) -> None:
        self.categorical = list(categorical)
        self._transform: Any = None

    def fit_transform(self, frame: pd.DataFrame) -> np.ndarray:
        from sklearn.compose import ColumnTransformer
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        numeric = [c for c in frame.columns if c not in self.categorical]
        self._transform = ColumnTransformer([
            ("numeric", StandardScaler(), numeric),
            ("categorical", OneHotEncoder(handle_unknown="ignore", sparse_output=False), self.categorical),
        ])
        return np.asarray(self._transform.fit_transform(frame), dtype=np.float64)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        return np.asarray(self._transform.transform(frame), dtype=np.float64)


class IsolationForestPeer:
    """scikit-learn IsolationForest, default parameters, random_state=0; score = -score_samples."""

    def __init__(self, categorical: Sequence[str]) -> None:
        self.features = PeerFeatures(categorical)
        self._model: Any = None

    def fit(self, train: pd.DataFrame) -> None:
        from sklearn.ensemble import IsolationForest

        self._model = IsolationForest(random_state=0).fit(self.features.fit_transform(train))

    def score(self, test: pd.DataFrame) -> np.ndarray:
        return -np.asarray(self._model.score_samples(self.features.transform(test)))


class KnnPeer:
    """PyOD KNN, default parameters (distance to the 5th neighbour); score = decision_function."""

    def __init__(self, categorical: Sequence[str]) -> None:
        self.features = PeerFeatures(categorical)
        self._model: Any = None

    def fit(self, train: pd.DataFrame) -> None:
        from pyod.models.knn import KNN

        self._model = KNN().fit(self.features.fit_transform(train))

    def score(self, test: pd.DataFrame) -> np.ndarray:
        return np.asarray(self._model.decision_function(self.features.transform(test)))


class EcodPeer(KnnPeer):
    """PyOD ECOD, default parameters; score = decision_function."""

    def fit(self, train: pd.DataFrame) -> None:
        from pyod.models.ecod import ECOD

        self._model = ECOD().fit(self.features.fit_transform(train))


class PyodAutoEncoderPeer(KnnPeer):
    """PyOD AutoEncoder (PyTorch), default parameters; score = decision_function."""

    def fit(self, train: pd.DataFrame) -> None:
        from pyod.models.auto_encoder import AutoEncoder

        self._model = AutoEncoder(random_state=0, verbose=0).fit(self.features.fit_transform(train))


class Unavailable(Exception):
    """A method that cannot run on this machine (e.g. a missing optional dependency); reported, not fatal."""


def previous_config(config: Any) -> Any:
    """The previous product default: the same training run with the reconstruction term alone."""
    return replace(config, score=replace(config.score, distance_weight=0.0))


def make_detector(method: str, dataset: Dataset, workdir: Path, config: Any) -> Detector:
    if method == OURS:
        return Product(config, workdir)
    if method == "previous":
        return Product(previous_config(config), workdir)
    if method == "iforest":
        return IsolationForestPeer(dataset.categorical)
    if method == "knn":
        return KnnPeer(dataset.categorical)
    if method == "ecod":
        return EcodPeer(dataset.categorical)
    if method == "pyod_ae":
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise Unavailable(f"PyOD AutoEncoder needs PyTorch, which is not installed ({exc})") from exc
        return PyodAutoEncoderPeer(dataset.categorical)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


# --- running ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    dataset: str
    method: str
    roc_auc: float
    pr_auc: float
    fit_seconds: float
    score_seconds: float


def run_method(detector: Detector, method: str, dataset: Dataset, split: Split) -> Result:
    """Fit on the split's train rows, score its test rows, and time both."""
    train = dataset.frame.iloc[split.train].reset_index(drop=True)
    test = dataset.frame.iloc[split.test].reset_index(drop=True)
    started = time.perf_counter()
    detector.fit(train)
    fitted = time.perf_counter()
    scores = detector.score(test)
    scored = time.perf_counter()
    if scores.shape != (len(test),) or not np.isfinite(scores).all():
        raise RuntimeError(f"{method} on {dataset.name}: expected {len(test)} finite scores, got shape "
                           f"{scores.shape} with {int((~np.isfinite(scores)).sum())} non-finite")
    return Result(dataset=dataset.name, method=method, roc_auc=float(roc_auc_score(split.y_test, scores)),
                  pr_auc=float(average_precision_score(split.y_test, scores)),
                  fit_seconds=fitted - started, score_seconds=scored - fitted)


def describe(dataset: Dataset, split: Split) -> dict[str, Any]:
    return {"name": dataset.name, "rows": len(dataset.frame), "features": dataset.frame.shape[1],
            "categorical": list(dataset.categorical), "normal_rows": int((~dataset.is_anomaly).sum()),
            "train_rows": int(split.train.size), "test_normal_rows": int((~split.y_test).sum()),
            "test_anomaly_rows": int(split.y_test.sum())}


def time_full_nsl_kdd(dataset: Dataset, config: Any) -> dict[str, Any]:
    """Seconds for one product training run on all NSL-KDD normal rows (outside the protocol's 60 % cut)."""
    normal = dataset.frame[~dataset.is_anomaly].reset_index(drop=True)
    with tempfile.TemporaryDirectory(prefix="bench-nsl-") as tmp:
        started = time.perf_counter()
        Product(config, Path(tmp)).fit(normal)
        seconds = time.perf_counter() - started
    return {"rows": len(normal), "seconds": seconds}


def machine() -> dict[str, Any]:
    import pyod
    import sklearn
    import tensorflow as tf

    return {"nproc": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine(),
            "python": platform.python_version(), "tensorflow": tf.__version__, "scikit-learn": sklearn.__version__,
            "pyod": pyod.__version__, "numpy": np.__version__}


# --- leave one set out ----------------------------------------------------------------------------------------


def reweighted(parts: dict[str, np.ndarray], trained_weight: float, weight: float) -> np.ndarray:
    """The score the detector would give with distance weight `weight`, from the parts of one trained with
    `trained_weight` (each part is its weight times its term on the validation-normal scale)."""
    reconstruction = parts["score_reconstruction"] / (1.0 - trained_weight)
    distance = parts["score_distance"] / trained_weight
    return (1.0 - weight) * reconstruction + weight * distance


def weight_grid(parts: dict[str, np.ndarray], y: np.ndarray, trained_weight: float) -> dict[str, list[float]]:
    """ROC-AUC and PR-AUC of the test rows for every distance weight of WEIGHT_GRID."""
    scores = [reweighted(parts, trained_weight, w) for w in WEIGHT_GRID]
    return {"roc_auc": [float(roc_auc_score(y, s)) for s in scores],
            "pr_auc": [float(average_precision_score(y, s)) for s in scores]}


def leave_one_set_out(grids: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """For each set: the weight with the best mean of ROC-AUC and PR-AUC over the other sets, scored on it."""
    out = []
    for held in grids:
        others = [g for name, g in grids.items() if name != held]
        choices = [i for i, w in enumerate(WEIGHT_GRID) if w <= MAX_CHOSEN_WEIGHT]
        merit = [np.mean([(g["roc_auc"][i] + g["pr_auc"][i]) / 2 for g in others]) for i in choices]
        best = choices[int(np.argmax(merit))]
        out.append({"dataset": held, "weight": WEIGHT_GRID[best], "roc_auc": grids[held]["roc_auc"][best],
                    "pr_auc": grids[held]["pr_auc"][best]})
    return out


# --- report -------------------------------------------------------------------------------------------------


def means(results: Sequence[Result], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    return {m: {k: float(np.mean([getattr(r, k) for r in results if r.method == m]))
                for k in ("roc_auc", "pr_auc", "fit_seconds", "score_seconds")}
            for m in methods if any(r.method == m for r in results)}


def mean_ranks(results: Sequence[Result], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """Mean over data sets of each method's rank (1 = best; ties share the average rank) by each metric."""
    out: dict[str, dict[str, float]] = {m: {} for m in methods}
    for metric in ("roc_auc", "pr_auc"):
        ranks: dict[str, list[float]] = {m: [] for m in methods}
        for name in dict.fromkeys(r.dataset for r in results):
            value = {r.method: getattr(r, metric) for r in results if r.dataset == name and r.method in methods}
            if set(value) != set(methods):
                continue
            for m, rank in zip(methods, rankdata([-value[m] for m in methods]), strict=True):
                ranks[m].append(float(rank))
        for m in methods:
            out[m][metric] = float(np.mean(ranks[m])) if ranks[m] else float("nan")
    return out


def losses(results: Sequence[Result], metric: str) -> list[dict[str, Any]]:
    """Data sets where our `metric` is below the best peer's by at least TIE."""
    out = []
    for name in dict.fromkeys(r.dataset for r in results):
        by_method = {r.method: getattr(r, metric) for r in results if r.dataset == name}
        peers = {m: v for m, v in by_method.items() if m in PEERS}
        if OURS not in by_method or not peers:
            continue
        best = max(peers, key=lambda m: peers[m])
        if by_method[OURS] <= peers[best] - TIE:
            out.append({"dataset": name, "ours": by_method[OURS], "best_peer": best,
                        "best_peer_value": peers[best], "gap": peers[best] - by_method[OURS]})
    return out


def table(results: Sequence[Result], methods: Sequence[str], metric: str, fmt: str, mean_row: bool = True) -> str:
    names = list(dict.fromkeys(r.dataset for r in results))
    value = {(r.dataset, r.method): getattr(r, metric) for r in results}
    lines = ["| data set | " + " | ".join(METHOD_TITLES[m] for m in methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for name in names:
        present = [value[name, m] for m in methods if (name, m) in value]
        top = max(present) if metric in ("roc_auc", "pr_auc") and present else None
        cells = []
        for m in methods:
            if (name, m) not in value or np.isnan(value[name, m]):
                cells.append("")
                continue
            text = format(value[name, m], fmt)
            cells.append(f"**{text}**" if top is not None and value[name, m] >= top - TIE / 2 else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if mean_row:
        avg = means(results, methods)
        lines.append("| **mean** | " + " | ".join(
            f"**{avg[m][metric]:{fmt}}**" if not np.isnan(avg[m][metric]) else "" for m in methods) + " |")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    results = [Result(**r) for r in report["results"]]
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    mach = report["machine"]
    avg, ranks = report["means"], report["mean_ranks"]
    out = ["# Detection quality: our detector vs. IsolationForest, PyOD KNN, ECOD and AutoEncoder", "",
           f"Generated {report['date']} by `python -m benchmarks.quality` on {mach['nproc']} CPUs "
           f"(`nproc`), {mach['platform']}; Python {mach['python']}, TensorFlow {mach['tensorflow']}, "
           f"scikit-learn {mach['scikit-learn']}, PyOD {mach['pyod']}.",
           f"Product configuration: `{report['config_repr']}` (the product defaults).", "",
           "## Summary", "",
           f"Means over {len(report['datasets'])} data sets; rank 1 = best on a data set, averaged over the sets.", "",
           "| method | mean ROC-AUC | mean PR-AUC | mean rank (ROC-AUC) | mean rank (PR-AUC) |",
           "|---|---:|---:|---:|---:|"]
    out += [f"| {METHOD_TITLES[m]} | {avg[m]['roc_auc']:.4f} | {avg[m]['pr_auc']:.4f} | {ranks[m]['roc_auc']:.2f} "
            f"| {ranks[m]['pr_auc']:.2f} |" for m in methods]
    for method, reason in report["unavailable"].items():
        out += ["", f"{METHOD_TITLES[method]} did not run: {reason}."]
    loso = report["leave_one_set_out"]
    if loso:
        out += ["", "## Leave one set out", "",
                "The setting chosen from data here is the distance weight `w` of the score "
                "(`(1 - w) * reconstruction + w * distance`, each on the scale of validation normals; grid "
                f"{', '.join(f'{w:g}' for w in WEIGHT_GRID if w <= MAX_CHOSEN_WEIGHT)}). For each data set, "
                "`w` is the one with the best mean of ROC-AUC and PR-AUC over the other data sets, then scored "
                "on the held-out set. The "
                "scores for every `w` come from the two score parts of the trained bundle (the same training "
                f"run as the '{METHOD_TITLES[OURS]}' column). Default: `w = {report['distance_weight']:g}`.", "",
                "| held-out data set | chosen w | ROC-AUC | PR-AUC | best peer ROC-AUC | best peer PR-AUC |",
                "|---|---:|---:|---:|---:|---:|"]
        peers = [m for m in methods if m in PEERS]
        value = {(r.dataset, r.method): r for r in results}
        for row in loso:
            best_roc = max(value[row["dataset"], m].roc_auc for m in peers)
            best_pr = max(value[row["dataset"], m].pr_auc for m in peers)
            out.append(f"| {row['dataset']} | {row['weight']:g} | {row['roc_auc']:.4f} | {row['pr_auc']:.4f} | "
                       f"{best_roc:.4f} | {best_pr:.4f} |")
        out.append(f"| **mean** | | **{np.mean([r['roc_auc'] for r in loso]):.4f}** | "
                   f"**{np.mean([r['pr_auc'] for r in loso]):.4f}** | | |")
        grids = report["weight_grid"]["per_dataset"]
        out += ["", "Mean over the data sets for every weight (the choice above is among w <= "
                f"{MAX_CHOSEN_WEIGHT:g}; w = 1 drops the reconstruction term):", "",
                "| w | " + " | ".join(f"{w:g}" for w in WEIGHT_GRID) + " |", "|---|" + "---:|" * len(WEIGHT_GRID)]
        for metric, title in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC")):
            out.append(f"| {title} | " + " | ".join(
                f"{np.mean([g[metric][i] for g in grids.values()]):.4f}" for i in range(len(WEIGHT_GRID))) + " |")
        best_peer_means = {m: avg[m] for m in peers}
        out += ["", "Best peer by mean: ROC-AUC " + ", ".join(
            f"{METHOD_TITLES[m]} {v['roc_auc']:.4f}" for m, v in best_peer_means.items()) + "; PR-AUC " + ", ".join(
            f"{METHOD_TITLES[m]} {v['pr_auc']:.4f}" for m, v in best_peer_means.items()) + "."]
    out += ["", "## Protocol", "", PROTOCOL, "", "## Data sets", "",
            "| data set | rows | features | train rows (normal) | test normal | test anomalies |",
            "|---|---:|---:|---:|---:|---:|"]
    out += [f"| {d['name']} | {d['rows']:,} | {d['features']} | {d['train_rows']:,} | {d['test_normal_rows']:,} "
            f"| {d['test_anomaly_rows']:,} |" for d in report["datasets"]]
    out += ["", "## Where we lose to the best peer", ""]
    for metric, title in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC")):
        lost = report["losses"][metric]
        if lost:
            items = "; ".join(f"{x['dataset']} ({x['ours']:.3f} vs {METHOD_TITLES[x['best_peer']]} "
                              f"{x['best_peer_value']:.3f})" for x in lost)
            out.append(f"- By {title}, we lose to the best peer on {len(lost)} of "
                       f"{len(report['datasets'])} data sets: {items}.")
        else:
            out.append(f"- By {title}, we match or beat the best peer on every data set.")
    out += ["", f"A gap under {TIE:g} counts as a tie. 34_smtp has only 30 test anomalies, so its PR-AUC moves "
            "a lot with a single row. The best value of each row is bold."]
    out += ["", "## ROC-AUC", "", table(results, methods, "roc_auc", ".4f"), "",
            "## PR-AUC (average precision)", "", table(results, methods, "pr_auc", ".4f"), "",
            "## Fit seconds", "", table(results, methods, "fit_seconds", ".2f"), "",
            "## Score seconds (all test rows)", "", table(results, methods, "score_seconds", ".3f"), ""]
    cost = report.get("cost")
    if cost:
        out += ["## Latency, size and training time", "",
                f"- Model call (the SavedModel signature through `Scorer.score`) on {cost['latency_rows']:,} "
                f"encoded NSL-KDD rows ({cost['latency_fields']} fields, {cost['latency_width']} model inputs): "
                f"median {1000 * cost['call_seconds']:.2f} ms (previous default "
                f"{1000 * cost['previous_call_seconds']:.2f} ms).",
                f"- Bundle size: NSL-KDD {cost['bundle_bytes'] / 1e6:.1f} MB; largest over the data sets "
                f"{cost['max_bundle_bytes'] / 1e6:.1f} MB ({cost['max_bundle_dataset']}).",
                f"- Training on the protocol split ({cost['protocol_train_rows']:,} NSL-KDD normal train rows): "
                f"{cost['protocol_seconds']:.1f} s; on all {cost['all_normal_rows']:,} normal rows: "
                f"{cost['all_normal_seconds']:.1f} s.",
                "", "Each training time is one full product training run (fit with early stopping, SavedModel "
                "exports, calibration, bundle and report) plus loading the bundle.", ""]
    return "\n".join(out)


def build_report(results: Sequence[Result], datasets: Sequence[dict[str, Any]], config: Any,
                 grids: dict[str, dict[str, list[float]]], cost: dict[str, Any] | None,
                 unavailable: dict[str, str]) -> dict[str, Any]:
    methods = [m for m in METHODS if any(r.method == m for r in results)]
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(), "protocol": PROTOCOL,
            "config": asdict(config), "config_repr": repr(config),
            "distance_weight": config.score.distance_weight, "datasets": list(datasets),
            "results": [asdict(r) for r in results], "means": means(results, methods),
            "mean_ranks": mean_ranks(results, methods),
            "losses": {m: losses(results, m) for m in ("roc_auc", "pr_auc")},
            "weight_grid": {"weights": list(WEIGHT_GRID), "per_dataset": grids},
            "leave_one_set_out": leave_one_set_out(grids) if len(grids) > 1 else [],
            "cost": cost, "unavailable": unavailable}


# --- command line -------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one benchmark run collects."""

    results: list[Result]
    facts: list[dict[str, Any]]
    grids: dict[str, dict[str, list[float]]]
    cost: dict[str, Any] | None
    unavailable: dict[str, str]


def run(names: Sequence[str], methods: Sequence[str], config: Any, full_nsl: bool = True,
        derive_previous: bool = True, log: Callable[[str], None] = print) -> Run:
    """Every method on every named data set, one at a time; with `derive_previous`, the previous default's
    metrics come from the detector's reconstruction part instead of a second training run (same models)."""
    loaders = find_datasets(shared_data_dir())
    unknown = [n for n in names if n not in loaders]
    if unknown:
        raise SystemExit(f"unknown data set(s) {', '.join(unknown)}; available: {', '.join(loaders)}")
    out = Run(results=[], facts=[], grids={}, cost=None, unavailable={})
    cost: dict[str, Any] = {"max_bundle_bytes": 0}
    w = config.score.distance_weight
    for name in names or list(loaders):
        dataset = loaders[name]()
        split = one_class_split(dataset.is_anomaly)
        out.facts.append(describe(dataset, split))
        for method in methods:
            if method in out.unavailable:
                continue
            if method == "previous" and derive_previous and name in out.grids:
                # Same seeds, data and op determinism: the previous default's models are the detector's, and
                # its score ranks rows exactly as the detector's reconstruction part (w = 0) does.
                out.results.append(Result(dataset=name, method=method, roc_auc=out.grids[name]["roc_auc"][0],
                                          pr_auc=out.grids[name]["pr_auc"][0], fit_seconds=float("nan"),
                                          score_seconds=float("nan")))
                continue
            with tempfile.TemporaryDirectory(prefix=f"bench-{method}-") as tmp:
                try:
                    detector = make_detector(method, dataset, Path(tmp), config)
                except Unavailable as exc:
                    out.unavailable[method] = str(exc)
                    log(f"{method}: {exc}")
                    continue
                result = run_method(detector, method, dataset, split)
                if isinstance(detector, Product) and method == OURS:
                    if 0.0 < w < 1.0:
                        out.grids[name] = weight_grid(detector.parts, split.y_test, w)
                    size = detector.bundle_bytes()
                    if size > cost["max_bundle_bytes"]:
                        cost.update(max_bundle_bytes=size, max_bundle_dataset=name)
                if isinstance(detector, Product) and name == "nsl-kdd" and method == OURS:
                    rows = dataset.frame.iloc[split.test[:LATENCY_ROWS]].reset_index(drop=True)
                    seconds = detector.call_seconds(rows)
                    cost.update(call_seconds=seconds, latency_rows=len(rows), latency_fields=rows.shape[1],
                                latency_width=detector.encode(rows[:1]).shape[1],
                                bundle_bytes=detector.bundle_bytes(), protocol_train_rows=int(split.train.size),
                                protocol_seconds=result.fit_seconds)
                    with tempfile.TemporaryDirectory(prefix="bench-previous-") as previous_dir:
                        previous = Product(previous_config(config), Path(previous_dir))
                        previous.fit(dataset.frame.iloc[split.train].reset_index(drop=True))
                        cost["previous_call_seconds"] = previous.call_seconds(rows)
            out.results.append(result)
            log(f"{name:24s} {method:12s} ROC-AUC {result.roc_auc:.4f}  PR-AUC {result.pr_auc:.4f}  "
                f"fit {result.fit_seconds:7.2f}s  score {result.score_seconds:6.2f}s")
        if name == "nsl-kdd" and OURS in methods and full_nsl:
            full = time_full_nsl_kdd(dataset, config)
            cost.update(all_normal_rows=full["rows"], all_normal_seconds=full["seconds"])
            log(f"{name:24s} {OURS} on all {full['rows']} normal rows: {full['seconds']:.2f}s")
    if "call_seconds" in cost and "all_normal_seconds" in cost:
        out.cost = cost
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="*", default=[], help="data set names (default: all found)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--train-previous", action="store_true",
                        help="train the previous default separately instead of deriving it from the same models")
    args = parser.parse_args(argv)

    from training.model import FitConfig
    from training.train import TrainConfig

    config = TrainConfig(fit=FitConfig(seed=0))
    got = run(args.datasets, args.methods, config, derive_previous=not args.train_previous)
    report = build_report(got.results, got.facts, config, got.grids, got.cost, got.unavailable)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "quality.md").write_text(render_markdown(report))
    print(f"wrote {args.out / 'quality.md'} and {args.out / 'quality.json'}")


if __name__ == "__main__":
    main()
