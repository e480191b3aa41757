"""keepbest.torch beyond a local folder: an S3 bucket (moto's server on 127.0.0.1) and an MLflow server."""

from __future__ import annotations

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from keepbest.mlflow_publisher import MlflowPublisher
from keepbest.torch import Checkpointer
from tests.core.test_mlflow import mlflow_env, run, server  # noqa: F401, F811 - fixtures


def model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 4)).to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 32, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize("async_save", [False, True])
def test_a_bucket_url_saves_and_restores_bit_for_bit(s3, async_save):
    url = f"s3://kbest/torch-{async_save}"
    model, opt = model_and_optimizer(0)
    with Checkpointer(url, keep_last=1, async_save=async_save) as ckpt:
        ckpt.save(1, {"model": model, "optimizer": opt})
        ckpt.save(2, {"model": model, "optimizer": opt})
    fresh, fresh_opt = model_and_optimizer(1)
    restored = Checkpointer(url).restore({"model": fresh, "optimizer": fresh_opt})
    assert restored.step == 2 and [c.step for c in Checkpointer(url).checkpoints] == [2]
    for k, v in model.state_dict().items():
        assert fresh.state_dict()[k].dtype == torch.bfloat16 and torch.equal(fresh.state_dict()[k], v), k
    assert fresh_opt.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


def test_export_to_a_bucket_url_reads_back_with_torch_load(s3, tmp_path):
    model, _ = model_and_optimizer(0)
    ckpt = Checkpointer("s3://kbest/torch-export")
    ckpt.save(1, {"model": model})
    ckpt.export("s3://kbest/exported/model.pt")
    imported = Checkpointer(tmp_path)
    imported.import_state_dict("s3://kbest/exported/model.pt", step=1)
    fresh, _ = model_and_optimizer(1)
    imported.restore({"model": fresh})
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_mlflow_publisher_logs_each_version_and_the_best_alias(tmp_path, run):  # noqa: F811
    model, _ = model_and_optimizer(0)
    with Checkpointer(tmp_path, monitor="val_loss", keep_last=2,
                      publishers=[MlflowPublisher(registered_model_name="torch-best")]) as ckpt:
        for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
            ckpt.save(step, {"model": model}, metrics={"val_loss": loss})
    client = MlflowClient()
    best = client.get_model_version_by_alias("torch-best", "best")
    assert best.source == f"runs:/{run.info.run_id}/checkpoints/v1/ckpt-000000002"
    files = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(run.info.run_id, "checkpoints/v1/ckpt-000000002")}
    assert {"app_state.json", "model.safetensors", "rng.json", "manifest.json"} <= files
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")] == [
        (1, 3.0), (2, 1.0), (3, 2.0)]
    assert mlflow.active_run() is not None
