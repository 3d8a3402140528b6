"""Compare rules that combine the reconstruction and the nearest-neighbour terms, from `benchmarks.parts_cache`.

Run::

    .venv/bin/python -m benchmarks.combine /tmp/parts [--tag ae]

Prints mean ROC-AUC / PR-AUC over the cached data sets for each rule, and the leave-one-set-out result of
choosing the rule's weight on the other sets (by mean ROC-AUC + PR-AUC).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

Parts = dict[str, np.ndarray]


def scale(values: np.ndarray, q: float) -> float:
    """A positive scale of validation-normal values: their q-quantile, or their mean where that is 0."""
    s = float(np.quantile(values, q))
    return s if s > 0 else max(float(np.mean(values)), 1e-12)


def terms(p: Parts, bank: str, k: int, kind: str, q: float) -> tuple[np.ndarray, np.ndarray]:
    """(reconstruction, distance) test terms, each divided by its scale on the validation normals."""
    def knn(split: str) -> np.ndarray:
        d = p[f"knn{bank}_{split}"]
        return d[:, :k].mean(axis=1) if kind == "mean" else d[:, k - 1]
    ae = p["ae_test"] / scale(p["ae_val"], q)
    dist = knn("test") / scale(knn("val"), q)
    return ae, dist


def rules() -> dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    out: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
        "ae": lambda a, d: a, "knn": lambda a, d: d, "max": np.maximum}
    for w in (0.5, 0.6, 0.7, 0.8, 0.9):
        out[f"lin{w}"] = _linear(w)
        out[f"log{w}"] = _log_linear(w)
    return out


def _linear(w: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda a, d: (1 - w) * a + w * d


def _log_linear(w: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return lambda a, d: (1 - w) * np.log(a + 1e-3) + w * np.log(d + 1e-3)


def metrics(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    return float(roc_auc_score(y, s)), float(average_precision_score(y, s))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache", type=Path)
    parser.add_argument("--tag", default="ae")
    args = parser.parse_args()
    files = sorted(args.cache.glob(f"*.{args.tag}.npz"))
    data = {f.name.split(".")[0]: dict(np.load(f)) for f in files}
    names = list(data)
    print(f"{len(names)} sets")
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for bank in ("2048", "4096", "8192", "20000"):
        for k in (1, 3, 5, 10):
            for kind in ("kth", "mean"):
                for q in (0.5, 0.9):
                    for rname, rule in rules().items():
                        key = f"b{bank} k{k} {kind} q{q} {rname}"
                        res = {}
                        for n in names:
                            p = data[n]
                            b = bank if f"knn{bank}_val" in p else "20000"
                            a, d = terms(p, b, k, kind, q)
                            res[n] = metrics(p["y_test"], rule(a, d))
                        results[key] = res
    summary = {key: (np.mean([v[0] for v in r.values()]), np.mean([v[1] for v in r.values()]))
               for key, r in results.items()}
    for key, (roc, pr) in sorted(summary.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:40]:
        print(f"{key:40s} ROC {roc:.4f} PR {pr:.4f}")
    for key in ("b4096 k5 kth q0.5 ae", "b20000 k5 kth q0.5 knn", "b4096 k5 kth q0.5 knn",
                "b4096 k5 mean q0.5 knn", "b4096 k5 mean q0.5 max", "b4096 k5 mean q0.5 lin0.8"):
        print(f"{key:40s} ROC {summary[key][0]:.4f} PR {summary[key][1]:.4f}")
    # leave one set out over every configuration
    loso = []
    for held in names:
        best = max(results, key=lambda key: sum(results[key][n][0] + results[key][n][1] for n in names if n != held))
        loso.append((held, best, *results[best][held]))
    print(f"LOSO mean ROC {np.mean([x[2] for x in loso]):.4f} PR {np.mean([x[3] for x in loso]):.4f}")
    for row in loso:
        print(f"  {row[0]:20s} {row[1]:36s} {row[2]:.4f} {row[3]:.4f}")


if __name__ == "__main__":
    main()
