"""keepbest.policy: pure rules, table-driven."""

import math

import numpy as np
import pytest

from keepbest.errors import MonitorError
from keepbest.policy import (
    Candidate,
    KeepBest,
    KeepLast,
    Monitor,
    batches_advanced,
    best_candidate,
    epoch_is_due,
    is_last_due,
    resolve_mode,
    retained,
)

NAN = math.nan
INF = math.inf


def history(values):
    """Candidates keyed by 1-based epoch, oldest first."""
    return [Candidate(key=str(epoch), order=epoch, value=v) for epoch, v in enumerate(values, start=1)]


# --- Monitor.is_improvement ----------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "value", "best", "expected"),
    [
        ("min", 0.5, 1.0, True),
        ("min", 1.5, 1.0, False),
        ("min", 1.0, 1.0, False),  # equal is not better
        ("max", 1.5, 1.0, True),
        ("max", 0.5, 1.0, False),
        ("max", 1.0, 1.0, False),
        ("min", 0.5, None, True),  # the first finite value always improves
        ("max", -7.0, None, True),
    ],
)
def test_is_improvement_compares_in_the_monitor_direction(mode, value, best, expected):
    assert Monitor("m", mode).is_improvement(value, best) is expected


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        # Binary-exact values, so "exactly min_delta" really is exact.
        ("min", 0.875, False),  # better by less than min_delta
        ("min", 0.75, False),  # better by exactly min_delta is not enough
        ("min", 0.5, True),
        ("max", 1.125, False),
        ("max", 1.25, False),
        ("max", 1.5, True),
    ],
)
def test_is_improvement_requires_more_than_min_delta(mode, value, expected):
    assert Monitor("m", mode, min_delta=0.25).is_improvement(value, best=1.0) is expected


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("min", 0.6, False),  # does not beat the baseline 0.5
        ("min", 0.4, True),
        ("max", 0.4, False),
        ("max", 0.6, True),
    ],
)
def test_is_improvement_must_beat_baseline_when_there_is_no_best(mode, value, expected):
    assert Monitor("m", mode, baseline=0.5).is_improvement(value, best=None) is expected


def test_is_improvement_uses_the_better_of_best_and_baseline():
    # A recorded best that is worse than the baseline does not lower the bar.
    monitor = Monitor("m", "min", baseline=0.5)
    assert monitor.is_improvement(0.7, best=0.9) is False


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("value", [NAN, INF, -INF, None])
@pytest.mark.parametrize("best", [None, 1.0])
def test_is_improvement_is_false_for_non_finite_values(mode, value, best):
    assert Monitor("m", mode).is_improvement(value, best) is False


@pytest.mark.parametrize("mode", ["min", "max"])
def test_is_improvement_ignores_a_non_finite_best(mode):
    assert Monitor("m", mode).is_improvement(3.0, best=NAN) is True


@pytest.mark.parametrize(("mode", "best", "expected"), [("min", INF, True), ("max", INF, False),
                                                       ("max", -INF, True), ("min", -INF, False)])
def test_an_infinite_best_is_a_bar_like_any_other(mode, best, expected):
    assert Monitor("m", mode).is_improvement(0.5, best=best) is expected


def test_is_improvement_accepts_numpy_float32_values():
    assert Monitor("m", "min").is_improvement(np.float32(0.5), best=1.0) is True


# --- Monitor.better and construction ---------------------------------------------


@pytest.mark.parametrize(
    ("mode", "a", "b", "expected"),
    [
        ("min", 1.0, 2.0, 1.0),
        ("max", 1.0, 2.0, 2.0),
        ("min", None, 2.0, 2.0),
        ("max", 1.0, None, 1.0),
        ("min", NAN, 2.0, 2.0),
        ("max", INF, 2.0, INF),
        ("min", -INF, 2.0, -INF),
        ("min", INF, 2.0, 2.0),
        ("min", None, None, None),
        ("max", NAN, INF, INF),
        ("max", NAN, None, None),
    ],
)
def test_better_returns_the_better_value_ignoring_none_and_nan(mode, a, b, expected):
    assert Monitor("m", mode).better(a, b) == expected


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "auto"}, "'auto' must be resolved first"),
        ({"mode": "up"}, "Received: mode='up'"),
        ({"min_delta": -0.1}, "min_delta must be a finite number >= 0"),
        ({"min_delta": NAN}, "min_delta must be a finite number >= 0"),
        ({"baseline": INF}, "baseline must be a finite number or None"),
    ],
)
def test_monitor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Monitor("m", **kwargs)


# --- resolve_mode --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mode", "direction", "expected"),
    [
        ("loss", "auto", None, "min"),
        ("val_loss", "auto", None, "min"),
        ("accuracy", "auto", "up", "max"),
        ("val_mae", "auto", "down", "min"),
        ("accuracy", "min", None, "min"),  # an explicit mode wins
        ("loss", "max", None, "max"),
    ],
)
def test_resolve_mode_returns_min_or_max(name, mode, direction, expected):
    assert resolve_mode(name, mode, direction) == expected


def test_resolve_mode_rejects_an_unknown_mode_naming_it():
    with pytest.raises(ValueError, match="mode 'sideways' is unknown"):
        resolve_mode("loss", "sideways")


def test_resolve_mode_auto_without_direction_raises_keras_message():
    with pytest.raises(MonitorError, match="isn't able to automatically determine"):
        resolve_mode("val_f1", "auto")


# --- save triggers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last_seen", "batch", "expected"),
    [
        (None, 0, 1),  # first batch of training
        (None, 3, 4),  # first call sees batch 3 (steps_per_execution=4)
        (0, 1, 1),
        (2, 5, 3),  # steps_per_execution-style jump
        (9, 0, 1),  # a new epoch restarts the index
        (8, 1, 2),  # new epoch seen after a jump
        (3, 3, 4),  # same index in the next epoch (4 batches, steps_per_execution=4)
    ],
)
def test_batches_advanced_counts_from_index_difference(last_seen, batch, expected):
    assert batches_advanced(last_seen, batch) == expected


@pytest.mark.parametrize(
    ("epoch", "every", "expected"),
    [(0, 1, True), (1, 1, True), (0, 2, False), (1, 2, True), (2, 2, False), (5, 3, True), (4, 3, False)],
)
def test_epoch_is_due_every_n_epochs(epoch, every, expected):
    assert epoch_is_due(epoch, every) is expected


@pytest.mark.parametrize(
    ("epoch", "batch", "epochs", "steps", "save_freq", "every", "expected"),
    [
        (4, None, 5, 6, "epoch", 1, True), (3, None, 5, 6, "epoch", 1, False),
        (5, None, 7, 6, "epoch", 2, True),  # due at epochs 2, 4, 6 (1-based): epoch 6 is the last due
        (3, None, 7, 6, "epoch", 2, False), (0, None, None, 6, "epoch", 1, True),  # epochs unknown: may be last
        # 6 batches per epoch, a save every 2: due after batches 2, 4, 6 of the last epoch
        (1, 5, 2, 6, 2, 1, True), (1, 3, 2, 6, 2, 1, False), (0, 5, 2, 6, 2, 1, False),
        (1, 3, 2, 6, 3, 1, True),  # the next would be due after batch 7 of 6
        (1, 5, 2, None, 2, 1, True),  # steps unknown: it may be the last, so it is not skipped
        # save_freq longer than an epoch: 4 epochs of 2 batches, a save every 3 (after batches 3, 6 of 8)
        (2, 1, 4, 2, 3, 1, True), (0, 0, 4, 2, 3, 1, False),
    ],
)
def test_is_last_due_when_no_later_save_falls_due(epoch, batch, epochs, steps, save_freq, every, expected):
    assert is_last_due(epoch, batch, epochs=epochs, steps=steps, save_freq=save_freq, every=every) is expected


# --- retention ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "rules", "mode", "expected"),
    [
        # The acceptance case: last two plus the best.
        ([3, 1, 2, 4, 5], (KeepLast(2), KeepBest(1)), "min", {"2", "4", "5"}),
        ([3, 1, 2, 4, 5], (KeepLast(2),), "min", {"2", "4", "5"}),  # best kept although not last
        ([3, 1, 2, 4, 5], (KeepLast(3),), None, {"3", "4", "5"}),
        ([3, 1, 2, 4, 5], (KeepLast(10),), None, {"1", "2", "3", "4", "5"}),
        ([3, 1, 2, 4, 5], (KeepBest(2),), "min", {"2", "3", "5"}),  # newest kept although not best
        ([3, 1, 2, 4, 5], (KeepBest(2),), "max", {"4", "5"}),
        ([5, 1, 4, 2, 3], (KeepBest(1),), "min", {"2", "5"}),
        ([1, 2, 3], (KeepLast(1),), "min", {"1", "3"}),  # best is the oldest
        ([1, 2, 3], (KeepLast(1),), "max", {"3"}),  # newest is the best
    ],
)
def test_retained_keeps_union_of_rules_plus_newest_and_best(values, rules, mode, expected):
    assert retained(history(values), rules, mode) == expected


@pytest.mark.parametrize("mode", [None, "min"])
def test_retained_without_rules_keeps_everything(mode):
    assert retained(history([3, 1, 2]), (), mode) == {"1", "2", "3"}


def test_retained_of_no_candidates_is_empty():
    assert retained([], (KeepLast(1), KeepBest(1)), "min") == set()


def test_retained_orders_by_order_not_by_list_position():
    shuffled = [Candidate("c", 3, 9.0), Candidate("a", 1, 9.0), Candidate("b", 2, 9.0)]
    assert retained(shuffled, (KeepLast(1),), None) == {"c"}


@pytest.mark.parametrize(
    ("values", "rules", "expected"),
    [
        # NaN, inf and None values are never the best, whatever the mode.
        ([NAN, 2, 3, 4], (KeepLast(1), KeepBest(1)), {"2", "4"}),
        ([-INF, 2, 3, 4], (KeepLast(1), KeepBest(1)), {"2", "4"}),
        ([None, 2, 3, 4], (KeepLast(1), KeepBest(1)), {"2", "4"}),
        ([NAN, NAN, NAN], (KeepBest(2),), {"3"}),
    ],
)
def test_retained_never_counts_non_finite_values_as_best(values, rules, expected):
    assert retained(history(values), rules, "min") == expected


def test_retained_keep_best_without_mode_raises():
    with pytest.raises(ValueError, match=r"KeepBest needs a monitor to rank checkpoints.*Received: mode=None"):
        retained(history([1, 2]), (KeepBest(1),), None)


def test_best_candidate_prefers_the_newest_on_a_tie():
    assert best_candidate(history([1, 2, 1]), "min").key == "3"


def test_best_candidate_is_none_without_finite_values():
    assert best_candidate(history([NAN, INF, None]), "max") is None


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: KeepLast(0), r"KeepLast\(n=...\) must be a positive integer.*Received: n=0"),
        (lambda: KeepLast(True), "Received: n=True"),
        (lambda: KeepLast(1.0), "Received: n=1.0"),
        (lambda: KeepBest(-1), r"KeepBest\(k=...\) must be a positive integer.*Received: k=-1"),
        (lambda: KeepBest(False), "Received: k=False"),
    ],
)
def test_keep_rules_reject_non_positive_integers(make, match):
    with pytest.raises(ValueError, match=match):
        make()
