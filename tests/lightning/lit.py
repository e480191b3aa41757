"""A small LightningModule on the digits, logging ``train_loss`` per step and ``val_loss`` per epoch."""

from __future__ import annotations

import json

import torch
from sklearn.datasets import load_digits

import lightning.pytorch as pl


class Digits(pl.LightningModule):
    def __init__(self, losses: str | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(32, 10))
        self.losses = losses  # a file that gets one JSON line per training step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        if self.losses:
            with open(self.losses, "a") as f:
                f.write(json.dumps({"step": self.global_step, "loss": loss.item()}) + "\n")
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)}


def loaders(batch: int = 64):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    train = torch.utils.data.TensorDataset(x[:640], y[:640])
    val = torch.utils.data.TensorDataset(x[640:960], y[640:960])
    return (torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=256))


def trainer(root, callbacks=(), plugins=(), max_epochs: int = 10, **kwargs) -> pl.Trainer:
    return pl.Trainer(default_root_dir=str(root), max_epochs=max_epochs, callbacks=list(callbacks),
                      plugins=list(plugins), logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, accelerator="cpu", devices=1, deterministic=True, **kwargs)
