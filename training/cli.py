"""Console scripts: anomaly-train, anomaly-score, anomaly-evaluate. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import csv
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from training.errors import AnomalyError, ConfigError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so every cleanup (temporary folders, partial outputs) runs."""


def _run(prog: str, body: Callable[[], int]) -> int:
    terminated: list[str] = []

    def on_sigterm(signum: int, _frame: FrameType | None) -> None:
        terminated.append(signal.Signals(signum).name)
        raise Terminated(terminated[0])

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return body()
    except BaseException as exc:
        # A SIGTERM that lands inside TensorFlow's graph tracing can surface as another exception (a SystemError
        # from C code the handler interrupted); the cleanup ran as it unwound all the same, so report the signal.
        if terminated or isinstance(exc, KeyboardInterrupt):
            print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
            return 143 if terminated else 130
        if isinstance(exc, AnomalyError):
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return 2
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


#: The columns anomaly-score writes after the passthrough ones; an existing --out must end with them (or with
#: them and EXPLANATION, which a model with window features adds: the top feature in words).
SCORE_COLUMNS = ["score", "is_anomaly", "top_feature", "top_feature_share"]
EXPLANATION = "explanation"


def check_score_output(out: Path, data: Path) -> None:
    """--out may be new or an earlier anomaly-score output, never the input or a file we did not write."""
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; name a CSV file, e.g. --out {out / 'scores.csv'}")
    if not out.exists():
        return
    if data.exists() and out.samefile(data):
        raise ConfigError(f"--out {out} is the input file; write the scores to another file")
    with out.open("r", errors="replace") as fh:
        header = fh.readline().strip().split(",")
    if SCORE_COLUMNS not in (header[-len(SCORE_COLUMNS):], header[-len(SCORE_COLUMNS) - 1:-1]):
        raise ConfigError(f"--out {out} exists and was not written by anomaly-score; choose another file, or "
                          f"move it away first")


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 64,16, got {text!r}") from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"hidden sizes must be positive, got {text!r}")
    return sizes


def train_parser() -> argparse.ArgumentParser:
    from training.sample import DEFAULT_MAX_ROWS

    p = argparse.ArgumentParser(prog="anomaly-train", description="Train an autoencoder bundle from an event file.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path,
                        help="CSV (with header), JSON Lines, Parquet or Avro file, a quoted glob of such files "
                             "('flows/*.parquet'), or a partitioned Parquet folder (name=value subfolders)")
    source.add_argument("--from-kafka", action="store_true",
                        help="train on a bounded window of JSON events from --topic (same data contract as files)")
    p.add_argument("--topic", help="with --from-kafka: the topic to read")
    p.add_argument("--max-events", type=int, default=100_000, help="with --from-kafka: at most this many events")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                   help=f"with --data: train on a seeded uniform sample of at most this many normal rows, read in "
                        f"chunks (default {DEFAULT_MAX_ROWS:,}; docs/training.md)")
    p.add_argument("--since", help="with --from-kafka: start at this time (ISO-8601) or this long ago (24h, 7d)")
    from worker.config import add_security_arguments, add_value_arguments

    def kafka_flag(flag: str, **kw: Any) -> None:
        p.add_argument(flag, **{**kw, "help": f"with --from-kafka: {kw['help']}"})

    add_security_arguments(kafka_flag, with_servers=True)
    add_value_arguments(kafka_flag)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=Path, help="bundle directory to write (replaced atomically)")
    where.add_argument("--repo", type=Path, help="model repository: write a new version under REPO/versions/")
    p.add_argument("--promote", action="store_true", help="with --repo: make the new version current")
    p.add_argument("--label-column", help="column that labels rows; only normal rows are trained on")
    p.add_argument("--normal-value", help="label value of normal rows (required with --label-column)")
    p.add_argument("--drop", nargs="+", default=[], metavar="COL", help="columns to ignore (ids, timestamps)")
    p.add_argument("--categorical", nargs="+", default=[], metavar="COL",
                   help="columns to one-hot encode (default: columns that are mostly non-numeric text)")
    p.add_argument("--epochs", type=int, default=60, help="maximum epochs (early stopping usually ends sooner)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ensemble", type=int, default=3,
                   help="autoencoders trained with consecutive seeds and averaged in one model (default 3)")
    p.add_argument("--hidden", type=_hidden, help="encoder layer sizes, e.g. 64,16 (default: from input width)")
    p.add_argument("--weighting", choices=["normalized", "none"], default="normalized",
                   help="weight each input's error by 1/its typical error on normal rows (default) or not")
    # The score's settings (training.model.ScoreConfig; docs/preprocessing.md); None keeps its default.
    p.add_argument("--distance-weight", type=float,
                   help="share of the distance to the nearest normal training rows in the score, 0-1 (default "
                        "0.9); 0 scores by the autoencoders' reconstruction error alone")
    p.add_argument("--neighbours", type=int, help="nearest normal rows the distance is averaged over (default 1)")
    p.add_argument("--bank-rows", type=int,
                   help="most normal training rows kept to search for neighbours (default 4096, fewer for wide "
                        "schemas); every scored event is compared with each, so fewer rows score faster")
    w = p.add_argument_group("per-entity window features (docs/windows.md)")
    w.add_argument("--entity", action="append", default=[], metavar="FIELD[+FIELD]",
                   help="an entity the windows follow, e.g. src_host or id.orig_h+id.resp_h; repeat for several")
    w.add_argument("--window", action="append", default=[], metavar="DURATION",
                   help="a window length, e.g. 2s, 60s, 5m, 1d; repeat for several")
    w.add_argument("--event-time", metavar="FIELD",
                   help="the field holding each event's time (epoch seconds or ISO 8601); with --from-kafka, "
                        "@record means the Kafka record's timestamp")
    w.add_argument("--window-field", action="append", default=[], metavar="FIELD",
                   help="summarise only these fields in the windows (default: every feature field); repeatable")
    w.add_argument("--window-grace", type=float, metavar="SECONDS",
                   help="how late an event may arrive and still be windowed at its own time (default 10)")
    t = p.add_mutually_exclusive_group()
    t.add_argument("--target-fpr", type=float, help="threshold for this false-positive rate on normal rows "
                                                    "(default 0.01)")
    t.add_argument("--threshold-quantile", type=float, help="threshold at this quantile of normal scores")
    t.add_argument("--threshold", type=float, help="use this score as the threshold")
    return p


def train_main(argv: Sequence[str] | None = None) -> int:
    args = train_parser().parse_args(argv)

    def body() -> int:
        from training.data import Labels
        from training.model import FitConfig, ScoreConfig
        from training.repository import Destination, promote
        from training.threshold import ThresholdConfig
        from training.train import TrainConfig, train_file, window_options

        if (args.label_column is None) != (args.normal_value is None):
            raise ConfigError("--label-column and --normal-value go together")
        if args.promote and args.repo is None:
            raise ConfigError("--promote needs --repo (a bundle written with --out is used as it is)")
        destination = Destination(args.repo, repository=True) if args.repo else Destination(args.out)
        destination.check()  # before reading any data (a Kafka window too): refused in a second, not after training
        config = TrainConfig(
            fit=FitConfig(hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size,
                          learning_rate=args.learning_rate, seed=args.seed,
                          ensemble=args.ensemble),
            threshold=ThresholdConfig(target_fpr=args.target_fpr, quantile=args.threshold_quantile,
                                      manual=args.threshold),
            score=ScoreConfig(**{name: value for name in ("distance_weight", "neighbours", "bank_rows")
                                 if (value := getattr(args, name)) is not None}),
            categorical=tuple(args.categorical), drop=tuple(args.drop), weighting=args.weighting,
            labels=Labels(args.label_column, args.normal_value) if args.label_column else None,
            windows=window_options(args.entity, args.window, args.event_time, args.window_field, args.window_grace),
            max_rows=args.max_rows)
        log = lambda line: print(line, flush=True)  # noqa: E731
        if args.from_kafka:
            result = train_from_kafka(args, destination, config, log)
        else:
            if any((args.bootstrap_servers, args.topic, args.since)):
                raise ConfigError("--bootstrap-servers, --topic and --since go with --from-kafka")
            result = train_file(args.data, destination, config, log=log)
        m = result.manifest
        print(f"\nmodel {m.model_version} written to {result.out_dir} in {result.seconds:.1f} s")
        if args.promote:
            promote(args.repo, m.model_version)
            print(f"  promoted: {args.repo} now serves {m.model_version}")
        print(f"  epochs run {m.training['epochs_run']} (best {m.training['best_epoch']}), "
              f"hidden {m.training['hidden']}, threshold {load_threshold(result.out_dir):.6g}")
        if "window_features" in m.training:
            outcomes = m.training["window_outcomes"]
            print(f"  window features {m.training['window_features']}: "
                  + (", ".join(f"{k} {v}" for k, v in outcomes.items()) + " (docs/windows.md)" if outcomes
                     else "every event windowed at its own time"))
        if result.evaluation is not None:
            e = result.evaluation
            print(f"  test: ROC-AUC {e.roc_auc:.4f}  PR-AUC {e.pr_auc:.4f}  precision {e.precision:.3f}  "
                  f"recall {e.recall:.3f}  F1 {e.f1:.3f}  (F1-optimal threshold {e.f1_optimal_threshold:.6g} "
                  f"gives F1 {e.f1_optimal:.3f})")
        print(f"  report: {result.out_dir / 'report' / 'report.html'}")
        return 0

    return _run("anomaly-train", body)


def train_from_kafka(args: argparse.Namespace, destination: Any, config: Any, log: Callable[[str], None]) -> Any:
    """anomaly-train --from-kafka: read the window, say what was skipped, train as from a file."""
    from training.kafka_window import parse_since, read_window, skip_contract_breaches
    from training.schema_registry import value_decoder
    from training.train import StreamOrder, train_frame
    from worker.config import env_fallback, values_from_args
    from worker.kafka.connection import Connection

    get = env_fallback(args, os.environ)
    if not get("bootstrap_servers") or not args.topic:
        raise ConfigError("--from-kafka needs --bootstrap-servers (or ANOMALY_BOOTSTRAP_SERVERS) and --topic")
    since = parse_since(args.since) if args.since else None
    window = read_window(Connection.from_args(get, client_id="anomaly-train"), args.topic, args.max_events, since,
                         decoder=value_decoder(values_from_args(get)))  # as the worker decodes
    ignored = [*config.drop, *([config.labels.column] if config.labels else [])]
    if config.windows is not None:  # window keys are not model fields: a bad value is missing, never a skip
        ignored += [name for name in config.windows.key_fields if name not in config.categorical]
    window = skip_contract_breaches(window, ignored, config.categorical, log)
    skipped = sum(window.skipped.values())
    log(f"{window.source}: {len(window.frame)} events read"
        + (f"; {skipped} records skipped ({', '.join(f'{k} {v}' for k, v in window.skipped.items())})"
           if skipped else ""))
    stream = StreamOrder(partitions=np.array([partition for partition, _ in window.positions]),
                         record_times_s=np.array([np.nan if t is None else t / 1000.0 for t in window.timestamps_ms]))
    return train_frame(window.frame, destination, config, window.sha256, source=Path(window.source), log=log,
                       stream=stream)


def window_summary(state: Any) -> str:
    counts = state.counts.take()
    return "window features: " + (", ".join(f"{k} {v}" for k, v in counts.items()) + " (docs/windows.md)"
                                  if counts else "every event windowed at its own time")


def top_feature_words(scorer: Any, scores: Any, columns: dict[str, np.ndarray], chunk: Any) -> list[str]:
    """Each row's top feature in words and original units (window features: "events from ... in the last 2s")."""
    from training.data import raw_values

    keys = [name for entity in scorer.windows.entities for name in entity if name not in columns]
    values = {**columns, **{name: raw_values(chunk[name]) for name in keys if name in chunk.columns}}
    observed = [{name: column[row] for name, column in values.items()} for row in range(len(chunk))]
    return [c.text or f"{c.field}: {c.observed}, expected {c.expected}"
            for [c] in scorer.explain_rows(scores, range(len(chunk)), observed, top_k=1)]


def load_threshold(path: Path) -> float:
    from training.bundle import load_bundle

    return load_bundle(path).threshold.value


def score_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anomaly-score", description="Score every row of a file with a bundle.")
    p.add_argument("--model", type=Path, required=True,
                   help="bundle directory written by anomaly-train, or a model repository (its current version)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="CSV to write: one row per input row, same order")
    p.add_argument("--passthrough", nargs="+", default=[], metavar="COL",
                   help="extra input columns (e.g. an id) to allow and copy to the output")
    p.add_argument("--chunk-rows", type=int, default=50_000, help="rows read and scored at a time")
    args = p.parse_args(argv)

    def body() -> int:
        from training.data import check_columns, check_passthrough, file_windows, frame_columns, iter_frames
        from training.repository import load_model

        check_score_output(args.out, args.data)
        bundle = load_model(args.model)
        scorer = bundle.scorer
        allowed = [*bundle.passthrough_columns, *args.passthrough]
        # A windowed model scores the file as a replay of it onto one partition: one state, rows in file order.
        windows = file_windows(bundle.windows)
        started, rows, anomalies = time.perf_counter(), 0, 0
        tmp = args.out.with_name(f".{args.out.name}.partial-{uuid.uuid4().hex[:8]}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tmp.open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow([*args.passthrough, *SCORE_COLUMNS, *([EXPLANATION] if windows else [])])
                for first_row, chunk in iter_frames(args.data, args.chunk_rows):
                    check_columns(chunk, bundle.schema, allowed, args.data, bundle.windows)
                    extra = check_passthrough(chunk, args.passthrough, args.data)
                    columns = frame_columns(bundle.schema, chunk, args.data, first_row, windows)
                    scores = scorer.score(bundle.schema.encode(columns).matrix)
                    flags = scores.score > bundle.threshold.value
                    totals = np.maximum(scores.field_errors.sum(axis=1), 1e-30)
                    shares = scores.field_errors.max(axis=1) / totals
                    words = top_feature_words(scorer, scores, columns, chunk) if windows else None
                    for i, (s, f, top, share) in enumerate(zip(scores.score, flags, scorer.top_fields(scores), shares,
                                                               strict=True)):
                        writer.writerow([*(col[i] for col in extra), f"{s:.9g}", int(f), top, f"{share:.4f}",
                                         *([words[i]] if words is not None else [])])
                    rows += len(chunk)
                    anomalies += int(flags.sum())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a half-written output must not look like a result
            raise
        tmp.replace(args.out)
        seconds = time.perf_counter() - started
        print(f"scored {rows} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} rows/s): "
              f"{anomalies} anomalies ({anomalies / max(rows, 1):.2%}) above threshold "
              f"{bundle.threshold.value:.6g}; model {bundle.version}; wrote {args.out}")
        if windows is not None:
            print(window_summary(windows))
        return 0

    return _run("anomaly-score", body)


EVALUATION_FILES = ("report.html", "scores.png", "roc.png", "pr.png", "confusion.png")


def check_report_dir(out: Path) -> None:
    """The report directory may be new or hold only an earlier evaluation report: we overwrite nothing else."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--report-dir {out} is a file; name a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in EVALUATION_FILES)
        if foreign:
            raise ConfigError(f"--report-dir {out} holds files the evaluation did not write ({', '.join(foreign[:3])});"
                              f" choose a new directory with --report-dir")


def promote_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anomaly-promote",
                                description="Make a version of a model repository current (workers follow it).")
    p.add_argument("--repo", type=Path, required=True, help="model repository written by anomaly-train --repo")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("version", nargs="?", help="version to make current (a folder name under REPO/versions/)")
    which.add_argument("--rollback", action="store_true", help="make the previously current version current again")
    which.add_argument("--list", action="store_true", help="list the versions, marking the current one")
    args = p.parse_args(argv)

    def body() -> int:
        from training.errors import BundleError
        from training.repository import VERSIONS, current_version, is_repository, promote, rollback

        if args.list:
            if not is_repository(args.repo):
                raise ConfigError(f"{args.repo} is not a model repository")
            try:
                current, refused = current_version(args.repo), None
            except BundleError as exc:  # list the versions to choose from all the same, then say what is wrong
                current, refused = None, exc
            for path in sorted((args.repo / VERSIONS).iterdir()):
                if not path.name.startswith("."):
                    print(f"{'*' if path.name == current else ' '} {path.name}")
            if refused is not None:
                raise refused
            return 0
        manifest = rollback(args.repo) if args.rollback else promote(args.repo, args.version)
        print(f"{args.repo}: current version is now {manifest.model_version}")
        return 0

    return _run("anomaly-promote", body)


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="anomaly-evaluate", description="Evaluate a bundle on a labelled file.")
    p.add_argument("--model", type=Path, required=True,
                   help="bundle directory written by anomaly-train, or a model repository (its current version)")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--label-column", required=True)
    p.add_argument("--normal-value", required=True)
    p.add_argument("--report-dir", type=Path, help="where to write plots and report.html "
                                                   "(default: evaluation-<data name> beside the data)")
    args = p.parse_args(argv)

    def body() -> int:
        from training import report
        from training.data import Labels, check_columns, encode_frame, file_windows, read_frame
        from training.errors import DataError
        from training.evaluate import evaluate
        from training.repository import load_model

        bundle = load_model(args.model)
        frame = read_frame(args.data)
        normal = Labels(args.label_column, args.normal_value).is_normal(frame, args.data)
        if normal.all():
            raise DataError(f"{args.data}: every row is normal; evaluation needs anomalous rows too")
        check_columns(frame, bundle.schema, [*bundle.passthrough_columns, args.label_column], args.data,
                      bundle.windows)
        windows = file_windows(bundle.windows)  # the file in its own order, as anomaly-score reads it
        scores = bundle.scorer.score(encode_frame(bundle.schema, frame, args.data, windows=windows)).score
        e = evaluate(scores, ~normal, bundle.threshold.value)
        out = args.report_dir or args.data.parent / f"evaluation-{args.data.stem}"
        check_report_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        report.score_histogram(out / "scores.png", scores[normal], scores[~normal], bundle.threshold.value)
        report.roc_pr_curves(out / "roc.png", out / "pr.png", scores, ~normal, e.roc_auc, e.pr_auc)
        report.confusion(out / "confusion.png", e.tp, e.fp, e.tn, e.fn)
        report.write_html(out / "report.html", f"Evaluation of {bundle.version} on {args.data.name}",
                          {"model": bundle.version, "data": str(args.data), **e.to_dict()},
                          ["scores.png", "roc.png", "pr.png", "confusion.png"])
        print(f"{args.data}: {e.rows} rows, {e.anomalies} anomalous; model {bundle.version}")
        print(f"  ROC-AUC {e.roc_auc:.4f}  PR-AUC {e.pr_auc:.4f}")
        print(f"  at threshold {e.threshold:.6g}: precision {e.precision:.3f}  recall {e.recall:.3f}  "
              f"F1 {e.f1:.3f}  false-positive rate {e.false_positive_rate:.4f}  "
              f"(tp {e.tp}, fp {e.fp}, tn {e.tn}, fn {e.fn})")
        print(f"  F1-optimal threshold {e.f1_optimal_threshold:.6g} gives F1 {e.f1_optimal:.3f}")
        if windows is not None:
            print(f"  {window_summary(windows)}")
        print(f"  report: {out / 'report.html'}")
        return 0

    return _run("anomaly-evaluate", body)
