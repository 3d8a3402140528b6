"""Training on more rows than memory: `anomaly-train` of this tree against an earlier commit, on one generated file.

Run::

    .venv/bin/python -m benchmarks.large_training --before <commit> [--rows 20000000] [--dir /tmp/large-training]

1. Generate `--rows` NSL-KDD-like rows into a Parquet file under `--dir` (not in the repository), a million
   rows at a time: rows of data/sample/nsl-kdd-sample.csv drawn with replacement, counts and byte sizes
   scaled by log-normal noise, rates jittered within [0, 1]. An existing file with that many rows is reused.
2. Check out `--before` as a git worktree (/tmp/main-before) and run its `anomaly-train` with this venv,
   `PYTHONPATH` set to that worktree (each run prints `training.__file__`, checked against the tree meant).
3. Run `anomaly-train` of `--before`, then of this tree, on the same file with the same flags. The model is
   kept small (`--epochs 2 --ensemble 1 --batch-size 1024`): the benchmark measures data handling, not
   model quality.
4. Each run is one child process, watched every 0.2 s: killed when its resident memory passes `--rss-limit-gib`
   (the machine is protected) or when it runs past `--time-limit-s`. Peak RSS is the kernel's (`wait4`'s
   ru_maxrss), time is wall time.
5. Print a Markdown table and write `large-training.json` into `--dir`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "nsl-kdd-sample.csv"
TRAIN_FLAGS = ["--label-column", "label", "--normal-value", "normal", "--drop", "difficulty",
               "--epochs", "2", "--ensemble", "1", "--batch-size", "1024", "--seed", "0"]
#: The child's entry: say which `training` package runs, then `anomaly-train`.
ENTRY = ("import sys, training; print('training from', training.__file__, flush=True); "
         "from training.cli import train_main; sys.exit(train_main(sys.argv[1:]))")
GENERATE_CHUNK = 1_000_000


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """NSL-KDD-like rows, written a chunk at a time (memory: one chunk)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = pd.read_csv(SAMPLE)
    numeric = [c for c in base.columns if c not in ("protocol_type", "service", "flag", "label", "difficulty")]
    binary = [c for c in numeric if set(base[c].unique()) <= {0, 1}]
    rates = [c for c in numeric if c.endswith("rate")]
    counts = [c for c in numeric if c not in binary and c not in rates]
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    writer = None
    try:
        for start in range(0, rows, GENERATE_CHUNK):
            n = min(GENERATE_CHUNK, rows - start)
            chunk = base.iloc[rng.integers(0, len(base), n)].reset_index(drop=True)
            for c in counts:
                chunk[c] = np.round(chunk[c].to_numpy() * rng.lognormal(0.0, 0.1, n)).astype(np.int64)
            for c in rates:
                chunk[c] = np.round(np.clip(chunk[c].to_numpy() + rng.normal(0.0, 0.02, n), 0.0, 1.0), 2)
            table = pa.Table.from_pandas(chunk, preserve_index=False)
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table, row_group_size=GENERATE_CHUNK)
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)


def parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows if path.exists() else 0


@dataclass(frozen=True)
class Run:
    code: str
    commit: str
    training_from: str
    outcome: str
    exit_code: int | None
    seconds: float
    peak_rss_gib: float
    log_head: list[str]
    log_tail: list[str]


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(code: str, tree: Path, commit: str, data: Path, out: Path, rss_limit: float, time_limit: float) -> Run:
    """One `anomaly-train` run in a child process, watched (module doc, step 4)."""
    env = {**os.environ, "PYTHONPATH": str(tree), "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = out.with_suffix(".log")
    with log.open("w") as fh:
        child = subprocess.Popen([sys.executable, "-c", ENTRY, "--data", str(data), "--out", str(out), *TRAIN_FLAGS],
                                 cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT)
        started = time.monotonic()
        outcome = ""
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            seconds = time.monotonic() - started
            rss = _rss_bytes(child.pid)
            if not outcome and rss > rss_limit * 2**30:
                outcome = f"killed by the watchdog at {rss / 2**30:.1f} GiB RSS after {seconds:.0f} s"
                os.kill(child.pid, signal.SIGKILL)
            elif not outcome and seconds > time_limit:
                outcome = f"killed at the time limit ({time_limit:.0f} s)"
                os.kill(child.pid, signal.SIGKILL)
            time.sleep(0.2)  # polling a child's memory, not synchronising with it
        seconds = time.monotonic() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    lines = log.read_text(errors="replace").splitlines()
    origin = next((line.split("training from ", 1)[1] for line in lines if line.startswith("training from ")), "")
    if not outcome:
        outcome = "trained" if child.returncode == 0 else f"failed (exit {child.returncode})"
    return Run(code, commit, origin, outcome, child.returncode, round(seconds, 1),
               round(usage.ru_maxrss * 1024 / 2**30, 2), lines[:4], lines[-10:])


def worktree(commit: str, path: Path) -> Path:
    if not (path / "training" / "cli.py").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit], check=True,
                       stdout=subprocess.DEVNULL)
    head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
    wanted = subprocess.run(["git", "-C", str(ROOT), "rev-parse", commit], check=True, capture_output=True, text=True)
    if head.stdout != wanted.stdout:
        raise SystemExit(f"{path} holds {head.stdout.strip()}, not {commit}; remove it (git worktree remove)")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the commit to compare with (today's main)")
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--dir", type=Path, default=Path("/tmp/large-training"))
    p.add_argument("--rss-limit-gib", type=float, default=12.0)
    p.add_argument("--time-limit-s", type=float, default=1800.0)
    args = p.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    data = args.dir / f"nsl-kdd-{args.rows}.parquet"
    if parquet_rows(data) != args.rows:
        started = time.monotonic()
        generate(data, args.rows)
        print(f"generated {args.rows} rows into {data} ({data.stat().st_size / 2**30:.2f} GiB) "
              f"in {time.monotonic() - started:.0f} s", flush=True)
    before = worktree(args.before, Path("/tmp/main-before"))
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    runs = []
    for code, tree, commit in (("before", before, args.before), ("after", ROOT, head.stdout.strip())):
        run = measure(code, tree, commit, data, args.dir / f"bundle-{code}", args.rss_limit_gib, args.time_limit_s)
        if not run.training_from.startswith(str(tree)):
            raise SystemExit(f"the {code} run imported training from {run.training_from!r}, not {tree}")
        print(f"{code}: {run.outcome}, {run.seconds} s, peak RSS {run.peak_rss_gib} GiB", flush=True)
        runs.append(run)
    report = {"rows": args.rows, "file": str(data), "file_gib": round(data.stat().st_size / 2**30, 2),
              "flags": TRAIN_FLAGS, "rss_limit_gib": args.rss_limit_gib, "time_limit_s": args.time_limit_s,
              "cpus": os.cpu_count(), "runs": [asdict(run) for run in runs]}
    (args.dir / "large-training.json").write_text(json.dumps(report, indent=2))
    print("\n| code | commit | outcome | wall time (s) | peak RSS (GiB) |\n|---|---|---|---:|---:|")
    for run in runs:
        print(f"| {run.code} | {run.commit[:8]} | {run.outcome} | {run.seconds} | {run.peak_rss_gib} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
