"""The framework-free checkpoint manager: the store, the policy, the writer, the series index and the
publishers, wired together.

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

import logging
import os
import platform
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from keepbest import codec, evaluation, history, multiprocess, store as stores
from keepbest._save_stats import CountingStaged
from keepbest._version import __version__
from keepbest.checkpoint import Checkpoint, best_by, bests, in_commit_order
from keepbest.discovery import first_verified
from keepbest.distributed import Coordinator, Solo
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.manifest import FileEntry, Manifest, MonitorRecord
from keepbest.payload import Payload, TensorPayload
from keepbest.policy import Candidate, Monitor, Plan, Rule, check_rules, plan
from keepbest.publishing import Publisher, PublishQueue, Version, events_for
from keepbest.series import AliasRecord, SeriesIndex
from keepbest.store import Damaged, Staged
from keepbest.writer import AsyncWriter, SaveHandle

STATE_FILE = "state.safetensors"
log = logging.getLogger("keepbest")


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
        directory: where checkpoints live (created on the first save): a
            local path, ``~/...``, a ``file://`` URL or ``s3://bucket/prefix``.
            A URL that no storage backend serves (``gs://``, or ``s3://``
            without ``keepbest[s3]``) or a bucket that does not exist raises
            :class:`~keepbest.errors.StorageError` here, before anything is written.
        monitor: the metric that defines "best"; without it there is no best.
        keep: retention rules, any :class:`~keepbest.policy.KeepRule` (``KeepLast``,
            ``KeepBest``, ``KeepEvery``, ``KeepPeriod``) or
            :class:`~keepbest.policy.Limit` (``MaxBytes``). A checkpoint
            survives when any keep rule keeps it (without keep rules, all
            do); limits then drop the oldest of those until they fit. Without
            rules nothing is deleted. The newest, the best, an aliased one and
            one an evaluator holds are always kept; when they alone exceed a
            limit, a ``UserWarning`` says so (once per manager).
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
        dedup: reuse the files of a folder checkpoint whose bytes did not
            change since the previous checkpoint of the series, instead of
            writing them again (a frozen backbone costs nothing). Not on object
            stores: sharing an object between checkpoints would need a copy.
        storage_options: for an ``s3://`` location, passed to s3fs (``endpoint_url``,
            ``key``, ``secret``, ...); without them the AWS environment is used.
        coordinator: for training in several processes, how they reach each
            other (:class:`keepbest.distributed.TorchCoordinator`,
            :class:`keepbest.distributed.JaxCoordinator`). Every process then
            calls the same saves with the tensors it holds; each tensor is
            written once, by one process, and process 0 commits one manifest
            and alone prunes, moves aliases and publishes. The directory must
            be the same folder for all (a shared filesystem) or a bucket URL.
        recover: clean up what a crashed writer left (finish or undo its
            interrupted commit, remove its temporary files) now; False
            changes nothing on start (``keepbest gc --dry-run``).

    Every commit is a version of the series (v0, v1, ...) with aliases
    ``latest``, ``best`` and ``epoch_N``; user aliases (:meth:`promote`)
    hold their version against retention. See :mod:`keepbest.series`.

    The best value and retention state are not stored separately: they are
    recomputed from the committed manifests, so a new manager on an existing
    directory continues where the previous one stopped. Leftovers of a
    crashed writer are cleaned up when the manager starts. Retention never
    deletes the best checkpoint by any monitor the series recorded, so two
    writers with different monitors on one series never prune each other's best.
    """

    def __init__(self, directory: str | os.PathLike[str], *, monitor: Monitor | None = None,
                 keep: Sequence[Rule] = (), series: str = "ckpt", writer: AsyncWriter | None = None,
                 publishers: Sequence[Publisher] | PublishQueue = (), dedup: bool = True,
                 storage_options: Mapping[str, Any] | None = None, coordinator: Coordinator | None = None,
                 recover: bool = True) -> None:
        keep = check_rules(keep, monitor is not None)
        if not isinstance(dedup, bool):
            raise TypeError(f"dedup must be True or False. Received: dedup={dedup!r}")
        if not isinstance(series, str) or not series:
            raise ValueError(f"series must be a non-empty string (it names the checkpoints this manager owns). "
                             f"Received: series={series!r}")
        if coordinator is not None and not isinstance(coordinator, Coordinator):
            raise TypeError("coordinator must be a keepbest.distributed coordinator (TorchCoordinator, JaxCoordinator) "
                            f"or None. Received: coordinator={coordinator!r}")
        self.store = stores.open(directory, storage_options)
        self.coordinator = coordinator or Solo()
        self.channel = self.coordinator.channel(f"{self.store.url}#{series}") if self.coordinator.size > 1 else None
        self._ownership: dict[tuple[str, str], int] = {}  # who wrote each tensor at the last save (many processes)
        self.monitor = monitor
        self.keep: tuple[Rule, ...] = keep
        self._warned_limits = False
        self.series = series
        self.index = SeriesIndex(self.store, series)
        self.writer = writer or AsyncWriter()
        self.publisher: PublishQueue | None = publishers if isinstance(publishers, PublishQueue) else (
            PublishQueue(list(publishers)) if publishers else None)
        self.dedup = dedup
        # Process 0 alone cleans up: the others' staged files are its own save's.
        self.recovery = self.store.recover() if recover and self.committer and self.store.exists() else None
        if self.recovery is not None and self.recovery.undecided:
            log.warning("keepbest: left %d file(s) in %s whose writer may still run on another host or in another "
                        "PID namespace: %s. Remove them by hand once no keepbest process writes there.",
                        len(self.recovery.undecided), self.store.where(), ", ".join(self.recovery.undecided[:5]))

    @property
    def committer(self) -> bool:
        """Whether this process commits (always, with one process; process 0 of several)."""
        return self.coordinator.rank == 0

    def owned_elsewhere(self) -> dict[str, set[str]]:
        """Per file, the tensors another process wrote at the last save: a snapshot may leave them out
        (pass their specs as ``TensorPayload.known``), since they keep their writer while it holds them."""
        self.writer.wait()  # the save in flight decides the ownership
        out: dict[str, set[str]] = {}
        for (fname, name), rank in self._ownership.items():
            if rank != self.coordinator.rank:
                out.setdefault(fname, set()).add(name)
        return out

    @property
    def directory(self) -> Path:
        """The local folder of the checkpoints (see :attr:`url` for any store)."""
        return Path(self.store.url)

    @property
    def url(self) -> str:
        return self.store.url

    def exists(self) -> bool:
        """Whether the folder exists (it is created by the first save)."""
        return self.store.exists()

    # -- reading ----------------------------------------------------------------
    def checkpoints(self) -> list[Checkpoint]:
        """This series' committed checkpoints, oldest first; ``is_best`` by this manager's monitor."""
        return self._as_checkpoints(self._mine())

    def _mine(self) -> list[Manifest]:
        return [m for m in self.store.list().manifests if m.series == self.series]

    def _checkpoint(self, m: Manifest, is_best: bool = False, aliases: tuple[str, ...] = ()) -> Checkpoint:
        return Checkpoint(m, self.store.where(m.name), is_best, aliases=aliases, store=self.store)

    def _as_checkpoints(self, manifests: Sequence[Manifest], monitor: Monitor | None = None,
                        record: AliasRecord | None = None) -> list[Checkpoint]:
        monitor = monitor or self.monitor
        best = best_by(manifests, monitor.name, monitor.mode) if monitor else None
        record = record or self.index.current(manifests)
        return [self._checkpoint(m, best is not None and m.name == best.name,
                                 tuple(record.of(m.version)) if m.version is not None else ())
                for m in in_commit_order(manifests)]

    @property
    def aliases(self) -> dict[str, int]:
        """Every alias of this series and the version it names (``{"latest": 7, "best": 4, ...}``)."""
        return self.index.current(self._mine()).all

    def promote(self, version: int | str, alias: str) -> Checkpoint:
        """Points the user alias ``alias`` at ``version`` (``3``, ``"v3"``, ``"best"`` or a name); returns it.

        The alias moves off any version that held it. While it points at a
        version, retention keeps that version.
        """
        self.writer.wait()
        if not self.committer:
            raise RuntimeError(f"promote() moves aliases, which only process 0 does (this is "
                               f"{self.coordinator.describe()}). Call it on process 0. Received: alias={alias!r}")
        target = self.index.promote(self._mine(), str(version), alias)
        self._publish(None, self.index.current(self._mine()), ())
        return next(c for c in self.checkpoints() if c.name == target.name)

    def demote(self, alias: str) -> None:
        """Removes the user alias ``alias``; its version is then subject to retention again."""
        self.writer.wait()
        if not self.committer:
            raise RuntimeError(f"demote() moves aliases, which only process 0 does (this is "
                               f"{self.coordinator.describe()}). Call it on process 0. Received: alias={alias!r}")
        record = self.index.demote(self._mine(), alias)
        self._publish(None, record, ())

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
        return None if best is None else self._checkpoint(best, True)

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
            damaged = [d for d in self.store.list().damaged if d.manifest is not None
                       and d.manifest.series == self.series and (step is None or d.manifest.step == step)]
            unusable = "".join(f" Not usable: {d.reason}" for d in damaged)
            raise CheckpointNotFoundError(
                f"No checkpoint {where}in {self.store.where()} (series '{self.series}'). "
                f"Save one first or pick an available step. Available: {available}.{unusable}"
            )
        return ckpts[-1]

    def verified(self, candidates: Sequence[Checkpoint], wanted: str,
                 failures: Sequence[CorruptCheckpointError] = ()) -> Checkpoint:
        """The first of ``candidates`` whose files verify (see :func:`keepbest.discovery.first_verified`)."""
        return first_verified(self.store, candidates, wanted=wanted, failures=failures)

    def damaged(self) -> list[Damaged]:
        """This series' checkpoints whose data is missing or incomplete: never listed, loaded or pruned."""
        return [d for d in self.store.list().damaged if d.manifest is not None and d.manifest.series == self.series]

    def load(self, step: int | None = None, *, fallback: bool = False) -> dict[str, np.ndarray]:
        """The tensors of the latest checkpoint (or of ``step``), verified against the manifest.

        With ``fallback``, a checkpoint that fails verification is skipped (with
        a warning) for the next newest one that verifies.
        """
        ckpt = self.get(step)
        others = [c for c in reversed(self.checkpoints()) if c.name != ckpt.name] if fallback else []
        return self._tensors(self.verified([ckpt, *others], wanted=ckpt.location))

    def _tensors(self, ckpt: Checkpoint) -> dict[str, np.ndarray]:
        if STATE_FILE not in {f.path for f in ckpt.manifest.files}:
            raise CheckpointNotFoundError(
                f"Checkpoint {ckpt.location} holds no {STATE_FILE} (it is a '{ckpt.manifest.format}' "
                f"checkpoint). Load it with the adapter that wrote it, e.g. keepbest.keras.load_model. "
                f"Received: files={[f.path for f in ckpt.manifest.files]}"
            )
        reader = ckpt.reader()
        return codec.load(reader.buffer, STATE_FILE, reader.where)

    # -- writing ----------------------------------------------------------------
    def save(self, step: int | None, state: Mapping[str, np.ndarray] | Payload, *,
             metrics: Mapping[str, float] | None = None, epoch: int | None = None,
             batch: int | None = None, name: str | None = None,
             extra: Mapping[str, Any] | None = None,
             versions: Mapping[str, str] | None = None, started: float | None = None) -> Checkpoint:
        """Commits one checkpoint atomically, then applies retention; returns it.

        ``state`` is a flat mapping of arrays (stored as ``state.safetensors``)
        or a :class:`~keepbest.payload.Payload` that writes its own files. A
        checkpoint with the same ``name`` is replaced only once the new one is
        complete. This is :meth:`save_async` waited for, without the snapshot
        copy (the caller is blocked, so its arrays cannot change meanwhile).

        The manifest records the save's cost: ``stall`` (seconds until the
        writing went to the writer thread, counted from ``started``, a
        ``time.perf_counter()`` reading, when the caller copied its snapshot
        before calling), ``persist`` (from the start of writing to the commit)
        and ``reused_bytes`` (files reused from the previous checkpoint).
        """
        return self._submit(step, state, snapshot=False, metrics=metrics, epoch=epoch, batch=batch,
                            name=name, extra=extra, versions=versions, started=started).result()

    def save_async(self, step: int | None, state: Mapping[str, np.ndarray] | Payload, *,
                   metrics: Mapping[str, float] | None = None, epoch: int | None = None,
                   batch: int | None = None, name: str | None = None,
                   extra: Mapping[str, Any] | None = None,
                   versions: Mapping[str, str] | None = None,
                   started: float | None = None) -> SaveHandle[Checkpoint]:
        """Like :meth:`save`, but returns once the state is copied; the commit runs in the background.

        A mapping of arrays is copied into reusable host buffers before this
        returns, so the caller may change its arrays right away. The previous
        save is waited for first (one in flight); its unreported failure is
        raised here as :class:`~keepbest.errors.AsyncSaveError`.
        ``handle.result()`` returns the committed :class:`Checkpoint`.
        """
        return self._submit(step, state, snapshot=True, metrics=metrics, epoch=epoch, batch=batch,
                            name=name, extra=extra, versions=versions, started=started)

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
                versions: Mapping[str, str] | None, started: float | None = None) -> SaveHandle[Checkpoint]:
        entered = time.perf_counter() if started is None else started  # the caller's stall starts here
        if name is None and step is None:
            raise ValueError("CheckpointManager.save needs a step or a name to name the checkpoint. "
                             "Received: step=None, name=None")
        name = name or f"{self.series}-{step:09d}"
        self.store.check_name(name)
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
        monitor, keep = self.monitor, self.keep  # the rules as they are now, whatever the caller changes next
        if self.channel is not None:
            stalled = replace(manifest, stall=time.perf_counter() - entered)
            return self.writer.submit(self.store.where(name), self._together(stalled, payload, snapshot,
                                                                              monitor, keep))
        written: tuple[Staged, tuple[FileEntry, ...], int] | None = None
        if not payload.detached:  # it reads live state: write now, commit in the background
            written = self._write(name, self._deduplicated(payload, self._mine()))
        stall = time.perf_counter() - entered

        def persist() -> Checkpoint:
            # The listing, the version number and the write run here, off the training thread.
            start = time.perf_counter()  # the caller's part (a live payload's write too) is the stall, not persist
            before = self._mine()
            staged, entries, reused = written or self._write(name, self._deduplicated(payload, before))
            try:
                version = self.index.reserve(before)
            except BaseException:
                self.store.discard(staged)
                raise
            stamped = replace(manifest, version=version, stall=stall, persist=time.perf_counter() - start,
                              reused_bytes=reused)
            committed = self.store.commit(staged, stamped.with_files(entries))
            return self._after_commit(committed, before, monitor, keep)

        return self.writer.submit(self.store.where(name), persist)

    def _together(self, manifest: Manifest, payload: Payload, snapshot: bool, monitor: Monitor | None,
                  keep: Sequence[Rule]) -> Callable[[], Checkpoint]:
        """The save of one checkpoint by every process (see :mod:`keepbest.multiprocess`)."""
        if not isinstance(payload, TensorPayload) or payload.layout != "dir":
            raise ValueError(
                f"Cannot save {manifest.name} from {self.coordinator.size} processes: only tensors saved as a keepbest "
                f"folder can be written by several processes, not a '{payload.format}' {payload.layout}. Save a "
                f"mapping of arrays or a TensorPayload. Received: {type(payload).__name__}")
        if snapshot and not payload.detached:
            raise ValueError(f"Cannot save {manifest.name} in the background from {self.coordinator.size} processes: "
                             "the payload reads live state. Pass a snapshot (detached=True) or call save(). "
                             f"Received: detached={payload.detached}")
        assert self.channel is not None
        channel = self.channel

        def persist() -> Checkpoint:
            committed, before = multiprocess.commit_together(
                channel, self.store, manifest, payload, listing=self._mine, reserve=self.index.reserve,
                base=self._dedup_base, ownership=self._ownership)
            if not self.committer:
                return self._checkpoint(committed)
            return self._after_commit(committed, before, monitor, keep)

        return persist

    def _after_commit(self, committed: Manifest, before: list[Manifest], monitor: Monitor | None,
                      keep: Sequence[Rule]) -> Checkpoint:
        """History, retention, aliases and publishing of a commit (process 0 only)."""
        name, version = committed.name, committed.version
        replaced = [m for m in before if m.name == name and m.version != version]
        events = [history.deleted(m, "replaced by a new save under the same name") for m in replaced]
        events.append(history.committed(committed))
        kept, record, gone = self._apply_retention(self._mine(), monitor, keep, {name: "newest"}, events)
        history.append(self.store, self.series, events)
        if self.publisher is not None and version is not None:
            snap = self.store.snapshot(committed)
            published = Version(version, self.series, committed, snap, tuple(record.of(version)))
            self.publisher.put(events_for(self.series, published, record.all, [*gone, *replaced],
                                          release=lambda: self.store.release(snap),
                                          outcome=lambda who, ok: history.append(
                                              self.store, self.series, [history.published(committed, who, ok)])))
        return next((c for c in self._as_checkpoints(kept, monitor, record) if c.name == name),
                    self._checkpoint(committed))

    def _plan(self, mine: list[Manifest], monitor: Monitor | None, keep: Sequence[Rule],
              protect: Mapping[str, str]) -> Plan:
        """What ``keep`` deletes of ``mine``, name -> the rule that lets it go, and the limits not met."""
        if not keep:
            return Plan()
        # What a sidecar evaluator is reading, or (in its "every" mode) has not read yet, stays; so do the
        # best by every monitor recorded in the series (another writer's best) and what a user alias holds.
        held = dict(protect)
        held.update((n, "best") for n in sorted(bests(mine)) if n not in held)
        users = self.index.current(mine).user
        for m in mine:
            aliases = [a for a, v in sorted(users.items()) if m.version is not None and v == m.version]
            if aliases and m.name not in held:
                held[m.name] = "alias " + ", ".join(aliases)
        held.update((n, "an evaluator holds it") for n in sorted(evaluation.held(self.store, mine, time.time()))
                    if n not in held)
        cands = [Candidate(m.name, m.created, self._value(m, monitor), size=sum(f.size for f in m.files),
                           created=m.created, epoch=m.epoch) for m in mine]
        return plan(cands, keep, monitor.mode if monitor else None, held)

    def _apply_retention(self, mine: list[Manifest], monitor: Monitor | None, keep: Sequence[Rule],
                         protect: Mapping[str, str], events: list[dict[str, Any]]
                         ) -> tuple[list[Manifest], AliasRecord, list[Manifest]]:
        """Deletes what the rules drop (retired in the series record first); returns what is kept, the
        aliases now, and what was deleted."""
        gone: list[Manifest] = []
        decided = self._plan(mine, monitor, keep, protect)
        dropping = [m for m in in_commit_order(mine) if m.name in decided.drop]
        for m in self.index.retire(dropping) if dropping else []:
            self.store.delete(m)
            events.append(history.deleted(m, decided.drop[m.name]))
            gone.append(m)
        if decided.problems and not self._warned_limits:
            self._warned_limits = True  # once per manager: every later save would say the same
            warnings.warn(f"keepbest: retention in {self.store.where()} (series '{self.series}'): "
                          + " ".join(decided.problems), UserWarning, stacklevel=2)
        kept = [m for m in mine if m not in gone]
        return kept, self.index.refresh(kept), gone

    def _deduplicated(self, payload: Payload, mine: Sequence[Manifest]) -> Payload:
        """``payload`` with the newest folder checkpoint as the base its unchanged files are reused from."""
        base = self._dedup_base(mine)
        if base is None or not isinstance(payload, TensorPayload) or payload.base is not None:
            return payload
        return replace(payload, base=base)

    def _dedup_base(self, mine: Sequence[Manifest]) -> Manifest | None:
        folders = [m for m in mine if m.layout == "dir"]
        return max(folders, key=lambda m: (m.created, m.name)) if self.dedup and folders else None

    def mark_training_end(self) -> None:
        """Tells sidecar evaluators that this series is complete; waits for the save in flight first."""
        self.writer.wait()
        if self.committer:
            evaluation.mark_training_end(self.store, self.series)

    def clear_training_end(self) -> None:
        """Training of this series (re)starts: evaluators wait for its checkpoints again."""
        if self.committer:
            evaluation.clear_training_end(self.store, self.series)

    def _write(self, name: str, payload: Payload) -> tuple[Staged, tuple[FileEntry, ...], int]:
        """Stages and writes ``payload``; returns what to commit, its files and the bytes reused (dedup)."""
        staged = self.store.stage(name, payload.layout)
        try:
            counting = CountingStaged(staged)
            return staged, payload.write(counting), counting.reused_bytes
        except BaseException:
            self.store.discard(staged)
            raise

    def plan_retention(self, keep: Sequence[Rule] | None = None) -> Plan:
        """What :meth:`prune` would delete now, deleting nothing: ``Plan.drop`` maps each name, oldest first,
        to the rule that lets it go; ``Plan.problems`` says which limits cannot be met."""
        keep = self.keep if keep is None else check_rules(keep, self.monitor is not None)
        self.writer.wait()
        return self._plan(self._mine(), self.monitor, keep, {})

    def prune(self, keep: Sequence[Rule] | None = None, *, dry_run: bool = False) -> list[str]:
        """Deletes this series' checkpoints that the rules (``keep``, by default this manager's) let go;
        returns their names, oldest first (process 0 deletes; the others return []).

        Applies rules after the fact, with every protection of a save: the newest, the best, an aliased
        checkpoint and one an evaluator holds stay. With ``dry_run`` it deletes nothing and returns what it
        would delete (see :meth:`plan_retention` for the reasons).
        """
        keep = self.keep if keep is None else check_rules(keep, self.monitor is not None)
        self.writer.wait()
        if not self.committer:
            return []
        if dry_run:
            return list(self.plan_retention(keep).drop)
        events: list[dict[str, Any]] = []
        _kept, record, gone = self._apply_retention(self._mine(), self.monitor, keep, {}, events)
        history.append(self.store, self.series, events)
        self._publish(None, record, gone)
        return [m.name for m in gone]

    def delete(self, name: str, reason: str = "deleted by the caller") -> bool:
        """Deletes this series' checkpoint ``name`` (an adapter's own retention: Lightning's top-k); returns whether
        it is gone. One that a user alias or a running evaluation holds, or the newest, stays (logged). Process 0
        deletes; the others return False."""
        self.writer.wait()
        mine = self._mine()
        target = [m for m in mine if m.name == name]
        if not self.committer or not target:
            return False
        held = evaluation.held(self.store, mine, time.time())
        newest = in_commit_order(mine)[-1].name
        allowed = [] if name in held or name == newest else self.index.retire(target)
        if not allowed:
            why = "it is the newest" if name == newest else "an evaluator is reading it" if name in held else \
                "a user alias holds it"
            log.warning("keepbest: kept %s, which was to be deleted (%s): %s.", self.store.where(name), reason, why)
            return False
        events: list[dict[str, Any]] = []
        for m in allowed:
            self.store.delete(m)
            events.append(history.deleted(m, reason))
        record = self.index.refresh([m for m in mine if m not in allowed])
        history.append(self.store, self.series, events)
        self._publish(None, record, allowed)
        return True

    def delete_all(self) -> list[str]:
        """Deletes every checkpoint of this series, its records and, if nothing else is left, the folder
        (process 0 deletes)."""
        self.writer.wait()
        gone = in_commit_order(self._mine())
        if not self.committer:
            return [m.name for m in gone]
        for m in gone:
            self.store.delete(m)
        self.index.forget()
        history.forget(self.store, self.series)
        self._publish(None, AliasRecord(self.series), gone)
        self.store.remove_if_empty()
        return [m.name for m in gone]

    def _publish(self, version: Version | None, record: AliasRecord, gone: Sequence[Manifest]) -> None:
        if self.publisher is not None:
            self.publisher.put(events_for(self.series, version, record.all, gone))
