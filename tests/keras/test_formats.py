"""Every format the path can ask for round-trips, is verified on load, and names mismatches."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

import keepbest.keras
from keepbest import CheckpointNotFoundError, CorruptCheckpointError, StateMismatchError
from keepbest.keras import ModelCheckpoint
from tests.helpers import flip_byte

from .conftest import make_model, weights_of


def _trained(tmp_path, digits, filepath, **kwargs):
    x, y = digits
    keras.utils.set_random_seed(2)
    model = make_model()
    model.fit(x, y, epochs=2, batch_size=64, verbose=0,
              callbacks=[ModelCheckpoint(str(tmp_path / filepath), monitor="loss", **kwargs)])
    return model


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _optimizer_state(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.optimizer.variables]


@pytest.mark.parametrize("filepath, save_weights_only", [
    ("m.keras", False), ("m.h5", False), ("m.hdf5", False), ("ckpt", False),
])
def test_full_model_formats_round_trip(tmp_path, digits, filepath, save_weights_only):
    model = _trained(tmp_path, digits, filepath, save_weights_only=save_weights_only)
    restored = keepbest.keras.load_model(tmp_path / filepath)
    assert _same(weights_of(restored), weights_of(model))


@pytest.mark.parametrize("filepath", ["m.weights.h5", "m.h5", "ckpt"])
def test_weights_only_formats_round_trip(tmp_path, digits, filepath):
    model = _trained(tmp_path, digits, filepath, save_weights_only=True)
    fresh = make_model()
    keepbest.keras.load_weights(fresh, tmp_path / filepath)
    assert _same(weights_of(fresh), weights_of(model))


def test_keras_files_stay_loadable_by_keras_itself(tmp_path, digits):
    model = _trained(tmp_path, digits, "m.keras")
    assert _same(weights_of(keras.models.load_model(tmp_path / "m.keras")), weights_of(model))
    model = _trained(tmp_path, digits, "w.weights.h5", save_weights_only=True)
    fresh = make_model()
    fresh.optimizer.build(fresh.trainable_variables)  # Keras needs this to accept Adam's saved slots
    fresh.load_weights(tmp_path / "w.weights.h5")
    assert _same(weights_of(fresh), weights_of(model))


def test_keepbest_folder_restores_optimizer_state(tmp_path, digits):
    model = _trained(tmp_path, digits, "ckpt", save_weights_only=True)
    fresh = make_model()
    keepbest.keras.load_weights(fresh, tmp_path / "ckpt")
    assert _same(_optimizer_state(fresh), _optimizer_state(model))
    assert int(keras.ops.convert_to_numpy(fresh.optimizer.iterations)) == 2 * 10  # 600 samples / 64


def test_keepbest_folder_holds_safetensors_config_and_manifest(tmp_path, digits):
    _trained(tmp_path, digits, "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "manifest.json", "model.json", "model.safetensors", "optimizer.safetensors"]


def test_tensorflow_guide_example_runs_with_keepbest(tmp_path, digits):
    x, y = digits
    model = make_model()
    # The TF 2.9 guide's example, with the import changed (tf.keras.callbacks -> keepbest.keras).
    EPOCHS = 3
    checkpoint_filepath = str(tmp_path / "checkpoint")
    model_checkpoint_callback = keepbest.keras.ModelCheckpoint(
        filepath=checkpoint_filepath,
        save_weights_only=True,
        monitor='val_accuracy',
        mode='max',
        save_best_only=True)
    history = model.fit(x, y, validation_split=0.2, epochs=EPOCHS, verbose=0, callbacks=[model_checkpoint_callback])
    # The model weights (that are considered the best) are loaded into the model.
    keepbest.keras.load_weights(model, checkpoint_filepath)
    assert model_checkpoint_callback.best == pytest.approx(max(history.history["val_accuracy"]))
    _loss, acc = model.evaluate(x[480:], y[480:], verbose=0)
    assert acc == pytest.approx(model_checkpoint_callback.best, abs=1e-6)


@keras.saving.register_keras_serializable(package="keepbest_tests")
class SimpleModel(keras.Model):
    """The seed tutorial's subclassed model, small."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = keras.layers.Conv2D(4, (3, 3), activation="relu")
        self.flatten = keras.layers.Flatten()
        self.dense1 = keras.layers.Dense(8, activation="relu")
        self.dense2 = keras.layers.Dense(10)

    def call(self, inputs):
        return self.dense2(self.dense1(self.flatten(self.conv1(inputs))))


@pytest.mark.parametrize("filepath", ["best_model.h5", "best_model.keras", "best_model"])
def test_seed_tutorial_subclassed_model_saves_and_reloads(tmp_path, digits, filepath):
    x, y = digits
    x = x.reshape(-1, 8, 8, 1)
    model = SimpleModel()
    model.compile(optimizer='adam', loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=['accuracy'])
    checkpoint = ModelCheckpoint(filepath=str(tmp_path / filepath), save_best_only=True, monitor='val_loss',
                                 mode='min', verbose=0)
    model.fit(x, y, epochs=2, batch_size=32, validation_split=0.2, callbacks=[checkpoint], verbose=0)
    fresh = SimpleModel()
    fresh(x[:1])
    keepbest.keras.load_weights(fresh, tmp_path / filepath)
    fresh.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert fresh.evaluate(x[480:], y[480:], verbose=0) == pytest.approx(checkpoint.best, rel=1e-5)


def test_load_weights_rejects_a_different_architecture_naming_the_variables(tmp_path, digits):
    _trained(tmp_path, digits, "ckpt", save_weights_only=True)
    wider = make_model(hidden=32)
    with pytest.raises(StateMismatchError, match=r"size or dtype mismatch.*dense.*kernel: checkpoint \(64, 16\) "
                                                 r"float32, model \(64, 32\)"):
        keepbest.keras.load_weights(wider, tmp_path / "ckpt")


def test_load_weights_lists_missing_keys_when_layers_differ(tmp_path, digits):
    _trained(tmp_path, digits, "ckpt", save_weights_only=True)
    deeper = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16), keras.layers.Dense(16),
                               keras.layers.Dense(10)])
    with pytest.raises(StateMismatchError, match=r"Missing key\(s\) in checkpoint: \"[^\"]*dense[^\"]*/kernel\""):
        keepbest.keras.load_weights(deeper, tmp_path / "ckpt")


def test_load_model_of_weights_only_checkpoint_explains_what_to_do(tmp_path, digits):
    _trained(tmp_path, digits, "ckpt", save_weights_only=True)
    with pytest.raises(ValueError, match=r"save_weights_only=True.*keepbest.keras.load_weights"):
        keepbest.keras.load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("filepath", ["m.keras", "ckpt"])
def test_load_detects_a_flipped_byte_and_names_the_file(tmp_path, digits, filepath):
    _trained(tmp_path, digits, filepath)
    target = tmp_path / filepath
    victim = target / "model.safetensors" if target.is_dir() else target
    flip_byte(victim, offset=victim.stat().st_size // 2, mask=0x01)
    with pytest.raises(CorruptCheckpointError, match=rf"file {victim}"):
        keepbest.keras.load_model(target)


def test_loading_a_folder_of_checkpoints_takes_the_best(tmp_path, digits):
    x, y = digits
    cb = ModelCheckpoint(str(tmp_path / "e{epoch}"), monitor="val_loss")
    make_model().fit(x, y, validation_split=0.2, epochs=3, verbose=0, callbacks=[cb])
    best_epoch = min(range(1, 4), key=lambda e: json.loads(
        (tmp_path / f"e{e}" / "manifest.json").read_text())["metrics"]["val_loss"])
    expected = keepbest.keras.load_model(tmp_path / f"e{best_epoch}")
    assert _same(weights_of(keepbest.keras.load_model(tmp_path)), weights_of(expected))


@pytest.mark.parametrize("filepath", ["m.keras", "ckpt"])
def test_a_damaged_manifest_fails_the_load_instead_of_skipping_verification(tmp_path, digits, filepath):
    _trained(tmp_path, digits, filepath)
    manifest = tmp_path / "ckpt" / "manifest.json" if filepath == "ckpt" else tmp_path / ".keepbest" / "m.keras.json"
    manifest.write_text("{")
    with pytest.raises(CorruptCheckpointError, match=rf"Cannot read manifest {manifest}"):
        keepbest.keras.load_model(tmp_path / filepath)


def test_trailing_separator_names_the_checkpoint_folder(tmp_path, digits):
    model = _trained(tmp_path, digits, "ckpt/", save_weights_only=True)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["ckpt"]
    fresh = make_model()
    keepbest.keras.load_weights(fresh, tmp_path / "ckpt")
    assert _same(weights_of(fresh), weights_of(model))


def test_loading_nothing_raises_checkpoint_not_found(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=r"No checkpoint at .*does not exist"):
        keepbest.keras.load_model(tmp_path / "missing")
    with pytest.raises(CheckpointNotFoundError, match=r"empty folder"):
        keepbest.keras.load_weights(make_model(), tmp_path)


def test_load_detects_a_truncated_file_and_names_it(tmp_path, digits):
    _trained(tmp_path, digits, "ckpt")
    victim = tmp_path / "ckpt" / "optimizer.safetensors"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match=rf"file {victim} does not match its manifest"):
        keepbest.keras.load_weights(make_model(), tmp_path / "ckpt")


def test_load_with_fallback_takes_the_newest_checkpoint_that_verifies(tmp_path, digits):
    from .conftest import user_warnings

    x, y = digits
    make_model().fit(x, y, epochs=3, verbose=0, callbacks=[ModelCheckpoint(str(tmp_path / "e{epoch}"))])
    damaged = tmp_path / "e3" / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-4] + b"\0\0\0\0")
    expected = keepbest.keras.load_model(tmp_path / "e2")
    with user_warnings(r"instead of .*e3.*fallback=True") as found:
        model = keepbest.keras.load_model(tmp_path / "e3", fallback=True)
    assert found and str(damaged) in found[0]
    assert _same(weights_of(model), weights_of(expected))


def test_load_with_fallback_and_nothing_else_to_load_raises_naming_the_file(tmp_path, digits):
    _trained(tmp_path, digits, "ckpt")
    victim = tmp_path / "ckpt" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(CorruptCheckpointError, match=rf"file {victim} does not match its manifest"):
        keepbest.keras.load_weights(make_model(), tmp_path / "ckpt", fallback=True)
