"""The ``keepbest`` command, run as users run it: a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from keepbest import CheckpointManager, KeepBest, KeepLast, Monitor, listing
from tests.helpers import flip_byte


def keepbest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keepbest.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def run_dir(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=Monitor("val_loss", "min"), keep=[KeepLast(2), KeepBest(1)])
    for epoch, loss in enumerate([3.0, 1.0, 2.0, 4.0, 5.0], start=1):
        mgr.save(epoch * 10, {"w": np.full(4, epoch, np.float32)}, metrics={"loss": loss + 1, "val_loss": loss},
                 epoch=epoch)
    return tmp_path


def test_ls_wide_prints_every_metric_column_with_the_best_marked(run_dir):
    result = keepbest("ls", "--wide", str(run_dir))
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split()[:6] == ["name", "epoch", "batch", "step", "loss", "val_loss"]
    assert [r.split()[1] for r in rows] == ["2", "4", "5"]
    assert [("* val_loss" in r) for r in rows] == [True, False, False]
    assert "1.0000" in rows[0] and "B" in rows[0]


def test_ls_prints_the_monitored_metric_best_and_aliases_in_short_columns(run_dir):
    result = keepbest("ls", str(run_dir))
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.strip().splitlines()
    assert header.split() == ["name", "epoch", "val_loss", "best/aliases", "size", "age"]
    assert [r.split()[:3] for r in rows] == [["ckpt-000000020", "2", "1.0000"], ["ckpt-000000040", "4", "4.0000"],
                                             ["ckpt-000000050", "5", "5.0000"]]
    assert [r.split()[3] == "*" for r in rows] == [True, False, False]


def test_ls_fits_a_long_name_and_aliases_into_80_columns(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=Monitor("val_loss"), series="run-{epoch:04d}-" + "x" * 80)
    for epoch in (1, 2):
        mgr.save(epoch, {"w": np.zeros(3)}, metrics={"val_loss": 1.0 / epoch}, epoch=epoch)
    mgr.promote(0, "production-candidate-for-the-" + "y" * 60)
    result = subprocess.run([sys.executable, "-m", "keepbest.cli", "ls", str(tmp_path)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and max(map(len, lines)) <= 80, result.stdout
    assert "…" in lines[1] and lines[1].split()[1:3] == ["1", "1.0000"]


def test_ls_shows_a_hand_edited_huge_metric_in_a_short_field(run_dir):
    path = run_dir / "ckpt-000000020" / "manifest.json"
    doc = json.loads(path.read_text())
    doc["metrics"]["val_loss"] = -1e308
    path.write_text(json.dumps(doc))
    for args in (["ls"], ["ls", "--wide"]):
        out = keepbest(*args, str(run_dir)).stdout
        assert "-1e+308" in out and max(map(len, out.splitlines())) < 160, out


def test_sizes_past_terabytes_stay_one_short_field():
    assert listing.human_size(10**30) == "1.0e+18 TB" and listing.human_size(1536) == "1.5 kB"
    assert listing.human_size(5 * 10**15) == "5000.0 TB" and listing.human_size(999) == "999 B"


def test_ls_json_carries_metrics_best_and_files(run_dir):
    result = keepbest("ls", "--json", str(run_dir))
    doc = json.loads(result.stdout)
    assert [(d["epoch"], d["best"], d["metrics"]["val_loss"]) for d in doc] == [(2, True, 1.0), (4, False, 4.0),
                                                                               (5, False, 5.0)]
    assert doc[0]["files"][0]["path"] == "state.safetensors" and len(doc[0]["files"][0]["blake3"]) == 64


def test_ls_of_a_single_checkpoint_folder_lists_only_it(run_dir):
    result = keepbest("ls", "--json", str(run_dir / "ckpt-000000040"))
    assert [d["epoch"] for d in json.loads(result.stdout)] == [4]


def test_verify_passes_on_intact_checkpoints(run_dir):
    result = keepbest("verify", str(run_dir))
    assert result.returncode == 0
    assert "3 of 3 checkpoint(s) verified" in result.stdout


def test_verify_exits_1_and_names_the_file_on_a_flipped_bit(run_dir):
    victim = run_dir / "ckpt-000000040" / "state.safetensors"
    flip_byte(victim, mask=0x80)
    result = keepbest("verify", str(run_dir))
    assert result.returncode == 1
    assert f"CORRUPT ckpt-000000040: Checkpoint ckpt-000000040 is corrupt: file {victim}" in result.stdout


def test_verify_exits_1_on_an_unreadable_manifest(run_dir):
    (run_dir / "ckpt-000000050" / "manifest.json").write_text("{not json")
    result = keepbest("verify", str(run_dir))
    assert result.returncode == 1
    assert "ckpt-000000050" in result.stdout and "not valid JSON" in result.stdout


def test_gc_removes_leftovers_of_a_dead_writer(run_dir, dead_token):
    leftover = run_dir / f".keepbest-tmp-{dead_token}-0badf00d-ckpt-000000060"
    leftover.mkdir()
    (leftover / "state.safetensors").write_bytes(b"half")
    assert f"would remove {leftover}" in keepbest("gc", "--dry-run", str(run_dir)).stdout
    assert leftover.exists()
    result = keepbest("gc", str(run_dir))
    assert result.returncode == 0 and f"removed {leftover}" in result.stdout
    assert not leftover.exists()
    assert keepbest("verify", str(run_dir)).returncode == 0


def test_cli_imports_no_framework():
    code = "import sys, keepbest.cli; print(sorted(m for m in ('keras', 'jax', 'torch', 'tensorflow') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["ls", "verify"])
def test_missing_folder_is_an_error_not_an_empty_listing(tmp_path, command):
    result = keepbest(command, str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_gc_removes_evaluation_records_of_deleted_checkpoints(run_dir):
    from keepbest import evaluation, store
    from keepbest.discovery import list_checkpoints

    folder = store.open(run_dir)
    kept = list_checkpoints(run_dir)[0]
    evaluation.write_record(folder, "eval", kept.manifest, metrics={"loss": 1.0})
    gone = kept.manifest.__class__(name="ckpt-000000010", layout="dir", format="tensors", series="ckpt", created=1.0)
    evaluation.write_record(folder, "eval", gone, metrics={"loss": 2.0})
    result = keepbest("gc", str(run_dir))
    assert "ckpt-000000010.json (evaluation of a checkpoint that is gone)" in result.stdout
    assert list(evaluation.read_records(folder)) == [evaluation.commit_id(kept.manifest)]


def test_sidecar_without_a_factory_spec_explains_the_format(run_dir):
    result = keepbest("sidecar", str(run_dir), "--model", "nocolon", "--data", "x:y")
    assert result.returncode != 0
    assert "--model must be 'module:function' or 'file.py:function'. Received: --model nocolon" in result.stderr
