"""The dense autoencoder: build, fit with early stopping, and export a SavedModel with a scoring signature."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from training.errors import ConfigError  # noqa: E402

#: Name of the SavedModel signature the worker and batch scorer call.
SIGNATURE = "serving_default"
SIGNATURE_INPUT = "features"


def default_hidden(width: int) -> tuple[int, ...]:
    """Encoder sizes for `width` inputs: one wide layer and a bottleneck well below the input width."""
    bottleneck = int(min(16, max(2, round(width / 3))))
    wide = int(min(64, max(8, 2 * width)))
    return (wide, bottleneck)


@dataclass(frozen=True)
class FitConfig:
    """How to train the autoencoder."""

    hidden: tuple[int, ...] | None = None
    epochs: int = 60
    batch_size: int = 256
    learning_rate: float = 1e-3
    patience: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        if self.hidden is not None and (not self.hidden or min(self.hidden) < 1):
            raise ConfigError(f"hidden layer sizes must be positive integers, got {self.hidden}")


@dataclass(frozen=True)
class FitResult:
    model: keras.Model
    hidden: tuple[int, ...]
    loss: list[float]
    val_loss: list[float]
    best_epoch: int


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


def fit(train: np.ndarray, validation: np.ndarray, config: FitConfig,
        on_epoch: Callable[[int, float, float], None] | None = None) -> FitResult:
    """Fit on normal rows, early-stopping on the validation split; seeded and deterministic on CPU."""
    keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    hidden = tuple(config.hidden) if config.hidden else default_hidden(train.shape[1])
    model = build(train.shape[1], hidden)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate), loss="mse")
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True),
    ]
    if on_epoch is not None:
        callbacks.append(keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: on_epoch(epoch + 1, float(logs["loss"]), float(logs["val_loss"]))))
    history = model.fit(train, train, validation_data=(validation, validation), epochs=config.epochs,
                        batch_size=config.batch_size, shuffle=True, callbacks=callbacks, verbose=0)
    val_loss = [float(v) for v in history.history["val_loss"]]
    return FitResult(model=model, hidden=hidden, loss=[float(v) for v in history.history["loss"]],
                     val_loss=val_loss, best_epoch=int(np.argmin(val_loss)) + 1)


def export_saved_model(model: keras.Model, feature_weights: np.ndarray, path: Path) -> None:
    """Write a SavedModel whose signature returns reconstruction, weighted per-column errors and the score.

    score = mean over encoded columns of weight_j * (x_j - reconstruction_j)^2.
    """
    width = int(model.input_shape[1])
    weights = tf.constant(np.asarray(feature_weights, dtype=np.float32).reshape(width))
    archive = keras.export.ExportArchive()
    archive.track(model)

    def score(features: tf.Tensor) -> dict[str, tf.Tensor]:
        reconstruction = model(features, training=False)
        errors = tf.square(features - reconstruction) * weights
        return {"reconstruction": reconstruction, "feature_errors": errors,
                "score": tf.reduce_mean(errors, axis=1)}

    archive.add_endpoint(name="serve", fn=score,
                         input_signature=[tf.TensorSpec([None, width], tf.float32, name=SIGNATURE_INPUT)])
    archive.write_out(str(path), verbose=False)
