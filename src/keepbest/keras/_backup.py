"""``keepbest.keras.BackupAndRestore``: Keras's callback, made exact, crash-safe and preemption-aware."""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from keepbest import rng
from keepbest.errors import CorruptCheckpointError, StateMismatchError
from keepbest.distributed import Coordinator
from keepbest.keras import _coordination, _host, _resume, _state
from keepbest.keras._callback import _is_number, _print_msg
from keepbest.manager import CheckpointManager
from keepbest.payload import TensorPayload, process_file
from keepbest.policy import KeepLast, batches_advanced
from keepbest.store import Reader

TRAINING_FILE = "training.json"
FORMAT = "keepbest-keras-backup"
SERIES = "backup"


class BackupAndRestore(keras.callbacks.Callback):
    """Backs up the whole training state and resumes from it exactly.

    Keras's arguments (``backup_dir, save_freq, double_checkpoint,
    delete_checkpoint``), with what Keras leaves out: the optimizer slots
    (checked on restore), the batch within the epoch (the batches already
    trained are skipped), the random generators (Python, NumPy, torch,
    Keras's seed generators), the metric accumulators and the state of
    keepbest's ``ModelCheckpoint`` (best value, batch counters). Each backup
    is a committed keepbest checkpoint, so a crash during a backup leaves the
    previous one.

    Args:
        backup_dir: folder of the backups; give each training run its own.
        save_freq: ``"epoch"``, a number of batches, or ``False`` (only on
            preemption).
        double_checkpoint: keep the previous backup too; if the newest does
            not verify, training resumes from the previous one.
        delete_checkpoint: delete the backups when ``fit`` completes.
        save_before_preemption: on one of ``preemption_signals``, back up at
            the next batch boundary and stop ``fit``, which then returns
            normally. The handler chains to the one installed before it.
        preemption_signals: the signals that mean "preempted" (default SIGTERM).
        partial_restore: restore the variables that match even when the model
            or optimizer changed (the report lists what was left as it was);
            by default any mismatch is an error.
        verbose: 1 prints one line on restore and on preemption; 0 is silent.
        storage_options: for an ``s3://`` location, passed to s3fs (``endpoint_url``,
            ``key``, ``secret``, ...); without them the AWS environment is used.
        coordinator: as for ``ModelCheckpoint``: with several JAX processes,
            each backs up the variables it owns and its own random generator
            states, and process 0 commits.

    Example:
        >>> backup = BackupAndRestore("/tmp/backup", save_freq=100, save_before_preemption=True)
        >>> model.fit(x, y, epochs=10, callbacks=[backup])  # doctest: +SKIP
    """

    def __init__(self, backup_dir: str | os.PathLike[str], save_freq: str | int | bool = "epoch",
                 double_checkpoint: bool = False, delete_checkpoint: bool = True, *,
                 save_before_preemption: bool = False,
                 preemption_signals: Sequence[int] = (signal.SIGTERM,),
                 partial_restore: bool = False, verbose: int = 1,
                 storage_options: Mapping[str, Any] | None = None, coordinator: Coordinator | None = None) -> None:
        super().__init__()
        if not backup_dir:
            raise ValueError("Empty `backup_dir` argument passed")
        if save_freq != "epoch" and save_freq is not False and (
                isinstance(save_freq, bool) or not isinstance(save_freq, int) or save_freq < 1):
            raise ValueError(f"Invalid value for argument `save_freq`. Received: save_freq={save_freq!r}. "
                             "Expected either 'epoch' or an integer value.")
        if save_freq is False and not save_before_preemption:
            raise ValueError("`save_freq=False` saves only before a preemption, so it needs "
                             "`save_before_preemption=True`. Received: save_freq=False, save_before_preemption=False")
        self.signals = tuple(_check_signal(s) for s in preemption_signals)
        self.backup_dir = os.fspath(backup_dir)
        self.save_freq = save_freq
        self.double_checkpoint = bool(double_checkpoint)
        self.delete_checkpoint = bool(delete_checkpoint)
        self.save_before_preemption = bool(save_before_preemption)
        self.partial_restore = bool(partial_restore)
        self.verbose = verbose
        coordinator = _coordination.resolve(coordinator)
        if coordinator is not None and self.save_before_preemption:
            raise ValueError(
                "BackupAndRestore(save_before_preemption=True) is not supported with several processes: each process "
                "receives the signal on its own, at a different batch, so they would not back up the same step. "
                "Let the launcher stop the job and resume from the last periodic backup. "
                f"Received: {coordinator.size} processes, save_before_preemption=True")
        self._manager = CheckpointManager(self.backup_dir, series=SERIES,
                                          keep=[KeepLast(2 if self.double_checkpoint else 1)],
                                          storage_options=storage_options,
                                          coordinator=coordinator)
        self._epoch = 0
        self._last_batch_seen: int | None = None
        self._batches_since_save = 0
        self._rng_epoch_begin: dict[str, Any] | None = None
        self._plan: dict[str, Any] | None = None
        self._restored_from: Reader | None = None
        self._signal: int | None = None
        self._stopped_by_signal = False
        self._previous: dict[int, Any] = {}
        self._last_step: int | None = None

    # -- Keras hooks --------------------------------------------------------------------
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._signal, self._stopped_by_signal = None, False
        self._last_batch_seen, self._batches_since_save = None, 0
        if self.save_before_preemption:
            self._install_handlers()
        self._plan = self._restore()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        plan, self._plan = self._plan, None
        if plan is not None and plan["epoch"] == epoch:
            self._restore_callbacks(plan["callbacks"])
            if plan["batch"] > 0:  # resume inside this epoch
                self._resume_inside_epoch(plan)
                return
        self._rng_epoch_begin = _resume.rng_state()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if _resume.replaying(self.model, "BackupAndRestore"):
            return
        due = False
        if self.save_freq not in ("epoch", False):
            self._batches_since_save += batches_advanced(self._last_batch_seen, batch)
            due = self._batches_since_save >= self.save_freq  # type: ignore[operator]
        self._last_batch_seen = batch
        if self._signal is not None:
            self._stop_for_signal(epoch=self._epoch, batch=batch + 1, logs=logs)
        elif due:
            self._batches_since_save = 0
            self._save(epoch=self._epoch, batch=batch + 1, logs=logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if self._stopped_by_signal:
            return  # the backup holds the epoch as far as it went
        if self._signal is not None:
            self._stop_for_signal(epoch=epoch + 1, batch=0, logs=logs)
        elif self.save_freq == "epoch":
            self._save(epoch=epoch + 1, batch=0, logs=logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._uninstall_handlers()
        _resume.stop_skipping(self.model)
        self.model._initial_epoch = None  # a later fit() on this model starts where it is asked to
        if self._stopped_by_signal or not self.delete_checkpoint:
            return
        self._manager.delete_all()  # and the folder, if nothing else is in it

    # -- saving -------------------------------------------------------------------------
    def _save(self, epoch: int, batch: int, logs: dict[str, Any] | None) -> None:
        model = self.model
        groups = {_state.WEIGHTS_FILE: list(model.weights), _resume.SEEDS_FILE: _resume.seed_variables(model),
                  _resume.METRICS_FILE: _resume.metric_variables(model)}
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and optimizer.built:
            groups[_state.OPTIMIZER_FILE] = list(optimizer.variables)
        callbacks = {key: cb.resume_state() for key, cb in _resume.registered(model).items()}
        numbers = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0 and _is_number(v)}
        training = {
            "epoch": epoch, "batch": batch,
            "steps_per_execution": int(getattr(model, "steps_per_execution", 1) or 1),
            "steps_per_epoch": _steps_per_epoch(self.params),
            "last_batch_seen": self._last_batch_seen, "batches_since_save": self._batches_since_save,
            "rng": _resume.rng_state(), "global_seed": _resume.global_seed_state(),
            "rng_epoch_begin": self._rng_epoch_begin if batch else None,
            "logs": numbers, "callbacks": callbacks,
            # keepbest callbacks listed after this one have not handled this batch yet: on resume they do
            "pending": sorted(k for k, st in callbacks.items() if batch and st.get("seen") != [self._epoch, batch - 1]),
        }
        tensors, pieces, _known = _state.host_tensors({f: dict(zip(_state.unique_paths(vs), vs))
                                                        for f, vs in groups.items()})
        payload = TensorPayload(
            tensors, process_json={TRAINING_FILE: training}, pieces=pieces or None,
            metadata={f: _state.order_metadata(vs) for f, vs in groups.items()}, format=FORMAT,
            groups={f: {p: "trainable" if getattr(v, "trainable", True) else "frozen"
                        for p, v in zip(_state.unique_paths(vs), vs)} for f, vs in groups.items()})
        step = _host.scalar(optimizer.iterations) if optimizer is not None else None
        self._last_step = step
        self._manager.save(step, payload, name=None if step is not None else f"{SERIES}-e{epoch}-b{batch}",
                           epoch=epoch, batch=batch, metrics=numbers)

    # -- restoring ------------------------------------------------------------------------
    def _restore(self) -> dict[str, Any] | None:
        ckpts = self._manager.checkpoints()
        # A newer backup whose data is missing or truncated is never passed over in silence: it is an error
        # (or, with an older intact one, a fallback with a warning), as a backup that does not verify is.
        newest = ckpts[-1].manifest.created if ckpts else float("-inf")
        damaged = [CorruptCheckpointError(d.reason) for d in self._manager.damaged()
                   if d.manifest is not None and d.manifest.created > newest]
        if not ckpts and not damaged:
            return None
        if not ckpts:
            raise damaged[-1]
        model = self.model
        if not model.built:
            raise ValueError(
                "To use the BackupAndRestore callback, you model must be built before you call `fit()`. "
                f"Model {model} is unbuilt. You can build it beforehand by calling it on a batch of data.")
        ckpt = self._manager.verified(list(reversed(ckpts)), wanted=ckpts[-1].location, failures=damaged[::-1])
        reader = ckpt.reader()
        plan = _read_plan(reader, self._manager.coordinator.rank)
        if plan["batch"] > 0 and plan["steps_per_execution"] != int(getattr(model, "steps_per_execution", 1) or 1):
            raise ValueError(
                f"Cannot resume inside epoch {plan['epoch'] + 1} from {ckpt.location}: it was backed up with "
                f"steps_per_execution={plan['steps_per_execution']}, this model has "
                f"{model.steps_per_execution}. Compile with the same steps_per_execution. "
                f"Received: steps_per_execution={model.steps_per_execution}")
        steps = _steps_per_epoch(self.params)
        if plan["batch"] > 0 and None not in (plan["steps_per_epoch"], steps) and plan["steps_per_epoch"] != steps:
            raise ValueError(
                f"Cannot resume inside epoch {plan['epoch'] + 1} (after batch {plan['batch']}) from {ckpt.location}: "
                f"it was backed up with {plan['steps_per_epoch']} batches per epoch, this fit has {steps} (another "
                "batch_size or amount of data), so the batches already trained cannot be told apart. Use the "
                f"batch_size and data of the interrupted run, or delete {self.backup_dir} to start afresh. "
                f"Received: steps_per_epoch={steps}, backed up with {plan['steps_per_epoch']}")
        report = self._assign(model, reader)
        model._initial_epoch = plan["epoch"]
        self._last_batch_seen, self._batches_since_save = plan["last_batch_seen"], plan["batches_since_save"]
        self._restored_from = reader
        _resume.set_global_seed_state(plan["global_seed"])
        if plan["batch"] == 0:
            _resume.set_rng_state(plan["rng"])
        if self.verbose > 0:
            where = f"epoch {plan['epoch'] + 1}, batch {plan['batch']}" if plan["batch"] else \
                f"the start of epoch {plan['epoch'] + 1}"
            _print_msg(f"BackupAndRestore: restored the training state from {ckpt.location} (step "
                       f"{ckpt.manifest.step}); training resumes at {where}.{report}")
        return plan

    def _assign(self, model: keras.Model, reader: Reader) -> str:
        """Restores weights, optimizer state and seed generators; returns a report of a partial restore."""
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built and reader.has(_state.OPTIMIZER_FILE):
            optimizer.build(model.trainable_variables)
        groups = [(list(model.weights), _state.WEIGHTS_FILE, "model weights"),
                  (_resume.seed_variables(model), _resume.SEEDS_FILE, "seed generator states")]
        if optimizer is not None and reader.has(_state.OPTIMIZER_FILE):
            groups.append((list(optimizer.variables), _state.OPTIMIZER_FILE, "optimizer state"))
        if not self.partial_restore:
            for variables, fname, what in groups:
                try:
                    _state.restore_variables(variables, reader, fname, what)
                except StateMismatchError as e:
                    raise StateMismatchError(f"{e}. BackupAndRestore restores nothing then; pass "
                                             "partial_restore=True to restore the variables that match") from None
            return ""
        skipped: list[str] = []
        restored = 0
        for variables, fname, what in groups:
            done, left = _state.restore_matching(variables, reader, fname)
            restored += len(done)
            skipped += [f"{what}: {s}" for s in left]
        return (f" Partial restore: {restored} variables restored, {len(skipped)} left as they were"
                + (f": {'; '.join(skipped[:20])}" if skipped else "") + ".")

    def _resume_inside_epoch(self, plan: dict[str, Any]) -> None:
        """Sets up the rest of an interrupted epoch: same shuffle, same accumulators, same random draws."""
        assert self._restored_from is not None
        _resume.set_rng_state(plan["rng_epoch_begin"])  # the data pipeline draws this epoch's shuffle again
        self._rng_epoch_begin = plan["rng_epoch_begin"]
        model, reader = self.model, self._restored_from
        compiled = getattr(model, "_compile_metrics", None)
        deferred = compiled is not None and not compiled.built  # TensorFlow builds them when it traces a step

        def restore_metrics(batch: Any) -> None:
            if deferred:  # build the compiled metrics from the first skipped batch, then restore them
                model._symbolic_build(data_batch=batch)
                _state.restore_variables(_resume.metric_variables(model), reader, _resume.METRICS_FILE,
                                         "metric accumulators")

        if not deferred:  # now: JAX reads the variables into its state before the first step
            _state.restore_variables(_resume.metric_variables(model), reader, _resume.METRICS_FILE,
                                     "metric accumulators")
        _resume.skip_batches(model, plan["batch"] // plan["steps_per_execution"], plan["logs"],
                             at_backup_point=lambda: _resume.set_rng_state(plan["rng"]),
                             pending=frozenset(plan["pending"]), on_first_batch=restore_metrics)

    def _restore_callbacks(self, states: dict[str, Any]) -> None:
        for key, cb in _resume.registered(self.model).items():
            if key in states:
                cb.restore_resume_state(states[key])

    # -- preemption -----------------------------------------------------------------------
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("BackupAndRestore(save_before_preemption=True) must run fit() on the main thread: "
                             "Python delivers signals only there. Call fit() from the main thread, or pass "
                             f"save_before_preemption=False. Received: thread={threading.current_thread().name}")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._on_signal)

    def _uninstall_handlers(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        previous = self._previous.get(signum, signal.SIG_DFL)
        if self._signal is not None:  # a second signal: do what would have happened without us
            self._uninstall_handlers()
            _deliver(previous, signum, frame)
            return
        self._signal = signum
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, frame)

    def _stop_for_signal(self, epoch: int, batch: int, logs: dict[str, Any] | None) -> None:
        self._save(epoch=epoch, batch=batch, logs=logs)
        self._stopped_by_signal = True
        self.model.stop_training = True
        if self.verbose > 0:
            name = signal.Signals(self._signal).name if self._signal is not None else "signal"
            where = f"epoch {epoch + 1}, batch {batch}" if batch else f"the end of epoch {epoch}"
            _print_msg(f"\nBackupAndRestore: received {name}; saved the training state at {where} (step "
                       f"{self._last_step}) to {self.backup_dir} and stopped training. Run the same script "
                       "again to resume from there.")


def _steps_per_epoch(params: dict[str, Any] | None) -> int | None:
    steps = (params or {}).get("steps")
    return steps if rng.integer(steps, 1) else None


_PLAN_CHECKS: dict[str, Any] = {
    "epoch": rng.integer, "batch": rng.integer, "steps_per_execution": lambda v: rng.integer(v, 1),
    "batches_since_save": rng.integer, "last_batch_seen": lambda v: v is None or rng.integer(v),
    "rng": _resume.rng_state_is_valid, "rng_epoch_begin": lambda v: v is None or _resume.rng_state_is_valid(v),
    "global_seed": lambda v: v is None or rng.ints(v, 2),
    "steps_per_epoch": lambda v: v is None or rng.integer(v, 1),
    "logs": lambda v: isinstance(v, dict) and all(isinstance(x, (int, float)) for x in v.values()),
    "callbacks": lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
    "pending": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}
_OPTIONAL = ("last_batch_seen", "rng_epoch_begin", "global_seed", "steps_per_epoch")  # absent: None


def _read_plan(reader: Reader, rank: int = 0) -> dict[str, Any]:
    """The training position and generator states of a backup (this process's, when several processes
    saved it and this one did), checked before anything uses them."""
    plan: Any = None
    mine = process_file(TRAINING_FILE, rank)
    try:
        plan = json.loads(reader.read(mine if reader.has(mine) else TRAINING_FILE).decode("utf-8"))
        if isinstance(plan, dict):
            for key in _OPTIONAL:
                plan.setdefault(key, None)
        wrong = [k for k, ok in _PLAN_CHECKS.items() if not ok(plan.get(k))] if isinstance(plan, dict) else ["all"]
        if not wrong and plan["batch"] > 0 and plan["rng_epoch_begin"] is None:
            wrong = ["rng_epoch_begin"]
    except (OSError, ValueError) as e:
        wrong, plan = [f"unreadable ({e})"], None
    if wrong:
        raise CorruptCheckpointError(
            f"Cannot resume from {reader.where(TRAINING_FILE)}: it is not a training state written by keepbest "
            f"(bad or missing: {', '.join(wrong)}). Delete the backup folder to start afresh, or restore it from "
            f"a copy. Received: {str(plan)[:200]}")
    return plan  # type: ignore[no-any-return]


def _check_signal(value: Any) -> int:
    valid = signal.valid_signals()
    if isinstance(value, bool) or not isinstance(value, int) or value not in valid:
        raise ValueError(f"`preemption_signals` must list signal numbers such as signal.SIGTERM. "
                         f"Received: {value!r}")
    if value in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"`preemption_signals` cannot include {signal.Signals(value).name}: a process cannot "
                         f"catch it, so nothing can be saved. Received: {value!r}")
    return int(value)


def _deliver(handler: Any, signum: int, frame: Any) -> None:
    if handler is signal.SIG_IGN:
        return
    if callable(handler):
        handler(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
