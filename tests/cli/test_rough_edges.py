"""What a new user hits first: folders keepbest did not write, pipes, exit codes, progress on long commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keepbest import CheckpointManager
from keepbest.errors import CheckpointNotFoundError


def keepbest(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keepbest.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


@pytest.fixture
def keras_files(tmp_path):
    for name in ("model.keras", "best.weights.h5"):
        (tmp_path / name).write_bytes(b"not written by keepbest")
    (tmp_path / "notes.txt").write_text("not a model")
    return tmp_path


def test_ls_of_plain_keras_files_names_them_and_says_what_to_do(keras_files):
    result = keepbest("ls", str(keras_files))
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "2 model file(s) without keepbest manifests" in text and "best.weights.h5, model.keras" in text
    assert "keras.models.load_model" in text and "notes.txt" not in text


def test_verify_of_plain_keras_files_fails_instead_of_passing_zero_of_zero(keras_files):
    result = keepbest("verify", str(keras_files))
    assert result.returncode == 1
    assert "nothing verified" in result.stdout and "0 of 0" not in result.stdout
    assert "2 model file(s) without keepbest manifests" in " ".join(result.stdout.split())


def test_verify_json_reports_each_checkpoint_and_the_unmanaged_files(tmp_path, flip_byte):
    mgr = CheckpointManager(tmp_path)
    for step in (1, 2):
        mgr.save(step, {"w": np.arange(4.0) * step})
    (tmp_path / "model.keras").write_bytes(b"x")
    flip_byte(tmp_path / "ckpt-000000001" / "state.safetensors")
    result = keepbest("verify", "--json", str(tmp_path))
    doc = json.loads(result.stdout)
    assert result.returncode == 1 == doc["exit_code"]
    assert [(c["name"], c["status"]) for c in doc["checkpoints"]] == [("ckpt-000000001", "corrupt"),
                                                                      ("ckpt-000000002", "ok")]
    assert doc["verified"] == 1 and doc["problems"] == 1 and doc["unmanaged"] == ["model.keras"]


def test_load_model_of_plain_keras_files_says_they_lack_manifests(keras_files):
    kb_keras = pytest.importorskip("keepbest.keras")
    with pytest.raises(CheckpointNotFoundError, match=r"No keepbest checkpoint at .*2 model file\(s\) without "
                                                      r"keepbest manifests .*keras.models.load_model"):
        kb_keras.load_model(str(keras_files))


def test_ls_piped_into_head_exits_quietly(tmp_path):
    mgr = CheckpointManager(tmp_path)
    for step in range(1, 40):
        mgr.save(step, {"w": np.zeros(2)})
    result = subprocess.run(f"{sys.executable} -m keepbest.cli ls --wide {tmp_path} | head -1", shell=True,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith("name") and result.stderr == ""


def test_help_documents_the_exit_codes():
    out = keepbest("--help").stdout
    assert "exit codes:" in out and "0  success" in out and "1  a problem was found" in out and "2  bad input" in out


def test_verify_draws_a_progress_bar_only_when_asked_or_on_a_terminal(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": np.zeros(1000)})
    quiet = keepbest("verify", str(tmp_path))
    shown = keepbest("verify", str(tmp_path), KEEPBEST_PROGRESS="1")
    assert quiet.returncode == shown.returncode == 0 and quiet.stdout == shown.stdout
    assert quiet.stderr == "" and "verifying" in shown.stderr and "━" in shown.stderr
