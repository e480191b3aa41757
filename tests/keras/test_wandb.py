"""WandbModelCheckpoint against the real wandb SDK in offline mode: what the run directory records."""

from __future__ import annotations

import base64
import hashlib
import importlib.abc
import os
import sys
import traceback
from pathlib import Path

import keras
import numpy as np
import pytest

from keepbest import CheckpointManager
from keepbest.keras import WandbModelCheckpoint

from .conftest import drive, make_model
from .publisher_contract import KEEP_BEST, KEEP_LAST, SERIES, VAL_LOSSES, PublisherContract, Tracked, kept

wandb = pytest.importorskip("wandb")
from .wandb_offline import artifacts, offline_run  # noqa: E402  (needs wandb)


class ImportSpy(importlib.abc.MetaPathFinder):
    """Records every attempt to import TensorFlow, installed or not.

    Keras's ``.keras`` saving probes whether TensorFlow is there (``LazyModule.available``) on
    every backend and goes on without it; that probe is Keras's own and is not counted.
    """

    def __init__(self):
        self.attempts = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf_keras"):
            probe = any(f.name == "available" and f.filename.endswith("module_utils.py")
                        for f in traceback.extract_stack())
            if not probe:
                self.attempts.append("".join(traceback.format_stack(limit=12)))
        return None


@pytest.fixture
def run(tmp_path, monkeypatch):
    yield from offline_run(tmp_path, monkeypatch)


@pytest.fixture
def tf_imports():
    spy = ImportSpy()
    sys.meta_path.insert(0, spy)
    yield spy.attempts
    sys.meta_path.remove(spy)


def _finished(run):
    run_dir = Path(run.settings.sync_dir)
    wandb.finish()
    # finish() can return before W&B's service has written the artifact records (measured: 9 runs in 60
    # with none yet); teardown stops the service once it has flushed them.
    wandb.teardown()
    logged = artifacts(run_dir)
    if not logged:  # say what W&B's own logs recorded, to tell a W&B failure from a keepbest one
        logs = sorted(run_dir.glob("logs/*.log")) + sorted(Path(os.environ["WANDB_CACHE_DIR"]).rglob("*.log"))
        raise AssertionError("the offline run recorded no artifact; W&B logs:\n" + "\n".join(
            f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs))
    return logged


def _md5(path):
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


def test_save_best_only_with_epoch_template_skips_a_non_improving_epoch_without_crashing(tmp_path, tf_imports, run):
    cb = WandbModelCheckpoint(str(tmp_path / "ckpt" / "e{epoch:02d}.keras"), save_best_only=True)
    drive(cb, make_model(), [{"loss": 1.0, "val_loss": v} for v in (1.0, 0.5, 0.7, 0.4)])
    logged = _finished(run)
    assert [a["metadata"]["epoch"] for a in logged] == [1, 2, 4]  # epoch 3 did not improve: nothing logged
    assert [a["aliases"] for a in logged] == [{"latest", "best", "epoch_1"}, {"latest", "best", "epoch_2"},
                                              {"latest", "best", "epoch_4"}]
    assert {a["name"] for a in logged} == {f"run_{run.id}_model"} and {a["type"] for a in logged} == {"model"}
    assert logged[-1]["metadata"] | {"metrics": None} == {
        "epoch": 4, "batch": None, "step": 0, "metrics": None, "monitor": "val_loss", "mode": "min",
        "keepbest_version": 2, "checkpoint": "e04.keras", "series": "e{epoch:02d}.keras"}
    assert logged[-1]["metadata"]["metrics"] == {"loss": 1.0, "val_loss": 0.4}
    for a in logged:  # each version holds the very file keepbest committed for that epoch
        (name,) = a["files"]
        assert a["files"][name] == _md5(tmp_path / "ckpt" / name)
    if keras.backend.backend() != "tensorflow":  # Keras itself imports it there
        assert "tensorflow" not in sys.modules and tf_imports == []


def test_epoch_aliases_are_one_based_and_best_stays_on_the_best_version(tmp_path, run):
    cb = WandbModelCheckpoint(str(tmp_path / "e{epoch}"), monitor="val_loss")
    drive(cb, make_model(), [{"loss": 1.0, "val_loss": v} for v in (0.9, 0.5, 0.7)])
    logged = _finished(run)
    assert [a["aliases"] for a in logged] == [{"latest", "best", "epoch_1"}, {"latest", "best", "epoch_2"},
                                              {"latest", "epoch_3"}]
    assert [sorted(a["files"])[0].split("/")[0] for a in logged] == ["e1", "e2", "e3"]  # folder names match
    assert CheckpointManager(tmp_path, series="e{epoch}").aliases == {
        "epoch_1": 0, "epoch_2": 1, "epoch_3": 2, "best": 1, "latest": 2}


def test_fixed_filepath_logs_each_new_best_with_its_own_bytes(tmp_path, run):
    model = make_model()
    cb = WandbModelCheckpoint(str(tmp_path / "best.weights.h5"), save_best_only=True, save_weights_only=True)
    cb.set_model(model)
    cb.on_train_begin()
    digests = []
    for epoch, val_loss in enumerate([0.9, 0.5, 0.7]):
        model.layers[0].kernel.assign(np.full((64, 16), epoch, "float32"))  # new weights each epoch
        cb.on_epoch_begin(epoch)
        cb.on_epoch_end(epoch, {"loss": 1.0, "val_loss": val_loss})
        cb.wait()
        digests.append(_md5(tmp_path / "best.weights.h5"))
    cb.on_train_end()
    logged = _finished(run)
    assert [a["metadata"]["epoch"] for a in logged] == [1, 2]  # no stale best re-logged at epoch 3
    assert [a["files"]["best.weights.h5"] for a in logged] == digests[:2]
    assert digests[1] != digests[0] and digests[2] == digests[1]


class TestWandbOfflineRetention(PublisherContract):
    """The retention contract through WandbModelCheckpoint, read back from the offline run's records."""

    deletes = False  # offline, W&B records every upload and no deletion

    @pytest.fixture
    def tracker(self, run):
        return run

    def run_schedule(self, folder, tracker):
        cb = WandbModelCheckpoint(str(folder / SERIES), keep_last=KEEP_LAST, keep_best=KEEP_BEST)
        drive(cb, make_model(), [{"loss": 1.0, "val_loss": v} for v in VAL_LOSSES])

    def read_back(self, tracker):
        self.logged = _finished(tracker)
        best = [a for a in self.logged if "best" in a["aliases"]][-1]  # the alias is on the last version given it
        return Tracked(held=[a["metadata"]["keepbest_version"] for a in self.logged],
                       best=best["metadata"]["keepbest_version"])

    def check_tracker(self, tracker, tracked, warnings):
        best_epoch = next(epoch for epoch, _, aliases in kept() if "best" in aliases)
        # the best version was logged as the newest one then, with the automatic aliases it had
        assert [a["aliases"] for a in self.logged if "best" in a["aliases"]][-1] == {
            "latest", "best", f"epoch_{best_epoch}"}
        assert "W&B is offline" in warnings and "not deleted on W&B" in warnings


def test_requires_an_active_wandb_run(tmp_path, run):
    wandb.finish()
    with pytest.raises(wandb.Error, match=r"You must call `wandb.init\(\)` before `WandbModelCheckpoint\(\)`"):
        WandbModelCheckpoint(str(tmp_path / "m.keras"))


def test_signature_is_the_one_of_wandb_s_callback():
    import inspect

    params = inspect.signature(WandbModelCheckpoint).parameters
    assert [(n, p.default) for n, p in params.items()] == [
        ("filepath", inspect.Parameter.empty), ("monitor", "val_loss"), ("verbose", 0), ("save_best_only", False),
        ("save_weights_only", False), ("mode", "auto"), ("save_freq", "epoch"), ("initial_value_threshold", None),
        ("kwargs", inspect.Parameter.empty)]


def test_a_bucket_filepath_logs_each_version_with_the_bytes_in_the_bucket(s3, run):
    pytest.importorskip("s3fs", reason="keepbest[s3] is not installed")
    url = s3.url("wandb")
    cb = WandbModelCheckpoint(url + "/e{epoch}.keras", monitor="val_loss")
    drive(cb, make_model(), [{"loss": 1.0, "val_loss": v} for v in (0.9, 0.5, 0.7)])
    logged = _finished(run)
    assert [a["aliases"] for a in logged] == [{"latest", "best", "epoch_1"}, {"latest", "best", "epoch_2"},
                                              {"latest", "epoch_3"}]
    prefix = url.split("s3://kbest/")[1]
    for a, name in zip(logged, ["e1.keras", "e2.keras", "e3.keras"]):
        body = s3.client().get_object(Bucket="kbest", Key=f"{prefix}/{name}")["Body"].read()
        assert a["files"] == {name: base64.b64encode(hashlib.md5(body).digest()).decode()}
