"""ModelCheckpoint publishing to MLflow's default local store (sqlite in the working folder)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from keepbest import CheckpointManager
from keepbest.keras import ModelCheckpoint

from .conftest import make_model

mlflow = pytest.importorskip("mlflow")
from keepbest.mlflow_publisher import MlflowPublisher  # noqa: E402


def test_model_checkpoint_publishes_to_the_default_local_store(tmp_path, digits, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default store is ./mlflow.db with artifacts in ./mlruns
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")  # set_experiment writes it; monkeypatch removes it afterwards
    mlflow.set_tracking_uri(None)
    mlflow.set_experiment("keepbest")  # an experiment of this store (another test may have chosen one elsewhere)
    x, y = digits
    with mlflow.start_run() as run:
        assert mlflow.get_tracking_uri() == f"sqlite:///{os.getcwd()}/mlflow.db"
        cb = ModelCheckpoint("ckpt/e{epoch}", monitor="val_loss", keep_last=2,
                             publishers=[MlflowPublisher(registered_model_name="digits")])
        make_model().fit(x, y, validation_split=0.25, epochs=4, verbose=0, callbacks=[cb])
    client = mlflow.tracking.MlflowClient()
    local = CheckpointManager("ckpt", series="e{epoch}").checkpoints()
    remote = sorted(f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run.info.run_id, "checkpoints"))
    assert remote == sorted(f"v{c.version}" for c in local)  # the same live versions on both sides
    best = next(c for c in local if "best" in c.aliases)
    assert client.get_model_version_by_alias("digits", "best").tags["keepbest.version"] == str(best.version)
    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == [int(c) for c in np.arange(1, 5) * 15]  # 15 steps per epoch
    assert [m.value for m in history][best.epoch - 1] == pytest.approx(best.metrics["val_loss"])
