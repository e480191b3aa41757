"""One fault-injection suite for every format and for the backups: nothing committed is ever lost.

Each case trains with a checkpoint callback whose first save succeeds, arms a
fault, and lets the second save (end of epoch 2) hit it. Then, whatever the
fault:

- ``fit`` raised, in the epoch of the failed save (never a silent success);
- the previous committed checkpoint verifies and loads bit-exactly (the
  weights recorded when it was saved);
- the manifest view is consistent: exactly the checkpoints that verify;
- no temporary entry is left, and ``keepbest gc`` has nothing to report.

Faults: the store failing at each step of its commit (``_reached`` seam), an
exception inside the framework's own save after writing half a file, a real
full disk (a small tmpfs, filled up) and a real read-only filesystem (the
tmpfs remounted read-only), a directory without write permission (as root,
the training thread first gives up the capability to ignore permissions),
and a failure in the background writer (``async_save=True``).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import keras
import numpy as np
import pytest

import keepbest.keras
from keepbest.store import _fs
from keepbest import cli
from keepbest.errors import AsyncSaveError
from keepbest.keras import BackupAndRestore, ModelCheckpoint
from keepbest.keras._state import restore_variables
from keepbest.manager import CheckpointManager
from keepbest.store import LocalStore

from .conftest import Recorder, make_model, weights_of

FORMATS = ["best.keras", "best.weights.h5", "best.h5", "best_ckpt", "backup"]


class InjectedFault(OSError):
    pass


class ArmAfterFirstSave(keras.callbacks.Callback):
    def __init__(self, arm):
        super().__init__()
        self.arm = arm

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            self.arm()


def _callback(kind: str, folder: Path, async_save: bool = False) -> keras.callbacks.Callback:
    if kind == "backup":
        return BackupAndRestore(folder / "backup", delete_checkpoint=False, verbose=0)
    return ModelCheckpoint(folder / kind, monitor="loss", save_weights_only=kind.endswith(".weights.h5"),
                           async_save=async_save)


def _checkpoints(kind: str, folder: Path):
    if kind == "backup":
        return CheckpointManager(folder / "backup", series="backup").checkpoints()
    return CheckpointManager(folder, series=kind).checkpoints()


def _loaded_weights(kind: str, ckpt) -> list[np.ndarray]:
    model = make_model()
    if kind == "backup":
        restore_variables(model.weights, ckpt.reader(), "model.safetensors", "model weights")
        return weights_of(model)
    model.optimizer.build(model.trainable_variables)
    keepbest.keras.load_weights(model, ckpt.path)
    return weights_of(model)


def _train_into_fault(kind: str, folder: Path, digits, arm, async_save: bool = False):
    keras.utils.set_random_seed(3)
    model = make_model()
    recorder = Recorder()
    x, y = digits
    with pytest.raises((OSError, AsyncSaveError)) as raised:
        model.fit(x[:200], y[:200], batch_size=50, epochs=4, verbose=0,
                  callbacks=[ArmAfterFirstSave(arm), _callback(kind, folder, async_save), recorder])
    return raised.value, recorder


def _assert_nothing_lost(kind: str, folder: Path, recorder: Recorder) -> None:
    root = folder / "backup" if kind == "backup" else folder
    assert recorder.begun[-1] <= 2, f"the failed save of epoch 2 was reported only in epoch {recorder.begun[-1] + 1}"
    store = LocalStore(root)
    listed = _checkpoints(kind, folder)
    assert [c.epoch for c in listed] == [1], [c.name for c in listed]
    store.verify(listed[0].manifest)
    for saved, loaded in zip(recorder.by_epoch[1], _loaded_weights(kind, listed[0])):
        np.testing.assert_array_equal(saved, loaded)
    assert [p.name for p in root.iterdir() if p.name.startswith(".keepbest-")] == []
    assert store.orphans().dead == [] and store.orphans().undecided == []
    capsys = _capture_gc_dry_run(root)
    assert capsys == "nothing to clean\n", capsys


def _capture_gc_dry_run(root: Path) -> str:
    """What ``keepbest gc --dry-run`` prints: a user's check that nothing was left behind."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["gc", "--dry-run", str(root)]) == 0
    return out.getvalue()


# -- the store failing at each step of a commit (a file commit writes an intent first) ----------
COMMIT_STEPS = [(kind, step) for kind in FORMATS
                for step in (["staged"] if kind in ("best_ckpt", "backup") else ["staged", "intent_written"])]


@pytest.mark.parametrize("kind, step", COMMIT_STEPS)
def test_store_failing_during_commit_keeps_the_previous_checkpoint(tmp_path, digits, monkeypatch, kind, step):
    def arm():
        def fail(self, point):
            if point == step:
                raise InjectedFault(errno.EIO, f"injected fault at {point}")

        monkeypatch.setattr(LocalStore, "_reached", fail)

    error, recorder = _train_into_fault(kind, tmp_path, digits, arm)
    assert "injected fault" in str(error)
    _assert_nothing_lost(kind, tmp_path, recorder)


@pytest.mark.parametrize("kind", FORMATS)
def test_exception_inside_the_framework_save_keeps_the_previous_checkpoint(tmp_path, digits, monkeypatch, kind):
    def half_then_fail(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise InjectedFault(errno.EIO, "injected fault inside the framework's save")

    def arm():
        if kind in ("best_ckpt", "backup"):
            monkeypatch.setattr(_fs, "write_pieces", half_then_fail)
        else:
            monkeypatch.setattr(keras.Model, "save", lambda self, path, *a, **k: half_then_fail(path))
            monkeypatch.setattr(keras.Model, "save_weights", lambda self, path, *a, **k: half_then_fail(path))
            import keras.src.legacy.saving.legacy_h5_format as legacy

            monkeypatch.setattr(legacy, "save_weights_to_hdf5_group", lambda f, m: half_then_fail(f.filename))

    error, recorder = _train_into_fault(kind, tmp_path, digits, arm)
    assert "inside the framework's save" in str(error)
    _assert_nothing_lost(kind, tmp_path, recorder)


@pytest.mark.parametrize("kind", ["e{epoch}.keras", "e{epoch}_ckpt"])
def test_failure_in_the_middle_of_a_retention_delete_surfaces_and_keeps_the_new_checkpoint(
        tmp_path, digits, monkeypatch, kind):
    def arm():
        def fail(self, point):
            if point == "uncommitted":  # the old checkpoint is un-committed, its data not yet removed
                raise InjectedFault(errno.EIO, "injected fault in the middle of a delete")

        monkeypatch.setattr(LocalStore, "_reached", fail)

    keras.utils.set_random_seed(3)
    recorder = Recorder()
    x, y = digits
    with pytest.raises(OSError, match="in the middle of a delete"):
        make_model().fit(x[:200], y[:200], batch_size=50, epochs=4, verbose=0, callbacks=[
            ArmAfterFirstSave(arm), recorder, ModelCheckpoint(tmp_path / kind, monitor="loss", keep_last=1)])
    assert recorder.begun[-1] == 1
    (ckpt,) = CheckpointManager(tmp_path, series=kind).checkpoints()  # the old one is no longer listed
    assert ckpt.epoch == 2
    LocalStore(tmp_path).verify(ckpt.manifest)
    for saved, loaded in zip(recorder.by_epoch[2], _loaded_weights(kind, ckpt)):
        np.testing.assert_array_equal(saved, loaded)


def test_background_writer_failure_keeps_the_previous_checkpoint(tmp_path, digits, monkeypatch):
    real = _fs.write_pieces
    calls = []

    def fail_in_background(path, pieces, digest=None):
        if not path.name.endswith(".safetensors"):  # the tensor files, not the model config
            return real(path, pieces, digest)
        calls.append(path)
        if len(calls) > 2:  # the second save (model.safetensors, optimizer.safetensors per save)
            raise InjectedFault(errno.EIO, "injected fault in the background writer")
        return real(path, pieces, digest)

    monkeypatch.setattr(_fs, "write_pieces", fail_in_background)
    error, recorder = _train_into_fault("best_ckpt", tmp_path, digits, lambda: None, async_save=True)
    assert isinstance(error, AsyncSaveError) and "background writer" in str(error)
    _assert_nothing_lost("best_ckpt", tmp_path, recorder)


# -- real filesystems: full, read-only, not writable ----------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB tmpfs mounted for the test (needs root and mount rights; skipped otherwise)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", f"keepbest-{uuid.uuid4().hex[:8]}",
                           str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): the injected "
                    "ENOSPC cases still run")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(folder: Path, leave: int) -> None:
    """Fills the filesystem of ``folder`` until only ``leave`` bytes are free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
        f.flush()
        os.fsync(f.fileno())


@pytest.mark.parametrize("kind", FORMATS)
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(small_fs, digits, kind):
    def arm():
        size = sum(f.stat().st_size for f in small_fs.rglob("*") if f.is_file())
        _fill(small_fs, leave=size // 2)  # the next save runs out of space halfway

    error, recorder = _train_into_fault(kind, small_fs, digits, arm)
    assert any(e.errno == errno.ENOSPC for e in _chain(error)) or "No space left" in str(error), repr(error)
    if kind.endswith((".keras", ".h5")):  # refused before HDF5 starts, with what is free and what is needed
        assert f"Cannot save checkpoint {kind} in {small_fs}: " in str(error) and "bytes are free" in str(error)
    (small_fs / "filler").unlink()  # gc and verification need no space, but a user would free some first
    _assert_nothing_lost(kind, small_fs, recorder)


@pytest.mark.parametrize("kind", FORMATS)
def test_read_only_filesystem_keeps_the_previous_checkpoint(small_fs, digits, kind):
    def arm():
        subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)

    error, recorder = _train_into_fault(kind, small_fs, digits, arm)
    assert any(e.errno == errno.EROFS for e in _chain(error)) or "Read-only file system" in str(error), repr(error)
    subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], check=True)
    _assert_nothing_lost(kind, small_fs, recorder)


@pytest.mark.parametrize("kind", FORMATS)
def test_directory_without_write_permission_keeps_the_previous_checkpoint(tmp_path, digits, kind):
    root = tmp_path / "backup" if kind == "backup" else tmp_path
    folders = [root, root / ".keepbest"]
    caps = _DacOverride()

    def arm():
        for folder in folders:
            if folder.is_dir():
                folder.chmod(0o555)
        caps.drop()  # root ignores permissions unless this thread gives up CAP_DAC_OVERRIDE

    try:
        error, recorder = _train_into_fault(kind, tmp_path, digits, arm)
    finally:
        caps.restore()
        for folder in folders:
            if folder.is_dir():
                folder.chmod(0o755)
    assert any(e.errno == errno.EACCES for e in _chain(error)) or "Permission denied" in str(error), repr(error)
    _assert_nothing_lost(kind, tmp_path, recorder)


class _DacOverride:
    """Drops, for the calling thread only, root's capabilities to ignore file permissions (Linux).

    Capabilities are per thread: the training loop and the saves run on this
    thread, so they meet the permissions a normal user meets. Skips the test
    where that cannot be done (not Linux) and does nothing when not root.
    """

    _BITS = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH

    def __init__(self):
        self.saved = None

    def _call(self, name, header, data):
        if getattr(self._libc, name)(ctypes.byref(header), data) != 0:
            raise OSError(ctypes.get_errno(), f"{name} failed")

    def drop(self):
        if os.geteuid() != 0:
            return
        if not sys.platform.startswith("linux"):
            pytest.skip("running as root on a system where a thread cannot give up its capabilities")
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.header, self.data = _CapHeader(0x20080522, 0), (_CapData * 2)()  # _LINUX_CAPABILITY_VERSION_3
        self._call("capget", self.header, self.data)
        self.saved = self.data[0].effective
        self.data[0].effective &= ~self._BITS
        self._call("capset", self.header, self.data)

    def restore(self):
        if self.saved is not None:
            self.data[0].effective = self.saved
            self._call("capset", self.header, self.data)
            self.saved = None


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__

