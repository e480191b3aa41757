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
