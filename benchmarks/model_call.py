"""Seconds of one model call (the bundle's SavedModel signature via `Scorer.score`) on a batch of rows.

Run::

    .venv/bin/python -m benchmarks.model_call --model models/nsl --data data.csv [--rows 1000] [--repeats 200]

Encodes `--rows` rows of `--data` with the bundle's schema once, then times `--repeats` calls after one
warm-up call and prints the median, the 10th percentile and the minimum in milliseconds. On a shared
machine the minimum is the closest to the cost of the call itself; the median includes other load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from training.bundle import load_bundle
from training.data import encode_frame, read_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    bundle = load_bundle(args.model)
    frame = read_frame(args.data).head(args.rows)
    matrix = encode_frame(bundle.schema, frame, args.data)
    scorer = bundle.scorer
    scorer.score(matrix)
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        scorer.score(matrix)
        times.append(time.perf_counter() - started)
    ms = 1000 * np.asarray(times)
    size = sum(p.stat().st_size for p in args.model.rglob("*") if p.is_file())
    print(json.dumps({"rows": len(matrix), "fields": len(bundle.schema.fields), "inputs": bundle.schema.width,
                      "median_ms": round(float(np.median(ms)), 2), "p10_ms": round(float(np.quantile(ms, 0.1)), 2),
                      "min_ms": round(float(ms.min()), 2), "bundle_bytes": size,
                      "bank_rows": bundle.manifest.training.get("bank_rows")}))


if __name__ == "__main__":
    main()
