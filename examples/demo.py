"""The seed tutorial ("Utiliser un callback ModelCheckpoint"), real and offline, with a sidecar evaluator.

The tutorial's subclassed model (Conv2D, Flatten, Dense, Dense) is trained on
scikit-learn's bundled 8x8 digits (MNIST needs a download) with
``validation_split=0.2``; the last 297 digits are held out as a test set.
keepbest's ``ModelCheckpoint`` keeps the best checkpoint by ``val_loss`` and
the last two. Beside training, a second process (``keepbest sidecar``)
evaluates every checkpoint on the test set as it is committed, records the
metrics beside it, and exports the best by test loss. The job is then
restarted from scratch on the same folder (a fresh model): keepbest resumes
from the recorded best, so the restart's worse epochs never replace it, and a
restarted sidecar evaluates only the new checkpoints. The demo prints what is
on disk (training and test metrics side by side), reloads the best model and
writes the run's report (``keepbest report``): one offline HTML page with its plots.

    python3 scripts/dev.py demo            # from the repository root
    python examples/demo.py [--epochs N] [--dir PATH] [--resume]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import keepbest.keras  # noqa: E402
from keepbest.listing import compact  # noqa: E402
from keepbest.report import write_report  # noqa: E402
from keepbest.discovery import list_checkpoints  # noqa: E402


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


TEST_SIZE = 297


def build_model() -> keras.Model:
    """The tutorial's model, compiled (also the sidecar's ``--model`` factory)."""
    model = SimpleModel()
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model(np.zeros((1, 8, 8, 1), "float32"))  # a subclassed model creates its weights on its first call
    return model


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1), like MNIST / 255
    y = digits.target.astype("int32")
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], y[order]


def test_data() -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits (the sidecar's ``--data`` factory)."""
    x, y = digits_data()
    return x[-TEST_SIZE:], y[-TEST_SIZE:]


def start_sidecar(directory: str) -> subprocess.Popen[bytes]:
    """``keepbest sidecar`` in a process of its own, following ``directory``."""
    here = os.path.abspath(__file__)
    return subprocess.Popen([
        sys.executable, "-m", "keepbest.cli", "sidecar", directory,
        "--model", f"{here}:build_model", "--data", f"{here}:test_data",
        "--series", "epoch{epoch:02d}.keras",
        "--export", os.path.join(directory, "best_eval", "best-{epoch:02d}.keras"), "--monitor", "loss",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--dir", default="demo_checkpoints")
    parser.add_argument("--resume", action="store_true", help="keep the folder: continue from its recorded best")
    args = parser.parse_args()
    if not args.resume:
        shutil.rmtree(args.dir, ignore_errors=True)

    keras.utils.set_random_seed(0)
    x, y = digits_data()
    x, y = x[:-TEST_SIZE], y[:-TEST_SIZE]

    def train(epochs: int) -> None:
        model = build_model()
        checkpoint = keepbest.keras.ModelCheckpoint(
            filepath=os.path.join(args.dir, "epoch{epoch:02d}.keras"),
            save_best_only=False, monitor="val_loss", mode="min", verbose=1,
            keep_last=2, keep_best=1,
        )
        model.fit(x, y, epochs=epochs, batch_size=32, validation_split=0.2, callbacks=[checkpoint], verbose=2)

    print("--- Training, with `keepbest sidecar` evaluating each checkpoint in a second process ---", flush=True)
    sidecar = start_sidecar(args.dir)
    train(args.epochs)
    if sidecar.wait() != 0:
        raise SystemExit(f"the sidecar failed (exit code {sidecar.returncode})")

    print("\n--- The job restarts from scratch (a fresh model, the same folder): the recorded best is kept ---")
    train(2)
    print("\n--- The sidecar runs again: it evaluates only the checkpoints it has not seen ---", flush=True)
    if start_sidecar(args.dir).wait() != 0:
        raise SystemExit("the restarted sidecar failed")

    ckpts = list_checkpoints(args.dir)
    print(f"\nCheckpoints on disk in {args.dir} (the same table as `keepbest ls {args.dir}`; "
          f"`keepbest ls --wide {args.dir}` adds every metric and the sidecar's test-set metrics):\n")
    print(compact(ckpts))
    exported = [c for c in list_checkpoints(os.path.join(args.dir, "best_eval")) if c.is_best][-1]
    source = exported.manifest.extra["evaluated_checkpoint"]["name"]
    print(f"\nThe sidecar exported {exported.path} as the best by test loss "
          f"({exported.metrics['loss']:.4f}): the evaluation of {source}, epoch {exported.epoch}.")

    best = next(c for c in ckpts if c.is_best)
    restored = keepbest.keras.load_model(best.path)
    split = int(len(x) * 0.8)  # validation_split takes the last 20 %
    _loss, val_acc = restored.evaluate(x[split:], y[split:], verbose=0)
    print(f"\nReloaded the best checkpoint {best.name} (epoch {best.epoch}): "
          f"validation accuracy {val_acc:.4f} (recorded at save time: {best.metrics['val_accuracy']:.4f})")

    page = os.path.abspath(args.dir).rstrip(os.sep) + "-report.html"
    written, _data = write_report(args.dir, page)  # what `keepbest report DIR -o PAGE` does
    print(f"\nThe run at a glance (`keepbest report {args.dir} -o {page}`), one offline HTML page: {written}")


if __name__ == "__main__":
    main()
