"""async_save=True: training goes on while the checkpoint is written, and nothing is lost or hidden."""

from __future__ import annotations

import json
import threading
import time

import keras
import numpy as np
import pytest

import keepbest.keras
from keepbest.store import _fs
from keepbest import AsyncSaveError, codec
from keepbest.keras import ModelCheckpoint
from keepbest.keras._state import OPTIMIZER_FILE, WEIGHTS_FILE, unique_paths

from .conftest import Recorder, make_model, weights_of

GATE_TIMEOUT = 10.0  # how long a held write waits for training to move on (it takes a few ms)


@pytest.fixture
def slow_writes(monkeypatch):
    """Records the training step at which each background write of a tensor file begins, and holds
    each save's first one (the weights) until training has moved past that step or fit has ended:
    the rest of the save is written while training goes on. A write that training waits for (a
    save that is not in the background) is let go after GATE_TIMEOUT, with training where it was."""
    seen = []
    real = _fs.write_pieces

    def write_file(path, pieces, digest=None):
        if path.name.endswith(".safetensors"):  # the tensor files, not the model config
            recorder = slow_writes.recorder
            began = recorder.step
            seen.append(began)
            deadline = time.monotonic() + GATE_TIMEOUT
            while (path.name == WEIGHTS_FILE and recorder.step == began and not recorder.ended
                   and time.monotonic() < deadline):
                time.sleep(0.002)
        return real(path, pieces, digest)

    slow_writes.recorder = Recorder(per_step=True)
    slow_writes.seen = seen
    monkeypatch.setattr(_fs, "write_pieces", write_file)
    return slow_writes


def _by_path(variables, arrays):
    return dict(zip(unique_paths(variables), arrays))


def test_async_checkpoint_is_bit_identical_to_the_state_at_the_requested_step(tmp_path, digits, slow_writes):
    x, y = digits
    keras.utils.set_random_seed(3)
    cb = ModelCheckpoint(str(tmp_path / "e{epoch}-b{batch}"), save_freq=2, async_save=True)
    model = make_model()
    # The recorder is listed first: it has recorded a step (and, at the end, fit's end) before the
    # checkpoint requests a save there (or waits for the last one).
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[slow_writes.recorder, cb])
    folders = sorted(p for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert len(folders) == 9
    for folder in folders:
        step = json.loads((folder / "manifest.json").read_text())["step"]
        state = slow_writes.recorder.states[step]
        expected_files = {WEIGHTS_FILE: _by_path(model.weights, state["weights"]),
                          OPTIMIZER_FILE: _by_path(model.optimizer.variables, state["optimizer"])}
        for fname, expected in expected_files.items():
            saved = codec.load(lambda rel: (folder / rel).read_bytes(), fname)
            assert sorted(saved) == sorted(expected), folder
            for path, array in expected.items():
                assert saved[path].dtype == array.dtype and saved[path].tobytes() == array.tobytes(), (folder, path)
    # The writes overlapped training: each save's second file (held after its first until training
    # moved on) began steps after the save was requested, except the last save's, which fit waits for
    # at its end.
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
    real = _fs.write_pieces

    def write_file(path, pieces, digest=None):
        if not path.name.endswith(".safetensors"):  # the tensor files, not the model config
            return real(path, pieces, digest)
        calls.append(threading.current_thread().name)
        if len(calls) == 3:  # the second save: model.safetensors then optimizer.safetensors per save
            raise OSError(28, "No space left on device")
        return real(path, pieces, digest)

    monkeypatch.setattr(_fs, "write_pieces", write_file)
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

    def write_file(path, pieces, digest=None):
        raise OSError(13, "Permission denied")

    monkeypatch.setattr(_fs, "write_pieces", write_file)
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
