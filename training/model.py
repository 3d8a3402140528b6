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

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if not 1 <= self.ensemble <= 16:
            raise ConfigError(f"ensemble size must be in [1, 16], got {self.ensemble}")
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


def build(width: int, hidden: Sequence[int]) -> keras.Model:
    """Mirror-symmetric dense autoencoder; linear output because inputs are z-scores and one-hots."""
    inputs = keras.Input(shape=(width,), name=SIGNATURE_INPUT)
    x = inputs
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
        model = build(train.shape[1], hidden)
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


def export_saved_model(models: Sequence[keras.Model], feature_weights: np.ndarray, path: Path) -> None:
    """Write a SavedModel whose signature returns reconstruction, weighted per-column errors and the score.

    With several members, errors and reconstruction are averaged over them:
    score = mean over encoded columns j of mean over members m of weight_j * (x_j - reconstruction_mj)^2.
    """
    width = int(models[0].input_shape[1])
    weights = tf.constant(np.asarray(feature_weights, dtype=np.float32).reshape(width))
    archive = keras.export.ExportArchive()
    for model in models:
        archive.track(model)

    def score(features: tf.Tensor) -> dict[str, tf.Tensor]:
        reconstructions = [model(features, training=False) for model in models]
        errors = tf.add_n([tf.square(features - r) for r in reconstructions]) * (weights / len(models))
        return {"reconstruction": tf.add_n(reconstructions) / len(models), "feature_errors": errors,
                "score": tf.reduce_mean(errors, axis=1)}

    archive.add_endpoint(name="serve", fn=score,
                         input_signature=[tf.TensorSpec([None, width], tf.float32, name=SIGNATURE_INPUT)])
    archive.write_out(str(path), verbose=False)
