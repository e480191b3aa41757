"""Where checkpoints go is decided, and checked, when the callback is built: URLs, empty and relative
paths, templates, long names and links."""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keepbest.keras
from keepbest import CheckpointManager, StorageError, list_checkpoints
from keepbest.keras import BackupAndRestore, ModelCheckpoint, SidecarEvaluator

from .conftest import make_model, weights_of

URL = "s3://kbest/run/ckpt-{epoch:02d}.keras"
# Runs a CLI command as a process without s3fs (keepbest[s3] not installed).
WITHOUT_S3FS = "import sys; sys.modules['s3fs'] = None; from keepbest.cli import main; sys.exit(main())"


def _fit(model, digits, callbacks, epochs=2, **kwargs):
    x, y = digits
    return model.fit(x[:128], y[:128], batch_size=32, epochs=epochs, verbose=0, callbacks=callbacks, **kwargs)


def _nothing_written(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def without_s3fs(monkeypatch):
    """As if keepbest[s3] were not installed: importing s3fs fails."""
    monkeypatch.setitem(sys.modules, "s3fs", None)


def test_an_s3_url_without_s3fs_raises_at_construction_with_the_install_hint(tmp_path, monkeypatch, without_s3fs):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"Cannot use s3://kbest/run/ckpt-.*pip install 'keepbest\[s3\]'"):
        ModelCheckpoint(URL, keep_last=2, keep_best=1)
    assert _nothing_written(tmp_path) == []


def test_a_gs_url_is_refused_at_construction_saying_gcs_is_untested(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"Cannot use gs://kbest/run/.*serves s3:// only.*untested.*Nothing was "
                                           r"written"):
        ModelCheckpoint("gs://kbest/run/ckpt-{epoch:02d}.keras", keep_last=2, keep_best=1)
    assert _nothing_written(tmp_path) == []


@pytest.mark.parametrize("build", [
    lambda url: CheckpointManager(url),
    lambda url: BackupAndRestore(url),
    lambda url: keepbest.keras.load_model(url),
    lambda url: keepbest.keras.load_weights(make_model(), url),
    lambda url: keepbest.list_checkpoints(url),
    lambda url: SidecarEvaluator(make_model(), None, url),
], ids=["CheckpointManager", "BackupAndRestore", "load_model", "load_weights", "list_checkpoints", "SidecarEvaluator"])
def test_every_api_that_takes_a_path_refuses_a_url_it_cannot_serve(tmp_path, monkeypatch, without_s3fs, build):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"Cannot use s3://kbest/run.*pip install 'keepbest\[s3\]'.*Nothing was written"):
        build("s3://kbest/run")
    assert _nothing_written(tmp_path) == []


@pytest.mark.parametrize("command", ["ls", "verify", "gc"])
def test_the_cli_refuses_a_url_it_cannot_serve(tmp_path, command):
    result = subprocess.run([sys.executable, "-c", WITHOUT_S3FS, command, "s3://kbest/run"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "pip install 'keepbest[s3]'" in result.stderr
    assert _nothing_written(tmp_path) == []


def test_an_unknown_url_scheme_is_refused_naming_what_is_supported(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match=r"cannot store checkpoints at ftp:// URLs.*file:// URL.*s3://"):
        ModelCheckpoint("ftp://host/run/ckpt.keras")
    assert _nothing_written(tmp_path) == []


def test_file_urls_and_home_paths_keep_working(tmp_path, digits, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _fit(make_model(), digits, [ModelCheckpoint(f"file://{tmp_path}/a/e{{epoch}}.keras"),
                                ModelCheckpoint("~/b/e{epoch}.keras")])
    assert [c.name for c in list_checkpoints(tmp_path / "a")] == ["e1.keras", "e2.keras"]
    assert [c.name for c in list_checkpoints(tmp_path / "home" / "b")] == ["e1.keras", "e2.keras"]
    assert [c.name for c in list_checkpoints(f"file://{tmp_path}/a")] == ["e1.keras", "e2.keras"]


def test_an_empty_filepath_is_refused_at_construction(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"ModelCheckpoint needs a filepath.*Received: filepath=''"):
        ModelCheckpoint("")
    with pytest.raises(ValueError, match=r"The checkpoint location is empty"):
        CheckpointManager("")
    assert _nothing_written(tmp_path) == []


def test_a_batch_field_with_epoch_saves_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"uses \{batch\}, but save_freq='epoch'.*Received: filepath=ckpt-\{batch\}"):
        ModelCheckpoint("ckpt-{batch}.keras")
    ModelCheckpoint("ckpt-{batch}.keras", save_freq=4)  # batch saves have a batch


def test_retention_with_a_placeholder_in_the_folder_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"puts each checkpoint in a folder of its own \('runs/e\{epoch\}'"):
        ModelCheckpoint("runs/e{epoch}/model.keras", keep_last=1)
    ModelCheckpoint("runs/e{epoch}/model.keras")  # without retention a folder per epoch is fine


class ChangeDirectory(keras.callbacks.Callback):
    def __init__(self, to):
        super().__init__()
        self.to = to

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            os.chdir(self.to)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_relative_filepath_means_the_folder_current_when_the_callback_was_built(tmp_path, digits, monkeypatch,
                                                                                   async_save):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    checkpoint = ModelCheckpoint("ckpt/e{epoch}", async_save=async_save, keep_last=2)
    _fit(make_model(), digits, [checkpoint, ChangeDirectory(tmp_path / "b")], epochs=3)
    assert [c.name for c in list_checkpoints(tmp_path / "a" / "ckpt")] == ["e2", "e3"]
    assert _nothing_written(tmp_path / "b") == []


@pytest.mark.parametrize("suffix", [".keras", ""])
def test_a_file_name_of_249_characters_saves_as_keras_allows(tmp_path, digits, suffix):
    name = "m" * (249 - len(suffix) - 2) + "{epoch}" + suffix  # 249 characters once {epoch} is 1 digit
    _fit(make_model(), digits, [ModelCheckpoint(str(tmp_path / name), keep_last=1)])
    (ckpt,) = list_checkpoints(tmp_path)
    assert len(ckpt.name) == 248 and ckpt.epoch == 2
    keepbest.keras.load_weights(make_model(), ckpt.location)


def test_a_file_name_longer_than_any_filesystem_allows_is_refused_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"is 256 bytes long before its placeholders are filled"):
        ModelCheckpoint(str(tmp_path / ("m" * 250 + "{epoch}.keras")))


def test_a_checkpoint_file_that_is_a_link_is_updated_through_the_link(tmp_path, digits):
    (tmp_path / "shared").mkdir()
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "best.keras"
    link.symlink_to(tmp_path / "shared" / "target.keras")
    model = make_model()
    _fit(model, digits, [ModelCheckpoint(str(link), monitor="loss", save_best_only=True)], epochs=3)
    assert link.is_symlink() and (tmp_path / "shared" / "target.keras").is_file()
    loaded = keras.models.load_model(tmp_path / "shared" / "target.keras")
    for a, b in zip(weights_of(model), weights_of(loaded)):
        np.testing.assert_array_equal(a, b)
    (ckpt,) = list_checkpoints(tmp_path / "run")
    assert ckpt.name == "best.keras" and ckpt.epoch == 3
    assert subprocess.run([sys.executable, "-m", "keepbest.cli", "verify", str(tmp_path / "run")],
                          capture_output=True, timeout=60).returncode == 0
