"""``Checkpointer``: crash-safe checkpoints of a plain PyTorch training loop, without pickle."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future
from typing import Any, Mapping, Sequence

import torch

from keepbest.checkpoint import Checkpoint
from keepbest.distributed import Coordinator
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.manager import CheckpointManager
from keepbest.payload import TensorPayload
from keepbest.policy import Monitor, Rule, resolve_mode, rules_from
from keepbest.publishing import Publisher, PublishQueue
from keepbest.torch import _host, _interop, _state
from keepbest.writer import SaveHandle

log = logging.getLogger("keepbest")


def resolve_coordinator(coordinator: Coordinator | str | None) -> Coordinator | None:
    """``"auto"``: ``torch.distributed``'s processes when it is initialized with more than one, else none."""
    if coordinator is None or isinstance(coordinator, Coordinator):
        return coordinator
    if coordinator != "auto":
        raise TypeError("coordinator must be 'auto', None or a keepbest.distributed coordinator "
                        f"(TorchCoordinator(timeout=...)). Received: coordinator={coordinator!r}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from keepbest.distributed import TorchCoordinator

        return TorchCoordinator()
    return None


class _Loaded:
    """A state dict read from a file, saved as an app_state entry of kind state_dict."""

    def __init__(self, state: Mapping[str, Any]) -> None:
        self.state = state

    def state_dict(self) -> Mapping[str, Any]:
        return self.state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # pragma: no cover - never restored into
        raise NotImplementedError


class Checkpointer:
    """Saves and restores the state of a PyTorch training loop, atomically, in safetensors and JSON.

    Args:
        directory: a folder, ``file://`` or ``s3://bucket/prefix`` URL.
        monitor: the metric (a key of ``save``'s ``metrics``) that defines the best checkpoint.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (a loss is minimised).
        keep_last: keep this many newest checkpoints (None: no limit from this rule).
        keep_best: keep this many best ones by ``monitor``. With no rule, nothing is deleted;
            the newest, the best and an aliased checkpoint are always kept.
        keep_every: also keep the checkpoints of every N-th epoch (``save(epoch=...)``).
        keep_period: also keep the first checkpoint of each period of this many seconds.
        max_bytes: a budget in bytes or ``"50GB"``: the oldest kept checkpoints are deleted until the rest fits.
        keep: more rules (``keepbest.policy`` rules or your own), combined with the keywords'.
        async_save: ``save`` returns once the tensors are copied into reused host staging
            (pinned where CUDA is available); the write and the commit run in the background.
        publishers: W&B / MLflow publishers that mirror each commit (see :class:`keepbest.CheckpointManager`).
        dedup: link files whose bytes did not change since the previous checkpoint (frozen layers).
        series: names this checkpointer's checkpoints (``<series>-<step>``) in a shared folder.
        storage_options: passed to s3fs for an ``s3://`` directory.
        coordinator: ``"auto"`` (``torch.distributed`` when initialized with several processes),
            None, or a :class:`keepbest.distributed.TorchCoordinator` (to set its timeout).

    ``app_state`` maps names to anything with ``state_dict()``/``load_state_dict()``
    (modules, optimizers, LR schedulers, ``GradScaler``, a sampler that has them),
    ``torch.Generator``s and plain dicts of numbers. The global generators
    (Python, NumPy, torch CPU and CUDA) are saved too, so a resumed loop draws
    the same dropout masks and shuffles.

    Example:
        >>> import tempfile, torch
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> ckpt = Checkpointer(tempfile.mkdtemp(), monitor="loss", keep_last=2)
        >>> ckpt.save(10, {"model": model, "optimizer": opt}, metrics={"loss": 0.5}).result().step
        10
        >>> ckpt.restore({"model": model, "optimizer": opt}).step
        10
        >>> ckpt.close()
    """

    def __init__(self, directory: str | os.PathLike[str], *, monitor: str | None = None, mode: str = "min",
                 keep_last: int | None = None, keep_best: int | None = None, keep_every: int | None = None,
                 keep_period: float | None = None, max_bytes: int | str | None = None, keep: Sequence[Rule] = (),
                 async_save: bool = False,
                 publishers: Sequence[Publisher] | PublishQueue = (), dedup: bool = True, series: str = "ckpt",
                 storage_options: Mapping[str, Any] | None = None,
                 coordinator: Coordinator | str | None = "auto") -> None:
        if not isinstance(async_save, bool):
            raise TypeError(f"async_save must be True or False. Received: async_save={async_save!r}")
        if monitor is not None and not (isinstance(monitor, str) and monitor):
            raise TypeError(f"monitor must be a metric name or None. Received: monitor={monitor!r}")
        rules = rules_from(keep_last=keep_last, keep_best=keep_best, keep_every=keep_every,
                           keep_period=keep_period, max_bytes=max_bytes, keep=keep)
        ranking = [r.describe() for r in rules if r.needs_monitor]
        if ranking and monitor is None:
            raise ValueError(f"Checkpointer {', '.join(r.split('=')[0] for r in ranking)} needs monitor= to rank "
                             "checkpoints, e.g. "
                             f"monitor='val_loss'. Received: {', '.join(ranking)}, monitor=None")
        watched = Monitor(monitor, resolve_mode(monitor, mode, owner="Checkpointer")) if monitor else None
        self.async_save = async_save
        self.storage_options = dict(storage_options) if storage_options else None
        self.manager = CheckpointManager(directory, monitor=watched, keep=rules, series=series, publishers=publishers,
                                         dedup=dedup, storage_options=storage_options,
                                         coordinator=resolve_coordinator(coordinator))
        self._warned_monitor = False
        self._auto = coordinator == "auto" and self.manager.coordinator.size == 1  # checked again at each use
        self._saved = False  # this Checkpointer saved: training runs, and close() marks its end for evaluators

    def _check_processes(self, verb: str) -> None:
        """A Checkpointer made before ``init_process_group`` would have every process commit on its own."""
        if not self._auto:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise RuntimeError(
                f"Checkpointer.{verb}: torch.distributed now runs {dist.get_world_size()} processes, but this "
                "Checkpointer was created before init_process_group, as a single process: every process would "
                "commit and prune on its own. Create the Checkpointer after init_process_group. "
                f"Received: world_size={dist.get_world_size()}, a Checkpointer for 1 process")

    # -- saving ---------------------------------------------------------------------------------------
    def save(self, step: int, app_state: Mapping[str, Any], metrics: Mapping[str, float] | None = None,
             epoch: int | None = None) -> SaveHandle[Checkpoint]:
        """Saves ``app_state`` as the checkpoint of ``step``; returns a handle whose ``result()`` is the commit.

        Without ``async_save`` the handle is already done. With it, this
        returns once the tensors are copied (a previous save in flight is
        waited for first, and its failure raised here); the commit runs in
        the background. Every process of a ``torch.distributed`` job calls it.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise TypeError(f"Checkpointer.save needs the global step as an int >= 0. Received: step={step!r}")
        _state.check_app_state(app_state, "save")
        self._check_processes("save")
        monitor = self.manager.monitor
        if monitor is not None and monitor.name not in (metrics or {}) and not self._warned_monitor:
            self._warned_monitor = True
            log.warning("keepbest: Checkpointer monitors '%s', but save(metrics=...) has no such key (received %s); "
                        "such checkpoints cannot be the best.", monitor.name, sorted(metrics or {}))
        if not self._saved:
            self._saved = True
            self.manager.clear_training_end()  # evaluators wait for this series' checkpoints again
        captured = _state.capture(app_state)
        rng_doc = _state.rng_state()
        mgr = self.manager
        started = time.perf_counter()  # the training thread's stall starts here (recorded in the manifest)
        if self.async_save:
            mgr.writer.wait()  # back-pressure first: the snapshot reuses the previous save's buffers
            skip = mgr.owned_elsewhere()
            sources = {f: {n: t for n, t in ts.items() if n not in skip.get(f, ())} for f, ts in captured.tensors.items()}
            known = {f: {n: [list(t.shape), _host.codec_code(t), t.numel() * t.element_size()]
                         for n, t in ts.items() if n in skip.get(f, ())} for f, ts in captured.tensors.items()}
            copier = _host.Copier()
            tensors = mgr.writer.staging.snapshot(sources, spec=_host.spec, copy=copier, allocate=_host.allocate)
            copier.run()
        else:
            tensors = {f: {n: _host.view(t) for n, t in ts.items()} for f, ts in captured.tensors.items()}
            known = {}
        payload = TensorPayload(tensors, json_files={_state.STATE_FILE: captured.document},
                                process_json={_state.RNG_FILE: rng_doc}, format=_state.FORMAT,
                                detached=self.async_save, groups=captured.groups, known=known or None)
        versions = {"torch": torch.__version__}
        if self.async_save:
            return mgr.save_async(step, payload, metrics=metrics, epoch=epoch, versions=versions, started=started)
        done: Future[Checkpoint] = Future()
        done.set_result(mgr.save(step, payload, metrics=metrics, epoch=epoch, versions=versions, started=started))
        return SaveHandle(mgr.store.where(), done)

    # -- interop --------------------------------------------------------------------------------------
    def export(self, path: str | os.PathLike[str], which: int | str = "latest", entry: str = "model") -> Checkpoint:
        """Writes app_state ``entry`` of a checkpoint as a plain ``torch.save`` file at ``path`` (a local path or
        URL), loadable with ``torch.load(path, weights_only=True)`` by tools that know nothing of keepbest. The
        file is committed atomically with a manifest (``keepbest verify`` checks it); returns that commit."""
        self.manager.wait()
        candidates = self._chosen(which)
        if not candidates:
            raise CheckpointNotFoundError(f"No checkpoint in {self.manager.store.where()} to export. Save one first. "
                                          "Available: none.")
        ckpt = self.manager.verified(candidates[:1], wanted=str(which))
        reader = ckpt.reader()
        entries = _state.read_document(reader)
        if entry not in entries:
            raise ValueError(f"Checkpoint {ckpt.location} has no app_state entry '{entry}'. Pass entry= one of "
                             f"{sorted(entries)}. Received: entry={entry!r}")
        state = _state.entry_state(reader, entries[entry])  # torch.save only reads it
        folder, name = _interop.split(path)
        exporter = CheckpointManager(folder, series="export", dedup=False,
                                     storage_options=self.storage_options, coordinator=None)
        return exporter.save(ckpt.step, _interop.StateDictFile(state), name=name, epoch=ckpt.epoch,
                             metrics=ckpt.metrics, extra={"exported_from": ckpt.location, "entry": entry})

    def import_state_dict(self, path: str | os.PathLike[str], step: int, entry: str = "model") -> Checkpoint:
        """Saves the state dict in a ``torch.save`` file (read with ``torch.load(weights_only=True)``) as this
        series' checkpoint of ``step``, under app_state name ``entry``; ``restore`` then fills a module from it."""
        state = _interop.read(path, self.storage_options)
        return self.save(step, {entry: _Loaded(state)}).result()

    def wait(self) -> None:
        """Blocks until the save in flight is committed; raises its failure."""
        self.manager.wait()

    def close(self) -> None:
        """Waits for the save in flight and the uploads, then frees the staging memory. After saves, it tells
        sidecar evaluators that training ended (they stop once they evaluated what is left)."""
        try:
            if self._saved:
                self.manager.mark_training_end()
        finally:
            self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> list[Checkpoint]:
        """The committed checkpoints of this series, oldest first."""
        return self.manager.checkpoints()

    @property
    def latest(self) -> Checkpoint | None:
        return self.manager.latest

    @property
    def best(self) -> Checkpoint | None:
        return self.manager.best

    def _chosen(self, which: int | str) -> list[Checkpoint]:
        """The checkpoint ``which`` names, then (for "latest") the older ones to fall back on."""
        ckpts = self.manager.checkpoints()
        if which == "latest":
            return list(reversed(ckpts))
        if which == "best":
            # Without a monitor here, the one the series recorded (a restore-only Checkpointer needs none).
            recorded = next((c.manifest.monitor.name for c in reversed(ckpts) if c.manifest.monitor), None)
            metric = self.manager.monitor.name if self.manager.monitor else recorded
            best = self.manager.recorded_best(metric) if metric else None
            if best is None:
                why = "no monitor was given or recorded" if metric is None else f"no checkpoint has a value of {metric}"
                raise CheckpointNotFoundError(
                    f"No best checkpoint in {self.manager.store.where()}: {why}. Restore 'latest' or a step. "
                    f"Available: {', '.join(str(c.step) for c in ckpts) or 'none'}.")
            return [best]
        if isinstance(which, int) and not isinstance(which, bool):
            return [self.manager.get(which)]
        raise ValueError(f"Checkpointer.restore which must be 'latest', 'best' or a step (int). Received: which={which!r}")

    def restore(self, app_state: Mapping[str, Any], which: int | str = "latest", *, strict: bool = True,
                rng: bool = True) -> Checkpoint | None:
        """Fills ``app_state``'s objects in place from a checkpoint; returns it (None: nothing saved yet).

        ``which`` is ``"latest"`` (a damaged newest checkpoint is skipped, with a
        warning, for the next one that verifies), ``"best"`` or a step. Every
        file is verified against its digest first. Missing or unexpected names,
        keys or shapes raise :class:`~keepbest.errors.StateMismatchError` before
        anything changes; ``strict=False`` restores what matches and logs the rest.
        ``rng=False`` leaves the global random generators as they are.
        """
        _state.check_app_state(app_state, "restore")
        self._check_processes("restore")
        self.manager.wait()
        candidates = self._chosen(which)
        if not candidates:
            return None
        ckpt = self.manager.verified(candidates, wanted=str(which) if which != "latest" else candidates[0].location)
        reader = ckpt.reader()
        entries = _state.read_document(reader)
        skipped = _state.check_entries(app_state, entries, ckpt.location, strict)
        # Read-only views of the files for modules (load_state_dict copies out of them); the rest is copied into
        # memory, since an optimizer or a dict keeps what it is given.
        states = {n: _state.entry_state(reader, entries[n]) if isinstance(app_state[n], torch.nn.Module)
                  else _state.owned_copy(_state.entry_state(reader, entries[n])) for n in app_state if n in entries}
        # Everything that can be checked is checked before the first change.
        for name, state in states.items():
            if isinstance(app_state[name], torch.nn.Module):
                _state.check_module(app_state[name], state, name, ckpt.location, strict)
            elif isinstance(app_state[name], torch.optim.Optimizer):
                _state.check_optimizer(app_state[name], state, name, ckpt.location)
        generators = None
        if rng:
            rank = self.manager.coordinator.rank
            doc = _state.read_rng(reader, rank)
            if doc is None:
                raise CorruptCheckpointError(f"Checkpoint {ckpt.location} has no random generator states for process "
                                             f"{rank}. Restore with rng=False. "
                                             f"Received: files={[f.path for f in ckpt.manifest.files]}")
            generators = _state.checked_rng(doc, reader.where(_state.RNG_FILE))
        for name, state in states.items():
            target = app_state[name]
            if isinstance(target, torch.nn.Module):
                result = target.load_state_dict(state, strict=strict)
                skipped += [f"{name}.{k} (not in the checkpoint)" for k in result.missing_keys]
                skipped += [f"{name}.{k} (not in the model)" for k in result.unexpected_keys]
            elif isinstance(target, torch.Generator):
                target.set_state(state)
            elif _state.kind(target) == "state_dict":
                target.load_state_dict(state)
            else:
                target.clear()
                target.update(state)
        if generators is not None:
            generators.restore()
        if skipped:
            log.warning("keepbest: restored %s with strict=False; left as they were: %s", ckpt.location,
                        ", ".join(skipped[:20]))
        return ckpt
