"""Cache the parts of candidate detectors on every dev set, so combination rules can be compared offline.

Run::

    nice .venv/bin/python -m benchmarks.parts_cache --out /tmp/parts [--datasets ...] [--hidden 32,2]

For each data set, on the splits of `benchmarks.quality` and the product's own 70/15/15 cut of the train
rows, this encodes rows with the product schema, trains the product autoencoder members (`training.model.fit`)
and stores, for the validation and the test rows: the weighted reconstruction error, and the distance to
the k-th nearest bank row (k = 1..10) for several bank sizes (bank = train rows, subsampled). One `.npz`
per data set; `benchmarks.combine` reads them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, cast

import numpy as np

from benchmarks.quality import find_datasets, one_class_split, shared_data_dir
from training.data import infer_kinds, raw_columns
from training.features import CATEGORICAL, fit_schema
from training.model import FitConfig, fit
from training.train import feature_weights, split_normals

BANKS = (1024, 2048, 4096, 8192, 20_000)
KS = 10


def kth_distances(rows: np.ndarray, bank: np.ndarray, ks: int = KS) -> np.ndarray:
    """Sorted squared Euclidean distances to the `ks` nearest bank rows, shape (n, ks)."""
    bank_sq = (bank.astype(np.float64) ** 2).sum(axis=1)
    out = []
    for start in range(0, len(rows), 2048):
        chunk = rows[start:start + 2048].astype(np.float64)
        d = (chunk ** 2).sum(axis=1)[:, None] - 2 * chunk @ bank.T.astype(np.float64) + bank_sq[None, :]
        out.append(np.sort(np.partition(np.maximum(d, 0), ks - 1, axis=1)[:, :ks], axis=1))
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--datasets", nargs="*", default=[])
    parser.add_argument("--hidden", default="32,2")
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--tag", default="ae")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    loaders = find_datasets(shared_data_dir())
    for name in args.datasets or list(loaders):
        target = args.out / f"{name}.{args.tag}.npz"
        if target.exists():
            continue
        started = time.perf_counter()
        dataset = loaders[name]()
        split = one_class_split(dataset.is_anomaly)
        train = dataset.frame.iloc[split.train].reset_index(drop=True)
        test = dataset.frame.iloc[split.test].reset_index(drop=True)
        kinds = infer_kinds(train, list(dataset.categorical))
        cut = split_normals(len(train), 0, with_test=False)
        cols = raw_columns(train, kinds, Path(name))
        schema = fit_schema({k: v[cut.train] for k, v in cols.items()},
                            [k for k, kind in kinds.items() if kind == CATEGORICAL])
        matrix = schema.encode(cols).matrix
        test_matrix = schema.encode(raw_columns(test, kinds, Path(name))).matrix
        fit_rows, val_rows = matrix[cut.train], matrix[cut.validation]
        hidden = tuple(int(h) for h in args.hidden.split(","))
        fitted = fit(fit_rows, val_rows, FitConfig(hidden=hidden, seed=0, noise=args.noise))
        parts: dict[str, np.ndarray] = {"y_test": split.y_test}

        def recon_errors(rows: np.ndarray, models: list[Any] = fitted.models) -> np.ndarray:
            return np.mean([(rows - m.predict(rows, batch_size=4096, verbose=0)) ** 2 for m in models], axis=0)

        val_err = recon_errors(val_rows)
        weights = feature_weights(val_err, "normalized")
        parts["ae_val"] = (val_err * weights).mean(axis=1)
        parts["ae_test"] = (recon_errors(test_matrix) * weights).mean(axis=1)
        rng = np.random.default_rng(0)
        for bank_size in BANKS:
            if bank_size > len(fit_rows) and bank_size != BANKS[-1]:
                continue
            bank = fit_rows[rng.permutation(len(fit_rows))[:bank_size]]
            parts[f"knn{bank_size}_val"] = kth_distances(val_rows, bank)
            parts[f"knn{bank_size}_test"] = kth_distances(test_matrix, bank)
        np.savez(target, **cast(dict[str, Any], parts))
        print(f"{name}: width {schema.width}, fit rows {len(fit_rows)}, {time.perf_counter() - started:.1f}s",
              flush=True)


if __name__ == "__main__":
    main()
