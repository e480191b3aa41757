"""Verified copies of a checkpoint (``keepbest export``): into another folder or bucket, or as one
``model.safetensors`` file.

What ``--to`` names decides the kind (:func:`kind_of`): a path ending in
``.safetensors``, ``.keras`` or ``.weights.h5`` is a file, and anything else
without a suffix (or ending in ``/``, or a URL such as ``s3://bucket/run``) is
a folder that receives the checkpoint under its own name. Keras's formats are
written by :mod:`keepbest.keras` (they need Keras and the model config).

Every copy goes through the storage contract: staged, committed with its
digests, then verified where it landed. The source's bytes are hashed as they
are copied (a ``.safetensors`` export verifies the source first): a damaged
source raises :class:`~keepbest.errors.CorruptCheckpointError` and nothing
is left at the destination.

Example:
    >>> import numpy as np, os, tempfile
    >>> from keepbest import CheckpointManager
    >>> from keepbest.inspection import checkpoint_at
    >>> mgr = CheckpointManager(tempfile.mkdtemp())
    >>> _ = mgr.save(1, {"w": np.arange(3, dtype=np.float32)})
    >>> out = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> export_safetensors(checkpoint_at(mgr.url + "@latest"), out).manifest.files[0].path
    'model.safetensors'
"""

from __future__ import annotations

import errno
import json
import time
from dataclasses import replace
from typing import Any, Callable, Mapping

from keepbest import _digest, codec, store as stores
from keepbest.checkpoint import Checkpoint
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from keepbest.manifest import FileEntry, Manifest
from keepbest.series import SeriesIndex
from keepbest.store import Store

KINDS = {".keras": "keras", ".weights.h5": "weights.h5", ".safetensors": "safetensors"}
FOLDER = "folder"
WEIGHTS = "model.safetensors"
"""The file of a checkpoint that holds the model's weights (Keras and PyTorch adapters); without it, every
safetensors file of the checkpoint is exported."""

Progress = Callable[[int], None]


def kind_of(to: str) -> str:
    """``keras``, ``weights.h5``, ``safetensors`` or ``folder``: what ``--to`` asks for.

    Raises ValueError for any other suffix, listing the choices.
    """
    base = to.rstrip("/").rsplit("/", 1)[-1]
    for suffix, kind in KINDS.items():
        if base.endswith(suffix) and not to.endswith("/"):
            return kind
    if to.endswith("/") or "." not in base:
        return FOLDER
    raise ValueError(
        f"Cannot export to {to}: keepbest does not know the format of '{base}'. End the path in .keras (a Keras "
        "model), .weights.h5 (Keras weights), .safetensors (one file of tensors), or name a folder or bucket URL "
        f"(without a suffix, or ending in '/') to copy the checkpoint into. Received: --to {to}")


def file_target(to: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Store, str]:
    """The store of the folder that will hold file ``to``, and the file's name there."""
    here = stores.open(to, storage_options)
    if here.entry_kind() == "dir" or (here.entry_kind() is None and here.exists()):
        raise IsADirectoryError(f"Cannot export to {to}: it is an existing folder. Pass a file path ending in "
                                f"{', '.join(KINDS)}. Received: --to {to}")
    folder = here.parent()
    if here.entry_kind() == "file" and here.basename not in {m.name for m in folder.list().manifests}:
        raise FileExistsError(f"Cannot export to {to}: a file that keepbest did not write is already there, and an "
                              "export never replaces it. Delete or move it, or pass another path. "
                              f"Received: --to {to}")
    return folder, here.basename


def file_manifest(source: Manifest, store: Store, name: str, fmt: str) -> Manifest:
    """The manifest of an export of ``source`` as file ``name`` of ``store``: the source's position, metrics and
    monitor, in a series of its own (the file's name) at its next version."""
    manifests = [m for m in store.list().manifests if m.series == name]
    version = SeriesIndex(store, name).reserve(manifests)
    return Manifest(name=name, layout="file", format=fmt, series=name, step=source.step, epoch=source.epoch,
                    batch=source.batch, metrics=dict(source.metrics), monitor=source.monitor, created=time.time(),
                    versions=dict(source.versions), extra={**source.extra, "exported_from": source.name},
                    version=version)


def commit_verified(store: Store, staged: Any, manifest: Manifest) -> Checkpoint:
    """Commits ``staged`` and verifies what was committed (a copy that fails is deleted, then raised)."""
    committed = store.commit(staged, manifest)
    try:
        store.verify(committed)
    except BaseException:
        withdraw(store, committed)
        raise
    return Checkpoint(committed, store.where(committed.name), store=store)


def withdraw(store: Store, committed: Manifest) -> None:
    """Deletes an export that failed its checks, so that no unverified copy stays visible."""
    try:
        store.delete(committed)
    except CheckpointNotFoundError:  # already gone: what withdrawing it wants
        return


def copy_checkpoint(source: Checkpoint, to: str, storage_options: Mapping[str, Any] | None = None,
                    progress: Progress | None = None) -> Checkpoint:
    """Copies ``source`` into the folder (or bucket prefix) ``to``, under its own name; returns the copy.

    Refuses when ``to`` already holds a checkpoint of that name. Its series,
    version, metrics and files stay as they are; the digests are checked
    against the source's manifest while copying and at the destination after
    the commit.
    """
    dest = stores.open(to, storage_options)
    if dest.entry_kind() is not None:
        raise ValueError(f"Cannot export into {to}: it is a checkpoint itself, not a folder of checkpoints. Pass "
                         f"the folder to copy into. Received: --to {to}")
    m = source.manifest
    there = {d.name for d in dest.list().manifests}
    if m.name in there:
        raise StorageError(errno.EEXIST, f"Cannot export {m.name} into {dest.where()}: it already holds a checkpoint "
                           f"of that name. Delete it, or export into another folder. Received: --to {to}",
                           dest.where(m.name))
    reader = source.reader()
    staged = dest.stage(m.name, m.layout)
    try:
        entries = []
        for entry in m.files:
            buf = reader.buffer(entry.path)
            written = staged.write(entry.path, [memoryview(buf)])
            if entry.algorithm != written.algorithm:  # a manifest of keepbest 0.1 (sha256): hash the source as it was
                check = FileEntry(entry.path, len(buf), _digest.of_bytes(memoryview(buf), entry.algorithm),
                                  entry.algorithm)
            else:
                check = written
            if (check.size, check.digest) != (entry.size, entry.digest):
                raise CorruptCheckpointError(
                    f"Cannot export {source.location}: file {reader.where(entry.path)} does not match its manifest "
                    "(it was modified or damaged after it was committed). Nothing was written to "
                    f"{dest.where()}. Restore the file, or export another checkpoint. Received: size={check.size} "
                    f"{entry.algorithm}={check.digest[:16]}..., expected size={entry.size} "
                    f"{entry.algorithm}={entry.digest[:16]}...")
            entries.append(written)
            if progress is not None:
                progress(entry.size)
    except BaseException:
        dest.discard(staged)
        raise
    version = m.version
    siblings = [d for d in dest.list().manifests if d.series == m.series]
    if version is not None and version in {d.version for d in siblings}:  # keep the number where it is free
        version = SeriesIndex(dest, m.series).reserve(siblings)
    return commit_verified(dest, staged, replace(m, files=tuple(entries), files_under="", version=version))


def export_safetensors(source: Checkpoint, to: str, storage_options: Mapping[str, Any] | None = None,
                       progress: Progress | None = None) -> Checkpoint:
    """Writes the tensors of ``source`` as the one safetensors file ``to`` (its shards merged); returns it.

    The weights file (``model.safetensors``) with its shards when the
    checkpoint has one (the Keras and PyTorch adapters: the model without
    its optimizer state), else every safetensors file. ``to`` is committed
    as a keepbest file checkpoint (``keepbest verify`` checks it) that
    ``safetensors.numpy.load_file`` reads.
    """
    m = source.manifest
    store, name = file_target(to, storage_options)
    if source.store is None:
        raise ValueError(f"Checkpoint {m.name} was built without its store. Received: store=None")
    reader = source.store.verified_reader(m)  # the source is hashed before anything is written
    mains = _main_files(m, reader)
    if not mains:
        raise CheckpointNotFoundError(
            f"Cannot export {source.location} to {to}: it holds no safetensors files (format '{m.format}'). Export "
            f"it to .keras or .weights.h5, or to a folder. Received: files={[f.path for f in m.files]}")
    tensors: dict[str, Any] = {}
    metadata: dict[str, str] = {}
    for rel in mains:
        loaded = codec.load(reader.buffer, rel, reader.where)
        clash = sorted(set(loaded) & set(tensors))
        if clash:
            raise ValueError(f"Cannot merge the tensors of {source.location} into one file: tensor '{clash[0]}' is in "
                             f"two of its files ({', '.join(mains)}). Export to a folder instead. Received: --to {to}")
        tensors.update(loaded)
        _e, meta, _s = codec.decode_header(reader.buffer(rel), reader.where(rel))
        metadata.update({k: v for k, v in meta.items() if k not in (codec.SHARDS_KEY, codec.PIECES_KEY)})
    if len(mains) > 1:
        metadata["keepbest.merged_from"] = json.dumps(mains)
    encoded = codec.encode(tensors, metadata)
    staged = store.stage(name, "file")
    try:
        entry = staged.write(name, encoded.pieces)
    except BaseException:
        store.discard(staged)
        raise
    if progress is not None:
        progress(entry.size)
    return commit_verified(store, staged, file_manifest(m, store, name, "safetensors").with_files((entry,)))


def _main_files(m: Manifest, reader: Any) -> list[str]:
    files = [f.path for f in m.files if f.path.endswith(".safetensors")]
    if WEIGHTS in files:
        return [WEIGHTS]
    shards: set[str] = set()
    for rel in files:
        _e, meta, _s = codec.decode_header(reader.buffer(rel), reader.where(rel))
        shards.update(codec.shards_of(meta, rel, reader.where))
    return [rel for rel in files if rel not in shards]
