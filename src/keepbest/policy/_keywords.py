"""Retention rules from the keywords the adapters take (``keep_last=2, max_bytes="50GB"``), checked by name.

Example:
    >>> rules_from(keep_last=2, keep_every=5, max_bytes="50GB")
    (KeepLast(n=2), KeepEvery(n=5), MaxBytes(budget=50000000000))
    >>> rules_from(keep_every=0)
    Traceback (most recent call last):
    ...
    ValueError: `keep_every` must be a positive integer (a number of epochs, as KeepEvery(n)) or None (no such rule). \
Received: keep_every=0
"""

from __future__ import annotations

from typing import Any, Iterable

from keepbest.policy._retention import Rule, check_rules, is_finite_number
from keepbest.policy._rules import KeepBest, KeepEvery, KeepLast, KeepPeriod, MaxBytes
from keepbest.policy._sizes import parse_size


def _count(name: str, value: Any, what: str, rule: type) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer ({what}, as {rule.__name__}(n)) or None (no such "
                         f"rule). Received: {name}={value!r}")
    return value


def rules_from(*, keep_last: int | None = None, keep_best: int | None = None, keep_every: int | None = None,
               keep_period: float | None = None, max_bytes: int | str | None = None,
               keep: Iterable[Rule] = ()) -> tuple[Rule, ...]:
    """The rules the keywords ask for, in this order, then ``keep``'s; ValueError/TypeError naming the keyword."""
    rules: list[Any] = []
    if (n := _count("keep_last", keep_last, "a number of checkpoints to keep", KeepLast)) is not None:
        rules.append(KeepLast(n))
    if (n := _count("keep_best", keep_best, "a number of checkpoints to keep", KeepBest)) is not None:
        rules.append(KeepBest(n))
    if (n := _count("keep_every", keep_every, "a number of epochs", KeepEvery)) is not None:
        rules.append(KeepEvery(n))
    if keep_period is not None:
        if not is_finite_number(keep_period) or keep_period <= 0:
            raise ValueError("`keep_period` must be a positive number of seconds (one checkpoint is kept per "
                             f"period, e.g. 3600 for one per hour) or None. Received: keep_period={keep_period!r}")
        rules.append(KeepPeriod(keep_period))
    if max_bytes is not None:
        rules.append(MaxBytes(parse_size(max_bytes, "max_bytes")))
    if isinstance(keep, (str, bytes)) or not isinstance(keep, Iterable):
        raise TypeError(f"`keep` must be a list of retention rules, e.g. [KeepLast(2), MaxBytes('50GB')]. "
                        f"Received: keep={keep!r}")
    return (*rules, *check_rules(keep, monitored=True))
