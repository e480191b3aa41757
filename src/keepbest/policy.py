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
import numbers
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from keepbest.errors import MonitorError

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


def is_finite_number(value: object) -> bool:
    """A real, finite number: Python or NumPy (``np.float32``), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


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


# --- retention ---------------------------------------------------------------


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` newest checkpoints."""

    n: int

    def __post_init__(self) -> None:
        _check_count("KeepLast", "n", self.n)


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` best checkpoints by the monitored metric."""

    k: int

    def __post_init__(self) -> None:
        _check_count("KeepBest", "k", self.k)


KeepRule = Union[KeepLast, KeepBest]


def _check_count(rule: str, arg: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{rule}({arg}=...) must be a positive integer: it counts checkpoints to keep. "
                         f"Pass 1 or more. Received: {arg}={value!r}")


@dataclass(frozen=True)
class Candidate:
    """What retention needs to know of one committed checkpoint."""

    key: str
    order: float
    value: float | None = None


def best_candidate(candidates: Iterable[Candidate], mode: str) -> Candidate | None:
    """The candidate with the best finite value; the newest wins a tie."""
    scored = [c for c in candidates if is_finite_number(c.value)]
    if not scored:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(scored, key=lambda c: (sign * float(c.value), -c.order))  # type: ignore[arg-type]


def retained(candidates: Sequence[Candidate], rules: Sequence[KeepRule], mode: str | None) -> set[str]:
    """The keys that the rules keep. Without rules everything is kept.

    The union of the rules is kept (a checkpoint survives if any rule wants
    it), and the newest and the best checkpoints are always kept, whatever
    the rules say.
    """
    if not rules:
        return {c.key for c in candidates}
    by_age = sorted(candidates, key=lambda c: c.order)
    keep: set[str] = set()
    if by_age:
        keep.add(by_age[-1].key)
    best = best_candidate(by_age, mode) if mode else None
    if best is not None:
        keep.add(best.key)
    for rule in rules:
        if isinstance(rule, KeepLast):
            keep.update(c.key for c in by_age[-rule.n :])
        elif isinstance(rule, KeepBest):
            if mode is None:
                raise ValueError("KeepBest needs a monitor to rank checkpoints, and none was given. Pass a "
                                 "Monitor (or a mode) along with the rule. Received: mode=None")
            sign = 1.0 if mode == "min" else -1.0
            scored = [c for c in by_age if is_finite_number(c.value)]
            scored.sort(key=lambda c: (sign * float(c.value), -c.order))  # type: ignore[arg-type]
            keep.update(c.key for c in scored[: rule.k])
    return keep


def doomed(candidates: Sequence[Candidate], rules: Sequence[KeepRule], mode: str | None,
           protect: Iterable[str] = ()) -> list[str]:
    """The keys retention deletes, oldest first: what no rule keeps and ``protect`` does not name.

    ``protect`` is what stays whatever the rules say (a new checkpoint, an
    aliased one, one an evaluator holds). Without rules nothing is deleted.
    """
    if not rules:
        return []
    kept = retained(candidates, rules, mode) | set(protect)
    return [c.key for c in sorted(candidates, key=lambda c: c.order) if c.key not in kept]


def describe(rules: Sequence[KeepRule]) -> str:
    """``keep_last=2, keep_best=1``: the rules in the words of the Keras callback."""
    words = {KeepLast: "keep_last", KeepBest: "keep_best"}
    return ", ".join(f"{words[type(r)]}={r.n if isinstance(r, KeepLast) else r.k}" for r in rules)
