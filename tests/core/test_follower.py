"""The framework-free half of the sidecar: leases, progress, records, the end marker, following."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest

from keepbest import CheckpointManager, KeepLast
from keepbest import evaluation, store
from keepbest.store._watch import FolderWatch
from keepbest.discovery import list_checkpoints
from keepbest.evaluation import EvaluatorState, commit_id
from tests.helpers import token_of


def write_state(root, state):
    evaluation.write_state(store.open(root), state)


def read_state(root, name):
    return evaluation.read_state(store.open(root), name)[0]


def held(root, manifests, now):
    return evaluation.held(store.open(root), manifests, now)
from keepbest.follower import EvaluatorConflictError, Follower
from keepbest.listing import as_json, table


def _save(mgr: CheckpointManager, epoch: int) -> None:
    mgr.save(epoch, {"w": np.full(2, epoch, np.float32)}, epoch=epoch, name=f"ckpt-{epoch}")


@pytest.fixture
def mgr(tmp_path):
    return CheckpointManager(tmp_path, series="ckpt-{epoch}", keep=[KeepLast(1)])


def _manifests(mgr: CheckpointManager):
    return [c.manifest for c in mgr.checkpoints()]


# -- leases -----------------------------------------------------------------------------
def test_every_mode_lease_holds_checkpoints_not_evaluated_yet(tmp_path, mgr):
    write_state(tmp_path, EvaluatorState(name="eval", mode="every", heartbeat=time.time()))
    for epoch in (1, 2, 3):
        _save(mgr, epoch)
    assert [c.epoch for c in mgr.checkpoints()] == [1, 2, 3]  # KeepLast(1) waits for the evaluator


def test_evaluated_checkpoints_are_pruned_at_the_next_save(tmp_path, mgr):
    state = EvaluatorState(name="eval", mode="every", heartbeat=time.time())
    write_state(tmp_path, state)
    _save(mgr, 1)
    _save(mgr, 2)
    state.evaluated = [commit_id(m) for m in _manifests(mgr)]
    write_state(tmp_path, state)
    _save(mgr, 3)
    assert [c.epoch for c in mgr.checkpoints()] == [3]


def test_latest_mode_lease_holds_only_the_checkpoint_being_evaluated(tmp_path, mgr):
    _save(mgr, 1)
    first = _manifests(mgr)[0]
    write_state(tmp_path, EvaluatorState(name="eval", mode="latest", heartbeat=time.time(),
                                         evaluating=commit_id(first)))
    _save(mgr, 2)
    _save(mgr, 3)
    assert [c.epoch for c in mgr.checkpoints()] == [1, 3]


def test_lease_lapses_after_its_ttl(tmp_path, mgr):
    write_state(tmp_path, EvaluatorState(name="eval", mode="every", heartbeat=time.time() - 10, ttl=5))
    for epoch in (1, 2):
        _save(mgr, epoch)
    assert [c.epoch for c in mgr.checkpoints()] == [2]


def test_released_lease_holds_nothing(tmp_path, mgr):
    write_state(tmp_path, EvaluatorState(name="eval", mode="every", heartbeat=time.time(), active=False))
    for epoch in (1, 2):
        _save(mgr, epoch)
    assert [c.epoch for c in mgr.checkpoints()] == [2]


def test_lease_of_another_series_holds_nothing(tmp_path, mgr):
    write_state(tmp_path, EvaluatorState(name="eval", heartbeat=time.time(), series=["other-{epoch}"]))
    for epoch in (1, 2):
        _save(mgr, epoch)
    assert [c.epoch for c in mgr.checkpoints()] == [2]


def test_damaged_state_file_is_ignored_with_a_warning(tmp_path, mgr):
    _save(mgr, 1)
    path = tmp_path / ".keepbest" / "evaluators" / "eval.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"name": "eval", "mode": "every"')
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert held(tmp_path, _manifests(mgr), time.time()) == set()
    path.write_text(json.dumps({"name": "eval", "mode": "sometimes", "heartbeat": 1, "ttl": 1, "active": True}))
    with pytest.warns(UserWarning, match="unknown mode"):
        assert held(tmp_path, _manifests(mgr), time.time()) == set()


# -- following ----------------------------------------------------------------------------
def _drain(follower: Follower) -> list[int]:
    seen = []
    while (ckpt := follower.next(idle_timeout=0)) is not None:
        follower.begin(ckpt)
        follower.done(ckpt, {"loss": float(ckpt.epoch)})
        seen.append(ckpt.epoch)
    return seen


def test_every_mode_hands_out_each_checkpoint_in_commit_order(tmp_path):
    mgr = CheckpointManager(tmp_path, series="s")
    for epoch in (1, 2, 3):
        _save(mgr, epoch)
    with Follower(tmp_path) as follower:
        assert _drain(follower) == [1, 2, 3]
        assert follower.stop_reason == "no new checkpoint for 0 s (idle_timeout)"


def test_latest_mode_jumps_to_the_newest_and_never_goes_back(tmp_path):
    mgr = CheckpointManager(tmp_path, series="s")
    for epoch in (1, 2, 3):
        _save(mgr, epoch)
    with Follower(tmp_path, mode="latest") as follower:
        assert _drain(follower) == [3]
        _save(mgr, 4)
        _save(mgr, 5)
        assert _drain(follower) == [5]


def test_follower_stops_when_training_has_ended_and_nothing_is_left(tmp_path):
    mgr = CheckpointManager(tmp_path, series="s")
    _save(mgr, 1)
    with Follower(tmp_path) as follower:
        ckpt = follower.next(idle_timeout=0)
        follower.done(ckpt, {})  # type: ignore[arg-type]
        mgr.mark_training_end()
        assert follower.next() is None
        assert follower.stop_reason == "training ended"


def test_a_restart_of_training_clears_the_end_marker(tmp_path):
    mgr = CheckpointManager(tmp_path, series="s")
    mgr.mark_training_end()
    mgr.clear_training_end()
    with Follower(tmp_path) as follower:
        assert follower.next(idle_timeout=0.2) is None
        assert "idle_timeout" in (follower.stop_reason or "")


def test_follower_notices_a_new_checkpoint_long_before_its_idle_timeout(tmp_path):
    mgr = CheckpointManager(tmp_path, series="s")
    _save(mgr, 1)
    idle_timeout, bound = 60.0, 5.0  # it takes well under a second; the bound is generous for a loaded machine
    with Follower(tmp_path) as follower:
        _drain(follower)
        events: list[tuple[str, float]] = []

        def later() -> None:
            time.sleep(0.3)  # the follower is waiting by then
            events.append(("save begins", time.monotonic()))
            _save(mgr, 2)

        saver = threading.Thread(target=later)
        saver.start()
        ckpt = follower.next(idle_timeout=idle_timeout)
        events.append(("noticed", time.monotonic()))
        saver.join()
    assert ckpt is not None and ckpt.epoch == 2
    assert [name for name, _ in events] == ["save begins", "noticed"]
    latency = events[1][1] - events[0][1]
    print(f"noticed {latency:.2f} s after the save began (bound {bound} s, idle_timeout {idle_timeout} s)")
    assert latency < bound


def test_folder_watch_wakes_on_a_rename_long_before_its_timeout(tmp_path):
    with FolderWatch([tmp_path]) as watch:
        if not watch.uses_events:
            pytest.skip("no inotify on this platform: the poll fallback is used")
        (tmp_path / "a").write_text("x")
        watch.wait(0)  # drain
        timeout, bound = 60.0, 5.0  # it wakes 0.2 s in; the bound is generous for a loaded machine
        events = []

        def rename() -> None:
            events.append("rename")
            os.rename(tmp_path / "a", tmp_path / "b")

        threading.Timer(0.2, rename).start()
        started = time.monotonic()
        watch.wait(timeout)
        waited = time.monotonic() - started
        events.append("woke")
    print(f"woke {waited:.2f} s after the wait began, the rename 0.2 s in (bound {bound} s, timeout {timeout} s)")
    assert events == ["rename", "woke"]  # it did not wake before the rename
    assert waited < bound


def test_restarted_follower_continues_where_it_stopped(tmp_path):
    mgr = CheckpointManager(tmp_path, series="s")
    for epoch in (1, 2, 3):
        _save(mgr, epoch)
    with Follower(tmp_path) as follower:
        ckpt = follower.next()
        follower.done(ckpt, {"loss": 1.0})  # type: ignore[arg-type]
    with Follower(tmp_path) as follower:
        assert _drain(follower) == [2, 3]
    assert read_state(tmp_path, "eval").evaluations == 3  # type: ignore[union-attr]


def test_second_live_evaluator_with_the_same_name_is_refused(tmp_path):
    parent = os.getppid()
    write_state(tmp_path, EvaluatorState(name="eval", heartbeat=time.time(), host=evaluation.this_host(),
                                         owner=token_of(parent)))
    with pytest.raises(EvaluatorConflictError, match=f"Another evaluator named 'eval' .*process {parent}"):
        Follower(tmp_path).open()
    Follower(tmp_path, name="other").open()  # another name is fine


def test_lease_of_a_dead_evaluator_is_taken_over(tmp_path, dead_token):
    write_state(tmp_path, EvaluatorState(name="eval", heartbeat=time.time(), host=evaluation.this_host(),
                                         owner=dead_token, evaluated=[]))
    follower = Follower(tmp_path)
    follower.open()
    follower.close()
    assert read_state(tmp_path, "eval").active is False  # type: ignore[union-attr]


def test_quarantined_checkpoint_is_recorded_and_never_handed_out_again(tmp_path):
    mgr = CheckpointManager(tmp_path, series="s")
    for epoch in (1, 2):
        _save(mgr, epoch)
    with Follower(tmp_path) as follower:
        ckpt = follower.next()
        follower.quarantine(ckpt, ValueError("bad bytes"))  # type: ignore[arg-type]
        assert _drain(follower) == [2]
    listed = list_checkpoints(tmp_path)
    assert listed[0].evaluations["eval"]["quarantined"] == "ValueError: bad bytes"
    assert "quarantined by eval" in table(listed)


def test_ls_shows_evaluation_metrics_of_this_very_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, series="s")
    _save(mgr, 1)
    with Follower(tmp_path) as follower:
        _drain(follower)
    listed = list_checkpoints(tmp_path)
    header, row = table(listed).splitlines()
    assert "eval:loss" in header.split() and "1.0000" in row.split()
    assert as_json(listed)[0]["evaluations"]["eval"]["metrics"] == {"loss": 1.0}
    _save(mgr, 1)  # saved again under the same name: the old evaluation no longer applies
    assert list_checkpoints(tmp_path)[0].evaluations == {}


def test_constructor_rejects_a_bad_mode_name_and_ttl(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'every'.*Received: mode='all'"):
        Follower(tmp_path, mode="all")
    with pytest.raises(ValueError, match="plain file name.*Received: name='a/b'"):
        Follower(tmp_path, name="a/b")
    with pytest.raises(ValueError, match="lease_ttl must be a positive.*Received: lease_ttl=0"):
        Follower(tmp_path, lease_ttl=0)


def test_heartbeats_keep_the_lease_fresh_while_the_follower_runs(tmp_path):
    mgr = CheckpointManager(tmp_path, series="s", keep=[KeepLast(1)])
    _save(mgr, 1)
    ttl = 2.0  # heartbeats every ttl / 4
    with Follower(tmp_path, lease_ttl=ttl):
        opened = read_state(tmp_path, "eval").heartbeat  # type: ignore[union-attr]
        deadline = time.monotonic() + 60
        # Until a heartbeat is written after the first lease has lapsed: only heartbeats keep it alive.
        while read_state(tmp_path, "eval").heartbeat < opened + ttl:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no heartbeat renewed the lease"
            time.sleep(0.05)
        now = time.time()
        age = now - read_state(tmp_path, "eval").heartbeat  # type: ignore[union-attr]
        print(f"the last heartbeat is {age:.2f} s old, {now - opened:.2f} s after the lease was taken (ttl {ttl} s)")
        assert held(tmp_path, _manifests(mgr), now) == {"ckpt-1"}
    assert held(tmp_path, _manifests(mgr), time.time()) == set()  # released on a normal exit


def test_a_backlog_of_checkpoints_shows_a_progress_bar_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEEPBEST_PROGRESS", "1")
    mgr = CheckpointManager(tmp_path, series="ckpt-{epoch}")
    for epoch in (1, 2, 3):
        _save(mgr, epoch)
    with Follower(tmp_path, name="late") as follower:
        for _ in range(3):
            follower.done(follower.next(idle_timeout=5), {"loss": 1.0})
        assert follower.next(idle_timeout=0.1) is None
    err = capsys.readouterr().err
    assert "late: evaluating the backlog" in err and "3/3" in err
