"""When the callback saves, under which name, what it records, and what retention keeps."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keepbest.keras import ModelCheckpoint
from keepbest.discovery import list_checkpoints
from keepbest.store import LocalStore

from .conftest import drive, make_model, user_warnings, weights_of


def _names(folder, pattern="*"):
    return sorted(p.name for p in folder.glob(pattern) if not p.name.startswith("."))


def test_int_save_freq_with_save_best_only_works_on_batch_metrics(tmp_path, digits):
    x, y = digits  # Keras 3.15 crashes here with "'NoneType' object is not callable"
    cb = ModelCheckpoint(str(tmp_path / "e{epoch}b{batch}.keras"), monitor="loss", save_best_only=True, save_freq=3)
    make_model().fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    ckpts = list_checkpoints(tmp_path)
    assert len(ckpts) >= 2
    losses = [c.metrics["loss"] for c in ckpts]
    assert losses == sorted(losses, reverse=True)  # each save improved on the previous
    assert all(c.batch is not None and c.batch % 3 == 0 for c in ckpts if c.epoch == 1)


@pytest.mark.skipif(keras.backend.backend() == "torch",
                    reason="Keras: `steps_per_execution` must be 1 with the PyTorch backend")
def test_batch_saves_count_batches_with_steps_per_execution(tmp_path, digits):
    x, y = digits  # 480 samples / 32 = 15 batches per epoch, seen in steps of 3
    model = make_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", steps_per_execution=3)
    cb = ModelCheckpoint(str(tmp_path / "e{epoch}b{batch}.keras"), save_freq=6)
    model.fit(x[:480], y[:480], epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    assert _names(tmp_path) == sorted(["e1b6.keras", "e1b12.keras", "e2b3.keras", "e2b9.keras", "e2b15.keras"])


def test_template_fills_one_based_epoch_and_logs_keys(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "e{epoch:02d}-{val_loss:.2f}.keras"))
    drive(cb, model, [{"loss": 1.0, "val_loss": 0.5}, {"loss": 0.9, "val_loss": 0.25}])
    assert _names(tmp_path) == ["e01-0.50.keras", "e02-0.25.keras"]


def test_template_with_unknown_key_fails_like_keras(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "{val_auc}.keras"))
    with pytest.raises(KeyError, match=r"Failed to format this callback filepath"):
        drive(cb, model, [{"loss": 1.0}])


def test_placeholder_in_the_folder_part_creates_one_folder_per_epoch(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "run{epoch}" / "m.keras"))
    drive(cb, model, [{"loss": 1.0}, {"loss": 0.5}])
    assert (tmp_path / "run1" / "m.keras").is_file() and (tmp_path / "run2" / "m.keras").is_file()


@pytest.mark.parametrize("template", ["e{epoch}.keras", "e{epoch}"])
def test_keep_last_2_keep_best_1_over_val_loss_leaves_epochs_2_4_5(tmp_path, model, template):
    cb = ModelCheckpoint(str(tmp_path / template), keep_last=2, keep_best=1)
    drive(cb, model, [{"loss": 1.0, "val_loss": v} for v in (3, 1, 2, 4, 5)])
    ckpts = list_checkpoints(tmp_path)
    assert sorted(c.epoch for c in ckpts) == [2, 4, 5]
    assert _names(tmp_path) == sorted(template.format(epoch=e) for e in (2, 4, 5))
    assert [c.epoch for c in ckpts if c.is_best] == [2]


def test_retention_never_touches_files_of_another_filepath(tmp_path, model):
    drive(ModelCheckpoint(str(tmp_path / "other{epoch}.keras")), model, [{"loss": 1.0}] * 3)
    drive(ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), keep_last=1), model, [{"loss": 1.0}] * 3)
    assert _names(tmp_path) == ["e3.keras", "other1.keras", "other2.keras", "other3.keras"]


def test_retention_resumes_from_what_is_on_disk(tmp_path, model):
    drive(ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), keep_last=2), model, [{"loss": 1.0}] * 3)
    # A restarted run writes e1..e5 again; the two newest commits win, whatever their names.
    drive(ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), keep_last=2), model, [{"loss": 1.0}] * 5)
    assert _names(tmp_path, "e*") == ["e4.keras", "e5.keras"]


def test_manifest_records_epoch_batch_step_metrics_and_versions(tmp_path, digits):
    x, y = digits
    cb = ModelCheckpoint(str(tmp_path / "m.keras"))
    make_model().fit(x, y, validation_split=0.2, epochs=2, batch_size=32, verbose=0, callbacks=[cb])
    (ckpt,) = list_checkpoints(tmp_path)
    assert (ckpt.epoch, ckpt.manifest.batch, ckpt.step) == (2, None, 2 * 15)
    assert set(ckpt.metrics) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert ckpt.manifest.versions["keras_backend"] == keras.backend.backend()
    assert ckpt.manifest.monitor is not None and ckpt.manifest.monitor.mode == "min"


def test_existing_directory_at_a_file_path_raises_keras_message(tmp_path, model):
    (tmp_path / "m.keras").mkdir()
    cb = ModelCheckpoint(str(tmp_path / "m.keras"))
    with pytest.raises(IOError, match=r"Please specify a non-directory filepath for ModelCheckpoint"):
        drive(cb, model, [{"loss": 1.0}])


def test_exception_inside_keras_save_keeps_the_previous_best(tmp_path, model):
    path = tmp_path / "m.keras"
    cb = ModelCheckpoint(str(path), save_best_only=True)
    drive(cb, model, [{"loss": 1.0, "val_loss": 0.5}])
    before = path.read_bytes()
    good = weights_of(model)

    def broken_save(filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"PK half a zip")
        raise OSError(28, "No space left on device")

    model.save = broken_save
    with pytest.raises(OSError, match="No space left on device"):
        cb.on_epoch_end(1, {"loss": 1.0, "val_loss": 0.1})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".keepbest-tmp")] == []
    restored = keras.models.load_model(path, compile=False)  # never trained: no optimizer state
    assert all(np.array_equal(a, b) for a, b in zip(weights_of(restored), good))
    LocalStore(tmp_path).verify(list_checkpoints(path)[0].manifest)


def test_load_weights_on_restart_restores_the_newest_checkpoint(tmp_path, model):
    drive(ModelCheckpoint(str(tmp_path / "e{epoch}.keras")), model, [{"loss": 1.0}] * 2)
    saved = weights_of(model)
    fresh = make_model(hidden=16)
    assert not all(np.array_equal(a, b) for a, b in zip(weights_of(fresh), saved))
    cb = ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), load_weights_on_restart=True)
    cb.set_model(fresh)
    cb.on_train_begin()
    assert all(np.array_equal(a, b) for a, b in zip(weights_of(fresh), saved))


def test_restart_never_overwrites_the_best_with_a_worse_model_under_the_same_name(tmp_path, model):
    drive(ModelCheckpoint(str(tmp_path / "e{epoch}.keras")), model, [{"loss": 1.0, "val_loss": v} for v in (3, 1, 2)])
    best_before = (tmp_path / "e2.keras").read_bytes()
    first_before = (tmp_path / "e1.keras").read_bytes()
    restarted = ModelCheckpoint(str(tmp_path / "e{epoch}.keras"))  # a restart counts epochs from 1 again
    with user_warnings(r"not overwriting .*e2.keras: it holds the best val_loss so far \(1.00000") as found:
        drive(restarted, make_model(), [{"loss": 1.0, "val_loss": v} for v in (4, 5)])
    assert len(found) == 1
    assert (tmp_path / "e2.keras").read_bytes() == best_before
    assert (tmp_path / "e1.keras").read_bytes() != first_before  # a name that is not the best is reused as in Keras


def test_fixed_filepath_is_overwritten_every_epoch_as_in_keras(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "last.keras"))
    drive(cb, model, [{"loss": 1.0, "val_loss": v} for v in (1, 2, 3)])
    (ckpt,) = list_checkpoints(tmp_path / "last.keras")
    assert ckpt.epoch == 3
