"""Lightning's DDP strategy on 2 CPU processes with keepbest.lightning.ModelCheckpoint: one commit per save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from keepbest import CheckpointManager, history
from keepbest.lightning._io import SERIES
from tests.multiprocess.procs import ROOT, free_port


def test_ddp_fit_commits_each_checkpoint_once_and_keeps_the_top_two_and_last(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ddp_child.py")), str(tmp_path / "ckpt"),
                           str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = [json.loads((tmp_path / f"out-{r}.json").read_text()) for r in range(2)]
    assert out[0]["weights"] == out[1]["weights"]  # DDP kept the replicas equal
    mgr = CheckpointManager(tmp_path / "ckpt", series=SERIES)
    names = [c.name for c in mgr.checkpoints()]
    assert len(names) == 3 and "last.ckpt" in names, names
    commits = [e for e in history.read(mgr.store, SERIES) if e["event"] == "committed"]
    # 4 epochs: a top-k save and a last save each (process 0 alone writes), each committed exactly once.
    assert len(commits) == 8, commits
    assert len({e["version"] for e in commits}) == 8
