"""``SidecarEvaluator`` for PyTorch: evaluates each checkpoint training commits, in a process of its own."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from keepbest import store as stores
from keepbest.checkpoint import Checkpoint
from keepbest.errors import StateMismatchError
from keepbest.follower import Follower
from keepbest.torch import _state

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fraction of rows whose largest output is the target class."""
    return (outputs.argmax(dim=-1) == targets).float().mean()


class SidecarEvaluator:
    """Follows a folder that :class:`keepbest.torch.Checkpointer` (or :mod:`keepbest.lightning`) saves into and
    evaluates each committed checkpoint, as Keras's ``SidecarEvaluator`` does for Keras models.

    Each evaluation loads the checkpoint's module state into the model that
    ``model_fn`` built (once), runs it on every batch of ``data`` in eval mode
    without gradients, and records ``loss`` and each of ``metrics`` (means
    weighted by batch size) beside the checkpoint, where ``keepbest ls``
    shows them. The follower's lease keeps the checkpoints not evaluated yet
    from training's retention (``mode="every"``); a restarted evaluator skips
    what it already evaluated; a checkpoint that cannot be read is
    quarantined. It stops once training ends (:meth:`Checkpointer.close`
    marks that, ``max_evaluations`` or ``idle_timeout``).

    Args:
        model_fn: builds the model (the architecture training saves).
        data: an iterable of ``(inputs, targets)`` batches (a ``DataLoader``).
        checkpoint_dir: the folder (or ``s3://`` URL) training saves into.
        loss_fn: ``loss_fn(outputs, targets)``; cross-entropy by default.
        metrics: more ``name -> fn(outputs, targets)``, e.g. ``{"accuracy": accuracy}``.
        entry: which ``app_state`` name holds the model (``"model"``); for a
            Lightning checkpoint its ``state_dict`` is used.
        mode, name, series, max_evaluations, idle_timeout, lease_ttl,
        poll_interval, verbose, storage_options: as for ``keepbest.keras.SidecarEvaluator``.

    Example:
        >>> SidecarEvaluator(build_model, val_loader, "runs/a", metrics={"accuracy": accuracy}).start()  # doctest: +SKIP
    """

    def __init__(self, model_fn: Callable[[], torch.nn.Module], data: Iterable[Any],
                 checkpoint_dir: str | os.PathLike[str], *, loss_fn: Metric | None = None,
                 metrics: Mapping[str, Metric] | None = None, entry: str = "model", mode: str = "every",
                 name: str = "eval", series: Sequence[str] | str | None = None, max_evaluations: int | None = None,
                 idle_timeout: float | None = None, lease_ttl: float = 120.0, poll_interval: float = 0.5,
                 verbose: int = 1, storage_options: Mapping[str, Any] | None = None) -> None:
        if not callable(model_fn) or isinstance(model_fn, torch.nn.Module):
            raise TypeError("SidecarEvaluator needs model_fn: a function that builds the model, e.g. "
                            f"lambda: Net(). Received: model_fn={model_fn!r}")
        if max_evaluations is not None and (isinstance(max_evaluations, bool) or not isinstance(max_evaluations, int)
                                            or max_evaluations < 1):
            raise ValueError(f"`max_evaluations` must be a positive integer or None. "
                             f"Received: max_evaluations={max_evaluations!r}")
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        stores.open(self.checkpoint_dir, storage_options)  # a URL without a backend is an error now
        self.model_fn, self.data, self.entry = model_fn, data, entry
        self.loss_fn = loss_fn or torch.nn.functional.cross_entropy
        self.metrics = dict(metrics or {})
        self.max_evaluations, self.idle_timeout, self.verbose = max_evaluations, idle_timeout, verbose
        self.follower = Follower(self.checkpoint_dir, name=name, mode=mode, lease_ttl=lease_ttl,
                                 series=[series] if isinstance(series, str) else series,
                                 poll_interval=float(poll_interval), storage_options=storage_options)
        self.model: torch.nn.Module | None = None
        self.evaluated: list[tuple[Checkpoint, dict[str, float]]] = []
        self.stop_reason: str | None = None

    def _say(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)

    def start(self) -> None:
        """Runs the evaluation loop until it stops (see the class docstring)."""
        self.model = self.model_fn()
        with self.follower as follower:
            while (ckpt := follower.due(self.max_evaluations, self.idle_timeout)) is not None:
                follower.begin(ckpt)
                if not follower.load(ckpt, self._restore, self._say):
                    continue
                started = time.monotonic()
                metrics = self.evaluate()
                seconds = time.monotonic() - started
                follower.done(ckpt, metrics, seconds)
                self.evaluated.append((ckpt, metrics))
                self._say(f"SidecarEvaluator: evaluated {ckpt.name} (step {ckpt.step}) in {seconds:.2f} s: "
                          + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            self.stop_reason = follower.stop_reason
        self._say(f"SidecarEvaluator: stopped ({self.stop_reason}); {follower.state.evaluations} checkpoint(s) "
                  f"evaluated in {self.checkpoint_dir}.")

    def _restore(self, ckpt: Checkpoint) -> None:
        assert self.model is not None
        reader = ckpt.reader()
        entries = _state.read_document(reader)
        key = "state_dict" if ckpt.manifest.format == "lightning" else self.entry
        if key not in entries:
            raise StateMismatchError(f"Checkpoint {ckpt.location} has no app_state entry '{key}' to evaluate. Pass "
                                     f"entry= one of {sorted(entries)}. Received: entry={self.entry!r}")
        state = _state.entry_state(reader, entries[key])
        _state.check_module(self.model, state, key, ckpt.location, strict=True)
        self.model.load_state_dict(state)

    def evaluate(self) -> dict[str, float]:
        """The loss and metrics of the current model over ``data`` (means weighted by batch size)."""
        assert self.model is not None
        totals: dict[str, float] = {"loss": 0.0, **{k: 0.0 for k in self.metrics}}
        count = 0
        self.model.eval()
        with torch.no_grad():
            for inputs, targets in self.data:
                outputs = self.model(inputs)
                n = len(targets)
                totals["loss"] += float(self.loss_fn(outputs, targets)) * n
                for k, fn in self.metrics.items():
                    totals[k] += float(fn(outputs, targets)) * n
                count += n
        if count == 0:
            raise ValueError("SidecarEvaluator's data yielded no batches, so nothing can be evaluated. Pass a "
                             "non-empty DataLoader of (inputs, targets). Received: 0 samples")
        return {k: v / count for k, v in totals.items()}
