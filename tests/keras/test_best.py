"""Best-model semantics: Keras's messages, the monitor check, resume, NaN, absent metrics."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from keepbest import MonitorError
from keepbest.keras import ModelCheckpoint

from .conftest import drive, make_model, user_warnings

LOSSES = [{"loss": 1.0, "val_loss": v} for v in (0.9, 0.5, 0.7, 0.4)]


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("save_best_only", [True, False])
def test_verbose_lines_match_keras_word_for_word(tmp_path, model, capsys, save_best_only):
    kwargs = dict(monitor="val_loss", verbose=1, save_best_only=save_best_only)
    drive(keras.callbacks.ModelCheckpoint(str(tmp_path / "k" / "m.keras"), **kwargs), model, LOSSES)
    theirs = _lines(capsys.readouterr().out)
    drive(ModelCheckpoint(str(tmp_path / "k" / "m.keras"), **kwargs), make_model(), LOSSES)
    ours = _lines(capsys.readouterr().out)
    assert ours == theirs
    assert any("did not improve from 0.50000" in line for line in ours) or not save_best_only


def test_monitor_typo_raises_with_the_suggestion_before_any_save(tmp_path, digits):
    x, y = digits
    cb = ModelCheckpoint(str(tmp_path / "best.keras"), monitor="val_acc", save_best_only=True)
    with pytest.raises(MonitorError, match=r"cannot monitor 'val_acc'.*Did you mean 'val_accuracy'\?.*Available: "
                                           r"accuracy, loss, val_accuracy, val_loss"):
        make_model().fit(x, y, validation_split=0.2, epochs=1, callbacks=[cb], verbose=0)
    assert list(tmp_path.iterdir()) == []


def test_monitor_typo_is_ignored_when_monitor_is_unused(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "m.keras"), monitor="val_acc")
    drive(cb, model, LOSSES[:1])
    assert (tmp_path / "m.keras").is_file()


def test_resume_after_a_worse_epoch_leaves_the_best_file_byte_identical(tmp_path, digits):
    x, y = digits
    path = tmp_path / "best.keras"
    keras.utils.set_random_seed(0)
    trained = make_model()
    trained.fit(x, y, validation_split=0.2, epochs=4, verbose=0,
                callbacks=[ModelCheckpoint(str(path), save_best_only=True)])
    before = path.read_bytes()
    fresh = make_model()  # a restart from scratch: its first epoch is far worse than the recorded best
    fresh.fit(x, y, validation_split=0.2, epochs=1, verbose=0,
              callbacks=[ModelCheckpoint(str(path), save_best_only=True)])
    assert path.read_bytes() == before


def test_resume_prints_where_it_resumed_from(tmp_path, model, capsys):
    drive(ModelCheckpoint(str(tmp_path / "m.keras"), save_best_only=True), model, LOSSES)
    capsys.readouterr()
    cb = ModelCheckpoint(str(tmp_path / "m.keras"), save_best_only=True, verbose=1)
    drive(cb, model, [{"loss": 1.0, "val_loss": 0.45}])
    out = capsys.readouterr().out
    assert "resuming in" in out and "best val_loss so far is 0.40000 (epoch 4, m.keras)" in out
    assert "val_loss did not improve from 0.40000" in out
    assert cb.best == pytest.approx(0.4)


def test_resume_keeps_a_better_initial_value_threshold(tmp_path, model):
    drive(ModelCheckpoint(str(tmp_path / "m.keras"), save_best_only=True), model, LOSSES)
    cb = ModelCheckpoint(str(tmp_path / "m.keras"), save_best_only=True, initial_value_threshold=0.1)
    drive(cb, model, [{"loss": 1.0, "val_loss": 0.2}])
    assert cb.best == 0.1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_value_never_becomes_best(tmp_path, model, bad):
    cb = ModelCheckpoint(str(tmp_path / "m.keras"), save_best_only=True, mode="min")
    drive(cb, model, [{"loss": 1.0, "val_loss": bad}])
    assert not (tmp_path / "m.keras").exists()
    assert cb.best is None


def test_absent_validation_metric_never_overwrites_the_best(tmp_path, model):
    path = tmp_path / "m.keras"
    cb = ModelCheckpoint(str(path), save_best_only=True)
    drive(cb, model, [{"loss": 1.0, "val_loss": 0.5}])
    before = path.read_bytes()
    with user_warnings(r"Can save best model only with val_loss available.*kept") as found:
        drive(cb, model, [{"loss": 0.1}])  # validation did not run this epoch (validation_freq)
    assert path.read_bytes() == before
    assert cb.best == 0.5
    assert len(found) == 1


def test_validation_freq_epochs_without_validation_do_not_save(tmp_path, digits):
    x, y = digits
    cb = ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), save_best_only=True)
    with user_warnings(r"not in the logs of epoch 1") as found:
        make_model().fit(x, y, validation_split=0.2, validation_freq=2, epochs=4, verbose=0, callbacks=[cb])
    assert len(found) == 1  # once, not every skipped epoch
    assert sorted(p.name for p in tmp_path.glob("*.keras")) in (["e2.keras", "e4.keras"], ["e2.keras"])


def test_training_without_validation_data_warns_that_nothing_is_saved(tmp_path, digits):
    x, y = digits
    cb = ModelCheckpoint(str(tmp_path / "best.keras"), save_best_only=True)
    with user_warnings(r"Can save best model only with val_loss available.*no validation data") as found:
        make_model().fit(x, y, epochs=2, verbose=0, callbacks=[cb])
    assert len(found) == 1
    assert not (tmp_path / "best.keras").exists()


def test_metric_added_at_epoch_end_by_another_callback_can_be_monitored(tmp_path, digits):
    x, y = digits

    class AddsF1(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_f1"] = 0.5 + epoch / 10

    cb = ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), monitor="val_f1", mode="max", save_best_only=True)
    make_model().fit(x, y, validation_split=0.2, epochs=2, verbose=0, callbacks=[AddsF1(), cb])
    assert cb.best == pytest.approx(0.6)
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["e1.keras", "e2.keras"]


def test_monitor_op_is_keras_comparison_once_known(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "m.keras"), monitor="val_loss")
    assert cb.monitor_op is None
    drive(cb, model, LOSSES[:1])
    assert cb.monitor_op is keras.ops.less


def test_initial_value_threshold_must_be_beaten(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "m.keras"), save_best_only=True, initial_value_threshold=0.45)
    drive(cb, model, LOSSES)
    from keepbest.discovery import list_checkpoints

    ckpts = list_checkpoints(tmp_path)
    assert [c.epoch for c in ckpts] == [4]


def test_min_delta_requires_a_large_enough_improvement(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), save_best_only=True, min_delta=0.25)
    drive(cb, model, LOSSES)
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["e1.keras", "e2.keras"]


def test_auto_mode_maximises_accuracy_during_fit(tmp_path, digits):
    x, y = digits
    cb = ModelCheckpoint(str(tmp_path / "m.keras"), monitor="val_accuracy", save_best_only=True)
    history = make_model().fit(x, y, validation_split=0.2, epochs=3, verbose=0, callbacks=[cb])
    assert cb.best == pytest.approx(max(history.history["val_accuracy"]))


def test_batch_save_with_validation_monitor_is_skipped_with_one_warning(tmp_path, digits):
    x, y = digits
    cb = ModelCheckpoint(str(tmp_path / "b{batch}.keras"), save_best_only=True, save_freq=5)
    with user_warnings(r"only computed at the end of an epoch") as found:
        make_model().fit(x, y, validation_split=0.2, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
    assert len(found) == 1
    assert list(tmp_path.glob("*.keras")) == []


def test_non_scalar_monitor_is_an_error(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "m.keras"), save_best_only=True, mode="min")
    with pytest.raises(MonitorError, match=r"scalar"):
        drive(cb, model, [{"loss": 1.0, "val_loss": np.array([1.0, 2.0])}])
    assert not os.path.exists(tmp_path / "m.keras")
