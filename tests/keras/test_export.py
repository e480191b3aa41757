"""``keepbest export`` of a Keras checkpoint folder to Keras's own formats, and ``show`` of Keras checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from keepbest.comparison import compare
from keepbest.errors import CorruptCheckpointError
from keepbest.inspection import checkpoint_at
from keepbest.keras import ModelCheckpoint
from keepbest.keras import _export

from .conftest import make_model


def keepbest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keepbest.cli", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """A model fitted for one epoch, its keepbest checkpoint folder, and its predictions."""
    folder = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(5)
    model = make_model()
    x, y = digits
    model.fit(x[:200], y[:200], epochs=1, batch_size=50, verbose=0,
              callbacks=[ModelCheckpoint(str(folder / "ckpt-{epoch:02d}"))])
    return folder, x[:50], model.predict(x[:50], verbose=0)


def test_export_to_keras_loads_with_keras_and_predicts_the_same(trained, tmp_path):
    folder, x, predictions = trained
    result = keepbest("export", str(folder / "ckpt-01"), "--to", str(tmp_path / "model.keras"))
    assert result.returncode == 0, result.stderr
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), predictions)


def test_export_to_weights_h5_loads_into_the_model_and_predicts_the_same(trained, tmp_path):
    folder, x, predictions = trained
    result = keepbest("export", f"{folder}@latest", "--to", str(tmp_path / "model.weights.h5"))
    assert result.returncode == 0, result.stderr
    model = make_model()
    model.optimizer.build(model.trainable_variables)  # the file holds Adam's slots too (Keras needs them built)
    model.load_weights(tmp_path / "model.weights.h5")
    np.testing.assert_array_equal(model.predict(x, verbose=0), predictions)


def test_an_export_that_does_not_load_back_the_same_weights_is_deleted(trained, tmp_path, monkeypatch):
    real = keras.models.load_model

    def altered(*args, **kwargs):
        model = real(*args, **kwargs)
        model.weights[0].assign(model.weights[0] + 1.0)
        return model

    monkeypatch.setattr(keras.models, "load_model", altered)
    with pytest.raises(CorruptCheckpointError, match="does not load back to the checkpoint's weights"):
        _export.export_keras(checkpoint_at(f"{trained[0]}@latest"), str(tmp_path / "model.keras"))
    assert not (tmp_path / "model.keras").exists()


def test_export_to_keras_of_a_weights_only_checkpoint_is_refused(digits, tmp_path):
    x, y = digits
    make_model().fit(x[:100], y[:100], epochs=1, verbose=0, callbacks=[
        ModelCheckpoint(str(tmp_path / "w-{epoch}"), save_weights_only=True)])
    with pytest.raises(ValueError, match="holds no Keras model config .format 'keepbest-keras-weights'"):
        _export.export_keras(checkpoint_at(str(tmp_path / "w-1")), str(tmp_path / "model.keras"))


def test_show_of_a_keras_folder_marks_trainable_and_frozen_weights(digits, tmp_path):
    x, y = digits
    model = make_model()
    model.layers[0].trainable = False
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:100], y[:100], epochs=1, verbose=0, callbacks=[ModelCheckpoint(str(tmp_path / "c-{epoch}"))])
    doc = json.loads(keepbest("show", "--json", str(tmp_path / "c-1")).stdout)
    groups = {t["name"]: t["group"] for t in doc["tensors"] if t["file"].startswith("model")}
    first, second = model.layers[0].kernel.path, model.layers[1].kernel.path
    assert (groups[first], groups[second]) == ("frozen", "trainable")


def test_show_of_a_keras_file_lists_its_file_and_says_it_has_no_tensor_table(digits, tmp_path):
    x, y = digits
    make_model().fit(x[:100], y[:100], epochs=1, verbose=0,
                     callbacks=[ModelCheckpoint(str(tmp_path / "m-{epoch}.keras"))])
    result = keepbest("show", str(tmp_path / "m-1.keras"))
    assert result.returncode == 0, result.stderr
    assert "m-1.keras" in result.stdout and "none listed: a 'keras' checkpoint has no safetensors files" in result.stdout


def test_diff_of_keras_files_is_refused_for_want_of_safetensors(digits, tmp_path):
    x, y = digits
    make_model().fit(x[:100], y[:100], epochs=2, verbose=0,
                     callbacks=[ModelCheckpoint(str(tmp_path / "m-{epoch}.keras"))])
    with pytest.raises(ValueError, match="holds no safetensors files .format 'keras'"):
        compare(checkpoint_at(str(tmp_path / "m-1.keras")), checkpoint_at(str(tmp_path / "m-2.keras")))


def test_export_of_a_keras_file_checkpoint_to_a_folder_copies_it_with_its_manifest(digits, tmp_path):
    x, y = digits
    make_model().fit(x[:100], y[:100], epochs=1, verbose=0,
                     callbacks=[ModelCheckpoint(str(tmp_path / "run" / "m-{epoch}.keras"))])
    result = keepbest("export", str(tmp_path / "run" / "m-1.keras"), "--to", str(tmp_path / "shipped"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "shipped" / "m-1.keras").read_bytes() == (tmp_path / "run" / "m-1.keras").read_bytes()
    assert "1 of 1 checkpoint(s) verified" in keepbest("verify", str(tmp_path / "shipped")).stdout
