"""A training run: data -> schema -> splits -> autoencoder -> calibrated threshold -> bundle with report.

Splits of the normal rows (shuffled with the seed): with labels, 60 % train, 10 % validation (early
stopping, feature weights), 10 % calibration (threshold), 20 % test; the labelled anomalies join the
test split for the evaluation metrics. Without labels: 70 / 15 / 15, no test split.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from training import report
from training.bundle import BundleContents, Manifest
from training.data import (
    Labels,
    array_columns,
    frame_window_inputs,
    infer_kinds,
    instant_warnings,
    iter_source,
    raw_columns,
    resolve_source,
    source_sha256,
    with_windows,
)
from training.errors import ConfigError, DataError
from training.evaluate import Evaluation, evaluate
from training.features import CATEGORICAL, field_histograms, fit_schema
from training.model import Combination, FitConfig, ScoreConfig, export_saved_model, fit, neighbour_bank, typical
from training.repository import Destination
from training.sample import CHUNK_ROWS, DEFAULT_MAX_ROWS, Sample, sample_rows
from training.scoring import Scorer
from training.threshold import Threshold, ThresholdConfig, calibrate, score_histogram
from training.window_state import WindowInputs, window_features
from training.windows import (
    DEFAULT_GRACE_S,
    PREFIX,
    RECORD_TIME,
    WindowSpec,
    build_spec,
    parse_entity,
    parse_window,
)

WEIGHTINGS = ("none", "normalized")
MIN_NORMAL_ROWS = 20


@dataclass(frozen=True)
class WindowOptions:
    """Per-entity window features to compute (docs/windows.md): the `anomaly-train` flags as given."""

    entities: tuple[str, ...]
    windows: tuple[str, ...]
    time_field: str | None
    fields: tuple[str, ...] = ()
    grace_s: float = DEFAULT_GRACE_S

    @property
    def key_fields(self) -> list[str]:
        """The entity fields and the time field (unless it is the record's timestamp)."""
        fields = [name for entity in self.entities for name in parse_entity(entity)]
        if self.time_field is not None and self.time_field != RECORD_TIME:
            fields.append(self.time_field)
        return list(dict.fromkeys(fields))


@dataclass(frozen=True)
class StreamOrder:
    """Rows read from Kafka: each row's partition (a partition's rows in offset order) and record time (epoch s)."""

    partitions: np.ndarray
    record_times_s: np.ndarray


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the data."""

    fit: FitConfig = field(default_factory=FitConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    threshold: ThresholdConfig = field(default_factory=ThresholdConfig)
    categorical: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    labels: Labels | None = None
    weighting: str = "normalized"
    windows: WindowOptions | None = None
    max_rows: int = DEFAULT_MAX_ROWS

    def __post_init__(self) -> None:
        if self.max_rows < MIN_NORMAL_ROWS:
            raise ConfigError(f"--max-rows must be at least {MIN_NORMAL_ROWS} (rows to train and calibrate on), "
                              f"got {self.max_rows}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"score weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")


@dataclass(frozen=True)
class TrainResult:
    manifest: Manifest
    evaluation: Evaluation | None
    out_dir: Path
    seconds: float


@dataclass(frozen=True)
class Splits:
    train: np.ndarray
    validation: np.ndarray
    calibration: np.ndarray
    test_normal: np.ndarray


def split_normals(n: int, seed: int, with_test: bool) -> Splits:
    """Shuffle normal row indices and cut them into train/validation/calibration(/test)."""
    if n < MIN_NORMAL_ROWS:
        raise DataError(f"only {n} normal rows; at least {MIN_NORMAL_ROWS} are needed to train and calibrate")
    order = np.random.default_rng(seed).permutation(n)
    cuts = (0.6, 0.7, 0.8) if with_test else (0.7, 0.85, 1.0)
    a, b, c = (int(round(n * f)) for f in cuts)
    return Splits(order[:a], order[a:b], order[b:c], order[c:])


def _quantile(threshold: Threshold) -> float:
    return 1.0 - threshold.parameter if threshold.method == "target_fpr" else threshold.parameter


def feature_weights(errors: np.ndarray, weighting: str) -> np.ndarray:
    """Per-column weights from validation errors: 'normalized' divides by each column's typical error."""
    if weighting == "none":
        return np.ones(errors.shape[1], dtype=np.float32)
    typical = errors.mean(axis=0)
    weights = 1.0 / (typical + 0.01 * float(typical.mean()) + 1e-12)
    return (weights / weights.mean()).astype(np.float32)


def window_options(entities: Sequence[str], windows: Sequence[str], time_field: str | None, fields: Sequence[str],
                   grace_s: float | None) -> WindowOptions | None:
    """The window flags of `anomaly-train` -> options (None without --window or --entity); refuses a half-given set."""
    if not entities and not windows:
        if time_field or fields or grace_s is not None:
            raise ConfigError("--event-time, --window-field and --window-grace go with --entity and --window")
        return None
    if not entities:
        raise ConfigError("--window needs --entity FIELD: the windows count events per entity")
    if not windows:
        raise ConfigError("--entity needs --window DURATION (e.g. --window 2s --window 60s)")
    if not time_field:
        raise ConfigError(f"window features need event time: name its field with --event-time FIELD "
                          f"(or {RECORD_TIME} for the Kafka record's timestamp with --from-kafka)")
    for entity in entities:
        parse_entity(entity)
    for window in windows:
        parse_window(window)
    grace = DEFAULT_GRACE_S if grace_s is None else grace_s
    if not 0 <= grace <= 86_400:
        raise ConfigError(f"--window-grace must be between 0 and 86400 seconds, got {grace:g}")
    return WindowOptions(tuple(entities), tuple(windows), time_field, tuple(fields), grace)


def window_spec(frame: pd.DataFrame, kinds: dict[str, str], options: WindowOptions, source: Path,
                stream: StreamOrder | None) -> WindowSpec:
    """The spec from the flags, checked against the data: every entity and time field must be a column."""
    fields = [name for entity in options.entities for name in parse_entity(entity)]
    if unknown := [name for name in dict.fromkeys(fields) if name not in frame.columns]:
        raise ConfigError(f"--entity {unknown[0]}: no such field in {source}; fields are "
                          f"{', '.join(map(str, frame.columns[:10]))}")
    if options.time_field == RECORD_TIME and stream is None:
        raise ConfigError(f"--event-time {RECORD_TIME} is the Kafka record's timestamp: only with --from-kafka; "
                          f"name the file's time field instead")
    if options.time_field and options.time_field != RECORD_TIME and options.time_field not in frame.columns:
        raise ConfigError(f"--event-time {options.time_field}: no such field in {source}; fields are "
                          f"{', '.join(map(str, frame.columns[:10]))}")
    if dropped := [name for name in options.fields if name in frame.columns and name not in kinds]:
        raise ConfigError(f"--window-field {dropped[0]} is dropped (--drop or --label-column); windows summarise "
                          f"the model's fields")
    return build_spec(options.entities, options.windows, options.time_field, kinds, options.fields, options.grace_s)


def window_columns(spec: WindowSpec, frame: pd.DataFrame, columns: dict[str, np.ndarray],
                   stream: StreamOrder | None) -> tuple[np.ndarray, dict[str, int]]:
    """Every row's window features (rows x spec.names) and the events by outcome.

    All rows count, anomalous ones too: the windows describe the traffic, the labels only choose the rows
    trained on. A file is windowed in event-time order (a stable sort: equal times keep the file's order,
    rows without a usable time come last); a Kafka window partition by partition in offset order, as the
    worker reads it.
    """
    inputs: WindowInputs = frame_window_inputs(spec, frame, columns,
                                               stream.record_times_s if stream is not None else None)
    if stream is None:
        groups = [np.argsort(inputs.times, kind="stable")]
    else:
        groups = [np.flatnonzero(stream.partitions == p) for p in np.unique(stream.partitions)]
    features = np.full((len(frame), len(spec.names)), np.nan)
    counts: dict[str, int] = {}
    for rows in groups:
        features[rows], group_counts = window_features(spec, inputs.take(rows.tolist()))
        for outcome, n in group_counts.items():
            counts[outcome] = counts.get(outcome, 0) + n
    return features, counts


def train_frame(frame: pd.DataFrame, out_dir: Path | Destination, config: TrainConfig, data_sha256: str,
                source: Path = Path("<data>"), log: Callable[[str], None] = print,
                stream: StreamOrder | None = None, sample: Sample | None = None) -> TrainResult:
    """Train a bundle from an in-memory frame (the CLI and the benchmarks both come through here).

    `stream`: the frame's rows came from Kafka (windows are then computed per partition, in offset order).
    `sample`: the frame is a sample of what was read (`train_file`); the manifest and report say of what."""
    started = time.perf_counter()
    destination = out_dir if isinstance(out_dir, Destination) else Destination(out_dir)
    destination.check()
    unknown = [c for c in (*config.drop, *config.categorical) if c not in frame.columns]
    if unknown:
        raise DataError(f"{source}: column(s) named in --drop/--categorical not found: {', '.join(unknown)}")
    label_col = [config.labels.column] if config.labels else []
    normal_mask = config.labels.is_normal(frame, source) if config.labels else np.ones(len(frame), dtype=bool)
    features = frame.drop(columns=[*config.drop, *label_col])
    if arrays := [name for name in array_columns(features) if name not in config.categorical]:
        log(f"ignoring {len(arrays)} column(s) that hold arrays (not features): {', '.join(arrays[:5])}")
        features = features.drop(columns=arrays)
    if features.shape[1] == 0:
        raise DataError(f"{source}: no feature columns left after dropping {', '.join([*config.drop, *label_col])}")
    if reserved := [str(c) for c in features.columns if str(c).startswith(PREFIX)]:
        raise DataError(f"{source}: column {reserved[0]!r}: names starting with {PREFIX!r} are reserved for window "
                        f"features; rename the column or --drop it")
    kinds = infer_kinds(features, config.categorical)
    spec = window_spec(frame, kinds, config.windows, source, stream) if config.windows is not None else None
    if spec is not None:
        # Entity and time fields are what the windows are keyed and ordered by, not model fields: an address
        # or an account id as a one-hot is noise, an absolute time grows past its training range. An entity
        # named with --categorical is also fed to the model.
        keys = set(spec.key_fields) - {name for name in config.categorical if name != spec.time_field}
        kinds = {name: kind for name, kind in kinds.items() if name not in keys}
        if not kinds:
            raise DataError(f"{source}: no feature columns left besides the window keys {', '.join(sorted(keys))}")
    columns = raw_columns(features[list(kinds)], kinds, source)
    window_facts: dict[str, Any] = {}
    if spec is not None:
        window_values, outcomes = window_columns(spec, frame, columns, stream)
        columns = with_windows(columns, window_values, spec)
        window_facts = {"window_features": len(spec.names), "window_outcomes": outcomes}
        log(f"window features: {len(spec.names)} (entities {len(spec.entities)} x windows {len(spec.windows)} x "
            f"statistics {len(spec.per_window())}) over all {len(frame)} rows "
            f"{'per partition in offset order' if stream is not None else 'in event-time order'}; "
            + report.describe_counts(outcomes, "every event windowed at its own time"))

    normal_idx = np.flatnonzero(normal_mask)
    splits = split_normals(normal_idx.size, config.fit.seed, with_test=config.labels is not None)
    train_rows = normal_idx[splits.train]
    schema = fit_schema({k: v[train_rows] for k, v in columns.items()},
                        [k for k, kind in kinds.items() if kind == CATEGORICAL])
    matrix = schema.encode(columns).matrix
    log(f"{source}: {len(frame)} rows, {normal_idx.size} normal; {len(schema.fields)} fields "
        f"({len(schema.categorical_names)} categorical) -> {schema.width} model inputs")
    log(f"splits of normal rows: train {splits.train.size}, validation {splits.validation.size}, "
        f"calibration {splits.calibration.size}, test {splits.test_normal.size}")
    for warning in instant_warnings(features[list(kinds)], kinds):
        log(warning)

    def on_epoch(epoch: int, loss: float, val_loss: float) -> None:
        log(f"epoch {epoch:3d}/{config.fit.epochs}  loss {loss:.5f}  val_loss {val_loss:.5f}")

    fitted = fit(matrix[train_rows], matrix[normal_idx[splits.validation]], config.fit, on_epoch)

    with tempfile.TemporaryDirectory(prefix="anomaly-train-") as tmp:
        # Calibrate through the exported signature itself, so the threshold matches what serving computes.
        unweighted = Path(tmp) / "unweighted"
        export_saved_model(fitted.models, np.ones(schema.width, dtype=np.float32), unweighted)
        val_matrix = matrix[normal_idx[splits.validation]]
        recon = Scorer(unweighted, schema).score(val_matrix).reconstruction
        weights = feature_weights((val_matrix - recon) ** 2, config.weighting)
        # Each term is put on the scale of validation normals (rows neither term was fitted on).
        neighbours = neighbour_bank(matrix[train_rows], config.score, config.fit.seed)
        combination = Combination()
        if neighbours is not None:
            probe = Path(tmp) / "unscaled"
            export_saved_model(fitted.models, weights, probe, neighbours, Combination(distance_weight=0.5))
            parts = Scorer(probe, schema).score(val_matrix).parts
            combination = Combination(
                distance_weight=config.score.distance_weight,
                reconstruction_scale=typical(2 * parts["score_reconstruction"], config.score.scale_quantile),
                distance_scale=typical(2 * parts["score_distance"], config.score.scale_quantile))
        final = Path(tmp) / "saved_model"
        export_saved_model(fitted.models, weights, final, neighbours, combination)
        scorer = Scorer(final, schema)
        calib = scorer.score(matrix[normal_idx[splits.calibration]])
        calib_scores = calib.score
        threshold = calibrate(calib_scores, config.threshold)
        if threshold.method != "manual" and calib_scores.size * (1.0 - _quantile(threshold)) < 5:
            log(f"warning: the threshold rests on fewer than 5 of {calib_scores.size} calibration rows; "
                f"it is noisy. Train on more normal rows or choose a larger --target-fpr")
        reference = np.concatenate([scorer.score(val_matrix).score, calib_scores])
        evaluation = None
        test_scores = anomaly_scores = None
        # How much of each score comes from which term, for normal rows, alerts and labelled anomalies.
        part_groups = {"calibration normals": (calib.parts, calib.score.size)}
        if config.labels is not None:
            test = scorer.score(matrix[normal_idx[splits.test_normal]])
            anomalies = scorer.score(matrix[~normal_mask]) if (~normal_mask).any() else None
            test_scores = test.score
            anomaly_scores = anomalies.score if anomalies is not None else np.array([])
            if anomalies is not None:
                part_groups["labelled anomalies"] = (anomalies.parts, anomalies.score.size)
                above = np.concatenate([test.score, anomalies.score]) > threshold.value
                part_groups["alerts (test rows above threshold)"] = (
                    {k: np.concatenate([test.parts[k], anomalies.parts[k]])[above] for k in test.parts},
                    int(above.sum()))
        else:
            above = calib.score > threshold.value
            part_groups["alerts (calibration rows above threshold)"] = (
                {k: v[above] for k, v in calib.parts.items()}, int(above.sum()))
        shares = {group: report.part_shares(parts) for group, (parts, _) in part_groups.items()}
        if test_scores is not None and anomaly_scores is not None and anomaly_scores.size:
            evaluation = evaluate(np.concatenate([test_scores, anomaly_scores]),
                                  np.r_[np.zeros(test_scores.size, bool), np.ones(anomaly_scores.size, bool)],
                                  threshold.value)
        seconds = time.perf_counter() - started
        training_facts: dict[str, Any] = {
            "rows": int(len(frame)), "normal_rows": int(normal_idx.size), "train_rows": int(splits.train.size),
            "validation_rows": int(splits.validation.size), "calibration_rows": int(splits.calibration.size),
            "test_normal_rows": int(splits.test_normal.size), "hidden": list(fitted.hidden),
            "epochs_run": len(fitted.loss), "best_epoch": fitted.best_epoch, "ensemble": len(fitted.models),
            "member_epochs_run": fitted.epochs_run,
            "best_val_loss": float(min(fitted.val_loss)), "seed": config.fit.seed,
            "batch_size": config.fit.batch_size, "learning_rate": config.fit.learning_rate,
            "weighting": config.weighting, "feature_weights": [round(float(w), 6) for w in weights],
            "distance_weight": combination.distance_weight if neighbours is not None else 0.0,
            "neighbours": neighbours.k if neighbours is not None else 0,
            "bank_rows": len(neighbours.bank) if neighbours is not None else 0,
            "reconstruction_scale": combination.reconstruction_scale, "distance_scale": combination.distance_scale,
            "score_part_shares": shares, **window_facts, **_sample_facts(sample),
            "seconds": round(seconds, 2),
        }

        def write_report(directory: Path) -> None:
            images = ["loss.png", "scores.png", "score_parts.png"]
            report.loss_curve(directory / "loss.png", fitted.loss, fitted.val_loss, fitted.best_epoch)
            report.score_parts(directory / "score_parts.png", {g: v for g, v in shares.items() if v})
            report.score_histogram(directory / "scores.png",
                                   test_scores if test_scores is not None else calib_scores,
                                   anomaly_scores if anomaly_scores is not None and anomaly_scores.size else None,
                                   threshold.value)
            if evaluation is not None and test_scores is not None and anomaly_scores is not None:
                both = np.concatenate([test_scores, anomaly_scores])
                y = np.r_[np.zeros(test_scores.size, bool), np.ones(anomaly_scores.size, bool)]
                report.roc_pr_curves(directory / "roc.png", directory / "pr.png", both, y,
                                     evaluation.roc_auc, evaluation.pr_auc)
                report.confusion(directory / "confusion.png", evaluation.tp, evaluation.fp, evaluation.tn,
                                 evaluation.fn)
                images += ["roc.png", "pr.png", "confusion.png"]
            facts: dict[str, Any] = {"data": str(source), "threshold": threshold.value,
                                     "threshold method": f"{threshold.method} {threshold.parameter:g}",
                                     "calibration false-positive rate": threshold.calibration_fpr,
                                     **{k: v for k, v in training_facts.items()
                                        if k not in ("feature_weights", "score_part_shares")}}
            if spec is not None:
                facts["window_outcomes"] = report.describe_counts(window_facts["window_outcomes"],
                                                                  "every event windowed at its own time")
            facts.update({f"score parts, {group}": report.describe_shares(shares[group], rows)
                          for group, (_, rows) in part_groups.items() if shares[group]})
            if evaluation is not None:
                facts.update({f"test {k}": v for k, v in evaluation.to_dict().items()})
            report.write_html(directory / "report.html", "Anomaly model training report", facts, images)

        written, manifest = destination.write(BundleContents(
            schema=schema, threshold=threshold, histogram=score_histogram(reference), data_sha256=data_sha256,
            field_histograms=field_histograms(schema, {k: v[train_rows] for k, v in columns.items()}),
            write_saved_model=lambda path: shutil.copytree(final, path), write_report=write_report,
            training=training_facts, metrics=evaluation.to_dict() if evaluation else {}, windows=spec,
            columns={"ignored": [*config.drop, *label_col, *arrays],
                     "label": config.labels.column if config.labels else None,
                     "normal_value": config.labels.normal_value if config.labels else None}))
    return TrainResult(manifest=manifest, evaluation=evaluation, out_dir=written,
                       seconds=time.perf_counter() - started)


def _sample_facts(sample: Sample | None) -> dict[str, Any]:
    """What a sampled frame was drawn from; nothing for data kept whole (its facts are the data's own)."""
    if sample is None or sample.whole:
        return {}
    return {"rows_read": sample.rows_read, "normal_rows_read": sample.normal_rows_read,
            "sampled_rows": len(sample.frame), "sample": sample.describe()}


def train_file(data: Path, out_dir: Path | Destination, config: TrainConfig,
               log: Callable[[str], None] = print) -> TrainResult:
    """Train from a CSV/JSONL/Parquet/Avro file, the files a glob matches, or a partitioned Parquet folder.

    The data is read once, in chunks, keeping a seeded uniform sample of at most `config.max_rows` normal
    rows (training/sample.py); data within that is kept whole and trains as if read in one piece. Window
    features need every row in event order, so with windows more rows than that are refused.
    """
    source = resolve_source(data)
    where = Path(source.name)
    labels = config.labels
    sample = sample_rows(
        iter_source(source, CHUNK_ROWS), config.max_rows, config.fit.seed,
        normal_rows=(lambda chunk, first: labels.normal_rows(chunk, where, first)) if labels is not None else None,
        refuse_over="window features need every row in event order" if config.windows is not None else None)
    if sample.frame.empty or len(sample.frame.columns) == 0:
        raise DataError(f"{source.name}: {'file has' if source.single else 'files have'} no data rows")
    log(f"{source.name}: read {sample.rows_read} rows in {len(source.files)} file(s); {sample.describe()}")
    return train_frame(sample.frame, out_dir, config, source_sha256(source), source=where, log=log, sample=sample)
