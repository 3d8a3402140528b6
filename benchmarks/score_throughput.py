"""anomaly-score throughput on a large CSV, against reading the same file in the same chunks (the I/O floor).

Run: .venv/bin/python -m benchmarks.score_throughput [--copies 8] [--out benchmarks/results]
Builds a CSV of NSL-KDD repeated `--copies` times, trains a bundle on NSL-KDD with the product defaults,
then times (a) `anomaly-score` on the file and (b) `pandas.read_csv` of the same file with the same
chunk size, both in fresh processes, and writes benchmarks/results/score_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
NSL_KDD = Path(os.environ.get("ANOMALY_SHARED_DATA", ROOT.parent / "shared" / "data")) / "nsl-kdd" / \
    "KDDTrain+_20Percent.csv"
BIN = Path(sys.executable).parent
CHUNK_ROWS = 50_000
READ_ONLY = f"""
import sys, time, pandas as pd
start = time.perf_counter()
rows = sum(len(c) for c in pd.read_csv(sys.argv[1], dtype=str, chunksize={CHUNK_ROWS}))
print(rows, time.perf_counter() - start)
"""


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, out.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="score-throughput-") as tmp:
        data = Path(tmp) / "events.csv"
        frame = pd.read_csv(NSL_KDD, dtype=str)
        pd.concat([frame] * args.copies, ignore_index=True).to_csv(data, index=False)
        model = Path(tmp) / "model"
        train_s, _ = timed([str(BIN / "anomaly-train"), "--data", str(NSL_KDD), "--out", str(model),
                            "--label-column", "label", "--normal-value", "normal", "--drop", "difficulty"])
        score_s, score_out = timed([str(BIN / "anomaly-score"), "--model", str(model), "--data", str(data),
                                    "--out", str(Path(tmp) / "scores.csv"), "--chunk-rows", str(CHUNK_ROWS)])
        read_s, read_out = timed([sys.executable, "-c", READ_ONLY, str(data)])
    rows = int(read_out.split()[0])
    inner = re.search(r"scored (\d+) rows in ([\d.]+) s", score_out)
    assert inner is not None and int(inner.group(1)) == rows, score_out
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "nproc": os.cpu_count(), "rows": rows,
        "train_seconds_nsl_kdd": round(train_s, 2),
        "score_process_seconds": round(score_s, 2), "score_rows_per_s_process": round(rows / score_s),
        "score_rows_per_s_reported": round(rows / float(inner.group(2))),
        "read_csv_process_seconds": round(read_s, 2), "read_csv_rows_per_s": round(rows / read_s),
    }
    result["ratio_score_to_read_csv"] = round(result["score_rows_per_s_process"] / result["read_csv_rows_per_s"], 3)
    a_rate, a2_rate = result["score_rows_per_s_process"], result["score_rows_per_s_reported"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "score_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "score_throughput.md").write_text(f"""# anomaly-score throughput

Run {result['date']} on {result['nproc']} CPUs; `python -m benchmarks.score_throughput --copies {args.copies}`.
File: NSL-KDD 20 % repeated {args.copies} times, {rows:,} rows, 41 fields + label + difficulty, CSV.
Chunks of {CHUNK_ROWS:,} rows. Each figure is one fresh process (TensorFlow import included for anomaly-score).

| | seconds | rows/s |
|---|---:|---:|
| (a) `anomaly-score` (read, validate, encode, score, write CSV) | {score_s:.2f} | **{a_rate:,}** |
| (a') the same, as the command reports it (after start-up) | {float(inner.group(2)):.2f} | {a2_rate:,} |
| (b) `pandas.read_csv` of the same file, same chunks (I/O floor) | {read_s:.2f} | {result['read_csv_rows_per_s']:,} |

(a)/(b) = **{result['ratio_score_to_read_csv']}**.
Training on NSL-KDD (13,449 normal rows; product defaults, ensemble of 3): {train_s:.1f} s for the whole
`anomaly-train` process.
""")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
