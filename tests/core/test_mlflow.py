"""MlflowPublisher against a real ``mlflow server`` on 127.0.0.1 (started once for this module)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from keepbest import CheckpointManager, KeepBest, KeepLast, Monitor

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from keepbest.mlflow_publisher import MlflowPublisher  # noqa: E402
from tests.helpers import spawn  # noqa: E402
from tests.keras.publisher_contract import (  # noqa: E402
    KEEP_BEST, KEEP_LAST, SERIES, VAL_LOSSES, PublisherContract, Tracked)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts")]
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return True
        except OSError:
            return False

    with open(root / "server.log", "wb") as log:  # (the server writes to its own copy of the descriptor)
        proc = spawn(cmd, ready=healthy, what="the mlflow server", stdout=log, stderr=subprocess.STDOUT, cwd=root,
                     start_new_session=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                                                  "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runners
    yield url, root / "artifacts"
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def mlflow_env():
    """MLflow keeps the tracking URI and experiment in os.environ: put them back for the tests that follow."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")}
    yield
    mlflow.set_tracking_uri(None)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def run(server, request, mlflow_env):
    url, _ = server
    mlflow.set_tracking_uri(url)
    mlflow.set_experiment(request.node.name[:60])
    with mlflow.start_run() as r:
        yield r


def _save(mgr, epoch, loss):
    mgr.save(epoch * 10, {"w": np.full(4, epoch, np.float32)}, metrics={"val_loss": loss, "loss": 2 * loss},
             epoch=epoch)


def _remote_versions(client, run_id):
    return sorted(f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run_id, "checkpoints"))


def test_versions_metrics_and_the_best_alias_reach_the_server(tmp_path, run):
    mgr = CheckpointManager(tmp_path, monitor=Monitor("val_loss", "min"),
                            publishers=[MlflowPublisher(registered_model_name="digits-best")])
    for epoch, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        _save(mgr, epoch, loss)
    mgr.close()
    client = MlflowClient()
    run_id = run.info.run_id
    assert _remote_versions(client, run_id) == ["v0", "v1", "v2"]
    assert [f.path for f in client.list_artifacts(run_id, "checkpoints/v1/ckpt-000000020")] == [
        "checkpoints/v1/ckpt-000000020/manifest.json", "checkpoints/v1/ckpt-000000020/state.safetensors"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")] == [(10, 3.0), (20, 1.0),
                                                                                          (30, 2.0)]
    best = client.get_model_version_by_alias("digits-best", "best")
    assert best.source == f"runs:/{run_id}/checkpoints/v1/ckpt-000000020" and best.tags["keepbest.version"] == "1"
    downloaded = mlflow.artifacts.download_artifacts("models:/digits-best@best", dst_path=str(tmp_path / "dl"))
    np.testing.assert_array_equal(np.frombuffer((Path(downloaded) / "state.safetensors").read_bytes()[-16:],
                                                np.float32), np.full(4, 2, np.float32))


class TestMlflowRetention(PublisherContract):
    """The retention contract through CheckpointManager and MlflowPublisher, read back from the server."""

    @pytest.fixture
    def tracker(self, run, server):
        return run, server[1]  # the run, and the folder where the server keeps artifacts

    def run_schedule(self, folder, tracker):
        mgr = CheckpointManager(folder, series=SERIES, monitor=Monitor("val_loss", "min"),
                                keep=[KeepLast(KEEP_LAST), KeepBest(KEEP_BEST)],
                                publishers=[MlflowPublisher(registered_model_name="retention-best")])
        for epoch, loss in enumerate(VAL_LOSSES, start=1):
            _save(mgr, epoch, loss)
        mgr.close()

    def read_back(self, tracker):
        run, _ = tracker
        client = MlflowClient()
        held = sorted(int(v.removeprefix("v")) for v in _remote_versions(client, run.info.run_id))
        return Tracked(held, int(client.get_model_version_by_alias("retention-best", "best").tags["keepbest.version"]))

    def check_tracker(self, tracker, tracked, warnings):
        run, artifacts = tracker
        on_disk = sorted(int(p.name.removeprefix("v")) for p in artifacts.rglob("v*")
                         if p.parent.name == "checkpoints" and run.info.run_id in str(p))
        assert on_disk == tracked.held  # deleted on the server's disk, not only hidden
        versions = MlflowClient().search_model_versions("name='retention-best'")
        # earlier bests were registered, then deleted
        assert [v.tags["keepbest.version"] for v in versions] == [str(tracked.best)]


def test_a_user_alias_is_registered_and_follows_promote(tmp_path, run):
    mgr = CheckpointManager(tmp_path, monitor=Monitor("val_loss", "min"),
                            publishers=[MlflowPublisher(registered_model_name="promoted")])
    for epoch, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        _save(mgr, epoch, loss)
    mgr.promote("v2", "production")
    mgr.close()
    client = MlflowClient()
    assert client.get_model_version_by_alias("promoted", "production").tags["keepbest.version"] == "2"
    assert client.get_model_version_by_alias("promoted", "best").tags["keepbest.version"] == "1"


def test_publisher_requires_an_active_run(tmp_path, server, mlflow_env):
    mlflow.set_tracking_uri(server[0])
    with pytest.raises(RuntimeError, match=r"MlflowPublisher needs an MLflow run.*mlflow.start_run\(\)"):
        MlflowPublisher()
