"""The two processes of the sidecar tests: a trainer and an evaluator, each logging JSON lines.

    python sidecar_procs.py train DIR LOG --epochs 6 --epoch-seconds 0.5 --keep-last 2
    python sidecar_procs.py evaluate DIR LOG --mode every --eval-seconds 2 [--export TEMPLATE]

Also the ``--model``/``--data`` factories of the ``keepbest sidecar`` CLI test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import keras
import numpy as np
from sklearn.datasets import load_digits

import keepbest.keras
from keepbest.discovery import list_checkpoints
from keepbest.evaluation import commit_id

FILEPATH = "ckpt-{epoch:04d}"


def make_model() -> keras.Model:
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def eval_data() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.data[:300] / 16.0).astype("float32"), d.target[:300].astype("int32")


def train_data() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    return (d.data[300:] / 16.0).astype("float32"), d.target[300:].astype("int32")


def weights_digest(model: keras.Model) -> str:
    h = hashlib.blake2b(digest_size=16)
    for v in model.weights:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(v.value)).tobytes())
    return h.hexdigest()


class Log:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", buffering=1)

    def __call__(self, **event: object) -> None:
        self.file.write(json.dumps({"t": time.time(), **event}) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class _Pace(keras.callbacks.Callback):
    """Makes each training epoch (or each evaluation) last about ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.monotonic()

    def on_test_begin(self, logs: dict | None = None) -> None:
        self.started = time.monotonic()

    def _sleep(self) -> None:
        time.sleep(max(0.0, self.seconds - (time.monotonic() - self.started)))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._sleep()

    def on_test_end(self, logs: dict | None = None) -> None:
        self._sleep()


class _LogCommits(keras.callbacks.Callback):
    """After ModelCheckpoint's epoch end: logs the checkpoint it committed."""

    def __init__(self, directory: str, log: Log) -> None:
        super().__init__()
        self.directory, self.log = directory, log

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        mine = [c for c in list_checkpoints(self.directory) if c.epoch == epoch + 1]
        self.log(event="commit", epoch=epoch + 1, id=commit_id(mine[-1].manifest), digest=weights_digest(self.model))


def train(args: argparse.Namespace) -> None:
    _fit(args.dir, Log(args.log), args.epochs, args.epoch_seconds, args.keep_last)


def train_here(directory: str, log_path: str, epochs: int, epoch_seconds: float, keep_last: int,
               before_save: list[keras.callbacks.Callback] | None = None) -> None:
    """The trainer's work in the calling process (a test's, which has Keras loaded already); closes its log.
    ``before_save``: callbacks placed before the ModelCheckpoint."""
    log = Log(log_path)
    try:
        _fit(directory, log, epochs, epoch_seconds, keep_last, before_save or [])
    finally:
        log.file.close()


def _fit(directory: str, log: Log, epochs: int, epoch_seconds: float, keep_last: int,
         before_save: list[keras.callbacks.Callback] | None = None) -> None:
    model = make_model()
    x, y = train_data()
    checkpoint = keepbest.keras.ModelCheckpoint(os.path.join(directory, FILEPATH), save_weights_only=True,
                                                keep_last=keep_last)
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0,
              callbacks=[_Pace(epoch_seconds), *(before_save or []), checkpoint, _LogCommits(directory, log)])
    log(event="fit_returned")


class _LogEvaluation(keras.callbacks.Callback):
    """At the end of each evaluation: what was evaluated, and the newest epoch training has committed."""

    def __init__(self, evaluator: "keepbest.keras.SidecarEvaluator", log: Log) -> None:
        super().__init__()
        self.evaluator, self.log = evaluator, log

    def on_test_end(self, logs: dict | None = None) -> None:
        ckpt = self.evaluator.follower.store.list().manifests
        evaluating = self.evaluator.follower.state.evaluating
        self.log(event="evaluated", id=evaluating, digest=weights_digest(self.model),
                 newest_epoch=max((m.epoch or 0) for m in ckpt), loss=float(logs["loss"]))


def evaluate(args: argparse.Namespace) -> None:
    log = Log(args.log)
    log(event="start")
    callbacks: list[keras.callbacks.Callback] = [_Pace(args.eval_seconds)]
    if args.export:
        callbacks.append(keepbest.keras.SidecarEvaluatorModelExport(
            args.export, os.path.join(args.dir, FILEPATH), monitor="loss", save_weights_only=True))
    evaluator = keepbest.keras.SidecarEvaluator(make_model(), eval_data(), args.dir, mode=args.mode,
                                                max_evaluations=args.max_evaluations, callbacks=callbacks)
    evaluator.callbacks.insert(1, _LogEvaluation(evaluator, log))
    evaluator.start()
    log(event="exit", reason=evaluator.stop_reason, evaluations=evaluator.follower.state.evaluations)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("train", "evaluate"))
    parser.add_argument("dir")
    parser.add_argument("log")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--epoch-seconds", type=float, default=0.5)
    parser.add_argument("--keep-last", type=int, default=2)
    parser.add_argument("--mode", default="every")
    parser.add_argument("--eval-seconds", type=float, default=2.0)
    parser.add_argument("--max-evaluations", type=int)
    parser.add_argument("--export")
    args = parser.parse_args(argv)
    (train if args.role == "train" else evaluate)(args)


if __name__ == "__main__":
    main(sys.argv[1:])
