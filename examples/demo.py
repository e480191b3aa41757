"""The seed tutorial ("Utiliser un callback ModelCheckpoint"), real and offline.

The tutorial's subclassed model (Conv2D, Flatten, Dense, Dense) is trained on
scikit-learn's bundled 8x8 digits (MNIST needs a download) with
``validation_split=0.2``. keepbest's ``ModelCheckpoint`` keeps the best
checkpoint by ``val_loss`` and the last two. The job is then restarted from
scratch on the same folder (a fresh model): keepbest resumes from the
recorded best, so the restart's worse epochs never replace it, and retention
keeps the best plus the restart's last two. The demo prints what is on disk
and reloads the best model to report its validation accuracy.

    python3 scripts/dev.py demo            # from the repository root
    python examples/demo.py [--epochs N] [--dir PATH] [--resume]
"""

from __future__ import annotations

import argparse
import os
import shutil

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keepbest.keras  # noqa: E402
from keepbest.listing import table  # noqa: E402
from keepbest.checkpoint import find_checkpoints  # noqa: E402


@keras.saving.register_keras_serializable(package="keepbest_demo")
class SimpleModel(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = layers.Conv2D(32, (3, 3), activation="relu")
        self.flatten = layers.Flatten()
        self.dense1 = layers.Dense(128, activation="relu")
        self.dense2 = layers.Dense(10)

    def call(self, inputs):
        x = self.conv1(inputs)
        x = self.flatten(x)
        x = self.dense1(x)
        return self.dense2(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--dir", default="demo_checkpoints")
    parser.add_argument("--resume", action="store_true", help="keep the folder: continue from its recorded best")
    args = parser.parse_args()
    if not args.resume:
        shutil.rmtree(args.dir, ignore_errors=True)

    keras.utils.set_random_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1), like MNIST / 255
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]

    def train(epochs: int) -> None:
        model = SimpleModel()
        model.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        checkpoint = keepbest.keras.ModelCheckpoint(
            filepath=os.path.join(args.dir, "epoch{epoch:02d}.keras"),
            save_best_only=False, monitor="val_loss", mode="min", verbose=1,
            keep_last=2, keep_best=1,
        )
        model.fit(x, y, epochs=epochs, batch_size=32, validation_split=0.2, callbacks=[checkpoint], verbose=2)

    train(args.epochs)
    print("\n--- The job restarts from scratch (a fresh model, the same folder): the recorded best is kept ---")
    train(2)

    _store, ckpts = find_checkpoints(args.dir)
    print(f"\nCheckpoints on disk in {args.dir} (the same table as `keepbest ls {args.dir}`):\n")
    print(table(ckpts))

    best = next(c for c in ckpts if c.is_best)
    restored = keepbest.keras.load_model(best.path)
    split = int(len(x) * 0.8)  # validation_split takes the last 20 %
    _loss, val_acc = restored.evaluate(x[split:], y[split:], verbose=0)
    print(f"\nReloaded the best checkpoint {best.name} (epoch {best.epoch}): "
          f"validation accuracy {val_acc:.4f} (recorded at save time: {best.metrics['val_accuracy']:.4f})")


if __name__ == "__main__":
    main()
