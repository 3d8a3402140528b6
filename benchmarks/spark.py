"""training.spark.score in local mode against anomaly-score, on the same file and bundle, and their parity.

Run: .venv/bin/python -m benchmarks.spark [--copies 40] [--cores 2] [--out benchmarks/results]
Builds a CSV of NSL-KDD repeated `--copies` times with an `event_id` column, trains a bundle on NSL-KDD with
the product defaults (or takes `--model`), then times (a) `anomaly-score --passthrough event_id` on the file
in a fresh process and (b) `training.spark.score(df, model, ["event_id"])` in `local[N]`, reading the same
CSV with the bundle's field types and writing CSV, and checks that every row got the same score, flag, top
feature and share. Writes benchmarks/results/spark.md (and spark.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.score_throughput import NSL_KDD, timed
from training.cli import SCORE_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def write_events(path: Path, copies: int) -> int:
    """NSL-KDD 20 % repeated `copies` times, with a unique `event_id` first; returns the row count."""
    frame = pd.read_csv(NSL_KDD, dtype=str)
    rows = pd.concat([frame] * copies, ignore_index=True)
    rows.insert(0, "event_id", range(len(rows)))
    rows.to_csv(path, index=False)
    return len(rows)


def spark_run(model: Path, data: Path, out: Path, cores: int) -> dict[str, Any]:
    """Seconds to start a local[cores] session, and to read, score and write the file as CSV."""
    from pyspark.sql import SparkSession

    from training.bundle import load_bundle
    from training.contract import NUMERIC
    from training.repository import resolve_model
    from training.spark import score

    os.environ["PYSPARK_PYTHON"] = sys.executable
    started = time.perf_counter()
    spark = (SparkSession.builder.master(f"local[{cores}]").appName("benchmarks.spark")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", str(cores))
             .config("spark.driver.memory", "2g").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    session_s = time.perf_counter() - started
    kinds = load_bundle(resolve_model(model)).schema.kinds
    header = pd.read_csv(data, nrows=0).columns
    types = {"event_id": "long", **{name: "double" if kinds.get(name) == NUMERIC else "string" for name in header
                                    if name != "event_id"}}
    ddl = ", ".join(f"`{name}` {types[name]}" for name in header)
    df = spark.read.csv(str(data), header=True, schema=ddl)
    seconds = []
    for attempt in ("cold", "warm"):  # warm: the Python workers, TensorFlow and the bundle are loaded already
        started = time.perf_counter()
        score(df, model, ["event_id"]).write.csv(str(out / attempt), header=True)
        seconds.append(time.perf_counter() - started)
    partitions = df.rdd.getNumPartitions()
    batch_rows = int(spark.conf.get("spark.sql.execution.arrow.maxRecordsPerBatch") or 0)
    spark.stop()
    return {"session_seconds": session_s, "job_seconds": seconds[0], "warm_job_seconds": seconds[1],
            "partitions": partitions, "arrow_batch_rows": batch_rows}


WORKER_RSS = """
import resource, sys, numpy as np
from training.repository import load_model
bundle = load_model(sys.argv[1])
bundle.scorer.score(np.zeros((10_000, bundle.schema.width), np.float32))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def worker_rss_mib(model: Path) -> float:
    """Peak memory of a process that does what each Python worker does: import, load the bundle, score a batch."""
    return float(timed([sys.executable, "-c", WORKER_RSS, str(model)])[1].split()[-1])


def parity(cli_csv: Path, spark_dir: Path) -> dict[str, int]:
    """Rows whose score columns differ between anomaly-score's CSV and Spark's, as anomaly-score writes them."""
    cli = pd.read_csv(cli_csv, dtype=str, keep_default_na=False).set_index("event_id")
    parts = sorted(spark_dir.glob("part-*.csv"))
    spark = pd.concat([pd.read_csv(p, dtype={"event_id": str, "top_feature": str}) for p in parts])
    spark = spark.set_index("event_id").loc[cli.index]
    written = pd.DataFrame({"score": [f"{s:.9g}" for s in spark["score"]],
                            "is_anomaly": spark["is_anomaly"].astype(str).to_numpy(),
                            "top_feature": spark["top_feature"].to_numpy(),
                            "top_feature_share": [f"{s:.4f}" for s in spark["top_feature_share"]]}, index=cli.index)
    return {"rows": len(cli), "spark_rows": len(spark), **{
        f"differ_{name}": int((written[name] != cli[name]).sum()) for name in SCORE_COLUMNS}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=40, help="NSL-KDD 20 %% copies (40: about a million rows)")
    p.add_argument("--cores", type=int, default=2, help="Spark's local[N]")
    p.add_argument("--model", type=Path, help="bundle or repository to score with (default: train one)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="spark-bench-") as tmp:
        data = Path(tmp) / "events.csv"
        rows = write_events(data, args.copies)
        model, train_s = args.model, None
        if model is None:
            model = Path(tmp) / "model"
            train_s, _ = timed([str(BIN / "anomaly-train"), "--data", str(NSL_KDD), "--out", str(model),
                                "--label-column", "label", "--normal-value", "normal", "--drop", "difficulty"])
        cli_csv = Path(tmp) / "scores.csv"
        score_s, score_out = timed([str(BIN / "anomaly-score"), "--model", str(model), "--data", str(data),
                                    "--out", str(cli_csv), "--passthrough", "event_id"])
        inner = re.search(r"scored (\d+) rows in ([\d.]+) s", score_out)
        assert inner is not None and int(inner.group(1)) == rows, score_out
        run = spark_run(model, data, Path(tmp) / "spark-scores", args.cores)
        same = parity(cli_csv, Path(tmp) / "spark-scores" / "cold")
        warm_same = parity(cli_csv, Path(tmp) / "spark-scores" / "warm")
        rss = worker_rss_mib(model)
    result: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "nproc": os.cpu_count(), "rows": rows,
        "cores": args.cores, "train_seconds": None if train_s is None else round(train_s, 2),
        "anomaly_score_process_seconds": round(score_s, 2), "anomaly_score_reported_seconds": float(inner.group(2)),
        "anomaly_score_rows_per_s": round(rows / score_s),
        "anomaly_score_rows_per_s_reported": round(rows / float(inner.group(2))),
        "spark_session_seconds": round(run["session_seconds"], 2), "spark_job_seconds": round(run["job_seconds"], 2),
        "spark_partitions": run["partitions"], "arrow_batch_rows": run["arrow_batch_rows"],
        "spark_rows_per_s": round(rows / run["job_seconds"]),
        "spark_rows_per_s_with_session": round(rows / (run["job_seconds"] + run["session_seconds"])),
        "spark_warm_job_seconds": round(run["warm_job_seconds"], 2),
        "spark_warm_rows_per_s": round(rows / run["warm_job_seconds"]),
        "python_worker_peak_rss_mib": round(rss), "parity": same, "parity_warm": warm_same,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
    }
    write_report(result, args)
    print(json.dumps(result, indent=2))


def write_report(r: dict[str, Any], args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "spark.json").write_text(json.dumps(r, indent=2) + "\n")
    same = r["parity"]
    differ = sum(v for run in (same, r["parity_warm"]) for k, v in run.items() if k.startswith("differ_"))
    ratio = r["spark_rows_per_s"] / r["anomaly_score_rows_per_s"]
    warm = r["spark_warm_rows_per_s"] / r["anomaly_score_rows_per_s"]
    lines = [
        ("`anomaly-score` process (TensorFlow import included)", r["anomaly_score_process_seconds"],
         f"**{r['anomaly_score_rows_per_s']:,}**"),
        ("`anomaly-score` as it reports itself (after start-up)", r["anomaly_score_reported_seconds"],
         f"{r['anomaly_score_rows_per_s_reported']:,}"),
        (f"`training.spark.score` in `local[{r['cores']}]`: read, score, write (Python workers' start and "
         f"bundle load included)", r["spark_job_seconds"], f"**{r['spark_rows_per_s']:,}**"),
        ("the same again in the same session (workers warm)", r["spark_warm_job_seconds"],
         f"{r['spark_warm_rows_per_s']:,}"),
        (f"the first with the session's start ({r['spark_session_seconds']:.1f} s)",
         r["spark_job_seconds"] + r["spark_session_seconds"], f"{r['spark_rows_per_s_with_session']:,}"),
    ]
    table = "\n".join(f"| {what} | {seconds:.2f} | {rate} |" for what, seconds, rate in lines)
    (args.out / "spark.md").write_text(f"""# training.spark.score against anomaly-score

Run {r['date']} on {r['nproc']} CPUs (1-minute load average {r['load_average_1m_at_end']} at the end);
`python -m benchmarks.spark --copies {args.copies} --cores {r['cores']}`.
File: NSL-KDD 20 % repeated {args.copies} times with an `event_id`, {r['rows']:,} rows, CSV; the bundle is
{'given by --model' if r['train_seconds'] is None else
f"trained on NSL-KDD with the product defaults (ensemble of 3, {r['train_seconds']:.0f} s)"}.
Both score every row with `event_id` passed through and write CSV.
Spark reads the CSV with the bundle's types (numeric fields double, the others string) in
{r['spark_partitions']} partitions, Arrow batches of {r['arrow_batch_rows']:,} rows (Spark's default).

| | seconds | rows/s |
|---|---:|---:|
{table}

Spark / `anomaly-score` (process): **{ratio:.2f}x** (first job), {warm:.2f}x (warm job).
Parity: {same['rows']:,} rows from `anomaly-score`, {same['spark_rows']:,} from each Spark run; rows whose
score (as `%.9g`), flag, top feature or share (`%.4f`) differ, over both runs: **{differ}**.
Each Python worker (one per core) imports TensorFlow and holds the bundle: a process doing the same (import,
load, score one 10,000-row batch) peaks at {r['python_worker_peak_rss_mib']:,} MiB.
""")


if __name__ == "__main__":
    main()
