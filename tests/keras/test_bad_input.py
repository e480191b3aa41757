"""Bad input is rejected with a clear error, and loading never runs code from a checkpoint.

The fuzz tests of manifests and safetensors headers live with their modules
(``tests/core/test_manifest.py``, ``tests/core/test_codec.py``); here: Keras
configs that would run code, and the training state of a backup.
"""

from __future__ import annotations

import json

import hypothesis.strategies as st
import keras
import pytest
from hypothesis import HealthCheck, given, settings

import keepbest.keras
from keepbest.errors import CorruptCheckpointError
from keepbest.keras import ModelCheckpoint
from keepbest.keras._backup import _read_plan as _read_plan_of
from keepbest.manifest import Manifest
from keepbest.store import LocalStore
from keepbest.keras._resume import rng_state


def _model_with_lambda(marker):
    # A lambda is saved as Python bytecode: an unsafe load would run it (it writes the marker file).
    side_effect = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(side_effect), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    return model


@pytest.mark.parametrize("filepath", ["m.keras", "m_ckpt"])
def test_loading_a_model_whose_config_holds_code_raises_and_runs_nothing(tmp_path, filepath):
    marker = tmp_path / "ran"
    model = _model_with_lambda(marker)
    marker.unlink()  # building the model ran it once, here
    cb = ModelCheckpoint(tmp_path / filepath)
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_epoch_end(0, {"loss": 1.0})
    with pytest.raises(ValueError, match="safe_mode"):
        keepbest.keras.load_model(tmp_path / filepath)
    assert not marker.exists()


def _read_plan(path):
    """Reads ``path`` (a training.json) as BackupAndRestore reads it from a committed backup."""
    backup = Manifest(path.parent.name, "dir", "keepbest-keras-backup", series="backup")
    return _read_plan_of(LocalStore(path.parent.parent).reader(backup))


def _valid_plan() -> dict:
    return {"epoch": 2, "batch": 3, "steps_per_execution": 1, "last_batch_seen": 2, "batches_since_save": 0,
            "rng": rng_state(), "rng_epoch_begin": rng_state(), "global_seed": None, "logs": {"loss": 0.5},
            "callbacks": {}, "pending": []}


def test_a_valid_training_state_is_read(tmp_path):
    path = tmp_path / "training.json"
    path.write_text(json.dumps(_valid_plan()))
    assert _read_plan(path)["batch"] == 3


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
KEYS = sorted(_valid_plan())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(KEYS + ["python", "numpy", "keys"]), st.booleans(),
       json_values | st.integers(-2**70, 2**70))
def test_a_mutated_training_state_is_read_or_rejected_as_corrupt(tmp_path, key, delete, value):
    doc = _valid_plan()
    target = doc["rng"] if key == "python" else doc["rng"]["numpy"] if key == "numpy" else doc
    key = {"numpy": "keys", "keys": "pos"}.get(key, key)
    if delete:
        target.pop(key, None)
    else:
        target[key] = value
    path = tmp_path / "training.json"
    path.write_text(json.dumps(doc))
    try:
        plan = _read_plan(path)
    except CorruptCheckpointError as e:
        assert "training.json: it is not a training state written by keepbest" in str(e)
    else:
        assert isinstance(plan["epoch"], int) and isinstance(plan["rng"], dict)
        from keepbest.keras._resume import set_rng_state

        set_rng_state(plan["rng"])  # an accepted state can be applied


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_training_state_are_rejected_as_corrupt(tmp_path, raw):
    path = tmp_path / "training.json"
    path.write_bytes(raw)
    with pytest.raises(CorruptCheckpointError, match="not a training state written by keepbest"):
        _read_plan(path)


@pytest.mark.parametrize("callback", ["ModelCheckpoint", "BackupAndRestore"])
def test_a_coordinator_other_than_jaxs_is_refused_by_the_keras_callbacks(tmp_path, callback):
    from keepbest.distributed import Solo

    with pytest.raises(TypeError, match=r"coordinator must be a keepbest.distributed.JaxCoordinator .*"
                                        r"Received: coordinator=<keepbest.distributed._base.Solo"):
        getattr(keepbest.keras, callback)(str(tmp_path / "ckpt"), coordinator=Solo())


def test_a_manager_refuses_a_coordinator_that_is_not_one(tmp_path):
    from keepbest import CheckpointManager

    with pytest.raises(TypeError, match="coordinator must be a keepbest.distributed coordinator"):
        CheckpointManager(str(tmp_path), coordinator="jax")
