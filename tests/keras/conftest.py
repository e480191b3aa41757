"""Shared Keras fixtures: a small model on scikit-learn's bundled digits."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterator

import keras
import numpy as np
import pytest
from sklearn.datasets import load_digits


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))[:600]
    return (d.data[order] / 16.0).astype("float32"), d.target[order].astype("int32")


def make_model(hidden: int = 16) -> keras.Model:
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


@pytest.fixture
def model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return make_model()


def weights_of(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.weights]


def _copies(variables) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]


class Recorder(keras.callbacks.Callback):
    """Records what fit did, to compare with what a checkpoint holds or what another run did.

    - ``begun``: the (0-based) epochs begun;
    - ``by_epoch``: {epoch (1-based, as in checkpoint names): the weights at its end};
    - ``step``: the optimizer step (iterations) at the latest batch end;
    - ``losses``: {step: the loss Keras logged at that batch end (its running mean)};
    - with ``per_step=True``, ``states``: {step: {"weights": ..., "optimizer": ...}}, copies of the
      model's and the optimizer's variables (in ``model.weights`` and ``optimizer.variables``
      order) at that batch end;
    - ``ended``: whether ``on_train_end`` was reached.

    What it records at an end hook is what the callbacks listed before it left.
    """

    def __init__(self, per_step: bool = False) -> None:
        super().__init__()
        self.per_step = per_step
        self.begun: list[int] = []
        self.by_epoch: dict[int, list[np.ndarray]] = {}
        self.step = 0
        self.losses: dict[int, float] = {}
        self.states: dict[int, dict[str, list[np.ndarray]]] = {}
        self.ended = False

    def on_epoch_begin(self, epoch, logs=None):
        self.begun.append(epoch)

    def on_epoch_end(self, epoch, logs=None):
        self.by_epoch[epoch + 1] = weights_of(self.model)

    def on_train_batch_end(self, batch, logs=None):
        self.step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.losses[self.step] = float(logs["loss"])
        if self.per_step:
            self.states[self.step] = {"weights": _copies(self.model.weights),
                                      "optimizer": _copies(self.model.optimizer.variables)}

    def on_train_end(self, logs=None):
        self.ended = True


@contextlib.contextmanager
def user_warnings(pattern: str) -> Iterator[list[str]]:
    """Collects the UserWarnings matching ``pattern``.

    (``pytest.warns`` would re-raise, as errors, the deprecation warnings that
    the backends emit inside Keras's own saving code.)
    """
    found: list[str] = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield found
    found.extend(str(w.message) for w in record
                 if issubclass(w.category, UserWarning) and re.search(pattern, str(w.message)))


def drive(cb: keras.callbacks.Callback, model: keras.Model, epoch_logs: list[dict[str, float]]) -> None:
    """Calls the callback's hooks as fit would, with chosen epoch logs (no training)."""
    cb.set_model(model)
    cb.on_train_begin()
    for epoch, logs in enumerate(epoch_logs):
        cb.on_epoch_begin(epoch)
        cb.on_train_batch_end(0, {k: v for k, v in logs.items() if not k.startswith("val_")})
        cb.on_epoch_end(epoch, logs)
    cb.on_train_end()
