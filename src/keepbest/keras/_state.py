"""A Keras model's state as flat tensors, and back.

Tensors are keyed by Keras variable path (``simple_model/dense/kernel``,
``adam/iteration``) and the file records the variables' order. Restoring
matches them with :mod:`keepbest.matching` (by path when the paths agree,
else by position: Keras paths change with name scopes and automatic ``_N``
suffixes, positions do not for one architecture), after checking every
shape and dtype; anything else raises :class:`StateMismatchError` listing
the variables, like PyTorch's ``load_state_dict``. Files are read through
the store's :class:`~keepbest.store.Reader`.
"""

from __future__ import annotations

import json
from typing import Any, Collection, Mapping, NamedTuple, Sequence

import keras
import numpy as np

from keepbest import codec, matching
from keepbest.errors import CorruptCheckpointError
from keepbest.keras import _host
from keepbest.store import Reader
from keepbest.writer import Staging

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "model.json"
ORDER_KEY = "keepbest.order"


def unique_paths(variables: Sequence[Any]) -> list[str]:
    """Variable paths, made unique with ``#n`` where Keras repeats one."""
    seen: dict[str, int] = {}
    out = []
    for v in variables:
        path = v.path
        n = seen.get(path, 0)
        seen[path] = n + 1
        out.append(path if n == 0 else f"{path}#{n}")
    return out


def saved_variables(model: keras.Model) -> dict[str, dict[str, Any]]:
    """The variables of a keepbest Keras checkpoint, by file and unique path (order kept).

    Weights always; optimizer state once the optimizer is built.
    """
    groups = {WEIGHTS_FILE: list(model.weights)}
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built and optimizer.variables:
        groups[OPTIMIZER_FILE] = list(optimizer.variables)
    return {fname: dict(zip(unique_paths(vs), vs)) for fname, vs in groups.items()}


def trainability(model: keras.Model) -> dict[str, dict[str, str]]:
    """Per file, which saved variables are trainable: frozen ones are sharded apart, so a save
    after fine-tuning links their unchanged files instead of writing them again."""
    return {fname: {p: "trainable" if getattr(v, "trainable", True) else "frozen" for p, v in vs.items()}
            for fname, vs in saved_variables(model).items()}


class HostTensors(NamedTuple):
    """What this process holds of a model, on the host."""

    tensors: dict[str, dict[str, np.ndarray]]
    """Per file, tensor name -> array (a view, or a snapshot copy)."""
    pieces: dict[str, dict[str, tuple[int, ...]]]
    """Per file, the whole shapes of the variables held here only as pieces (sharded across processes)."""
    known: dict[str, dict[str, list[Any]]]
    """Per file, the tensors left out of the snapshot (another process writes them): name -> spec."""


def model_tensors(model: keras.Model, staging: Staging | None = None,
                  skip: Mapping[str, Collection[str]] | None = None) -> HostTensors:
    """Host arrays of the saved variables: views (for a save the caller waits for) or, with ``staging``,
    a snapshot copied into its reusable buffers, without the tensors in ``skip`` (per file)."""
    return host_tensors(saved_variables(model), staging, skip)


def host_tensors(variables: dict[str, dict[str, Any]], staging: Staging | None = None,
                 skip: Mapping[str, Collection[str]] | None = None) -> HostTensors:
    """``{file: {path: variable}}`` as host arrays of what this process holds (see :func:`model_tensors`)."""
    sources: dict[str, dict[str, Any]] = {}
    pieces: dict[str, dict[str, tuple[int, ...]]] = {}
    known: dict[str, dict[str, list[Any]]] = {}
    for fname, vs in variables.items():
        sources[fname] = {}
        left_out = (skip or {}).get(fname, ())
        for path, v in vs.items():
            parts, whole = _host.local_parts(v, path)
            for name, src in parts:
                if staging is not None and name in left_out:
                    shape, dtype = _host.spec(src)
                    known.setdefault(fname, {})[name] = [list(shape), codec.dtype_code(dtype),
                                                         int(np.prod(shape, dtype=np.int64)) * dtype.itemsize]
                else:
                    sources[fname][name] = src
            if whole is not None:
                pieces.setdefault(fname, {})[path] = whole
    if staging is None:
        return HostTensors({f: {p: _host.view(v) for p, v in vs.items()} for f, vs in sources.items()}, pieces, known)
    copier = _host.Copier()
    tensors = staging.snapshot(sources, spec=_host.spec, copy=copier)
    copier.run()
    return HostTensors(tensors, pieces, known)


def staging_specs(model: keras.Model) -> dict[str, dict[str, tuple[tuple[int, ...], np.dtype[Any]]]]:
    """What :func:`model_tensors` copies into staging, as ``{file: {tensor name: (shape, dtype)}}``."""
    out: dict[str, dict[str, tuple[tuple[int, ...], np.dtype[Any]]]] = {}
    for fname, vs in saved_variables(model).items():
        out[fname] = {}
        for path, v in vs.items():
            for name, src in _host.local_parts(v, path)[0]:
                out[fname][name] = _host.spec(src)
    return out


def order_metadata(variables: Sequence[Any]) -> dict[str, str]:
    return {ORDER_KEY: json.dumps(unique_paths(variables))}


def _tensors(reader: Reader, rel: str, what: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The tensors of ``rel`` and the variable paths in the order they were saved (by name for a
    foreign file)."""
    tensors = codec.load(reader.buffer, rel, reader.where)
    _, meta, _ = codec.decode_header(reader.buffer(rel), reader.where(rel))
    saved_order: list[str] = sorted(tensors)  # a file keepbest did not write has no order: names decide
    if ORDER_KEY in meta:
        try:
            recorded: Any = json.loads(meta[ORDER_KEY])
        except ValueError:
            recorded = None
        if not isinstance(recorded, list) or sorted(map(str, recorded)) != sorted(tensors):
            raise CorruptCheckpointError(
                f"Cannot restore {what} from {reader.where(rel)}: its variable order ({ORDER_KEY}) does not list "
                "its tensors. The file was not written by keepbest or was edited; load another checkpoint. "
                f"Received: {meta[ORDER_KEY][:200]!r}"
            )
        saved_order = [str(p) for p in recorded]
    return tensors, saved_order


def _specs(variables: Sequence[Any]) -> list[matching.Spec]:
    return [_host.spec(v) for v in variables]


def restore_variables(variables: Sequence[Any], reader: Reader, rel: str, what: str) -> None:
    """Assigns the tensors of file ``rel`` to ``variables``; all-or-nothing (see :mod:`keepbest.matching`)."""
    tensors, saved_order = _tensors(reader, rel, what)
    saved = {p: matching.spec_of(a) for p, a in tensors.items()}
    pairs = matching.match_all(saved_order, saved, unique_paths(variables), _specs(variables), what,
                               reader.where(rel))
    for name, i in pairs:
        _host.assign(variables[i], tensors[name])


def restore_matching(variables: Sequence[Any], reader: Reader, rel: str) -> tuple[list[str], list[str]]:
    """Assigns the tensors of ``rel`` whose path, shape and dtype match a variable (a partial restore).

    Returns the paths restored and a description of each variable left as it was.
    """
    tensors, saved_order = _tensors(reader, rel, "a partial restore")
    targets = unique_paths(variables)
    pairs, skipped = matching.match_some(saved_order, {p: matching.spec_of(a) for p, a in tensors.items()},
                                         targets, _specs(variables))
    for name, i in pairs:
        _host.assign(variables[i], tensors[name])
    return [targets[i] for _name, i in pairs], skipped


def restore_model(model: keras.Model, reader: Reader) -> None:
    """Fills ``model`` (weights, and optimizer state when it has an optimizer)."""
    if not model.built:
        raise ValueError(
            f"Cannot load weights from {reader.where()} into an unbuilt model: it has no variables yet. "
            "Call the model on a batch or `model.build(input_shape)` first, or use "
            "keepbest.keras.load_model(path). Received: model.built=False"
        )
    restore_variables(model.weights, reader, WEIGHTS_FILE, "model weights")
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and reader.has(OPTIMIZER_FILE):
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        restore_variables(optimizer.variables, reader, OPTIMIZER_FILE, "optimizer state")


def model_config(model: keras.Model) -> dict[str, Any]:
    config: dict[str, Any] = keras.saving.serialize_keras_object(model)
    json.dumps(config)  # fail now, with the model at hand, if something is not JSON-able
    return config
