"""``keepbest gc`` with retention rules, ``--json`` on gc/promote/demote, and their exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from keepbest import CheckpointManager, Monitor
from keepbest.discovery import list_checkpoints


def keepbest(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keepbest.cli", *args], capture_output=True, text=True, timeout=60)


def _name(epoch: int) -> str:
    return f"ckpt-{epoch:09d}"


@pytest.fixture
def run_dir(tmp_path):
    """12 checkpoints of 1-12 KB, none pruned; the best is epoch 4, epoch 3 holds the alias production."""
    mgr = CheckpointManager(tmp_path, monitor=Monitor("val_loss", "min"))
    for epoch in range(1, 13):
        ckpt = mgr.save(epoch, {"w": np.full(1000 * epoch, epoch, np.uint8)}, metrics={"val_loss": abs(epoch - 4.0)},
                        epoch=epoch)
        if epoch == 3:
            mgr.promote(ckpt.version, "production")
    return tmp_path


def _epochs(path) -> list[int]:
    return [c.epoch for c in list_checkpoints(path)]


def test_gc_keep_rules_delete_what_no_rule_keeps_except_the_protected(run_dir):
    result = keepbest("gc", "--keep-last", "2", "--keep-every", "5", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert _epochs(run_dir) == [3, 4, 5, 10, 11, 12]
    assert f"deleted {_name(1)} (retention: keep_last=2, keep_every=5)" in result.stdout


def test_gc_dry_run_lists_what_rules_would_delete_and_why_and_deletes_nothing(run_dir):
    result = keepbest("gc", "--dry-run", "--keep-last", "2", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"would delete {_name(e)} (retention: keep_last=2)"
                                          for e in (1, 2, 5, 6, 7, 8, 9, 10)]
    assert len(_epochs(run_dir)) == 12


def test_gc_max_bytes_deletes_the_oldest_until_the_folder_fits(run_dir):
    result = keepbest("gc", "--max-bytes", "40kB", str(run_dir))
    assert result.returncode == 0, result.stderr
    kept = list_checkpoints(run_dir)
    assert sum(c.size for c in kept) <= 40_000
    assert [c.epoch for c in kept] == [3, 4, 11, 12]
    assert f"deleted {_name(10)} (retention: max_bytes=40.0 kB)" in result.stdout


def test_gc_max_bytes_warns_when_the_protected_checkpoints_alone_exceed_it(run_dir):
    result = keepbest("gc", "--max-bytes", "10000", str(run_dir))
    assert result.returncode == 0
    assert _epochs(run_dir) == [3, 4, 12]
    assert "max_bytes=10.0 kB cannot be met" in result.stderr and "alias production" in result.stderr


def test_gc_keep_best_ranks_by_the_recorded_monitor(run_dir):
    assert keepbest("gc", "--keep-best", "3", str(run_dir)).returncode == 0
    assert _epochs(run_dir) == [3, 4, 5, 12]  # 3, 4, 5 are the best three (3 is also aliased), 12 the newest


def test_gc_json_reports_each_deletion_with_its_rule_and_size(run_dir):
    result = keepbest("gc", "--json", "--dry-run", "--keep-every", "6", str(run_dir))
    doc = json.loads(result.stdout)
    assert doc["dry_run"] is True and doc["warnings"] == []
    assert [(a["action"], a["target"], a["reason"]) for a in doc["actions"]] == [
        ("delete", _name(e), "retention: keep_every=6") for e in (1, 2, 5, 7, 8, 9, 10, 11)]
    assert doc["actions"][0]["size"] == list_checkpoints(run_dir)[0].size


def test_gc_on_a_folder_of_several_series_needs_series(run_dir):
    CheckpointManager(run_dir, series="other").save(1, {"w": np.zeros(2)})
    result = keepbest("gc", "--keep-last", "1", str(run_dir))
    assert result.returncode == 2
    assert "holds 2 series, so --series must pick the one to prune. Available: ckpt, other" in result.stderr
    assert keepbest("gc", "--keep-last", "1", "--series", "other", str(run_dir)).returncode == 0
    assert len(_epochs(run_dir)) == 13  # "other" has one checkpoint: nothing to prune there


@pytest.mark.parametrize(("args", "match"), [
    (["--max-bytes", "lots"], "--max-bytes must be a number of bytes"),
    (["--keep-last", "0"], "--keep-last must be a positive integer"),
    (["--keep-period", "0"], "--keep-period must be a positive number of seconds"),
    (["--keep-last", "1", "--series", "nope"], "has no series 'nope'. Available: ckpt"),
])
def test_gc_bad_rules_exit_2_and_delete_nothing(run_dir, args, match):
    result = keepbest("gc", *args, str(run_dir))
    assert result.returncode == 2 and match in result.stderr
    assert len(_epochs(run_dir)) == 12


def test_gc_keep_best_without_a_recorded_monitor_exits_2(tmp_path):
    CheckpointManager(tmp_path).save(1, {"w": np.zeros(2)})
    result = keepbest("gc", "--keep-best", "1", str(tmp_path))
    assert result.returncode == 2 and "recorded none" in result.stderr


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_gc_on_a_missing_path_exits_2_as_ls_does(tmp_path, dry_run):
    result = keepbest("gc", *dry_run, str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr == keepbest("ls", str(tmp_path / "nope")).stderr


def test_gc_dry_run_says_so_when_there_is_nothing_to_clean(run_dir):
    result = keepbest("gc", "--dry-run", "--keep-last", "20", str(run_dir))
    assert result.returncode == 0 and result.stdout == "nothing to clean\n"


@pytest.mark.parametrize("command", [["promote", "v1"], ["demote"]])
def test_promote_and_demote_on_a_folder_without_checkpoints_say_so(tmp_path, command):
    verb, *version = command
    result = keepbest(verb, str(tmp_path), *version, "--alias", "production")
    assert result.returncode == 2
    assert f"holds no committed checkpoints, so there is no version to {verb}" in result.stderr
    assert "--series None" not in result.stderr


def test_promote_and_demote_print_json(run_dir):
    promoted = json.loads(keepbest("promote", "--json", str(run_dir), "best", "--alias", "staging").stdout)
    assert promoted == {"alias": "staging", "version": 3, "name": _name(4), "epoch": 4, "series": "ckpt"}
    demoted = json.loads(keepbest("demote", "--json", str(run_dir), "--alias", "staging").stdout)
    assert demoted == {"alias": "staging", "removed": True, "version": 3, "series": "ckpt"}


@pytest.mark.parametrize(("command", "words"), [
    ("gc", ["a folder of checkpoints", "--max-bytes SIZE", "the series to act on"]),
    ("promote", ["a folder of checkpoints", "v3, 3, an alias", "the user alias to set"]),
    ("demote", ["a folder of checkpoints", "the user alias to remove", "the series to act on"]),
])
def test_every_argument_of_gc_promote_and_demote_has_help(command, words):
    result = keepbest(command, "--help")
    text = " ".join(result.stdout.split())
    assert all(w in text for w in words), text


def test_gc_with_rules_on_one_checkpoint_exits_2_and_deletes_nothing(run_dir):
    result = keepbest("gc", "--keep-last", "1", str(run_dir / _name(5)))
    assert result.returncode == 2
    assert f"is one checkpoint ({_name(5)}). Pass its folder" in result.stderr
    assert len(_epochs(run_dir)) == 12


def test_gc_refuses_bad_input_before_cleaning_anything(run_dir, dead_token):
    leftover = run_dir / f".keepbest-tmp-{dead_token}-0badf00d-ckpt-000000099"
    leftover.mkdir()
    result = keepbest("gc", "--keep-last", "1", "--series", "nope", str(run_dir))
    assert result.returncode == 2 and leftover.exists()
    assert keepbest("gc", "--keep-last", "1", str(run_dir)).returncode == 0 and not leftover.exists()
