"""keepbest.torch.Checkpointer with the W&B publisher, read back from an offline run's records."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

wandb = pytest.importorskip("wandb")

from keepbest.torch import Checkpointer  # noqa: E402
from keepbest.wandb_publisher import WandbPublisher  # noqa: E402
from tests.keras.wandb_offline import artifacts, offline_run  # noqa: E402


@pytest.fixture
def run(tmp_path, monkeypatch):
    yield from offline_run(tmp_path, monkeypatch)


@pytest.mark.filterwarnings("ignore:W&B is offline")
def test_each_version_is_logged_with_its_files_and_the_best_alias(tmp_path, run):
    model = torch.nn.Linear(4, 2)
    with Checkpointer(tmp_path / "ckpt", monitor="val_loss", publishers=[WandbPublisher(run)]) as ckpt:
        for step, loss in [(1, 2.0), (2, 1.0), (3, 3.0)]:
            ckpt.save(step, {"model": model}, metrics={"val_loss": loss})
    run_dir = Path(run.settings.sync_dir)
    wandb.finish()
    wandb.teardown()
    logged = artifacts(run_dir)
    assert [a["metadata"]["step"] for a in logged] == [1, 2, 3]
    assert {"app_state.json", "model.safetensors", "rng.json", "manifest.json"} <= {
        f.rsplit("/", 1)[-1] for f in logged[1]["files"]}
    best = [a for a in logged if "best" in a["aliases"]][-1]
    assert best["metadata"]["step"] == 2
