"""keepbest.torch.Checkpointer in a real 2-process DDP job (gloo on 127.0.0.1): one commit per save, each
process's part written once, and every process restores the committed state and its own random generators."""

from __future__ import annotations

import json
import re

import pytest

from keepbest import CheckpointManager
from tests.multiprocess import procs


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_ddp_job_commits_one_checkpoint_per_save_and_each_process_restores_it(tmp_path, mode):
    folder = tmp_path / "ckpt"
    group = procs.start("torch_ddp_child", 2, ["--dir", str(folder), "--out", str(tmp_path / "out"),
                                               *(["--async"] if mode == "async" else [])], tmp_path / "logs")
    group.check(timeout=240)
    out = [json.loads((tmp_path / f"out-{r}.json").read_text()) for r in range(2)]
    mgr = CheckpointManager(folder)
    ckpts = mgr.checkpoints()
    # Saves at steps 2, 4, 6 and 6 again: versions v0..v3, one each; keep_last=2 leaves the last two.
    assert [(c.name, c.step, c.manifest.version) for c in ckpts] == [("ckpt-000000004", 4, 1),
                                                                      ("ckpt-000000006", 6, 3)]
    files = [f.path for f in ckpts[-1].manifest.files]
    assert "rng.json" in files and "rng.p00001.json" in files
    assert any(re.fullmatch(r"model-p00001-\d{5}\.safetensors", f) for f in files) or \
        any(re.fullmatch(r"optimizer-p00001-\d{5}\.safetensors", f) for f in files), files  # process 1 wrote a part
    assert out[0]["trained"] == out[1]["trained"]  # DDP kept the replicas equal
    for r in range(2):
        assert out[r]["restored"] == out[r]["trained"] and out[r]["step"] == 6
        assert out[r]["after_restore"] == out[r]["after_save"]  # each process's own generator came back
    assert out[0]["after_save"] != out[1]["after_save"]


def test_a_checkpointer_made_before_init_process_group_refuses_to_save_alone(tmp_path):
    folder = tmp_path / "ckpt"
    group = procs.start("torch_ddp_child", 2, ["--dir", str(folder), "--out", str(tmp_path / "out"), "--early"],
                        tmp_path / "logs")
    group.check(timeout=120)
    for r in range(2):
        error = json.loads((tmp_path / f"out-{r}.json").read_text())["error"]
        assert "created before init_process_group" in error and "Received: world_size=2" in error
    assert CheckpointManager(folder).checkpoints() == []
