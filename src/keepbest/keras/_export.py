"""``keepbest export`` to Keras's own formats: ``.keras`` (the model) and ``.weights.h5`` (its weights).

The model is rebuilt from the checkpoint with :func:`keepbest.keras.load_model` (files verified first, Keras's
safe mode), written by Keras into a staged file of the store, committed, then loaded back and compared
weight by weight: an export that does not give back the same weights is deleted and reported.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import keras
import numpy as np

from keepbest import exporting
from keepbest.checkpoint import Checkpoint
from keepbest.errors import CorruptCheckpointError
from keepbest.keras import _formats
from keepbest.keras._loading import load_model


def export_keras(source: Checkpoint, to: str, storage_options: Mapping[str, Any] | None = None,
                 progress: Callable[[int], None] | None = None) -> Checkpoint:
    """Writes ``source`` as the Keras file ``to`` (``.keras`` or ``.weights.h5``), verified; returns it."""
    kind = exporting.kind_of(to)
    if kind not in (_formats.KERAS, _formats.WEIGHTS_H5):
        raise ValueError(f"Cannot export to {to} with Keras: it is not a .keras or .weights.h5 path. "
                         f"Received: --to {to}")
    m = source.manifest
    if m.format not in (_formats.KEEPBEST, _formats.KERAS, _formats.LEGACY_H5):
        raise ValueError(
            f"Cannot export {source.location} to {to}: it holds no Keras model config (format '{m.format}': "
            "weights only, or not written by Keras), so the model cannot be rebuilt. Export it to .safetensors or "
            "a folder, or save with save_weights_only=False. Received: format=" + m.format)
    model = load_model(source.location, compile=True, storage_options=storage_options)
    store, name = exporting.file_target(to, storage_options)
    staged = store.stage(name, "file")
    try:
        if kind == _formats.KERAS:
            model.save(staged.local_path())
        else:
            model.save_weights(staged.local_path())
    except BaseException:
        store.discard(staged)
        raise
    exported = exporting.commit_verified(store, staged, exporting.file_manifest(m, store, name, kind))
    if progress is not None:
        progress(exported.size)
    try:
        _check_loads_back(model, exported, kind)
    except BaseException:  # whatever failed, an export that did not load back must not stay visible
        exporting.withdraw(store, exported.manifest)
        raise
    return exported


def _check_loads_back(model: keras.Model, exported: Checkpoint, kind: str) -> None:
    path = exported.reader().local_path()
    if kind == _formats.KERAS:
        again = keras.models.load_model(path, compile=False)
    else:
        again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
        again.load_weights(path)
    want, got = model.weights, again.weights
    same = len(want) == len(got) and all(
        np.array_equal(keras.ops.convert_to_numpy(a.value), keras.ops.convert_to_numpy(b.value))
        for a, b in zip(want, got))
    if not same:
        raise CorruptCheckpointError(
            f"Exported {exported.location} does not load back to the checkpoint's weights (Keras wrote something "
            "else), so it was deleted. Report this with the model. Received: "
            f"{len(got)} weights loaded, {len(want)} expected")
