"""torch tensors to host NumPy arrays (views, or copies into reused staging) and back.

- ``view``: a NumPy array over a CPU tensor's memory (no copy when it is
  contiguous); a sync save writes from it while the caller waits.
- ``spec`` and ``copy_into``: what :class:`keepbest.writer.Staging` needs for an
  async save: one ``Tensor.copy_`` into the staging buffer, straight from the
  device for a CUDA tensor (non-blocking into pinned staging).
- ``tensor``: a saved (memory-mapped, read-only) array as a tensor without a
  copy, for ``load_state_dict`` to copy from.

bfloat16 and float8 have no NumPy dtype of their own; they travel as
``ml_dtypes`` arrays (the safetensors codes BF16, F8_E4M3, F8_E5M2).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from keepbest import codec
from keepbest.writer import copy_all

_EXOTIC: dict[torch.dtype, tuple[str, torch.dtype, type[np.integer[Any]]]] = {
    torch.bfloat16: ("bfloat16", torch.int16, np.int16)}
for _name, _torch_name in (("float8_e4m3fn", "float8_e4m3fn"), ("float8_e5m2", "float8_e5m2")):
    if hasattr(torch, _torch_name):
        _EXOTIC[getattr(torch, _torch_name)] = (_name, torch.uint8, np.uint8)


def numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    if dtype in _EXOTIC:
        try:
            import ml_dtypes
        except ImportError:
            raise TypeError(f"Cannot save a {dtype} tensor: NumPy has no such dtype without the ml_dtypes package. "
                            f"Install it: pip install ml_dtypes (or 'keepbest[torch]'). Received: dtype={dtype}") from None
        return np.dtype(getattr(ml_dtypes, _EXOTIC[dtype][0]))
    if dtype.is_complex:
        raise TypeError(f"Cannot save a {dtype} tensor: safetensors has no complex dtype. Store its real and "
                        f"imaginary parts (torch.view_as_real) in state_dict(). Received: dtype={dtype}")
    return np.dtype(torch.empty((), dtype=dtype).numpy().dtype)


def codec_code(t: torch.Tensor) -> str:
    """The safetensors dtype code of a tensor (F32, BF16, ...)."""
    return codec.dtype_code(numpy_dtype(t.dtype))


def spec(t: torch.Tensor) -> tuple[tuple[int, ...], np.dtype[Any]]:
    return tuple(t.shape), numpy_dtype(t.dtype)


def _as_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over ``array``'s memory (a writable staging buffer, or a read-only mmap that torch only reads)."""
    with warnings.catch_warnings():  # torch warns about read-only arrays; it only reads this one
        warnings.simplefilter("ignore", UserWarning)
        if dtype in _EXOTIC:
            return torch.from_numpy(array.view(_EXOTIC[dtype][2])).view(dtype)
        return torch.from_numpy(array)


def view(t: torch.Tensor) -> np.ndarray:
    """The tensor's value as a host array: a view of its memory when it is a contiguous CPU tensor."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype in _EXOTIC:
        return t.view(_EXOTIC[t.dtype][1]).numpy().view(numpy_dtype(t.dtype))
    return t.numpy()


def copy_into(dst: np.ndarray, t: torch.Tensor) -> None:
    """One copy into a staging buffer; from a CUDA tensor, non-blocking (``synchronize`` waits for them)."""
    _as_torch(dst, t.dtype).copy_(t.detach(), non_blocking=t.device.type == "cuda")


class Copier:
    """Collects ``(buffer, tensor)`` copies during :meth:`keepbest.writer.Staging.snapshot`, then :meth:`run` does
    them on every core: the CPU copies in chunks with NumPy (which releases the GIL), a CUDA tensor's with one
    non-blocking ``copy_`` each, all started before the first wait."""

    def __init__(self) -> None:
        self.jobs: list[tuple[np.ndarray, torch.Tensor]] = []

    def __call__(self, dst: np.ndarray, t: torch.Tensor) -> None:
        self.jobs.append((dst, t))

    def run(self) -> None:
        pairs: list[tuple[np.ndarray, np.ndarray]] = []
        for dst, t in self.jobs:
            if t.device.type != "cpu" or not t.is_contiguous():
                copy_into(dst, t)
            else:
                pairs.append((dst, view(t)))
        copy_all(pairs)
        synchronize(t for _, t in self.jobs)


def owned(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Writable copies of (memory-mapped) CPU tensors in the process's own memory, copied on every core."""
    out = [torch.empty_like(t) for t in tensors]
    copy_all([(view(o), view(t)) for o, t in zip(out, tensors)])
    return out


def synchronize(tensors: Any) -> None:
    """Waits for the non-blocking device-to-host copies started by :func:`copy_into`."""
    if torch.cuda.is_available() and any(t.device.type == "cuda" for t in tensors):
        torch.cuda.synchronize()


def allocate(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """A staging buffer: pinned host memory where CUDA is available (device copies run at full speed)."""
    if not torch.cuda.is_available():
        return np.empty(shape, dtype)
    raw = torch.empty(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, dtype=torch.uint8, pin_memory=True)
    return raw.numpy().view(dtype).reshape(shape)  # the array keeps the pinned tensor alive


def tensor(array: np.ndarray) -> torch.Tensor:
    """A saved array as a tensor over the same memory (read-only: callers copy out of it)."""
    for dtype, (name, _, _) in _EXOTIC.items():
        if array.dtype.name == name:
            return _as_torch(array, dtype)
    return _as_torch(array, torch.float32)  # from_numpy keeps the array's own dtype; only exotic ones need it
