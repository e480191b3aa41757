"""Variables to host memory, each backend its fastest way.

- ``view``: a NumPy array with the variable's current value, without a copy
  where the backend allows one (JAX, torch and TensorFlow on CPU). Only valid while the
  training loop is paused, which holds for a synchronous save.
- ``copy_into``: fills a preallocated buffer (a snapshot for an async
  save): one memcpy on CPU; torch copies straight from the device.
  :class:`Copier` does a whole snapshot's copies at once: every
  device-to-host transfer started first, then the host copies spread over
  every core.
- ``assign``: sets a variable from a (memory-mapped) array with one copy;
  Keras's ``Variable.assign`` on torch copies twice (``np.array`` first).
- ``local_parts``: with several JAX processes, what this process holds of a
  variable: the whole value once (replicated), or its addressable pieces
  (sharded by ``ModelParallel``). ``spec``, ``view`` and ``copy_into`` take
  those pieces (single-device arrays) as well as variables.
"""

from __future__ import annotations

from typing import Any

import warnings

import keras
import numpy as np

from keepbest import codec
from keepbest.writer import copy_all

_BACKEND = keras.backend.backend()


def numpy_dtype(variable: Any) -> np.dtype[Any]:
    name = keras.backend.standardize_dtype(variable.dtype)
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16, float8: NumPy knows them through ml_dtypes
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def spec(variable: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    if not isinstance(variable, keras.Variable):  # a piece of a JAX array
        return tuple(variable.shape), np.dtype(variable.dtype)
    return tuple(variable.shape), numpy_dtype(variable)


def local_parts(variable: Any, path: str) -> tuple[list[tuple[str, Any]], tuple[int, ...] | None]:
    """What this process holds of ``variable``: ``[(tensor name, source)]``, and the whole shape when the
    variable is sharded across processes (the names are then ``codec.piece_name``s)."""
    value = variable.value if _BACKEND == "jax" else None
    if value is None or getattr(value, "is_fully_addressable", True):
        return [(path, variable)], None
    if value.is_fully_replicated:
        return [(path, value.addressable_shards[0].data)], None
    pieces: dict[str, Any] = {}
    for shard in value.addressable_shards:
        index = [(s.start or 0, n if s.stop is None else s.stop) for s, n in zip(shard.index, value.shape)]
        pieces.setdefault(codec.piece_name(path, index), shard.data)  # replicas of one piece: written once
    return list(pieces.items()), tuple(value.shape)


def whole(variable: Any) -> np.ndarray:
    """A variable's whole value, also when it is replicated across processes (not when sharded)."""
    parts, shape = local_parts(variable, "")
    if shape is not None:
        raise ValueError(f"Variable {variable.path} is sharded across processes: no process holds it whole. "
                         f"Received: shape={shape}")
    return view(parts[0][1])


def scalar(variable: Any) -> int:
    """A scalar variable's value as an int (also when it is replicated across processes)."""
    return int(whole(variable))


def view(variable: Any) -> np.ndarray:
    if not isinstance(variable, keras.Variable):
        return np.asarray(variable)
    value = variable.value
    if _BACKEND == "jax" and value.dtype != "bfloat16":
        return np.asarray(value)  # zero-copy on CPU; keras.ops.convert_to_numpy would copy
    if _BACKEND == "torch":
        import torch

        if value.device.type == "cpu" and value.dtype != torch.bfloat16:
            return value.detach().numpy()  # type: ignore[no-any-return]
    if _BACKEND == "tensorflow" and value.dtype.name != "bfloat16" and "GPU" not in value.device.upper():
        # A view of the variable's read tensor (Variable.numpy, Tensor.numpy and convert_to_numpy copy).
        return np.asarray(value.value() if hasattr(value, "read_value") else value)
    return np.asarray(keras.ops.convert_to_numpy(value))


def copy_into(dst: np.ndarray, variable: Any) -> None:
    if _BACKEND == "torch" and isinstance(variable, keras.Variable):
        import torch

        value = variable.value
        if value.dtype != torch.bfloat16 and dst.dtype.kind in "fiub":
            torch.from_numpy(dst).copy_(value.detach())  # also device-to-host, without a staging tensor
            return
    np.copyto(dst, view(variable), casting="no")


class Copier:
    """Collects ``(buffer, variable)`` copies during :meth:`keepbest.writer.Staging.snapshot`; :meth:`run`
    then starts every device-to-host transfer, and copies what is on the host in chunks on every core.

    Why copy on JAX, where a zero-copy view would return at once (what Orbax does on CPU): a view held
    while the write runs keeps the next (donating) train step from reusing the variables' buffers, so
    XLA allocates fresh ones and faults in the whole state, which blocks training longer than one copy
    into reused buffers (benchmarks/RESULTS.md measures both).
    """

    def __init__(self) -> None:
        self.jobs: list[tuple[np.ndarray, Any]] = []

    def __call__(self, dst: np.ndarray, variable: Any) -> None:
        self.jobs.append((dst, variable))

    def run(self) -> None:
        prefetch(v for _, v in self.jobs)
        pairs = []
        for dst, variable in self.jobs:
            if _BACKEND == "torch" and isinstance(variable, keras.Variable) and (
                    variable.value.device.type != "cpu" or dst.dtype.kind not in "fiub"):
                copy_into(dst, variable)  # straight from the device, or a dtype NumPy views differently
            else:
                pairs.append((dst, view(variable)))
        copy_all(pairs)
        self.jobs.clear()


def prefetch(variables: Any) -> None:
    """Starts every device-to-host transfer at once (JAX on an accelerator), so they overlap."""
    if _BACKEND != "jax":
        return
    for v in variables:
        value = v.value if isinstance(v, keras.Variable) else v
        if getattr(value, "platform", lambda: "cpu")() != "cpu" and hasattr(value, "copy_to_host_async"):
            value.copy_to_host_async()


def assign(variable: Any, array: np.ndarray) -> None:
    """``variable.assign(array)`` for an array of the variable's shape and dtype, copied once."""
    value = variable.value if _BACKEND == "jax" else None
    if value is not None and not getattr(value, "is_fully_addressable", True):
        import jax

        # Spread over several processes: each takes its own pieces of the whole array, in the variable's sharding.
        variable.assign(jax.make_array_from_callback(value.shape, value.sharding, lambda index: array[index]))
        return
    if _BACKEND == "torch" and array.dtype.kind in "fiub":
        import torch

        with warnings.catch_warnings():  # a read-only mmap view: torch warns, but only reads it here
            warnings.simplefilter("ignore", UserWarning)
            source = torch.from_numpy(array)
        with torch.no_grad():
            variable.value.copy_(source)
        return
    variable.assign(array)
