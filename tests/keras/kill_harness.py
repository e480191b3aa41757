"""The SIGKILL harness, shared by ``test_kill.py`` (a short run) and ``scripts/kill_soak.py`` (a long one).

Each trial starts a real training child (``kill_child.py``) that saves a new
best back to back, kills it with SIGKILL after a random delay, then does what
the next run would do: recover the directory, load the checkpoint with Keras
(or keepbest), and check it. Two children run at a time (two directories) to
use both cores. Every outcome is counted, not asserted, so a long run reports
all of them:

- ``lost``: the checkpoint holds an older save than the last one the child
  reported complete (the previous best was lost), or none at all;
- ``corrupt_accepted``: a checkpoint that loaded but holds a mix of saves, or
  whose manifest does not verify, or whose recorded metric is not its own;
- ``orphans``: temporary entries left after the next start's recovery.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np

import keepbest.keras
from keepbest.discovery import list_checkpoints
from keepbest.errors import KeepbestError
from keepbest.store import LocalStore
from tests.helpers import spawn

CHILD = Path(__file__).with_name("kill_child.py")
READY_TIMEOUT = 120.0
FORMATS = ("best.keras", "best.weights.h5", "best.h5", "best_ckpt", "best_async_ckpt")


@dataclass
class Trial:
    begun: list[int]
    ended: list[int]

    @property
    def killed_mid_save(self) -> bool:
        return bool(self.begun) and (not self.ended or self.begun[-1] != self.ended[-1])


@dataclass
class Summary:
    filename: str
    seed: int
    trials: int = 0
    mid_save: int = 0
    lost: int = 0
    corrupt_accepted: int = 0
    orphans: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.filename}: trials {self.trials}, killed inside a save {self.mid_save}, previous-best lost "
                f"{self.lost}, corrupt accepted {self.corrupt_accepted}, orphans left {self.orphans} "
                f"(seed {self.seed})")


def run_and_kill(filepath: Path, log: Path, base: int, delay: float) -> Trial:
    log.write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHILD.parent), os.environ.get("PYTHONPATH", "")])}
    child = spawn([sys.executable, str(CHILD), str(filepath), str(log), str(base)],
                  ready=lambda: "ready" in log.read_text(), timeout=READY_TIMEOUT, what="the kill child", env=env,
                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()  # type: ignore[union-attr]
    lines = log.read_text().split()
    begun = [int(lines[i + 1]) for i, w in enumerate(lines) if w == "begin"]
    ended = [int(lines[i + 1]) for i, w in enumerate(lines) if w == "end"]
    return Trial(begun, ended)


def held_save(model: keras.Model, filepath: Path) -> int | None:
    """Loads the checkpoint as a user would; the save number its weights encode, None for a mix."""
    if filepath.suffix == ".keras":
        model = keras.models.load_model(filepath)
    else:
        keepbest.keras.load_weights(model, filepath)
    values = np.unique(np.concatenate([np.ravel(keras.ops.convert_to_numpy(v.value)) for v in model.weights]))
    return int(values[0]) if len(values) == 1 else None


def run(filename: str, kills: int, seed: int, workdir: Path, model: keras.Model,
        on_trial: Callable[[], None] | None = None) -> Summary:
    """``kills`` trials of one format, two chains at a time; ``on_trial()`` after each (a progress bar)."""
    rng = random.Random(f"{seed}-{filename}")
    summary = Summary(filename, seed)
    chains = [workdir / "a", workdir / "b"]
    committed: dict[Path, int | None] = {c: None for c in chains}
    with ThreadPoolExecutor(len(chains)) as pool:
        for round_ in range(0, kills, len(chains)):
            todo = chains[: min(len(chains), kills - round_)]
            futures = {}
            for j, chain in enumerate(todo):
                chain.mkdir(parents=True, exist_ok=True)
                base = (round_ + j + 1) * 10_000  # every save of a later trial is a better "val_loss"
                futures[chain] = pool.submit(run_and_kill, chain / filename, chain / f"log{round_}",
                                             base, rng.uniform(0.05, 1.5))
            for chain, future in futures.items():
                trial = future.result()
                summary.trials += 1
                summary.mid_save += trial.killed_mid_save
                where = (f"trial {summary.trials}, last begun {trial.begun[-1:]}, last ended {trial.ended[-1:]}, "
                         f"committed before {committed[chain]}")
                if trial.ended:
                    committed[chain] = trial.ended[-1]
                _check(summary, chain, filename, trial, committed, model, where)
                if on_trial is not None:
                    on_trial()
    return summary


def _check(summary: Summary, chain: Path, filename: str, trial: Trial, committed: dict[Path, int | None],
           model: keras.Model, where: str) -> None:
    store = LocalStore(chain)
    store.recover()  # what the next run does when it starts
    orphans = store.orphans()
    left = orphans.dead + orphans.undecided
    if left:
        summary.orphans += len(left)
        summary.problems.append(f"orphans {left} ({where})")
    if committed[chain] is None and not (chain / filename).exists():
        return  # killed before the first save completed: nothing to lose yet
    try:
        held = held_save(model, chain / filename)
        (ckpt,) = list_checkpoints(chain / filename)
        store.verify(ckpt.manifest)
    except (KeepbestError, OSError, ValueError) as e:  # refused, not accepted: but the previous best is gone
        summary.lost += 1
        summary.problems.append(f"no loadable checkpoint: {e} ({where})")
        return
    allowed = {committed[chain], *trial.begun[-1:]}
    if held is None or held not in allowed or ckpt.metrics.get("val_loss") != 1.0 / (held + 1):
        summary.corrupt_accepted += 1
        summary.problems.append(f"loaded save {held}, metric {ckpt.metrics.get('val_loss')}, expected one of "
                                f"{allowed} ({where})")
    elif committed[chain] is not None and held < committed[chain]:
        summary.lost += 1
        summary.problems.append(f"previous best lost: holds {held} ({where})")
    committed[chain] = held if held is not None else committed[chain]
