"""``SidecarEvaluator`` and ``SidecarEvaluatorModelExport``: Keras 2.15's evaluator process, for Keras 3."""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import keras
import numpy as np

from keepbest import store as stores
from keepbest.checkpoint import Checkpoint
from keepbest.follower import Follower
from keepbest.keras import _formats, _state
from keepbest.keras._callback import ModelCheckpoint, _is_number, _print_msg
from keepbest.keras._loading import _build_optimizer_if_saved



class SidecarEvaluator:
    """Evaluates each checkpoint that training commits, in a process of its own.

    The Keras 2.15 ``keras.utils.SidecarEvaluator`` on any Keras 3 backend. It
    sees only committed checkpoints, in commit order; in ``mode="every"`` it
    evaluates each of them (training's retention keeps those it has not
    evaluated yet), in ``mode="latest"`` it jumps to the newest. Each
    evaluation's metrics are recorded beside the checkpoint (``keepbest ls``
    shows them) and in the evaluator's progress, so a restarted evaluator
    evaluates nothing twice. A checkpoint that cannot be read after a few
    retries is quarantined: reported and skipped. It stops after
    ``max_evaluations`` evaluations (counted across restarts) or once training
    has ended (``keepbest.keras.ModelCheckpoint`` marks that when ``fit``
    returns) and nothing is left to evaluate.

    Args:
        model: a compiled model with the architecture that training saves.
        data: what ``model.evaluate`` takes as ``x`` (a ``tf.data.Dataset``, a
            ``PyDataset``, a generator), or a tuple ``(x, y)`` /
            ``(x, y, sample_weight)`` of arrays.
        checkpoint_dir: the folder training saves checkpoints into.
        steps: batches per evaluation (None: until ``data`` is exhausted).
        max_evaluations: stop after this many evaluations (None: when training ends).
        callbacks: Keras callbacks for ``model.evaluate``, e.g.
            :class:`SidecarEvaluatorModelExport`.
        mode: ``"every"`` or ``"latest"`` (see above).
        name: names this evaluator's records; evaluators with different data
            following one folder need different names.
        series: only evaluate checkpoints of these filepath templates (the
            basename of training's ``filepath``, e.g. ``"ckpt-{epoch:04d}"``).
        idle_timeout: stop after this many seconds without a new checkpoint.
        lease_ttl: how long training's retention honours this evaluator's
            lease after its last heartbeat (e.g. after a ``kill -9``).
        verbose: 1 prints one line per evaluation; 0 is silent.
        poll_interval: seconds between looks for a new checkpoint where file
            events are missing; on a bucket each look is one LIST request.
        storage_options: for an ``s3://`` location, passed to s3fs (``endpoint_url``,
            ``key``, ``secret``, ...); without them the AWS environment is used.

    Example:
        >>> SidecarEvaluator(model, (x_val, y_val), "checkpoints", max_evaluations=5).start()  # doctest: +SKIP
    """

    def __init__(self, model: keras.Model, data: Any, checkpoint_dir: str | os.PathLike[str],
                 steps: int | None = None, max_evaluations: int | None = None,
                 callbacks: Sequence[keras.callbacks.Callback] | None = None, *, mode: str = "every",
                 name: str = "eval", series: Sequence[str] | str | None = None,
                 idle_timeout: float | None = None, lease_ttl: float = 120.0, verbose: int = 1,
                 poll_interval: float = 0.5, storage_options: Mapping[str, Any] | None = None) -> None:
        for arg, value in (("steps", steps), ("max_evaluations", max_evaluations)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`{arg}` must be a positive integer or None. Received: {arg}={value!r}")
        if idle_timeout is not None and (isinstance(idle_timeout, bool) or not isinstance(idle_timeout, (int, float))
                                         or not idle_timeout >= 0):
            raise ValueError("`idle_timeout` must be a number of seconds (>= 0) or None (wait until training "
                             f"ends). Received: idle_timeout={idle_timeout!r}")
        self.model = model
        self.data = data
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        stores.open(self.checkpoint_dir, storage_options)  # a URL without a backend is an error now, not at start()
        self.steps = steps
        self.max_evaluations = max_evaluations
        self.callbacks = list(callbacks or [])
        self.idle_timeout = idle_timeout
        self.verbose = verbose
        if isinstance(poll_interval, bool) or not isinstance(poll_interval, (int, float)) or not poll_interval > 0:
            raise ValueError(f"`poll_interval` must be a positive number of seconds. Received: "
                             f"poll_interval={poll_interval!r}")
        self.follower = Follower(self.checkpoint_dir, name=name, mode=mode, lease_ttl=lease_ttl,
                                 series=[series] if isinstance(series, str) else series,
                                 poll_interval=float(poll_interval), storage_options=storage_options)
        self.stop_reason: str | None = None
        self.evaluated: list[tuple[Checkpoint, dict[str, float]]] = []  # this run's evaluations, in order
        self._reported = 0
        for cb in self.callbacks:
            if isinstance(cb, SidecarEvaluatorModelExport):
                cb.check_follows(self.checkpoint_dir)

    def start(self) -> None:
        """Runs the evaluation loop until it stops (see the class docstring)."""
        if not self.model.weights:  # Keras would load nothing into it, and evaluate random weights
            raise ValueError(
                "SidecarEvaluator's model has no weights yet, so no checkpoint can be loaded into it. Build it "
                "first: call it on a batch of data (subclassed models) or give it an Input. "
                f"Received: model {self.model.name} with 0 weights (built={self.model.built})")
        with self.follower as follower:
            while True:
                ckpt = follower.due(self.max_evaluations, self.idle_timeout)
                self._report_unreadable(follower)
                if ckpt is None:
                    self.stop_reason = follower.stop_reason
                    break
                self._evaluate(follower, ckpt)
        if self.verbose:
            _print_msg(f"SidecarEvaluator: stopped ({self.stop_reason}); "
                       f"{follower.state.evaluations} checkpoint(s) evaluated in {self.checkpoint_dir}.")

    def _report_unreadable(self, follower: Follower) -> None:
        while self._reported < len(follower.unreadable):
            if self.verbose:
                _print_msg(f"SidecarEvaluator: skipping a checkpoint whose manifest cannot be read: "
                           f"{follower.unreadable[self._reported]}")
            self._reported += 1

    def _evaluate(self, follower: Follower, ckpt: Checkpoint) -> None:
        follower.begin(ckpt)
        if not self._restore(follower, ckpt):
            return
        for cb in self.callbacks:
            if isinstance(cb, SidecarEvaluatorModelExport):
                cb.evaluated_checkpoint = ckpt
        started = time.monotonic()
        x, y, sample_weight = _unpack(self.data)
        logs = self.model.evaluate(x, y, sample_weight=sample_weight, steps=self.steps, callbacks=self.callbacks,
                                   verbose=0, return_dict=True)
        seconds = time.monotonic() - started
        metrics = {k: float(v) for k, v in logs.items() if np.ndim(v) == 0 and _is_number(v)}
        follower.done(ckpt, metrics, seconds)
        self.evaluated.append((ckpt, metrics))
        if self.verbose:
            where = ", ".join(f"{k} {v}" for k, v in (("epoch", ckpt.epoch), ("step", ckpt.step)) if v is not None)
            shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            left = len(follower.pending())
            _print_msg(f"SidecarEvaluator: evaluated {ckpt.name} ({where}) in {seconds:.2f} s: {shown}"
                       + (f" [{left} waiting]" if left else ""))

    def _restore(self, follower: Follower, ckpt: Checkpoint) -> bool:
        """Loads ``ckpt`` into the model; False when it vanished, was replaced or is quarantined."""
        return follower.load(ckpt, lambda c: _restore_into(self.model, c), _print_msg if self.verbose else None)


def _restore_into(model: keras.Model, ckpt: Checkpoint) -> None:
    reader = ckpt.reader()
    if _formats.is_keras_file(ckpt.manifest.format):
        _build_optimizer_if_saved(model, reader)
        model.load_weights(reader.local_path())
    else:
        _state.restore_model(model, reader)


def _unpack(data: Any) -> tuple[Any, Any, Any]:
    if isinstance(data, tuple) and len(data) in (2, 3):
        return data[0], data[1], data[2] if len(data) == 3 else None
    return data, None, None


class SidecarEvaluatorModelExport(ModelCheckpoint):
    """Exports the best model that a :class:`SidecarEvaluator` has evaluated.

    Keras 2.15's callback of the same name: a ``ModelCheckpoint`` (with
    ``save_best_only=True``) on the evaluation logs, whose keys have no
    ``val_`` prefix (``monitor="loss"``, the default here). ``{epoch}`` in
    ``export_filepath`` is the training epoch of the evaluated checkpoint, read
    from its manifest, so the label is right even when training has written
    newer checkpoints meanwhile. The best value is recovered from what was
    exported before, so it survives a restart of the evaluator.

    Args:
        export_filepath: where to export, e.g. ``"best/best-model-{epoch:04d}"``.
        checkpoint_filepath: training's ``filepath``; its folder must be the
            evaluator's ``checkpoint_dir``.
        **kwargs: ``ModelCheckpoint``'s (``monitor``, ``mode``, ``verbose``,
            ``save_weights_only``, ``keep_last``, ...). ``save_freq`` may be
            ``"eval"`` (the default: after each evaluation).

    Example:
        >>> export = SidecarEvaluatorModelExport("best/best-model-{epoch:04d}", "ckpt/ckpt-{epoch:04d}",
        ...                                      monitor="loss", save_weights_only=True)
    """

    def __init__(self, export_filepath: str | os.PathLike[str], checkpoint_filepath: str | os.PathLike[str],
                 **kwargs: Any) -> None:
        save_freq = kwargs.pop("save_freq", "eval")
        if save_freq not in ("eval", "epoch"):
            raise ValueError(
                "SidecarEvaluatorModelExport saves after each evaluation, so save_freq must be 'eval' "
                f"('epoch' means the same here). Received: save_freq={save_freq!r}")
        monitor = kwargs.pop("monitor", "loss")
        if isinstance(monitor, str) and monitor.startswith("val_"):
            raise ValueError(
                f"SidecarEvaluatorModelExport monitors the logs of model.evaluate, whose keys have no 'val_' "
                f"prefix: pass monitor='{monitor.removeprefix('val_')}'. Received: monitor={monitor!r}")
        super().__init__(export_filepath, monitor=monitor, save_best_only=True, save_freq="epoch", **kwargs)
        self.save_freq = "eval"
        self.checkpoint_filepath = os.fspath(checkpoint_filepath)
        self.evaluated_checkpoint: Checkpoint | None = None  # set by SidecarEvaluator before each evaluation
        self._resumed = False

    def check_follows(self, checkpoint_dir: str) -> None:
        """Raises unless ``checkpoint_filepath`` lies in the evaluator's ``checkpoint_dir``."""
        folder = os.path.dirname(self.checkpoint_filepath) or "."
        if stores.absolute(folder) != stores.absolute(checkpoint_dir):
            raise ValueError(
                f"SidecarEvaluatorModelExport's checkpoint_filepath is in {folder}, but the SidecarEvaluator "
                f"follows {checkpoint_dir}: pass training's filepath, in the evaluated folder. "
                f"Received: checkpoint_filepath={self.checkpoint_filepath}")

    def on_test_begin(self, logs: dict[str, Any] | None = None) -> None:
        if not self._resumed:
            self._resumed = True
            self._resume()

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        ckpt = self.evaluated_checkpoint
        if ckpt is None:
            raise RuntimeError(
                "SidecarEvaluatorModelExport exports the checkpoint a keepbest.keras.SidecarEvaluator is "
                "evaluating; called from elsewhere it cannot tell which checkpoint (and epoch) the logs belong "
                "to. Pass it in SidecarEvaluator(callbacks=[...]). Received: evaluated_checkpoint=None")
        if ckpt.epoch is None and "{epoch" in self.filepath:
            raise ValueError(
                f"Cannot fill {{epoch}} in {self.filepath}: checkpoint {ckpt.name} records no epoch (it was "
                "not saved by a Keras ModelCheckpoint). Use a filepath without {epoch}. Received: epoch=None")
        logs = dict(logs or {})
        if not self._monitor_checked:
            self._check_monitor(logs, final=True)
        self._save_model(epoch=(ckpt.epoch or 1) - 1, batch=None, logs=logs)
        self._writer.wait()

    def _step(self) -> int | None:
        return None if self.evaluated_checkpoint is None else self.evaluated_checkpoint.step

    def _extra(self) -> dict[str, Any]:
        ckpt = self.evaluated_checkpoint
        source = None if ckpt is None else {"name": ckpt.name, "path": ckpt.location, "created": ckpt.manifest.created}
        return {**super()._extra(), "evaluated_checkpoint": source}
