"""keepbest.torch.SidecarEvaluator in a process of its own, following a Checkpointer that prunes as it trains."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from sklearn.datasets import load_digits

from keepbest import evaluation, store as stores
from keepbest.errors import StateMismatchError
from keepbest.torch import Checkpointer, SidecarEvaluator
from tests.helpers import spawn, wait_until
from tests.multiprocess.procs import ROOT


def build() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def val_loader() -> torch.utils.data.DataLoader:
    x, y = load_digits(return_X_y=True)
    data = torch.utils.data.TensorDataset(torch.tensor(x[-300:] / 16.0, dtype=torch.float32), torch.tensor(y[-300:]))
    return torch.utils.data.DataLoader(data, batch_size=100)


def test_every_checkpoint_is_evaluated_in_order_and_retention_waits_for_the_evaluator(tmp_path):
    folder, out = tmp_path / "ckpt", tmp_path / "eval.json"
    child = spawn([sys.executable, "-m", "tests.torch.sidecar_child", str(folder), str(out)],
                  ready=lambda: stores.open(folder).exists() and evaluation.read_state(stores.open(folder), "eval")[0]
                  is not None, what="the torch sidecar", cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)
    torch.manual_seed(0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:1000] / 16.0, dtype=torch.float32), torch.tensor(y[:1000])
    with Checkpointer(folder, keep_last=1) as ckpt:
        for step in range(1, 6):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.save(step, {"model": model})
            time.sleep(0.3)
    wait_until(child, lambda: out.exists(), timeout=120, what="the torch sidecar never stopped")
    stdout, stderr = child.communicate(timeout=60)
    report = json.loads(out.read_text())
    assert report["stop"] == "training ended", stdout + stderr
    assert [s for s, _ in report["evaluated"]] == [1, 2, 3, 4, 5], stdout + stderr
    losses = [m["loss"] for _, m in report["evaluated"]]
    assert losses[-1] < losses[0] and all(0 <= m["accuracy"] <= 1 for _, m in report["evaluated"])
    assert "quarantined" not in stdout


def test_evaluator_stops_with_the_reason_when_the_checkpoint_has_no_model_entry(tmp_path):
    Checkpointer(tmp_path).save(1, {"net": build()})
    evaluator = SidecarEvaluator(build, val_loader(), tmp_path, idle_timeout=5, verbose=0)
    with pytest.raises(StateMismatchError, match=r"has no app_state entry 'model' to evaluate. Pass entry= one of "
                                                 r"\['net'\]"):
        evaluator.start()


def test_evaluator_needs_a_model_factory(tmp_path):
    with pytest.raises(TypeError, match="needs model_fn: a function that builds the model"):
        SidecarEvaluator(build(), val_loader(), tmp_path)
