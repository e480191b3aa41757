"""Keras training that saves to S3 (moto's server on 127.0.0.1, reached through AWS_ENDPOINT_URL only): the
bucket ends up holding what a local folder holds, loads are bit-exact, and the CLI agrees with itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import keepbest.keras
from keepbest import list_checkpoints
from keepbest.keras import BackupAndRestore, ModelCheckpoint

from .conftest import Recorder, make_model, weights_of
from .test_backup import Interrupt, make_model_built

pytest.importorskip("s3fs", reason="keepbest[s3] is not installed")

EPOCHS = 10


def _fit(model, digits, callbacks, epochs=EPOCHS):
    x, y = digits
    return model.fit(x[:300], y[:300], validation_data=(x[300:400], y[300:400]), batch_size=50, epochs=epochs,
                     verbose=0, callbacks=callbacks)


def _local_files(folder: Path) -> list[str]:
    out = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(p for p in out if not p.endswith(".keepbest-records.lock"))  # the local store's flock file


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "keepbest.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def keras_run(s3, digits, tmp_path_factory):
    """One fit that saves the same checkpoints to a local folder and to a bucket, with a Recorder."""
    local = tmp_path_factory.mktemp("local")
    url = s3.url("keras")
    keras.utils.set_random_seed(3)
    recorder = Recorder()
    history = _fit(make_model(), digits, [
        ModelCheckpoint(str(local / "ckpt-{epoch:02d}.keras"), keep_last=2, keep_best=1),
        ModelCheckpoint(url + "/ckpt-{epoch:02d}.keras", keep_last=2, keep_best=1),
        recorder])
    return local, url, history, recorder


def test_fit_leaves_in_the_bucket_exactly_what_it_leaves_on_disk(keras_run, s3):
    local, url, history, _ = keras_run
    best = int(np.argmin(history.history["val_loss"])) + 1
    kept = {f"ckpt-{e:02d}.keras" for e in (best, EPOCHS - 1, EPOCHS)}
    assert {c.name for c in list_checkpoints(url)} == kept
    assert s3.keys(url) == _local_files(local)


def test_load_model_from_the_bucket_returns_the_best_epochs_weights_bit_for_bit(keras_run):
    _, url, history, recorder = keras_run
    best = int(np.argmin(history.history["val_loss"])) + 1
    model = keepbest.keras.load_model(url)
    for got, want in zip(weights_of(model), recorder.by_epoch[best]):
        np.testing.assert_array_equal(got, want)


def test_ls_and_verify_on_the_url_agree(keras_run):
    _, url, _, _ = keras_run
    listed = _cli("ls", "--json", url)
    verified = _cli("verify", url)
    assert listed.returncode == 0 and verified.returncode == 0, (listed.stderr, verified.stderr)
    names = sorted(row["name"] for row in json.loads(listed.stdout))
    assert sorted(line.split()[1] for line in verified.stdout.splitlines() if line.startswith("ok ")) == names
    assert f"{len(names)} of {len(names)} checkpoint(s) verified" in verified.stdout


def test_the_folder_format_with_async_save_to_s3_keeps_what_it_keeps_locally(s3, digits, tmp_path):
    url = s3.url("async")
    keras.utils.set_random_seed(4)
    recorder = Recorder()
    _fit(make_model(), digits, [
        ModelCheckpoint(str(tmp_path / "ckpt-{epoch:02d}"), keep_last=2, async_save=True),
        ModelCheckpoint(url + "/ckpt-{epoch:02d}", keep_last=2, async_save=True), recorder], epochs=4)
    assert [c.name for c in list_checkpoints(url)] == ["ckpt-03", "ckpt-04"]
    assert s3.keys(url) == _local_files(tmp_path)
    model = make_model()
    keepbest.keras.load_weights(model, url + "/ckpt-03")
    for got, want in zip(weights_of(model), recorder.by_epoch[3]):
        np.testing.assert_array_equal(got, want)


def test_backup_and_restore_on_s3_resumes_the_remaining_epochs(s3, digits):
    url = s3.url("backup")
    keras.utils.set_random_seed(1)
    backup = BackupAndRestore(url, verbose=0)
    with pytest.raises(RuntimeError, match="Interrupting"):
        _fit(make_model(), digits, [backup, Interrupt(epoch=3)], epochs=6)
    history = _fit(make_model_built(digits), digits, [backup], epochs=6)
    assert len(history.history["loss"]) == 3
    assert s3.keys(url) == []  # delete_checkpoint=True: nothing is left once fit completes


def test_storage_options_reach_s3fs_without_the_environment(keras_run, s3, monkeypatch):
    _, url, history, recorder = keras_run
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    options = {"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"}
    model = make_model()
    best = int(np.argmin(history.history["val_loss"])) + 1
    keepbest.keras.load_weights(model, f"{url}/ckpt-{best:02d}.keras", storage_options=options)
    for got, want in zip(weights_of(model), recorder.by_epoch[best]):
        np.testing.assert_array_equal(got, want)


def test_a_url_in_a_bucket_that_does_not_exist_fails_before_training(digits):
    with pytest.raises(OSError, match=r"Cannot list s3://no-such-bucket-kb/run.*bucket 'no-such-bucket-kb'"):
        keepbest.CheckpointManager("s3://no-such-bucket-kb/run")


