"""Versions and aliases of a series: numbering, moving aliases, user aliases that hold, the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from keepbest import CheckpointManager, CheckpointNotFoundError, KeepBest, KeepLast, Monitor
from keepbest.cli import main


def alias_file(root, series="ckpt"):
    return root / ".keepbest" / "aliases" / f"{series}.json"


def _manager(path, keep=(KeepLast(2), KeepBest(1))):
    return CheckpointManager(path, monitor=Monitor("val_loss", "min"), keep=keep)


def _save(mgr, epoch, loss):
    return mgr.save(epoch * 10, {"w": np.full(3, epoch, np.float32)}, metrics={"val_loss": loss}, epoch=epoch)


def test_versions_count_from_zero_and_are_never_reused_after_deletion(tmp_path):
    mgr = _manager(tmp_path, keep=[KeepLast(1)])
    numbers = [_save(mgr, e, 1.0 / e).version for e in (1, 2, 3)]
    assert numbers == [0, 1, 2]
    assert [c.version for c in mgr.checkpoints()] == [2]
    assert _save(_manager(tmp_path, keep=[KeepLast(1)]), 4, 0.1).version == 3  # a new process goes on counting


def test_latest_best_and_one_based_epoch_aliases_follow_the_commits(tmp_path):
    mgr = _manager(tmp_path, keep=())
    for epoch, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        _save(mgr, epoch, loss)
    assert mgr.aliases == {"epoch_1": 0, "epoch_2": 1, "epoch_3": 2, "best": 1, "latest": 2}
    assert [c.aliases for c in mgr.checkpoints()] == [("epoch_1",), ("best", "epoch_2"), ("latest", "epoch_3")]
    stored = json.loads(alias_file(tmp_path).read_text())
    assert stored["automatic"] == mgr.aliases and stored["next_version"] == 3


def test_retention_never_deletes_a_version_that_a_user_alias_holds(tmp_path):
    mgr = _manager(tmp_path)
    for epoch, loss in [(1, 3.0), (2, 1.0)]:
        _save(mgr, epoch, loss)
    assert mgr.promote("v0", "production").epoch == 1
    for epoch in range(3, 9):
        _save(mgr, epoch, 5.0)
    assert [(c.epoch, c.aliases) for c in mgr.checkpoints()] == [
        (1, ("epoch_1", "production")), (2, ("best", "epoch_2")), (7, ("epoch_7",)), (8, ("latest", "epoch_8"))]
    mgr.demote("production")
    assert 1 in [c.epoch for c in mgr.checkpoints()]  # released, removed at the next retention pass
    assert mgr.prune() == ["ckpt-000000010"]


def test_promote_moves_a_user_alias_off_its_previous_version(tmp_path):
    mgr = _manager(tmp_path, keep=())
    for epoch, loss in [(1, 3.0), (2, 1.0)]:
        _save(mgr, epoch, loss)
    mgr.promote("best", "production")
    mgr.promote("ckpt-000000010", "production")
    assert mgr.aliases["production"] == 0 and [c.aliases for c in mgr.checkpoints()][1] == ("latest", "best", "epoch_2")


@pytest.mark.parametrize("alias", ["latest", "best", "epoch_3", "v2", "with space", "", "-x"])
def test_promote_refuses_automatic_and_malformed_alias_names(tmp_path, alias):
    mgr = _manager(tmp_path)
    _save(mgr, 1, 1.0)
    with pytest.raises(ValueError, match=r"Alias .* Received: alias="):
        mgr.promote(0, alias)


def test_promote_of_an_unknown_version_names_the_available_ones(tmp_path):
    mgr = _manager(tmp_path)
    _save(mgr, 1, 1.0)
    _save(mgr, 2, 2.0)
    with pytest.raises(CheckpointNotFoundError, match=r"No version 'v9' in series 'ckpt'.*Available: v0, v1"):
        mgr.promote("v9", "production")


def test_aliases_are_recomputed_when_a_crash_left_them_behind_the_commits(tmp_path):
    mgr = _manager(tmp_path, keep=())
    _save(mgr, 1, 2.0)
    stale = alias_file(tmp_path).read_bytes()
    _save(mgr, 2, 1.0)
    alias_file(tmp_path).write_bytes(stale)  # as if the process died between commit and alias update
    assert _manager(tmp_path).aliases == {"epoch_1": 0, "epoch_2": 1, "best": 1, "latest": 1}
    assert _save(_manager(tmp_path, keep=()), 3, 3.0).version == 2


def test_a_damaged_alias_file_is_reported_once_and_the_automatic_aliases_recomputed(tmp_path):
    mgr = _manager(tmp_path)
    _save(mgr, 1, 1.0)
    alias_file(tmp_path).write_text('{"format": "keepbest/aliases", "next_version": -4}')
    with pytest.warns(UserWarning, match=r"Cannot read the aliases of series 'ckpt' in .*recomputed") as seen:
        assert mgr.aliases == {"epoch_1": 0, "best": 0, "latest": 0}
        assert [c.aliases for c in keepbest_list(tmp_path)] == [("latest", "best", "epoch_1")]
    assert len(seen) == 1  # once per process, not at every look


def test_a_writer_keeps_a_damaged_alias_file_aside_and_retention_deletes_nothing_until_it_is_gone(tmp_path):
    mgr = _manager(tmp_path, keep=[KeepLast(1)])
    _save(mgr, 1, 1.0)
    garbage = b"\x00garbage, not JSON"
    alias_file(tmp_path).write_bytes(garbage)
    with pytest.warns(UserWarning, match="deletes nothing"):
        _save(mgr, 2, 0.5)
        _save(mgr, 3, 0.4)
    (aside,) = (tmp_path / ".keepbest" / "damaged" / "aliases").iterdir()
    assert aside.read_bytes() == garbage  # the user aliases it may hold are kept for the user
    assert [c.epoch for c in mgr.checkpoints()] == [1, 2, 3]  # user aliases unknown: nothing deleted
    aside.unlink()
    _save(mgr, 4, 0.3)
    assert [c.epoch for c in mgr.checkpoints()] == [4]


def keepbest_list(path):
    import keepbest

    return keepbest.list_checkpoints(path)


def test_cli_promote_then_ls_shows_versions_and_aliases(tmp_path, capsys):
    mgr = _manager(tmp_path, keep=())
    for epoch, loss in [(1, 3.0), (2, 1.0), (3, 2.0)]:
        _save(mgr, epoch, loss)
    assert main(["promote", str(tmp_path), "v0", "--alias", "production"]) == 0
    assert "production -> v0 (ckpt-000000010, epoch 1)" in capsys.readouterr().out
    assert main(["ls", "--json", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(d["version"], d["aliases"]) for d in doc] == [
        (0, ["epoch_1", "production"]), (1, ["best", "epoch_2"]), (2, ["latest", "epoch_3"])]
    out = subprocess.run([sys.executable, "-m", "keepbest.cli", "ls", str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    header, first, second, _ = out.splitlines()
    assert header.split()[3] == "best/aliases" and first.split()[3:5] == ["v0", "epoch_1,production"]
    assert second.split()[3:6] == ["*", "v1", "best,epoch_2"]


def test_cli_promote_reports_an_unknown_version_and_exits_2(tmp_path, capsys):
    _save(_manager(tmp_path), 1, 1.0)
    assert main(["promote", str(tmp_path), "v5", "--alias", "production"]) == 2
    assert re.search(r"keepbest promote: No version 'v5'.*Available: v0", capsys.readouterr().err)


def test_cli_demote_releases_the_alias(tmp_path, capsys):
    mgr = _manager(tmp_path)
    _save(mgr, 1, 1.0)
    main(["promote", str(tmp_path), "latest", "--alias", "production"])
    assert main(["demote", str(tmp_path), "--alias", "production"]) == 0
    assert "production" not in mgr.aliases
    capsys.readouterr()
    assert main(["demote", str(tmp_path), "--alias", "production"]) == 2
    assert "has no user alias 'production'. User aliases: none" in capsys.readouterr().err


def test_list_checkpoints_reports_versions_and_aliases(tmp_path):
    import keepbest

    mgr = _manager(tmp_path, keep=())
    for epoch, loss in [(1, 3.0), (2, 1.0)]:
        _save(mgr, epoch, loss)
    assert [(c.version, c.aliases) for c in keepbest.list_checkpoints(tmp_path)] == [
        (0, ("epoch_1",)), (1, ("latest", "best", "epoch_2"))]
    (single,) = keepbest.list_checkpoints(tmp_path / "ckpt-000000010")  # one checkpoint: aliases of its series
    assert single.aliases == ("epoch_1",)
