"""When to save and what to keep: pure rules, no I/O, no clock, no framework.

Example:
    >>> m = Monitor("val_loss", mode="min")
    >>> m.is_improvement(0.5, best=1.0), m.is_improvement(float("nan"), best=None)
    (True, False)
    >>> history = [Candidate(key=str(e), order=e, value=v) for e, v in enumerate([3, 1, 2, 4, 5], 1)]
    >>> sorted(retained(history, (KeepLast(2), KeepBest(1)), mode="min"))
    ['2', '4', '5']
    >>> doomed(history, (KeepLast(2), KeepBest(1)), mode="min", protect={"1"})
    ['3']
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from keepbest.errors import MonitorError
from keepbest.policy._retention import (
    Candidate,
    KeepRule,
    Limit,
    Plan,
    Rule,
    Trim,
    best_candidate,
    check_rules,
    describe,
    doomed,
    is_finite_number,
    plan,
    retained,
)
from keepbest.policy._keywords import rules_from
from keepbest.policy._rules import KeepBest, KeepEvery, KeepLast, KeepPeriod, MaxBytes
from keepbest.policy._sizes import format_size, parse_size

__all__ = [
    "MODES", "Candidate", "KeepBest", "KeepEvery", "KeepLast", "KeepPeriod", "KeepRule", "Limit", "MaxBytes",
    "Monitor", "Plan", "Rule", "Trim", "batches_advanced", "best_candidate", "check_mode", "check_rules", "describe",
    "doomed", "epoch_is_due", "format_size", "is_finite_number", "is_last_due", "parse_size", "plan", "resolve_mode",
    "retained", "rules_from",
]

MODES = ("auto", "min", "max")


def check_mode(mode: str, owner: str = "ModelCheckpoint") -> None:
    if mode not in MODES:
        raise ValueError(
            f"{owner} mode '{mode}' is unknown. Expected one of 'auto', 'min', 'max'. "
            f"Received: mode={mode!r}"
        )


def resolve_mode(name: str, mode: str, direction: str | None = None, *, owner: str = "ModelCheckpoint") -> str:
    """Turns ``mode`` into ``"min"`` or ``"max"``.

    ``direction`` is the metric's own declared direction (``"up"`` or
    ``"down"``, as Keras metrics carry it) when the caller knows it. In
    ``"auto"`` mode a loss is minimised; anything else needs a direction.
    """
    check_mode(mode, owner)
    if mode != "auto":
        return mode
    if name.removeprefix("val_") == "loss" or direction == "down":
        return "min"
    if direction == "up":
        return "max"
    raise MonitorError(
        f"{owner} callback received monitor={name}, but Keras isn't able to "
        "automatically determine whether that metric should be maximized or "
        "minimized. Pass `mode='max'` in order to monitor based on the highest "
        "metric value, or pass `mode='min'` in order to use the lowest value."
    )


@dataclass(frozen=True)
class Monitor:
    """A monitored quantity: ``mode`` is ``"min"`` or ``"max"`` (already resolved).

    ``baseline`` is the value the first candidate must beat (Keras's
    ``initial_value_threshold``); ``min_delta`` is the smallest change that
    counts as an improvement. NaN and infinities never improve anything.
    """

    name: str
    mode: str = "min"
    min_delta: float = 0.0
    baseline: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(
                "Monitor mode must be 'min' or 'max': a Monitor compares values, so 'auto' must be "
                f"resolved first (see resolve_mode). Received: mode={self.mode!r}"
            )
        if not is_finite_number(self.min_delta) or self.min_delta < 0:
            raise ValueError("Monitor min_delta must be a finite number >= 0: it is the smallest change that "
                             f"counts as an improvement. Received: min_delta={self.min_delta!r}")
        if self.baseline is not None and not is_finite_number(self.baseline):
            raise ValueError("Monitor baseline must be a finite number or None: it is the value the first "
                             f"candidate must beat. Received: baseline={self.baseline!r}")

    def is_improvement(self, value: float | None, best: float | None) -> bool:
        """True when ``value`` beats ``best`` (or the baseline when no best yet)."""
        if value is None or not is_finite_number(value):
            return False
        value = float(value)
        reference = self.better(best, self.baseline)
        if reference is None:
            return True
        if self.mode == "min":
            return value < reference - self.min_delta
        return value > reference + self.min_delta

    def better(self, a: float | None, b: float | None) -> float | None:
        """The better of two values, ignoring None and NaN.

        An infinite value stays a bar (Keras accepts ``initial_value_threshold=inf``:
        in "max" mode nothing beats it); values to be judged are never infinite,
        since :meth:`is_improvement` refuses them.
        """
        known = [float(v) for v in (a, b) if v is not None and not math.isnan(v)]
        if not known:
            return None
        return min(known) if self.mode == "min" else max(known)


# --- save triggers -----------------------------------------------------------


def batches_advanced(last_seen: int | None, batch: int) -> int:
    """How many batches ran since the callback last saw ``last_seen``.

    Batch indices restart at 0 each epoch, and with ``steps_per_execution=N``
    the callback only sees every N-th index, so the count comes from the
    difference, not from the number of calls.
    """
    if last_seen is None or batch <= last_seen:
        return batch + 1
    return batch - last_seen


def epoch_is_due(epoch: int, every: int) -> bool:
    """Every ``every`` epochs, with 0-based ``epoch`` (epochs every, 2*every, ...)."""
    return (epoch + 1) % every == 0


def is_last_due(epoch: int, batch: int | None, *, epochs: int | None, steps: int | None,
                save_freq: str | int, every: int = 1) -> bool:
    """True when no later save may fall due in this run after the one due now (0-based ``epoch``/``batch``).

    ``save_freq`` is ``"epoch"`` (saves every ``every`` epochs) or a number of
    batches (the count restarts at this save); ``epochs`` is the run's number of
    epochs and ``steps`` its batches per epoch. Where they are unknown, True: the
    save may be the last one, so it is not skipped.
    """
    if epochs is None:
        return True
    if save_freq == "epoch":
        return epoch + every >= epochs
    if steps is None or batch is None:
        return True
    left = (epochs - 1 - epoch) * steps + (steps - 1 - batch)  # batches of this run after this one
    return left < int(save_freq)
