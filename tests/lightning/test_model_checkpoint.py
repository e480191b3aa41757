"""keepbest.lightning.ModelCheckpoint: Lightning's top k, last, step and time triggers, over keepbest's commits."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint as LightningModelCheckpoint

from keepbest import CheckpointManager
from keepbest.lightning import ModelCheckpoint
from keepbest.lightning._io import SERIES
from tests.lightning.lit import Digits, loaders, trainer


class ValLosses(Callback):
    """Every epoch's val_loss, as ModelCheckpoint saw it."""

    def __init__(self) -> None:
        self.values: dict[int, float] = {}

    def on_validation_end(self, trainer, pl_module):
        self.values[trainer.current_epoch] = float(trainer.callback_metrics["val_loss"])


def committed(folder) -> list[str]:
    return [c.name for c in CheckpointManager(folder, series=SERIES).checkpoints()]


def epoch_of(name: str) -> int:
    return int(name.split("epoch=")[1].split("-")[0].removesuffix(".ckpt"))


def test_save_top_k_keeps_the_three_best_and_a_resume_to_fifteen_epochs_still_keeps_the_right_three(tmp_path):
    pl.seed_everything(0, verbose=False)
    seen = ValLosses()
    cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=3, save_last=True)
    trainer(tmp_path, [cb, seen], max_epochs=10).fit(Digits(), *loaders())
    names = committed(tmp_path / "ckpt")
    best3 = sorted(seen.values, key=seen.values.get)[:3]
    assert sorted(epoch_of(n) for n in names if n != "last.ckpt") == sorted(best3) and "last.ckpt" in names

    resumed = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=3, save_last=True)
    trainer(tmp_path, [resumed, seen], max_epochs=15).fit(Digits(), *loaders(), ckpt_path="last")
    names = committed(tmp_path / "ckpt")
    tops = [n for n in names if n != "last.ckpt"]
    best3 = sorted(seen.values, key=seen.values.get)[:3]
    assert len(tops) == 3 and sorted(epoch_of(n) for n in tops) == sorted(best3), (seen.values, names)
    assert sorted(resumed.best_k_models) == sorted(str(tmp_path / "ckpt" / n) for n in tops)
    assert resumed.best_model_score == pytest.approx(min(seen.values.values()), abs=1e-6)


def test_resume_recovers_the_top_k_from_the_manifests_when_the_resumed_state_is_older(tmp_path):
    """Lightning #5173/#18687: resuming from an older checkpoint restored its stale top-k list."""
    pl.seed_everything(0, verbose=False)
    seen = ValLosses()
    cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2, filename="{epoch}")
    trainer(tmp_path, [cb, seen], max_epochs=6).fit(Digits(), *loaders())
    oldest = str(tmp_path / "ckpt" / committed(tmp_path / "ckpt")[0])
    resumed = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2, filename="{epoch}")
    trainer(tmp_path, [resumed, seen], max_epochs=9).fit(Digits(), *loaders(), ckpt_path=oldest)
    tops = [n for n in committed(tmp_path / "ckpt") if str(tmp_path / "ckpt" / n) != oldest]
    best2 = sorted(seen.values, key=seen.values.get)[:2]  # the re-trained epochs' values replaced the first ones
    # Lightning never deletes the checkpoint a run resumed from; the rest is exactly the top 2 of all epochs.
    assert sorted(epoch_of(n) for n in tops) == sorted(best2), (seen.values, tops)
    assert len(resumed.best_k_models) == 2


def test_save_last_true_is_the_newest_state(tmp_path):
    pl.seed_everything(0, verbose=False)
    cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1, save_last=True)
    model = Digits()
    trainer(tmp_path, [cb], max_epochs=4).fit(model, *loaders())
    last = cb.io.load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert last["epoch"] == 3 and last["global_step"] == 40
    for k, v in model.state_dict().items():
        assert torch.equal(last["state_dict"][k], v), k


def test_save_last_link_is_an_alias_of_the_last_checkpoint_not_a_symlink(tmp_path):
    pl.seed_everything(0, verbose=False)
    cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last="link", filename="{epoch}")
    trainer(tmp_path, [cb], max_epochs=3).fit(Digits(), *loaders())
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()
    aliases = CheckpointManager(tmp_path / "ckpt", series=SERIES).aliases
    assert aliases["last.ckpt"] == aliases["latest"]
    assert cb._find_last_checkpoints(None) == {str(tmp_path / "ckpt" / "epoch=2.ckpt")}
    assert cb.io.load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["epoch"] == 2


def test_every_n_train_steps_saves_where_lightnings_own_callback_saves(tmp_path):
    names = {}
    for kind, cls in (("lightning", LightningModelCheckpoint), ("keepbest", ModelCheckpoint)):
        pl.seed_everything(0, verbose=False)
        cb = cls(dirpath=tmp_path / kind, every_n_train_steps=7, save_top_k=-1)
        trainer(tmp_path / kind, [cb], max_epochs=3).fit(Digits(), *loaders())
        names[kind] = sorted(p.name for p in (tmp_path / kind).iterdir() if p.name.endswith(".ckpt"))
    assert names["keepbest"] == names["lightning"] and len(names["keepbest"]) == 30 // 7


class Slow(Digits):
    def training_step(self, batch, batch_idx):
        time.sleep(0.05)
        return super().training_step(batch, batch_idx)


class BatchEnds(Callback):
    """When each step ended (a callback's hooks run before ModelCheckpoint's, which checks the clock there)."""

    def __init__(self) -> None:
        self.at: dict[int, float] = {}

    def on_train_batch_end(self, trainer, *args):
        self.at[trainer.global_step] = time.monotonic()


def test_train_time_interval_saves_at_the_first_step_end_after_each_interval(tmp_path):
    pl.seed_everything(0, verbose=False)
    ends = BatchEnds()
    cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", train_time_interval=timedelta(seconds=0.3), save_top_k=-1)
    trainer(tmp_path, [ends, cb], max_epochs=2).fit(Slow(), *loaders())  # 20 steps of >= 50 ms
    saved = [c.step for c in CheckpointManager(tmp_path / "ckpt", series=SERIES).checkpoints()]
    assert len(saved) >= 2, saved
    checks = [ends.at[s] for s in saved]
    slack = 0.02  # between this callback's clock reading and ModelCheckpoint's
    for (previous, at), step in zip(zip(checks, checks[1:]), saved[1:]):
        assert at - previous >= 0.3 - slack, (saved, step)  # never sooner than the interval
        if step - 1 in ends.at and ends.at[step - 1] > previous:
            assert ends.at[step - 1] - previous < 0.3 + slack, (saved, step)  # and at the first step after it


def test_checkpoints_are_keepbest_folders_with_metrics_in_their_manifests(tmp_path):
    pl.seed_everything(0, verbose=False)
    cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    trainer(tmp_path, [cb], max_epochs=2).fit(Digits(), *loaders())
    (ckpt,) = CheckpointManager(tmp_path / "ckpt", series=SERIES).checkpoints()
    assert ckpt.path.is_dir() and set(ckpt.metrics) == {"val_loss", "train_loss"} and "best" in ckpt.aliases
    assert ckpt.manifest.format == "lightning"
    doc = json.loads((ckpt.path / "app_state.json").read_text())
    assert {"state_dict", "optimizer_states", "loops", "callbacks"} <= set(doc["entries"])


def test_resume_leaves_another_callbacks_checkpoints_in_the_same_folder_alone(tmp_path):
    def callbacks():
        return [ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=2),
                ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=15, save_top_k=-1,
                                filename="periodic-{step}")]

    pl.seed_everything(0, verbose=False)
    trainer(tmp_path, callbacks(), max_epochs=3).fit(Digits(), *loaders())
    periodic = [n for n in committed(tmp_path / "ckpt") if n.startswith("periodic")]
    assert periodic == ["periodic-step=15.ckpt", "periodic-step=30.ckpt"]
    tops = [n for n in committed(tmp_path / "ckpt") if n.startswith("epoch")]
    resumed = callbacks()
    trainer(tmp_path, resumed, max_epochs=4).fit(Digits(), *loaders(), ckpt_path=str(tmp_path / "ckpt" / tops[-1]))
    names = committed(tmp_path / "ckpt")
    assert [n for n in names if n.startswith("periodic")][:2] == periodic  # not ranked, not deleted
    assert len(resumed[0].best_k_models) == 2 and all("periodic" not in p for p in resumed[0].best_k_models)


class OnlyValLoss(Digits):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)  # logs nothing: val_loss is the only metric


def test_the_last_checkpoint_never_carries_the_monitored_value(tmp_path):
    pl.seed_everything(0, verbose=False)
    trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)],
            max_epochs=2).fit(OnlyValLoss(), *loaders())
    ckpts = {c.name: c for c in CheckpointManager(tmp_path / "ckpt", series=SERIES).checkpoints()}
    assert ckpts["last.ckpt"].metrics == {} and "val_loss" in ckpts["epoch=1-step=20.ckpt"].metrics
