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

import os
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from keepbest import __version__, aliases, codec, evaluation
from keepbest.checkpoint import Checkpoint, Payload, TensorPayload, best_by, first_verified
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.manifest import FileEntry, Manifest, MonitorRecord, is_safe_relative_path
from keepbest.policy import Candidate, KeepBest, KeepLast, KeepRule, Monitor, retained
from keepbest.publishing import Publisher, PublishQueue, Version, events_for
from keepbest.storage import INDEX_DIR, LocalStore
from keepbest.writer import AsyncWriter, SaveHandle

STATE_FILE = "state.safetensors"


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
        publishers: remote trackers that mirror each commit, alias move and
            deletion (``keepbest.wandb_publisher.WandbPublisher``,
            ``keepbest.mlflow_publisher.MlflowPublisher``), or a
            :class:`~keepbest.publishing.PublishQueue` shared with other
            managers. Uploads run on their own thread; :meth:`close` waits
            for them and raises what failed.
        dedup: hard-link the files of a folder checkpoint whose bytes did not
            change since the previous checkpoint of the series, instead of
            writing them again (a frozen backbone costs nothing).

    Every commit is a version of the series (v0, v1, ...) with aliases
    ``latest``, ``best`` and ``epoch_N``; user aliases (:meth:`promote`)
    hold their version against retention. See :mod:`keepbest.aliases`.

    The best value and retention state are not stored separately: they are
    recomputed from the committed manifests, so a new manager on an existing
    directory continues where the previous one stopped. Leftovers of a
    crashed writer are cleaned up when the manager starts.
    """

    def __init__(self, directory: str | os.PathLike[str], *, monitor: Monitor | None = None,
                 keep: Sequence[KeepRule] = (), series: str = "ckpt", writer: AsyncWriter | None = None,
                 publishers: Sequence[Publisher] | PublishQueue = (), dedup: bool = True) -> None:
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
        self.publisher: PublishQueue | None = publishers if isinstance(publishers, PublishQueue) else (
            PublishQueue(list(publishers)) if publishers else None)
        if not isinstance(dedup, bool):
            raise TypeError(f"dedup must be True or False. Received: dedup={dedup!r}")
        self.dedup = dedup
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
        record = aliases.current(self.store.root, self.series, manifests)
        return [Checkpoint(m, self.store.root / m.name, best is not None and m.name == best.name,
                           aliases=tuple(record.of(m.version)) if m.version is not None else ())
                for m in sorted(manifests, key=lambda m: (m.created, m.name))]

    @property
    def aliases(self) -> dict[str, int]:
        """Every alias of this series and the version it names (``{"latest": 7, "best": 4, ...}``)."""
        return aliases.current(self.store.root, self.series, self._mine()).all

    def promote(self, version: int | str, alias: str) -> Checkpoint:
        """Points the user alias ``alias`` at ``version`` (``3``, ``"v3"``, ``"best"`` or a name); returns it.

        The alias moves off any version that held it. While it points at a
        version, retention keeps that version.
        """
        aliases.check_user_alias(alias)
        self.writer.wait()
        with aliases.locked(self.store.root, self.series):
            mine = self._mine()
            record = aliases.current(self.store.root, self.series, mine)
            target = aliases.resolve(record, mine, str(version))
            assert target.version is not None
            record = aliases.AliasRecord(self.series, record.next_version, record.automatic,
                                         {**record.user, alias: target.version})
            aliases.write(self.store.root, record)
        if self.publisher is not None:
            self.publisher.put(events_for(self.series, None, record.all, ()))
        return next(c for c in self.checkpoints() if c.name == target.name)

    def demote(self, alias: str) -> None:
        """Removes the user alias ``alias``; its version is then subject to retention again."""
        self.writer.wait()
        with aliases.locked(self.store.root, self.series):
            record = aliases.current(self.store.root, self.series, self._mine())
            if alias not in record.user:
                raise KeyError(f"Series '{self.series}' in {self.directory} has no user alias '{alias}'. "
                               f"User aliases: {', '.join(sorted(record.user)) or 'none'}.")
            record = aliases.AliasRecord(self.series, record.next_version, record.automatic,
                                         {a: v for a, v in record.user.items() if a != alias})
            aliases.write(self.store.root, record)
        if self.publisher is not None:
            self.publisher.put(events_for(self.series, None, record.all, ()))

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
        """Blocks until no save is in flight (and every upload was tried); raises an unreported failure."""
        self.writer.wait()
        if self.publisher is not None:
            self.publisher.wait()

    def check(self) -> None:
        """Raises an unreported failure of a finished background save; never blocks."""
        self.writer.check()

    def close(self) -> None:
        """Waits for the save in flight and the uploads; frees the writer's thread and buffers.

        Raises :class:`~keepbest.errors.PublishError` when an upload failed.
        """
        try:
            self.writer.close()
        finally:
            if self.publisher is not None:
                self.publisher.close()

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
            written = self._write(name, self._deduplicated(payload, self._mine()))
        monitor, keep = self.monitor, self.keep  # the rules as they are now, whatever the caller changes next

        def persist() -> Checkpoint:
            # The listing, the version number and the write run here, off the training thread.
            before = self._mine()
            staged, entries = written or self._write(name, self._deduplicated(payload, before))
            replaced = [m for m in before if m.name == name]
            version = aliases.next_version(aliases.read(self.store.root, self.series), before)
            committed = self.store.commit(staged, replace(manifest, version=version).with_files(entries))
            # One listing serves retention, aliases and the returned checkpoint; the new one is never
            # pruned, even if the clock went back.
            with aliases.locked(self.store.root, self.series):
                mine = self._mine()
                held = set(aliases.read(self.store.root, self.series).user.values())
                kept = self._prune(mine, monitor, keep, protect={name} | {m.name for m in mine if m.version in held})
                record = aliases.current(self.store.root, self.series, kept)
                aliases.write(self.store.root, record)
            if self.publisher is not None:
                gone = [m for m in mine if m not in kept] + [m for m in replaced if m.version != committed.version]
                snapshot = self.publisher.snapshot(self.store.root, committed)
                published = Version(version, self.series, committed, snapshot, tuple(record.of(version)))
                self.publisher.put(events_for(self.series, published, record.all, gone))
            return next((c for c in self._as_checkpoints(kept, monitor) if c.name == name),
                        Checkpoint(committed, self.store.root / name))

        return self.writer.submit(str(self.store.root / name), persist)

    def _deduplicated(self, payload: Payload, mine: Sequence[Manifest]) -> Payload:
        """``payload`` with the newest folder checkpoint's files as the base its unchanged files link to."""
        folders = [m for m in mine if m.layout == "dir"]
        if not (self.dedup and folders and isinstance(payload, TensorPayload) and payload.base is None):
            return payload
        newest = max(folders, key=lambda m: (m.created, m.name))
        return replace(payload, base={e.path: (self.store.root / newest.name / e.path, e) for e in newest.files})

    def mark_training_end(self) -> None:
        """Tells sidecar evaluators that this series is complete; waits for the save in flight first."""
        self.writer.wait()
        evaluation.mark_training_end(self.store.root, self.series)

    def clear_training_end(self) -> None:
        """Training of this series (re)starts: evaluators wait for its checkpoints again."""
        evaluation.clear_training_end(self.store.root, self.series)

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
        with aliases.locked(self.store.root, self.series):
            mine = self._mine()
            held = set(aliases.read(self.store.root, self.series).user.values())
            kept = self._prune(mine, self.monitor, self.keep, protect={m.name for m in mine if m.version in held})
            record = aliases.current(self.store.root, self.series, kept)
            aliases.write(self.store.root, record)
        gone = [m for m in sorted(mine, key=lambda m: m.created) if m not in kept]
        if self.publisher is not None:
            self.publisher.put(events_for(self.series, None, record.all, gone))
        return [m.name for m in gone]

    def _prune(self, mine: list[Manifest], monitor: Monitor | None, keep: Sequence[KeepRule],
               protect: set[str] = frozenset()) -> list[Manifest]:  # type: ignore[assignment]
        """Deletes, oldest first, what the rules drop from ``mine``; returns the rest.

        ``protect`` names what stays whatever the rules say (the new checkpoint, user aliases).
        """
        if not keep:
            return mine
        cands = [Candidate(m.name, m.created, self._value(m, monitor)) for m in mine]
        kept = retained(cands, keep, monitor.mode if monitor else None) | protect
        # What a sidecar evaluator is reading, or (in its "every" mode) has not read yet, stays.
        kept |= evaluation.held(self.store.root, [m for m in mine if m.name not in kept], time.time())
        for m in sorted((m for m in mine if m.name not in kept), key=lambda m: m.created):
            self.store.delete(m)
        return [m for m in mine if m.name in kept]
