"""when_behind="skip": a save due while the previous one is still being written is skipped, never the best
nor the last, and training never waits for the disk then; when_behind="wait" (the default) waits."""

from __future__ import annotations

import json
import shutil
import threading

import keras
import numpy as np
import pytest

import keepbest.keras
from keepbest import CheckpointManager, history, store
from keepbest.keras import ModelCheckpoint
from keepbest.keras._state import WEIGHTS_FILE
from keepbest.store import _fs

from .conftest import make_model, user_warnings, weights_of

GATE_TIMEOUT = 10.0  # a held write that nobody waits for goes on after this, and the test fails


class Gate:
    """A disk that never catches up by itself: each save's background write of its weights is held until the
    training thread waits for that save. So a save due while an earlier one is in flight always finds the
    writer behind, whatever the machine's speed, and a test tells exactly where training waited.

    - ``waits``: where the training thread waited for a save in flight (the ``Where`` label then: "e3",
      "e2b4", "end");
    - ``timed_out``: a held write went on without anyone waiting for it (training was blocked elsewhere).
    """

    def __init__(self) -> None:
        self.waits: list[str] = []
        self.timed_out = False
        self._cond = threading.Condition()
        self._started = self._released = 0

    def hold(self) -> None:
        with self._cond:
            ticket, self._started = self._started, self._started + 1
            if not self._cond.wait_for(lambda: self._released > ticket, timeout=GATE_TIMEOUT):
                self.timed_out = True

    def release(self, where: str) -> None:
        with self._cond:
            self.waits.append(where)
            self._released += 1
            self._cond.notify_all()


class Where(keras.callbacks.Callback):
    """Listed before the checkpoint: names the moment its hooks run in, as the checkpoints are named."""

    def __init__(self) -> None:
        super().__init__()
        self.label = "begin"

    def on_train_batch_end(self, batch, logs=None):
        self.label = f"e{self._epoch + 1}b{batch + 1}"

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        self.label = f"e{epoch + 1}"

    def on_train_end(self, logs=None):
        self.label = "end"


@pytest.fixture
def gate(monkeypatch):
    """Holds every background write of a weights file until the training thread waits for its save."""
    held = Gate()
    real = _fs.write_pieces

    def write_file(path, pieces, digest=None):
        if path.name == WEIGHTS_FILE:
            held.hold()
        return real(path, pieces, digest)

    monkeypatch.setattr(_fs, "write_pieces", write_file)
    return held


def watched(cb, gate, where):
    """Makes ``cb``'s writer release the held write whenever the training thread waits for a save in flight."""
    real = cb._writer.wait

    def wait():
        in_flight = cb._writer.in_flight
        if in_flight is not None and in_flight is not cb._reserving:  # (the buffers' reservation is not a save)
            gate.release(where.label)
        real()

    cb._writer.wait = wait
    return cb


def scores(values):
    """Sets logs["score"] at each epoch end (None: leaves it out), before the checkpoint sees the logs."""
    def set_score(epoch, logs):
        if values[epoch] is not None:
            logs["score"] = values[epoch]
    return keras.callbacks.LambdaCallback(on_epoch_end=set_score)


def saved(folder):
    return sorted((p.name for p in folder.iterdir() if not p.name.startswith(".")), key=lambda n: (len(n), n))


def fit(digits, folder, gate, values, extra=(), prepare=None, after=(), **kwargs):
    """Trains len(values) epochs (batches of 200) with a checkpoint of every epoch on "score" (min)."""
    x, y = digits
    where = Where()
    kwargs.setdefault("monitor", "score")
    kwargs.setdefault("mode", "min")
    cb = watched(ModelCheckpoint(str(folder / "e{epoch}"), async_save=True, **kwargs), gate, where)
    if prepare is not None:
        prepare(cb)
    model = make_model()
    model.fit(x, y, epochs=len(values), batch_size=200, verbose=0,
              callbacks=[where, scores(values), *extra, cb, *after])
    return model, cb


def test_saves_due_while_the_writer_is_behind_are_skipped_and_counted_without_blocking_training(
        tmp_path, digits, gate):
    with user_warnings("skipped") as messages:
        fit(digits, tmp_path, gate, [5.0, 6.0, 7.0, 8.0, 9.0], when_behind="skip")
    assert saved(tmp_path) == ["e1", "e5"]
    # Training waited for the disk only for the last save and at the end of fit, never for a skipped one.
    assert gate.waits == ["e5", "end"] and not gate.timed_out
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"ModelCheckpoint: skipped the save of epoch 2 to {tmp_path}/e2: "
                                  f"{tmp_path}/e1 is still being written (when_behind='skip')")
    assert messages[1].startswith("ModelCheckpoint skipped 3 of 5 saves of this fit (when_behind='skip')")


def test_the_default_waits_for_the_writer_and_saves_every_epoch(tmp_path, digits, gate):
    _, cb = fit(digits, tmp_path, gate, [5.0, 6.0, 7.0, 8.0, 9.0])
    assert cb.when_behind == "wait"
    assert saved(tmp_path) == ["e1", "e2", "e3", "e4", "e5"]
    assert gate.waits == ["e2", "e3", "e4", "e5", "end"] and not gate.timed_out


def summary(messages):
    """The count that fit ends with, checking that the first skip's warning (and no other) came before it."""
    assert len(messages) == 2 and messages[0].startswith("ModelCheckpoint: skipped the save of epoch"), messages
    return messages[1]


@pytest.mark.parametrize("values, min_delta, mode, kept, waits", [
    ([5.0, 6.0, 1.0, 7.0, 8.0], 0.0, "min", ["e1", "e3", "e5"], ["e3", "e5", "end"]),
    ([5.0, 4.0, 9.0, 3.0, 2.0], 0.0, "max", ["e1", "e3", "e5"], ["e3", "e5", "end"]),
    # 4.8 beats 5.0 by less than min_delta: no improvement, so it may be skipped; 4.0 is one.
    ([5.0, 6.0, 4.8, 4.0, 8.0], 0.5, "min", ["e1", "e4", "e5"], ["e4", "e5", "end"]),
], ids=["min", "max", "min_delta"])
def test_a_save_that_improves_the_monitor_waits_instead_of_being_skipped(tmp_path, digits, gate, values, min_delta,
                                                                         mode, kept, waits):
    with user_warnings("skipped") as messages:
        fit(digits, tmp_path, gate, values, when_behind="skip", mode=mode, min_delta=min_delta)
    assert saved(tmp_path) == kept
    assert gate.waits == waits and not gate.timed_out
    assert summary(messages).startswith("ModelCheckpoint skipped 2 of 5 saves")


def test_a_save_whose_epoch_logs_lack_the_monitor_waits(tmp_path, digits, gate):
    with user_warnings("skipped") as messages:
        fit(digits, tmp_path, gate, [5.0, 6.0, None, 7.0, 8.0], when_behind="skip")
    assert saved(tmp_path) == ["e1", "e3", "e5"]
    assert gate.waits == ["e3", "e5", "end"] and not gate.timed_out
    assert summary(messages).startswith("ModelCheckpoint skipped 2 of 5 saves")


def test_the_last_epochs_save_is_made_and_holds_the_final_weights(tmp_path, digits, gate):
    with user_warnings("skipped") as messages:
        model, _ = fit(digits, tmp_path, gate, [5.0, 6.0, 7.0], when_behind="skip")
    assert saved(tmp_path) == ["e1", "e3"]
    assert gate.waits == ["e3", "end"] and not gate.timed_out  # made at epoch 3, not later as fit ended
    fresh = make_model()
    keepbest.keras.load_weights(fresh, tmp_path / "e3")
    assert all(np.array_equal(a, b) for a, b in zip(weights_of(fresh), weights_of(model)))
    assert summary(messages).startswith("ModelCheckpoint skipped 1 of 3 saves")


def test_the_last_due_batch_save_of_fit_is_made(tmp_path, digits, gate):
    x, y = digits  # 600 samples, batches of 100: 6 steps per epoch, a save due every 2
    where = Where()
    cb = watched(ModelCheckpoint(str(tmp_path / "e{epoch}b{batch}"), save_freq=2, async_save=True,
                                 when_behind="skip"), gate, where)
    with user_warnings("skipped") as messages:
        make_model().fit(x, y, epochs=2, batch_size=100, verbose=0, callbacks=[where, cb])
    assert saved(tmp_path) == ["e1b2", "e2b6"]
    assert gate.waits == ["e2b6", "end"] and not gate.timed_out
    assert summary(messages).startswith("ModelCheckpoint skipped 4 of 6 saves")


class StopAfter(keras.callbacks.Callback):
    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            self.model.stop_training = True


def test_a_skipped_save_is_made_when_fit_stops_right_after_it(tmp_path, digits, gate):
    with user_warnings("skipped") as messages:
        # Listed after the checkpoint: when it saw epoch 3 end, fit was not stopping yet.
        model, _ = fit(digits, tmp_path, gate, [5.0, 6.0, 7.0] + [None] * 7, after=[StopAfter(3)],
                       when_behind="skip")
    assert saved(tmp_path) == ["e1", "e3"]  # epoch 3 was skipped (10 epochs planned), then made as fit ended
    fresh = make_model()
    keepbest.keras.load_weights(fresh, tmp_path / "e3")
    assert all(np.array_equal(a, b) for a, b in zip(weights_of(fresh), weights_of(model)))
    assert gate.waits == ["end", "end"] and not gate.timed_out
    assert summary(messages).startswith("ModelCheckpoint skipped 1 of 3 saves")


def test_skipped_saves_leave_retention_history_and_the_best_right(tmp_path, digits, gate):
    with user_warnings("skipped") as messages:
        fit(digits, tmp_path, gate, [5.0, 6.0, 1.0, 7.0, 8.0, 9.0], when_behind="skip", keep_last=2, keep_best=1)
    assert saved(tmp_path) == ["e3", "e6"]  # e1 pruned by keep_last=2; e3 is the best
    events = [(e["event"], e["name"]) for e in history.read(store.open(tmp_path), "e{epoch}")]
    assert events == [("committed", "e1"), ("committed", "e3"), ("committed", "e6"), ("deleted", "e1")]
    mgr = CheckpointManager(tmp_path, series="e{epoch}")
    assert mgr.recorded_best("score").name == "e3"
    assert [c.epoch for c in mgr.checkpoints()] == [3, 6]
    assert summary(messages).startswith("ModelCheckpoint skipped 3 of 6 saves")


def test_verbose_prints_each_skip_and_the_count(tmp_path, digits, gate, capsys):
    with user_warnings("skipped") as messages:
        fit(digits, tmp_path, gate, [5.0, 6.0, 7.0, 8.0], when_behind="skip", verbose=1)
    out = capsys.readouterr().out
    assert out.count("skipping the save to") == 2
    assert f"Epoch 3: skipping the save to {tmp_path}/e3: the previous save is still being written" in out
    assert "ModelCheckpoint skipped 2 of 4 saves of this fit" in out
    assert summary(messages).startswith("ModelCheckpoint skipped 2 of 4 saves")


class Decisions:
    """The decisions channel of two processes, played one after the other: as process 0's it records what
    is broadcast; as process 1's it hands back, in order, what process 0 broadcast."""

    def __init__(self, sent=None):
        self.follower = sent is not None
        self.sent = [] if sent is None else list(sent)

    def broadcast(self, tag, value=None, *, about=""):
        if self.follower:
            return self.sent.pop(0)
        self.sent.append(json.loads(json.dumps(value)))
        return self.sent[-1]


def test_other_processes_skip_the_saves_process_0_skipped(tmp_path, digits, gate):
    # Process 0 skips epochs 2, 4 and 5 (fit stops after 5 of 10 epochs), then makes epoch 5's save at the end.
    leader = Decisions()

    def as_process_0(cb):
        cb._decisions = leader

    with user_warnings("skipped") as messages:
        fit(digits, tmp_path, gate, [5.0, 6.0, 1.0, 7.0, 8.0] + [None] * 5, after=[StopAfter(5)],
            prepare=as_process_0, when_behind="skip")
    assert summary(messages).startswith("ModelCheckpoint skipped 2 of 5 saves")
    assert [d["skipped"] for d in leader.sent] == [False, True, False, True, True, False]
    assert saved(tmp_path) == ["e1", "e3", "e5"]

    # Process 1 saves where process 0 decided (the same filepath), here after it. Its own scores improve every
    # epoch (deciding alone, it would skip nothing), and it warns of nothing: it follows, to the save at the end.
    shutil.rmtree(tmp_path)
    follower = Decisions(leader.sent)

    def as_process_1(cb):
        cb._decisions, cb._committer = follower, False

    gate.waits.clear()
    fit(digits, tmp_path, gate, [5.0, 4.0, 3.0, 2.0, 1.0] + [None] * 5, after=[StopAfter(5)],
        prepare=as_process_1, when_behind="skip")
    assert saved(tmp_path) == ["e1", "e3", "e5"] and follower.sent == []
    assert gate.waits == ["e3", "end", "end"] and not gate.timed_out


def test_when_behind_must_be_wait_or_skip(tmp_path):
    with pytest.raises(ValueError, match=r"`when_behind` must be 'wait' \(a save waits for the previous one to be "
                                         r"written\) or 'skip' .*Received: when_behind='drop'"):
        ModelCheckpoint(str(tmp_path / "ckpt"), async_save=True, when_behind="drop")


def test_skip_without_async_save_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"when_behind='skip' needs async_save=True: only a save written in the "
                                         r"background .*Received: when_behind='skip', async_save=False"):
        ModelCheckpoint(str(tmp_path / "ckpt"), when_behind="skip")


def test_a_save_due_when_training_stops_is_not_skipped_so_early_stopping_cannot_change_it(tmp_path, digits, gate):
    # EarlyStopping (listed first) stops at epoch 2 and restores epoch 1's weights in its on_train_end: a save of
    # epoch 2 skipped then made at the end of fit would hold epoch 1's weights under epoch 2's name.
    stop = keras.callbacks.EarlyStopping(monitor="score", mode="min", patience=1, restore_best_weights=True)
    fit(digits, tmp_path, gate, [5.0, 6.0, 7.0, 8.0], extra=[stop], when_behind="skip")
    assert saved(tmp_path) == ["e1", "e2"]
    assert gate.waits == ["e2", "end"] and not gate.timed_out  # training waited: the save was made at epoch 2
    first, second = make_model(), make_model()
    keepbest.keras.load_weights(first, str(tmp_path / "e1"))
    keepbest.keras.load_weights(second, str(tmp_path / "e2"))
    assert any(not np.array_equal(a, b) for a, b in zip(weights_of(first), weights_of(second)))
