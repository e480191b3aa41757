"""Kill a training process at random moments, resume it, and compare with an uninterrupted run.

Shared by ``test_backup.py`` (one trial) and ``scripts/kill_soak.py`` (many).
The child is ``resume_child.py`` (BackupAndRestore every 3 steps, Dropout,
shuffled data); an exact resume ends with the same weights, bit for bit.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from tests.helpers import spawn, wait_until

CHILD = Path(__file__).with_name("resume_child.py")
FINAL_STEP = 100  # the child's 5 epochs of 20 batches
SAVE_FREQ = 3  # the killed runs' backups: one every 3 steps
SLOW = 0.02  # the killed runs' pause after each step (s)


def run_child(*args: str, child: Path = CHILD) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(child), *args], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"resume child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


def _lines(log: Path, prefix: str) -> list[dict]:
    """The complete lines of ``log`` (a running child may be writing the last one) that start with ``prefix``."""
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().split("\n")[:-1] if line.startswith(prefix)]


def steps(log: Path) -> dict[int, dict]:
    return {d["step"]: d for d in _lines(log, '{"step"')}


def started(log: Path) -> int | None:
    """The step the child started from (that of the backup it restored, else 0); None before fit began."""
    return next((d["start"] for d in _lines(log, '{"start"')), None)


def done(log: Path) -> dict:
    """The child's last line: the step it ended at (``done``) and the hash of its weights (``weights``)."""
    return next(json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"done"'))


def final_weights(log: Path) -> str:
    return str(done(log)["weights"])


class Trial(NamedTuple):
    reached: list[int]  # for each kill, the last step the killed run logged
    resumed_at: int  # the step the final run started from: that of the backup it restored (0: none)
    weights: str  # the hash of the final run's weights


def kill_then_resume(folder: Path, rng: random.Random, kills: int = 2, child_script: Path = CHILD) -> Trial:
    """``kills`` SIGKILLs at random moments of training, then a run to the end.

    Each kill waits for a step drawn at random (after the run has written a backup of its own,
    leaving room for the kills after it and for the end of training), then for a random moment
    of the next steps: training, a backup being written, or the pause between steps. It checks
    that the kill found the run still training: a run that has reached its last step has, with
    ``delete_checkpoint=True``, deleted its backups, and the final run would then train from
    scratch, ending equal to an uninterrupted run without proving anything. ``child_script`` is
    ``resume_child.py`` (Keras) or a script with the same arguments and log lines (``tests/torch/train_child.py``).
    """
    reached = []
    for attempt in range(kills):
        log = folder / f"log{attempt}"
        child = spawn([sys.executable, str(child_script), str(folder / "backup"), str(log), "--save-freq", str(SAVE_FREQ),
                       "--slow", str(SLOW)], ready=lambda: started(log) is not None, what="the resume child",
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = started(log)
        assert first is not None
        low = first + SAVE_FREQ + 1  # this run has backed up a step of its own by then
        high = max(low, low + (FINAL_STEP - 5 - low) // (kills - attempt))
        target = rng.randint(low, high)
        wait_until(child, lambda: target in steps(log), what=f"the resume child never reached step {target}",
                   interval=0.002)
        time.sleep(rng.uniform(0.0, 3 * SLOW))
        training = child.poll() is None
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate()
        last = max(steps(log))
        assert training and child.returncode == -signal.SIGKILL, (
            f"kill {attempt + 1} came after the resume child exited by itself (status {child.returncode}, last "
            f"step {last}): {err[-3000:]}")
        assert last < FINAL_STEP and not any(line.startswith('{"done"') for line in log.read_text().splitlines()), (
            f"kill {attempt + 1} came after the end of training (last step {last} of {FINAL_STEP})")
        reached.append(last)
    final = folder / "final"
    run_child(str(folder / "backup"), str(final), "--save-freq", str(SAVE_FREQ), child=child_script)
    return Trial(reached, started(final) or 0, final_weights(final))
