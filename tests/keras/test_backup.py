"""keepbest.keras.BackupAndRestore: exact resume after SIGKILL, preemption by SIGTERM, Keras's arguments.

The two process tests run ``resume_child.py`` (a real training process with
Dropout and shuffled data, 20 batches per epoch) and compare its per-step log
with an uninterrupted run of the same script.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keepbest.errors import CorruptCheckpointError, StateMismatchError
from keepbest.keras import BackupAndRestore, ModelCheckpoint
from keepbest.manager import CheckpointManager
from keepbest.store import LocalStore

from tests.helpers import flip_byte, spawn

from .conftest import Recorder, make_model, user_warnings, weights_of
from .resume_harness import CHILD, FINAL_STEP, final_weights, kill_then_resume, run_child
from .resume_harness import done as _done
from .resume_harness import steps as _steps


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if check:
        return run_child(*args)
    return subprocess.run([sys.executable, str(CHILD), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """100 steps (5 epochs of 20 batches) without interruption."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    _run(str(folder / "backup"), str(folder / "log"), "--save-freq", "5")
    return folder / "log"


@pytest.mark.slow
@pytest.mark.parametrize("kill_at, backup_at, where", [
    (53, 50, "epoch 3, batch 10"),  # the middle of an epoch
    (61, 60, "epoch 3, batch 20"),  # the backup was taken at the last batch of an epoch
])
def test_resume_after_sigkill_repeats_the_uninterrupted_losses_and_batch_order(tmp_path, uninterrupted, kill_at,
                                                                               backup_at, where):
    killed = _run(str(tmp_path / "backup"), str(tmp_path / "killed"), "--save-freq", "5", "--kill-at-step",
                  str(kill_at), check=False)
    assert killed.returncode == -signal.SIGKILL
    assert max(_steps(tmp_path / "killed")) == kill_at  # the steps after the last backup are lost
    resumed = _run(str(tmp_path / "backup"), str(tmp_path / "resumed"), "--save-freq", "5")
    assert f"resumes at {where}" in resumed.stdout
    full, after = _steps(uninterrupted), _steps(tmp_path / "resumed")
    # the first line is a skipped batch, reported with the step of the backup
    assert sorted(after) == list(range(backup_at, 101))
    for step in range(backup_at + 1, 101):
        assert after[step]["batch_id"] == full[step]["batch_id"], f"batch order differs at step {step}"
        assert after[step]["loss"] == pytest.approx(full[step]["loss"], abs=1e-6), f"loss differs at step {step}"
    assert _done(tmp_path / "resumed")["weights"] == _done(uninterrupted)["weights"]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_with_the_uninterrupted_weights(tmp_path, uninterrupted):
    seed = int(os.environ.get("KEEPBEST_KILL_SEED", str(random.SystemRandom().randrange(10**6))))
    trial = kill_then_resume(tmp_path, random.Random(seed))  # a backup every 3 steps
    print(f"killed after steps {trial.reached}, resumed at step {trial.resumed_at} (seed {seed})")
    # Both kills landed while training ran (the harness also checks that neither run had exited), so the
    # final run resumed from a backup, not from scratch.
    assert all(step < FINAL_STEP for step in trial.reached), f"seed {seed}: a kill came after the last step"
    assert 0 < trial.resumed_at <= trial.reached[-1], f"seed {seed}: the final run did not resume from a backup"
    assert trial.weights == final_weights(uninterrupted), f"seed {seed}, killed after steps {trial.reached}"


@pytest.mark.slow
def test_sigterm_mid_epoch_commits_the_current_step_and_fit_returns_cleanly(tmp_path, uninterrupted):
    log = tmp_path / "log"
    child = spawn([sys.executable, str(CHILD), str(tmp_path / "backup"), str(log), "--preemption", "--slow", "0.05"],
                  ready=lambda: 30 in _steps(log),  # step 30 is batch 10 of epoch 2
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-3000:]
    done = _done(log)
    assert 30 <= done["done"] < 40  # stopped within the epoch, at the next batch boundary
    assert (f"received SIGTERM; saved the training state at epoch 2, batch {done['done'] - 20} "
            f"(step {done['done']})") in out
    (ckpt,) = _backups(tmp_path / "backup")
    assert ckpt.manifest.step == done["done"]
    LocalStore(tmp_path / "backup").verify(ckpt.manifest)
    _run(str(tmp_path / "backup"), str(tmp_path / "resumed"))
    assert _done(tmp_path / "resumed")["weights"] == _done(uninterrupted)["weights"]


def _backups(folder: Path) -> list:
    return CheckpointManager(folder, series="backup").checkpoints()


class Interrupt(keras.callbacks.Callback):
    """Raises at a given (0-based) epoch begin or global step, like a crash in the middle of fit."""

    def __init__(self, epoch: int | None = None, step: int | None = None, sig: int | None = None):
        super().__init__()
        self.epoch, self.step, self.sig = epoch, step, sig

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("Interrupting!")

    def on_train_batch_end(self, batch, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step == self.step:
            if self.sig is None:
                raise RuntimeError("Interrupting!")
            os.kill(os.getpid(), self.sig)


def _fit(model, digits, callbacks, epochs=6, **kwargs):
    x, y = digits
    return model.fit(x[:200], y[:200], batch_size=20, epochs=epochs, verbose=0, callbacks=callbacks, **kwargs)


def test_restarted_fit_runs_only_the_remaining_epochs_like_keras(tmp_path, digits):
    keras.utils.set_random_seed(1)
    model = make_model()
    backup = BackupAndRestore(tmp_path / "backup", verbose=0)
    with pytest.raises(RuntimeError, match="Interrupting"):
        _fit(model, digits, [backup, Interrupt(epoch=4)], epochs=10)
    history = _fit(make_model_built(digits), digits, [backup], epochs=10)
    assert len(history.history["loss"]) == 6


def make_model_built(digits):
    model = make_model()
    model(digits[0][:1])
    return model


def test_restore_puts_back_weights_and_optimizer_state_of_the_backup(tmp_path, digits):
    keras.utils.set_random_seed(1)
    model = make_model()
    with pytest.raises(RuntimeError):
        _fit(model, digits, [BackupAndRestore(tmp_path / "b", verbose=0), Interrupt(epoch=2)])
    fresh = make_model_built(digits)
    backup = BackupAndRestore(tmp_path / "b", verbose=0)
    backup.set_model(fresh)
    fresh.optimizer.build(fresh.trainable_variables)
    backup.on_train_begin()
    for a, b in zip(weights_of(model), weights_of(fresh)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a.value), keras.ops.convert_to_numpy(b.value))
    assert fresh._initial_epoch == 2


def test_delete_checkpoint_removes_the_backups_when_fit_completes(tmp_path, digits):
    _fit(make_model(), digits, [BackupAndRestore(tmp_path / "b", verbose=0)], epochs=2)
    assert not (tmp_path / "b").exists()


def test_delete_checkpoint_false_keeps_the_last_backup(tmp_path, digits):
    _fit(make_model(), digits, [BackupAndRestore(tmp_path / "b", delete_checkpoint=False, verbose=0)], epochs=2)
    assert [c.epoch for c in _backups(tmp_path / "b")] == [2]


def test_double_checkpoint_keeps_two_and_falls_back_when_the_newest_is_corrupt(tmp_path, digits):
    with pytest.raises(RuntimeError):
        _fit(make_model(), digits, [BackupAndRestore(tmp_path / "b", double_checkpoint=True, verbose=0),
                                    Interrupt(epoch=3)])
    newest, previous = _backups(tmp_path / "b")[::-1]
    assert (newest.epoch, previous.epoch) == (3, 2)
    weights = newest.path / "model.safetensors"
    flip_byte(weights)
    with user_warnings("instead of") as warned:
        history = _fit(make_model_built(digits), digits, [BackupAndRestore(tmp_path / "b", double_checkpoint=True,
                                                                           verbose=0)])
    assert len(history.history["loss"]) == 4 and "model.safetensors" in warned[0]


def test_corrupt_single_backup_raises_naming_the_file(tmp_path, digits):
    with pytest.raises(RuntimeError):
        _fit(make_model(), digits, [BackupAndRestore(tmp_path / "b", verbose=0), Interrupt(epoch=2)])
    (ckpt,) = _backups(tmp_path / "b")
    (ckpt.path / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="optimizer.safetensors"):
        _fit(make_model_built(digits), digits, [BackupAndRestore(tmp_path / "b", verbose=0)])


@pytest.mark.parametrize("edit", [lambda d: d.pop("epoch"), lambda d: d.update(batch="3"), lambda d: d.update(epoch=-1)])
def test_training_state_with_wrong_fields_is_rejected_before_anything_is_restored(tmp_path, digits, edit):
    with pytest.raises(RuntimeError):
        _fit(make_model(), digits, [BackupAndRestore(tmp_path / "b", verbose=0), Interrupt(epoch=2)])
    (ckpt,) = _backups(tmp_path / "b")
    doc = json.loads((ckpt.path / "training.json").read_text())
    edit(doc)
    _rewrite(tmp_path / "b", ckpt, "training.json", json.dumps(doc).encode())
    model = make_model_built(digits)
    before = weights_of(model)
    with pytest.raises(CorruptCheckpointError, match="training.json: it is not a training state written by keepbest"):
        _fit(model, digits, [BackupAndRestore(tmp_path / "b", verbose=0)])
    for a, b in zip(before, weights_of(model)):
        np.testing.assert_array_equal(a, b)


def _rewrite(root: Path, ckpt, fname: str, data: bytes) -> None:
    """Replaces one file of a checkpoint and re-records its digest, as a hand edit with care would."""
    from keepbest import _digest

    (ckpt.path / fname).write_bytes(data)
    h = _digest.new()
    h.update(data)
    files = tuple(f if f.path != fname else type(f)(path=fname, size=len(data), digest=h.hexdigest())
                  for f in ckpt.manifest.files)
    (ckpt.path / "manifest.json").write_bytes(ckpt.manifest.with_files(files).to_json())


def test_changed_optimizer_slots_raise_instead_of_being_skipped(tmp_path, digits):
    with pytest.raises(RuntimeError):
        _fit(make_model(), digits, [BackupAndRestore(tmp_path / "b", verbose=0), Interrupt(epoch=1)])
    model = make_model_built(digits)
    model.compile(optimizer="sgd", loss=model.loss)
    with pytest.raises(StateMismatchError, match="optimizer state.*partial_restore=True"):
        _fit(model, digits, [BackupAndRestore(tmp_path / "b", verbose=0)])


def test_partial_restore_restores_what_matches_and_reports_the_rest(tmp_path, digits, capsys):
    keras.utils.set_random_seed(1)
    trained = make_model()
    with pytest.raises(RuntimeError):
        _fit(trained, digits, [BackupAndRestore(tmp_path / "b", verbose=0), Interrupt(epoch=1)])
    model = make_model_built(digits)
    model.compile(optimizer="sgd", loss=model.loss)
    backup = BackupAndRestore(tmp_path / "b", partial_restore=True)
    backup.set_model(model)
    model.optimizer.build(model.trainable_variables)
    backup.on_train_begin()
    for a, b in zip(weights_of(trained), weights_of(model)):
        np.testing.assert_array_equal(a, b)
    out = capsys.readouterr().out
    assert "Partial restore: 4 variables restored, 2 left as they were" in out
    assert "iteration (not in the checkpoint)" in out and "learning_rate (not in the checkpoint)" in out


def test_unbuilt_model_with_a_backup_raises_keras_message(tmp_path, digits):
    with pytest.raises(RuntimeError):
        _fit(make_model(), digits, [BackupAndRestore(tmp_path / "b", verbose=0), Interrupt(epoch=1)])

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(10)

        def call(self, x):
            return self.d(x)

    backup = BackupAndRestore(tmp_path / "b", verbose=0)
    backup.set_model(Sub())
    with pytest.raises(ValueError, match="you model must be built before you call `fit\\(\\)`"):
        backup.on_train_begin()


@pytest.mark.parametrize("kwargs, match", [
    ({"backup_dir": ""}, "Empty `backup_dir` argument passed"),
    ({"backup_dir": "b", "save_freq": "batch"}, "Invalid value for argument `save_freq`. Received: save_freq='batch'"),
    ({"backup_dir": "b", "save_freq": 0}, "Invalid value for argument `save_freq`"),
    ({"backup_dir": "b", "save_freq": False}, "needs `save_before_preemption=True`"),
    ({"backup_dir": "b", "preemption_signals": [signal.SIGKILL]}, "cannot include SIGKILL"),
    ({"backup_dir": "b", "preemption_signals": ["TERM"]}, "must list signal numbers"),
])
def test_bad_arguments_raise_in_init(tmp_path, kwargs, match):
    kwargs = {**kwargs, "backup_dir": kwargs["backup_dir"] and str(tmp_path / kwargs["backup_dir"])}
    with pytest.raises(ValueError, match=match):
        BackupAndRestore(**kwargs)


def test_model_checkpoint_state_is_restored_and_skipped_batches_do_not_save(tmp_path, digits):
    keras.utils.set_random_seed(1)
    ckpt = ModelCheckpoint(tmp_path / "ckpt" / "b{epoch}-{batch}.weights.h5", save_freq=4, save_weights_only=True)
    with pytest.raises(RuntimeError):
        _fit(make_model(), digits, [BackupAndRestore(tmp_path / "b", save_freq=3, verbose=0), ckpt,
                                    Interrupt(step=14)])
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.suffix == ".h5")
    assert before == ["b1-4.weights.h5", "b1-8.weights.h5", "b2-2.weights.h5"]  # saves at steps 4, 8, 12
    ckpt2 = ModelCheckpoint(tmp_path / "ckpt" / "b{epoch}-{batch}.weights.h5", save_freq=4, save_weights_only=True)
    _fit(make_model_built(digits), digits, [BackupAndRestore(tmp_path / "b", save_freq=3, verbose=0), ckpt2],
         epochs=2)
    after = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.suffix == ".h5")
    # resumed at step 12 (epoch 2, batch 2): the next saves are at steps 16 and 20, as without the crash
    assert after == sorted(before + ["b2-6.weights.h5", "b2-10.weights.h5"])


def test_sigterm_in_process_saves_stops_fit_and_chains_to_the_previous_handler(tmp_path, digits, capsys):
    calls = []

    def users_handler(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, users_handler)
    try:
        model = make_model()
        # The signal arrives before the backup sees batch 3 of epoch 2 end (step 13): it saves there.
        history = _fit(model, digits, [Interrupt(step=13, sig=signal.SIGTERM),
                                       BackupAndRestore(tmp_path / "b", save_before_preemption=True)])
        assert calls == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is users_handler  # restored when fit returned
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(history.history["loss"]) == 2  # stopped in the second epoch
    (ckpt,) = _backups(tmp_path / "b")
    assert (ckpt.step, ckpt.epoch, ckpt.batch) == (13, 1, 3)
    assert "received SIGTERM; saved the training state at epoch 2, batch 3 (step 13)" in capsys.readouterr().out


def test_second_signal_goes_to_the_previous_handler(tmp_path, digits):
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))

    class Twice(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
                os.kill(os.getpid(), signal.SIGUSR1)

    try:
        _fit(make_model(), digits, [Twice(), BackupAndRestore(tmp_path / "b", save_before_preemption=True, verbose=0,
                                                              preemption_signals=[signal.SIGUSR1])])
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [signal.SIGUSR1, signal.SIGUSR1]
    assert [c.step for c in _backups(tmp_path / "b")] == [3]


def _losses_per_step(digits, callbacks, steps_per_execution):
    """Per-step running-mean losses of a seeded fit of 4 epochs of 10 batches (one line per batch end)."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dropout(0.3), keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution)
    recorder = Recorder()
    x, y = digits
    model.fit(x[:320], y[:320], batch_size=32, epochs=4, verbose=0, callbacks=[*callbacks, recorder])
    return recorder.losses


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_in_process_resume_inside_an_epoch_repeats_the_losses(tmp_path, digits, steps_per_execution):
    if steps_per_execution > 1 and keras.backend.backend() == "torch":
        pytest.skip("Keras forbids steps_per_execution > 1 on torch")
    reference = _losses_per_step(digits, [], steps_per_execution)
    with pytest.raises(RuntimeError, match="Interrupting!"):
        _losses_per_step(digits, [BackupAndRestore(tmp_path / "b", save_freq=4, verbose=0),
                                  Interrupt(step=26)], steps_per_execution)  # backup at 24: epoch 3, batch 4
    resumed = _losses_per_step(digits, [BackupAndRestore(tmp_path / "b", save_freq=4, verbose=0)],
                               steps_per_execution)
    assert min(s for s in resumed if s > 24) == 24 + steps_per_execution
    for step in range(25, 41):
        if step in reference:
            assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step


def test_the_model_checkpoint_of_the_current_fit_is_the_one_backed_up(tmp_path):
    from keepbest.keras import _resume

    model = make_model()
    earlier, current = ModelCheckpoint(tmp_path / "m.keras"), ModelCheckpoint(tmp_path / "m.keras")
    for cb in (earlier, current):  # an earlier fit's callback may still be alive (a failed fit keeps it)
        cb.set_model(model)
        cb.on_train_begin()
    assert _resume.registered(model) == {f"ModelCheckpoint:{tmp_path / 'm.keras'}": current}
