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
    >>> from keepbest.policy import KeepEvery, KeepLast, MaxBytes
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
