"""SIGKILL at random moments during repeated saves never loses the previous best.

Each trial starts a real training child (``kill_child.py``) that saves a new
best back to back, kills it with SIGKILL after a random delay, then does what
the next run would do: recover the directory, load the checkpoint with Keras
(or keepbest), and check that it holds the last save the child reported
complete, or the one it was writing (complete), and that its manifest
verifies. Two children run at a time (two directories) to use both cores.

``KEEPBEST_KILLS`` sets the kills per format (default 17: 68 over the four formats);
``KEEPBEST_KILL_SEED`` replays a run (the seed is in every failure message).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest

import keepbest.keras
from keepbest.checkpoint import find_checkpoints
from keepbest.storage import LocalStore

from .kill_child import build_model

CHILD = Path(__file__).with_name("kill_child.py")
KILLS = int(os.environ.get("KEEPBEST_KILLS", "17"))
SEED = int(os.environ.get("KEEPBEST_KILL_SEED", str(random.SystemRandom().randrange(10**6))))
READY_TIMEOUT = 120.0


@dataclass
class Trial:
    begun: list[int]
    ended: list[int]

    @property
    def killed_mid_save(self) -> bool:
        return bool(self.begun) and (not self.ended or self.begun[-1] != self.ended[-1])


def _run_and_kill(filepath: Path, log: Path, base: int, delay: float) -> Trial:
    log.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHILD.parent), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(CHILD), str(filepath), str(log), str(base)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + READY_TIMEOUT
    while "ready" not in log.read_text():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"kill child did not start: {child.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    lines = log.read_text().split()
    begun = [int(lines[i + 1]) for i, w in enumerate(lines) if w == "begin"]
    ended = [int(lines[i + 1]) for i, w in enumerate(lines) if w == "end"]
    return Trial(begun, ended)


def _held_save(model: keras.Model, filepath: Path) -> int:
    """Loads the checkpoint as a user would; returns the save number its weights encode."""
    if filepath.suffix == ".keras":
        model = keras.models.load_model(filepath)
    else:
        keepbest.keras.load_weights(model, filepath)
    values = np.unique(np.concatenate([np.ravel(keras.ops.convert_to_numpy(v.value)) for v in model.weights]))
    assert len(values) == 1, f"{filepath} holds a mix of saves: {values[:5]}"
    return int(values[0])


@pytest.mark.slow
@pytest.mark.parametrize("filename", ["best.keras", "best.weights.h5", "best.h5", "best_ckpt"])
def test_sigkill_during_saves_never_loses_the_previous_best(tmp_path, filename):
    rng = random.Random(f"{SEED}-{filename}")
    model = build_model()
    chains = [tmp_path / "a", tmp_path / "b"]
    committed: dict[Path, int | None] = {c: None for c in chains}
    trials = mid_save = 0
    with ThreadPoolExecutor(len(chains)) as pool:
        for round_ in range(0, KILLS, len(chains)):
            todo = chains[: min(len(chains), KILLS - round_)]
            futures = {}
            for j, chain in enumerate(todo):
                chain.mkdir(exist_ok=True)
                base = (round_ + j + 1) * 10_000  # every save of a later trial is a better "val_loss"
                futures[chain] = pool.submit(_run_and_kill, chain / filename, chain / f"log{round_}",
                                             base, rng.uniform(0.05, 1.5))
            for chain, future in futures.items():
                trial = future.result()
                trials += 1
                mid_save += trial.killed_mid_save
                where = f"(seed {SEED}, {filename}, trial {trials}, last begun {trial.begun[-1:]}, " \
                        f"last ended {trial.ended[-1:]}, committed before {committed[chain]})"
                if trial.ended:
                    committed[chain] = trial.ended[-1]
                store = LocalStore(chain)
                store.recover()  # what the next run does when it starts
                assert store.orphans() == [], where
                if committed[chain] is None and not (chain / filename).exists():
                    continue  # killed before the first save completed: nothing to lose yet
                held = _held_save(model, chain / filename)
                allowed = {committed[chain], *trial.begun[-1:]}
                assert held in allowed, f"checkpoint holds save {held}, expected one of {allowed} {where}"
                assert committed[chain] is None or held >= committed[chain], f"previous best lost {where}"
                (ckpt,) = find_checkpoints(chain / filename)[1]
                store.verify(ckpt.manifest)
                assert ckpt.metrics["val_loss"] == pytest.approx(1.0 / (held + 1)), where
                committed[chain] = held
    print(f"{filename}: {trials} kills, {mid_save} inside a save, seed {SEED}")
    assert trials == KILLS
    # The test means something only if kills land inside saves, not between them.
    assert mid_save >= KILLS // 2, f"only {mid_save} of {trials} kills landed inside a save (seed {SEED})"
