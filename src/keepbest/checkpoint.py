"""What a checkpoint is: the payload that writes it, the committed record, and finding them.

``Payload``/``TensorPayload`` write one checkpoint's files into a staged
path; ``Checkpoint`` is a committed one (its manifest and where it lives);
``list_checkpoints``/``find_checkpoints`` read what a folder holds, with the
best of each series marked; ``first_verified`` picks what may be loaded.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from keepbest import _digest, _fs, codec, evaluation
from keepbest.errors import CorruptCheckpointError
from keepbest.manifest import FileEntry, Manifest
from keepbest.policy import Candidate, best_candidate
from keepbest.storage import MANIFEST_NAME, LocalStore


class Payload(Protocol):
    """Something that writes one checkpoint's bytes into a staged path.

    A *detached* payload holds its own copy of the state (a snapshot), so its
    ``write`` may run on the writer thread after ``save_async`` returned; any
    other payload is written on the caller's thread and only the commit
    (fsync, hashing where needed, rename, retention) runs in the background.
    """

    @property
    def detached(self) -> bool:
        """True when ``write`` reads nothing the caller may still change."""
        ...

    @property
    def layout(self) -> str:
        """"file": ``write`` creates the file ``target``; "dir": it fills the new folder ``target``."""
        ...

    @property
    def format(self) -> str:
        """What wrote the payload, recorded in the manifest (e.g. "keras", "tensors")."""
        ...

    def write(self, target: Path) -> tuple[FileEntry, ...]:
        """Writes the payload; returns file entries when it hashed while writing, else ()."""
        ...


@dataclass(frozen=True)
class TensorPayload:
    """Named safetensors files and JSON files, written into one checkpoint folder.

    Tensors of 1 MiB or more go to shard files beside their file
    (``model-00001.safetensors``, listed in its metadata; ``codec.read_file``
    reads them back with it), cut where ``groups`` changes (e.g. frozen and
    trainable weights). With ``base`` (the previous checkpoint's files), a
    file whose bytes are unchanged is hard-linked to the committed one
    instead of written again: a frozen backbone costs no write. Each
    checkpoint stays a complete folder that loads and verifies alone.
    """

    tensors: Mapping[str, Mapping[str, np.ndarray]]
    json_files: Mapping[str, Any] | None = None
    metadata: Mapping[str, Mapping[str, str]] | None = None
    format: str = "tensors"
    layout: str = "dir"
    detached: bool = False
    groups: Mapping[str, Mapping[str, str]] | None = None
    """Per file, tensor name -> group label; shards never mix groups."""
    base: Mapping[str, tuple[Path, FileEntry]] | None = None
    """Committed files that an unchanged file may be linked to, by relative path."""

    def write(self, target: Path) -> tuple[FileEntry, ...]:
        target.mkdir()
        entries = []
        for fname, tensors in self.tensors.items():
            main, shards = codec.plan_shards(tensors, (self.groups or {}).get(fname))
            metadata = dict((self.metadata or {}).get(fname) or {})
            names = [codec.shard_name(fname, i + 1) for i in range(len(shards))]
            if names:
                metadata[codec.SHARDS_KEY] = json.dumps(names)
            for shard, members in zip(names, shards):
                entries.append(self._write_or_link(target, shard, codec.encode({k: tensors[k] for k in members})))
            entries.append(self._write_or_link(target, fname, codec.encode({k: tensors[k] for k in main}, metadata)))
        for fname, doc in (self.json_files or {}).items():
            data = json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")
            (target / fname).write_bytes(data)
            h = _digest.new()
            h.update(data)
            entries.append(FileEntry(path=fname, size=len(data), digest=h.hexdigest()))
        return tuple(sorted(entries, key=lambda e: e.path))

    def _write_or_link(self, target: Path, rel: str, encoded: codec.Encoded) -> FileEntry:
        previous = (self.base or {}).get(rel)
        digest = None
        if previous is not None and previous[1].size == encoded.size and previous[1].algorithm == _digest.DEFAULT:
            digest = encoded.digest()
            # The committed file is re-hashed first: a damaged one is written afresh, never inherited.
            if digest == previous[1].digest and _intact(*previous) and _fs.hard_link(previous[0], target / rel):
                return FileEntry(path=rel, size=encoded.size, digest=digest)
        size, digest = codec.write_encoded(target / rel, encoded, digest)
        return FileEntry(path=rel, size=size, digest=digest)


def _intact(path: Path, entry: FileEntry) -> bool:
    try:
        return _digest.of_file(path, entry.algorithm) == (entry.size, entry.digest)
    except FileNotFoundError:
        return False



@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: its manifest and where it lives."""

    manifest: Manifest
    path: Path
    is_best: bool = False
    evaluations: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """``{evaluator: record}``: what sidecar evaluators recorded for this very checkpoint."""
    aliases: tuple[str, ...] = ()
    """The aliases that name this version of its series (``latest``, ``best``, ``epoch_3``, user aliases)."""

    @property
    def version(self) -> int | None:
        """The version number within the series (v0, v1, ...); None for checkpoints of keepbest < 0.3."""
        return self.manifest.version

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def step(self) -> int | None:
        return self.manifest.step

    @property
    def epoch(self) -> int | None:
        return self.manifest.epoch

    @property
    def batch(self) -> int | None:
        return self.manifest.batch

    @property
    def metrics(self) -> Mapping[str, float]:
        return self.manifest.metrics

    @property
    def size(self) -> int:
        return sum(f.size for f in self.manifest.files)


def best_by(manifests: Sequence[Manifest], metric: str, mode: str | None = None) -> Manifest | None:
    """The best of the manifests that recorded ``metric`` as their monitor.

    ``mode`` defaults to the one the newest of them recorded (a restart that
    has not resolved an "auto" mode yet). NaN and inf never win.
    """
    scored = sorted((m for m in manifests if m.monitor and m.monitor.name == metric), key=lambda m: m.created)
    if not scored:
        return None
    found = best_candidate([Candidate(m.name, m.created, m.monitor_value) for m in scored],
                           mode or scored[-1].monitor.mode)  # type: ignore[union-attr]
    return next((m for m in scored if found is not None and m.name == found.key), None)


def mark_best(manifests: Sequence[Manifest], root: Path) -> list[Checkpoint]:
    """Checkpoints in commit order; within each series the best by its own monitor is marked."""
    best_keys: set[str] = set()
    for series in {m.series for m in manifests}:
        members = [m for m in manifests if m.series == series]
        for metric in {m.monitor.name for m in members if m.monitor}:
            best = best_by(members, metric)
            if best is not None:
                best_keys.add(best.name)
    ordered = sorted(manifests, key=lambda m: (m.created, m.name))
    return [Checkpoint(m, root / m.name, m.name in best_keys) for m in ordered]


def find_checkpoints(path: str | os.PathLike[str]) -> tuple[LocalStore, list[Checkpoint]]:
    """The checkpoints at ``path``: a checkpoint folder itself, or a folder holding checkpoints."""
    p = Path(path)
    # One checkpoint: a folder with its manifest inside, or a Keras file indexed beside it.
    from keepbest import aliases  # it builds on this module (best_by), so it is imported at call time

    single = (p / MANIFEST_NAME).is_file() or p.is_file()
    store = LocalStore(p.parent if single else p)
    manifests = store.list().manifests
    ckpts = [c for c in mark_best(manifests, store.root) if not single or c.name == p.name]
    return store, _with_evaluations(store, aliases.annotate(store.root, manifests, ckpts))


def _with_evaluations(store: LocalStore, ckpts: list[Checkpoint]) -> list[Checkpoint]:
    records = evaluation.read_records(store.root)
    if not records:
        return ckpts
    return [replace(c, evaluations=records.get(evaluation.commit_id(c.manifest), {})) for c in ckpts]


def list_checkpoints(path: str | os.PathLike[str]) -> list[Checkpoint]:
    """The committed checkpoints at ``path`` (a folder of checkpoints, one checkpoint, or a Keras file).

    Oldest first; in each series the best by its recorded monitor has ``is_best``.
    """
    return find_checkpoints(path)[1]


def first_verified(store: LocalStore, candidates: Sequence[Checkpoint], *, wanted: str,
                   failures: Sequence[CorruptCheckpointError] = ()) -> Checkpoint:
    """The first of ``candidates`` whose files verify.

    With one candidate its failure is raised as is. With more (a fallback),
    each that fails is skipped and, once one verifies, a warning names what
    was skipped; ``failures`` are earlier ones to report (a damaged manifest).
    """
    skipped = list(failures)
    for candidate in candidates:
        try:
            store.verify(candidate.manifest)
        except CorruptCheckpointError as e:
            if len(candidates) == 1 and not skipped:
                raise
            skipped.append(e)
            continue
        if skipped:
            warnings.warn(f"Loading {candidate.path} instead of {wanted}, the newest checkpoint that verifies "
                          f"(fallback=True). Skipped: {' | '.join(map(str, skipped))}", UserWarning, stacklevel=3)
        return candidate
    raise CorruptCheckpointError(
        f"No checkpoint for {wanted} verifies, so nothing was loaded (fallback=True tried {len(skipped)}). "
        f"Restore the files from a copy. Received: {' | '.join(map(str, skipped))}"
    )
