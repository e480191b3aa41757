"""keepbest.keras on two real JAX processes under keras.distribution (CPU, gloo): DataParallel and
ModelParallel, sync and async, a folder and a bucket, and BackupAndRestore killed and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from keepbest import CheckpointManager, codec, store as stores
from tests.multiprocess import procs

pytest.importorskip("jax", reason="jax is not installed")


def run(tmp_path: Path, n: int, *args: str, check: bool = True) -> procs.Group:
    env = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "KERAS_HOME": os.environ.get("KERAS_HOME", str(tmp_path / "keras_home"))}
    group = procs.start("keras_child", n, list(args), tmp_path / "logs", env=env)
    if check:
        group.check(timeout=300)
    return group


def committed(url: str, series: str = "ckpt-{epoch:02d}") -> list[tuple[str, int | None, int | None]]:
    return [(c.name, c.manifest.version, c.epoch) for c in CheckpointManager(url, series=series).checkpoints()]


def weights(path: Path) -> dict[str, np.ndarray]:
    return dict(np.load(path))


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


def test_data_parallel_commits_the_checkpoints_one_process_commits(tmp_path):
    run(tmp_path, 1, "--mode", "fit", "--url", str(tmp_path / "one"))
    run(tmp_path, 2, "--mode", "fit", "--url", str(tmp_path / "two"))
    # Process 1 logs other scores (its best would be another epoch): process 0 alone decides.
    assert committed(str(tmp_path / "two")) == committed(str(tmp_path / "one")) == [
        ("ckpt-08", 7, 8), ("ckpt-09", 8, 9), ("ckpt-10", 9, 10)]
    two = CheckpointManager(str(tmp_path / "two"), series="ckpt-{epoch:02d}")
    assert two.aliases == CheckpointManager(str(tmp_path / "one"), series="ckpt-{epoch:02d}").aliases
    assert two.aliases["best"] == 7


def test_data_parallel_writes_each_variable_once(tmp_path):
    run(tmp_path, 2, "--mode", "fit", "--url", str(tmp_path / "two"), "--epochs", "2")
    ckpt = CheckpointManager(str(tmp_path / "two"), series="ckpt-{epoch:02d}").latest
    assert ckpt is not None
    per_process = [sum(f.size for f in ckpt.manifest.files if f"-p0000{r}-" in f.path) for r in range(2)]
    reader = ckpt.reader()
    tensors = sum(a.nbytes for f in ("model.safetensors", "optimizer.safetensors")
                  for a in codec.load(reader.buffer, f, reader.where).values())
    print(f"bytes written per process: {per_process}; the variables: {tensors}")
    assert all(per_process)  # both processes wrote a part
    assert tensors <= sum(per_process) <= tensors + 8 * 4096  # each variable once, plus the headers


def test_data_parallel_checkpoint_restores_in_one_process_bit_for_bit(tmp_path):
    run(tmp_path, 2, "--mode", "fit", "--url", str(tmp_path / "two"), "--out", str(tmp_path / "fit"))
    run(tmp_path, 1, "--mode", "restore", "--url", str(tmp_path / "two" / "ckpt-10"), "--out", str(tmp_path / "one"))
    assert_same(weights(tmp_path / "fit-0.npz"), weights(tmp_path / "fit-1.npz"))
    assert_same(weights(tmp_path / "one-0.npz"), weights(tmp_path / "fit-0.npz"))
    verify = subprocess.run([sys.executable, "-m", "keepbest.cli", "verify", str(tmp_path / "two")],
                            capture_output=True, text=True)
    assert verify.returncode == 0 and "3 of 3 checkpoint(s) verified" in verify.stdout, verify.stdout + verify.stderr


def test_async_saves_from_two_processes_commit_the_same_checkpoints(tmp_path):
    run(tmp_path, 2, "--mode", "fit", "--url", str(tmp_path / "two"), "--async-save", "--out", str(tmp_path / "fit"))
    assert committed(str(tmp_path / "two")) == [("ckpt-08", 7, 8), ("ckpt-09", 8, 9), ("ckpt-10", 9, 10)]
    staged = [json.loads((tmp_path / f"fit-{r}.json").read_text())["staged"] for r in range(2)]
    print(f"snapshot bytes per save, per process: {staged}")
    whole = staged[0][0]
    assert staged[1][0] == whole  # the first save copies everything: nobody wrote anything yet
    for later in range(1, 10):  # then each process copies only what it writes: the state once in all
        assert staged[0][later] + staged[1][later] == whole and 0 < staged[0][later] < whole
    run(tmp_path, 1, "--mode", "restore", "--url", str(tmp_path / "two" / "ckpt-10"), "--out", str(tmp_path / "one"))
    assert_same(weights(tmp_path / "one-0.npz"), weights(tmp_path / "fit-0.npz"))


def test_model_parallel_pieces_restore_on_one_and_on_two_processes(tmp_path):
    run(tmp_path, 2, "--mode", "fit", "--parallel", "model", "--url", str(tmp_path / "mp"), "--epochs", "3",
        "--out", str(tmp_path / "fit"))
    assert json.loads((tmp_path / "fit-0.json").read_text())["sharded"] == [True, False, False, False]
    ckpt = tmp_path / "mp" / "ckpt-03"
    pieces = [f["path"] for f in json.loads((ckpt / "manifest.json").read_text())["files"]]
    assert any("-p00000-" in p for p in pieces) and any("-p00001-" in p for p in pieces)
    run(tmp_path, 1, "--mode", "restore", "--parallel", "model", "--url", str(ckpt), "--out", str(tmp_path / "one"))
    run(tmp_path, 2, "--mode", "restore", "--parallel", "model", "--url", str(ckpt), "--out", str(tmp_path / "two"))
    expected = weights(tmp_path / "fit-0.npz")
    for got in ("one-0", "two-0", "two-1"):
        assert_same(weights(tmp_path / f"{got}.npz"), expected)


def test_two_processes_save_to_one_bucket(tmp_path, s3):
    url = "s3://kbest/keras-two"
    run(tmp_path, 2, "--mode", "fit", "--url", url, "--epochs", "4", "--out", str(tmp_path / "fit"))
    assert [c[0] for c in committed(url)] == ["ckpt-03", "ckpt-04"]  # the best (epoch 3) and the newest
    run(tmp_path, 1, "--mode", "restore", "--url", f"{url}/ckpt-04", "--out", str(tmp_path / "one"))
    assert_same(weights(tmp_path / "one-0.npz"), weights(tmp_path / "fit-0.npz"))
    assert stores.open(url).orphans().dead == []


def test_backup_before_preemption_is_refused_with_several_processes(tmp_path):
    group = run(tmp_path, 2, "--mode", "preempt", "--url", str(tmp_path / "backup"), check=False)
    assert group.wait(timeout=120) == [1, 1]
    for r in range(2):
        assert "ValueError: BackupAndRestore(save_before_preemption=True) is not supported with several processes" \
            in group.output(r), group.report()


def losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        step, loss = line.split()
        out[int(step)] = float(loss)
    return out


def test_backup_and_restore_on_two_processes_resumes_exactly_after_a_kill(tmp_path):
    run(tmp_path, 2, "--mode", "backup", "--url", str(tmp_path / "whole"), "--epochs", "3",
        "--out", str(tmp_path / "whole"))
    # Process 1 dies at its 11th batch (a backup is taken every 3); the job is then torn down, as a launcher does.
    group = run(tmp_path, 2, "--mode", "backup", "--url", str(tmp_path / "cut"), "--epochs", "3",
                "--out", str(tmp_path / "cut"), "--die-at", "11", check=False)
    assert group.children[1].wait(300) == -signal.SIGKILL, group.report()
    time.sleep(0.5)
    group.kill()
    first = losses(tmp_path / "cut-0.losses")
    run(tmp_path, 2, "--mode", "backup", "--url", str(tmp_path / "cut"), "--epochs", "3", "--out", str(tmp_path / "cut"))
    expected = losses(tmp_path / "whole-0.losses")
    resumed = losses(tmp_path / "cut-0.losses")
    assert len(expected) == 24 and set(resumed) == set(expected)
    assert min(first) == 1 and max(first) >= 10  # the first run got past the last backup before the kill
    for step, loss in expected.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-6), step
    assert losses(tmp_path / "cut-1.losses") == pytest.approx(resumed, abs=1e-6)


def test_the_example_runs_unchanged_on_one_and_on_two_processes(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore",
           "KERAS_HOME": os.environ.get("KERAS_HOME", str(tmp_path / "keras_home"))}
    for n in (1, 2):
        folder = tmp_path / f"run{n}"
        done = subprocess.run([sys.executable, str(procs.ROOT / "examples" / "multiprocess.py"), "--dir", str(folder),
                               "--epochs", "3", "--processes", str(n)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert sorted(f"process {r} of {n}: done" for r in range(n)) == sorted(
            line for line in done.stdout.splitlines() if line.endswith(": done"))
        epochs = [c.epoch for c in CheckpointManager(str(folder), series="epoch{epoch:02d}").checkpoints()]
        assert epochs[-2:] == [2, 3] and len(epochs) <= 3  # keep_last=2, keep_best=1
        assert not (folder / "backup").exists()  # BackupAndRestore deletes its backups when fit completes
