"""Compare autoencoder settings through the product API, on the splits and metrics of benchmarks.quality.

Run::

    .venv/bin/python -m benchmarks.ae_variants [--variants default weighting=none] [--datasets ...] [--json out.json]

Each variant is a `TrainConfig`; it is trained and scored exactly as `benchmarks.quality` does (bundle,
SavedModel signature). Prints one line per run and, at the end, a Markdown table of mean ROC-AUC/PR-AUC.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from benchmarks.quality import Product, Result, find_datasets, one_class_split, run_method, shared_data_dir
from training.model import FitConfig
from training.train import TrainConfig

VARIANTS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    "weighting=none": TrainConfig(weighting="none"),
    "epochs=200,patience=15": TrainConfig(fit=FitConfig(epochs=200, patience=15)),
    "lr=3e-3": TrainConfig(fit=FitConfig(learning_rate=3e-3)),
    "batch=64": TrainConfig(fit=FitConfig(batch_size=64)),
    "hidden=(64,32,8)": TrainConfig(fit=FitConfig(hidden=(64, 32, 8))),
    "hidden=(32,4)": TrainConfig(fit=FitConfig(hidden=(32, 4))),
    "hidden=(64,4)": TrainConfig(fit=FitConfig(hidden=(64, 4))),
    "hidden=(32,2),ensemble=3": TrainConfig(fit=FitConfig(hidden=(32, 2), ensemble=3)),
    "hidden=(32,3),ensemble=3": TrainConfig(fit=FitConfig(hidden=(32, 3), ensemble=3)),
    "hidden=(32,4),ensemble=3": TrainConfig(fit=FitConfig(hidden=(32, 4), ensemble=3)),
    "hidden=(32,2)": TrainConfig(fit=FitConfig(hidden=(32, 2))),
    "hidden=(32,3)": TrainConfig(fit=FitConfig(hidden=(32, 3))),
    "hidden=(64,16,4)": TrainConfig(fit=FitConfig(hidden=(64, 16, 4))),
    "none,batch=64": TrainConfig(weighting="none", fit=FitConfig(batch_size=64)),
    "none,epochs=200,patience=15": TrainConfig(weighting="none", fit=FitConfig(epochs=200, patience=15)),
    "none,batch=64,epochs=200,patience=15": TrainConfig(
        weighting="none", fit=FitConfig(batch_size=64, epochs=200, patience=15)),
}


def summary(rows: Sequence[tuple[str, Result]], datasets: Sequence[str]) -> str:
    """Markdown: one row per variant, ROC-AUC then PR-AUC per data set, then the means."""
    head = ["variant", *[f"ROC {d}" for d in datasets], "mean ROC", *[f"PR {d}" for d in datasets], "mean PR",
            "mean fit s"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for variant in dict.fromkeys(v for v, _ in rows):
        got = {r.dataset: r for v, r in rows if v == variant}
        roc = [got[d].roc_auc for d in datasets if d in got]
        pr = [got[d].pr_auc for d in datasets if d in got]
        cells = [*(f"{got[d].roc_auc:.3f}" if d in got else "" for d in datasets), f"**{np.mean(roc):.4f}**",
                 *(f"{got[d].pr_auc:.3f}" if d in got else "" for d in datasets), f"**{np.mean(pr):.4f}**",
                 f"{np.mean([r.fit_seconds for r in got.values()]):.1f}"]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--datasets", nargs="*", default=[], help="data set names (default: all found)")
    parser.add_argument("--json", type=Path, help="also write every run as JSON here")
    args = parser.parse_args(argv)

    loaders = find_datasets(shared_data_dir())
    names = args.datasets or list(loaders)
    rows: list[tuple[str, Result]] = []
    for name in names:
        dataset = loaders[name]()
        split = one_class_split(dataset.is_anomaly)
        for variant in args.variants:
            with tempfile.TemporaryDirectory(prefix="bench-variant-") as tmp:
                result = run_method(Product(VARIANTS[variant], Path(tmp)), "detector", dataset, split)
            rows.append((variant, result))
            print(f"{name:24s} {variant:40s} ROC-AUC {result.roc_auc:.4f}  PR-AUC {result.pr_auc:.4f}  "
                  f"fit {result.fit_seconds:6.1f}s", flush=True)
            if args.json:
                args.json.write_text(json.dumps([{"variant": v, **asdict(r)} for v, r in rows], indent=1))
    print(summary(rows, names))


if __name__ == "__main__":
    main()
