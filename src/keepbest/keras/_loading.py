"""Reading checkpoints back into Keras: ``load_weights`` and ``load_model``."""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any, Mapping

import keras

from keepbest.checkpoint import Checkpoint
from keepbest.discovery import Found, find, first_verified
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.keras import _formats, _state
from keepbest.manifest import Manifest
from keepbest.store import Reader


def resolve(path: str | os.PathLike[str], fallback: bool = False,
            storage_options: Mapping[str, Any] | None = None) -> tuple[Reader, Checkpoint | None]:
    """The checkpoint that ``path`` names, verified against its manifest, opened for reading.

    ``path`` may be a Keras file (verified when keepbest wrote it), a keepbest
    checkpoint folder, or a folder of checkpoints (its best one, else its
    newest one). Returns a reader and the checkpoint (None for a Keras file
    that keepbest did not write). With ``fallback``, a checkpoint that fails
    verification is skipped, with a warning, for the newest one of the same
    series that verifies.
    """
    found = find(path, storage_options)
    failures: list[CorruptCheckpointError] = []
    ckpt: Checkpoint | None = None
    if found.name is not None:  # one checkpoint: a Keras file or a checkpoint folder
        for damaged in found.damaged:  # a damaged manifest, or missing data: fail the load, never skip verification
            if not fallback:
                raise CorruptCheckpointError(damaged.reason)
            failures.append(CorruptCheckpointError(damaged.reason))
        ckpt = found.checkpoints[0] if found.checkpoints else None
        if ckpt is None and not failures:  # a file keepbest did not write: Keras reads it as it is
            return found.store.reader(Manifest(found.name, "file", "foreign", series="")), None
    elif found.checkpoints:
        best = [c for c in found.checkpoints if c.is_best]
        if len({c.manifest.series for c in best}) > 1:
            raise CheckpointNotFoundError(
                f"Folder {found.store.where()} holds the best checkpoints of several writers, so which one to load "
                "is ambiguous. Pass the path of one checkpoint. Available: "
                + ", ".join(c.location for c in best) + "."
            )
        ckpt = best[-1] if best else found.checkpoints[-1]
    else:
        what = "is an empty folder or holds no committed checkpoint" if found.store.exists() else "does not exist"
        hint = "".join(f" {d.name}: {d.reason}" for d in found.damaged)
        if found.unmanaged:
            raise CheckpointNotFoundError(f"No keepbest checkpoint at {found.store.where()}: it holds "
                                          f"{found.unmanaged_note()}{hint} Received: path={os.fspath(path)}")
        raise CheckpointNotFoundError(
            f"No checkpoint at {found.store.where()}: the path {what}. Check the path; a save that was "
            f"interrupted leaves nothing visible.{hint} Received: path={os.fspath(path)}"
        )
    candidates = ([ckpt] if ckpt is not None else []) + (_siblings(found, ckpt) if fallback else [])
    chosen = first_verified(found.store, candidates, wanted=os.fspath(path), failures=failures)
    return chosen.reader(), chosen


def _siblings(found: Found, ckpt: Checkpoint | None) -> list[Checkpoint]:
    """Fallback candidates, newest first: the other checkpoints of ``ckpt``'s series
    (of the whole folder when the checkpoint asked for has no readable manifest)."""
    return [c for c in reversed(find(found.store).checkpoints) if ckpt is None or (
        c.manifest.series == ckpt.manifest.series and c.name != ckpt.name)]


def load_weights(model: keras.Model, path: str | os.PathLike[str], *, fallback: bool = False,
                 storage_options: Mapping[str, Any] | None = None) -> None:
    """Restores weights (and optimizer state, if the model has an optimizer) in place.

    Every file is verified (size and BLAKE3) before anything is assigned; a
    keepbest folder is read with mmap and assigned by variable path, all or
    nothing. ``fallback=True`` loads the newest checkpoint of the same series
    that verifies when ``path`` does not (with a warning naming what failed).

    Example:
        >>> keepbest.keras.load_weights(model, "/tmp/checkpoint")  # doctest: +SKIP
    """
    reader, ckpt = resolve(path, fallback, storage_options)
    if ckpt is None or _formats.is_keras_file(ckpt.manifest.format):
        _build_optimizer_if_saved(model, reader)
        model.load_weights(reader.local_path())
        return
    _state.restore_model(model, reader)


def _saved_optimizer_slots(reader: Reader) -> int:
    """How many optimizer variables a Keras 3 ``.weights.h5`` / ``.keras`` file holds."""
    import h5py

    def count(f: Any) -> int:
        group = f.get("optimizer/vars")
        return len(group) if group is not None else 0

    name = reader.manifest.name
    if name.endswith(".weights.h5"):
        with reader.open(name) as data, h5py.File(data, "r") as f:
            return count(f)
    if name.endswith(".keras"):
        with reader.open(name) as data:
            if not zipfile.is_zipfile(data):
                return 0
            with zipfile.ZipFile(data) as z:
                if "model.weights.h5" in z.namelist():
                    with h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
                        return count(f)
    return 0


def _build_optimizer_if_saved(model: keras.Model, reader: Reader) -> None:
    """Builds a compiled model's optimizer when the file carries optimizer slots.

    Keras refuses to load a file with Adam's slots into a freshly compiled
    model whose optimizer has not built them yet ("Skipping variable loading
    for optimizer ... it has 2 variables whereas the saved optimizer has 10").
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or optimizer.built or not model.built:
        return
    if _saved_optimizer_slots(reader) > len(optimizer.variables):
        optimizer.build(model.trainable_variables)


def load_model(path: str | os.PathLike[str], custom_objects: dict[str, Any] | None = None,
               compile: bool = True, safe_mode: bool = True, *, fallback: bool = False,
               storage_options: Mapping[str, Any] | None = None) -> keras.Model:
    """Rebuilds a model from a checkpoint saved with ``save_weights_only=False``.

    Keras's safe mode applies: a config never makes Keras run arbitrary code.
    Files are verified first; ``fallback`` is as in :func:`load_weights`.

    Example:
        >>> model = keepbest.keras.load_model("/tmp/checkpoint")  # doctest: +SKIP
    """
    reader, ckpt = resolve(path, fallback, storage_options)
    if ckpt is None or _formats.is_keras_file(ckpt.manifest.format):
        return keras.models.load_model(reader.local_path(), custom_objects=custom_objects, compile=compile,
                                       safe_mode=safe_mode)
    if not reader.has(_state.CONFIG_FILE):
        raise ValueError(
            f"Cannot rebuild a model from {reader.where()}: it was saved with save_weights_only=True, so it "
            "holds weights but no model config. Build the model in code and call "
            f"keepbest.keras.load_weights(model, path). Received: files={sorted(f.path for f in ckpt.manifest.files)}"
        )
    config = json.loads(reader.read(_state.CONFIG_FILE).decode("utf-8"))
    if not compile:
        config.pop("compile_config", None)
    with keras.saving.custom_object_scope(custom_objects or {}):
        model = keras.saving.deserialize_keras_object(config, safe_mode=safe_mode)
    _state.restore_model(model, reader)
    return model
