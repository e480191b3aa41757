"""keepbest with Lightning: top-k checkpoints that survive a restart, and an exact resume.

    .venv/bin/python examples/lightning_demo.py [--dir lightning_checkpoints] [--epochs 8]

A LightningModule on the digits trains with ``keepbest.lightning.ModelCheckpoint(monitor="val_loss",
save_top_k=3, save_last=True)``: the same arguments and file names as Lightning's, but each checkpoint
is a folder of safetensors and JSON committed atomically. The job stops half-way, then
``trainer.fit(ckpt_path="last")`` resumes it: the top 3 come back from the committed manifests, the
random generators from the checkpoint, and the per-step losses equal an uninterrupted run's (checked).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits

from keepbest.discovery import list_checkpoints
from keepbest.lightning import ModelCheckpoint
from keepbest.listing import table


class Digits(pl.LightningModule):
    def __init__(self, log: str) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(64, 10))
        self.log_file = log

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        with open(self.log_file, "a") as f:
            f.write(json.dumps({"step": self.global_step, "loss": loss.item()}) + "\n")
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    train = torch.utils.data.TensorDataset(x[:1280], y[:1280])
    val = torch.utils.data.TensorDataset(x[-400:], y[-400:])
    return (torch.utils.data.DataLoader(train, batch_size=64, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=200))


def fit(folder: str, log: str, epochs: int, ckpt_path: str | None = None) -> ModelCheckpoint:
    pl.seed_everything(0, verbose=False)
    cb = ModelCheckpoint(dirpath=folder, monitor="val_loss", save_top_k=3, save_last=True)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=folder)
    trainer.fit(Digits(log), *loaders(), ckpt_path=ckpt_path)
    return cb


def losses(log: str) -> dict[int, float]:
    with open(log) as f:
        return {d["step"]: d["loss"] for d in map(json.loads, f)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="lightning_checkpoints")
    p.add_argument("--epochs", type=int, default=8)
    a = p.parse_args()
    reference = a.dir + "-uninterrupted"
    for path in (a.dir, reference):
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(path + ".log"):
            os.remove(path + ".log")
    print("--- An uninterrupted run, for comparison ---", flush=True)
    fit(reference, reference + ".log", a.epochs)
    half = a.epochs // 2
    print(f"\n--- The same job, stopped after {half} epochs ---", flush=True)
    fit(a.dir, a.dir + ".log", half)
    print(f"\n--- It starts again with trainer.fit(ckpt_path='last') and runs to {a.epochs} epochs ---", flush=True)
    cb = fit(a.dir, a.dir + ".log", a.epochs, ckpt_path="last")
    full, resumed = losses(reference + ".log"), losses(a.dir + ".log")
    worst = max(abs(resumed[s] - full[s]) for s in resumed)
    print(f"\nPer-step losses, resumed against uninterrupted: largest difference {worst:.1e} over {len(resumed)} steps")
    assert worst <= 1e-6, worst
    print(f"Top 3 by val_loss: {', '.join(os.path.basename(p) for p in sorted(cb.best_k_models))}; "
          f"best {os.path.basename(cb.best_model_path)} ({float(cb.best_model_score):.4f})")
    print(f"\nCheckpoints in {a.dir} (the table of `keepbest ls {a.dir}`):\n")
    print(table(list_checkpoints(a.dir)))


if __name__ == "__main__":
    main()
