"""The retention rules keepbest ships: four keep rules and one limit (see :mod:`keepbest.policy._retention`).

Example:
    >>> from keepbest.policy import plan
    >>> saves = [Candidate(str(e), e, size=10, epoch=e) for e in range(1, 9)]
    >>> plan(saves, (KeepLast(2), KeepEvery(3), MaxBytes(35)), None).drop
    {'1': 'retention: keep_last=2, keep_every=3', '2': 'retention: keep_last=2, keep_every=3', \
'3': 'retention: max_bytes=35 B', '4': 'retention: keep_last=2, keep_every=3', \
'5': 'retention: keep_last=2, keep_every=3'}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping, Sequence

from keepbest.policy._retention import Candidate, Trim, is_finite_number
from keepbest.policy._sizes import format_size, parse_size


def _check_count(rule: str, arg: str, value: object, what: str = "counts checkpoints to keep") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{rule}({arg}=...) must be a positive integer: it {what}. "
                         f"Pass 1 or more. Received: {arg}={value!r}")


@dataclass(frozen=True)
class KeepLast:
    """Keep the ``n`` newest checkpoints."""

    n: int
    needs_monitor: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_count("KeepLast", "n", self.n)

    def keeps(self, candidates: Sequence[Candidate], mode: str | None) -> set[str]:
        return {c.key for c in candidates[-self.n:]}

    def describe(self) -> str:
        return f"keep_last={self.n}"


@dataclass(frozen=True)
class KeepBest:
    """Keep the ``k`` best checkpoints by the monitored metric (NaN, inf and None never rank)."""

    k: int
    needs_monitor: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_count("KeepBest", "k", self.k)

    def keeps(self, candidates: Sequence[Candidate], mode: str | None) -> set[str]:
        if mode is None:
            raise ValueError("KeepBest needs a monitor to rank checkpoints, and none was given. Pass a "
                             "Monitor (or a mode) along with the rule. Received: mode=None")
        sign = 1.0 if mode == "min" else -1.0
        scored = [c for c in candidates if is_finite_number(c.value)]
        scored.sort(key=lambda c: (sign * float(c.value), -c.order))  # type: ignore[arg-type]
        return {c.key for c in scored[: self.k]}

    def describe(self) -> str:
        return f"keep_best={self.k}"


@dataclass(frozen=True)
class KeepEvery:
    """Keep the checkpoints of every ``n``-th epoch: those whose recorded epoch is a multiple of ``n``.

    Epochs are the numbers the manifests record, 1-based as the adapters
    write them (Keras's "Epoch 5/10" is epoch 5), so ``KeepEvery(5)`` keeps
    epochs 5, 10, 15, ... When several checkpoints share such an epoch (saves
    every N batches), the newest of them is kept. Checkpoints without an
    epoch are not chosen by this rule.

    Example:
        >>> sorted(KeepEvery(5).keeps([Candidate(str(e), e, epoch=e) for e in range(1, 12)], None))
        ['10', '5']
    """

    n: int
    needs_monitor: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_count("KeepEvery", "n", self.n, "is a number of epochs")

    def keeps(self, candidates: Sequence[Candidate], mode: str | None) -> set[str]:
        newest = {c.epoch: c.key for c in candidates if c.epoch is not None and c.epoch % self.n == 0}
        return set(newest.values())

    def describe(self) -> str:
        return f"keep_every={self.n}"


@dataclass(frozen=True)
class KeepPeriod:
    """Keep one checkpoint per period of ``seconds``: the first one created in each.

    Periods are aligned to the Unix epoch (``created // seconds``), so
    ``KeepPeriod(3600)`` keeps the first checkpoint of each clock hour (UTC)
    and the choice never shifts as other checkpoints are deleted. (Orbax's
    ``keep_period`` counts steps; this is its "one per period" in time, as
    its ``keep_time_interval``.) Checkpoints without a creation time are not
    chosen by this rule.

    Example:
        >>> saves = [Candidate(str(t), t, created=t) for t in (0, 30, 59, 60, 61, 150)]
        >>> sorted(KeepPeriod(60).keeps(saves, None), key=int)
        ['0', '60', '150']
    """

    seconds: float
    needs_monitor: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not is_finite_number(self.seconds) or self.seconds <= 0:
            raise ValueError("KeepPeriod(seconds=...) must be a positive number of seconds, e.g. 3600 for one "
                             f"checkpoint per hour. Received: seconds={self.seconds!r}")

    def keeps(self, candidates: Sequence[Candidate], mode: str | None) -> set[str]:
        first: dict[int, Candidate] = {}
        for c in candidates:
            if c.created is None:
                continue
            period = math.floor(c.created / self.seconds)
            if period not in first or (c.created, c.order) < (first[period].created, first[period].order):
                first[period] = c
        return {c.key for c in first.values()}

    def describe(self) -> str:
        return f"keep_period={self.seconds:g}"


@dataclass(frozen=True, init=False)
class MaxBytes:
    """A budget: drop the oldest checkpoints the keep rules chose until the rest takes at most ``budget`` bytes.

    ``budget`` is bytes, or a string such as ``"50GB"``, ``"1.5 GiB"``,
    ``"500MB"``. Alone, it keeps everything that fits. It never drops the
    newest checkpoint, the best one, an aliased one or one an evaluator
    holds; when those alone exceed the budget, the plan says so (the
    manager warns) and only they stay.

    Example:
        >>> saves = [Candidate(str(i), i, size=10) for i in range(1, 5)]
        >>> MaxBytes(25).trim(saves, {"4": "newest"})
        Trim(drop=('1', '2'), problem=None)
        >>> MaxBytes("1.5 GiB").describe()
        'max_bytes=1.6 GB'
    """

    budget: int
    needs_monitor: ClassVar[bool] = False

    def __init__(self, budget: int | str) -> None:
        object.__setattr__(self, "budget", parse_size(budget, "MaxBytes(budget)"))

    def trim(self, kept: Sequence[Candidate], protected: Mapping[str, str]) -> Trim:
        total = sum(c.size for c in kept)
        drop = []
        for c in kept:
            if total <= self.budget:
                break
            if c.key not in protected:
                drop.append(c.key)
                total -= c.size
        if total <= self.budget:
            return Trim(tuple(drop))
        held = [c for c in kept if c.key in protected]
        who = "; ".join(f"{c.key} ({format_size(c.size)}, {protected[c.key]})" for c in held)
        return Trim(tuple(drop), (
            f"{self.describe()} cannot be met: the checkpoints retention must keep take {format_size(total)} "
            f"({total} bytes), over the budget of {format_size(self.budget)} ({self.budget} bytes). They are "
            f"kept anyway. Raise the budget, or remove the aliases that hold old checkpoints. Protected: {who}"))

    def describe(self) -> str:
        return f"max_bytes={format_size(self.budget)}"
