"""``CheckpointIO``: Lightning's checkpoint reads and writes through keepbest (safetensors + JSON, atomic)."""

from __future__ import annotations

import os
import posixpath
import re
import time
from concurrent.futures import Future
from typing import Any, Mapping

import torch

from keepbest import discovery, store as stores
from keepbest.checkpoint import Checkpoint
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.lightning._compat import BaseCheckpointIO
from keepbest.manager import CheckpointManager
from keepbest.payload import TensorPayload
from keepbest.policy import Monitor
from keepbest.torch import _host, _state
from keepbest.writer import AsyncWriter, SaveHandle

SERIES = "lightning"
LINK_SUFFIX = ".ckpt"  # Lightning's FILE_EXTENSION


def split(path: Any) -> tuple[str, str]:
    """``(folder, name)`` of a checkpoint path or URL (``dir/epoch=3-step=40.ckpt``)."""
    text = os.fspath(path)
    if stores.is_url(text):
        return posixpath.dirname(text.rstrip("/")), posixpath.basename(text.rstrip("/"))
    text = os.path.abspath(os.path.expanduser(text))
    return os.path.dirname(text), os.path.basename(text)


def link_alias(name: str) -> str:
    """The alias that stands for Lightning's link ``name`` (``last.ckpt``; ``epoch=3-last.ckpt`` as
    ``epoch_3-last.ckpt``): aliases take letters, digits, '_', '.' and '-'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def is_link(alias: str) -> bool:
    """Whether an alias is one of Lightning's links (named like a checkpoint file), not a user's."""
    return alias.endswith(LINK_SUFFIX)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def metrics_of(checkpoint: Mapping[str, Any]) -> dict[str, float]:
    """The monitored values a Lightning checkpoint carries (each ModelCheckpoint's ``current_score``)."""
    out: dict[str, float] = {}
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, Mapping) and isinstance(state.get("monitor"), str):
            score = state.get("current_score")
            if isinstance(score, torch.Tensor) and score.numel() == 1:
                out[state["monitor"]] = float(score)
            elif isinstance(score, (int, float)) and not isinstance(score, bool):
                out[state["monitor"]] = float(score)
    return out


def committed(folder: Any, storage_options: Mapping[str, Any] | None = None) -> list[Checkpoint]:
    """The committed checkpoints of ``folder`` that keepbest.lightning saved (oldest first, aliases marked)."""
    if not stores.open(os.fspath(folder), storage_options or None).exists():
        return []
    return [c for c in discovery.find(os.fspath(folder), storage_options or None).checkpoints
            if c.manifest.series == SERIES]


class CheckpointIO(BaseCheckpointIO):
    """Lightning's checkpoints as keepbest checkpoints: ``Trainer(plugins=[CheckpointIO()])``.

    Each ``.ckpt`` path becomes a checkpoint folder of that name (tensors in
    safetensors, the rest in JSON, never pickle), committed atomically, with
    a BLAKE3 digest per file that is verified on load. The global random
    generators (Python, NumPy, torch) are saved with it and restored when it
    is loaded, so ``trainer.fit(ckpt_path=...)`` resumes with the same draws.
    Paths may be ``s3://`` URLs (with ``keepbest[s3]``).

    Args:
        async_save: return once the tensors are copied into host staging; the
            write and the commit run in the background (waited for at the end of
            ``fit``, and before the next save or load).
        storage_options: passed to s3fs for ``s3://`` paths.
        fallback: where paths that are not keepbest checkpoints go (the
            trainer's previous ``CheckpointIO``, when :class:`ModelCheckpoint`
            installs this one): loads of other files, and saves outside the
            folders registered with :meth:`manage`. Without it, every path is keepbest's.

    Example:
        >>> import lightning.pytorch as pl  # doctest: +SKIP
        >>> trainer = pl.Trainer(plugins=[CheckpointIO()])  # doctest: +SKIP
    """

    def __init__(self, *, async_save: bool = False, storage_options: Mapping[str, Any] | None = None,
                 fallback: BaseCheckpointIO | None = None) -> None:
        if not isinstance(async_save, bool):
            raise TypeError(f"async_save must be True or False. Received: async_save={async_save!r}")
        self.async_save = async_save
        self.storage_options = dict(storage_options or {})
        self.fallback = fallback
        self.writer = AsyncWriter()
        self._managers: dict[str, CheckpointManager] = {}
        self._monitors: dict[str, Monitor] = {}
        self._managed: set[str] = set()
        self.pending: dict[str, dict[str, Any]] = {}
        """Per path, the ``metrics`` and ``extra`` to record with its next save (set by :class:`ModelCheckpoint`)."""

    # -- folders ----------------------------------------------------------------------------------------
    def manage(self, folder: Any, monitor: Monitor | None = None) -> None:
        """Registers ``folder`` as keepbest's: its saves (and its subfolders') come here even with a fallback."""
        key = split(posixpath.join(os.fspath(folder), "x"))[0]
        self._managed.add(key)
        if monitor is not None:
            self._monitors[key] = monitor
            if key in self._managers and self._managers[key].monitor != monitor:
                self._managers.pop(key)
        # No manager yet: making one recovers the folder, which only the process that saves (0) may do.

    def manager(self, folder: str) -> CheckpointManager:
        if folder not in self._managers:
            self._managers[folder] = CheckpointManager(
                folder, series=SERIES, monitor=self._monitors.get(folder), writer=self.writer,
                storage_options=self.storage_options or None, coordinator=None)  # Lightning saves on rank 0 only
        return self._managers[folder]

    def _ours(self, folder: str) -> bool:
        return self.fallback is None or any(folder == m or folder.startswith(m.rstrip("/") + "/")
                                            for m in self._managed)

    # -- CheckpointIO -----------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        folder, name = split(path)
        if not self._ours(folder):
            assert self.fallback is not None
            self.fallback.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError("keepbest.lightning.CheckpointIO takes storage options at construction "
                            f"(CheckpointIO(storage_options=...)), not per save. Received: storage_options={storage_options!r}")
        self.save(checkpoint, path)

    def save(self, checkpoint: Mapping[str, Any], path: Any) -> SaveHandle[Checkpoint]:
        """Saves a checkpoint dict at ``path``; returns the handle of its commit (done, unless ``async_save``)."""
        folder, name = split(path)
        mgr = self.manager(folder)
        pending = self.pending.pop(os.fspath(path), {})
        captured = _state.capture_values(checkpoint)
        step = checkpoint.get("global_step")
        epoch = checkpoint.get("epoch")
        kwargs: dict[str, Any] = dict(
            name=name, metrics=pending["metrics"] if "metrics" in pending else metrics_of(checkpoint),
            extra=pending.get("extra"), epoch=epoch if isinstance(epoch, int) else None,
            versions={"torch": torch.__version__, "lightning": str(checkpoint.get("pytorch-lightning_version", ""))})
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
        kwargs["started"] = time.perf_counter()  # the training thread's stall starts here (recorded in the manifest)
        if self.async_save:
            self.writer.wait()  # back-pressure: the snapshot reuses the previous save's buffers
            copier = _host.Copier()
            tensors = self.writer.staging.snapshot(captured.tensors, spec=_host.spec, copy=copier,
                                                   allocate=_host.allocate)
            copier.run()
        else:
            tensors = {f: {n: _host.view(t) for n, t in ts.items()} for f, ts in captured.tensors.items()}
        payload = TensorPayload(tensors, json_files={_state.STATE_FILE: captured.document},
                                process_json={_state.RNG_FILE: _state.rng_state()}, format="lightning",
                                detached=self.async_save)
        if self.async_save:
            return mgr.save_async(step, payload, **kwargs)
        done: Future[Checkpoint] = Future()
        done.set_result(mgr.save(step, payload, **kwargs))
        return SaveHandle(mgr.store.where(name), done)

    def checkpoints(self, folder: Any) -> list[Checkpoint]:
        """The committed checkpoints of ``folder`` saved through this plugin (oldest first, aliases marked)."""
        self.writer.wait()
        return committed(folder, self.storage_options)

    def find(self, path: Any) -> Checkpoint | None:
        """The committed keepbest checkpoint at ``path`` (a name, an alias set by :meth:`link`, or the manifest
        object of a checkpoint on a bucket, as :class:`ModelCheckpoint` resolves ``ckpt_path="last"``), else None."""
        self.writer.wait()
        text = os.fspath(path)
        if stores.is_url(text) and text.endswith("/" + stores.MANIFEST):
            path = text[:-len(stores.MANIFEST) - 1]
        found = discovery.find(os.fspath(path), self.storage_options or None)
        if found.name is None:  # nothing at the path itself: an alias of its folder?
            folder, name = split(path)
            return next((c for c in self.checkpoints(folder) if link_alias(name) in c.aliases), None)
        if found.damaged and not found.checkpoints:
            raise CorruptCheckpointError(found.damaged[0].reason)
        return found.checkpoints[0] if found.checkpoints else None

    def link(self, target: Any, link: Any) -> None:
        """Points the alias named like ``link`` (``last.ckpt``) at the checkpoint ``target``: Lightning's
        ``save_last="link"`` without a symlink, so it works on buckets too."""
        folder, name = split(target)
        link_folder, alias = split(link)
        if link_folder != folder:
            raise ValueError(f"Cannot link {os.fspath(link)} to {os.fspath(target)}: an alias names a checkpoint of "
                             "its own folder. Keep the last checkpoint in dirpath. Received: "
                             f"target={os.fspath(target)}, link={os.fspath(link)}")
        self.manager(folder).promote(name, link_alias(alias))

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        ckpt = self.find(path)
        if ckpt is None:
            if self.fallback is not None:
                return self.fallback.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
            raise CheckpointNotFoundError(
                f"No keepbest checkpoint at {os.fspath(path)}: the path does not exist or is not a checkpoint keepbest "
                "committed (a save that was interrupted leaves nothing visible). Pass the path of a checkpoint saved "
                f"through keepbest.lightning, or load other files with Lightning's own CheckpointIO. "
                f"Received: path={os.fspath(path)}")
        assert ckpt.store is not None
        chosen = discovery.first_verified(ckpt.store, [ckpt], wanted=os.fspath(path))
        reader = chosen.reader()
        checkpoint = _state.read_values(reader, views={"state_dict"})  # the module copies it; Lightning drops it
        rng_doc = _state.read_rng(reader, 0)
        if rng_doc is not None and _rank() == 0:  # Lightning saves process 0's generators only
            _state.checked_rng(rng_doc, reader.where(_state.RNG_FILE)).restore()
        if map_location is not None:
            checkpoint = _moved(checkpoint, map_location)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        folder, name = split(path)
        if not self._ours(folder) and self.find(path) is None:
            assert self.fallback is not None
            self.fallback.remove_checkpoint(path)
            return
        mgr = self.manager(folder)
        aliases = mgr.aliases
        if link_alias(name) in aliases and is_link(link_alias(name)):  # a link Lightning replaces: the alias goes
            mgr.demote(link_alias(name))
            return
        version = next((c.manifest.version for c in mgr.checkpoints() if c.name == name), None)
        for alias, held in aliases.items():  # a link Lightning moves next must not keep this one alive
            if held == version and is_link(alias):
                mgr.demote(alias)
        mgr.delete(name, reason="Lightning ModelCheckpoint: no longer in the top k, or replaced as the last")

    def teardown(self) -> None:
        """Waits for the save in flight (raising its failure); Lightning calls it at the end of fit."""
        try:
            self.writer.wait()
            self.writer.staging.release()  # the host copy of the state (pinned on CUDA) is not kept after fit
        finally:
            if self.fallback is not None:
                self.fallback.teardown()


def _moved(value: Any, map_location: Any) -> Any:
    """The checkpoint's tensors where ``map_location`` says, as ``torch.load`` reads it (a callable, a mapping
    of device names, or a device)."""
    def move(t: torch.Tensor) -> Any:
        if callable(map_location):
            return map_location(t, "cpu")
        if isinstance(map_location, Mapping):
            return t.to(map_location.get("cpu", "cpu"))
        return t.to(map_location)

    return _state.map_tensors(value, move)
