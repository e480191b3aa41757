"""A training process for the exact-resume and preemption tests.

    python resume_child.py BACKUP_DIR LOG [--save-freq N|epoch] [--kill-at-step S] [--epochs E]
                           [--preemption] [--slow S]

Trains a small model with Dropout on 640 shuffled digits (20 batches of 32 per
epoch) under ``keepbest.keras.BackupAndRestore``, seeded the same way every
run. Each trained step (not the batches a resumed run skips) appends one JSON
line to LOG: ``step`` (optimizer iterations after it), ``loss`` (Keras's
running mean) and ``batch_id`` (a fingerprint of the sample indices in the
batch, from a metric). ``--kill-at-step`` SIGKILLs the process right after
that step. With ``--preemption`` the backup saves on SIGTERM; the process
writes ``ready`` to LOG after its first step and, when fit returns, a ``done``
line with the final step and a hash of the weights. Its first line, when fit
begins, is ``{"start": S}``: the step the run starts from (the backup's step
when BackupAndRestore restored one, else 0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import time

import keras
import numpy as np
from sklearn.datasets import load_digits

from keepbest.keras import BackupAndRestore

SAMPLES, BATCH = 640, 32


class BatchId(keras.metrics.Metric):
    """The sum of squares of (sample index + 1) over the latest batch: which samples it held."""

    def __init__(self, name: str = "batch_id", **kwargs):
        super().__init__(name=name, **kwargs)
        self.ids = self.add_variable(shape=(), initializer="zeros", name="ids")

    def update_state(self, y_true, y_pred, sample_weight=None):
        index = keras.ops.cast(y_true[:, 1], "float32") + 1.0
        self.ids.assign(keras.ops.sum(index * index))

    def result(self):
        return keras.ops.convert_to_tensor(self.ids)


def label_loss(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true[:, 0], y_pred, from_logits=True)


def data() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    x = (d.data[:SAMPLES] / 16.0).astype("float32")
    y = np.stack([d.target[:SAMPLES], np.arange(SAMPLES)], axis=1).astype("float32")
    return x, y


def build_model() -> keras.Model:
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dropout(0.3), keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=label_loss, metrics=[BatchId()])
    return model


def weights_hash(model: keras.Model) -> str:
    h = hashlib.sha256()
    for v in model.weights:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(v.value)).tobytes())
    return h.hexdigest()


class StepLog(keras.callbacks.Callback):
    def __init__(self, log, kill_at: int | None, slow: float):
        super().__init__()
        self.log, self.kill_at, self.slow = log, kill_at, slow
        self.last = None
        self.ready = False

    def on_train_begin(self, logs=None):  # after BackupAndRestore's (listed first) has restored a backup
        start = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.log.write(json.dumps({"start": start}) + "\n")

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step == self.last:
            return  # a batch the resumed run skipped: no training happened
        self.last = step
        self.log.write(json.dumps({"step": step, "loss": float(logs["loss"]),
                                   "batch_id": float(logs["batch_id"])}) + "\n")
        if not self.ready:
            self.ready = True
            self.log.write("ready\n")
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(self.slow)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("backup_dir")
    p.add_argument("log")
    p.add_argument("--save-freq", default="epoch")
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--preemption", action="store_true")
    p.add_argument("--slow", type=float, default=0.0)
    a = p.parse_args()
    save_freq = a.save_freq if a.save_freq == "epoch" else int(a.save_freq)
    model = build_model()
    x, y = data()
    backup = BackupAndRestore(a.backup_dir, save_freq=save_freq, save_before_preemption=a.preemption)
    with open(a.log, "a", buffering=1) as log:
        model.fit(x, y, batch_size=BATCH, epochs=a.epochs, shuffle=True, verbose=0,
                  callbacks=[backup, StepLog(log, a.kill_at_step, a.slow)])
        step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        log.write(json.dumps({"done": step, "weights": weights_hash(model)}) + "\n")


if __name__ == "__main__":
    main()
