"""``ModelCheckpoint``: Lightning's callback, its checkpoints committed by keepbest and its top k read back from them."""

from __future__ import annotations

import math
import os
import re
import weakref
from datetime import timedelta
from typing import Any, Literal, Mapping

import torch

from keepbest import store as stores
from keepbest.checkpoint import Checkpoint
from keepbest.lightning._compat import BaseModelCheckpoint, get_filesystem, pl
from keepbest.lightning._io import CheckpointIO, committed, is_link
from keepbest.policy import Monitor


class ModelCheckpoint(BaseModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, with the same arguments, file names and semantics, saving through keepbest.

    Change one import: ``from keepbest.lightning import ModelCheckpoint``.

    What changes (see the README's "Differences from Lightning"):

    - every checkpoint is a folder of safetensors and JSON (no pickle), committed
      atomically: a crash mid-save leaves the previous checkpoints as they were;
    - the trainer's ``CheckpointIO`` is wrapped by :class:`CheckpointIO`, so
      ``trainer.fit(ckpt_path="last" | "best" | path)`` reads these folders
      (other paths still go to the trainer's own);
    - on resume, the top ``save_top_k`` and the last checkpoint are recovered
      from the committed manifests in ``dirpath`` (not only from the state the
      resumed checkpoint carried), so a resumed run still keeps exactly
      ``save_top_k`` and the right ones;
    - ``save_last="link"`` is an alias (``keepbest ls`` shows it; it works on
      ``s3://`` too), not a symlink.

    Args (besides Lightning's own):
        async_save: the trainer waits only for the copy of the tensors to host
            memory; the write and the commit run in the background.
        storage_options: for an ``s3://`` ``dirpath``, passed to s3fs.
    """

    def __init__(self, dirpath: str | os.PathLike[str] | None = None, filename: str | None = None,
                 monitor: str | None = None, verbose: bool = False, save_last: bool | Literal["link"] | None = None,
                 save_top_k: int = 1, save_on_exception: bool = False, save_weights_only: bool = False,
                 mode: str = "min", auto_insert_metric_name: bool = True, every_n_train_steps: int | None = None,
                 train_time_interval: timedelta | None = None, every_n_epochs: int | None = None,
                 save_on_train_epoch_end: bool | None = None, enable_version_counter: bool = True, *,
                 async_save: bool = False, storage_options: Mapping[str, Any] | None = None) -> None:
        super().__init__(dirpath=None if dirpath is None else os.fspath(dirpath), filename=filename, monitor=monitor, verbose=verbose, save_last=save_last,
                         save_top_k=save_top_k, save_on_exception=save_on_exception,
                         save_weights_only=save_weights_only, mode=mode,
                         auto_insert_metric_name=auto_insert_metric_name, every_n_train_steps=every_n_train_steps,
                         train_time_interval=train_time_interval, every_n_epochs=every_n_epochs,
                         save_on_train_epoch_end=save_on_train_epoch_end,
                         enable_version_counter=enable_version_counter)
        if not isinstance(async_save, bool):
            raise TypeError(f"async_save must be True or False. Received: async_save={async_save!r}")
        self.async_save = async_save
        self.storage_options = dict(storage_options or {})
        self._io: CheckpointIO | None = None
        self._global_zero = True
        self._trainer: weakref.ref[Any] | None = None

    @property
    def io(self) -> CheckpointIO:
        if self._io is None:
            raise RuntimeError("keepbest.lightning.ModelCheckpoint is used before Trainer.fit set it up. Pass it to "
                               "Trainer(callbacks=[...]) and call fit. Received: no trainer yet")
        return self._io

    # -- Lightning's hooks --------------------------------------------------------------------------------
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # Lightning's setup resolves and broadcasts the folder; it also refuses save_last="link" off local disk,
        # which an alias does not need, and warns about a non-empty folder, where keepbest resumes instead.
        dirpath = self._ModelCheckpoint__resolve_ckpt_dir(trainer)  # type: ignore[attr-defined]
        self.dirpath = trainer.strategy.broadcast(dirpath)
        self._fs = get_filesystem(self.dirpath or "")
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, CheckpointIO):
            io = CheckpointIO(async_save=self.async_save, storage_options=self.storage_options, fallback=io)
            trainer.strategy.checkpoint_io = io
        elif (self.async_save and not io.async_save) or (self.storage_options and
                                                          self.storage_options != io.storage_options):
            raise ValueError(
                "keepbest.lightning.ModelCheckpoint: the trainer already writes through a keepbest CheckpointIO "
                f"(async_save={io.async_save}, storage_options={io.storage_options}), which does the writing for "
                "every callback; this callback's settings would be ignored. Set them on that CheckpointIO. Received: "
                f"async_save={self.async_save}, storage_options={self.storage_options}")
        self._io = io
        self._trainer = weakref.ref(trainer)
        self._global_zero = trainer.is_global_zero
        io.manage(self.dirpath, Monitor(self.monitor, self.mode) if self.monitor else None)

    def _save_checkpoint(self, trainer: "pl.Trainer", filepath: str) -> None:
        # Lightning sets last_model_path / best_k_models before it saves: that says what this save is for.
        role = "last" if filepath == self.last_model_path else "top_k" if filepath in self.best_k_models else "other"
        if trainer.is_global_zero:  # (only process 0 saves)
            # The logged values go into the manifest (keepbest ls shows them; epoch and step are fields of their
            # own). A "last" checkpoint is no top-k candidate: without the monitored value it is never the best.
            skip = {"epoch", "step"} | ({self.monitor} if self.monitor and role == "last" else set())
            self.io.pending[filepath] = {
                "metrics": {k: float(v) for k, v in self._monitor_candidates(trainer).items()
                            if k not in skip and isinstance(v, torch.Tensor) and v.numel() == 1},
                "extra": {"lightning": {"role": role, "callback": self.state_key}}}
        super()._save_checkpoint(trainer, filepath)

    def _link_checkpoint(self, trainer: "pl.Trainer", filepath: str, linkpath: str) -> None:  # type: ignore[override]
        if trainer.is_global_zero and os.path.normpath(filepath) != os.path.normpath(linkpath):
            self.io.link(filepath, linkpath)
        trainer.strategy.barrier()

    def file_exists(self, filepath: str | os.PathLike[str], trainer: "pl.Trainer") -> bool:
        local = self.io.find(filepath) is not None if trainer.is_global_zero else False
        return bool(trainer.strategy.reduce_boolean_decision(local, all=False))

    def _find_last_checkpoints(self, trainer: "pl.Trainer") -> set[str]:
        # Lightning asks before setup (to resolve ckpt_path="last"): the folder may not be resolved yet.
        folder = self.dirpath or self._ModelCheckpoint__resolve_ckpt_dir(trainer)  # type: ignore[attr-defined]
        if self._io is not None:
            self._io.writer.wait()
        # On a bucket Lightning asks fsspec for the path's modification time, which a folder has not: there the
        # path is the checkpoint's manifest object (its commit marker), which CheckpointIO reads as the checkpoint.
        suffix = "/" + stores.MANIFEST if stores.is_url(str(folder)) else ""
        return {os.path.join(str(folder), c.name) + suffix for c in committed(folder, self.storage_options)
                if self._is_last(c) or any(is_link(a) for a in c.aliases)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if self._io is not None and self.dirpath is not None:
            self._recover()

    # -- keepbest ----------------------------------------------------------------------------------------
    def _is_last(self, ckpt: Checkpoint) -> bool:
        """A "last" checkpoint: so recorded by a keepbest ModelCheckpoint, or named by Lightning's rule."""
        role = _lightning(ckpt).get("role")
        if role is not None:
            return bool(role == "last")
        stem = ckpt.name.removesuffix(self.FILE_EXTENSION)
        return re.match(rf"^{self.CHECKPOINT_NAME_LAST}(-(\d+))?", stem) is not None

    def _path(self, ckpt: Checkpoint) -> str:
        return os.path.join(str(self.dirpath), ckpt.name)

    def _recover(self) -> None:
        """This callback's top k and last checkpoint, as the committed manifests in ``dirpath`` record them
        (other callbacks' checkpoints and manual saves in the same folder are left alone)."""
        mine = [c for c in self.io.checkpoints(self.dirpath) if _lightning(c).get("callback") == self.state_key]
        for ckpt in reversed(mine):
            if _lightning(ckpt).get("role") == "last":
                link = next((a for a in ckpt.aliases if is_link(a)), None)
                self.last_model_path = os.path.join(str(self.dirpath), link) if link else self._path(ckpt)
                break
        if self.monitor is None or self.save_top_k == 0:
            return
        worst = math.inf if self.mode == "min" else -math.inf  # NaN ranks last, as Lightning records it
        scored = [(c, worst if math.isnan(c.metrics[self.monitor]) else c.metrics[self.monitor]) for c in mine
                  if _lightning(c).get("role") == "top_k" and self.monitor in c.metrics]
        scored.sort(key=lambda cv: cv[1], reverse=self.mode == "max")  # best first
        if self.save_top_k > 0:
            trainer = self._trainer() if self._trainer is not None else None
            for ckpt, _ in scored[self.save_top_k:]:  # saved before a crash stopped the deletion of the k+1th
                if self._global_zero and trainer is not None and self._should_remove_checkpoint(
                        trainer, self._path(ckpt), ""):
                    self.io.remove_checkpoint(self._path(ckpt))
            scored = scored[:self.save_top_k]
        self.best_k_models = {self._path(c): torch.tensor(v) for c, v in scored}
        if not scored:
            return
        self.best_model_path, self.best_model_score = self._path(scored[0][0]), torch.tensor(scored[0][1])
        if len(scored) == self.save_top_k:
            self.kth_best_model_path, self.kth_value = self._path(scored[-1][0]), torch.tensor(scored[-1][1])


def _lightning(ckpt: Checkpoint) -> dict[str, Any]:
    """What a keepbest ModelCheckpoint recorded about a save: its role and the callback that made it."""
    doc = ckpt.manifest.extra.get("lightning")
    return doc if isinstance(doc, dict) else {}
