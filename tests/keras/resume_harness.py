"""Kill a training process at random moments, resume it, and compare with an uninterrupted run.

Shared by ``test_backup.py`` (one trial) and ``scripts/kill_soak.py`` (many).
The child is ``resume_child.py`` (BackupAndRestore every 3 steps, Dropout,
shuffled data); an exact resume ends with the same weights, bit for bit.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

CHILD = Path(__file__).with_name("resume_child.py")


def run_child(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"resume child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc


def steps(log: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"step"')]
    return {d["step"]: d for d in lines}


def done(log: Path) -> dict:
    """The child's last line: the step it ended at (``done``) and the hash of its weights (``weights``)."""
    return next(json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"done"'))


def final_weights(log: Path) -> str:
    return str(done(log)["weights"])


def kill_then_resume(folder: Path, rng: random.Random, kills: int = 2) -> tuple[list[int], str]:
    """``kills`` SIGKILLs at random moments, then a run to the end; returns the steps reached and its weights."""
    reached = []
    for attempt in range(kills):
        log = folder / f"log{attempt}"
        child = subprocess.Popen([sys.executable, str(CHILD), str(folder / "backup"), str(log), "--save-freq", "3",
                                  "--slow", "0.02"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (log.exists() and "ready" in log.read_text()):
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                raise RuntimeError(f"resume child did not start: {child.communicate()[1][-3000:]}")
            time.sleep(0.02)
        time.sleep(rng.uniform(0.2, 2.0))
        child.kill()
        child.communicate()
        reached.append(max(steps(log), default=0))
    run_child(str(folder / "backup"), str(folder / "final"), "--save-freq", "3")
    return reached, final_weights(folder / "final")
