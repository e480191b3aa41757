"""keepbest.torch.Checkpointer: what is saved, what comes back, and what is refused."""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from keepbest.errors import CheckpointNotFoundError, StateMismatchError
from keepbest.torch import Checkpointer


class Tied(torch.nn.Module):
    """An embedding shared with the output layer, a BatchNorm (buffers), a bf16 and an fp16 layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(12, 8)
        self.out = torch.nn.Linear(8, 12, bias=False)
        self.out.weight = self.emb.weight
        self.bn = torch.nn.BatchNorm1d(8)
        self.bf16 = torch.nn.Linear(8, 8).to(torch.bfloat16)
        self.fp16 = torch.nn.Linear(8, 8).to(torch.float16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.emb(x))
        h = h + self.bf16(h.to(torch.bfloat16)).float() + self.fp16(h.half()).float()
        return self.out(h)


def trained(seed: int = 0, steps: int = 3):
    torch.manual_seed(seed)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(steps):
        loss = model(torch.randint(0, 12, (16,))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model, opt, sched


def fresh():
    torch.manual_seed(123)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            assert_same_state(a[k], b[k])
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("async_save", [False, True])
def test_restore_gives_back_model_optimizer_and_scheduler_bit_for_bit(tmp_path, async_save):
    model, opt, sched = trained()
    with Checkpointer(tmp_path, async_save=async_save) as ckpt:
        ckpt.save(3, {"model": model, "optimizer": opt, "scheduler": sched})
    m2, o2, s2 = fresh()
    restored = Checkpointer(tmp_path).restore({"model": m2, "optimizer": o2, "scheduler": s2})
    assert restored is not None and restored.step == 3
    assert_same_state(model.state_dict(), m2.state_dict())
    assert o2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for i, st in opt.state_dict()["state"].items():
        assert_same_state(st, o2.state_dict()["state"][i])
    assert s2.state_dict() == sched.state_dict()


def test_tied_weights_are_stored_once_and_restore_still_tied(tmp_path):
    model, opt, _ = trained()
    ckpt = Checkpointer(tmp_path)
    saved = ckpt.save(1, {"model": model}).result()
    doc = json.loads(saved.reader().read("app_state.json"))
    items = dict((k, v) for k, v in doc["entries"]["model"]["tree"]["__items__"])
    assert items["out.weight"] == {"__tensor__": "emb.weight"}
    m2, _, _ = fresh()
    ckpt.restore({"model": m2})
    assert m2.out.weight is m2.emb.weight
    assert torch.equal(m2.out.weight, model.emb.weight)


def test_bf16_and_fp16_tensors_restore_with_their_dtype(tmp_path):
    model, _, _ = trained()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"model": model, "extra": {"t": torch.arange(4, dtype=torch.bfloat16) / 3}})
    m2, _, _ = fresh()
    extra: dict = {}
    ckpt.restore({"model": m2, "extra": extra})
    assert m2.bf16.weight.dtype == torch.bfloat16 and torch.equal(m2.bf16.weight, model.bf16.weight)
    assert m2.fp16.weight.dtype == torch.float16 and torch.equal(m2.fp16.weight, model.fp16.weight)
    assert extra["t"].dtype == torch.bfloat16 and torch.equal(extra["t"], torch.arange(4, dtype=torch.bfloat16) / 3)


def test_non_contiguous_tensors_and_plain_values_round_trip(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    state = {"t": base.t(), "every_other": base[:, ::2], "n": 3, "lr": 0.1, "nan": float("nan"), "pair": (1, "a"),
             "ids": {3: "x", 7: None}, "arr": np.arange(3, dtype=np.int64)}
    Checkpointer(tmp_path).save(1, {"loop": state})
    back: dict = {"stale": 1}
    Checkpointer(tmp_path).restore({"loop": back})
    assert torch.equal(back["t"], base.t()) and torch.equal(back["every_other"], base[:, ::2])
    assert back["n"] == 3 and back["lr"] == 0.1 and np.isnan(back["nan"]) and back["pair"] == (1, "a")
    assert back["ids"] == {3: "x", 7: None} and back["arr"].tolist() == [0, 1, 2] and "stale" not in back


def test_grad_scaler_and_generator_state_round_trip(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(7)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(7))
    Checkpointer(tmp_path).save(1, {"scaler": scaler, "gen": gen})
    torch.rand(5, generator=gen)
    scaler2 = torch.amp.GradScaler("cpu", init_scale=2.0)
    Checkpointer(tmp_path).restore({"scaler": scaler2, "gen": gen})
    assert scaler2.state_dict() == scaler.state_dict()
    assert torch.equal(torch.rand(3, generator=gen), expected)


def test_restore_puts_back_the_global_random_generators(tmp_path):
    model, _, _ = trained()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    Checkpointer(tmp_path).save(1, {"model": model})
    expected = (torch.rand(3), random.random(), np.random.rand())
    Checkpointer(tmp_path).restore({"model": model})
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_async_save_holds_the_state_of_its_step_even_when_training_goes_on(tmp_path):
    model, opt, _ = trained()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = Checkpointer(tmp_path, async_save=True)
    handle = ckpt.save(3, {"model": model})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    handle.result()
    m2, _, _ = fresh()
    ckpt.restore({"model": m2})
    assert_same_state(expected, m2.state_dict())


def test_strict_restore_reports_missing_and_unexpected_keys_and_changes_nothing(tmp_path):
    Checkpointer(tmp_path).save(1, {"model": torch.nn.Linear(4, 2)})
    other = torch.nn.Sequential(torch.nn.Linear(4, 2))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(StateMismatchError, match=r'Missing key\(s\) in state_dict: "0.weight", "0.bias".*'
                                                 r'Unexpected key\(s\) in state_dict: "weight", "bias"'):
        Checkpointer(tmp_path).restore({"model": other})
    assert_same_state(before, other.state_dict())


def test_strict_restore_reports_size_mismatch_like_load_state_dict(tmp_path):
    Checkpointer(tmp_path).save(1, {"model": torch.nn.Linear(4, 2)})
    with pytest.raises(StateMismatchError, match=r"size mismatch for weight: copying a param with shape \(2, 4\) "
                                                 r"from checkpoint, the shape in current model is \(3, 4\)"):
        Checkpointer(tmp_path).restore({"model": torch.nn.Linear(4, 3)})


def test_restore_refuses_app_state_names_the_checkpoint_does_not_have(tmp_path):
    Checkpointer(tmp_path).save(1, {"model": torch.nn.Linear(4, 2)})
    with pytest.raises(StateMismatchError, match=r'Missing key\(s\) in checkpoint: "optimizer"'):
        Checkpointer(tmp_path).restore({"model": torch.nn.Linear(4, 2), "optimizer": {}})


def test_strict_false_restores_what_matches_and_logs_the_rest(tmp_path, caplog):
    saved = torch.nn.Linear(4, 2)
    Checkpointer(tmp_path).save(1, {"model": saved})
    other = torch.nn.Module()
    other.weight = torch.nn.Parameter(torch.zeros(2, 4))
    other.extra = torch.nn.Parameter(torch.zeros(1))
    with caplog.at_level(logging.WARNING, logger="keepbest"):
        Checkpointer(tmp_path).restore({"model": other, "loop": {}}, strict=False)
    assert torch.equal(other.weight, saved.weight)
    assert "model.extra (not in the checkpoint)" in caplog.text and "loop (not in the checkpoint)" in caplog.text


def test_save_refuses_a_value_that_is_neither_tensor_nor_json_naming_its_path(tmp_path):
    with pytest.raises(TypeError, match=r"Cannot save app_state\['loop'\]\['cfg/fn'\]: a builtins.function is "
                                        r"neither a tensor nor JSON data.*never pickles"):
        Checkpointer(tmp_path).save(1, {"loop": {"cfg": {"fn": lambda: 0}}})
    assert Checkpointer(tmp_path).checkpoints == []


@pytest.mark.parametrize("app_state, match", [
    ({}, "needs app_state: a non-empty dict"),
    ({"model": object()}, r"app_state\['model'\] is a object, which has no state_dict"),
    ({"a/b": {}}, "app_state name 'a/b' cannot name a file"),
    ({"rng": {}}, "app_state name 'rng' cannot name a file"),
])
def test_save_refuses_bad_app_state(tmp_path, app_state, match):
    with pytest.raises((TypeError, ValueError), match=match):
        Checkpointer(tmp_path).save(1, app_state)


@pytest.mark.parametrize("kwargs, match", [
    ({"keep_best": 2}, "keep_best needs monitor="),
    ({"keep_last": 0}, "KeepLast"),
    ({"monitor": "acc", "mode": "auto"}, "isn't able to automatically determine"),
    ({"mode": "up", "monitor": "loss"}, "mode 'up' is unknown"),
    ({"async_save": "yes"}, "async_save must be True or False"),
    ({"coordinator": "gloo"}, "coordinator must be 'auto', None"),
])
def test_bad_arguments_fail_at_construction(tmp_path, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        Checkpointer(tmp_path, **kwargs)


def test_keep_last_and_keep_best_prune_and_best_restores_the_lowest(tmp_path):
    ckpt = Checkpointer(tmp_path, monitor="val_loss", keep_last=1, keep_best=1)
    model = torch.nn.Linear(2, 1)
    for step, value in [(1, 0.5), (2, 0.2), (3, 0.9), (4, 0.7)]:
        with torch.no_grad():
            model.weight.fill_(step)
        ckpt.save(step, {"model": model}, metrics={"val_loss": value})
    assert [c.step for c in ckpt.checkpoints] == [2, 4]
    assert ckpt.restore({"model": model}, "best").step == 2 and model.weight.flatten().tolist() == [2.0, 2.0]
    assert ckpt.restore({"model": model}, 4).step == 4 and model.weight.flatten().tolist() == [4.0, 4.0]


def test_restore_of_an_empty_folder_returns_none_and_a_missing_step_raises(tmp_path):
    ckpt = Checkpointer(tmp_path)
    assert ckpt.restore({"model": torch.nn.Linear(2, 1)}) is None
    ckpt.save(5, {"model": torch.nn.Linear(2, 1)})
    with pytest.raises(CheckpointNotFoundError, match=r"No checkpoint at step 7 .*Available: 5\."):
        ckpt.restore({"model": torch.nn.Linear(2, 1)}, 7)
    with pytest.raises(CheckpointNotFoundError, match="No best checkpoint .*no monitor was given or recorded"):
        ckpt.restore({"model": torch.nn.Linear(2, 1)}, "best")


def test_latest_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(tmp_path):
    model = torch.nn.Linear(2, 1)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(1, {"model": model})
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1)
    newest = ckpt.save(2, {"model": model}).result()
    target = newest.path / "model.safetensors"
    target.write_bytes(target.read_bytes()[:-4] + b"\0\0\0\0")
    fresh_model = torch.nn.Linear(2, 1)
    with pytest.warns(UserWarning, match="instead of .*ckpt-000000002.*does not match its manifest"):
        assert ckpt.restore({"model": fresh_model}).step == 1
    assert_same_state(good, fresh_model.state_dict())


def test_export_writes_a_state_dict_file_that_torch_load_weights_only_reads(tmp_path):
    model, _, _ = trained()
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(3, {"model": model})
    exported = ckpt.export(tmp_path / "out" / "model.pt")
    assert exported.manifest.format == "torch-state-dict" and exported.step == 3
    loaded = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert_same_state(model.state_dict(), loaded)
    m2, _, _ = fresh()
    m2.load_state_dict(loaded)
    assert m2.out.weight is m2.emb.weight


def test_import_state_dict_makes_a_checkpoint_that_restores_into_a_module(tmp_path):
    model, _, _ = trained()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    ckpt = Checkpointer(tmp_path / "run")
    assert ckpt.import_state_dict(tmp_path / "plain.pt", step=7).step == 7
    m2, _, _ = fresh()
    ckpt.restore({"model": m2}, rng=True)
    assert_same_state(model.state_dict(), m2.state_dict())


def test_export_names_the_entries_when_asked_for_a_missing_one(tmp_path):
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(1, {"net": torch.nn.Linear(2, 1)})
    with pytest.raises(ValueError, match=r"no app_state entry 'model'. Pass entry= one of \['net'\]"):
        ckpt.export(tmp_path / "model.pt")


def test_training_after_restore_never_writes_into_the_checkpoint(tmp_path):
    model, opt, _ = trained()
    ckpt = Checkpointer(tmp_path)
    saved = ckpt.save(3, {"model": model, "optimizer": opt}).result()
    expected = {i: {k: v.clone() for k, v in st.items()} for i, st in opt.state_dict()["state"].items()}
    m2, o2, _ = fresh()
    ckpt.restore({"model": m2, "optimizer": o2})
    for _ in range(2):  # AdamW updates its restored state in place
        loss = m2(torch.randint(0, 12, (16,))).square().mean()
        o2.zero_grad()
        loss.backward()
        o2.step()
    assert not torch.equal(o2.state_dict()["state"][0]["exp_avg"], expected[0]["exp_avg"])
    ckpt.manager.store.verify(saved.manifest)  # the files still match their digests
    m3, o3, _ = fresh()
    ckpt.restore({"model": m3, "optimizer": o3})
    for i, st in expected.items():
        assert_same_state(st, o3.state_dict()["state"][i])


def test_a_frozen_layer_is_not_written_again_by_the_next_save(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 4))  # 2 MiB frozen, 16 KiB trained
    model[0].requires_grad_(False)
    ckpt = Checkpointer(tmp_path)
    first = ckpt.save(1, {"model": model}).result()
    with torch.no_grad():
        model[1].weight.add_(1)
    second = ckpt.save(2, {"model": model}).result()
    shards = {f.path: f.digest for f in second.manifest.files if f.path.startswith("model-")}
    frozen = [p for p, d in shards.items() if d in {f.digest for f in first.manifest.files}]
    assert frozen and all((second.path / p).stat().st_nlink == 2 for p in frozen)  # hard links to the first
    assert any(f.path == "model.safetensors" and f.digest not in {g.digest for g in first.manifest.files}
               for f in second.manifest.files)  # the trained layer was written
    fresh = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.Linear(1024, 4))
    ckpt.restore({"model": fresh})
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_tensor_shared_inside_a_dict_is_stored_once_and_restores_shared(tmp_path):
    shared = torch.arange(6.0)
    ckpt = Checkpointer(tmp_path)
    saved = ckpt.save(1, {"loop": {"a": shared, "b": shared, "empty1": torch.zeros(0), "empty2": torch.zeros(0)}})
    doc = json.loads(saved.result().reader().read("app_state.json"))
    assert doc["entries"]["loop"]["tree"]["b"] == {"__tensor__": "a"}
    assert doc["entries"]["loop"]["tree"]["empty2"] == {"__tensor__": "empty2"}  # empty tensors are never "tied"
    back: dict = {}
    ckpt.restore({"loop": back})
    assert back["a"] is back["b"] and torch.equal(back["a"], shared) and back["empty1"] is not back["empty2"]


def test_an_optimizer_over_other_parameters_is_refused_before_the_model_changes(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Checkpointer(tmp_path).save(1, {"model": model, "optimizer": opt})
    other = torch.nn.Linear(4, 2)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    wrong = torch.optim.SGD([other.weight], lr=0.1)  # one parameter, not two
    with pytest.raises(StateMismatchError, match=r"parameters per group: saved \[2\], optimizer \[1\]"):
        Checkpointer(tmp_path).restore({"model": other, "optimizer": wrong})
    assert_same_state(before, other.state_dict())
