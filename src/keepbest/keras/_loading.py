"""Reading checkpoints back into Keras: ``load_weights`` and ``load_model``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import keras

from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.keras import _formats, _state
from keepbest.checkpoint import Checkpoint, find_checkpoints, first_verified, list_checkpoints
from keepbest.manifest import Manifest
from keepbest.storage import INDEX_DIR, MANIFEST_NAME


def resolve(path: str | os.PathLike[str], fallback: bool = False) -> tuple[Path, Checkpoint | None]:
    """The checkpoint that ``path`` names, verified against its manifest.

    ``path`` may be a Keras file (verified when keepbest wrote it), a keepbest
    checkpoint folder, or a folder of checkpoints (its best one, else its
    newest one). Returns the path to read and the checkpoint (None for a
    Keras file that keepbest did not write). With ``fallback``, a checkpoint
    that fails verification is skipped, with a warning, for the newest one
    of the same series that verifies.
    """
    p = Path(os.fspath(path))
    own_manifest = p / MANIFEST_NAME if p.is_dir() else p.parent / INDEX_DIR / f"{p.name}.json"
    damaged: CorruptCheckpointError | None = None
    if own_manifest.is_file():  # a damaged manifest must fail the load, not skip verification
        try:
            Manifest.from_json(own_manifest.read_bytes(), source=str(own_manifest))
        except CorruptCheckpointError as e:
            if not fallback:
                raise
            damaged = e
    store, ckpts = find_checkpoints(p)
    if p.is_file() or damaged is not None:
        ckpt = ckpts[0] if ckpts else None
    elif p.is_dir() and ckpts:
        best = [c for c in ckpts if c.is_best]
        if len({c.manifest.series for c in best}) > 1:
            raise CheckpointNotFoundError(
                f"Folder {p} holds the best checkpoints of several writers, so which one to load "
                "is ambiguous. Pass the path of one checkpoint. Available: "
                + ", ".join(str(c.path) for c in best) + "."
            )
        ckpt = best[-1] if best else ckpts[-1]
    else:
        what = "is an empty folder or holds no committed checkpoint" if p.is_dir() else "does not exist"
        raise CheckpointNotFoundError(
            f"No checkpoint at {p}: the path {what}. Check the path; a save that was "
            f"interrupted leaves nothing visible. Received: path={p}"
        )
    if ckpt is None and damaged is None:
        return p, None
    candidates = ([ckpt] if ckpt is not None else []) + (_siblings(p, ckpt) if fallback else [])
    chosen = first_verified(store, candidates, wanted=str(p), failures=[damaged] if damaged else [])
    return chosen.path, chosen


def _siblings(p: Path, ckpt: Checkpoint | None) -> list[Checkpoint]:
    """Fallback candidates, newest first: the other checkpoints of ``ckpt``'s series
    (of the whole folder when ``p`` has a damaged manifest and no known series)."""
    single = (p / MANIFEST_NAME).is_file() or p.is_file()
    found = list_checkpoints(p.parent if single else p)
    return [c for c in reversed(found) if c.path != p and (
        ckpt is None or (c.manifest.series == ckpt.manifest.series and c.name != ckpt.name))]


def load_weights(model: keras.Model, path: str | os.PathLike[str], *, fallback: bool = False) -> None:
    """Restores weights (and optimizer state, if the model has an optimizer) in place.

    Every file is verified (size and BLAKE3) before anything is assigned; a
    keepbest folder is read with mmap and assigned by variable path, all or
    nothing. ``fallback=True`` loads the newest checkpoint of the same series
    that verifies when ``path`` does not (with a warning naming what failed).

    Example:
        >>> keepbest.keras.load_weights(model, "/tmp/checkpoint")  # doctest: +SKIP
    """
    target, ckpt = resolve(path, fallback)
    if ckpt is None or _formats.is_keras_file(ckpt.manifest.format):
        _build_optimizer_if_saved(model, target)
        model.load_weights(target)
        return
    _state.restore_model(model, target, {f.path for f in ckpt.manifest.files})


def _saved_optimizer_slots(path: Path) -> int:
    """How many optimizer variables a Keras 3 ``.weights.h5`` / ``.keras`` file holds."""
    import io
    import zipfile

    import h5py

    def count(f: Any) -> int:
        group = f.get("optimizer/vars")
        return len(group) if group is not None else 0

    name = path.name
    if name.endswith(".weights.h5"):
        with h5py.File(path, "r") as f:
            return count(f)
    if name.endswith(".keras") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if "model.weights.h5" in z.namelist():
                with h5py.File(io.BytesIO(z.read("model.weights.h5")), "r") as f:
                    return count(f)
    return 0


def _build_optimizer_if_saved(model: keras.Model, path: Path) -> None:
    """Builds a compiled model's optimizer when the file carries optimizer slots.

    Keras refuses to load a file with Adam's slots into a freshly compiled
    model whose optimizer has not built them yet ("Skipping variable loading
    for optimizer ... it has 2 variables whereas the saved optimizer has 10").
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or optimizer.built or not model.built:
        return
    if _saved_optimizer_slots(path) > len(optimizer.variables):
        optimizer.build(model.trainable_variables)


def load_model(path: str | os.PathLike[str], custom_objects: dict[str, Any] | None = None,
               compile: bool = True, safe_mode: bool = True, *, fallback: bool = False) -> keras.Model:
    """Rebuilds a model from a checkpoint saved with ``save_weights_only=False``.

    Keras's safe mode applies: a config never makes Keras run arbitrary code.
    Files are verified first; ``fallback`` is as in :func:`load_weights`.

    Example:
        >>> model = keepbest.keras.load_model("/tmp/checkpoint")  # doctest: +SKIP
    """
    target, ckpt = resolve(path, fallback)
    if ckpt is None or _formats.is_keras_file(ckpt.manifest.format):
        return keras.models.load_model(target, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode)
    files = {f.path for f in ckpt.manifest.files}
    if _state.CONFIG_FILE not in files:
        raise ValueError(
            f"Cannot rebuild a model from {target}: it was saved with save_weights_only=True, so it "
            "holds weights but no model config. Build the model in code and call "
            f"keepbest.keras.load_weights(model, path). Received: files={sorted(files)}"
        )
    config = json.loads((target / _state.CONFIG_FILE).read_text())
    if not compile:
        config.pop("compile_config", None)
    with keras.saving.custom_object_scope(custom_objects or {}):
        model = keras.saving.deserialize_keras_object(config, safe_mode=safe_mode)
    _state.restore_model(model, target, files)
    return model
