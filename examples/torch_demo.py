"""keepbest with plain PyTorch: a training loop that is killed, resumes exactly, and is evaluated beside it.

    .venv/bin/python examples/torch_demo.py [--dir torch_checkpoints] [--epochs 6]

1. A sidecar evaluator starts in a process of its own (``keepbest.torch.SidecarEvaluator``):
   it evaluates each checkpoint the training loop commits, on held-out digits.
2. The training loop (an MLP with dropout, AdamW, a StepLR schedule, a shuffled DataLoader)
   saves every 10 steps with ``Checkpointer(async_save=True, keep_last=2, keep_best=1)``
   and is SIGKILLed half-way, as a preempted job would be.
3. It starts again: ``restore`` puts back the model, the optimizer, the schedule and the
   random generators of the last commit, and training goes on from that step; the per-step
   losses after the resume equal those of an uninterrupted run (this script checks it).
4. The checkpoints are listed as ``keepbest ls`` lists them, with the evaluator's metrics,
   and the best is exported as a plain ``state_dict`` file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys

import torch
from sklearn.datasets import load_digits

from keepbest.discovery import list_checkpoints
from keepbest.listing import table
from keepbest.torch import Checkpointer, SidecarEvaluator, accuracy

BATCH, TRAIN, TEST = 64, 1280, 400


def build() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                               torch.nn.Linear(64, 10))


def digits(part: str) -> torch.utils.data.TensorDataset:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    rows = slice(0, TRAIN) if part == "train" else slice(-TEST, None)
    return torch.utils.data.TensorDataset(x[rows], y[rows])


def train(folder: str, epochs: int, log: str, kill_at: int | None) -> None:
    """The training loop; it appends one JSON line per step to ``log``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.5)
    shuffle = torch.Generator()
    loader = torch.utils.data.DataLoader(digits("train"), batch_size=BATCH, shuffle=True, generator=shuffle)
    app_state = {"model": model, "optimizer": opt, "scheduler": sched}
    ckpt = Checkpointer(folder, monitor="loss", keep_last=2, keep_best=1, async_save=True)
    restored = ckpt.restore(app_state)
    step = restored.step if restored else 0
    print(f"training: {'resumed at step %d' % step if restored else 'starts from scratch'}", flush=True)
    per_epoch = TRAIN // BATCH
    with open(log, "a") as out:
        for epoch in range(step // per_epoch, epochs):
            shuffle.manual_seed(epoch)  # each epoch's order is known, so a resumed epoch skips what it trained
            for i, (x, y) in enumerate(loader):
                if i < step - epoch * per_epoch:
                    continue
                model.train()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                out.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
                out.flush()
                if step % 10 == 0:
                    ckpt.save(step, app_state, metrics={"loss": loss.item()}, epoch=epoch + 1)
                if step == kill_at:
                    print(f"training: killed at step {step} (SIGKILL, as a preemption would)", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()  # the last write, then the end-of-training marker the evaluator waits for


def evaluate(folder: str) -> None:
    data = torch.utils.data.DataLoader(digits("test"), batch_size=200)
    SidecarEvaluator(build, data, folder, metrics={"accuracy": accuracy}, idle_timeout=120).start()


def losses(log: str) -> dict[int, float]:
    with open(log) as f:
        return {d["step"]: d["loss"] for d in map(json.loads, f)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="torch_checkpoints")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--role", choices=("main", "train", "evaluate"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--log", help=argparse.SUPPRESS)
    p.add_argument("--kill-at", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "train":
        return train(a.dir, a.epochs, a.log, a.kill_at)
    if a.role == "evaluate":
        return evaluate(a.dir)
    shutil.rmtree(a.dir, ignore_errors=True)
    me = [sys.executable, os.path.abspath(__file__), "--dir", a.dir, "--epochs", str(a.epochs)]
    total = a.epochs * (TRAIN // BATCH)
    reference = a.dir + "-uninterrupted"
    shutil.rmtree(reference, ignore_errors=True)
    if os.path.exists(reference + ".log"):
        os.remove(reference + ".log")
    print("--- An uninterrupted run, for comparison ---", flush=True)
    subprocess.run([*me, "--dir", reference, "--role", "train", "--log", reference + ".log"], check=True)
    print("\n--- The same run with a sidecar evaluator, killed half-way, then resumed ---", flush=True)
    evaluator = subprocess.Popen([*me, "--role", "evaluate"])
    log = a.dir + ".log"
    if os.path.exists(log):
        os.remove(log)
    killed = subprocess.run([*me, "--role", "train", "--log", log, "--kill-at", str(total // 2 + 3)])
    assert killed.returncode == -signal.SIGKILL
    subprocess.run([*me, "--role", "train", "--log", log], check=True)
    if evaluator.wait() != 0:
        raise SystemExit(f"the evaluator failed (exit code {evaluator.returncode})")
    full, resumed = losses(reference + ".log"), losses(log)
    worst = max(abs(resumed[s] - full[s]) for s in resumed)
    print(f"\nPer-step losses of the killed-and-resumed run against the uninterrupted one: largest difference "
          f"{worst:.1e} over {len(resumed)} logged steps (steps after the last commit were trained twice).")
    assert worst <= 1e-6, worst
    print(f"\nCheckpoints in {a.dir} (the table of `keepbest ls {a.dir}`; eval: the sidecar's metrics):\n")
    print(table(list_checkpoints(a.dir)))
    out = Checkpointer(a.dir).export(os.path.join(a.dir + "-export", "best.pt"), "best")
    print(f"\nExported the best checkpoint (step {out.step}) as {out.location}: "
          "torch.load(path, weights_only=True) reads it.")


if __name__ == "__main__":
    main()
