"""A ``state_dict`` (nested dicts, lists and tuples of tensors and numbers) as flat tensors plus JSON, and back.

Tensors become entries of a flat ``{name: tensor}`` mapping (named by their
path in the structure, ``state/0/exp_avg``); everything else is JSON. A
tensor that appears twice (tied weights: an embedding shared with the output
layer) is stored once and referenced twice. Nothing is pickled: a value that
is neither a tensor nor JSON data is refused with its path.

The JSON markers: ``{"__tensor__": name}``, ``{"__tuple__": [...]}``,
``{"__items__": [[key, value], ...]}`` for a dict whose keys are not all
strings (an optimizer's ``state`` is keyed by parameter index) or not in
sorted order (JSON objects are written sorted; the order is kept), and for a
module's ``OrderedDict`` with its ``_metadata`` (versions that
``load_state_dict`` passes to layers), ``{"__float__": "nan"}`` for
non-finite floats, ``{"__dtype__": "float32"}`` and ``{"__device__": "cpu"}``.

Example:
    >>> import torch
    >>> w = torch.ones(2)
    >>> tensors = {}
    >>> doc = flatten({"a": w, "b": w, "lr": 0.1, "betas": (0.9, 0.99), 3: None}, "", tensors)
    >>> sorted(tensors), doc["__items__"][1]
    (['a'], ['b', {'__tensor__': 'a'}])
    >>> unflatten(doc, tensors)
    {'a': tensor([1., 1.]), 'b': tensor([1., 1.]), 'lr': 0.1, 'betas': (0.9, 0.99), 3: None}
"""

from __future__ import annotations

import collections
import math
from typing import Any, Mapping

import numpy as np
import torch

MARKERS = ("__tensor__", "__tuple__", "__items__", "__float__", "__dtype__", "__device__", "__ndarray__")


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    """What makes two tensors the same memory: a tied weight is one tensor under two names."""
    return (t.device, t.dtype, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())


def flatten(value: Any, path: str, tensors: dict[str, torch.Tensor],
            seen: dict[tuple[Any, ...], str] | None = None, where: str = "app_state") -> Any:
    """``value`` as JSON, its tensors added to ``tensors`` (named by their path; each memory once)."""
    seen = {} if seen is None else seen
    if isinstance(value, torch.Tensor):
        if value.is_sparse or value.is_quantized or value.layout != torch.strided:
            raise TypeError(f"Cannot save {where}[{path!r}]: a {value.layout} tensor has no safetensors form. "
                            "Convert it to a dense tensor in state_dict(). "
                            f"Received: a {value.layout} {value.dtype} tensor")
        t = value.detach()
        key = _key(t) if t.numel() else None  # empty tensors all have data_ptr 0: never the same memory
        if key is not None and key in seen:
            return {"__tensor__": seen[key]}
        name = path or "tensor"
        while name in tensors:  # two paths that join to one name ("a/b" + "c" and "a" + "b/c")
            name += "#"
        if key is not None:
            seen[key] = name
        tensors[name] = t
        return {"__tensor__": name}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": flatten(torch.from_numpy(np.ascontiguousarray(value)), path, tensors, seen, where)}
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else {"__float__": repr(float(value))}
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"__device__": str(value)}
    if isinstance(value, (tuple, torch.Size)):
        return {"__tuple__": [flatten(v, _join(path, i), tensors, seen, where) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [flatten(v, _join(path, i), tensors, seen, where) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        metadata = getattr(value, "_metadata", None)
        keys = list(value)
        # A JSON object is written with sorted keys: other orders (an optimizer's per-parameter state) keep theirs
        # as a list of items, so the restored state_dict iterates as the saved one did.
        if metadata is None and all(isinstance(k, str) and k not in MARKERS for k in keys) and keys == sorted(keys):
            return {k: flatten(v, _join(path, k), tensors, seen, where) for k, v in value.items()}
        doc: dict[str, Any] = {"__items__": [[flatten(k, path, {}, {}, where), flatten(v, _join(path, k), tensors, seen,
                                                                                       where)]
                                             for k, v in value.items()]}
        if metadata is not None:
            doc["__metadata__"] = flatten(dict(metadata), "", {}, {}, where)
        return doc
    raise TypeError(
        f"Cannot save {where}[{path!r}]: a {type(value).__module__}.{type(value).__qualname__} is neither a tensor "
        "nor JSON data (numbers, strings, lists, dicts), and keepbest never pickles. Return plain data from "
        f"state_dict() (e.g. a number or a tensor instead of this object). Received: {value!r:.200}")


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def unflatten(doc: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The structure :func:`flatten` described, with the tensors put back."""
    if isinstance(doc, list):
        return [unflatten(v, tensors) for v in doc]
    if not isinstance(doc, dict):
        return doc
    if "__tensor__" in doc:
        return tensors[doc["__tensor__"]]
    if "__ndarray__" in doc:
        return unflatten(doc["__ndarray__"], tensors).numpy()
    if "__tuple__" in doc:
        return tuple(unflatten(v, tensors) for v in doc["__tuple__"])
    if "__float__" in doc:
        return float(doc["__float__"])
    if "__dtype__" in doc:
        return getattr(torch, doc["__dtype__"])
    if "__device__" in doc:
        return torch.device(doc["__device__"])
    if "__items__" in doc:
        items = [(_hashable(unflatten(k, tensors)), unflatten(v, tensors)) for k, v in doc["__items__"]]
        if "__metadata__" not in doc:
            return dict(items)
        out: collections.OrderedDict[Any, Any] = collections.OrderedDict(items)
        out._metadata = unflatten(doc["__metadata__"], tensors)  # type: ignore[attr-defined]
        return out
    return {k: unflatten(v, tensors) for k, v in doc.items()}


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def tensor_names(doc: Any) -> set[str]:
    """The tensor names a flattened document refers to."""
    if isinstance(doc, list):
        return set().union(*(tensor_names(v) for v in doc)) if doc else set()
    if not isinstance(doc, dict):
        return set()
    if "__tensor__" in doc:
        return {doc["__tensor__"]}
    return set().union(*(tensor_names(v) for v in doc.values())) if doc else set()
