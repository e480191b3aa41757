"""The framework-free checkpoint manager.

Example:
    >>> import numpy as np, tempfile
    >>> from keepbest import CheckpointManager, Monitor, KeepLast, KeepBest
    >>> mgr = CheckpointManager(tempfile.mkdtemp(), monitor=Monitor("val_loss", "min"),
    ...                         keep=[KeepLast(2), KeepBest(1)])
    >>> for epoch, loss in enumerate([3.0, 1.0, 2.0, 4.0, 5.0], start=1):
    ...     _ = mgr.save(epoch * 10, {"w": np.full(2, epoch, np.float32)},
    ...                  metrics={"val_loss": loss}, epoch=epoch)
    >>> [c.epoch for c in mgr.checkpoints()], mgr.best.epoch, mgr.load()["w"].tolist()
    ([2, 4, 5], 2, [5.0, 5.0])
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from keepbest import __version__, codec
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.manifest import FileEntry, Manifest, MonitorRecord, is_safe_relative_path
from keepbest.policy import Candidate, KeepBest, KeepLast, KeepRule, Monitor, best_candidate, retained
from keepbest.storage import INDEX_DIR, MANIFEST_NAME, LocalStore

STATE_FILE = "state.safetensors"


class Payload(Protocol):
    """Something that writes one checkpoint's bytes into a staged path."""

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
    """Named safetensors files and JSON files, written into one checkpoint folder."""

    tensors: Mapping[str, Mapping[str, np.ndarray]]
    json_files: Mapping[str, Any] | None = None
    metadata: Mapping[str, Mapping[str, str]] | None = None
    format: str = "tensors"
    layout: str = "dir"

    def write(self, target: Path) -> tuple[FileEntry, ...]:
        target.mkdir()
        entries = []
        for fname, tensors in self.tensors.items():
            size, digest = codec.write_file(target / fname, tensors, (self.metadata or {}).get(fname))
            entries.append(FileEntry(path=fname, size=size, sha256=digest))
        for fname, doc in (self.json_files or {}).items():
            data = json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")
            (target / fname).write_bytes(data)
            entries.append(FileEntry(path=fname, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
        return tuple(sorted(entries, key=lambda e: e.path))


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: its manifest and where it lives."""

    manifest: Manifest
    path: Path
    is_best: bool = False

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
    if (p / MANIFEST_NAME).is_file() or p.is_file():
        store = LocalStore(p.parent)
        return store, [c for c in mark_best(store.list().manifests, p.parent) if c.name == p.name]
    store = LocalStore(p)
    return store, mark_best(store.list().manifests, p)


def list_checkpoints(path: str | os.PathLike[str]) -> list[Checkpoint]:
    """The committed checkpoints at ``path`` (a folder of checkpoints, one checkpoint, or a Keras file).

    Oldest first; in each series the best by its recorded monitor has ``is_best``.
    """
    return find_checkpoints(path)[1]


def _check_readable(manifest: Manifest) -> None:
    """Refuses, before anything is written, a manifest that readers would reject."""
    try:
        Manifest.from_json(manifest.to_json(), source=f"the manifest of {manifest.name}")
    except (CorruptCheckpointError, TypeError, ValueError) as e:
        raise ValueError(f"Cannot save checkpoint {manifest.name}: {e}".replace(
            "The checkpoint cannot be trusted: load another one, or restore or delete it. ",
            "Pass epoch/batch as int, metrics as numbers and versions as strings. ")) from None


def environment_versions() -> dict[str, str]:
    return {"keepbest": __version__, "python": platform.python_version(), "numpy": np.__version__}


class CheckpointManager:
    """Saves, lists, loads and prunes the checkpoints of one series in one directory.

    Args:
        directory: where checkpoints live (created on the first save).
        monitor: the metric that defines "best"; without it there is no best.
        keep: retention rules (``KeepLast``, ``KeepBest``), combined as a union.
            Without rules nothing is deleted. The newest and the best are
            always kept.
        series: groups the checkpoints this manager owns, so several writers
            can share a directory without pruning each other's files.

    The best value and retention state are not stored separately: they are
    recomputed from the committed manifests, so a new manager on an existing
    directory continues where the previous one stopped. Leftovers of a
    crashed writer are cleaned up when the manager starts.
    """

    def __init__(self, directory: str | os.PathLike[str], *, monitor: Monitor | None = None,
                 keep: Sequence[KeepRule] = (), series: str = "ckpt") -> None:
        if any(not isinstance(rule, (KeepLast, KeepBest)) for rule in keep):
            raise TypeError(f"keep must be a list of KeepLast/KeepBest rules. Received: keep={keep!r}")
        if monitor is None and any(isinstance(rule, KeepBest) for rule in keep):
            raise ValueError("KeepBest needs a monitor to rank checkpoints. Pass monitor=Monitor(name, mode). "
                             f"Received: keep={list(keep)!r}, monitor=None")
        self.store = LocalStore(directory)
        self.monitor = monitor
        self.keep = tuple(keep)
        self.series = series
        self.recovery = self.store.recover() if self.store.root.is_dir() else None

    @property
    def directory(self) -> Path:
        return self.store.root

    # -- reading ----------------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
        """This series' committed checkpoints, oldest first; ``is_best`` by this manager's monitor."""
        return self._as_checkpoints(self._mine())

    def _mine(self) -> list[Manifest]:
        return [m for m in self.store.list().manifests if m.series == self.series]

    def _as_checkpoints(self, manifests: Sequence[Manifest]) -> list[Checkpoint]:
        best = best_by(manifests, self.monitor.name, self.monitor.mode) if self.monitor else None
        return [Checkpoint(m, self.store.root / m.name, best is not None and m.name == best.name)
                for m in sorted(manifests, key=lambda m: (m.created, m.name))]

    def _value(self, m: Manifest) -> float | None:
        if self.monitor is None or m.monitor is None or m.monitor.name != self.monitor.name:
            return None
        return m.monitor_value

    def recorded_best(self, metric: str) -> Checkpoint | None:
        """This series' best checkpoint by ``metric``, in the mode its manifests recorded.

        Used on restart, before the caller has resolved an ``"auto"`` mode.
        """
        best = best_by(self._mine(), metric)
        return None if best is None else Checkpoint(best, self.store.root / best.name, True)

    @property
    def latest(self) -> Checkpoint | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    @property
    def best(self) -> Checkpoint | None:
        return next((c for c in self.checkpoints() if c.is_best), None)

    @property
    def best_value(self) -> float | None:
        best = self.best
        return None if best is None else self._value(best.manifest)

    def get(self, step: int | None = None) -> Checkpoint:
        """The latest checkpoint, or the newest one at ``step``."""
        ckpts = self.checkpoints()
        if step is not None:
            ckpts = [c for c in ckpts if c.step == step]
        if not ckpts:
            where = "at step %d " % step if step is not None else ""
            available = ", ".join(str(c.step) for c in self.checkpoints()) or "none"
            raise CheckpointNotFoundError(
                f"No checkpoint {where}in {self.directory} (series '{self.series}'). "
                f"Save one first or pick an available step. Available: {available}."
            )
        return ckpts[-1]

    def load(self, step: int | None = None) -> dict[str, np.ndarray]:
        """The tensors of the latest checkpoint (or of ``step``), verified against the manifest."""
        ckpt = self.get(step)
        self.store.verify(ckpt.manifest)
        if STATE_FILE not in {f.path for f in ckpt.manifest.files}:
            raise CheckpointNotFoundError(
                f"Checkpoint {ckpt.path} holds no {STATE_FILE} (it is a '{ckpt.manifest.format}' "
                f"checkpoint). Load it with the adapter that wrote it, e.g. keepbest.keras.load_model. "
                f"Received: files={[f.path for f in ckpt.manifest.files]}"
            )
        return codec.read_file(ckpt.path / STATE_FILE)

    # -- writing ----------------------------------------------------------------
    def save(self, step: int | None, state: Mapping[str, np.ndarray] | Payload, *,
             metrics: Mapping[str, float] | None = None, epoch: int | None = None,
             batch: int | None = None, name: str | None = None,
             extra: Mapping[str, Any] | None = None,
             versions: Mapping[str, str] | None = None) -> Checkpoint:
        """Commits one checkpoint atomically, then applies retention.

        ``state`` is a flat mapping of arrays (stored as ``state.safetensors``)
        or a :class:`Payload` that writes its own files. A checkpoint with the
        same ``name`` is replaced only once the new one is complete.
        """
        payload: Payload = TensorPayload({STATE_FILE: state}) if isinstance(state, Mapping) else state
        if name is None and step is None:
            raise ValueError("CheckpointManager.save needs a step or a name to name the checkpoint. "
                             "Received: step=None, name=None")
        name = name or f"{self.series}-{step:09d}"
        if not is_safe_relative_path(name) or "/" in name or name.startswith((".keepbest", INDEX_DIR)):
            raise ValueError(
                f"Checkpoint name {name!r} is not a plain file or folder name, or is reserved by keepbest "
                "(names starting with '.keepbest'). Pass a name without '/' or '..'. "
                f"Received: name={name!r}"
            )
        manifest = Manifest(
            name=name, layout=payload.layout, format=payload.format, series=self.series,
            step=step, epoch=epoch, batch=batch,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            monitor=MonitorRecord(self.monitor.name, self.monitor.mode) if self.monitor else None,
            created=time.time(),
            versions={**environment_versions(), **(versions or {})}, extra=dict(extra or {}),
        )
        _check_readable(manifest)
        staged = self.store.stage(name)
        try:
            entries = payload.write(staged)
        except BaseException:
            self.store.discard(staged)
            raise
        committed = self.store.commit(staged, manifest.with_files(entries))
        # One listing serves retention and the returned checkpoint; the new one is never pruned,
        # even if the clock went back.
        kept = self._prune(self._mine(), protect=name)
        return next((c for c in self._as_checkpoints(kept) if c.name == name),
                    Checkpoint(committed, self.store.root / name))

    def prune(self) -> list[str]:
        """Deletes this series' checkpoints that no retention rule keeps; returns their names."""
        mine = self._mine()
        kept = {m.name for m in self._prune(mine)}
        return [m.name for m in sorted(mine, key=lambda m: m.created) if m.name not in kept]

    def _prune(self, mine: list[Manifest], protect: str | None = None) -> list[Manifest]:
        """Deletes, oldest first, what the rules drop from ``mine``; returns the rest."""
        if not self.keep:
            return mine
        cands = [Candidate(m.name, m.created, self._value(m)) for m in mine]
        keep = retained(cands, self.keep, self.monitor.mode if self.monitor else None) | {protect}
        for m in sorted((m for m in mine if m.name not in keep), key=lambda m: m.created):
            self.store.delete(m)
        return [m for m in mine if m.name in keep]
