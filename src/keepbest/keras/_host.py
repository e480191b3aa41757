"""Variables to host memory, each backend its fastest way.

- ``view``: a NumPy array with the variable's current value, without a copy
  where the backend allows one (JAX and torch on CPU). Only valid while the
  training loop is paused, which holds for a synchronous save.
- ``copy_into``: fills a preallocated buffer (a snapshot for an async
  save): one memcpy on CPU; torch copies straight from the device.
- ``assign``: sets a variable from a (memory-mapped) array with one copy;
  Keras's ``Variable.assign`` on torch copies twice (``np.array`` first).
"""

from __future__ import annotations

from typing import Any

import warnings

import keras
import numpy as np

_BACKEND = keras.backend.backend()


def numpy_dtype(variable: Any) -> np.dtype[Any]:
    name = keras.backend.standardize_dtype(variable.dtype)
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16, float8: NumPy knows them through ml_dtypes
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def spec(variable: Any) -> tuple[tuple[int, ...], np.dtype[Any]]:
    return tuple(variable.shape), numpy_dtype(variable)


def view(variable: Any) -> np.ndarray:
    value = variable.value
    if _BACKEND == "jax" and value.dtype != "bfloat16":
        return np.asarray(value)  # zero-copy on CPU; keras.ops.convert_to_numpy would copy
    if _BACKEND == "torch":
        import torch

        if value.device.type == "cpu" and value.dtype != torch.bfloat16:
            return value.detach().numpy()  # type: ignore[no-any-return]
    return np.asarray(keras.ops.convert_to_numpy(value))


def copy_into(dst: np.ndarray, variable: Any) -> None:
    if _BACKEND == "torch":
        import torch

        value = variable.value
        if value.dtype != torch.bfloat16 and dst.dtype.kind in "fiub":
            torch.from_numpy(dst).copy_(value.detach())  # also device-to-host, without a staging tensor
            return
    np.copyto(dst, view(variable), casting="no")


def prefetch(variables: Any) -> None:
    """Starts every device-to-host transfer at once (JAX on an accelerator), so they overlap."""
    if _BACKEND != "jax":
        return
    for v in variables:
        value = v.value
        if getattr(value, "platform", lambda: "cpu")() != "cpu" and hasattr(value, "copy_to_host_async"):
            value.copy_to_host_async()


def assign(variable: Any, array: np.ndarray) -> None:
    """``variable.assign(array)`` for an array of the variable's shape and dtype, copied once."""
    if _BACKEND == "torch" and array.dtype.kind in "fiub":
        import torch

        with warnings.catch_warnings():  # a read-only mmap view: torch warns, but only reads it here
            warnings.simplefilter("ignore", UserWarning)
            source = torch.from_numpy(array)
        with torch.no_grad():
            variable.value.copy_(source)
        return
    variable.assign(array)
