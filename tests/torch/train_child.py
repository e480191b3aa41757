"""A plain PyTorch training loop under keepbest.torch.Checkpointer, for the exact-resume and kill tests.

    python train_child.py CKPT_DIR LOG [--save-freq N] [--slow S] [--sync] [--kill-at-step S]

Trains an MLP with Dropout on 640 shuffled digits (5 epochs of 20 batches of
32) with AdamW and a StepLR scheduler; the DataLoader shuffles with its own
generator, seeded per epoch, and a resumed run skips the batches of the epoch
it already trained. Every ``--save-freq`` steps it saves ``model``,
``optimizer`` and ``scheduler`` (in the background, unless ``--sync``). The
log has the lines the kill harness reads (``tests/keras/resume_harness.py``):
``{"start": S}`` (the step restored, else 0), one ``{"step", "loss",
"batch_id"}`` per trained step and ``{"done", "weights"}`` at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import signal
import time

import numpy as np
import torch
from sklearn.datasets import load_digits

from keepbest.torch import Checkpointer

SAMPLES, BATCH, EPOCHS = 640, 32, 5


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("ckpt_dir")
    p.add_argument("log")
    p.add_argument("--save-freq", type=int, default=5)
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--sync", action="store_true")
    p.add_argument("--kill-at-step", type=int, default=None)
    a = p.parse_args()
    torch.set_num_threads(1)  # the same arithmetic order in every run
    torch.manual_seed(0)
    np.random.seed(0)
    x, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(torch.tensor(x[:SAMPLES] / 16.0, dtype=torch.float32),
                                          torch.tensor(y[:SAMPLES]), torch.arange(SAMPLES))
    shuffle = torch.Generator()
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, generator=shuffle)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(0.3),
                                torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=30, gamma=0.5)
    app_state = {"model": model, "optimizer": opt, "scheduler": sched}
    ckpt = Checkpointer(a.ckpt_dir, keep_last=2, async_save=not a.sync)
    restored = ckpt.restore(app_state)
    start = restored.step if restored is not None else 0
    log = open(a.log, "a", buffering=1)
    log.write(json.dumps({"start": start}) + "\n")
    per_epoch = SAMPLES // BATCH
    step = start
    for epoch in range(start // per_epoch, EPOCHS):
        shuffle.manual_seed(1000 + epoch)
        batches = itertools.islice(loader, step - epoch * per_epoch, None)  # a resumed epoch: skip what was trained
        for xb, yb, ids in batches:
            model.train()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            log.write(json.dumps({"step": step, "loss": loss.item(),
                                  "batch_id": int(((ids + 1) ** 2).sum())}) + "\n")
            if step % a.save_freq == 0:
                ckpt.save(step, app_state, metrics={"loss": loss.item()}, epoch=epoch)
            if a.kill_at_step == step:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(a.slow)
    ckpt.close()
    digest = hashlib.sha256(b"".join(t.detach().numpy().tobytes() for t in model.state_dict().values()))
    log.write(json.dumps({"done": step, "weights": digest.hexdigest()}) + "\n")


if __name__ == "__main__":
    main()
