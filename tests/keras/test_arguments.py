"""ModelCheckpoint's constructor: Keras's signature, and bad arguments failing in __init__."""

from __future__ import annotations

import inspect

import keras
import pytest

from keepbest.keras import ModelCheckpoint

from .conftest import drive


def test_signature_matches_keras_positional_arguments_and_defaults():
    ours = inspect.signature(ModelCheckpoint.__init__).parameters
    theirs = inspect.signature(keras.callbacks.ModelCheckpoint.__init__).parameters
    keras_args = [(n, p.default) for n, p in theirs.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    our_args = [(n, p.default) for n, p in ours.items() if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert our_args == keras_args


def test_extras_are_keyword_only():
    params = inspect.signature(ModelCheckpoint.__init__).parameters
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in ("keep_last", "keep_best", "min_delta"))


@pytest.mark.parametrize("save_freq", [0, -1, True, False, "batch", 1.5, None])
def test_bad_save_freq_fails_at_construction(tmp_path, save_freq):
    with pytest.raises(ValueError, match=r"Unrecognized save_freq.*Received: save_freq="):
        ModelCheckpoint(str(tmp_path / "m.keras"), save_freq=save_freq)


def test_unknown_keyword_is_a_type_error_naming_the_closest_argument(tmp_path):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'save_best'.*Did you mean 'save_best_only'"):
        ModelCheckpoint(str(tmp_path / "m.keras"), save_best=True)


def test_unknown_mode_fails_at_construction(tmp_path):
    with pytest.raises(ValueError, match=r"mode 'maximum' is unknown.*Received: mode='maximum'"):
        ModelCheckpoint(str(tmp_path / "m.keras"), mode="maximum")


def test_keras_file_with_save_weights_only_keeps_keras_message(tmp_path):
    with pytest.raises(ValueError, match=r"must end in `\.weights\.h5`.*Received: filepath="):
        ModelCheckpoint(str(tmp_path / "m.keras"), save_weights_only=True)


def test_weights_file_without_save_weights_only_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"holds weights only.*save_weights_only=True"):
        ModelCheckpoint(str(tmp_path / "m.weights.h5"))


@pytest.mark.parametrize("bad", [0, -2, True, 1.0])
def test_keep_last_must_be_a_positive_integer(tmp_path, bad):
    with pytest.raises(ValueError, match=r"`keep_last` must be a positive integer"):
        ModelCheckpoint(str(tmp_path / "m.keras"), keep_last=bad)


@pytest.mark.parametrize("bad", [float("nan"), "0.5"])
def test_initial_value_threshold_must_be_a_number(tmp_path, bad):
    with pytest.raises(ValueError, match=r"`initial_value_threshold` must be a number.*Received: initial_value_threshold="):
        ModelCheckpoint(str(tmp_path / "m.keras"), initial_value_threshold=bad)


def test_infinite_initial_value_threshold_in_max_mode_is_never_beaten_as_in_keras(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "m.keras"), monitor="val_loss", mode="max", save_best_only=True,
                         initial_value_threshold=float("inf"))
    drive(cb, model, [{"loss": 1.0, "val_loss": 0.5}])
    assert not (tmp_path / "m.keras").exists()


def test_malformed_template_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"not a valid format template"):
        ModelCheckpoint(str(tmp_path / "m{epoch.keras"))


def test_path_without_keras_extension_is_accepted_as_keepbest_folder(tmp_path):
    cb = ModelCheckpoint(str(tmp_path / "checkpoint"), save_weights_only=True)
    assert cb.format == "keepbest-keras-weights"


def test_period_saves_every_n_epochs_with_a_deprecation_warning(tmp_path, model):
    with pytest.warns(FutureWarning, match=r"`period` argument is deprecated"):
        cb = ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), period=2)
    drive(cb, model, [{"loss": 1.0}] * 5)
    assert sorted(p.name for p in tmp_path.glob("*.keras")) == ["e2.keras", "e4.keras"]


def test_options_is_ignored_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"`options`.*ignored"):
        ModelCheckpoint(str(tmp_path / "m.keras"), options=object())
