"""SIGKILL of a process saving to S3, at random request numbers, loses no committed best and leaves nothing.

A run of ``s3_kill_harness`` (see there) against moto's server: ``KEEPBEST_S3_KILLS`` kills (default 50),
each before a request number counted by a botocore hook in the child; ``KEEPBEST_S3_KILL_SEED`` replays a
run (the seed is in every failure message). ``scripts/s3_kill_soak.py`` runs the same harness for 200.
The kills run once per module; each test reads one outcome of them.
"""

from __future__ import annotations

import os
import random

import pytest

pytest.importorskip("s3fs", reason="keepbest[s3] is not installed")

from .s3_kill_harness import Summary, run  # noqa: E402 - after the skip: the harness imports the child's deps

KILLS = int(os.environ.get("KEEPBEST_S3_KILLS", "50"))
SEED = int(os.environ.get("KEEPBEST_S3_KILL_SEED", str(random.SystemRandom().randrange(10**6))))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def kills(s3) -> Summary:
    summary = run(s3, KILLS, SEED)
    print(summary.line())
    print(summary.figures())
    return summary


def _report(summary: Summary, kind: str) -> str:
    found = [p for p in summary.problems if p.startswith(f"{kind}:")]
    return f"{summary.line()}\n" + "\n".join(found[:10])


def test_sigkill_mid_save_never_loses_a_committed_best(kills):
    assert kills.lost == 0, _report(kills, "lost")


def test_sigkill_mid_save_never_leaves_a_partial_checkpoint_visible(kills):
    assert kills.partial == 0, _report(kills, "partial")


def test_gc_removes_everything_a_killed_saver_left(kills):
    assert kills.orphans == 0, _report(kills, "orphans")


def test_recover_succeeds_after_every_kill(kills):
    assert kills.kills >= KILLS, f"only {kills.kills} of {kills.trials} children died by their kill ({SEED=})"
    assert kills.failed == 0, _report(kills, "failed")


def test_kills_land_at_varied_requests(kills):
    # The test means something only if kills land inside uploads, at commits and at lock releases.
    assert len(set(kills.requests)) >= KILLS // 2, kills.figures()
    wanted = {"UploadPart data", "CompleteMultipartUpload data", "PutObject manifest", "DeleteObject lock"}
    assert wanted <= set(kills.labels), kills.figures()
    assert {"saving series", "saving best", "saving file"} <= set(kills.phases), kills.figures()
