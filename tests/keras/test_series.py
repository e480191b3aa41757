"""One series, one truth: what is listed exists, two writers never prune each other, and a damaged
alias record blocks nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

import keepbest.keras
from keepbest import CheckpointManager, KeepBest, Monitor, list_checkpoints
from keepbest.keras import ModelCheckpoint

from .conftest import make_model, user_warnings, weights_of


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "keepbest.cli", *args], capture_output=True, text=True, timeout=60)


def _fit(model, digits, callbacks, epochs=1, validation=True):
    x, y = digits
    return model.fit(x[:300], y[:300], batch_size=30, epochs=epochs, verbose=0, callbacks=callbacks,
                     validation_data=(x[300:400], y[300:400]) if validation else None)


# -- a checkpoint deleted by hand ------------------------------------------------------------------------


def test_a_hand_deleted_checkpoint_is_not_listed_verify_names_it_and_the_next_run_saves(tmp_path, digits):
    path = tmp_path / "best.keras"
    _fit(make_model(), digits, [ModelCheckpoint(str(path), save_best_only=True)], epochs=2)
    path.unlink()
    assert list_checkpoints(tmp_path) == []
    ls = _cli("ls", str(tmp_path))
    assert ls.returncode == 1 and "best.keras  DAMAGED" in ls.stdout and f"file {path} is missing" in ls.stdout
    verify = _cli("verify", str(tmp_path))
    assert verify.returncode == 1 and f"file {path} is missing" in verify.stdout
    # A new run saves as though the file had never been written (Keras's own behaviour).
    model = make_model()
    _fit(model, digits, [ModelCheckpoint(str(path), save_best_only=True)])
    (ckpt,) = list_checkpoints(tmp_path)
    assert path.is_file() and ckpt.epoch == 1
    for a, b in zip(weights_of(model), weights_of(keepbest.keras.load_model(path))):
        np.testing.assert_array_equal(a, b)


def test_gc_removes_the_stale_manifest_of_a_hand_deleted_checkpoint(tmp_path, digits):
    path = tmp_path / "best.keras"
    _fit(make_model(), digits, [ModelCheckpoint(str(path), save_best_only=True)])
    path.unlink()
    gc = _cli("gc", str(tmp_path))
    assert gc.returncode == 0 and "removed the stale manifest of best.keras" in gc.stdout
    assert _cli("ls", str(tmp_path)).stdout.strip() == "(no committed checkpoints)"


def test_keras_model_checkpoint_options_scenario_passes(tmp_path):
    """Keras's ``model_checkpoint_test.py::test_model_checkpoint_options`` cases 1 to 5, keepbest's callback."""
    rng = np.random.default_rng(42)
    x_train, x_test = rng.standard_normal((30, 3)).astype("float32"), rng.standard_normal((30, 3)).astype("float32")
    y_train = keras.utils.to_categorical(rng.integers(0, 3, 30), 3)
    y_test = keras.utils.to_categorical(rng.integers(0, 3, 30), 3)
    model = keras.Sequential([keras.layers.Dense(5, activation="relu"), keras.layers.Dense(3, activation="softmax")])
    model.compile(loss="categorical_crossentropy", optimizer="sgd", metrics=[keras.metrics.Accuracy("acc")])
    filepath = tmp_path / "subdir" / "checkpoint.keras"

    def fit(**kwargs):
        model.fit(x_train, y_train, batch_size=5, validation_data=(x_test, y_test), epochs=1, verbose=0,
                  callbacks=[ModelCheckpoint(str(filepath), **kwargs)])

    for monitor, save_best_only, mode in [("val_loss", False, "auto"), ("val_loss", False, "min"),
                                          ("val_acc", False, "max"), ("val_acc", True, "max")]:
        fit(monitor=monitor, save_best_only=save_best_only, mode=mode)
        assert filepath.exists(), (monitor, save_best_only, mode)  # case 4 failed here: the deleted file's
        filepath.unlink()                                          # best value was still believed
    with pytest.raises(keepbest.MonitorError):  # case 5: keepbest refuses a monitor that cannot exist (README)
        fit(monitor="unknown", save_best_only=True, mode="min")


# -- two writers on one series -----------------------------------------------------------------------------


def test_two_model_checkpoints_of_one_fit_on_one_filepath_raise_before_training(tmp_path, digits):
    a = ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), monitor="loss", mode="min", keep_best=1)
    b = ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), monitor="accuracy", mode="max", keep_best=1)
    with pytest.raises(ValueError, match=r"Two ModelCheckpoint callbacks of this fit save to .*e\{epoch\}\.keras"):
        _fit(make_model(), digits, [a, b], epochs=3, validation=False)
    assert list(tmp_path.iterdir()) == []  # not one batch trained, nothing saved


def test_one_model_checkpoint_per_fit_on_one_filepath_is_fine(tmp_path, digits):
    model = make_model()
    first = ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), monitor="loss", keep_last=1)
    _fit(model, digits, [first], validation=False)
    _fit(model, digits, [ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), monitor="loss", keep_last=1)],
         validation=False)  # ``first`` is still alive, but belongs to the previous fit
    assert [c.name for c in list_checkpoints(tmp_path)] == ["e1.keras"]


def test_two_writers_with_different_monitors_never_delete_each_others_best(tmp_path):
    """Across processes the writers are not known to each other: retention keeps every monitor's best."""
    sa = CheckpointManager(tmp_path, monitor=Monitor("sa", "min"), keep=[KeepBest(1)], series="d/e{epoch}.keras")
    sb = CheckpointManager(tmp_path, monitor=Monitor("sb", "max"), keep=[KeepBest(1)], series="d/e{epoch}.keras")
    scores = {1: (1.0, 9.0), 2: (5.0, 1.0), 3: (2.0, 2.0), 4: (6.0, 3.0), 5: (7.0, 0.0), 6: (8.0, 0.5)}
    for epoch, (a, b) in scores.items():
        writer = sa if epoch % 2 else sb
        writer.save(epoch, {"w": np.zeros(2)}, name=f"e{epoch}", epoch=epoch, metrics={"sa": a, "sb": b})
    # sa's best is epoch 1 (sa=1.0) and sb's is epoch 4 (sb=3.0, among what sb wrote); sb's retention at
    # epoch 6 would have deleted epoch 1, as its own rules see no value in it.
    assert {c.epoch for c in sa.checkpoints()} == {1, 4, 6}


# -- a damaged alias record ----------------------------------------------------------------------------------


def test_a_corrupt_alias_record_blocks_neither_listing_verify_loading_nor_training(tmp_path, digits):
    template = str(tmp_path / "e{epoch}.keras")
    _fit(make_model(), digits, [ModelCheckpoint(template, keep_last=3)], epochs=2)
    record = tmp_path / ".keepbest" / "aliases" / "e%7Bepoch%7D.keras.json"
    assert json.loads(record.read_text())["automatic"]["latest"] == 1
    record.write_bytes(b"\x00\x01 not json")
    ls = _cli("ls", str(tmp_path))
    assert ls.returncode == 0 and "e2.keras" in ls.stdout and "latest" in ls.stdout
    assert "Cannot read the aliases of series" in ls.stderr and ls.stderr.count("Cannot read the aliases") == 1
    assert "Checkpoints are not affected" not in ls.stderr and "Traceback" not in ls.stderr
    assert _cli("verify", str(tmp_path)).returncode == 0
    with user_warnings("Cannot read the aliases"):
        keepbest.keras.load_model(tmp_path / "e1.keras")
        _fit(make_model(), digits, [ModelCheckpoint(template, keep_last=3)], epochs=1)
    assert sorted(c.name for c in list_checkpoints(tmp_path)) == ["e1.keras", "e2.keras"]
    assert json.loads(record.read_text())["automatic"]["latest"] == 2  # recomputed and written again
    (aside,) = (tmp_path / ".keepbest" / "damaged" / "aliases").iterdir()
    assert aside.read_bytes() == b"\x00\x01 not json"  # kept for the user: it may hold user aliases
