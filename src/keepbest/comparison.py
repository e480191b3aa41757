"""Tensor by tensor, how two checkpoints differ (``keepbest diff``).

A file whose digest is the same in both checkpoints holds the same bytes, so
its data is never read: only its header, from the first checkpoint, for the
names of its tensors. Files that differ are verified against their manifests
(a damaged file raises :class:`~keepbest.errors.CorruptCheckpointError`, it
never yields a difference), then compared in chunks, so memory stays bounded
for tensors of any size.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbest import CheckpointManager
    >>> from keepbest.inspection import checkpoint_at
    >>> mgr = CheckpointManager(tempfile.mkdtemp())
    >>> _ = mgr.save(1, {"w": np.ones(4, np.float32), "b": np.zeros(2, np.float32)})
    >>> _ = mgr.save(2, {"w": np.ones(4, np.float32), "b": np.array([0, 0.5], np.float32)})
    >>> result = compare(checkpoint_at(mgr.url + "@v0"), checkpoint_at(mgr.url + "@v1"))
    >>> [(c.name, c.status, c.max_abs) for c in result.tensors]
    [('b', 'changed', 0.5), ('w', 'unchanged', None)]
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from keepbest import _digest, codec
from keepbest.checkpoint import Checkpoint
from keepbest.errors import CorruptCheckpointError
from keepbest.inspection import TensorInfo, tensor_files, tensors_of
from keepbest.manifest import FileEntry
from keepbest.store import Reader

CHUNK_ELEMENTS = 1 << 22  # 4 Mi elements per step: a few tens of MB of temporaries whatever the tensor's size


@dataclass(frozen=True)
class TensorChange:
    """How one tensor differs: ``status`` is ``unchanged``, ``changed``, ``added`` or ``removed``."""

    name: str
    status: str
    a: TensorInfo | None
    b: TensorInfo | None
    max_abs: float | None = None
    """For a changed tensor of the same dtype and shape: the largest ``|a - b|``."""
    max_rel: float | None = None
    """... and the largest ``|a - b| / max(|a|, |b|)`` (0 where both are 0)."""
    reason: str = ""
    """Why a changed tensor cannot be compared element by element (its dtype or shape changed)."""

    @property
    def nbytes(self) -> int:
        return max(t.nbytes for t in (self.a, self.b) if t is not None)


@dataclass
class Comparison:
    """The result of :func:`compare`: one entry per tensor name, sorted, and the files read."""

    tensors: list[TensorChange] = field(default_factory=list)
    files_read: list[str] = field(default_factory=list)
    """``a:path`` / ``b:path`` of the files whose data was read (the others' digests were equal)."""
    other_files: dict[str, str] = field(default_factory=dict)
    """The files other than safetensors (a model config, training state) that differ, by their digests: path ->
    ``changed``, ``added`` or ``removed``."""

    @property
    def identical(self) -> bool:
        return all(c.status == "unchanged" for c in self.tensors) and not self.other_files

    def summary(self) -> str:
        """``"1 of 14 tensors changed, 0.4% of bytes"`` (and the added and removed ones)."""
        counts = {s: sum(c.status == s for c in self.tensors) for s in ("changed", "added", "removed")}
        total = sum(c.nbytes for c in self.tensors)
        moved = sum(c.nbytes for c in self.tensors if c.status != "unchanged")
        parts = [f"{counts['changed']} of {len(self.tensors)} tensors changed"]
        parts += [f"{n} {s}" for s, n in counts.items() if n and s != "changed"]
        share = 100.0 * moved / total if total else 0.0
        others = f"; {len(self.other_files)} other file(s) differ" if self.other_files else ""
        return ", ".join(parts) + f", {share:.1f}% of bytes" + others


def compare(a: Checkpoint, b: Checkpoint, progress: Callable[[int], None] | None = None) -> Comparison:
    """How ``b`` differs from ``a``, tensor by tensor (see the module docstring).

    ``progress(n)`` is called with the bytes of each tensor compared.
    """
    for ckpt in (a, b):
        if not tensor_files(ckpt):
            raise ValueError(f"Cannot compare {ckpt.location} tensor by tensor: it holds no safetensors files (format "
                             f"'{ckpt.manifest.format}'; Keras's .keras and .h5 keep tensors in HDF5). Compare "
                             f"checkpoints saved as keepbest folders. Received: files={[f.path for f in ckpt.manifest.files]}")
    ra, rb = a.reader(), b.reader()
    fa, fb = {f.path: f for f in tensor_files(a)}, {f.path: f for f in tensor_files(b)}
    same = {p for p in fa if p in fb and (fa[p].digest, fa[p].algorithm) == (fb[p].digest, fb[p].algorithm)}
    la = tensors_of(a, ra)
    # The tensors of identical files are named by the first checkpoint's header: their data is never read.
    lb = tensors_of(b, rb, [f for f in fb.values() if f.path not in same]) + [t for t in la if t.file in same]
    # Names are unique within a file only (PyTorch's entries each have a `weight`): a name held by several
    # files is compared as `file:name`, so one file's tensor is never compared with another's.
    shared = {n for side in (la, lb) for n, count in Counter(t.name for t in side).items() if count > 1}

    def key(t: TensorInfo) -> str:
        return f"{t.file}:{t.name}" if t.name in shared else t.name

    ta, tb = {key(t): t for t in la}, {key(t): t for t in lb}
    out = Comparison(other_files=_other_files(a, b))
    buffers: dict[str, Any] = {}

    def data(side: str, reader: Reader, entry: FileEntry) -> Any:
        key = f"{side}:{entry.path}"
        if key not in buffers:
            buffers[key] = _verified(reader, entry)
            out.files_read.append(key)
        return buffers[key]

    for name in sorted(set(ta) | set(tb)):
        x, y = ta.get(name), tb.get(name)
        if x is None or y is None:
            out.tensors.append(TensorChange(name, "added" if x is None else "removed", x, y))
            continue
        if x.file in same and y.file == x.file and y is x:
            out.tensors.append(TensorChange(name, "unchanged", x, y))
            continue
        if (x.dtype, x.shape) != (y.dtype, y.shape):
            why = f"dtype {x.dtype} -> {y.dtype}" if x.dtype != y.dtype else f"shape {list(x.shape)} -> {list(y.shape)}"
            out.tensors.append(TensorChange(name, "changed", x, y, reason=why))
            continue
        out.tensors.append(_numeric(name, x, y, data("a", ra, fa[x.file]), data("b", rb, fb[y.file])))
        if progress is not None:
            progress(x.nbytes)
    return out


def _other_files(a: Checkpoint, b: Checkpoint) -> dict[str, str]:
    oa = {f.path: (f.digest, f.algorithm) for f in a.manifest.files if not f.path.endswith(".safetensors")}
    ob = {f.path: (f.digest, f.algorithm) for f in b.manifest.files if not f.path.endswith(".safetensors")}
    return {p: "added" if p not in oa else "removed" if p not in ob else "changed"
            for p in sorted(set(oa) | set(ob)) if oa.get(p) != ob.get(p)}


def _verified(reader: Reader, entry: FileEntry) -> Any:
    """The bytes of ``entry``, hashed first: a file that differs from its manifest is never compared."""
    buf = reader.buffer(entry.path)
    h = _digest.new(entry.algorithm, threads=True)
    h.update(memoryview(buf))
    if h.hexdigest() != entry.digest or len(buf) != entry.size:
        raise CorruptCheckpointError(
            f"Cannot compare {reader.where(entry.path)}: it does not match its manifest (it was modified or damaged "
            "after it was committed), so its tensors cannot be trusted. Restore the file, or compare other "
            f"checkpoints. Received: size={len(buf)}, expected size={entry.size} {entry.algorithm}={entry.digest[:16]}...")
    return buf


def _numeric(name: str, x: TensorInfo, y: TensorInfo, buf_a: Any, buf_b: Any) -> TensorChange:
    dtype = codec.numpy_dtype(x.dtype)
    count = x.nbytes // dtype.itemsize
    va = np.frombuffer(buf_a, dtype=dtype, count=count, offset=x.offset)
    vb = np.frombuffer(buf_b, dtype=dtype, count=count, offset=y.offset)
    differs, max_abs, max_rel = False, 0.0, 0.0
    for begin in range(0, count, CHUNK_ELEMENTS):
        ca, cb = va[begin : begin + CHUNK_ELEMENTS], vb[begin : begin + CHUNK_ELEMENTS]
        if np.array_equal(ca.view(np.uint8), cb.view(np.uint8)):
            continue
        differs = True
        fa, fb = ca.astype(np.float64), cb.astype(np.float64)
        with np.errstate(all="ignore"):  # inf - inf and NaN: handled just below
            equal = (fa == fb) | (np.isnan(fa) & np.isnan(fb))
            delta = np.where(equal, 0.0, np.abs(fa - fb))
            scale = np.maximum(np.abs(fa), np.abs(fb))
            rel = np.where(equal, 0.0, delta / np.where(scale > 0, scale, 1.0))
        max_abs = _max(max_abs, delta)
        max_rel = _max(max_rel, rel)
    if not differs:
        return TensorChange(name, "unchanged", x, y)
    return TensorChange(name, "changed", x, y, max_abs=max_abs, max_rel=max_rel)


def _max(current: float, values: np.ndarray) -> float:
    """The running maximum; NaN (a NaN on one side only) wins, as it is the largest difference there is."""
    if np.isnan(current) or np.isnan(values).any():
        return float("nan")
    return max(current, float(values.max()))
