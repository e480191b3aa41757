"""A training process for the SIGKILL tests: it saves a new best, back to back, until killed.

    python kill_child.py FILEPATH LOG BASE

Save number ``k`` (``BASE, BASE+1, ...``) sets every weight to ``k`` and reports
``val_loss = 1/(k+1)``, so each save is a new best and the file on disk tells
which save it holds. The log gets ``begin k`` before and ``end k`` after each
save (line-buffered writes survive SIGKILL).
"""

from __future__ import annotations

import itertools
import sys

import keras
import numpy as np

from keepbest.keras import ModelCheckpoint


def build_model() -> keras.Model:
    model = keras.Sequential([keras.Input((256,)), keras.layers.Dense(1024), keras.layers.Dense(64)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)  # the files carry Adam's slots too (~4 MB)
    return model


def main() -> None:
    filepath, log_path, base = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = build_model()
    # "..._async_ckpt": a keepbest folder saved by the background writer; its "end" is logged when the
    # save is committed (wait), so a kill can land while the training thread has moved on.
    async_save = filepath.endswith("_async_ckpt")
    cb = ModelCheckpoint(filepath, monitor="val_loss", mode="min", save_best_only=True,
                         save_weights_only=filepath.endswith(".weights.h5"), async_save=async_save)
    cb.set_model(model)
    cb.on_train_begin()
    with open(log_path, "a", buffering=1) as log:
        log.write("ready\n")
        for i in itertools.count():
            k = base + i
            for v in model.weights:
                v.assign(np.full(v.shape, k, dtype=v.dtype))
            log.write(f"begin {k}\n")
            cb.on_epoch_end(i, {"loss": 1.0, "val_loss": 1.0 / (k + 1)})
            if async_save:
                cb.wait()
            log.write(f"end {k}\n")


if __name__ == "__main__":
    main()
