"""Fine-tuning with a frozen backbone: each save writes only what changed, and every checkpoint stands alone."""

from __future__ import annotations

import shutil

import keras
import numpy as np

import keepbest.keras
from keepbest import CheckpointManager, LocalStore
from keepbest.keras import ModelCheckpoint

from .conftest import Recorder, weights_of


def _fine_tuning_model(optimizer="sgd"):
    """90% of the weights in a frozen backbone (2 MB kernel), 10% in a trainable head."""
    keras.utils.set_random_seed(5)
    inputs = keras.Input((512,))
    backbone = keras.layers.Dense(1024, activation="relu", name="backbone")
    head = keras.layers.Dense(56, name="head")
    model = keras.Model(inputs, head(backbone(inputs)))
    backbone.trainable = False
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _written(new, previous):
    """Bytes of ``new``'s files that are not hard links to ``previous``'s (what this save wrote)."""
    old = {p.stat().st_ino for p in previous.path.iterdir()}
    return sum(p.stat().st_size for p in new.path.iterdir() if p.stat().st_ino not in old and p.name != "manifest.json")


def test_fine_tuning_with_90_percent_frozen_writes_at_most_15_percent_per_save(tmp_path):
    # Plain SGD keeps no slots. (With Adam the head's two moment slots change at every step too, so
    # a save writes the head three times over: about 25% of this checkpoint; see the next test.)
    model = _fine_tuning_model()
    frozen = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights)
    assert frozen / sum(int(np.prod(v.shape)) for v in model.weights) > 0.9
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((256, 512)).astype("float32"), rng.integers(0, 56, 256)
    recorder = Recorder()
    model.fit(x, y, epochs=4, batch_size=64, verbose=0, callbacks=[
        recorder, ModelCheckpoint(str(tmp_path / "e{epoch}"), save_weights_only=True)])
    ckpts = CheckpointManager(tmp_path, series="e{epoch}").checkpoints()
    assert len(ckpts) == 4
    for previous, new in zip(ckpts, ckpts[1:]):
        assert _written(new, previous) <= 0.15 * new.size, (new.name, _written(new, previous), new.size)
    for ckpt in ckpts:  # each copied out alone verifies and loads the weights of its own epoch
        alone = tmp_path / "alone" / ckpt.name
        shutil.copytree(ckpt.path, alone)
        (copy,) = CheckpointManager(alone.parent, series="e{epoch}").checkpoints()
        LocalStore(alone.parent).verify(copy.manifest)
        fresh = _fine_tuning_model()
        keepbest.keras.load_weights(fresh, alone)
        for saved, loaded in zip(recorder.by_epoch[ckpt.epoch], weights_of(fresh)):
            np.testing.assert_array_equal(saved, loaded)
        shutil.rmtree(alone.parent)


def test_with_adam_the_frozen_backbone_is_still_linked_and_only_the_head_and_its_slots_are_written(tmp_path):
    model = _fine_tuning_model("adam")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((128, 512)).astype("float32"), rng.integers(0, 56, 128)
    model.fit(x, y, epochs=2, batch_size=64, verbose=0, callbacks=[ModelCheckpoint(str(tmp_path / "e{epoch}"))])
    first, second = CheckpointManager(tmp_path, series="e{epoch}").checkpoints()
    head = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_weights)
    assert (first.path / "model-00001.safetensors").stat().st_ino == (second.path / "model-00001.safetensors").stat().st_ino
    assert _written(second, first) < 3 * head + 64 * 1024  # head weights and Adam's m and v, plus headers and config
