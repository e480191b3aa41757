"""Nothing keepbest.torch writes is read with pickle: restore and every CLI command work with pickle disabled."""

from __future__ import annotations

import pickle

import pytest
import torch

from keepbest import cli
from keepbest.torch import Checkpointer


class NoPickle(pickle.Unpickler):
    def __init__(self, *args, **kwargs):
        raise AssertionError("pickle.Unpickler was used")


def refuse(*args, **kwargs):
    raise AssertionError("pickle was used to read")


@pytest.fixture
def pickle_disabled(monkeypatch):
    for name, value in [("load", refuse), ("loads", refuse), ("Unpickler", NoPickle)]:
        monkeypatch.setattr(pickle, name, value)
    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    ckpt = Checkpointer(tmp_path, monitor="loss", keep_last=2)
    for step in (1, 2, 3):
        ckpt.save(step, {"model": model, "optimizer": opt, "loop": {"epoch": step}}, metrics={"loss": 1.0 / step})
    return tmp_path, model


def test_the_patch_catches_a_pickle_read(pickle_disabled, tmp_path):
    with pytest.raises(AssertionError, match="pickle"):
        pickle.loads(b"\x80\x04K\x01.")


def test_restore_reads_no_pickle(pickle_disabled, saved):
    folder, model = saved
    target = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(target.parameters())
    loop: dict = {}
    assert Checkpointer(folder).restore({"model": target, "optimizer": opt, "loop": loop}, "best").step == 3
    assert loop == {"epoch": 3} and torch.equal(target[0].weight, model[0].weight)


@pytest.mark.parametrize("args", [["ls"], ["ls", "--json"], ["verify"], ["gc"], ["gc", "--dry-run"],
                                  ["promote", "{dir}", "v1", "--alias", "production"]])
def test_every_cli_command_reads_no_pickle(pickle_disabled, saved, capsys, args):
    folder, _ = saved
    argv = [a.format(dir=folder) for a in args] if "{dir}" in " ".join(args) else [*args, str(folder)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    if args[0] == "ls":
        assert "ckpt-000000003" in out
    if args[0] == "verify":
        assert "2 of 2" in out
