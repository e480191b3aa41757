"""``keepbest export`` to a folder, a bucket and one ``.safetensors`` file (Keras's formats: tests/keras)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from keepbest import CheckpointManager, Monitor
from keepbest.errors import CorruptCheckpointError, StorageError
from keepbest.exporting import copy_checkpoint, export_safetensors, kind_of
from keepbest.inspection import checkpoint_at

STATE = {"dense/kernel": np.arange(600_000, dtype=np.float32).reshape(600, 1000),  # 2.3 MiB: a shard file
         "dense/bias": np.linspace(-1, 1, 1000).astype(np.float32), "step": np.array(7, np.int64)}


def keepbest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keepbest.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def run(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", monitor=Monitor("loss", "min"))
    mgr.save(10, {k: v * 0 for k, v in STATE.items()}, metrics={"loss": 2.0}, epoch=1)
    mgr.save(20, STATE, metrics={"loss": 1.0}, epoch=2)
    return tmp_path / "run"


def test_export_to_a_folder_passes_keepbest_verify_with_the_same_digests(run, tmp_path):
    result = keepbest("export", f"{run}@best", "--to", str(tmp_path / "shipped"))
    assert result.returncode == 0, result.stderr
    verify = keepbest("verify", str(tmp_path / "shipped"))
    assert verify.returncode == 0 and "1 of 1 checkpoint(s) verified" in verify.stdout
    source = json.loads(keepbest("show", "--json", f"{run}@best").stdout)
    copy = json.loads(keepbest("show", "--json", str(tmp_path / "shipped" / source["name"])).stdout)
    assert (copy["files"], copy["metrics"], copy["version"]) == (source["files"], source["metrics"], source["version"])


def test_export_to_safetensors_loads_with_the_safetensors_package_and_equals_the_arrays(run, tmp_path):
    result = keepbest("export", f"{run}@v1", "--to", str(tmp_path / "out" / "model.safetensors"))
    assert result.returncode == 0, result.stderr
    loaded = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(loaded) == sorted(STATE)
    assert all(np.array_equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in STATE.items())


def test_export_to_safetensors_merges_the_shard_files_into_one(run, tmp_path):
    source = checkpoint_at(f"{run}@v1")
    assert len(source.manifest.files) == 2  # the main file and the shard of dense/kernel
    exported = export_safetensors(source, str(tmp_path / "model.safetensors"))
    assert [f.path for f in exported.manifest.files] == ["model.safetensors"]
    assert keepbest("verify", str(tmp_path / "model.safetensors")).returncode == 0


def test_export_to_a_bucket_passes_keepbest_verify_there(run, s3):
    url = s3.url("exported")
    result = keepbest("export", f"{run}@latest", "--to", url)
    assert result.returncode == 0, result.stderr
    verify = keepbest("verify", url)
    assert verify.returncode == 0 and "1 of 1 checkpoint(s) verified" in verify.stdout


def test_export_json_names_the_copy_and_its_files(run, tmp_path):
    doc = json.loads(keepbest("export", "--json", f"{run}@v1", "--to", str(tmp_path / "m.safetensors")).stdout)
    assert (doc["kind"], doc["verified"], doc["exported"]) == ("safetensors", True, str(tmp_path / "m.safetensors"))
    assert [f["path"] for f in doc["files"]] == ["m.safetensors"]


def test_export_of_a_damaged_source_raises_and_leaves_nothing_at_the_destination(run, tmp_path, flip_byte):
    source = checkpoint_at(f"{run}@v1")
    shard = next(f.path for f in source.manifest.files if f.path != "state.safetensors")
    flip_byte(run / source.name / shard, offset=-3)
    with pytest.raises(CorruptCheckpointError, match=f"file {run / source.name / shard} does not match its manifest"):
        copy_checkpoint(source, str(tmp_path / "shipped"))
    assert sorted(p.name for p in (tmp_path / "shipped").iterdir()) == []


def test_export_to_safetensors_of_a_damaged_source_writes_nothing(run, tmp_path, flip_byte):
    source = checkpoint_at(f"{run}@v1")
    flip_byte(run / source.name / "state.safetensors", offset=-1)
    with pytest.raises(CorruptCheckpointError, match="state.safetensors does not match its manifest"):
        export_safetensors(source, str(tmp_path / "out" / "model.safetensors"))
    assert not (tmp_path / "out").exists()


def test_export_cli_exits_1_when_the_source_is_damaged(run, tmp_path, flip_byte):
    flip_byte(run / checkpoint_at(f"{run}@v1").name / "state.safetensors", offset=-1)
    result = keepbest("export", f"{run}@v1", "--to", str(tmp_path / "shipped"))
    assert result.returncode == 1 and "does not match its manifest" in result.stderr


def test_export_refuses_a_folder_that_already_holds_the_checkpoint(run, tmp_path):
    copy_checkpoint(checkpoint_at(f"{run}@v1"), str(tmp_path / "shipped"))
    with pytest.raises(StorageError, match="it already holds a checkpoint of that name"):
        copy_checkpoint(checkpoint_at(f"{run}@v1"), str(tmp_path / "shipped"))


def test_an_unknown_suffix_is_refused_listing_the_choices():
    with pytest.raises(ValueError, match=r"does not know the format of 'model.pt'. End the path in .keras"):
        kind_of("out/model.pt")


def test_export_cli_exits_2_on_an_unknown_suffix_before_reading_anything(run, tmp_path):
    result = keepbest("export", f"{run}@v1", "--to", str(tmp_path / "model.onnx"))
    assert result.returncode == 2 and ".weights.h5 (Keras weights), .safetensors" in result.stderr
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize(("to", "kind"), [("out/m.keras", "keras"), ("out/w.weights.h5", "weights.h5"),
                                          ("out/model.safetensors", "safetensors"), ("exported", "folder"),
                                          ("runs/v1.2/", "folder"), ("s3://bucket/run", "folder")])
def test_the_suffix_of_to_decides_the_kind(to, kind):
    assert kind_of(to) == kind


def test_export_cli_exits_2_naming_the_available_checkpoints_when_the_source_is_not_found(run, tmp_path):
    result = keepbest("export", f"{run}@ckpt-000000099", "--to", str(tmp_path / "shipped"))
    assert result.returncode == 2
    assert "No checkpoint 'ckpt-000000099'" in result.stderr and "ckpt-000000010, ckpt-000000020" in result.stderr


def test_export_to_keras_of_a_checkpoint_without_a_model_config_exits_2(run, tmp_path):
    result = keepbest("export", f"{run}@v1", "--to", str(tmp_path / "model.keras"))
    assert result.returncode == 2 and "holds no Keras model config (format 'tensors'" in result.stderr


def test_show_and_diff_read_a_bucket_checkpoint(run, s3):
    url = s3.url("shown")
    copy_checkpoint(checkpoint_at(f"{run}@v1"), url)
    shown = json.loads(keepbest("show", "--json", f"{url}@latest").stdout)
    assert {t["name"]: t["shape"] for t in shown["tensors"]} == {k: list(v.shape) for k, v in STATE.items()}
    result = keepbest("diff", f"{run}@v1", f"{url}@latest")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "0 of 3 tensors changed, 0.0% of bytes"


def test_export_draws_a_progress_bar_only_when_asked_or_on_a_terminal(run, tmp_path):
    quiet = keepbest("export", f"{run}@v1", "--to", str(tmp_path / "a.safetensors"))
    shown = subprocess.run([sys.executable, "-m", "keepbest.cli", "export", f"{run}@v1", "--to",
                            str(tmp_path / "b.safetensors")], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "KEEPBEST_PROGRESS": "1"})
    assert quiet.returncode == shown.returncode == 0
    assert quiet.stderr == "" and "exporting" in shown.stderr and "━" in shown.stderr


def test_a_folder_export_keeps_the_version_where_it_is_free_and_takes_the_next_one_where_not(run, tmp_path):
    first = copy_checkpoint(checkpoint_at(f"{run}@v1"), str(tmp_path / "shipped"))
    other = CheckpointManager(tmp_path / "other")
    other.save(99, STATE)
    other.save(98, STATE)  # v1 of series ckpt there too, under another name
    second = copy_checkpoint(checkpoint_at(f"{tmp_path / 'other'}@v1"), str(tmp_path / "shipped"))
    assert (first.version, second.version) == (1, 2)


def test_export_never_replaces_a_file_keepbest_did_not_write(run, tmp_path):
    mine = tmp_path / "out" / "model.safetensors"
    mine.parent.mkdir()
    mine.write_bytes(b"the user's own file")
    result = keepbest("export", f"{run}@v1", "--to", str(mine))
    assert result.returncode == 2 and "a file that keepbest did not write is already there" in result.stderr
    assert mine.read_bytes() == b"the user's own file"
