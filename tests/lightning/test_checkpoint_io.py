"""keepbest.lightning.CheckpointIO as a Trainer plugin: Lightning's own saving through keepbest, exact resume."""

from __future__ import annotations

import json
import pickle

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

from keepbest import CheckpointManager
from keepbest.errors import CheckpointNotFoundError
from keepbest.lightning import CheckpointIO
from keepbest.lightning._io import SERIES
from tests.lightning.lit import Digits, loaders, trainer


def losses(path) -> dict[int, float]:
    return {d["step"]: d["loss"] for d in map(json.loads, path.read_text().splitlines())}


def fit(tmp_path, run: str, max_epochs: int, ckpt_path: str | None = None, async_save: bool = False) -> Digits:
    pl.seed_everything(0, verbose=False)
    model = Digits(losses=str(tmp_path / f"{run}.jsonl"))
    cb = LightningModelCheckpoint(dirpath=tmp_path / run / "ckpt", save_last=True, save_top_k=-1)
    trainer(tmp_path / run, [cb], [CheckpointIO(async_save=async_save)], max_epochs=max_epochs).fit(
        model, *loaders(), ckpt_path=ckpt_path)
    return model


@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")  # Lightning's own callback
@pytest.mark.parametrize("async_save", [False, True])
def test_fit_ckpt_path_last_resumes_with_the_same_per_step_losses(tmp_path, async_save):
    full = fit(tmp_path, "full", 6)
    fit(tmp_path, "resumed", 3, async_save=async_save)
    resumed = fit(tmp_path, "resumed", 6, ckpt_path="last", async_save=async_save)
    before, after = losses(tmp_path / "full.jsonl"), losses(tmp_path / "resumed.jsonl")
    assert sorted(after) == sorted(before) == list(range(60))  # steps 30..59 trained after the resume
    for step in range(30, 60):
        assert after[step] == pytest.approx(before[step], abs=1e-6), step
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_lightnings_own_model_checkpoint_writes_keepbest_folders_through_the_plugin(tmp_path):
    fit(tmp_path, "run", 2)
    names = [c.name for c in CheckpointManager(tmp_path / "run" / "ckpt", series=SERIES).checkpoints()]
    assert names == ["epoch=0-step=10.ckpt", "epoch=1-step=20.ckpt", "last.ckpt"]
    assert (tmp_path / "run" / "ckpt" / "last.ckpt" / "manifest.json").exists()


def test_loading_reads_no_pickle(tmp_path, monkeypatch):
    fit(tmp_path, "run", 1)

    def refuse(*a, **k):
        raise AssertionError("pickle was used")

    class NoPickle(pickle.Unpickler):
        def __init__(self, *a, **k):
            raise AssertionError("pickle.Unpickler was used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", NoPickle)
    monkeypatch.setattr(torch, "load", refuse)
    checkpoint = CheckpointIO().load_checkpoint(tmp_path / "run" / "ckpt" / "last.ckpt")
    assert checkpoint["epoch"] == 0 and "state_dict" in checkpoint and checkpoint["optimizer_states"]


def test_loading_a_path_without_a_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="No keepbest checkpoint at .*nothing.ckpt.*Lightning's own"):
        CheckpointIO().load_checkpoint(tmp_path / "nothing.ckpt")
