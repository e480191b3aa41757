#!/usr/bin/env python3
"""Runs the SIGKILL harness for a long count and prints what it found.

    python3 scripts/kill_soak.py [--kills 200] [--resume-trials 20] [--seed N] [--backend jax]
    python3 scripts/kill_soak.py --torch [--resume-trials 20] [--seed N]

Each kill is a real training process SIGKILLed at a random moment while it
saves new bests back to back (``tests/keras/kill_harness.py``); the kills are
spread over every format (.keras, .weights.h5, .h5, keepbest folder, keepbest
folder with async saves). Prints, per format and in total: trials, kills
that landed inside a save, previous-best lost, corrupt accepted, orphans
left. Then ``--resume-trials`` times, a training run under BackupAndRestore is
SIGKILLed twice at random moments and resumed to the end
(``tests/keras/resume_harness.py``): prints how many ended with other
weights than an uninterrupted run (inexact resumes). Exit status 1 if
any of these counts is not zero. With ``--torch``, the trials are a plain PyTorch loop
under ``keepbest.torch.Checkpointer`` (``tests/torch/train_child.py``: AdamW, a
scheduler, dropout, a shuffled DataLoader, async saves every 3 steps), each
SIGKILLed twice and resumed with ``restore``; an inexact resume is one whose
per-step losses differ from the uninterrupted run's by more than 1e-6 or whose
final weights differ by a bit. Run it from the
set-up environment (``python3 scripts/dev.py setup`` then ``.venv/bin/python``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from keepbest.progress import bar  # noqa: E402  (after the path to the sources in this checkout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=200, help="total kills, spread over the formats (default 200)")
    p.add_argument("--resume-trials", type=int, default=20,
                   help="kill-and-resume trials of BackupAndRestore (default 20)")
    p.add_argument("--seed", type=int, default=random.SystemRandom().randrange(10**6))
    p.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    p.add_argument("--torch", action="store_true", help="kill-and-resume trials of a plain torch loop only")
    a = p.parse_args()
    if a.torch:
        return torch_trials(a.resume_trials, a.seed)
    os.environ["KERAS_BACKEND"] = a.backend
    os.environ.setdefault("KERAS_HOME", str(ROOT / ".keras_home"))
    sys.path.insert(0, str(ROOT))
    from tests.keras.kill_child import build_model
    from tests.keras.kill_harness import FORMATS, run
    from tests.keras.resume_harness import final_weights, kill_then_resume, run_child

    per_format = [a.kills // len(FORMATS) + (i < a.kills % len(FORMATS)) for i in range(len(FORMATS))]
    print(f"kill soak: {a.kills} kills over {len(FORMATS)} formats, backend {a.backend}, seed {a.seed}", flush=True)
    model = build_model()
    totals = dict(trials=0, mid_save=0, lost=0, corrupt_accepted=0, orphans=0)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="keepbest-soak-") as tmp, \
            bar("kill soak", a.kills + a.resume_trials, unit="trials") as progress:
        for filename, kills in zip(FORMATS, per_format):
            summary = run(filename, kills, a.seed, Path(tmp) / filename.replace(".", "_"), model,
                          on_trial=progress.advance)
            print(summary.line(), flush=True)
            for problem in summary.problems:
                print(f"  {problem}", flush=True)
            for key in totals:
                totals[key] += getattr(summary, key)
        inexact = 0
        if a.resume_trials:
            reference = Path(tmp) / "uninterrupted"
            reference.mkdir()
            run_child(str(reference / "backup"), str(reference / "log"))
            expected = final_weights(reference / "log")
            rng = random.Random(f"{a.seed}-resume")
            for trial in range(a.resume_trials):
                folder = Path(tmp) / f"resume{trial}"
                folder.mkdir()
                result = kill_then_resume(folder, rng)
                progress.advance()
                if result.weights != expected:
                    inexact += 1
                    print(f"  inexact resume: trial {trial + 1}, killed after steps {result.reached}, resumed "
                          f"at step {result.resumed_at}", flush=True)
            print(f"BackupAndRestore: resume trials {a.resume_trials} (2 kills each), inexact resumes {inexact}",
                  flush=True)
    print(f"total: trials {totals['trials']}, killed inside a save {totals['mid_save']}, previous-best lost "
          f"{totals['lost']}, corrupt accepted {totals['corrupt_accepted']}, orphans left {totals['orphans']} "
          f"(seed {a.seed}, {time.monotonic() - started:.0f} s)")
    return 1 if totals["lost"] or totals["corrupt_accepted"] or totals["orphans"] or inexact else 0


def torch_trials(trials: int, seed: int) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.keras.resume_harness import final_weights, kill_then_resume, run_child, steps
    from tests.torch.test_resume import CHILD

    print(f"kill soak (torch): {trials} kill-and-resume trials of a plain torch loop, seed {seed}", flush=True)
    started, inexact = time.monotonic(), 0
    with tempfile.TemporaryDirectory(prefix="keepbest-soak-torch-") as tmp, \
            bar("kill soak (torch)", trials, unit="trials") as progress:
        reference = Path(tmp) / "uninterrupted"
        reference.mkdir()
        run_child(str(reference / "ckpt"), str(reference / "log"), child=CHILD)
        expected, losses = final_weights(reference / "log"), steps(reference / "log")
        rng = random.Random(f"{seed}-torch")
        for trial in range(trials):
            folder = Path(tmp) / f"trial{trial}"
            folder.mkdir()
            result = kill_then_resume(folder, rng, child_script=CHILD)
            progress.advance()
            resumed = steps(folder / "final")
            worst = max(abs(resumed[s]["loss"] - losses[s]["loss"]) for s in resumed)
            if result.weights != expected or worst > 1e-6 or result.resumed_at == 0:
                inexact += 1
                print(f"  inexact resume: trial {trial + 1}, killed after steps {result.reached}, resumed at step "
                      f"{result.resumed_at}, largest loss difference {worst:.2e}", flush=True)
    print(f"torch: resume trials {trials} (2 kills each), inexact resumes {inexact} "
          f"(seed {seed}, {time.monotonic() - started:.0f} s)", flush=True)
    return 1 if inexact else 0


if __name__ == "__main__":
    sys.exit(main())
