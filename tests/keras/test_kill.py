"""SIGKILL at random moments during repeated saves never loses the previous best.

A short run of ``kill_harness`` (see there): ``KEEPBEST_KILLS`` kills per format
(default 14: 70 over the five formats, including async saves);
``KEEPBEST_KILL_SEED`` replays a run (the seed is in every failure message).
``scripts/kill_soak.py`` runs the same harness for a long count.
"""

from __future__ import annotations

import os
import random

import pytest

from .kill_child import build_model
from .kill_harness import FORMATS, run

KILLS = int(os.environ.get("KEEPBEST_KILLS", "8"))
SEED = int(os.environ.get("KEEPBEST_KILL_SEED", str(random.SystemRandom().randrange(10**6))))


@pytest.mark.slow
@pytest.mark.parametrize("filename", FORMATS)
def test_sigkill_during_saves_never_loses_the_previous_best(tmp_path, filename):
    summary = run(filename, KILLS, SEED, tmp_path, build_model())
    print(summary.line())
    assert summary.trials == KILLS
    assert (summary.lost, summary.corrupt_accepted, summary.orphans) == (0, 0, 0), summary.problems
    # The test means something only if kills land inside saves, not between them. Most do (saves run back to
    # back); with the short count of a second backend (4) half is not a safe bound for a random draw: 1 of 4
    # was seen on torch. A third of the kills, at least one, still proves saves are being hit.
    assert summary.mid_save >= max(1, KILLS // 3), \
        f"only {summary.mid_save} of {KILLS} kills landed inside a save ({SEED=})"
