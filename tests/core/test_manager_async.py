"""CheckpointManager.save_async: a snapshot now, the commit in the background, failures surfaced."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

from keepbest.errors import AsyncSaveError, CorruptCheckpointError
from keepbest.checkpoint import Checkpoint
from keepbest.manager import STATE_FILE, CheckpointManager
from keepbest.policy import KeepLast
from keepbest.store import LocalStore
from tests.helpers import flip_byte


class GatedStore(LocalStore):
    """Holds every save before its data is written until ``gate`` opens; logs what happens."""

    def __init__(self, root, gate=None, fail_on=()):
        super().__init__(root)
        self.gate = gate or threading.Event()
        self.fail_on = set(fail_on)
        self.log = []
        self.saves = 0

    def stage(self, name, layout):
        self.gate.wait(10)
        self.saves += 1
        self.log.append(f"write {name}")
        if self.saves in self.fail_on:
            raise OSError(28, "No space left on device")
        return super().stage(name, layout)

    def commit(self, staged, manifest):
        out = super().commit(staged, manifest)
        self.log.append(f"commit {manifest.name}")
        return out


def manager(tmp_path, **kwargs):
    store_kwargs = {k: kwargs.pop(k) for k in ("gate", "fail_on") if k in kwargs}
    mgr = CheckpointManager(tmp_path, **kwargs)
    mgr.store = GatedStore(tmp_path, **store_kwargs)
    return mgr


def test_save_async_returns_before_the_checkpoint_is_committed(tmp_path):
    mgr = manager(tmp_path)
    handle = mgr.save_async(1, {"w": np.ones(3)})
    assert not handle.done() and mgr.checkpoints() == []
    mgr.store.gate.set()
    ckpt = handle.result(10)
    assert isinstance(ckpt, Checkpoint) and [c.name for c in mgr.checkpoints()] == [ckpt.name]


def test_save_async_writes_the_state_as_it_was_when_requested(tmp_path):
    mgr = manager(tmp_path)
    w = np.arange(1000, dtype=np.float32)
    expected = w.copy()
    handle = mgr.save_async(1, {"w": w})
    w *= -1  # training goes on while the save waits to be written
    mgr.store.gate.set()
    handle.result(10)
    assert np.array_equal(mgr.load()["w"], expected)


def test_next_save_starts_only_after_the_previous_committed(tmp_path):
    mgr = manager(tmp_path)
    mgr.save_async(1, {"w": np.ones(3)})
    second = threading.Thread(target=lambda: mgr.save_async(2, {"w": np.ones(3)}))
    second.start()
    time.sleep(0.2)
    assert second.is_alive() and mgr.store.log == []  # waiting: the first has not even been written
    mgr.store.gate.set()
    second.join(10)
    mgr.wait()
    assert mgr.store.log == ["write ckpt-000000001", "commit ckpt-000000001",
                             "write ckpt-000000002", "commit ckpt-000000002"]


def test_failed_background_save_is_raised_by_the_next_save_with_path_and_cause(tmp_path):
    gate = threading.Event()
    gate.set()
    mgr = manager(tmp_path, gate=gate, fail_on={2})
    mgr.save_async(1, {"w": np.ones(3)}).result(10)
    mgr.save_async(2, {"w": np.zeros(3)})
    with pytest.raises(AsyncSaveError, match=rf"{tmp_path}/ckpt-000000002 failed: OSError: .*No space left"):
        mgr.save_async(3, {"w": np.zeros(3)})
    assert [c.step for c in mgr.checkpoints()] == [1] and mgr.load()["w"].tolist() == [1.0] * 3


def test_failed_background_save_is_raised_by_wait(tmp_path):
    gate = threading.Event()
    gate.set()
    mgr = manager(tmp_path, gate=gate, fail_on={1})
    mgr.save_async(1, {"w": np.ones(3)})
    with pytest.raises(AsyncSaveError, match="ckpt-000000001"):
        mgr.wait()


def test_failed_background_save_is_raised_by_close(tmp_path):
    gate = threading.Event()
    gate.set()
    mgr = manager(tmp_path, gate=gate, fail_on={1})
    mgr.save_async(1, {"w": np.ones(3)})
    with pytest.raises(AsyncSaveError, match="ckpt-000000001"):
        mgr.close()


def test_save_raises_the_original_error(tmp_path):
    gate = threading.Event()
    gate.set()
    mgr = manager(tmp_path, gate=gate, fail_on={1})
    with pytest.raises(OSError, match="No space left") as info:
        mgr.save(1, {"w": np.ones(3)})
    assert not isinstance(info.value, AsyncSaveError)
    mgr.wait()  # already reported by save itself


def test_failed_save_leaves_no_temporary_entry(tmp_path):
    mgr = CheckpointManager(tmp_path)
    bad = {"w": np.zeros(3, dtype=object)}  # not storable: fails inside the write
    with pytest.raises(TypeError):
        mgr.save_async(1, bad).result(10)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_async_saves_apply_retention_like_sync_saves(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=[KeepLast(2)])
    for step in range(1, 6):
        mgr.save_async(step, {"w": np.full(3, step)})
    mgr.wait()
    assert [c.step for c in mgr.checkpoints()] == [4, 5]


def test_retention_uses_the_rules_in_force_when_the_save_was_requested(tmp_path):
    mgr = manager(tmp_path)
    mgr.store.gate.set()
    for step in (1, 2):
        mgr.save(step, {"w": np.ones(1)})
    mgr.store.gate.clear()
    mgr.keep = (KeepLast(1),)
    handle = mgr.save_async(3, {"w": np.ones(1)})
    mgr.keep = ()  # changed while the save waits: the save keeps its own rules
    mgr.store.gate.set()
    handle.result(10)
    assert [c.step for c in mgr.checkpoints()] == [3]


def test_managers_sharing_a_writer_have_one_save_in_flight(tmp_path):
    a = manager(tmp_path / "a")
    b = CheckpointManager(tmp_path / "b", writer=a.writer)
    a.save_async(1, {"w": np.ones(1)})
    started = threading.Event()
    t = threading.Thread(target=lambda: (b.save_async(1, {"w": np.ones(1)}), started.set()))
    t.start()
    assert not started.wait(0.2)
    a.store.gate.set()
    assert started.wait(10)
    b.wait()


# --- fallback on load ---------------------------------------------------------------------------


def _corrupt_latest(mgr):
    path = mgr.latest.path / STATE_FILE
    flip_byte(path)
    return path


def test_load_of_a_corrupt_checkpoint_raises_naming_the_file(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": np.ones(3)})
    path = _corrupt_latest(mgr)
    with pytest.raises(CorruptCheckpointError, match=rf"file {path} does not match its manifest"):
        mgr.load()


def test_load_with_fallback_takes_the_newest_checkpoint_that_verifies(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": np.ones(3)})
    mgr.save(2, {"w": np.full(3, 2.0)})
    path = _corrupt_latest(mgr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tensors = mgr.load(fallback=True)
    assert tensors["w"].tolist() == [1.0] * 3
    assert any(str(path) in str(w.message) and "fallback=True" in str(w.message) for w in caught)


def test_load_with_fallback_raises_when_nothing_verifies(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": np.ones(3)})
    _corrupt_latest(mgr)
    mgr.save(2, {"w": np.ones(3)})
    _corrupt_latest(mgr)
    with pytest.raises(CorruptCheckpointError, match=r"No checkpoint for .*ckpt-000000002 verifies.*tried 2"):
        mgr.load(fallback=True)


def test_load_with_fallback_and_no_other_checkpoint_raises_the_corruption_itself(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": np.ones(3)})
    path = _corrupt_latest(mgr)
    with pytest.raises(CorruptCheckpointError, match=rf"file {path} does not match its manifest"):
        mgr.load(fallback=True)
