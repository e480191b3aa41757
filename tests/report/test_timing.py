"""A save records in its manifest what it cost: the caller's stall, the persist time and the bytes it
reused (dedup); manifests without these fields still load."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pytest

from keepbest import CheckpointManager, CorruptCheckpointError
from keepbest.manifest import Manifest
from keepbest.payload import TensorPayload

MB = 1 << 20
PAUSE = 0.3


@dataclass(frozen=True)
class SlowPayload(TensorPayload):
    """Tensors whose writing takes at least PAUSE seconds."""

    def write(self, staged):
        time.sleep(PAUSE)
        return super().write(staged)


def _slow(value: float) -> SlowPayload:
    return SlowPayload({"state.safetensors": {"w": np.full(4, value, np.float32)}}, detached=True)


def test_a_synchronous_save_records_its_persist_time(tmp_path):
    ckpt = CheckpointManager(tmp_path).save(1, _slow(1.0))
    assert ckpt.manifest.persist >= PAUSE
    assert 0 <= ckpt.manifest.stall < PAUSE  # the writing is counted once, as persist


def test_a_live_payload_counts_its_write_in_the_stall_only(tmp_path):
    live = SlowPayload({"state.safetensors": {"w": np.zeros(4, np.float32)}})  # reads live state: written now
    ckpt = CheckpointManager(tmp_path).save_async(1, live).result()
    assert ckpt.manifest.stall >= PAUSE > ckpt.manifest.persist


def test_an_async_save_stalls_the_caller_less_than_it_takes_to_persist(tmp_path):
    mgr = CheckpointManager(tmp_path)
    ckpt = mgr.save_async(1, _slow(1.0)).result()
    assert ckpt.manifest.stall < PAUSE <= ckpt.manifest.persist


def test_the_stall_counts_from_when_the_caller_started_its_snapshot(tmp_path):
    ckpt = CheckpointManager(tmp_path).save(1, {"w": np.zeros(4)}, started=time.perf_counter() - 0.5)
    assert ckpt.manifest.stall >= 0.5


def test_the_stall_and_persist_time_are_in_the_committed_manifest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save_async(1, {"w": np.zeros(4)}).result()
    doc = json.loads((tmp_path / "ckpt-000000001" / "manifest.json").read_text())
    assert doc["stall_s"] >= 0 and doc["persist_s"] > 0 and doc["reused_bytes"] == 0


def test_an_unchanged_shard_is_recorded_as_reused_bytes(tmp_path):
    frozen = np.random.default_rng(0).standard_normal(MB // 2).astype(np.float32)  # 2 MB: a shard of its own
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"backbone": frozen, "head": np.zeros(10, np.float32)})
    second = mgr.save(2, {"backbone": frozen, "head": np.ones(10, np.float32)})
    shard = next(f for f in second.manifest.files if f.path != "state.safetensors")
    assert second.manifest.reused_bytes == shard.size


def test_a_manifest_without_the_timing_fields_loads_with_none(tmp_path):
    old = Manifest(name="c1", layout="dir", format="tensors", series="s", created=1.0)
    doc = json.loads(old.to_json())
    assert not {"stall_s", "persist_s", "reused_bytes"} & set(doc)
    back = Manifest.from_json(json.dumps(doc).encode(), source="old")
    assert (back.stall, back.persist, back.reused_bytes) == (None, None, None)


@pytest.mark.parametrize("field, value, match", [
    ("stall_s", -1.0, "'stall_s' must be a finite number of seconds >= 0"),
    ("persist_s", "slow", "field 'persist_s' must be int/float"),
    ("reused_bytes", -5, "'reused_bytes' must be a number >= 0"),
])
def test_a_manifest_with_a_bad_timing_field_is_refused(field, value, match):
    doc = json.loads(Manifest(name="c1", layout="dir", format="tensors", series="s", created=1.0).to_json())
    doc[field] = value
    with pytest.raises(CorruptCheckpointError, match=match):
        Manifest.from_json(json.dumps(doc).encode(), source="bad")
