"""A Lightning fit with the DDP strategy on 2 CPU processes (Lightning launches the second one by running this
script again) and keepbest.lightning.ModelCheckpoint(save_top_k=2, save_last=True).

    python ddp_child.py CKPT_DIR OUT

Each process writes ``OUT-<rank>.json`` with the SHA-256 of its final weights.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings

import lightning.pytorch as pl

from keepbest.lightning import ModelCheckpoint
from tests.lightning.lit import Digits, loaders

warnings.filterwarnings("ignore")


def main() -> None:
    folder, out = sys.argv[1], sys.argv[2]
    pl.seed_everything(0, verbose=False)
    model = Digits()
    cb = ModelCheckpoint(dirpath=folder, monitor="val_loss", save_top_k=2, save_last=True)
    trainer = pl.Trainer(max_epochs=4, strategy="ddp", accelerator="cpu", devices=2, callbacks=[cb], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=folder)
    trainer.fit(model, *loaders())
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    with open(f"{out}-{trainer.global_rank}.json", "w") as f:
        json.dump({"weights": digest, "best": cb.best_model_path, "saves": trainer.global_step}, f)


if __name__ == "__main__":
    main()
