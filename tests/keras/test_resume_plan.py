"""A backup taken inside an epoch resumes only under the batch plan it was taken with."""

from __future__ import annotations

import keras
import pytest

from keepbest.keras import BackupAndRestore

from .conftest import make_model


class CrashAtStep(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == self.step:
            raise RuntimeError("crash")


def _fit(digits, backup_dir, batch_size, callbacks=(), save_freq=5):
    x, y = digits
    model = make_model()
    model.build((None, 64))
    return model.fit(x[:320], y[:320], batch_size=batch_size, epochs=3, verbose=0,
                     callbacks=[BackupAndRestore(backup_dir, save_freq=save_freq, verbose=0), *callbacks])


def _interrupted(digits, backup_dir):
    with pytest.raises(RuntimeError, match="crash"):  # 10 batches of 32 per epoch; a backup at step 15
        _fit(digits, backup_dir, 32, [CrashAtStep(17)])


@pytest.mark.parametrize("batch_size, steps", [(64, 5), (16, 20)])
def test_a_mid_epoch_backup_refuses_to_resume_under_another_batch_size_naming_both(tmp_path, digits, batch_size,
                                                                                   steps):
    _interrupted(digits, tmp_path / "b")
    with pytest.raises(ValueError, match=rf"backed up with 10 batches per epoch, this fit has {steps} .*"
                                         rf"Received: steps_per_epoch={steps}, backed up with 10"):
        _fit(digits, tmp_path / "b", batch_size)


def test_the_same_batch_size_resumes_inside_the_epoch(tmp_path, digits):
    _interrupted(digits, tmp_path / "b")
    history = _fit(digits, tmp_path / "b", 32)
    assert len(history.history["loss"]) == 2  # epoch 2 (resumed at batch 5) and epoch 3


def test_an_epoch_end_backup_resumes_under_any_batch_size(tmp_path, digits):
    with pytest.raises(RuntimeError, match="crash"):
        _fit(digits, tmp_path / "b", 32, [CrashAtStep(22)], save_freq="epoch")  # backups at steps 10 and 20
    history = _fit(digits, tmp_path / "b", 64, save_freq="epoch")
    assert len(history.history["loss"]) == 1
