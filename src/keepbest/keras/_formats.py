"""Which format a path means, and how each format writes itself into a staged path.

- ``*.keras``: Keras's zip (``model.save``), full model only.
- ``*.weights.h5``: Keras's weights file (``model.save_weights``).
- ``*.h5`` / ``*.hdf5``: Keras's legacy HDF5: the full model, or with
  ``save_weights_only=True`` the legacy weights layout that
  ``model.load_weights`` reads (as tf.keras 2.x wrote it).
- anything else: a keepbest checkpoint folder (safetensors weights and
  optimizer state, the model config as JSON, the manifest).

Every format is written by its normal writer into the local path of a staged
entry of the store and committed by the store, so the previous file
survives any failure.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping

import keras

from keepbest.errors import StorageError
from keepbest.keras import _host, _state
from keepbest.manifest import FileEntry
from keepbest.payload import TensorPayload
from keepbest.store import Staged
from keepbest.writer import Staging

KERAS = "keras"
WEIGHTS_H5 = "weights.h5"
LEGACY_H5 = "h5"
LEGACY_WEIGHTS_H5 = "h5-weights"
KEEPBEST = "keepbest-keras"
KEEPBEST_WEIGHTS = "keepbest-keras-weights"


def format_for(filepath: str, save_weights_only: bool) -> str:
    """The format ``filepath`` asks for; raises where Keras's rules forbid the pair."""
    if filepath.endswith(".weights.h5"):
        if not save_weights_only:
            raise ValueError(
                "A `.weights.h5` file holds weights only, so it cannot store the whole model. "
                "Pass `save_weights_only=True`, or end the filepath in `.keras` (Keras model "
                f"format) or `.h5` (legacy HDF5). Received: filepath={filepath}"
            )
        return WEIGHTS_H5
    if filepath.endswith(".keras"):
        if save_weights_only:
            raise ValueError(
                "When using `save_weights_only=True` in `ModelCheckpoint`, the filepath provided "
                "must end in `.weights.h5` (Keras weights format). Received: "
                f"filepath={filepath}"
            )
        return KERAS
    if filepath.endswith((".h5", ".hdf5")):
        return LEGACY_WEIGHTS_H5 if save_weights_only else LEGACY_H5
    return KEEPBEST_WEIGHTS if save_weights_only else KEEPBEST


def is_keras_file(fmt: str) -> bool:
    return fmt in (KERAS, WEIGHTS_H5, LEGACY_H5, LEGACY_WEIGHTS_H5)


@dataclass(frozen=True)
class KerasFilePayload:
    """One file written by Keras's own saving code."""

    model: keras.Model
    format: str
    layout: str = "file"
    detached: bool = False  # Keras's writers read the live model: always written on the caller's thread

    def write(self, staged: Staged) -> tuple[FileEntry, ...]:
        _check_free_space(self.model, staged)
        target = staged.local_path()
        if self.format == KERAS or self.format == LEGACY_H5:
            self.model.save(target, overwrite=True)
        elif self.format == WEIGHTS_H5:
            self.model.save_weights(target, overwrite=True)
        else:
            _write_legacy_weights(self.model, target)
        return ()  # the store hashes what Keras wrote


# What HDF5 adds to the tensors (headers, the config, a .keras zip's metadata): generous on purpose.
_OVERHEAD = 256 * 1024


def _check_free_space(model: keras.Model, staged: Staged) -> None:
    """Refuses a Keras file save that cannot fit, before HDF5 starts writing.

    On a full disk HDF5 fails inside its destructors (h5py reports errors it
    cannot raise) and the legacy ``.h5`` writer can crash the process; a
    clear error beforehand is better, and the previous checkpoint is kept
    either way.
    """
    free = staged.free_bytes()
    if free is None:
        return
    variables = list(model.weights)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        variables += list(optimizer.variables)
    need = sum(int(_host.numpy_dtype(v).itemsize) * int(_prod(v.shape)) for v in variables) + _OVERHEAD
    if free < need:
        where = staged.local_path().parent
        raise StorageError(
            errno.ENOSPC, f"Cannot save checkpoint {staged.name} in {where}: "
            f"{free} bytes are free on its filesystem and the file needs about {need}. Free some space "
            "or save elsewhere; the previous checkpoint is kept. "
            f"Received: free={free}, needed={need}", str(where / staged.name))


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _write_legacy_weights(model: keras.Model, target: Path) -> None:
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(target, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


def keepbest_payload(model: keras.Model, weights_only: bool, staging: Staging | None = None,
                     skip: Mapping[str, Collection[str]] | None = None) -> TensorPayload:
    """A keepbest checkpoint folder: tensors, plus the config for ``load_model``.

    With ``staging`` the tensors are a snapshot, so the payload may be written
    in the background while training goes on.
    """
    files, pieces, known = _state.model_tensors(model, staging, skip)
    metadata = {_state.WEIGHTS_FILE: _state.order_metadata(model.weights)}
    if _state.OPTIMIZER_FILE in files:
        metadata[_state.OPTIMIZER_FILE] = _state.order_metadata(model.optimizer.variables)
    config = None if weights_only else {_state.CONFIG_FILE: _state.model_config(model)}
    return TensorPayload(files, json_files=config, metadata=metadata, groups=_state.trainability(model),
                         format=KEEPBEST_WEIGHTS if weights_only else KEEPBEST, detached=staging is not None,
                         pieces=pieces or None, known=known or None)


def payload_for(model: keras.Model, fmt: str, staging: Staging | None = None,
                skip: Mapping[str, Collection[str]] | None = None) -> KerasFilePayload | TensorPayload:
    """The payload that writes ``model`` in format ``fmt``; a snapshot when ``staging`` is given
    and the format allows one (Keras's own file formats do not), without the tensors in ``skip``
    (another process writes them)."""
    if is_keras_file(fmt):
        return KerasFilePayload(model, fmt)
    return keepbest_payload(model, weights_only=fmt == KEEPBEST_WEIGHTS, staging=staging, skip=skip)


def keras_versions() -> dict[str, str]:
    backend = keras.backend.backend()
    versions = {"keras": keras.__version__, "keras_backend": backend}
    module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}.get(backend)
    if module:
        import importlib

        versions[backend] = getattr(importlib.import_module(module), "__version__", "unknown")
    return versions
