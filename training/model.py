"""The dense autoencoder: build, fit with early stopping, and export a SavedModel with a scoring signature."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from training.errors import ConfigError  # noqa: E402
from training.tf_runtime import quiet_native_stderr  # noqa: E402

with quiet_native_stderr():  # TensorFlow's native start-up lines (see training/tf_runtime.py)
    import keras
    import tensorflow as tf

#: Name of the SavedModel signature the worker and batch scorer call.
SIGNATURE = "serving_default"
SIGNATURE_INPUT = "features"


def default_hidden(width: int) -> tuple[int, ...]:
    """Encoder sizes: a 32-unit layer and a 2-unit bottleneck.

    A narrow bottleneck keeps anomalies from being reconstructed well; on the benchmark suite
    (benchmarks/results/quality.md) (32, 2) beat wider bottlenecks (4, 8, 16) and deeper encoders.
    """
    return (32, 2)


@dataclass(frozen=True)
class FitConfig:
    """How to train the autoencoder."""

    hidden: tuple[int, ...] | None = None
    epochs: int = 60
    batch_size: int = 256
    learning_rate: float = 1e-3
    patience: int = 6
    seed: int = 0
    ensemble: int = 3
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not 1 <= self.ensemble <= 16:
            raise ConfigError(f"ensemble size must be in [1, 16], got {self.ensemble}")
        if not 0.0 <= self.noise <= 1.0:
            raise ConfigError(f"input noise must be in [0, 1] (standard deviations of a z-score), got {self.noise}")
        if self.hidden is not None and (not self.hidden or min(self.hidden) < 1):
            raise ConfigError(f"hidden layer sizes must be positive integers, got {self.hidden}")


@dataclass(frozen=True)
class FitResult:
    """The fitted members (one per seed) and the first member's loss curves."""

    models: list[keras.Model]
    hidden: tuple[int, ...]
    loss: list[float]
    val_loss: list[float]
    best_epoch: int
    epochs_run: list[int]


def build(width: int, hidden: Sequence[int], noise: float = 0.0) -> keras.Model:
    """Mirror-symmetric dense autoencoder; linear output because inputs are z-scores and one-hots.

    With `noise` > 0 it is a denoising autoencoder: Gaussian noise is added to the inputs during training only.
    """
    inputs = keras.Input(shape=(width,), name=SIGNATURE_INPUT)
    x = keras.layers.GaussianNoise(noise, name="input_noise")(inputs) if noise > 0 else inputs
    for i, units in enumerate(hidden):
        x = keras.layers.Dense(units, activation="relu", name=f"encoder_{i}")(x)
    for i, units in enumerate(reversed(hidden[:-1])):
        x = keras.layers.Dense(units, activation="relu", name=f"decoder_{i}")(x)
    outputs = keras.layers.Dense(width, activation="linear", name="reconstruction")(x)
    return keras.Model(inputs, outputs, name="autoencoder")


@quiet_native_stderr()  # the first fit prints a native E0000 line that is not an error
def fit(train: np.ndarray, validation: np.ndarray, config: FitConfig,
        on_epoch: Callable[[int, float, float], None] | None = None) -> FitResult:
    """Fit `config.ensemble` autoencoders (seeds seed, seed+1, ...) on normal rows, early-stopping each on
    the validation split; deterministic on CPU. Progress is reported for the first member only."""
    tf.config.experimental.enable_op_determinism()
    hidden = tuple(config.hidden) if config.hidden else default_hidden(train.shape[1])
    models, curves, epochs_run = [], [], []
    for member in range(config.ensemble):
        keras.utils.set_random_seed(config.seed + member)
        model = build(train.shape[1], hidden, config.noise)
        model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate), loss="mse")
        callbacks: list[keras.callbacks.Callback] = [
            keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
        ]
        if on_epoch is not None and member == 0:
            callbacks.append(keras.callbacks.LambdaCallback(
                on_epoch_end=lambda epoch, logs, report=on_epoch: report(
                    epoch + 1, float(logs["loss"]), float(logs["val_loss"]))))
        history = model.fit(train, train, validation_data=(validation, validation), epochs=config.epochs,
                            batch_size=config.batch_size, shuffle=True, callbacks=callbacks, verbose=0)
        models.append(model)
        curves.append(history.history)
        epochs_run.append(len(history.history["loss"]))
    val_loss = [float(v) for v in curves[0]["val_loss"]]
    return FitResult(models=models, hidden=hidden, loss=[float(v) for v in curves[0]["loss"]], val_loss=val_loss,
                     best_epoch=int(np.argmin(val_loss)) + 1, epochs_run=epochs_run)


@dataclass(frozen=True)
class NeighbourTerm:
    """The nearest-neighbour term: a bank of encoded normal training rows and how many neighbours count."""

    bank: np.ndarray
    k: int

    def __post_init__(self) -> None:
        if self.bank.ndim != 2 or len(self.bank) < 1:
            raise ConfigError(f"the neighbour bank must be a non-empty (rows, width) matrix, got {self.bank.shape}")
        if not 1 <= self.k <= len(self.bank):
            raise ConfigError(f"neighbours must be in [1, {len(self.bank)}] (bank rows), got {self.k}")


@dataclass(frozen=True)
class Combination:
    """How the two terms make the score: score = (1 - w) * recon / recon_scale + w * distance / distance_scale.

    The scales are typical values of each term on validation normals, so both terms count in units of
    "how unusual for normal traffic"; w is `distance_weight`.
    """

    distance_weight: float = 0.0
    reconstruction_scale: float = 1.0
    distance_scale: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.distance_weight <= 1.0:
            raise ConfigError(f"distance weight must be in [0, 1], got {self.distance_weight}")
        if self.reconstruction_scale <= 0 or self.distance_scale <= 0:
            raise ConfigError(f"term scales must be positive, got {self.reconstruction_scale}, {self.distance_scale}")


@dataclass(frozen=True)
class ScoreConfig:
    """How the score is made from the reconstruction and the nearest-neighbour terms (docs/preprocessing.md).

    `distance_weight` 0 gives the reconstruction score alone (the model before the neighbour term).
    """

    distance_weight: float = 0.9
    neighbours: int = 1
    bank_rows: int = 4096
    bank_cells: int = 2**18
    scale_quantile: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.distance_weight <= 1.0:
            raise ConfigError(f"distance weight must be in [0, 1], got {self.distance_weight}")
        if self.neighbours < 1:
            raise ConfigError(f"neighbours must be >= 1, got {self.neighbours}")
        if self.bank_rows < self.neighbours:
            raise ConfigError(f"the neighbour bank needs at least {self.neighbours} rows, got {self.bank_rows}")
        if self.bank_cells < 1:
            raise ConfigError(f"bank cells must be positive, got {self.bank_cells}")
        if not 0.0 < self.scale_quantile < 1.0:
            raise ConfigError(f"scale quantile must be in (0, 1), got {self.scale_quantile}")


def neighbour_bank(train: np.ndarray, config: ScoreConfig, seed: int) -> NeighbourTerm | None:
    """Training rows drawn without replacement (seeded), at most `bank_rows` and at most `bank_cells` numbers
    (wide schemas get fewer rows, so a model call stays within its latency budget); None when the term is off."""
    if config.distance_weight == 0.0:
        return None
    size = max(config.neighbours, min(config.bank_rows, config.bank_cells // max(train.shape[1], 1)))
    rows = np.random.default_rng(seed).permutation(len(train))[:size]
    return NeighbourTerm(bank=np.ascontiguousarray(train[np.sort(rows)], dtype=np.float32),
                         k=min(config.neighbours, len(rows)))


def typical(values: np.ndarray, quantile: float) -> float:
    """A positive typical value of a term on validation normals: its quantile, or its mean where that is 0."""
    scale = float(np.quantile(values, quantile))
    return scale if scale > 0 else max(float(np.mean(values)), 1e-12)


#: Signature outputs besides score, feature_errors and reconstruction: the two parts that sum to the score.
PART_OUTPUTS = ("score_reconstruction", "score_distance")


def export_saved_model(models: Sequence[keras.Model], feature_weights: np.ndarray, path: Path,
                       neighbours: NeighbourTerm | None = None, combination: Combination = Combination()) -> None:
    """Write a SavedModel whose signature returns the score, its per-column errors, the expected values and
    the score's two parts. Per encoded column j, with members m and the k nearest bank rows b:

    1. reconstruction error e_j = weight_j * mean_m (x_j - reconstruction_mj)^2;
    2. neighbour error n_j = mean_b (x_j - b_j)^2 (squared Euclidean distances: matrix product, then top-k);
    3. feature_errors_j = (1 - w) * e_j / recon_scale + w * n_j / distance_scale, and score = mean_j of it,
       so the score splits exactly into score_reconstruction + score_distance, and per-field shares add up;
    4. reconstruction (the "expected" values of explanations): per column, the nearest bank row's value
       where the neighbour part of that column's error is at least the reconstruction part, else the
       autoencoders' mean reconstruction.

    Without `neighbours` (or with w = 0) the score is the reconstruction term alone.
    """
    width = int(models[0].input_shape[1])
    weights = tf.constant(np.asarray(feature_weights, dtype=np.float32).reshape(width))
    w = combination.distance_weight if neighbours is not None else 0.0
    recon_factor = (1.0 - w) / combination.reconstruction_scale
    distance_factor = w / combination.distance_scale
    archive = keras.export.ExportArchive()
    for model in models:
        archive.track(model)
    bank: tf.Tensor | None = None
    bank_sq: tf.Tensor | None = None  # (width + 1, bank rows): the ranking key's matrix
    k = neighbours.k if neighbours is not None else 0
    if neighbours is not None:
        bank_rows = np.ascontiguousarray(neighbours.bank, dtype=np.float32)
        if bank_rows.shape[1] != width:
            raise ConfigError(f"the neighbour bank has {bank_rows.shape[1]} columns, the model {width}")
        bank = tf.constant(bank_rows)
        # Ranking key of every bank row in one matrix product: [x, 1] @ [-2 b; |b|^2] = |x - b|^2 - |x|^2.
        bank_sq = tf.constant(np.vstack([-2.0 * bank_rows.T, (bank_rows.astype(np.float64) ** 2).sum(axis=1)[None, :]
                                         ]).astype(np.float32))

    def score(features: tf.Tensor) -> dict[str, tf.Tensor]:
        reconstructions = [model(features, training=False) for model in models]
        mean_reconstruction = tf.add_n(reconstructions) / len(models)
        recon_errors = tf.add_n([tf.square(features - r) for r in reconstructions]) * (weights / len(models))
        if bank is None or bank_sq is None:
            errors = recon_errors * recon_factor
            return {"reconstruction": mean_reconstruction, "feature_errors": errors,
                    "score": tf.reduce_mean(errors, axis=1),
                    "score_reconstruction": tf.reduce_mean(errors, axis=1),
                    "score_distance": tf.zeros_like(errors[:, 0])}
        key = tf.matmul(tf.concat([features, tf.ones_like(features[:, :1])], axis=1), bank_sq)
        if k == 1:  # argmin is several times faster than top_k on CPU
            nearest = tf.argmin(key, axis=1, output_type=tf.int32)[:, None]
        else:
            _, nearest = tf.math.top_k(-key, k=k, sorted=True)
        rows = tf.gather(bank, nearest)  # (batch, k, width): exact per-column differences, no cancellation
        neighbour_errors = tf.reduce_mean(tf.square(features[:, None, :] - rows), axis=1)
        recon_part = recon_errors * recon_factor
        distance_part = neighbour_errors * distance_factor
        errors = recon_part + distance_part
        expected = tf.where(distance_part >= recon_part, rows[:, 0, :], mean_reconstruction)
        return {"reconstruction": expected, "feature_errors": errors, "score": tf.reduce_mean(errors, axis=1),
                "score_reconstruction": tf.reduce_mean(recon_part, axis=1),
                "score_distance": tf.reduce_mean(distance_part, axis=1)}

    archive.add_endpoint(name="serve", fn=score,
                         input_signature=[tf.TensorSpec([None, width], tf.float32, name=SIGNATURE_INPUT)])
    archive.write_out(str(path), verbose=False)
