"""keepbest.lightning on an S3 bucket (moto's server on 127.0.0.1): top k, a "last" alias, and a resume."""

from __future__ import annotations

import lightning.pytorch as pl

from keepbest import CheckpointManager
from keepbest.lightning import ModelCheckpoint
from keepbest.lightning._io import SERIES
from tests.lightning.lit import Digits, loaders, trainer


def test_top_k_and_a_last_link_on_a_bucket_then_resume_from_last(s3, tmp_path):
    url = "s3://kbest/lightning-run"
    pl.seed_everything(0, verbose=False)
    cb = ModelCheckpoint(dirpath=url, monitor="val_loss", save_top_k=2, save_last="link", filename="{epoch}")
    trainer(tmp_path, [cb], max_epochs=3).fit(Digits(), *loaders())
    mgr = CheckpointManager(url, series=SERIES)
    assert len(mgr.checkpoints()) == 2 and mgr.aliases["last.ckpt"] == mgr.aliases["latest"]
    resumed = ModelCheckpoint(dirpath=url, monitor="val_loss", save_top_k=2, save_last="link", filename="{epoch}")
    fitted = trainer(tmp_path, [resumed], max_epochs=5)
    fitted.fit(Digits(), *loaders(), ckpt_path="last")
    assert fitted.global_step == 50 and fitted.ckpt_path.endswith("epoch=2.ckpt/manifest.json")
    assert len(CheckpointManager(url, series=SERIES).checkpoints()) == 2
