"""The publish queue: event order, background uploads, retries, reported failures, stable snapshots."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from keepbest import CheckpointManager, KeepLast, LocalStore, Monitor
from keepbest.errors import PublishError
from keepbest.publishing import Publisher, PublishQueue


class Recorder(Publisher):
    def __init__(self, fail_uploads=0, gate=None):
        self.events, self.fail_uploads, self.gate, self.uploaded = [], fail_uploads, gate, {}

    def committed(self, version):
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.fail_uploads:
            self.fail_uploads -= 1
            raise ConnectionError("tracker unreachable")
        self.events.append(("committed", version.number, version.aliases))
        files = sorted(p for p in version.path.rglob("*") if p.is_file()) if version.path.is_dir() else [version.path]
        self.uploaded[version.number] = {p.name: p.read_bytes() for p in files}

    def aliases_moved(self, series, aliases):
        self.events.append(("aliases", dict(aliases)))

    def deleted(self, series, number, name):
        self.events.append(("deleted", number, name))


def _queue(*publishers, attempts=3):
    return PublishQueue(list(publishers), attempts=attempts, backoff=0.0)


def test_each_commit_publishes_the_version_then_aliases_then_deletions(tmp_path):
    rec = Recorder()
    mgr = CheckpointManager(tmp_path, monitor=Monitor("loss"), keep=[KeepLast(1)], publishers=_queue(rec))
    mgr.save(1, {"w": np.zeros(2)}, metrics={"loss": 2.0}, epoch=1)
    mgr.save(2, {"w": np.ones(2)}, metrics={"loss": 1.0}, epoch=2)
    mgr.close()
    assert rec.events == [
        ("committed", 0, ("latest", "best", "epoch_1")),
        ("aliases", {"epoch_1": 0, "best": 0, "latest": 0}),
        ("committed", 1, ("latest", "best", "epoch_2")),
        ("aliases", {"epoch_2": 1, "best": 1, "latest": 1}),
        ("deleted", 0, "ckpt-000000001"),
    ]


def test_a_slow_upload_does_not_block_the_next_saves(tmp_path):
    gate = threading.Event()
    rec = Recorder(gate=gate)
    mgr = CheckpointManager(tmp_path, publishers=_queue(rec))
    for step in range(3):  # each returns while the first upload is still held at the gate
        mgr.save(step, {"w": np.full(2, step)})
    assert rec.events == [] and len(mgr.checkpoints()) == 3
    gate.set()
    mgr.close()
    assert [e[1] for e in rec.events if e[0] == "committed"] == [0, 1, 2]


def test_an_upload_waiting_in_the_queue_sends_the_bytes_of_its_own_version(tmp_path):
    gate = threading.Event()
    rec = Recorder(gate=gate)
    mgr = CheckpointManager(tmp_path, publishers=_queue(rec))
    mgr.save(1, {"w": np.zeros(4)}, name="best")
    mgr.save(2, {"w": np.ones(4)}, name="best")  # replaces the folder while v0 waits for its upload
    gate.set()
    mgr.close()
    assert rec.uploaded[0] != rec.uploaded[1]
    assert rec.events[-1] == ("deleted", 0, "best")  # the replaced version is gone remotely too
    assert not list((tmp_path / ".keepbest" / "uploads").iterdir())  # snapshots removed once uploaded


def test_a_failing_upload_is_retried_then_succeeds(tmp_path, caplog):
    rec = Recorder(fail_uploads=2)
    mgr = CheckpointManager(tmp_path, publishers=_queue(rec, attempts=3))
    with caplog.at_level(logging.WARNING, logger="keepbest"):
        mgr.save(1, {"w": np.zeros(2)})
        mgr.close()
    assert [e[:2] for e in rec.events if e[0] == "committed"] == [("committed", 0)]
    assert caplog.text.count("tracker unreachable; retrying") == 2


def test_an_upload_that_keeps_failing_is_raised_at_close_and_the_local_checkpoint_is_intact(tmp_path):
    rec = Recorder(fail_uploads=100)
    mgr = CheckpointManager(tmp_path, keep=[KeepLast(1)], publishers=_queue(rec, attempts=2))
    mgr.save(1, {"w": np.zeros(2)})
    mgr.save(2, {"w": np.ones(2)})
    with pytest.raises(PublishError, match=r"every local checkpoint is intact.*upload of ckpt v1 .*failed after 2 "
                                           r"attempt\(s\): ConnectionError: tracker unreachable.*remote delete of "
                                           r"ckpt v0 .* skipped because an earlier upload failed"):
        mgr.close()
    (ckpt,) = mgr.checkpoints()
    LocalStore(tmp_path).verify(ckpt.manifest)
    np.testing.assert_array_equal(mgr.load()["w"], np.ones(2))
    assert ("deleted", 0, "ckpt-000000001") not in rec.events


def test_promote_tells_publishers_where_the_aliases_point(tmp_path):
    rec = Recorder()
    mgr = CheckpointManager(tmp_path, publishers=_queue(rec))
    mgr.save(1, {"w": np.zeros(2)}, epoch=1)
    mgr.save(2, {"w": np.zeros(2)}, epoch=2)
    mgr.promote("v0", "production")
    mgr.close()
    assert rec.events[-1] == ("aliases", {"epoch_1": 0, "epoch_2": 1, "latest": 1, "production": 0})


def test_publish_queue_refuses_what_is_not_a_publisher():
    with pytest.raises(TypeError, match=r"publishers must be a non-empty list.*Received: publishers=\['wandb'\]"):
        PublishQueue(["wandb"])  # type: ignore[list-item]


def test_an_upload_snapshot_left_by_a_killed_process_is_removed_by_recovery(tmp_path, dead_token):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": np.zeros(2)})
    left = tmp_path / ".keepbest" / "uploads" / f".keepbest-tmp-{dead_token}-0a0b0c0d" / "ckpt-000000001"
    left.mkdir(parents=True)
    (left / "state.safetensors").write_bytes(b"linked bytes")
    assert LocalStore(tmp_path).orphans().dead == [str(left.parent)]
    LocalStore(tmp_path).recover()
    assert not left.parent.exists() and len(mgr.checkpoints()) == 1


def test_close_shows_the_upload_backlog_as_a_progress_bar_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KEEPBEST_PROGRESS", "1")
    gate = threading.Event()
    rec = Recorder(gate=gate)
    mgr = CheckpointManager(tmp_path, publishers=_queue(rec))
    for step in (1, 2, 3):
        mgr.save(step, {"w": np.zeros(2)})
    threading.Timer(0.5, gate.set).start()  # the tracker is slow: close() finds events still queued
    mgr.close()
    assert [e[1] for e in rec.events if e[0] == "committed"] == [0, 1, 2]
    assert "publishing (Recorder)" in capsys.readouterr().err
