"""What one checkpoint holds, read from its manifest and its safetensors headers only (``keepbest show``).

A checkpoint is named as the CLI names it: its path or URL (a checkpoint
folder, a Keras file), or a folder of checkpoints with ``@`` and a reference:
``runs/a@v3``, ``runs/a@3``, ``runs/a@best``, ``runs/a@latest``, an alias set
by ``keepbest promote``, or a checkpoint name (``runs/a@ckpt-0004``).

The tensor table comes from each safetensors file's header (its 8-byte length,
then the JSON), read with ranged reads: the data is never read, and no
framework is imported.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbest import CheckpointManager
    >>> folder = tempfile.mkdtemp()
    >>> _ = CheckpointManager(folder).save(1, {"w": np.zeros((2, 3), np.float32)})
    >>> ckpt = checkpoint_at(folder + "@latest")
    >>> [(t.name, t.dtype, t.shape, t.nbytes) for t in tensors_of(ckpt)]
    [('w', 'F32', (2, 3), 24)]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from keepbest import codec
from keepbest.checkpoint import Checkpoint
from keepbest.discovery import Found, find
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.manifest import FileEntry
from keepbest.series import SeriesIndex, resolve
from keepbest.store import Reader


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file's header describes it."""

    name: str
    dtype: str
    """The safetensors dtype code (``F32``, ``BF16``, ``I64`` ...)."""
    shape: tuple[int, ...]
    nbytes: int
    file: str
    """The checkpoint file (shard) that holds it."""
    group: str | None = None
    """``trainable``, ``frozen`` (or ``buffer``, for PyTorch) where the writer recorded it, else None."""
    offset: int = 0
    """Where its bytes start in ``file``."""


def split_ref(spec: str) -> tuple[str, str | None]:
    """``"runs/a@v3"`` -> ``("runs/a", "v3")``; a spec without ``@REF`` (or whose ``@`` is followed by a ``/``)
    is a location alone."""
    location, at, ref = spec.rpartition("@")
    if not at or not location or not ref or "/" in ref:
        return spec, None
    return location, ref


def checkpoint_at(spec: str | os.PathLike[str], series: str | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> Checkpoint:
    """The committed checkpoint that ``spec`` names (see the module docstring).

    Raises :class:`CheckpointNotFoundError` naming what is available when
    nothing matches, and :class:`CorruptCheckpointError` when the checkpoint
    named cannot be used (its manifest is unreadable or its data is missing).
    """
    spec = os.fspath(spec)
    location, ref = split_ref(spec)
    found = find(location, storage_options)
    if found.name is not None:
        if ref is not None:
            raise ValueError(f"{found.store.where(found.name)} is one checkpoint, so '@{ref}' cannot pick another. "
                             f"Pass the folder that holds it with @{ref}, or the checkpoint alone. Received: {spec}")
        if found.checkpoints:
            return found.checkpoints[0]
        if found.damaged:
            raise CorruptCheckpointError(found.damaged[0].reason)
        raise CheckpointNotFoundError(
            f"{found.store.where(found.name)} is not a keepbest checkpoint: it has no manifest (a file keepbest did "
            f"not write). Inspect it with the tool that wrote it. Received: {spec}")
    if not found.store.exists():
        raise _not_found(spec, found, "does not exist")
    if ref is None:
        raise _not_found(spec, found, f"is a folder of {len(found.checkpoints)} checkpoint(s), not one; name one with "
                                      "@REF (@latest, @best, @v3) or pass its path")
    return _pick(spec, found, ref, series)


def _pick(spec: str, found: Found, ref: str, series: str | None) -> Checkpoint:
    named = [c for c in found.checkpoints if c.name == ref and (series is None or c.manifest.series == series)]
    if named:
        return named[-1]
    for unusable in found.damaged:
        if unusable.name == ref:
            raise CorruptCheckpointError(unusable.reason)
    names = sorted({c.manifest.series for c in found.checkpoints})
    if series is not None and series not in names:
        raise CheckpointNotFoundError(f"{found.store.where()} has no series '{series}'. Pass one of its series. "
                                      f"Available: {', '.join(names) or 'none'}. Received: --series {series}")
    hits, misses = [], []
    for s in [series] if series is not None else names:
        manifests = [c.manifest for c in found.checkpoints if c.manifest.series == s]
        try:
            chosen = resolve(SeriesIndex(found.store, s).current(manifests), manifests, ref)
        except CheckpointNotFoundError as e:
            misses.append(str(e))
            continue
        hits.append(next(c for c in found.checkpoints if c.name == chosen.name))
    if len(hits) > 1:
        raise CheckpointNotFoundError(
            f"'{ref}' names a checkpoint in each of several series in {found.store.where()}, so which one is meant is "
            f"ambiguous. Pass --series. Available: {', '.join(names)}. Received: {spec}")
    if not hits:
        damaged = "".join(f" Not usable: {d.name}: {d.reason}" for d in found.damaged)
        note = found.unmanaged_note()
        why = " ".join(misses) or "it holds no keepbest checkpoint."
        raise CheckpointNotFoundError(f"No checkpoint '{ref}' in {found.store.where()}: {why} Checkpoints: "
                                      f"{', '.join(c.name for c in found.checkpoints) or 'none'}.{damaged}"
                                      f"{' ' + note if note else ''} Received: {spec}")
    return hits[0]


def _not_found(spec: str, found: Found, why: str) -> CheckpointNotFoundError:
    if not found.store.exists():  # a checkpoint path that is not there: say what its folder holds
        found = find(found.store.parent())
    note = found.unmanaged_note()
    return CheckpointNotFoundError(
        f"No checkpoint at {spec}: the path {why}. Available in {found.store.where()}: "
        f"{', '.join(c.name for c in found.checkpoints) or 'none'}.{' ' + note if note else ''} Received: {spec}")


def tensor_files(ckpt: Checkpoint) -> list[FileEntry]:
    """The checkpoint's safetensors files (main files and shards), in manifest order."""
    return [f for f in ckpt.manifest.files if f.path.endswith(".safetensors")]


def read_header(reader: Reader, entry: FileEntry) -> tuple[dict[str, Any], dict[str, str], int]:
    """The validated header of ``entry`` (tensor entries, metadata, where data starts), by two ranged reads."""
    where = reader.where(entry.path)
    length = codec.header_length(reader.read_range(entry.path, 0, 8), entry.size, where)
    raw = reader.read_range(entry.path, 8, length)
    if len(raw) != length:
        raise CorruptCheckpointError(f"Cannot read the header of {where}: the file ended after {len(raw)} of its "
                                     f"{length} header bytes (truncated). Load another checkpoint. "
                                     f"Received: size={entry.size}")
    entries, metadata = codec.parse_header(raw, entry.size, where)
    return entries, metadata, 8 + length


def tensors_of(ckpt: Checkpoint, reader: Reader | None = None,
               files: list[FileEntry] | None = None) -> list[TensorInfo]:
    """The tensors of ``ckpt``'s safetensors files (or of ``files`` only), from their headers alone.

    Empty for a checkpoint in a Keras format (``.keras``, ``.h5``): those hold no safetensors files.
    """
    reader = reader or ckpt.reader()
    chosen = tensor_files(ckpt) if files is None else files
    headers = {e.path: read_header(reader, e) for e in chosen}
    groups: dict[str, str] = {}  # labels recorded in a main file also cover its shards
    for _entries, meta, _start in headers.values():
        groups.update(_groups(meta))
    out = []
    for entry in chosen:
        entries, meta, start = headers[entry.path]
        own = _groups(meta)  # a file's own labels first: names are unique within a file only
        for name, info in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, stop = info["data_offsets"]
            out.append(TensorInfo(name, info["dtype"], tuple(info["shape"]), stop - begin, entry.path,
                                  own.get(name) or groups.get(name) or None, start + begin))
    return out


def _groups(meta: Mapping[str, str]) -> dict[str, str]:
    if codec.GROUPS_KEY not in meta:
        return {}
    try:
        doc = json.loads(meta[codec.GROUPS_KEY])
    except ValueError:
        return {}  # a label is a nicety of the table, never a reason to refuse to show the tensors
    if not isinstance(doc, dict):
        return {}
    return {str(n): str(label) for label, names in doc.items() if isinstance(names, list) for n in names}


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """The manifest of ``ckpt`` as a JSON-able document (what ``keepbest show --json`` prints first)."""
    m = ckpt.manifest
    return {
        "name": m.name, "location": ckpt.location, "series": m.series, "version": m.version,
        "aliases": list(ckpt.aliases), "best": ckpt.is_best, "format": m.format, "layout": m.layout,
        "step": m.step, "epoch": m.epoch, "batch": m.batch,
        "metrics": {k: (v if v == v and abs(v) != float("inf") else str(v)) for k, v in m.metrics.items()},
        "monitor": None if m.monitor is None else {"name": m.monitor.name, "mode": m.monitor.mode},
        "created": m.created, "size": ckpt.size,
        "files": [{"path": f.path, "size": f.size, f.algorithm: f.digest} for f in m.files],
        "versions": dict(m.versions), "extra": dict(m.extra),
    }
