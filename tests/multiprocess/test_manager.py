"""CheckpointManager on two real processes, with torch.distributed (gloo on 127.0.0.1) and with JAX's distributed
client (CPU): one commit per save, each tensor written once, and a lost process fails the save, never a hang."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from keepbest import CheckpointManager, store as stores
from tests.multiprocess import procs

ENGINES = [pytest.param("torch", marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                                         reason="torch is not installed")),
           pytest.param("jax", marks=pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                                                       reason="jax is not installed"))]

TENSOR_BYTES = (1 << 20) * 4 + 7 * 8  # model/w1, model/w2 and model/b: replicated
SHARD_BYTES = 1000 * 8  # optimizer/process<r>: one per process


def run(tmp_path: Path, n: int, url: str, epochs: int = 10, engine: str = "torch") -> list[dict]:
    group = procs.start("manager_child", n, ["--url", url, "--epochs", str(epochs), "--out", str(tmp_path / f"out{n}"),
                                             "--engine", engine], tmp_path / "logs", env={"JAX_PLATFORMS": "cpu"})
    group.check(timeout=240)
    return [json.loads((tmp_path / f"out{n}-{r}.json").read_text()) for r in range(n)]


def committed(url: str) -> list[tuple[str, int | None, int | None]]:
    return [(c.name, c.manifest.version, c.epoch) for c in CheckpointManager(url).checkpoints()]


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_commit_the_checkpoints_one_process_commits(tmp_path, engine):
    run(tmp_path, 1, str(tmp_path / "one"), engine=engine)
    run(tmp_path, 2, str(tmp_path / "two"), engine=engine)
    assert committed(str(tmp_path / "two")) == committed(str(tmp_path / "one"))
    assert CheckpointManager(str(tmp_path / "two")).aliases == CheckpointManager(str(tmp_path / "one")).aliases


@pytest.mark.parametrize("engine", ENGINES)
def test_each_tensor_is_written_once_in_total(tmp_path, engine):
    report = run(tmp_path, 2, str(tmp_path / "two"), engine=engine)
    per_process = [r["written"] for r in report]
    tensors = 10 * (TENSOR_BYTES + 2 * SHARD_BYTES)
    print(f"bytes written per process: {per_process}; the tensors of 10 saves: {tensors}")
    assert tensors <= sum(per_process) <= tensors + 10 * 4096  # once each, plus the safetensors headers
    assert max(per_process) < 0.6 * tensors  # the replicated tensors are shared out, not written by both


@pytest.mark.parametrize("engine", ENGINES)
def test_the_committed_checkpoint_restores_in_one_process_bit_for_bit(tmp_path, engine):
    url = str(tmp_path / "two")
    run(tmp_path, 2, url, engine=engine)
    final = [dict(np.load(tmp_path / f"out2-{r}.npz")) for r in range(2)]
    loaded = CheckpointManager(url).load()
    assert sorted(loaded) == ["model/b", "model/w1", "model/w2", "optimizer/process0", "optimizer/process1"]
    for name in ("model/w1", "model/w2", "model/b"):
        assert loaded[name].tobytes() == final[0][name].tobytes() == final[1][name].tobytes()
    for r in range(2):
        assert loaded[f"optimizer/process{r}"].tobytes() == final[r][f"optimizer/process{r}"].tobytes()
    verify = subprocess.run([sys.executable, "-m", "keepbest.cli", "verify", url], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "3 of 3 checkpoint(s) verified" in verify.stdout


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_two_processes_save_to_one_bucket(tmp_path, s3):
    url = "s3://kbest/torch-two"
    run(tmp_path, 2, url, epochs=4)
    names = [c.name for c in CheckpointManager(url).checkpoints()]
    assert names == ["ckpt-000000030", "ckpt-000000040"]  # keep_last=2; the best (epoch 3) is the newest but one
    assert CheckpointManager(url).load()["model/b"].tolist() == [0, 4, 8, 12, 16, 20, 24]
    assert stores.open(url).orphans().dead == []


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_processes_that_do_not_share_the_folder_fail_with_the_reason(tmp_path):
    group = procs.start("manager_child", 2, ["--url", str(tmp_path / "host{rank}"), "--epochs", "1"],
                        tmp_path / "logs")
    codes = group.wait(timeout=120)
    assert codes[0] == 1 and codes[1] != 0, group.report()  # (process 1 may also die in gloo's teardown)
    assert "CoordinationError: Process 1 failed to write its part of checkpoint ckpt-000000010 (step 10): " \
           "ValueError: Cannot write into staged entry" in group.output(0), group.report()
    assert "must save to the same folder" in group.output(1)
    assert [p.name for p in (tmp_path / "host0").iterdir() if p.name != ".keepbest"] == []


@pytest.mark.parametrize("engine", ENGINES)
def test_a_save_that_fails_on_one_process_fails_everywhere_and_the_next_one_commits(tmp_path, engine):
    url = tmp_path / "ckpt"
    group = procs.start("manager_child", 2, ["--url", str(url), "--epochs", "4", "--fail-at", "2", "--timeout", "60",
                                             "--engine", engine], tmp_path / "logs", env={"JAX_PLATFORMS": "cpu"})
    started = time.monotonic()
    group.check(timeout=120)
    assert time.monotonic() - started < 50  # nobody waited for the 60 s timeout
    assert "failed 2: TypeError: Cannot store a tensor of dtype complex64" in group.output(1)
    assert "failed 2: CoordinationError: Cannot save checkpoint ckpt-000000020 (step 20): process 1 cannot save " \
           "its part: TypeError" in group.output(0), group.report()
    assert committed(str(url)) == [("ckpt-000000030", 1, 3), ("ckpt-000000040", 2, 4)]


KILL_TIMEOUT = 5.0


@pytest.mark.parametrize("trial", range(10))
@pytest.mark.parametrize("engine", ENGINES)
def test_a_killed_process_fails_the_save_on_the_others_and_loses_nothing(tmp_path, engine, trial):
    url = tmp_path / "ckpt"
    group = procs.start("manager_child", 2, ["--url", str(url), "--forever", "--timeout", str(KILL_TIMEOUT),
                                           "--size", str(1 << 22), "--engine", engine], tmp_path / "logs",
                        env={"JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + 120
        while "saving 3\n" not in group.output(1):
            assert time.monotonic() < deadline and group.children[1].poll() is None, group.report()
            time.sleep(0.02)
        time.sleep(random.Random(trial).uniform(0.0, 0.4))  # a random moment of a save (~0.1-0.3 s each)
        os.kill(group.children[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        code = group.children[0].wait(KILL_TIMEOUT + 30)
        took = time.monotonic() - killed
    finally:
        group.kill()
    out = group.output(0)
    print(f"process 0 exited {code} {took:.2f} s after the kill")
    assert code == 1 and "keepbest.errors.CoordinationError" in out, out[-3000:]
    assert took < KILL_TIMEOUT + 10  # (JAX notices only at the timeout; gloo as soon as the connection breaks)
    reported = [line.split()[1] for line in out.splitlines() if line.startswith("committed ")]
    store = stores.open(str(url))
    listing = store.list()
    assert listing.damaged == []  # no partial commit
    names = [m.name for m in listing.manifests]
    assert reported[-1] in names  # the last checkpoint process 0 saw committed is still there
    for m in listing.manifests:
        store.verify(m)
    store.recover()  # what gc does
    assert store.orphans().dead == [] and store.orphans().undecided == []
    assert sorted(p.name for p in url.iterdir() if p.name != ".keepbest") == sorted(names)
