"""SidecarEvaluator following an s3:// folder (moto's server on 127.0.0.1) from another process.

The evaluator is the child process of ``sidecar_procs.py``, given the bucket URL in place of a folder; it
reaches the server through the AWS environment variables the ``s3`` fixture sets. Training runs in the
test process (``sidecar_procs.train_here``), which saves an interpreter start per test.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import keras
import pytest

import keepbest.keras
from keepbest import evaluation, store as stores
from keepbest.discovery import list_checkpoints
from keepbest.follower import EvaluatorConflictError
from keepbest.store._object_io import Bucket
from tests.helpers import wait_until
from tests.keras import sidecar_procs
from tests.keras.sidecar_procs import FILEPATH, make_model, read_log
from tests.keras.test_sidecar import _finish, _spawn as spawn_role

pytest.importorskip("s3fs", reason="keepbest[s3] is not installed")

EXIT_BOUND = 25.0  # as in test_sidecar.py: how soon after training ended the evaluator exits at most
LEASE_KEY = ".keepbest/evaluators/eval.json"


def _spawn(role: str, url: str, log: Path, *args: str, ready=None) -> subprocess.Popen[bytes]:
    return spawn_role(role, url, log, *args, ready=ready)  # type: ignore[arg-type]  (a URL in place of a folder)


def _events(log: Path, kind: str) -> list[dict]:
    return [e for e in read_log(str(log)) if e["event"] == kind] if log.exists() else []


def _train_in_process(url: str, epochs: int, **kwargs) -> None:
    model = make_model()
    x, y = sidecar_procs.train_data()
    model.fit(x, y, epochs=epochs, verbose=0, callbacks=[
        keepbest.keras.ModelCheckpoint(f"{url}/{FILEPATH}", save_weights_only=True, **kwargs)])


class _FirstSaveWaitsFor(keras.callbacks.Callback):
    """Before the first epoch's checkpoint is saved: waits, while ``child`` runs, until ``condition()``."""

    def __init__(self, child: subprocess.Popen[bytes], condition) -> None:
        super().__init__()
        self.child, self.condition = child, condition

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch == 0:
            wait_until(self.child, self.condition, what="the evaluator never took its lease")


def test_every_mode_over_s3_evaluates_each_checkpoint_and_exits_after_the_end_marker(s3, tmp_path):
    url, tlog, elog = s3.url("sidecar"), tmp_path / "train.log", tmp_path / "eval.log"
    evaluator = _spawn("evaluate", url, elog, "--mode", "every", "--eval-seconds", "1.5")
    # Training runs here (sidecar_procs' trainer, in this process: no second interpreter to start). Its first
    # save waits for the evaluator's lease, so retention (keep_last=1) has to honour it from the start.
    sidecar_procs.train_here(url, str(tlog), epochs=4, epoch_seconds=0.5, keep_last=1,
                             before_save=[_FirstSaveWaitsFor(evaluator, lambda: LEASE_KEY in s3.keys(url))])
    output = _finish(evaluator)
    commits, evaluated = _events(tlog, "commit"), _events(elog, "evaluated")
    assert [e["id"] for e in evaluated] == [c["id"] for c in commits]  # all four, in commit order
    # What was evaluated is what was committed: retention deleted nothing before the evaluator read it.
    assert [e["digest"] for e in evaluated] == [c["digest"] for c in commits]
    assert "quarantined" not in output and "deleted or saved again" not in output
    exit_event, = _events(elog, "exit")
    assert exit_event["reason"] == "training ended"
    ended = evaluation.ended_series(stores.open(url))
    assert FILEPATH in ended
    after = exit_event["t"] - max(ended[FILEPATH], evaluated[-1]["t"])
    print(f"s3 every: exit {after:.2f} s after the end marker and the last evaluation (bound {EXIT_BOUND} s)")
    assert 0 <= after < EXIT_BOUND
    # keep_last=1 alone would have left one; the lease kept those the evaluator had not reached.
    assert len(list_checkpoints(url)) > 1


def test_lease_is_a_record_in_the_bucket_that_a_second_evaluator_of_that_name_cannot_take(s3, tmp_path):
    url, elog = s3.url("lease"), tmp_path / "eval.log"
    child = _spawn("evaluate", url, elog, "--eval-seconds", "3")
    try:
        _train_in_process(url, 2)  # meanwhile; then training has ended: the child exits after evaluating both

        def evaluating() -> bool:
            state = evaluation.read_state(stores.open(url), "eval")[0]
            return state is not None and state.evaluating is not None

        wait_until(child, evaluating, what="the evaluator never began an evaluation")
        assert LEASE_KEY in s3.keys(url)
        state, token = evaluation.read_state(stores.open(url), "eval")
        assert state is not None and token  # the record's ETag: the token of its compare-and-swap
        assert state.active and state.holds_lease(time.time())
        assert state.host == evaluation.this_host() and f".{child.pid}." in state.owner
        # Taking the lease is conditional: the live holder's record refuses a second evaluator of that name.
        with pytest.raises(EvaluatorConflictError, match=rf"Another evaluator named 'eval' follows {url}"):
            keepbest.keras.SidecarEvaluator(make_model(), sidecar_procs.eval_data(), url, verbose=0).start()
    finally:
        _finish(child)
    assert [e["id"] for e in _events(elog, "evaluated")] == [
        evaluation.commit_id(c.manifest) for c in list_checkpoints(url)]
    released = evaluation.read_state(stores.open(url), "eval")[0]
    assert released is not None and not released.active and released.evaluations == 2


def test_lease_of_an_evaluator_on_another_host_keeps_checkpoints_until_its_ttl_lapses(s3):
    url = s3.url("other-host")
    store = stores.open(url)
    lease = evaluation.EvaluatorState(name="remote", mode="every", owner="elsewhere.4026531836.123.456",
                                      host="elsewhere", heartbeat=time.time(), ttl=600.0)
    evaluation.write_state(store, lease)
    assert evaluation.owner_is_alive(lease)  # another host: its liveness cannot be told, only its heartbeat
    _train_in_process(url, 3, keep_last=1)
    assert [c.name for c in list_checkpoints(url)] == ["ckpt-0001", "ckpt-0002", "ckpt-0003"]
    lease.heartbeat = time.time() - lease.ttl - 1  # that host stopped beating a ttl ago: the lease has lapsed
    evaluation.write_state(store, lease)
    _train_in_process(url, 1, keep_last=1)  # (epoch 1 again: a new version of ckpt-0001)
    assert [c.name for c in list_checkpoints(url)] == ["ckpt-0001"]


@pytest.mark.parametrize("interval", [0.25, 1.0])
def test_an_idle_evaluator_lists_the_bucket_once_per_poll_interval(s3, monkeypatch, interval):
    url = s3.url("poll")
    calls: list[float] = []
    listing = Bucket.listing

    def counted(self, under=""):
        calls.append(time.monotonic())
        return listing(self, under)

    monkeypatch.setattr(Bucket, "listing", counted)
    evaluator = keepbest.keras.SidecarEvaluator(make_model(), sidecar_procs.eval_data(), url, idle_timeout=4,
                                                poll_interval=interval, verbose=0)
    started = time.monotonic()
    evaluator.start()
    assert evaluator.stop_reason == "no new checkpoint for 4 s (idle_timeout)"
    # After the first looks (its own lease record changes the listing once), until the idle timeout cuts
    # the last wait short.
    idle = [t for t in calls if started + 1.5 <= t <= started + 3.9]
    gaps = [b - a for a, b in zip(idle, idle[1:])]
    print(f"{len(idle)} LISTs in 2.4 s; gaps {min(gaps):.2f}-{max(gaps):.2f} s (interval {interval} s)")
    assert max(gaps) < interval + 0.4  # it looks at least once per interval (plus a request's time)
    assert min(gaps) > interval * 0.8  # and not more often: an unchanged bucket is not listed again
