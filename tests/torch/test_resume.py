"""A plain torch loop SIGKILLed at random moments and resumed with Checkpointer.restore ends as if never stopped."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from keepbest import CheckpointManager

from tests.keras.resume_harness import FINAL_STEP, done, final_weights, kill_then_resume, run_child, started, steps

CHILD = Path(__file__).with_name("train_child.py")
TRIALS = int(os.environ.get("KEEPBEST_TORCH_TRIALS", "2"))  # scripts/kill_soak.py --torch runs many


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    run_child(str(folder / "ckpt"), str(folder / "log"), child=CHILD)
    return folder / "log"


def _same_losses_after(resumed: Path, full: Path, start: int) -> None:
    after, before = steps(resumed), steps(full)
    assert sorted(after) == list(range(start + 1, FINAL_STEP + 1))
    for step in after:
        assert after[step]["batch_id"] == before[step]["batch_id"], f"batch order differs at step {step}"
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], abs=1e-6), f"loss differs at step {step}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["--sync", "--async"])
def test_resume_after_sigkill_mid_epoch_repeats_the_losses_and_ends_with_the_same_weights(tmp_path, uninterrupted,
                                                                                        mode):
    args = [mode] if mode == "--sync" else []
    killed = run_child_status(tmp_path, "--kill-at-step", "53", *args)
    assert killed == -signal.SIGKILL
    # Saves every 5 steps: the newest committed one is step 50, or, async, step 45 when the kill caught the
    # save of step 50 in flight (the write of a save overlaps the next steps; a loaded machine can be slower).
    found = CheckpointManager(tmp_path / "ckpt", recover=False)
    latest = found.latest
    found.close()
    committed = latest.step if latest is not None else None
    assert (committed == 50) if mode == "--sync" else (committed in (45, 50)), f"newest committed: {committed}"
    run_child(str(tmp_path / "ckpt"), str(tmp_path / "resumed"), *args, child=CHILD)
    assert started(tmp_path / "resumed") == committed  # the newest save committed before the kill
    _same_losses_after(tmp_path / "resumed", uninterrupted, committed)
    assert done(tmp_path / "resumed")["weights"] == final_weights(uninterrupted)


def run_child_status(tmp_path: Path, *args: str) -> int:
    return subprocess.run([sys.executable, str(CHILD), str(tmp_path / "ckpt"), str(tmp_path / "killed"), *args],
                          capture_output=True, timeout=300).returncode


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkill_at_random_moments_then_restore_ends_with_the_uninterrupted_losses_and_weights(tmp_path, uninterrupted,
                                                                                              trial):
    seed = int(os.environ.get("KEEPBEST_KILL_SEED", str(random.SystemRandom().randrange(10**6))))
    result = kill_then_resume(tmp_path, random.Random(seed), child_script=CHILD)
    print(f"killed after steps {result.reached}, resumed at step {result.resumed_at} (seed {seed})")
    assert 0 < result.resumed_at <= result.reached[-1], f"seed {seed}: the final run did not resume from a save"
    _same_losses_after(tmp_path / "final", uninterrupted, result.resumed_at)
    assert result.weights == final_weights(uninterrupted), f"seed {seed}, killed after steps {result.reached}"
