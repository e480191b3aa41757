"""Unchanged tensors are not written again: shards of large tensors, hard-linked to the previous checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from keepbest import CheckpointManager, CorruptCheckpointError, KeepLast, LocalStore, codec
from tests.helpers import flip_byte

MB = 1 << 20


def _state(step, frozen):
    return {"backbone": frozen, "head": np.full(1000, step, np.float32)}


def write_file(path, tensors, metadata=None):
    path.write_bytes(codec.encode(tensors, metadata).to_bytes())


def read_file(path):
    return codec.load(lambda rel: (path.parent / rel).read_bytes(), path.name, lambda rel: str(path.parent / rel))


def _inodes(ckpt):
    return {p.name: p.stat().st_ino for p in ckpt.path.iterdir() if p.name != "manifest.json"}


@pytest.mark.parametrize("sizes, groups, main, shards", [
    ({"a": 10, "b": 20}, None, ["a", "b"], []),                                   # all small: one file
    ({"a": 2 * MB, "b": 10, "c": 2 * MB}, None, ["b"], [["a", "c"]]),             # large ones share a shard
    ({"a": 2 * MB, "b": 2 * MB}, {"a": "frozen", "b": "trainable"}, [], [["a"], ["b"]]),  # groups never mix
    ({"a": 40 * MB, "b": 40 * MB, "c": 70 * MB}, None, [], [["a"], ["b"], ["c"]]),  # cut at 64 MB
])
def test_plan_shards_keeps_small_tensors_in_the_main_file_and_splits_large_ones(sizes, groups, main, shards):
    tensors = {k: np.zeros(n, np.uint8) for k, n in sizes.items()}
    assert codec.plan_shards(tensors, groups) == (main, shards)


def test_an_unchanged_large_tensor_is_linked_not_written_again(tmp_path):
    frozen = np.random.default_rng(0).standard_normal(MB // 2).astype(np.float32)  # 2 MB
    mgr = CheckpointManager(tmp_path)
    first = mgr.save(1, _state(1, frozen))
    second = mgr.save(2, _state(2, frozen))
    a, b = _inodes(first), _inodes(second)
    assert sorted(a) == ["state-00001.safetensors", "state.safetensors"]
    assert a["state-00001.safetensors"] == b["state-00001.safetensors"]  # the shard: one inode, written once
    assert a["state.safetensors"] != b["state.safetensors"]  # the head changed: written
    np.testing.assert_array_equal(mgr.load(2)["backbone"], frozen)
    np.testing.assert_array_equal(mgr.load(2)["head"], np.full(1000, 2, np.float32))


def test_a_changed_large_tensor_is_written(tmp_path):
    rng = np.random.default_rng(0)
    mgr = CheckpointManager(tmp_path)
    first = mgr.save(1, _state(1, rng.standard_normal(MB // 2).astype(np.float32)))
    second = mgr.save(2, _state(1, rng.standard_normal(MB // 2).astype(np.float32)))
    assert _inodes(first)["state-00001.safetensors"] != _inodes(second)["state-00001.safetensors"]


def test_each_deduplicated_checkpoint_verifies_and_loads_alone(tmp_path):
    frozen = np.arange(MB // 2, dtype=np.float32)
    mgr = CheckpointManager(tmp_path / "run", keep=[KeepLast(1)])
    for step in (1, 2, 3):
        mgr.save(step, _state(step, frozen))
    (last,) = mgr.checkpoints()  # the older ones are deleted; the linked shard lives on
    LocalStore(tmp_path / "run").verify(last.manifest)
    shutil.copytree(last.path, tmp_path / "copy" / last.name)  # a copy holds every byte itself
    alone = CheckpointManager(tmp_path / "copy")
    LocalStore(tmp_path / "copy").verify(alone.get().manifest)
    np.testing.assert_array_equal(alone.load()["backbone"], frozen)


def test_a_damaged_previous_file_is_written_afresh_not_inherited(tmp_path):
    frozen = np.arange(MB // 2, dtype=np.float32)
    mgr = CheckpointManager(tmp_path)
    first = mgr.save(1, _state(1, frozen))
    shard = first.path / "state-00001.safetensors"
    flip_byte(shard)
    second = mgr.save(2, _state(2, frozen))
    assert _inodes(first)["state-00001.safetensors"] != _inodes(second)["state-00001.safetensors"]
    LocalStore(tmp_path).verify(second.manifest)
    with pytest.raises(CorruptCheckpointError, match="state-00001.safetensors does not match its manifest"):
        LocalStore(tmp_path).verify(first.manifest)


def test_dedup_false_writes_every_file(tmp_path):
    frozen = np.arange(MB // 2, dtype=np.float32)
    mgr = CheckpointManager(tmp_path, dedup=False)
    first, second = mgr.save(1, _state(1, frozen)), mgr.save(2, _state(2, frozen))
    assert _inodes(first)["state-00001.safetensors"] != _inodes(second)["state-00001.safetensors"]


@pytest.mark.parametrize("shards, why", [
    (["../escape.safetensors"], "must list shard file names in the same folder"),
    (["sub/x.safetensors"], "must list shard file names in the same folder"),
    ("not a list", "must list shard file names"),
    (["gone.safetensors"], "shard file gone.safetensors is missing"),
])
def test_a_bad_shard_list_raises_naming_the_file(tmp_path, shards, why):
    path = tmp_path / "state.safetensors"
    write_file(path, {"x": np.zeros(2)}, {codec.SHARDS_KEY: json.dumps(shards)})
    with pytest.raises(CorruptCheckpointError, match=rf"Cannot read tensors from {path}: .*{why}"):
        read_file(path)


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
    write_file(tmp_path / "m-00001.safetensors", {"x": np.ones(2)})
    write_file(tmp_path / "m.safetensors", {"x": np.zeros(2)}, {codec.SHARDS_KEY: '["m-00001.safetensors"]'})
    with pytest.raises(CorruptCheckpointError, match=r"tensor 'x' is stored twice"):
        read_file(tmp_path / "m.safetensors")
