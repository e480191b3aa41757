"""``keepbest.keras.ModelCheckpoint``: Keras's callback, made crash-safe and resumable."""

from __future__ import annotations

import difflib
import numbers
import os
import string
import time
import warnings
import weakref
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from keepbest import store as stores
from keepbest.errors import CoordinationError, MonitorError
from keepbest.distributed import Coordinator
from keepbest.keras import _coordination, _formats, _host, _resume, _state
from keepbest.keras._loading import load_weights
from keepbest.manager import CheckpointManager
from keepbest.manifest import Manifest
from keepbest.publishing import Publisher, PublishQueue
from keepbest.policy import (Monitor, Rule, batches_advanced, check_mode, epoch_is_due, is_last_due, resolve_mode,
                             rules_from)
from keepbest.writer import AsyncWriter, SaveHandle

try:  # Keras's own printer honours keras.config.disable_interactive_logging()
    from keras.src.utils.io_utils import print_msg as _print_msg
except ImportError:  # pragma: no cover - a future Keras moved it
    def _print_msg(message: str) -> None:
        print(message, flush=True)

_ARGS = ("filepath", "monitor", "verbose", "save_best_only", "save_weights_only", "mode",
         "save_freq", "initial_value_threshold", "keep_last", "keep_best", "keep_every", "keep_period", "max_bytes",
         "keep", "min_delta", "async_save", "when_behind", "publishers")
_LEGACY = ("period", "options", "load_weights_on_restart")


class ModelCheckpoint(keras.callbacks.Callback):
    """Keras's ``ModelCheckpoint`` with atomic saves, a remembered best and retention.

    Same arguments and messages as ``keras.callbacks.ModelCheckpoint``; the
    differences are listed in the README under "Differences from Keras".

    Args:
        filepath: where to save. ``.keras``, ``.weights.h5`` and ``.h5`` are
            written by Keras; any other path is a keepbest checkpoint folder
            (read it back with ``keepbest.keras.load_weights``/``load_model``).
            ``{epoch}``, ``{batch}`` and any logs key can be used as in Keras.
        monitor, verbose, save_best_only, save_weights_only, mode, save_freq,
            initial_value_threshold: as in Keras.
        keep_last: keep only the newest N checkpoints of this filepath.
        keep_best: keep only the best K checkpoints by ``monitor``. Combined
            with the other rules, a checkpoint is kept if any wants it.
        keep_every: also keep the checkpoints of every N-th epoch (epochs N,
            2N, ..., counted from 1 as Keras prints them).
        keep_period: also keep one checkpoint per period of this many
            seconds (the first of each, periods aligned to the clock).
        max_bytes: a budget for this filepath's checkpoints, in bytes or as
            ``"50GB"``/``"1.5 GiB"``: the oldest of those the rules keep are
            deleted until the rest fits (alone, it keeps what fits).
        keep: more rules, any ``keepbest.policy`` rule (``KeepEvery(10)``,
            ``MaxBytes("50GB")``) or your own. Whatever the rules say, the
            newest, the best, an aliased checkpoint and one a sidecar
            evaluator holds are kept.
        min_delta: smallest change of ``monitor`` that counts as improvement.
        publishers: remote trackers that mirror every commit, alias and
            deletion in the background (``keepbest.wandb_publisher.WandbPublisher``,
            ``keepbest.mlflow_publisher.MlflowPublisher``). ``fit`` waits for
            the uploads when it ends and raises ``PublishError`` if one failed
            after its retries; the local checkpoints are never affected.
        async_save: for a keepbest checkpoint folder, copy the state into host
            memory and return to training at once; writing, fsync, commit and
            retention run on a background thread, one save at a time. A
            background failure is raised at the next batch, the next save or
            the end of ``fit``. Keras's own file formats (``.keras``, ``.h5``)
            are still written on the training thread (Keras's writers read the
            live model); only their fsync, hashing and commit move to the
            background.
        when_behind: with ``async_save=True``, what a save does when the
            previous one is still being written. ``"wait"`` (the default):
            it waits for it, blocking training until the disk catches up.
            ``"skip"``: it is skipped and training goes on (a warning at the
            first skip, a count when ``fit`` ends). A save that improves
            ``monitor`` (by ``mode`` and ``min_delta``), one at an epoch end
            whose logs lack ``monitor``, one due once ``fit`` is stopping
            and the last save of ``fit`` (any save, where the epochs or
            steps are unknown) are never skipped: they wait. A skipped save
            is made when ``fit`` ends right after it (stopped by a later
            callback).
        storage_options: for an ``s3://`` location, passed to s3fs (``endpoint_url``,
            ``key``, ``secret``, ...); without them the AWS environment is used.
        coordinator: how the processes of a multi-process job reach each other.
            By default, with JAX's distributed runtime initialized
            (``keras.distribution.initialize``), a
            ``keepbest.distributed.JaxCoordinator``; pass one to set its
            ``timeout``. Every process then writes the variables (or pieces of
            sharded variables) it owns, and process 0 decides and commits.

    Example:
        >>> checkpoint = ModelCheckpoint("ckpt/epoch{epoch:02d}.keras", monitor="val_loss",
        ...                              keep_last=2, keep_best=1)
        >>> model.fit(x, y, validation_split=0.2, epochs=5, callbacks=[checkpoint])  # doctest: +SKIP
    """

    def __init__(self, filepath: str | os.PathLike[str], monitor: str = "val_loss", verbose: int = 0,
                 save_best_only: bool = False, save_weights_only: bool = False, mode: str = "auto",
                 save_freq: str | int = "epoch", initial_value_threshold: float | None = None, *,
                 keep_last: int | None = None, keep_best: int | None = None, keep_every: int | None = None,
                 keep_period: float | None = None, max_bytes: int | str | None = None, keep: Sequence[Rule] = (),
                 min_delta: float = 0.0,
                 async_save: bool = False, when_behind: str = "wait", publishers: Sequence[Publisher] = (),
                 storage_options: Mapping[str, Any] | None = None, coordinator: Coordinator | None = None,
                 **kwargs: Any) -> None:
        super().__init__()
        self._epoch_period, self._load_on_restart = _legacy_kwargs(kwargs)
        if save_freq != "epoch" and (isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise ValueError(
                f"Unrecognized save_freq: {save_freq!r}. Expected save_freq are 'epoch' or integer "
                f"values greater than 0 (a number of batches). Received: save_freq={save_freq!r}"
            )
        check_mode(mode)
        if initial_value_threshold is not None and (
                not isinstance(initial_value_threshold, numbers.Real) or isinstance(initial_value_threshold, bool)
                or np.isnan(initial_value_threshold)):
            raise ValueError(
                "`initial_value_threshold` must be a number (the value the first saved model must beat) "
                f"or None. Received: initial_value_threshold={initial_value_threshold!r}"
            )
        if not isinstance(os.fspath(filepath), str) or not os.fspath(filepath):
            raise ValueError("ModelCheckpoint needs a filepath to save to, e.g. 'ckpt/epoch{epoch:02d}.keras'. "
                             f"Received: filepath={filepath!r}")
        # A trailing separator ("ckpt/") names the folder itself.
        self.filepath = os.fspath(filepath).rstrip("/" + os.sep) or os.fspath(filepath)
        fields = _check_template(self.filepath)
        if "batch" in fields and save_freq == "epoch":
            raise ValueError(
                "The filepath of ModelCheckpoint uses {batch}, but save_freq='epoch' saves at the end of each "
                "epoch, where there is no batch. Pass save_freq=<number of batches>, or remove {batch}. "
                f"Received: filepath={self.filepath}, save_freq='epoch'")
        self._keep: tuple[Rule, ...] = rules_from(keep_last=keep_last, keep_best=keep_best, keep_every=keep_every,
                                                  keep_period=keep_period, max_bytes=max_bytes, keep=keep)
        if self._keep and _has_placeholders(_dirname(self.filepath)):
            raise ValueError(
                f"Retention ({', '.join(r.describe() for r in self._keep)}) prunes the checkpoints of one folder, "
                f"but this filepath puts each checkpoint in a folder of its own ('{_dirname(self.filepath)}' has a "
                "placeholder), so nothing could ever be pruned. Put the placeholder in the file name (e.g. "
                "'runs/model-{epoch:02d}.keras'), or drop the retention keywords. "
                f"Received: filepath={self.filepath}")
        literal = "".join(text for text, *_ in string.Formatter().parse(os.path.basename(self.filepath)))
        if len(os.fsencode(literal)) > 255:
            raise ValueError(f"The file name of ModelCheckpoint's filepath is {len(os.fsencode(literal))} bytes long "
                             "before its placeholders are filled; file names hold at most 255. Shorten it. "
                             f"Received: filepath={self.filepath}")
        self.format = _formats.format_for(self.filepath, save_weights_only)
        self._coordinator = _coordination.resolve(coordinator)
        if self._coordinator is not None and _formats.is_keras_file(self.format):
            raise ValueError(
                f"ModelCheckpoint cannot write a '{self.format}' file from {self._coordinator.size} processes: Keras's "
                "writer needs the whole model in one process. Save to a keepbest folder (a filepath without "
                "extension, e.g. 'ckpt/epoch{epoch:02d}'): every process then writes its part. "
                f"Received: filepath={self.filepath}")
        self._committer = self._coordinator is None or self._coordinator.rank == 0
        self._decisions = None if self._coordinator is None else \
            self._coordinator.channel(f"ModelCheckpoint#{self.filepath}#decisions")
        # Where it saves, pinned now: a relative path must not follow an os.chdir() during fit, and a URL
        # that no storage backend serves is an error before training starts.
        self.storage_options = dict(storage_options or {})
        self._anchor = _anchor(self.filepath, self.storage_options)
        self.monitor = monitor
        self.verbose = verbose
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.mode = mode
        self.save_freq = save_freq
        self.best: float | None = initial_value_threshold
        self.keep_last, self.keep_best, self.keep_every = keep_last, keep_best, keep_every
        self.keep_period, self.max_bytes = keep_period, max_bytes
        self.min_delta = abs(float(min_delta))
        if not isinstance(async_save, bool):
            raise TypeError(f"`async_save` must be True or False. Received: async_save={async_save!r}")
        self.async_save = async_save
        if not isinstance(when_behind, str) or when_behind not in ("wait", "skip"):
            raise ValueError("`when_behind` must be 'wait' (a save waits for the previous one to be written) or 'skip' "
                             "(a save due while the previous one is still being written is skipped). "
                             f"Received: when_behind={when_behind!r}")
        if when_behind == "skip" and not async_save:
            raise ValueError("when_behind='skip' needs async_save=True: only a save written in the background can "
                             "still be in progress when the next one is due (without it, each save is written before "
                             "training goes on). Pass async_save=True, or leave when_behind='wait'. "
                             f"Received: when_behind='skip', async_save={async_save!r}")
        self.when_behind = when_behind
        self._writer = AsyncWriter()  # shared by every folder this callback saves into: one save in flight
        self._publish = PublishQueue(list(publishers)) if publishers else None
        self._pending: tuple[SaveHandle[Any], int, str] | None = None
        self._monitor: Monitor | None = None
        self._monitor_checked = False
        self._logged: set[str] = set()
        self._recovered: Manifest | None = None
        self._managers: dict[str, CheckpointManager] = {}
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen: int | None = None
        self._current_epoch = 0
        self._warned_absent = False
        self._seen: tuple[int, int] | None = None  # (epoch, batch) of the last batch end handled
        # when_behind="skip": the best monitor value among the saves made (whatever save_best_only decides),
        # the due saves and the skipped ones of this fit, and the latest due save if it was skipped.
        self._saved_best: float | None = None
        self._due = self._skipped = 0
        self._skipped_last: tuple[int, int | None, dict[str, Any]] | None = None
        self._reserving: SaveHandle[None] | None = None
        _live.add(self)

    # -- Keras hooks --------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen = None
        self._due = self._skipped = 0
        self._skipped_last = None
        self._check_single_writer()
        _resume.register(self.model, self)  # a keepbest BackupAndRestore records and restores our state
        root = self._static_root()
        if root is not None and self._manager(root).exists():
            self._manager(root).clear_training_end()  # a sidecar evaluator waits for this run's checkpoints
        self._resume()
        if self.async_save and not _formats.is_keras_file(self.format) and self.model.weights \
                and self._coordinator is None:
            # The snapshot buffers are allocated and faulted in during the first epoch, on the writer thread.
            # (With several processes each copies only what it writes, known at the first save.)
            specs, staging = _state.staging_specs(self.model), self._writer.staging
            self._reserving = self._writer.submit("preparing the snapshot buffers", lambda: _reserve(staging, specs))

    def _check_single_writer(self) -> None:
        """Two ModelCheckpoints of one fit on one filepath would prune each other's checkpoints."""
        for other in list(_live):
            if other is not self and self.params is not None and other.params is self.params \
                    and other._series_key() == self._series_key():
                raise ValueError(
                    f"Two ModelCheckpoint callbacks of this fit save to {self.filepath}: each would overwrite the "
                    "other's files and delete its checkpoints by its own monitor and retention. Give each its own "
                    f"filepath (or folder). Received: monitor={other.monitor!r} and monitor={self.monitor!r}")

    def _series_key(self) -> str:
        return self._target(self.filepath)

    def _resume(self) -> None:
        """Recovers the best so far from what is committed (and loads the latest, if asked)."""
        root = self._static_root()
        if root is None:
            return
        mgr = self._manager(root)
        best = mgr.recorded_best(self.monitor)
        if best is not None:
            self._recovered = m = best.manifest
            if self.verbose > 0:
                _print_msg(f"ModelCheckpoint: resuming in {root or '.'}: best {self.monitor} so far is "
                           f"{m.monitor_value:.5f} (epoch {m.epoch}, {m.name}); it is kept until a better "
                           "one is saved.")
        latest = mgr.latest
        if self._load_on_restart and latest is not None:
            load_weights(self.model, latest.location)
            if self.verbose > 0:
                _print_msg(f"ModelCheckpoint: loaded weights from {latest.location} (load_weights_on_restart).")

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if _resume.replaying(self.model, self.resume_key()):
            return  # a batch trained before the restart, skipped by BackupAndRestore
        self._seen = (self._current_epoch, batch)
        self._skipped_last = None  # a step was taken: a save skipped before it would no longer save what was due
        self._poll()
        if not self._monitor_checked:
            self._check_monitor(logs or {}, final=False)
        if self.save_freq == "epoch":
            return
        self._batches_seen_since_last_saving += batches_advanced(self._last_batch_seen, batch)
        self._last_batch_seen = batch
        if self._batches_seen_since_last_saving >= self.save_freq:  # type: ignore[operator]
            self._batches_seen_since_last_saving = 0
            self._save_model(epoch=self._current_epoch, batch=batch, logs=logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._poll()
        if not self._monitor_checked:
            self._check_monitor(logs or {}, final=True)
        if self.save_freq == "epoch" and epoch_is_due(epoch, self._epoch_period):
            self._save_model(epoch=epoch, batch=None, logs=logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        try:
            if self._skipped_last is not None:  # no step since the latest due save was skipped: make it now
                (epoch, batch, saved_logs), self._skipped_last = self._skipped_last, None
                self._skipped -= 1
                self._save_model(epoch=epoch, batch=batch, logs=saved_logs, may_skip=False)
            self._report_skipped()
        finally:
            try:
                self._writer.close()  # the last save commits (or its failure is raised) before fit returns
            finally:
                self._poll()
        for mgr in self._managers.values():
            if mgr.exists():
                mgr.mark_training_end()  # a sidecar evaluator stops once it has evaluated what is there
        if self._publish is not None:
            self._publish.wait()  # every version is on the tracker before fit returns (and run.finish() follows)

    # -- state for BackupAndRestore ----------------------------------------------------
    def resume_key(self) -> str:
        return f"ModelCheckpoint:{self.filepath}"

    def resume_state(self) -> dict[str, Any]:
        return {"best": self.best, "batches_seen_since_last_saving": self._batches_seen_since_last_saving,
                "last_batch_seen": self._last_batch_seen, "seen": list(self._seen) if self._seen else None}

    def restore_resume_state(self, state: dict[str, Any]) -> None:
        if state["best"] is not None:
            self.best = state["best"]  # the best recorded on disk is merged in when the monitor is checked
        self._batches_seen_since_last_saving = state["batches_seen_since_last_saving"]
        self._last_batch_seen = state["last_batch_seen"]

    def wait(self) -> None:
        """Blocks until the save in flight (``async_save=True``) is committed; raises its failure.

        ``fit`` does this when it ends; call it to read a checkpoint that was
        just requested from the same process.
        """
        self._writer.wait()
        self._poll()

    def _poll(self) -> None:
        """Raises a failed background save's error; reports a finished one (verbose)."""
        self._writer.check()
        if self._pending is not None and self._pending[0].done():
            _handle, epoch, filepath = self._pending
            self._pending = None
            if self.verbose > 0:
                _print_msg(f"\nEpoch {epoch + 1}: finished saving model to {filepath}")

    # -- monitor --------------------------------------------------------------------
    @property
    def monitor_op(self) -> Any:
        """Keras's comparison (``keras.ops.less`` or ``greater``), once the mode is known; else None."""
        if self._monitor is None:
            return None
        return keras.ops.less if self._monitor.mode == "min" else keras.ops.greater

    @property
    def _monitor_needed(self) -> bool:
        return self.save_best_only or any(r.needs_monitor for r in self._keep)

    def _check_monitor(self, logs: dict[str, Any], final: bool) -> None:
        """Validates ``monitor`` against what is logged, before any best decision.

        A name seen in the batch logs (or its ``val_`` form) is accepted at the
        first batch. Otherwise the verdict waits for the first epoch end, whose
        logs also hold what other callbacks add there (a ``val_f1``, say).
        """
        self._logged.update(logs)
        names = self._logged | {f"val_{k}" for k in self._logged if not k.startswith("val_")}
        if self.monitor not in names:
            if not final:
                return
            self._monitor_checked = True
            if not self._monitor_needed:
                return  # as in Keras, monitor is unused then; no best is recorded
            available = sorted(names)
            match = difflib.get_close_matches(self.monitor, available, n=1, cutoff=0.5)
            hint = f" Did you mean '{match[0]}'?" if match else ""
            raise MonitorError(
                f"ModelCheckpoint cannot monitor '{self.monitor}': it is not in the logs of the first epoch, "
                f"so no checkpoint could ever be judged best.{hint} Pass one of the available names as "
                "`monitor` (if another callback adds it, list that callback before ModelCheckpoint). "
                f"Available: {', '.join(available)}. Received: monitor={self.monitor}"
            )
        self._monitor_checked = True
        try:
            mode = resolve_mode(self.monitor, self.mode, self._direction())
        except MonitorError:
            if self._monitor_needed:
                raise
            return
        self._monitor = Monitor(self.monitor, mode, self.min_delta)
        rec = self._recovered
        if rec is not None and rec.monitor is not None and rec.monitor.mode == mode:
            self.best = self._monitor.better(self.best, rec.monitor_value)
            self._saved_best = self._monitor.better(self._saved_best, rec.monitor_value)

    def _direction(self) -> str | None:
        """The metric's declared direction, found as Keras finds it (``_direction``)."""
        name = self.monitor.removeprefix("val_")
        found: list[Any] = []
        for m in getattr(self.model, "metrics", []):
            found.extend(getattr(m, "metrics", [m]) if type(m).__name__ in ("CompileMetrics", "MetricsList") else [m])
        for m in found:
            if m.name == name and hasattr(m, "_direction"):
                return str(m._direction)
        return None

    # -- saving ---------------------------------------------------------------------
    def _static_root(self) -> str | None:
        """The folder of ``filepath`` (absolute) when it holds no placeholder, else None."""
        dirname = _dirname(self.filepath)
        return None if _has_placeholders(dirname) else _dirname(self._target(self.filepath))

    def _target(self, filepath: str) -> str:
        """Where ``filepath`` (filled or not) is saved: absolute, as of construction."""
        return os.path.join(self._anchor, filepath) if self._anchor else filepath

    def _manager(self, root: str) -> CheckpointManager:
        if root not in self._managers:
            # Monitor and rules are attached at save time: an "auto" mode is resolved only once
            # the model's metrics exist.
            self._managers[root] = CheckpointManager(root, series=os.path.basename(self.filepath),
                                                     writer=self._writer, publishers=self._publish or (),
                                                     storage_options=self.storage_options,
                                                     coordinator=self._coordinator)
        return self._managers[root]

    def _get_file_path(self, epoch: int, batch: int | None, logs: dict[str, Any]) -> str:
        try:
            if batch is None or "batch" in logs:
                return self.filepath.format(epoch=epoch + 1, **logs)
            return self.filepath.format(epoch=epoch + 1, batch=batch + 1, **logs)
        except KeyError as e:
            raise KeyError(f'Failed to format this callback filepath: "{self.filepath}". Reason: {e}') from None

    def _should_save_model(self, epoch: int, batch: int | None, logs: dict[str, Any], filepath: str) -> bool:
        if not self.save_best_only:
            if self.verbose > 0:
                _print_msg(f"\nEpoch {epoch + 1}: saving model to {filepath}")
            return True
        current = logs.get(self.monitor)
        if current is None:
            self._report_absent(epoch, batch)
            return False
        if np.ndim(current) > 0:
            raise MonitorError(
                f"ModelCheckpoint can only compare a scalar `monitor`, but '{self.monitor}' is an "
                f"array of shape {np.shape(current)}. Monitor a scalar metric. Received: {current}"
            )
        assert self._monitor is not None
        current = float(current)
        best_str = "None" if self.best is None else f"{self.best:.5f}"
        if self._monitor.is_improvement(current, self.best):
            if self.verbose > 0:
                _print_msg(f"\nEpoch {epoch + 1}: {self.monitor} improved from {best_str} to "
                           f"{current:.5f}, saving model to {filepath}")
            self.best = current
            return True
        if self.verbose > 0:
            _print_msg(f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best_str}")
        return False

    def _report_absent(self, epoch: int, batch: int | None) -> None:
        if not self._warned_absent:
            self._warned_absent = True
            if batch is not None and self.monitor.startswith("val_"):
                why = (f"'{self.monitor}' is only computed at the end of an epoch, so the batch saves "
                       f"(save_freq={self.save_freq}) with save_best_only=True are skipped. Monitor a "
                       "training metric, or use save_freq='epoch'.")
            else:
                why = (f"It is not in the logs of epoch {epoch + 1} (no validation data, or `validation_freq` "
                       "skipped this epoch): nothing is saved then and the best checkpoint is kept. Pass "
                       "validation data, or monitor a training metric. (Shown once.)")
            warnings.warn(f"Can save best model only with {self.monitor} available. {why}", UserWarning,
                          stacklevel=3)
        if self.verbose > 0:
            _print_msg(f"\nEpoch {epoch + 1}: {self.monitor} is not available, skipping: the best "
                       "checkpoint is kept")

    def _save_model(self, epoch: int, batch: int | None, logs: dict[str, Any] | None, may_skip: bool = True) -> None:
        logs = logs or {}
        # With several processes, process 0 decides (whether, where, whether to skip, the best so far) and the
        # others follow: every process then skips the same saves.
        if self._decisions is None:
            filepath, skipped = self._decide(epoch, batch, logs, may_skip)
        else:
            about = f"the save decision of epoch {epoch + 1}"
            try:
                filepath, skipped = self._decide(epoch, batch, logs, may_skip) if self._committer else (None, False)
            except BaseException as e:  # the others wait for the decision: tell them why there is none
                self._decisions.broadcast("save", {"error": f"{type(e).__name__}: {e}"}, about=about)
                raise
            best = None if self.best is None else repr(float(self.best))  # (JSON has no inf)
            shared = self._decisions.broadcast("save", {"filepath": filepath, "best": best, "skipped": skipped},
                                               about=about)
            if "error" in shared:
                raise CoordinationError(f"ModelCheckpoint cannot save at epoch {epoch + 1}: process 0 failed to decide: "
                                        f"{shared['error']}. Received: the error of process 0")
            filepath, self.best = shared["filepath"], None if shared["best"] is None else float(shared["best"])
            skipped = bool(shared.get("skipped"))
        if may_skip:
            self._due += 1 if filepath is not None or skipped else 0
            self._skipped += 1 if skipped else 0
            self._skipped_last = (epoch, batch, dict(logs)) if skipped else None
        if filepath is None:
            return
        value = _scalar(logs.get(self.monitor))
        if self._monitor is not None and self._monitor.is_improvement(value, self._saved_best):
            self._saved_best = value  # (Keras's rule, as for self.best: only an improvement moves it)
        target = self._target(filepath)
        name = os.path.basename(target)
        mgr = self._configured(_dirname(target))
        if _formats.is_keras_file(self.format) and stores.open(target, self.storage_options).exists():
            raise IOError("Please specify a non-directory filepath for ModelCheckpoint. Filepath used "
                          f"is an existing directory: {filepath}")
        started = time.perf_counter()  # the training thread's stall starts here (recorded in the manifest)
        if self.async_save:
            self._writer.wait()  # back-pressure first: the snapshot reuses the previous save's buffers
        staging = self._writer.staging if self.async_save else None
        save = mgr.save_async if self.async_save else mgr.save
        # With several processes, the snapshot leaves out what the others write.
        skip = mgr.owned_elsewhere() if staging is not None else None
        outcome = save(
            self._step(), _formats.payload_for(self.model, self.format, staging, skip), name=name,
            metrics={k: float(v) for k, v in logs.items() if np.ndim(v) == 0 and _is_number(v)},
            epoch=epoch + 1, batch=None if batch is None else batch + 1,
            versions=_formats.keras_versions(), extra=self._extra(), started=started,
        )
        if isinstance(outcome, SaveHandle):
            self._poll()  # the previous save finished before this one was accepted: report it
            self._pending = (outcome, epoch, filepath)
        elif self.verbose > 0:
            _print_msg(f"\nEpoch {epoch + 1}: finished saving model to {filepath}")

    def _configured(self, root: str) -> CheckpointManager:
        mgr = self._manager(root)
        # Until the monitor is known (a name that first appears at epoch end), rank nothing.
        mgr.monitor = self._monitor
        mgr.keep = self._keep if self._monitor else tuple(r for r in self._keep if not r.needs_monitor)
        return mgr

    def _decide(self, epoch: int, batch: int | None, logs: dict[str, Any], may_skip: bool) -> tuple[str | None, bool]:
        """The filepath to save to now, or None (Keras's rules, and never over the recorded best); and whether
        this due save is skipped because the writer is behind (when_behind="skip")."""
        filepath = self._get_file_path(epoch, batch, logs)
        target = self._target(filepath)
        if self._would_overwrite_best(self._configured(_dirname(target)), os.path.basename(target), logs):
            return None, False
        if may_skip and self._skippable(epoch, batch, logs):
            self._report_skip(epoch, filepath)
            return None, True
        return (filepath if self._should_save_model(epoch, batch, logs, filepath) else None), False

    def _skippable(self, epoch: int, batch: int | None, logs: dict[str, Any]) -> bool:
        """when_behind="skip": the previous save is still being written, and skipping this one loses no best
        and not the last save of fit.

        With save_best_only every save is a new best, so none is skipped. A save is a candidate for best when
        its logs hold the monitor and it improves on the best saved so far (mode, min_delta); one whose logs
        lack the monitor is waited for at an epoch end (validation_freq skipped validation), but skipped at a
        batch end, where the monitor is absent every time (a val_ metric): its checkpoint would carry no value
        to rank. With a monitor that ranks nothing (unresolved), no save can be the best.
        """
        in_flight = self._writer.in_flight
        if self.when_behind != "skip" or self.save_best_only or in_flight is None or in_flight is self._reserving:
            return False  # (buffers still being prepared are not a save to catch up with)
        if getattr(self.model, "stop_training", False):
            return False  # fit ends here, and a callback may change the weights in on_train_end (EarlyStopping)
        params = self.params or {}
        if is_last_due(epoch, batch, epochs=params.get("epochs"), steps=params.get("steps"),
                       save_freq=self.save_freq, every=self._epoch_period):
            return False
        if self._monitor is None:
            return True
        if self.monitor not in logs:
            return batch is not None
        return not self._monitor.is_improvement(_scalar(logs[self.monitor]), self._saved_best)

    def _report_skip(self, epoch: int, filepath: str) -> None:
        if self._skipped == 0:
            in_flight = self._writer.in_flight
            previous = in_flight.description if in_flight is not None else "the previous save"
            warnings.warn(
                f"ModelCheckpoint: skipped the save of epoch {epoch + 1} to {filepath}: {previous} is still being "
                "written (when_behind='skip'), so the disk takes longer per save than training between saves. "
                f"Saves that improve {self.monitor} and the last save of fit are never skipped; fit ends with a "
                "count. To skip none, save less often (a larger save_freq) or to a faster disk, or pass "
                "when_behind='wait' to wait for it. (Shown once per fit.)", UserWarning, stacklevel=4)
        if self.verbose > 0:
            _print_msg(f"\nEpoch {epoch + 1}: skipping the save to {filepath}: the previous save is still being "
                       "written (when_behind='skip')")

    def _report_skipped(self) -> None:
        """The count of skipped saves, when fit ends (on process 0, which decided them)."""
        if self._skipped == 0 or not self._committer:
            return
        message = (f"ModelCheckpoint skipped {self._skipped} of {self._due} saves of this fit (when_behind='skip'): "
                   "each was due while the previous save was still being written. The saves that improved "
                   f"{self.monitor} and the last one were made. To skip fewer, save less often (a larger "
                   "save_freq) or to a faster disk.")
        warnings.warn(message, UserWarning, stacklevel=3)
        if self.verbose > 0:
            _print_msg(f"\n{message}")

    def _would_overwrite_best(self, mgr: CheckpointManager, name: str, logs: dict[str, Any]) -> bool:
        """True (with a warning) when a templated name comes round again on the recorded best.

        That happens when a restarted run counts epochs from 1 again: Keras would
        replace the best model with a worse one. A fixed filepath is meant to be
        overwritten, and with ``save_best_only`` only a better model gets there.
        """
        if self.save_best_only or self._monitor is None or not _has_placeholders(os.path.basename(self.filepath)):
            return False
        if self._pending is not None and os.path.basename(self._pending[2]) == name:
            mgr.wait()  # the save in flight has this very name and may be the best
        best = mgr.best
        if best is None or best.name != name:
            return False
        current = logs.get(self.monitor)
        value = float(current) if current is not None and np.ndim(current) == 0 and _is_number(current) else None
        if self._monitor.is_improvement(value, mgr.best_value):
            return False
        warnings.warn(
            f"ModelCheckpoint: not overwriting {best.path}: it holds the best {self.monitor} so far "
            f"({mgr.best_value:.5f}, epoch {best.epoch}) and this save's {self.monitor} ({value}) is not better, "
            "so this save is skipped. The name came round again because the epoch count restarted: pass "
            "`initial_epoch` to fit() or use a new filepath.", UserWarning, stacklevel=3)
        return True

    def _extra(self) -> dict[str, Any]:
        """What the manifest records besides metrics."""
        return {"save_weights_only": self.save_weights_only, "filepath_template": self.filepath}

    def _step(self) -> int | None:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return None
        return _host.scalar(optimizer.iterations)


def _legacy_kwargs(kwargs: dict[str, Any]) -> tuple[int, bool]:
    """tf.keras 2.x keywords: returns (save every N epochs, load_weights_on_restart)."""
    for key in kwargs:
        if key not in _LEGACY:
            match = difflib.get_close_matches(key, _ARGS + _LEGACY, n=1)
            hint = f" Did you mean '{match[0]}'?" if match else ""
            raise TypeError(
                f"ModelCheckpoint.__init__() got an unexpected keyword argument '{key}'.{hint} "
                f"Valid arguments: {', '.join(_ARGS)}. Received: {key}={kwargs[key]!r}"
            )
    if kwargs.get("options") is not None:
        warnings.warn("ModelCheckpoint: `options` (tf.train.CheckpointOptions/SaveOptions) has no "
                      "meaning in Keras 3 and is ignored.", UserWarning, stacklevel=3)
    load_on_restart = bool(kwargs.get("load_weights_on_restart", False))
    period = kwargs.get("period")
    if period is None:
        return 1, load_on_restart
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError("`period` must be a positive integer (save every N epochs); for batches use "
                         f"`save_freq`. Received: period={period!r}")
    warnings.warn("`period` argument is deprecated. Please use `save_freq` to specify the frequency "
                  f"in number of batches seen. Saving every {period} epochs.", FutureWarning, stacklevel=3)
    return period, load_on_restart


def _scalar(value: Any) -> float | None:
    """A logged value as a float, or None when it is missing, not a number or not a scalar."""
    return float(value) if value is not None and np.ndim(value) == 0 and _is_number(value) else None


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _has_placeholders(template: str) -> bool:
    return any(field is not None for _, field, _, _ in string.Formatter().parse(template))


def _reserve(staging: Any, specs: Any) -> None:
    """The reservation job: a failure (memory) is reported and leaves the allocation to the first save."""
    try:
        staging.reserve(specs)
    except Exception as e:  # noqa: BLE001 - the first save allocates, and raises, on its own
        staging.release()
        warnings.warn(f"keepbest could not prepare the snapshot buffers ahead of the first save "
                      f"({type(e).__name__}: {e}); the first save allocates them instead. Received: {e!r}",
                      RuntimeWarning, stacklevel=1)


def _dirname(path: str) -> str:
    return os.path.dirname(path) or ("." if not stores.is_url(path) else path)


def _anchor(filepath: str, storage_options: Mapping[str, Any]) -> str:
    """The folder a relative local ``filepath`` is relative to (the current one, now); "" otherwise."""
    if stores.is_url(filepath):
        stores.open(filepath, storage_options)  # raises now when no backend serves it
        return ""
    if os.path.isabs(os.path.expanduser(filepath)):
        return ""
    return stores.absolute(".")


# Every ModelCheckpoint alive, to find two of one fit that save to the same filepath.
_live: "weakref.WeakSet[ModelCheckpoint]" = weakref.WeakSet()


def _check_template(filepath: str) -> set[str]:
    """The template's field names; raises ValueError for a malformed template."""
    try:
        return {field.split(".")[0].split("[")[0] for _, field, _, _ in string.Formatter().parse(filepath)
                if field is not None}
    except ValueError as e:
        raise ValueError(
            f"The filepath of ModelCheckpoint is not a valid format template ({e}). Use "
            "`{epoch:02d}`-style placeholders, and `{{`/`}}` for literal braces. "
            f"Received: filepath={filepath}"
        ) from None
