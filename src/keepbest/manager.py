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

import json
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from keepbest import __version__, _digest, codec
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.manifest import FileEntry, Manifest, MonitorRecord, is_safe_relative_path
from keepbest.policy import Candidate, KeepBest, KeepLast, KeepRule, Monitor, best_candidate, retained
from keepbest.storage import INDEX_DIR, MANIFEST_NAME, LocalStore
from keepbest.writer import AsyncWriter, SaveHandle

STATE_FILE = "state.safetensors"


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
    """Named safetensors files and JSON files, written into one checkpoint folder."""

    tensors: Mapping[str, Mapping[str, np.ndarray]]
    json_files: Mapping[str, Any] | None = None
    metadata: Mapping[str, Mapping[str, str]] | None = None
    format: str = "tensors"
    layout: str = "dir"
    detached: bool = False

    def write(self, target: Path) -> tuple[FileEntry, ...]:
        target.mkdir()
        entries = []
        for fname, tensors in self.tensors.items():
            size, digest = codec.write_file(target / fname, tensors, (self.metadata or {}).get(fname))
            entries.append(FileEntry(path=fname, size=size, digest=digest))
        for fname, doc in (self.json_files or {}).items():
            data = json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")
            (target / fname).write_bytes(data)
            h = _digest.new()
            h.update(data)
            entries.append(FileEntry(path=fname, size=len(data), digest=h.hexdigest()))
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
        writer: the background writer to use (several managers may share one,
            so that one training loop has one save in flight); by default the
            manager has its own.

    The best value and retention state are not stored separately: they are
    recomputed from the committed manifests, so a new manager on an existing
    directory continues where the previous one stopped. Leftovers of a
    crashed writer are cleaned up when the manager starts.
    """

    def __init__(self, directory: str | os.PathLike[str], *, monitor: Monitor | None = None,
                 keep: Sequence[KeepRule] = (), series: str = "ckpt", writer: AsyncWriter | None = None) -> None:
        if any(not isinstance(rule, (KeepLast, KeepBest)) for rule in keep):
            raise TypeError(f"keep must be a list of KeepLast/KeepBest rules. Received: keep={keep!r}")
        if monitor is None and any(isinstance(rule, KeepBest) for rule in keep):
            raise ValueError("KeepBest needs a monitor to rank checkpoints. Pass monitor=Monitor(name, mode). "
                             f"Received: keep={list(keep)!r}, monitor=None")
        self.store = LocalStore(directory)
        self.monitor = monitor
        self.keep = tuple(keep)
        self.series = series
        self.writer = writer or AsyncWriter()
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

    def _as_checkpoints(self, manifests: Sequence[Manifest], monitor: Monitor | None = None) -> list[Checkpoint]:
        monitor = monitor or self.monitor
        best = best_by(manifests, monitor.name, monitor.mode) if monitor else None
        return [Checkpoint(m, self.store.root / m.name, best is not None and m.name == best.name)
                for m in sorted(manifests, key=lambda m: (m.created, m.name))]

    def _value(self, m: Manifest, monitor: Monitor | None = None) -> float | None:
        monitor = monitor or self.monitor
        if monitor is None or m.monitor is None or m.monitor.name != monitor.name:
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

    def load(self, step: int | None = None, *, fallback: bool = False) -> dict[str, np.ndarray]:
        """The tensors of the latest checkpoint (or of ``step``), verified against the manifest.

        With ``fallback``, a checkpoint that fails verification is skipped (with
        a warning) for the next newest one that verifies.
        """
        ckpt = self.get(step)
        others = [c for c in reversed(self.checkpoints()) if c.name != ckpt.name] if fallback else []
        return self._tensors(first_verified(self.store, [ckpt, *others], wanted=str(ckpt.path)))

    def _tensors(self, ckpt: Checkpoint) -> dict[str, np.ndarray]:
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
        """Commits one checkpoint atomically, then applies retention; returns it.

        ``state`` is a flat mapping of arrays (stored as ``state.safetensors``)
        or a :class:`Payload` that writes its own files. A checkpoint with the
        same ``name`` is replaced only once the new one is complete. This is
        :meth:`save_async` waited for, without the snapshot copy (the caller
        is blocked, so its arrays cannot change meanwhile).
        """
        return self._submit(step, state, snapshot=False, metrics=metrics, epoch=epoch, batch=batch,
                            name=name, extra=extra, versions=versions).result()

    def save_async(self, step: int | None, state: Mapping[str, np.ndarray] | Payload, *,
                   metrics: Mapping[str, float] | None = None, epoch: int | None = None,
                   batch: int | None = None, name: str | None = None,
                   extra: Mapping[str, Any] | None = None,
                   versions: Mapping[str, str] | None = None) -> SaveHandle[Checkpoint]:
        """Like :meth:`save`, but returns once the state is copied; the commit runs in the background.

        A mapping of arrays is copied into reusable host buffers before this
        returns, so the caller may change its arrays right away. The previous
        save is waited for first (one in flight); its unreported failure is
        raised here as :class:`~keepbest.errors.AsyncSaveError`.
        ``handle.result()`` returns the committed :class:`Checkpoint`.
        """
        return self._submit(step, state, snapshot=True, metrics=metrics, epoch=epoch, batch=batch,
                            name=name, extra=extra, versions=versions)

    def wait(self) -> None:
        """Blocks until no save is in flight; raises an unreported background failure."""
        self.writer.wait()

    def check(self) -> None:
        """Raises an unreported failure of a finished background save; never blocks."""
        self.writer.check()

    def close(self) -> None:
        """Waits for the save in flight and frees the writer's thread and buffers."""
        self.writer.close()

    def _submit(self, step: int | None, state: Mapping[str, np.ndarray] | Payload, *, snapshot: bool,
                metrics: Mapping[str, float] | None, epoch: int | None, batch: int | None,
                name: str | None, extra: Mapping[str, Any] | None,
                versions: Mapping[str, str] | None) -> SaveHandle[Checkpoint]:
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
        layout = "dir" if isinstance(state, Mapping) else state.layout
        fmt = TensorPayload.format if isinstance(state, Mapping) else state.format
        manifest = Manifest(
            name=name, layout=layout, format=fmt, series=self.series,
            step=step, epoch=epoch, batch=batch,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            monitor=MonitorRecord(self.monitor.name, self.monitor.mode) if self.monitor else None,
            created=time.time(),
            versions={**environment_versions(), **(versions or {})}, extra=dict(extra or {}),
        )
        _check_readable(manifest)
        self.writer.wait()  # back-pressure; staging buffers are free again after this
        if isinstance(state, Mapping):
            tensors = self.writer.staging.snapshot({STATE_FILE: state})[STATE_FILE] if snapshot else state
            state = TensorPayload({STATE_FILE: tensors}, detached=True)
        payload = state
        written: tuple[Path, tuple[FileEntry, ...]] | None = None
        if not payload.detached:  # it reads live state: write now, commit in the background
            written = self._write(name, payload)
        monitor, keep = self.monitor, self.keep  # the rules as they are now, whatever the caller changes next

        def persist() -> Checkpoint:
            staged, entries = written or self._write(name, payload)
            committed = self.store.commit(staged, manifest.with_files(entries))
            # One listing serves retention and the returned checkpoint; the new one is never pruned,
            # even if the clock went back.
            kept = self._prune(self._mine(), monitor, keep, protect=name)
            return next((c for c in self._as_checkpoints(kept, monitor) if c.name == name),
                        Checkpoint(committed, self.store.root / name))

        return self.writer.submit(str(self.store.root / name), persist)

    def _write(self, name: str, payload: Payload) -> tuple[Path, tuple[FileEntry, ...]]:
        staged = self.store.stage(name)
        try:
            return staged, payload.write(staged)
        except BaseException:
            self.store.discard(staged)
            raise

    def prune(self) -> list[str]:
        """Deletes this series' checkpoints that no retention rule keeps; returns their names."""
        self.writer.wait()
        mine = self._mine()
        kept = {m.name for m in self._prune(mine, self.monitor, self.keep)}
        return [m.name for m in sorted(mine, key=lambda m: m.created) if m.name not in kept]

    def _prune(self, mine: list[Manifest], monitor: Monitor | None, keep: Sequence[KeepRule],
               protect: str | None = None) -> list[Manifest]:
        """Deletes, oldest first, what the rules drop from ``mine``; returns the rest."""
        if not keep:
            return mine
        cands = [Candidate(m.name, m.created, self._value(m, monitor)) for m in mine]
        kept = retained(cands, keep, monitor.mode if monitor else None) | {protect}
        for m in sorted((m for m in mine if m.name not in kept), key=lambda m: m.created):
            self.store.delete(m)
        return [m for m in mine if m.name in kept]
