"""``keepbest show`` and ``keepbest diff``, run as users run them, with what they read from disk measured.

The measure: the checkpoint's files are written back and dropped from the page cache (fsync, then
``posix_fadvise(DONTNEED)``), the command runs in a child process, and the child's ``read_bytes`` in
``/proc/self/io`` is taken before and after. ``read_bytes`` counts what the kernel really fetched from the
disk for the process, whichever way it asked: ``read()``, a memory map's page faults, or a thread of a
native library (BLAKE3 hashes through its own mapping). ``rchar`` would miss the last two. Each test also
shows the measure is alive: ``show`` reads a little (its headers), ``diff`` reads at least the shards that
changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from keepbest import CheckpointManager, Monitor
from keepbest.payload import TensorPayload

MEASURE = textwrap.dedent('''
    import json, sys
    from keepbest import cli

    def io():
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(": ") for line in f.read().splitlines())}

    before = io()
    code = cli.main(sys.argv[2:])
    after = io()
    with open(sys.argv[1], "w") as f:
        json.dump({"code": code, **{k: after[k] - before[k] for k in after}}, f)
''')


MEASURED = pytest.mark.skipif(not os.path.exists("/proc/self/io") or not hasattr(os, "posix_fadvise"),
                              reason="needs Linux's per-process I/O accounting (/proc/self/io) and posix_fadvise")


def evict(folder: Path) -> None:
    """Writes the files under ``folder`` back and drops them from the page cache."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measured(tmp: Path, *argv: str) -> tuple[dict[str, int], str]:
    """Runs ``keepbest ARGV`` in a child process with a cold page cache; what it read, and what it printed."""
    report = tmp / "io.json"
    result = subprocess.run([sys.executable, "-c", MEASURE, str(report), *argv], capture_output=True, text=True,
                            timeout=300)
    assert report.exists(), result.stderr[-3000:]
    return json.loads(report.read_text()), result.stdout


def keepbest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keepbest.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def gigabyte(tmp_path_factory):
    """A folder with one checkpoint of 1 GiB: four tensors of 256 MiB (shard files) and two small ones."""
    folder = tmp_path_factory.mktemp("gigabyte")
    big = np.arange(64 << 20, dtype=np.float32)
    CheckpointManager(folder).save(1, {**{f"layer{i}/kernel": big for i in range(4)}, "bias": np.ones(8, np.float32),
                                       "step": np.array(1)}, epoch=1)
    yield folder
    shutil.rmtree(folder)


@MEASURED
def test_show_of_a_gigabyte_checkpoint_reads_less_than_a_megabyte_from_disk(gigabyte, tmp_path):
    evict(gigabyte)
    io, out = measured(tmp_path, "show", f"{gigabyte}@latest")
    assert io["code"] == 0
    assert "layer3/kernel" in out and "[67108864]" in out
    assert 0 < io["read_bytes"] < 1 << 20, io


def test_show_lists_every_tensor_with_dtype_shape_bytes_and_file(gigabyte):
    result = keepbest("show", "--json", f"{gigabyte}@v0")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    tensors = {t["name"]: t for t in doc["tensors"]}
    assert sorted(tensors) == ["bias", "layer0/kernel", "layer1/kernel", "layer2/kernel", "layer3/kernel", "step"]
    assert tensors["layer2/kernel"] | {"file": None} == {"name": "layer2/kernel", "dtype": "F32", "shape": [64 << 20],
                                                         "bytes": 256 << 20, "file": None, "group": None}
    assert tensors["bias"]["file"] == "state.safetensors" and tensors["layer2/kernel"]["file"] != "state.safetensors"
    assert {t["file"] for t in doc["tensors"]} == {f["path"] for f in doc["files"]}


def test_show_prints_the_manifest(tmp_path):
    mgr = CheckpointManager(tmp_path, monitor=Monitor("val_loss", "min"))
    mgr.save(30, {"w": np.zeros(3, np.float32)}, metrics={"val_loss": 0.25}, epoch=3, extra={"note": "warm start"})
    result = keepbest("show", f"{tmp_path}@best")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines()[:9] if not line.startswith(" "))
    assert lines["series"].startswith("ckpt  version v0  aliases latest, best, epoch_3")
    assert lines["position"] == "epoch 3  step 30  batch -"
    assert lines["metrics"] == "val_loss=0.25  (monitor val_loss, min, best)"
    assert lines["extra"] == '{"note": "warm start"}'


@pytest.fixture
def ninety_percent(tmp_path):
    """Two checkpoints of ten 4 MiB shards each, of which one differs (and a small tensor in the main file)."""
    rng = np.random.default_rng(0)
    tensors = {f"block{i}": rng.standard_normal(1 << 20).astype(np.float32) for i in range(10)}
    tensors["scale"] = np.ones(4, np.float32)
    mgr = CheckpointManager(tmp_path / "run")
    one_shard_each = {"state.safetensors": {name: name for name in tensors}}  # a new group: a shard of its own
    mgr.save(1, TensorPayload({"state.safetensors": tensors}, groups=one_shard_each))
    changed = dict(tensors, block7=tensors["block7"] + np.float32(0.001) * (np.arange(1 << 20) == 5))
    mgr.save(2, TensorPayload({"state.safetensors": changed}, groups=one_shard_each))
    return tmp_path / "run"


@MEASURED
def test_diff_of_checkpoints_sharing_nine_of_ten_shards_reads_only_the_changed_one(ninety_percent, tmp_path):
    shard = 4 << 20
    evict(ninety_percent)
    io, out = measured(tmp_path, "diff", "--json", f"{ninety_percent}@v0", f"{ninety_percent}@v1")
    doc = json.loads(out)
    assert io["code"] == 1
    assert doc["files_read"] == ["a:state-00008.safetensors", "b:state-00008.safetensors"]
    assert 2 * shard <= io["read_bytes"] < 3 * shard, io  # both versions of the changed shard, not the nine others


def test_diff_reports_the_changed_tensor_with_its_largest_differences(ninety_percent):
    result = keepbest("diff", "--json", f"{ninety_percent}@v0", f"{ninety_percent}@v1")
    doc = json.loads(result.stdout)
    changed = [t for t in doc["tensors"] if t["status"] != "unchanged"]
    assert [(t["name"], t["status"]) for t in changed] == [("block7", "changed")]
    assert changed[0]["max_abs"] == pytest.approx(0.001, rel=1e-3)
    assert doc["summary"] == "1 of 11 tensors changed, 10.0% of bytes"


def test_diff_summary_line_counts_tensors_and_bytes(ninety_percent):
    result = keepbest("diff", f"{ninety_percent}@v0", f"{ninety_percent}@latest")
    assert result.stdout.splitlines()[-1] == "1 of 11 tensors changed, 10.0% of bytes"


def test_diff_of_a_checkpoint_with_itself_exits_0(ninety_percent):
    result = keepbest("diff", f"{ninety_percent}@v0", f"{ninety_percent}@v0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "0 of 11 tensors changed, 0.0% of bytes"


def test_diff_reports_added_and_removed_tensors_and_dtype_changes(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": np.zeros(3, np.float32), "old": np.ones(2, np.float32)})
    mgr.save(2, {"w": np.zeros(3, np.float64), "new": np.ones(2, np.float32)})
    doc = json.loads(keepbest("diff", "--json", f"{tmp_path}@v0", f"{tmp_path}@v1").stdout)
    assert [(t["name"], t["status"], t["reason"]) for t in doc["tensors"]] == [
        ("new", "added", None), ("old", "removed", None), ("w", "changed", "dtype F32 -> F64")]


def test_diff_tells_apart_tensors_of_the_same_name_in_different_files(tmp_path):
    mgr = CheckpointManager(tmp_path)
    same = np.arange(4, dtype=np.float32)
    for step, ema in enumerate((same, same + 1)):  # only the EMA copy changes; both files hold a tensor "w"
        mgr.save(step, TensorPayload({"ema.safetensors": {"w": ema}, "model.safetensors": {"w": same}}))
    result = keepbest("diff", "--json", f"{tmp_path}@v0", f"{tmp_path}@v1")
    doc = json.loads(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert [(t["name"], t["status"]) for t in doc["tensors"]] == [("ema.safetensors:w", "changed"),
                                                                  ("model.safetensors:w", "unchanged")]


def test_diff_exits_2_naming_the_file_when_a_file_that_differs_is_damaged(ninety_percent, flip_byte):
    victim = ninety_percent / "ckpt-000000002" / "state-00008.safetensors"
    flip_byte(victim, offset=-7)
    result = keepbest("diff", f"{ninety_percent}@v0", f"{ninety_percent}@v1")
    assert result.returncode == 2
    assert f"Cannot compare {victim}: it does not match its manifest" in result.stderr


def test_show_of_a_folder_without_a_reference_exits_2_listing_the_checkpoints(ninety_percent):
    result = keepbest("show", str(ninety_percent))
    assert result.returncode == 2
    assert "name one with @REF" in result.stderr and "ckpt-000000001, ckpt-000000002" in result.stderr


def test_show_of_an_unknown_version_exits_2_listing_versions_and_aliases(ninety_percent):
    result = keepbest("show", f"{ninety_percent}@v9")
    assert result.returncode == 2
    assert "No version 'v9'" in result.stderr and "Available: v0, v1; aliases: latest" in result.stderr


def test_show_of_a_missing_checkpoint_path_names_what_its_folder_holds(ninety_percent):
    result = keepbest("show", str(ninety_percent / "ckpt-000000009"))
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Available in" in result.stderr and "ckpt-000000002" in result.stderr


def test_diff_reports_other_files_that_differ_and_exits_1_for_them_alone(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, TensorPayload({"state.safetensors": {"w": np.zeros(3, np.float32)}}, json_files={"t.json": {"n": 1}}))
    mgr.save(2, TensorPayload({"state.safetensors": {"w": np.zeros(3, np.float32)}}, json_files={"t.json": {"n": 2}}))
    result = keepbest("diff", f"{tmp_path}@v0", f"{tmp_path}@v1")
    assert result.returncode == 1
    assert result.stdout.splitlines()[-2:] == ["file t.json: changed",
                                               "0 of 1 tensors changed, 0.0% of bytes; 1 other file(s) differ"]


def test_show_of_a_checkpoint_with_a_missing_shard_exits_1_naming_it(ninety_percent):
    victim = ninety_percent / "ckpt-000000002" / "state-00003.safetensors"
    victim.unlink()
    result = keepbest("show", str(ninety_percent / "ckpt-000000002"))
    assert result.returncode == 1
    assert f"file {victim} is missing" in result.stderr


def test_show_of_a_folder_of_plain_keras_files_says_they_have_no_manifests(tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not written by keepbest")
    result = keepbest("show", f"{tmp_path}@latest")
    assert result.returncode == 2
    assert "1 model file(s) without keepbest manifests" in result.stderr and "model.keras" in result.stderr


@pytest.fixture
def two_series(tmp_path):
    for series in ("a", "b"):
        mgr = CheckpointManager(tmp_path, series=series, monitor=Monitor("loss", "min"))
        mgr.save(1, {"w": np.zeros(2, np.float32)}, metrics={"loss": 1.0})
    return tmp_path


def test_an_alias_of_several_series_is_refused_as_ambiguous(two_series):
    from keepbest.errors import CheckpointNotFoundError
    from keepbest.inspection import checkpoint_at

    with pytest.raises(CheckpointNotFoundError, match="names a checkpoint in each of several series .* Pass --series"):
        checkpoint_at(f"{two_series}@best")


def test_series_picks_the_series_an_alias_is_looked_up_in(two_series):
    result = keepbest("show", "--json", "--series", "b", f"{two_series}@best")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "b-000000001"


def test_show_of_a_damaged_checkpoint_named_by_reference_exits_1(ninety_percent):
    (ninety_percent / "ckpt-000000001" / "state-00002.safetensors").unlink()
    result = keepbest("show", f"{ninety_percent}@ckpt-000000001")
    assert result.returncode == 1 and "state-00002.safetensors is missing" in result.stderr
