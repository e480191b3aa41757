"""A Keras model's state as flat tensors, and back.

Tensors are keyed by Keras variable path (``simple_model/dense/kernel``,
``adam/iteration``) and the file records the variables' order. Restoring
matches by path when the paths agree, else by position (Keras paths change
with name scopes and automatic ``_N`` suffixes, positions do not for one
architecture), after checking every shape and dtype. Anything else raises
:class:`StateMismatchError` listing the variables, like PyTorch's
``load_state_dict``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import keras
import numpy as np

from keepbest import codec
from keepbest.keras import _host
from keepbest.errors import CorruptCheckpointError, StateMismatchError
from keepbest.writer import Staging

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CONFIG_FILE = "model.json"
ORDER_KEY = "keepbest.order"

_SUFFIX = re.compile(r"_\d+(?=_|/|$)")


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


def model_tensors(model: keras.Model, staging: Staging | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Host arrays of the saved variables: views (for a save the caller waits for) or,
    with ``staging``, a snapshot copied into its reusable buffers."""
    variables = saved_variables(model)
    if staging is None:
        return {f: {p: _host.view(v) for p, v in vs.items()} for f, vs in variables.items()}
    _host.prefetch(v for vs in variables.values() for v in vs.values())
    return staging.snapshot(variables, spec=_host.spec, copy=_host.copy_into)


def order_metadata(variables: Sequence[Any]) -> dict[str, str]:
    return {ORDER_KEY: json.dumps(unique_paths(variables))}


def _leaf(path: str) -> str:
    """A path's layer/variable part without Keras's automatic ``_N`` suffixes.

    Keras paths depend on the name scope a variable was created in (a model
    rebuilt from its config has ``dense/kernel`` where the original had
    ``sequential/dense_3/kernel``), so only this part is compared.
    """
    return "/".join(_SUFFIX.sub("", part) for part in path.split("#")[0].split("/")[-2:])


def _saved_order(file: Path, tensors: dict[str, np.ndarray], what: str) -> list[str]:
    """The variable paths of ``file`` in the order they were saved (by name for a foreign file)."""
    _, meta, _ = codec.read_header(file)
    saved_order: list[str] = sorted(tensors)  # a file keepbest did not write has no order: names decide
    if ORDER_KEY in meta:
        try:
            recorded: Any = json.loads(meta[ORDER_KEY])
        except ValueError:
            recorded = None
        if not isinstance(recorded, list) or sorted(map(str, recorded)) != sorted(tensors):
            raise CorruptCheckpointError(
                f"Cannot restore {what} from {file}: its variable order ({ORDER_KEY}) does not list its "
                "tensors. The file was not written by keepbest or was edited; load another checkpoint. "
                f"Received: {meta[ORDER_KEY][:200]!r}"
            )
        saved_order = [str(p) for p in recorded]
    return saved_order


def restore_variables(variables: Sequence[Any], file: Path, what: str) -> None:
    """Assigns the tensors of ``file`` to ``variables``; all-or-nothing.

    Matches by path when the saved and current paths are the same set, else
    by position; either way every shape and dtype is checked before any
    variable is assigned.
    """
    tensors = codec.read_file(file)
    saved_order = _saved_order(file, tensors, what)
    targets = unique_paths(variables)
    if set(targets) == set(tensors):
        pairs = [(p, tensors[p], v) for p, v in zip(targets, variables)]
    elif len(saved_order) == len(targets):
        pairs = [(p, tensors[p], v) for p, v in zip(saved_order, variables)]
    else:
        want, have = Counter(_leaf(p) for p in targets), Counter(_leaf(p) for p in saved_order)
        missing = [p for p in targets if _take(want - have, _leaf(p))]
        unexpected = [p for p in saved_order if _take(have - want, _leaf(p))]
        raise StateMismatchError(
            f"Error(s) in loading {what} from {file}: the checkpoint has {len(tensors)} variables, "
            f"the model {len(targets)}. Missing key(s) in checkpoint: {_names(missing)}. "
            f"Unexpected key(s) in checkpoint: {_names(unexpected)}. "
            "Build the same architecture as the one that was saved. "
            f"Received: {len(tensors)} saved tensors for {len(targets)} variables"
        )
    wrong = [
        f"{p}: checkpoint {tuple(arr.shape)} {arr.dtype}, model {tuple(v.shape)} {v.dtype}"
        for p, arr, v in pairs
        if not _same_spec(arr, v)
    ]
    if wrong:
        raise StateMismatchError(
            f"Error(s) in loading {what} from {file}: size or dtype mismatch for "
            f"{len(wrong)} variable(s): {'; '.join(wrong[:20])}. Build the model with the saved "
            "shapes and dtypes. Received: the mismatches above"
        )
    for _p, arr, v in pairs:
        _host.assign(v, arr)


def restore_matching(variables: Sequence[Any], file: Path) -> tuple[list[str], list[str]]:
    """Assigns the tensors of ``file`` whose path, shape and dtype match a variable (a partial restore).

    Returns the paths restored and a description of each variable left as it was.
    """
    tensors = codec.read_file(file)
    by_leaf: dict[str, list[str]] = {}
    for p in _saved_order(file, tensors, "a partial restore"):
        by_leaf.setdefault(_leaf(p), []).append(p)
    restored, skipped = [], []
    for path, v in zip(unique_paths(variables), variables):
        # Paths differ between runs by Keras's automatic suffixes: match on the layer/variable part, in order.
        candidates = by_leaf.get(_leaf(path), [])
        saved = path if path in tensors else (candidates[0] if candidates else None)
        if saved in candidates:
            candidates.remove(saved)
        arr = tensors.get(saved) if saved is not None else None
        if arr is None:
            skipped.append(f"{path} (not in the checkpoint)")
        elif not _same_spec(arr, v):
            skipped.append(f"{path} (checkpoint {tuple(arr.shape)} {arr.dtype}, model {tuple(v.shape)} {v.dtype})")
        else:
            _host.assign(v, arr)
            restored.append(path)
    return restored, skipped


def _same_spec(arr: np.ndarray, variable: Any) -> bool:
    return tuple(arr.shape) == tuple(variable.shape) and np.dtype(arr.dtype) == _host.numpy_dtype(variable)


def _take(counts: Counter[str], key: str) -> bool:
    """Consumes one ``key`` from ``counts``; True if there was one."""
    if counts[key] > 0:
        counts[key] -= 1
        return True
    return False


def _names(paths: Sequence[str]) -> str:
    if not paths:
        return "none"
    shown = ", ".join(f'"{p}"' for p in paths[:20])
    return shown + (f" and {len(paths) - 20} more" if len(paths) > 20 else "")


def restore_model(model: keras.Model, checkpoint_dir: Path, files: set[str]) -> None:
    """Fills ``model`` (weights, and optimizer state when it has an optimizer)."""
    if not model.built:
        raise ValueError(
            f"Cannot load weights from {checkpoint_dir} into an unbuilt model: it has no variables yet. "
            "Call the model on a batch or `model.build(input_shape)` first, or use "
            "keepbest.keras.load_model(path). Received: model.built=False"
        )
    restore_variables(model.weights, checkpoint_dir / WEIGHTS_FILE, "model weights")
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and OPTIMIZER_FILE in files:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        restore_variables(optimizer.variables, checkpoint_dir / OPTIMIZER_FILE, "optimizer state")


def model_config(model: keras.Model) -> dict[str, Any]:
    config: dict[str, Any] = keras.saving.serialize_keras_object(model)
    json.dumps(config)  # fail now, with the model at hand, if something is not JSON-able
    return config
