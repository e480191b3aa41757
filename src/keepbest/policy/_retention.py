"""What to keep: open retention rules, combined as a union, then trimmed by limits.

Two kinds of rule, each one class, none known to the others:

- a :class:`KeepRule` chooses checkpoints to keep (``keeps``); a checkpoint
  survives when any keep rule chooses it. Without keep rules everything is
  chosen.
- a :class:`Limit` then trims the chosen set (``trim``): :class:`MaxBytes`
  drops the oldest chosen checkpoints until the rest fits its budget.

The newest checkpoint, the best one and whatever the caller protects (an
aliased checkpoint, one an evaluator holds) survive every rule. A limit that
cannot be met without them reports it in :attr:`Plan.problems`, for the caller
to warn about.

Example:
    >>> history = [Candidate(str(e), order=e, value=v, size=10, epoch=e)
    ...            for e, v in enumerate([3, 1, 2, 4, 5, 6], 1)]
    >>> sorted(retained(history, (KeepLast(2), KeepEvery(3)), mode="min"))
    ['2', '3', '5', '6']
    >>> p = plan(history, (KeepLast(3), MaxBytes(30)), mode="min", protect={"4": "alias production"})
    >>> p.drop, p.problems
    ({'1': 'retention: keep_last=3', '3': 'retention: keep_last=3', '5': 'retention: max_bytes=30 B'}, ())
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar, Iterable, Mapping, Protocol, Sequence, Union, runtime_checkable

from keepbest.policy._sizes import format_size, parse_size


def is_finite_number(value: object) -> bool:
    """A real, finite number: Python or NumPy (``np.float32``), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Candidate:
    """What retention knows of one committed checkpoint.

    ``order`` sorts them oldest first; ``value`` is the monitored metric;
    ``size`` the bytes of its files; ``created`` its creation time (seconds
    since the Unix epoch); ``epoch`` the epoch its manifest records (1-based
    as the adapters record it). Unknown fields are None (``size``: 0).
    """

    key: str
    order: float
    value: float | None = None
    size: int = 0
    created: float | None = None
    epoch: int | None = None


@runtime_checkable
class KeepRule(Protocol):
    """A rule that chooses checkpoints to keep: the union of every keep rule's choice survives.

    ``keeps`` gets the candidates oldest first and the monitor's mode
    (``"min"``, ``"max"``, or None without a monitor); ``describe`` names the
    rule in the Keras callback's words (``keep_last=2``), for messages and
    for the reason in the history.
    """

    needs_monitor: ClassVar[bool]

    def keeps(self, candidates: Sequence[Candidate], mode: str | None) -> set[str]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Trim:
    """What a limit drops (keys, oldest first), and why it fell short, if it did."""

    drop: tuple[str, ...] = ()
    problem: str | None = None


@runtime_checkable
class Limit(Protocol):
    """A rule that trims what the keep rules chose: a budget, not a choice.

    ``trim`` gets the chosen candidates oldest first and the protected ones
    (key -> why, e.g. ``"newest"``, ``"alias production"``), which it must
    never drop; when it cannot be met without them, ``Trim.problem`` says so.
    """

    needs_monitor: ClassVar[bool]

    def trim(self, kept: Sequence[Candidate], protected: Mapping[str, str]) -> Trim: ...

    def describe(self) -> str: ...


Rule = Union[KeepRule, Limit]
"""Anything ``keep=[...]`` accepts: a keep rule or a limit."""


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


@dataclass(frozen=True)
class Plan:
    """What retention deletes: key -> the rule that let it go (oldest first), and the limits it could not meet."""

    drop: dict[str, str] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


def best_candidate(candidates: Iterable[Candidate], mode: str) -> Candidate | None:
    """The candidate with the best finite value; the newest wins a tie."""
    scored = [c for c in candidates if is_finite_number(c.value)]
    if not scored:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(scored, key=lambda c: (sign * float(c.value), -c.order))  # type: ignore[arg-type]


def check_rules(rules: Iterable[object], monitored: bool, owner: str = "keep") -> tuple[Rule, ...]:
    """``rules`` as a tuple, after checking each is a rule and that those needing a monitor have one.

    Raises:
        TypeError: for something that is neither a :class:`KeepRule` nor a :class:`Limit`.
        ValueError: for a rule that ranks by the monitor when there is none.
    """
    given = tuple(rules)
    out: list[Rule] = []
    for rule in given:
        if isinstance(rule, type) or not isinstance(rule, (KeepRule, Limit)):
            raise TypeError(
                f"{owner} must be a list of retention rules (KeepLast, KeepBest, KeepEvery, KeepPeriod, MaxBytes, or "
                "an object with keeps() or trim(), describe() and needs_monitor). Wrap numbers in a rule, e.g. "
                f"KeepLast(2). Received: {owner}={list(given)!r}")
        if rule.needs_monitor and not monitored:
            raise ValueError(f"{type(rule).__name__} needs a monitor to rank checkpoints. Pass "
                             f"monitor=Monitor(name, mode). Received: {owner}={list(given)!r}, monitor=None")
        out.append(rule)
    return tuple(out)


def plan(candidates: Sequence[Candidate], rules: Sequence[Rule], mode: str | None,
         protect: Mapping[str, str] | Iterable[str] = ()) -> Plan:
    """What the rules delete, and why.

    Keep rules choose (their union; without keep rules, everything), the
    newest, the best and ``protect`` (key -> why, or just keys) are added,
    then each limit trims the oldest unprotected of what is left. Without
    rules nothing is deleted.
    """
    by_age = sorted(candidates, key=lambda c: c.order)
    held = dict(protect) if isinstance(protect, Mapping) else {k: "protected" for k in protect}
    protected: dict[str, str] = {}
    if by_age:
        protected[by_age[-1].key] = "newest"
    best = best_candidate(by_age, mode) if mode else None
    if best is not None:
        protected.setdefault(best.key, "best")
    for key, why in held.items():
        protected.setdefault(key, why)
    choosers = [r for r in rules if not isinstance(r, Limit)]
    reasons: dict[str, str] = {}
    if choosers:
        chosen = set(protected).union(*(r.keeps(by_age, mode) for r in choosers))
        why = f"retention: {describe(choosers)}"
        reasons = {c.key: why for c in by_age if c.key not in chosen}
    problems = []
    for limit in (r for r in rules if isinstance(r, Limit)):
        kept = [c for c in by_age if c.key not in reasons]
        trim = limit.trim(kept, {c.key: protected[c.key] for c in kept if c.key in protected})
        wrong = sorted(set(trim.drop) & set(protected))
        if wrong:
            raise ValueError(f"The retention rule {limit.describe()} dropped protected checkpoints; a limit must "
                             f"never drop the newest, the best or a held one. Fix its trim(). Received: {wrong}")
        reasons.update((key, f"retention: {limit.describe()}") for key in trim.drop)
        if trim.problem:
            problems.append(trim.problem)
    return Plan({c.key: reasons[c.key] for c in by_age if c.key in reasons}, tuple(problems))


def retained(candidates: Sequence[Candidate], rules: Sequence[Rule], mode: str | None) -> set[str]:
    """The keys that the rules keep (with the newest and the best). Without rules everything is kept."""
    drop = plan(candidates, rules, mode).drop
    return {c.key for c in candidates if c.key not in drop}


def doomed(candidates: Sequence[Candidate], rules: Sequence[Rule], mode: str | None,
           protect: Iterable[str] = ()) -> list[str]:
    """The keys retention deletes, oldest first: what the rules drop and ``protect`` does not name."""
    return list(plan(candidates, rules, mode, protect).drop)


def describe(rules: Sequence[Rule]) -> str:
    """``keep_last=2, max_bytes=50.0 GB``: the rules in the words of the Keras callback."""
    return ", ".join(r.describe() for r in rules)
