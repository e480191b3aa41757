"""keepbest.manager.CheckpointManager: save, load, list, best, retention across restarts."""

import math
import re
import time

import numpy as np
import pytest

from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.payload import TensorPayload
from keepbest.manager import STATE_FILE, CheckpointManager
from keepbest.policy import KeepBest, KeepLast, Monitor
from tests.helpers import flip_byte

VAL_LOSS = Monitor("val_loss", "min")


def state(epoch):
    return {"w": np.full((2, 2), epoch, np.float32), "step": np.array(epoch * 10, np.int64)}


def save_epochs(mgr, losses, first_epoch=1):
    for epoch, loss in enumerate(losses, start=first_epoch):
        mgr.save(epoch * 10, state(epoch), metrics={"val_loss": loss}, epoch=epoch)


def epochs(mgr):
    return [c.epoch for c in mgr.checkpoints()]


def acceptance_manager(directory, **kwargs):
    return CheckpointManager(directory, monitor=VAL_LOSS, keep=[KeepLast(2), KeepBest(1)], **kwargs)


# --- save and load -----------------------------------------------------------------------------------


def test_save_then_load_round_trips_the_state(tmp_path):
    mgr = CheckpointManager(tmp_path)
    saved = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array(1.5, np.float64),
             "mask": np.array([True, False])}
    mgr.save(1, saved)
    loaded = mgr.load()
    assert sorted(loaded) == sorted(saved)
    for name, arr in saved.items():
        assert loaded[name].dtype == arr.dtype and np.array_equal(loaded[name], arr)


def test_load_of_a_step_returns_that_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    save_epochs(mgr, [3.0, 2.0, 1.0])
    assert mgr.load(20)["step"].item() == 20


def test_load_without_step_returns_the_latest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    save_epochs(mgr, [3.0, 2.0, 1.0])
    assert mgr.load()["step"].item() == 30


def test_save_records_position_metrics_and_monitor(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS)
    mgr.save(7, state(1), metrics={"val_loss": np.float32(0.5), "acc": 1}, epoch=2, batch=3, extra={"k": "v"})
    m = mgr.get(7).manifest
    assert (m.step, m.epoch, m.batch, dict(m.metrics), m.monitor.name, m.monitor.mode, dict(m.extra)) == (
        7, 2, 3, {"val_loss": 0.5, "acc": 1.0}, "val_loss", "min", {"k": "v"})


def test_save_names_checkpoints_by_zero_padded_step(tmp_path):
    mgr = CheckpointManager(tmp_path)
    ckpt = mgr.save(42, state(1))
    assert ckpt.name == "ckpt-000000042" and (tmp_path / "ckpt-000000042" / STATE_FILE).is_file()


def test_save_with_a_name_uses_it(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(None, state(1), name="final")
    assert [c.name for c in mgr.checkpoints()] == ["final"]


def test_save_returns_the_committed_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path)
    ckpt = mgr.save(5, state(1))
    assert ckpt.manifest == mgr.get(5).manifest and ckpt.path == tmp_path / "ckpt-000000005"


def test_save_without_step_or_name_raises(tmp_path):
    with pytest.raises(ValueError, match="needs a step or a name"):
        CheckpointManager(tmp_path).save(None, state(1))


@pytest.mark.parametrize("name", ["../escape", "a/b", "./x", "/abs", ".keepbest-tmp-1-x", ".keepbest"])
def test_save_rejects_names_that_are_not_plain_or_reserved(tmp_path, name):
    with pytest.raises(ValueError, match="is not a plain file or folder name, or is reserved"):
        CheckpointManager(tmp_path).save(1, state(1), name=name)


def test_rejected_name_leaves_nothing_behind(tmp_path):
    with pytest.raises(ValueError, match="Received: name='../escape'"):
        CheckpointManager(tmp_path / "run").save(1, state(1), name="../escape")
    assert list(tmp_path.iterdir()) == []


def test_save_with_a_non_numeric_metric_leaves_no_temp(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match="could not convert string to float"):
        mgr.save(1, state(1), metrics={"val_loss": "abc"})
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".keepbest-")] == []


@pytest.mark.parametrize(
    "kwargs",
    [{"epoch": True}, {"batch": 1.5}, {"versions": {"jax": 0.4}}],
    ids=["bool-epoch", "float-batch", "non-str-version"],
)
def test_save_rejects_arguments_its_manifest_cannot_hold(tmp_path, kwargs):
    with pytest.raises((TypeError, ValueError), match="Received: "):
        CheckpointManager(tmp_path).save(1, state(1), **kwargs)


def test_save_of_a_payload_writes_its_files(tmp_path):
    mgr = CheckpointManager(tmp_path)
    payload = TensorPayload({"a.safetensors": {"x": np.ones(2)}}, json_files={"cfg.json": {"lr": 0.1}})
    ckpt = mgr.save(1, payload)
    assert [f.path for f in ckpt.manifest.files] == ["a.safetensors", "cfg.json"]
    mgr.store.verify(ckpt.manifest)


def test_load_of_a_checkpoint_without_state_file_raises(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, TensorPayload({"other.safetensors": {"x": np.ones(2)}}))
    with pytest.raises(CheckpointNotFoundError, match=f"holds no {STATE_FILE}"):
        mgr.load()


def test_keep_must_be_rules(tmp_path):
    with pytest.raises(TypeError, match="keep must be a list of retention rules"):
        CheckpointManager(tmp_path, keep=[2])


def test_keep_best_without_monitor_raises_at_init(tmp_path):
    with pytest.raises(ValueError, match="KeepBest needs a monitor"):
        CheckpointManager(tmp_path, keep=[KeepBest(1)])


# --- listing, latest, best ------------------------------------------------------------------------------


def test_checkpoints_are_oldest_first(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for step in (30, 10, 20):  # commit order, not step order
        mgr.save(step, state(step))
    assert [c.step for c in mgr.checkpoints()] == [30, 10, 20]


def test_latest_is_the_last_committed(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for step in (30, 10, 20):
        mgr.save(step, state(step))
    assert mgr.latest.step == 20


def test_best_is_the_lowest_val_loss(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS)
    save_epochs(mgr, [3.0, 1.0, 2.0])
    assert (mgr.best.epoch, mgr.best_value) == (2, 1.0)


def test_best_is_the_highest_value_in_max_mode(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=Monitor("val_loss", "max"))
    save_epochs(mgr, [3.0, 1.0, 2.0])
    assert (mgr.best.epoch, mgr.best_value) == (1, 3.0)


def test_exactly_one_checkpoint_is_marked_best(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS)
    save_epochs(mgr, [3.0, 1.0, 2.0])
    assert [c.is_best for c in mgr.checkpoints()] == [False, True, False]


def test_best_is_the_newest_on_a_tie(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS)
    save_epochs(mgr, [1.0, 2.0, 1.0])
    assert mgr.best.epoch == 3


def test_there_is_no_best_without_monitor(tmp_path):
    mgr = CheckpointManager(tmp_path)
    save_epochs(mgr, [3.0, 1.0])
    assert (mgr.best, mgr.best_value) == (None, None)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_never_becomes_best(tmp_path, bad):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS)
    save_epochs(mgr, [2.0, bad, 3.0])
    assert mgr.best.epoch == 1


def test_nan_only_history_has_no_best(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS)
    save_epochs(mgr, [math.nan, math.nan])
    assert (mgr.best, mgr.best_value) == (None, None)


def test_checkpoint_without_monitored_metric_is_never_best(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS)
    mgr.save(1, state(1), metrics={"loss": 0.1})
    mgr.save(2, state(2), metrics={"val_loss": 5.0})
    assert mgr.best.step == 2


# --- missing checkpoints ---------------------------------------------------------------------------------


def test_get_of_a_missing_step_lists_available_steps(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for step in (5, 10, 15):
        mgr.save(step, state(step))
    with pytest.raises(CheckpointNotFoundError,
                       match=re.escape(f"No checkpoint at step 7 in {tmp_path} (series 'ckpt')") + ".*Available: 5, 10, 15."):
        mgr.get(7)


def test_load_of_a_missing_step_lists_available_steps(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for step in (5, 10):
        mgr.save(step, state(step))
    with pytest.raises(CheckpointNotFoundError, match="No checkpoint at step 7 .*Available: 5, 10."):
        mgr.load(7)


def test_checkpoint_not_found_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Available: none."):
        CheckpointManager(tmp_path).load()


def test_manager_on_a_missing_directory_starts_empty(tmp_path):
    mgr = CheckpointManager(tmp_path / "does" / "not" / "exist")
    assert (mgr.checkpoints(), mgr.latest, mgr.best, mgr.best_value, mgr.recovery) == ([], None, None, None, None)


def test_manager_on_a_missing_directory_does_not_create_it(tmp_path):
    CheckpointManager(tmp_path / "later").checkpoints()
    assert not (tmp_path / "later").exists()


def test_first_save_creates_the_directory(tmp_path):
    mgr = CheckpointManager(tmp_path / "new" / "run")
    mgr.save(1, state(1))
    assert mgr.load()["step"].item() == 10


def test_load_without_checkpoints_raises(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"No checkpoint in {tmp_path}")):
        CheckpointManager(tmp_path).load()


# --- integrity -------------------------------------------------------------------------------------------


def test_load_raises_when_state_file_was_modified(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, state(1))
    path = tmp_path / "ckpt-000000001" / STATE_FILE
    flip_byte(path)
    with pytest.raises(CorruptCheckpointError, match=re.escape(f"file {path} does not match its manifest")):
        mgr.load()


def test_load_raises_naming_the_missing_file_when_state_file_is_missing(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, state(1))
    path = tmp_path / "ckpt-000000001" / STATE_FILE
    path.unlink()
    # A checkpoint whose data is gone is not listed, so there is nothing to load; the message says why.
    with pytest.raises(CheckpointNotFoundError, match=re.escape(f"file {path} is missing")):
        mgr.load()


# --- retention ---------------------------------------------------------------------------------------------


def test_keep_last_two_and_best_one_keeps_epochs_2_4_5(tmp_path):
    mgr = acceptance_manager(tmp_path)
    save_epochs(mgr, [3.0, 1.0, 2.0, 4.0, 5.0])
    assert epochs(mgr) == [2, 4, 5]


def test_pruned_checkpoints_are_gone_from_disk(tmp_path):
    mgr = acceptance_manager(tmp_path)
    save_epochs(mgr, [3.0, 1.0, 2.0, 4.0, 5.0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".keepbest") == \
        ["ckpt-000000020", "ckpt-000000040", "ckpt-000000050"]


def test_retention_keeps_the_best_through_pruning(tmp_path):
    mgr = acceptance_manager(tmp_path)
    save_epochs(mgr, [3.0, 1.0, 2.0, 4.0, 5.0])
    assert (mgr.best.epoch, mgr.best_value, mgr.load(20)["step"].item()) == (2, 1.0, 20)


def test_without_keep_rules_nothing_is_deleted(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS)
    save_epochs(mgr, [3.0, 1.0, 2.0, 4.0, 5.0])
    assert epochs(mgr) == [1, 2, 3, 4, 5]


def test_keep_best_alone_also_keeps_the_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS, keep=[KeepBest(1)])
    save_epochs(mgr, [3.0, 1.0, 2.0, 4.0])
    assert epochs(mgr) == [2, 4]


def test_keep_last_alone_also_keeps_the_best(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS, keep=[KeepLast(1)])
    save_epochs(mgr, [1.0, 2.0, 3.0])
    assert epochs(mgr) == [1, 3]


def test_nan_metric_never_protects_a_checkpoint_from_pruning(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=VAL_LOSS, keep=[KeepLast(1), KeepBest(1)])
    save_epochs(mgr, [math.nan, 2.0, 3.0])
    assert epochs(mgr) == [2, 3]


# --- restart -----------------------------------------------------------------------------------------------


def test_new_manager_recovers_best_and_best_value(tmp_path):
    save_epochs(acceptance_manager(tmp_path), [3.0, 1.0, 2.0])
    again = acceptance_manager(tmp_path)
    assert (again.best.epoch, again.best_value, again.latest.epoch) == (2, 1.0, 3)


def test_new_manager_continues_retention(tmp_path):
    save_epochs(acceptance_manager(tmp_path), [3.0, 1.0, 2.0])
    again = acceptance_manager(tmp_path)
    save_epochs(again, [4.0, 5.0], first_epoch=4)
    assert epochs(again) == [2, 4, 5]


def test_new_manager_keeps_the_old_best_when_new_values_are_worse(tmp_path):
    save_epochs(acceptance_manager(tmp_path), [3.0, 1.0])
    again = acceptance_manager(tmp_path)
    save_epochs(again, [6.0, 7.0, 8.0], first_epoch=3)
    assert (epochs(again), again.best.epoch) == ([2, 4, 5], 2)


def test_new_manager_cleans_up_a_crashed_writers_leftovers(tmp_path, dead_token):
    save_epochs(CheckpointManager(tmp_path), [1.0])
    leftover = tmp_path / f".keepbest-tmp-{dead_token}-abcd-ckpt-000000020"
    leftover.mkdir()
    mgr = CheckpointManager(tmp_path)
    assert not leftover.exists() and mgr.recovery.removed == [str(leftover)]


# --- series ------------------------------------------------------------------------------------------------


def test_two_series_in_one_directory_never_prune_each_other(tmp_path):
    a = CheckpointManager(tmp_path, monitor=VAL_LOSS, keep=[KeepLast(1)], series="a")
    b = CheckpointManager(tmp_path, monitor=VAL_LOSS, keep=[KeepLast(1)], series="b")
    for step in (1, 2, 3):
        a.save(step, state(step), metrics={"val_loss": 10.0 - step}, name=f"a-{step}")
        b.save(step, state(step), metrics={"val_loss": 10.0 - step}, name=f"b-{step}")
    assert ([c.name for c in a.checkpoints()], [c.name for c in b.checkpoints()]) == (["a-3"], ["b-3"])


def test_each_series_has_its_own_best(tmp_path):
    a = CheckpointManager(tmp_path, monitor=VAL_LOSS, series="a")
    b = CheckpointManager(tmp_path, monitor=VAL_LOSS, series="b")
    a.save(1, state(1), metrics={"val_loss": 0.1}, name="a-1")
    b.save(1, state(1), metrics={"val_loss": 0.9}, name="b-1")
    b.save(2, state(2), metrics={"val_loss": 0.5}, name="b-2")
    assert (a.best.name, b.best.name, b.best_value) == ("a-1", "b-2", 0.5)


def test_get_only_sees_its_own_series(tmp_path):
    CheckpointManager(tmp_path, series="a").save(1, state(1), name="a-1")
    b = CheckpointManager(tmp_path, series="b")
    with pytest.raises(CheckpointNotFoundError, match="series 'b'.*Available: none."):
        b.get(1)


def test_two_series_saving_the_same_step_keep_both_checkpoints(tmp_path):
    a = CheckpointManager(tmp_path, series="a")
    b = CheckpointManager(tmp_path, series="b")
    a.save(1, state(1))
    b.save(1, state(2))
    assert a.load(1)["w"][0, 0] == 1.0


def test_save_never_prunes_the_checkpoint_it_just_committed_when_the_clock_went_back(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path, keep=[KeepLast(1)])
    mgr.save(100, state(1))
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600)  # an NTP step back
    ckpt = mgr.save(200, state(2))
    assert ckpt.step == 200 and mgr.load(200)["w"][0, 0] == 2.0
