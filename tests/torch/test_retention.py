"""Checkpointer's retention keywords: the same rules as the Keras callback's."""

from __future__ import annotations

import pytest
import torch

from keepbest.policy import KeepLast
from keepbest.torch import Checkpointer


def test_checkpointer_combines_keep_every_keep_and_max_bytes(tmp_path):
    model = torch.nn.Linear(16, 16)
    probe = Checkpointer(tmp_path / "probe", coordinator=None)
    size = probe.save(1, {"model": model}, epoch=1).result().size  # each save has the same tensors and RNG states
    probe.close()
    budget = int(2.5 * size)
    ckpt = Checkpointer(tmp_path / "run", keep_every=3, keep=[KeepLast(1)], max_bytes=budget, coordinator=None)
    for epoch in range(1, 11):
        ckpt.save(epoch, {"model": model}, epoch=epoch).result()
    kept = ckpt.manager.checkpoints()
    # keep_every=3 and KeepLast(1) choose 3, 6, 9 and 10; the budget holds the two newest of them.
    assert [c.epoch for c in kept] == [9, 10]
    assert sum(c.size for c in kept) <= budget
    ckpt.close()


def test_checkpointer_keep_best_in_keep_needs_a_monitor(tmp_path):
    from keepbest.policy import KeepBest

    with pytest.raises(ValueError, match=r"Checkpointer keep_best needs monitor=.*Received: keep_best=1, monitor=None"):
        Checkpointer(tmp_path, keep=[KeepBest(1)], coordinator=None)
