"""Composable retention: KeepEvery, KeepPeriod and MaxBytes, pure and through a real CheckpointManager."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import pytest

from keepbest import CheckpointManager, KeepBest, KeepLast, Monitor, evaluation, history, store
from keepbest.evaluation import EvaluatorState, commit_id
from keepbest.policy import (
    Candidate,
    KeepEvery,
    KeepPeriod,
    MaxBytes,
    Trim,
    check_rules,
    format_size,
    parse_size,
    plan,
    retained,
)


def cands(n, sizes=None, values=None, epochs=None, created=None):
    """``n`` candidates keyed by 1-based position, oldest first."""
    return [Candidate(str(i), order=i, value=None if values is None else values[i - 1],
                      size=0 if sizes is None else sizes[i - 1],
                      created=None if created is None else created[i - 1],
                      epoch=i if epochs is None else epochs[i - 1])
            for i in range(1, n + 1)]


# --- pure rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rules", "expected"), [
    ((KeepEvery(5),), {"5", "10", "12"}),  # the newest (12) always stays
    ((KeepEvery(5), KeepLast(3)), {"5", "10", "11", "12"}),
    ((KeepEvery(4),), {"4", "8", "12"}),
    ((KeepEvery(1),), {str(i) for i in range(1, 13)}),
])
def test_keep_every_keeps_epochs_that_are_multiples_of_n(rules, expected):
    assert retained(cands(12), rules, None) == expected


def test_keep_every_keeps_the_newest_checkpoint_of_a_due_epoch():
    batch_saves = cands(6, epochs=[4, 5, 5, 5, 6, 7])
    assert retained(batch_saves, (KeepEvery(5),), None) == {"4", "6"}


def test_keep_every_ignores_checkpoints_without_an_epoch():
    assert retained(cands(3, epochs=[None, None, None]), (KeepEvery(1),), None) == {"3"}


@pytest.mark.parametrize(("created", "seconds", "expected"), [
    ([0, 10, 59, 60, 61, 200, 230], 60, {"1", "4", "6", "7"}),  # first of [0,60), [60,120), [180,240); newest
    ([5, 6, 7], 60, {"1", "3"}),
    ([0, 100, 200], 60, {"1", "2", "3"}),
    ([3600.5, 7199, 7200], 3600, {"1", "3"}),  # periods are aligned to the clock, not to the first save
])
def test_keep_period_keeps_the_first_checkpoint_of_each_period(created, seconds, expected):
    assert retained(cands(len(created), created=created), (KeepPeriod(seconds),), None) == expected


def test_keep_period_ignores_checkpoints_without_a_creation_time():
    assert retained(cands(3), (KeepPeriod(60),), None) == {"3"}


@pytest.mark.parametrize(("sizes", "budget", "expected"), [
    ([10, 10, 10, 10], 40, {"1", "2", "3", "4"}),  # alone it keeps everything that fits
    ([10, 10, 10, 10], 25, {"3", "4"}),  # the oldest go first
    ([30, 1, 1, 1], 10, {"2", "3", "4"}),
    ([1, 1, 30, 5], 34, {"4"}),  # dropping 3 alone would do, but the oldest go first
])
def test_max_bytes_drops_the_oldest_until_the_rest_fits(sizes, budget, expected):
    assert retained(cands(len(sizes), sizes=sizes), (MaxBytes(budget),), None) == expected


def test_max_bytes_trims_what_the_keep_rules_chose():
    decided = plan(cands(10, sizes=[10] * 10), (KeepEvery(2), MaxBytes(30)), None)
    assert list(decided.drop) == ["1", "2", "3", "4", "5", "7", "9"]
    assert decided.drop["2"] == "retention: max_bytes=30 B" and decided.drop["3"] == "retention: keep_every=2"


def test_max_bytes_never_drops_the_newest_the_best_or_a_protected_one():
    decided = plan(cands(5, sizes=[10] * 5, values=[1.0, 5.0, 5.0, 5.0, 5.0]), (MaxBytes(25),), "min",
                   protect={"2": "alias production"})
    assert list(decided.drop) == ["3", "4"]
    assert decided.problems and "30 bytes" in decided.problems[0]


def test_max_bytes_reports_the_protected_sizes_when_they_alone_exceed_the_budget():
    decided = plan(cands(3, sizes=[100, 50, 200]), (MaxBytes(120),), None, protect={"1": "alias production"})
    assert list(decided.drop) == ["2"]
    assert decided.problems == (
        "max_bytes=120 B cannot be met: the checkpoints retention must keep take 300 B (300 bytes), over the budget "
        "of 120 B (120 bytes). They are kept anyway. Raise the budget, or remove the aliases that hold old "
        "checkpoints. Protected: 1 (100 B, alias production); 3 (200 B, newest)",)


@dataclass(frozen=True)
class KeepOdd:
    """A user's rule, one class: keep odd epochs."""

    needs_monitor: ClassVar[bool] = False

    def keeps(self, candidates: Sequence[Candidate], mode: str | None) -> set[str]:
        return {c.key for c in candidates if c.epoch is not None and c.epoch % 2}

    def describe(self) -> str:
        return "keep_odd"


def test_a_user_rule_is_one_class_that_combines_with_the_others():
    decided = plan(cands(6), (KeepOdd(), KeepLast(2)), None)
    assert decided.drop == {"2": "retention: keep_odd, keep_last=2", "4": "retention: keep_odd, keep_last=2"}


@dataclass(frozen=True)
class DropEverything:
    needs_monitor: ClassVar[bool] = False

    def trim(self, kept, protected):
        return Trim(tuple(c.key for c in kept))

    def describe(self) -> str:
        return "drop_everything"


def test_a_limit_that_drops_a_protected_checkpoint_raises():
    with pytest.raises(ValueError, match=r"drop_everything dropped protected checkpoints.*Received: \['2'\]"):
        plan(cands(2), (DropEverything(),), None)


@pytest.mark.parametrize("bad", [2, "keep_last=2", KeepLast, None])
def test_check_rules_refuses_what_is_not_a_rule(bad):
    with pytest.raises(TypeError, match=r"keep must be a list of retention rules.*Received: keep="):
        check_rules([bad], monitored=True)


def test_check_rules_refuses_a_ranking_rule_without_monitor():
    with pytest.raises(ValueError, match=r"KeepBest needs a monitor.*monitor=None"):
        check_rules([KeepEvery(2), KeepBest(1)], monitored=False)


@pytest.mark.parametrize(("text", "expected"), [
    ("50GB", 50 * 10**9), ("1.5 GiB", 3 * 2**29), ("500MB", 5 * 10**8), ("500mb", 5 * 10**8), ("1024", 1024),
    (4096, 4096), ("2 KiB", 2048), ("1e3", 1000), ("10 B", 10), (" 3TB ", 3 * 10**12),
])
def test_parse_size_reads_decimal_and_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "50 GBs", "-5GB", "", "GB", "1.5", True, 2.5, None])
def test_parse_size_refuses_what_is_not_a_byte_count(bad):
    with pytest.raises(ValueError, match=r"max_bytes must be a (number of bytes|positive whole number).*Received: "
                                         r"max_bytes="):
        parse_size(bad)


@pytest.mark.parametrize("bad", [0, "0GB"])
def test_parse_size_refuses_zero(bad):
    with pytest.raises(ValueError, match=r"positive whole number of bytes.*Received: max_bytes="):
        parse_size(bad)


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (50 * 10**9, "50.0 GB"),
                                         (10**30, "1.0e+18 TB")])
def test_format_size_is_short_whatever_the_size(n, text):
    assert format_size(n) == text


@pytest.mark.parametrize(("rule", "words"), [(KeepEvery(5), "keep_every=5"), (KeepPeriod(3600), "keep_period=3600"),
                                             (MaxBytes("50GB"), "max_bytes=50.0 GB"), (KeepLast(2), "keep_last=2")])
def test_rules_describe_themselves_in_the_callback_words(rule, words):
    assert rule.describe() == words


@pytest.mark.parametrize(("make", "match"), [
    (lambda: KeepEvery(0), r"KeepEvery\(n=...\) must be a positive integer.*Received: n=0"),
    (lambda: KeepPeriod(-1), r"KeepPeriod\(seconds=...\) must be a positive number.*Received: seconds=-1"),
    (lambda: KeepPeriod(float("nan")), r"KeepPeriod\(seconds=...\).*Received: seconds=nan"),
    (lambda: MaxBytes("x"), r"MaxBytes\(budget\) must be a number of bytes.*Received: MaxBytes\(budget\)='x'"),
])
def test_rules_refuse_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- through a real CheckpointManager: 30 saves of varying size ------------------------------------------

ALIASED, HELD, BEST = 3, 6, 4  # epochs: promoted to "production", held by an evaluator, the lowest val_loss


def _loss(epoch: int) -> float:
    return abs(epoch - BEST) + 1.0


def _sizes(mgr: CheckpointManager) -> dict[int, int]:
    return {c.epoch: c.size for c in mgr.checkpoints()}


def _run(root, rules, budget=None, pause=0.0):
    """30 saves of 1-40 KB; after each, the protected checkpoints are there and the budget holds when it can."""
    mgr = CheckpointManager(root, monitor=Monitor("val_loss", "min"), keep=rules)
    rng = np.random.default_rng(7)
    size_of: dict[int, int] = {}
    created: dict[int, float] = {}
    for epoch in range(1, 31):
        state = {"w": np.full(int(rng.integers(1_000, 40_000)), epoch, np.uint8)}
        ckpt = mgr.save(epoch * 10, state, metrics={"val_loss": _loss(epoch)}, epoch=epoch)
        size_of[epoch], created[epoch] = ckpt.size, ckpt.manifest.created
        if epoch == ALIASED:
            mgr.promote(ckpt.version, "production")
        if epoch == HELD:
            evaluation.write_state(mgr.store, EvaluatorState(name="eval", mode="latest", heartbeat=time.time(),
                                                             evaluating=commit_id(ckpt.manifest)))
        now = _sizes(mgr)
        protected = {epoch, min(size_of, key=_loss)} | {e for e in (ALIASED, HELD) if e <= epoch}
        assert protected <= set(now), f"after epoch {epoch}: {sorted(protected - set(now))} were deleted"
        if budget is not None and sum(size_of[e] for e in protected) <= budget:
            assert sum(now.values()) <= budget, f"after epoch {epoch}: {sum(now.values())} bytes > {budget}"
        time.sleep(pause)
    return mgr, size_of, created


@pytest.mark.parametrize(("rules", "expected"), [
    ([KeepEvery(5)], {5, 10, 15, 20, 25, 30}),
    ([KeepEvery(5), KeepLast(3)], {5, 10, 15, 20, 25, 28, 29, 30}),
    ([KeepEvery(7), KeepBest(2)], {7, 14, 21, 28, 5, 30}),  # 3 and 5 tie for second best: the newer wins
])
def test_keep_every_over_30_saves_keeps_its_epochs_and_the_protected_ones(tmp_path, rules, expected):
    mgr, _, _ = _run(tmp_path, rules)
    assert set(_sizes(mgr)) == expected | {ALIASED, HELD, BEST, 30}


def test_keep_period_over_30_saves_keeps_the_first_of_each_period(tmp_path):
    seconds = 0.05
    mgr, _, created = _run(tmp_path, [KeepPeriod(seconds)], pause=0.012)
    first: dict[int, int] = {}
    for epoch in sorted(created):
        first.setdefault(int(created[epoch] // seconds), epoch)
    assert len(first) >= 4  # the saves spanned several periods, so the rule chose something
    assert set(_sizes(mgr)) == set(first.values()) | {ALIASED, HELD, BEST, 30}


@pytest.mark.parametrize("rules", [[], [KeepEvery(5)], [KeepLast(10)]])
@pytest.mark.parametrize("budget", [150_000, 200_000])
def test_max_bytes_over_30_saves_stays_under_budget_and_keeps_the_protected(tmp_path, rules, budget):
    mgr, _, _ = _run(tmp_path, [*rules, MaxBytes(budget)], budget=budget)
    kept = _sizes(mgr)
    assert sum(kept.values()) <= budget
    # The budget deleted the oldest first: each checkpoint it deleted is older than every unprotected one kept.
    trimmed = [e["epoch"] for e in history.read(mgr.store, "ckpt")
               if e["event"] == "deleted" and e["reason"].startswith("retention: max_bytes=")]
    unprotected = set(kept) - {ALIASED, HELD, BEST, 30}
    assert trimmed and (not unprotected or max(trimmed) < min(unprotected))


def test_max_bytes_deletions_name_the_rule_in_the_history(tmp_path):
    mgr, _, _ = _run(tmp_path, [KeepEvery(5), MaxBytes(150_000)], budget=150_000)
    reasons = {e["reason"] for e in history.read(mgr.store, "ckpt") if e["event"] == "deleted"}
    assert reasons == {"retention: keep_every=5", "retention: max_bytes=150.0 kB"}


def test_max_bytes_warns_once_when_the_protected_ones_alone_exceed_it(tmp_path):
    with pytest.warns(UserWarning, match=r"max_bytes=30.0 kB cannot be met: the checkpoints retention must keep take "
                                         r".* bytes\), over the budget of 30.0 kB \(30000 bytes\).*newest") as caught:
        mgr, _, _ = _run(tmp_path, [MaxBytes(30_000)], budget=30_000)
    assert len([w for w in caught if "cannot be met" in str(w.message)]) == 1
    assert set(_sizes(mgr)) == {ALIASED, HELD, BEST, 30}


# --- prune: rules after the fact ---------------------------------------------------------------------------


@pytest.fixture
def unpruned(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=Monitor("val_loss", "min"))
    for epoch in range(1, 11):
        ckpt = mgr.save(epoch, {"w": np.full(1000 * epoch, epoch, np.uint8)}, metrics={"val_loss": _loss(epoch)},
                        epoch=epoch)
        if epoch == ALIASED:
            mgr.promote(ckpt.version, "production")
        if epoch == HELD:
            evaluation.write_state(store.open(tmp_path), EvaluatorState(
                name="eval", mode="latest", heartbeat=time.time(), evaluating=commit_id(ckpt.manifest)))
    return mgr


def test_prune_dry_run_names_what_it_would_delete_and_deletes_nothing(unpruned):
    assert unpruned.prune([KeepLast(2)], dry_run=True) == [f"ckpt-{e:09d}" for e in (1, 2, 5, 7, 8)]
    assert len(unpruned.checkpoints()) == 10


def test_prune_applies_rules_after_the_fact_with_every_protection(unpruned):
    assert unpruned.prune([KeepEvery(5)]) == [f"ckpt-{e:09d}" for e in (1, 2, 7, 8, 9)]
    assert [c.epoch for c in unpruned.checkpoints()] == [3, 4, 5, 6, 10]


def test_plan_retention_gives_the_rule_behind_each_deletion(unpruned):
    decided = unpruned.plan_retention([KeepEvery(5), MaxBytes(25_000)])
    assert decided.drop == {"ckpt-000000001": "retention: keep_every=5", "ckpt-000000002": "retention: keep_every=5",
                            "ckpt-000000005": "retention: max_bytes=25.0 kB",
                            **{f"ckpt-{e:09d}": "retention: keep_every=5" for e in (7, 8, 9)}}


def test_max_bytes_names_what_holds_the_protected_checkpoints(unpruned):
    problem, = unpruned.plan_retention([MaxBytes(20_000)]).problems
    assert "Protected: ckpt-000000003 (3.1 kB, alias production); ckpt-000000004 (4.1 kB, best); ckpt-000000006 " \
           "(6.1 kB, an evaluator holds it); ckpt-000000010 (10.1 kB, newest)" in problem


def test_prune_refuses_a_ranking_rule_without_monitor(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match=r"KeepBest needs a monitor.*monitor=None"):
        mgr.prune([KeepBest(1)])


def test_manager_accepts_a_user_rule(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=[KeepOdd()])
    for epoch in range(1, 6):
        mgr.save(epoch, {"w": np.zeros(2)}, epoch=epoch)
    assert [c.epoch for c in mgr.checkpoints()] == [1, 3, 5]
