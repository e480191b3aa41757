"""ModelCheckpoint's retention keywords: keep_every=, keep_period=, max_bytes= and keep=[...]."""

from __future__ import annotations

import pytest

from keepbest import history, store
from keepbest.discovery import list_checkpoints
from keepbest.keras import ModelCheckpoint
from keepbest.policy import KeepLast, MaxBytes

from .conftest import drive, make_model


def test_fit_with_keep_every_keep_and_max_bytes_keeps_what_the_rules_say(tmp_path, digits):
    x, y = digits
    probe = ModelCheckpoint(str(tmp_path / "probe" / "e{epoch}"))
    make_model().fit(x, y, epochs=1, batch_size=100, verbose=0, callbacks=[probe])
    size = list_checkpoints(tmp_path / "probe")[0].size  # every epoch's checkpoint has the same tensors
    budget = int(2.5 * size)
    cb = ModelCheckpoint(str(tmp_path / "run" / "e{epoch}"), monitor="val_loss", keep_every=3,
                         max_bytes=budget, keep=[KeepLast(1)])
    fit = make_model().fit(x, y, epochs=7, batch_size=100, validation_split=0.2, verbose=0, callbacks=[cb])
    best = 1 + min(range(7), key=lambda e: fit.history["val_loss"][e])
    kept = {c.epoch for c in list_checkpoints(tmp_path / "run")}
    # keep_every=3 and KeepLast(1) choose 3, 6 and 7 (plus the best); max_bytes then drops the oldest
    # unprotected ones until at most two checkpoints' worth of bytes remain.
    assert kept == {6, 7} | {best} if best in (6, 7) else kept == {7, best}
    reasons = {e["reason"] for e in history.read(store.open(tmp_path / "run"), "e{epoch}") if e["event"] == "deleted"}
    assert f"retention: max_bytes={MaxBytes(budget).describe().split('=')[1]}" in reasons
    assert "retention: keep_every=3, keep_last=1" in reasons


def test_keep_period_keeps_the_first_checkpoint_of_each_period(tmp_path, model):
    cb = ModelCheckpoint(str(tmp_path / "e{epoch}"), monitor="loss", keep_period=3600)
    drive(cb, model, [{"loss": v} for v in (3.0, 1.0, 2.0, 4.0)])
    committed = [e for e in history.read(store.open(tmp_path), "e{epoch}") if e["event"] == "committed"]
    first: dict[int, int] = {}
    for e in sorted(committed, key=lambda e: e["created"]):
        first.setdefault(int(e["created"] // 3600), e["epoch"])
    assert {c.epoch for c in list_checkpoints(tmp_path)} == set(first.values()) | {2, 4}  # with the best, the newest


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"keep_every": 0}, ValueError, r"`keep_every` must be a positive integer.*Received: keep_every=0"),
    ({"keep_every": 2.5}, ValueError, r"`keep_every` must be a positive integer.*Received: keep_every=2.5"),
    ({"keep_period": -1}, ValueError, r"`keep_period` must be a positive number of seconds.*Received: keep_period=-1"),
    ({"keep_period": "1h"}, ValueError, r"`keep_period` must be a positive number.*Received: keep_period='1h'"),
    ({"max_bytes": "lots"}, ValueError, r"max_bytes must be a number of bytes.*'50GB'.*Received: max_bytes='lots'"),
    ({"max_bytes": 0}, ValueError, r"max_bytes must be a positive whole number of bytes.*Received: max_bytes=0"),
    ({"keep": [2]}, TypeError, r"keep must be a list of retention rules.*Received: keep=\[2\]"),
    ({"keep": KeepLast(2)}, TypeError, r"`keep` must be a list of retention rules.*Received: keep=KeepLast"),
])
def test_bad_retention_keywords_fail_at_construction(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        ModelCheckpoint(str(tmp_path / "e{epoch}.keras"), **kwargs)


def test_max_bytes_with_a_placeholder_in_the_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"Retention \(max_bytes=50.0 GB\) prunes the checkpoints of one folder.*"
                                         r"Received: filepath="):
        ModelCheckpoint(str(tmp_path / "run{epoch}" / "m.keras"), max_bytes="50GB")


def test_a_misspelt_retention_keyword_suggests_the_right_one(tmp_path):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'max_byte'. Did you mean 'max_bytes'\?"):
        ModelCheckpoint(str(tmp_path / "m.keras"), max_byte="50GB")
