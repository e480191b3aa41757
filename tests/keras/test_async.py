"""async_save=True: training goes on while the checkpoint is written, and nothing is lost or hidden."""

from __future__ import annotations

import json
import threading
import time

import keras
import numpy as np
import pytest

import keepbest.keras
from keepbest import AsyncSaveError, codec
from keepbest.keras import ModelCheckpoint
from keepbest.keras._state import OPTIMIZER_FILE, WEIGHTS_FILE, unique_paths

from .conftest import make_model, weights_of


class Recorder(keras.callbacks.Callback):
    """Copies the whole state (weights and optimizer) at every batch end, keyed by optimizer step."""

    def __init__(self):
        super().__init__()
        self.states = {}
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        self.states[self.step] = {
            WEIGHTS_FILE: _copies(self.model.weights),
            OPTIMIZER_FILE: _copies(self.model.optimizer.variables),
        }


def _copies(variables):
    return {p: np.array(keras.ops.convert_to_numpy(v.value)) for p, v in zip(unique_paths(variables), variables)}


@pytest.fixture
def slow_writes(monkeypatch):
    """Makes each background write take 0.2 s (longer than two training steps, so the next save is
    requested while one is in flight) and records the training step when it starts."""
    seen = []
    real = codec.write_encoded

    def write_file(path, encoded, digest=None):
        seen.append(slow_writes.recorder.step)
        time.sleep(0.2)
        return real(path, encoded, digest)

    slow_writes.recorder = Recorder()
    slow_writes.seen = seen
    monkeypatch.setattr(codec, "write_encoded", write_file)
    return slow_writes


def test_async_checkpoint_is_bit_identical_to_the_state_at_the_requested_step(tmp_path, digits, slow_writes):
    x, y = digits
    keras.utils.set_random_seed(3)
    cb = ModelCheckpoint(str(tmp_path / "e{epoch}-b{batch}"), save_freq=2, async_save=True)
    make_model().fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb, slow_writes.recorder])
    folders = sorted(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert len(folders) == 9
    for folder in folders:
        step = json.loads((folder / "manifest.json").read_text())["step"]
        for fname, expected in slow_writes.recorder.states[step].items():
            saved = codec.read_file(folder / fname)
            assert sorted(saved) == sorted(expected), folder
            for path, array in expected.items():
                assert saved[path].dtype == array.dtype and saved[path].tobytes() == array.tobytes(), (folder, path)
    # The writes overlapped training: each save's second file (0.2 s after its first) began steps
    # after the save was requested, except the last save's, which fit waits for at its end.
    requested = sorted(json.loads((f / "manifest.json").read_text())["step"] for f in folders)
    later = [seen > step for seen, step in zip(slow_writes.seen[1::2], requested)]
    assert sum(later) >= len(requested) - 1, (slow_writes.seen, requested)


class WaitForWriter(keras.callbacks.Callback):
    """Listed before the checkpoint: lets the save in flight finish before the next batch's hooks,
    so "within one step" is deterministic; records the last batch that ended."""

    def __init__(self, checkpoint):
        super().__init__()
        self.checkpoint = checkpoint
        self.batches = []

    def on_train_batch_end(self, batch, logs=None):
        self.batches.append(int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)))
        deadline = time.monotonic() + 10
        while self.checkpoint._writer.in_flight is not None and time.monotonic() < deadline:
            time.sleep(0.002)


@pytest.fixture
def failing_second_write(monkeypatch):
    calls = []
    real = codec.write_encoded

    def write_file(path, encoded, digest=None):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:  # the second save: model.safetensors then optimizer.safetensors per save
            raise OSError(28, "No space left on device")
        return real(path, encoded, digest)

    monkeypatch.setattr(codec, "write_encoded", write_file)
    return calls


def test_background_write_failure_surfaces_in_fit_within_one_step(tmp_path, digits, failing_second_write):
    x, y = digits
    cb = ModelCheckpoint(str(tmp_path / "s{batch}"), save_freq=3, async_save=True)
    waiter = WaitForWriter(cb)
    with pytest.raises(AsyncSaveError, match=rf"Background save of {tmp_path}/s6 failed: OSError: .*No space left"):
        make_model().fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[waiter, cb])
    assert failing_second_write[2].startswith("keepbest-writer")  # it failed in the background
    assert waiter.batches[-1] == 7  # requested at step 6, raised at the end of step 7
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["s3"]
    keepbest.keras.load_weights(make_model(), tmp_path / "s3")  # the previous checkpoint is intact


def test_failure_of_the_last_save_is_raised_when_fit_ends(tmp_path, digits, monkeypatch):
    x, y = digits

    def write_file(path, encoded, digest=None):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(codec, "write_encoded", write_file)
    cb = ModelCheckpoint(str(tmp_path / "ckpt"), async_save=True)
    with pytest.raises(AsyncSaveError, match=rf"{tmp_path}/ckpt failed: PermissionError: .*Permission denied"):
        make_model().fit(x, y, epochs=1, verbose=0, callbacks=[cb])


@pytest.mark.parametrize("filepath, weights_only", [("m.keras", False), ("m.weights.h5", True), ("ckpt", False)])
def test_async_save_commits_every_format_before_fit_returns(tmp_path, digits, filepath, weights_only):
    x, y = digits
    model = make_model()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[
        ModelCheckpoint(str(tmp_path / filepath), save_weights_only=weights_only, async_save=True)])
    fresh = make_model()
    keepbest.keras.load_weights(fresh, tmp_path / filepath)
    assert all(np.array_equal(a, b) for a, b in zip(weights_of(fresh), weights_of(model)))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".keepbest-")]


def test_async_save_keeps_the_best_and_prunes_like_a_sync_save(tmp_path, digits):
    x, y = digits
    results = {}
    for mode in (False, True):
        keras.utils.set_random_seed(4)
        folder = tmp_path / str(mode)
        make_model().fit(x, y, validation_split=0.2, epochs=4, verbose=0, callbacks=[ModelCheckpoint(
            str(folder / "e{epoch}"), keep_last=1, keep_best=1, async_save=mode)])
        results[mode] = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert results[True] == results[False]


def test_async_save_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="`async_save` must be True or False. Received: async_save='yes'"):
        ModelCheckpoint(str(tmp_path / "ckpt"), async_save="yes")
