"""The retention contract every publisher is tested against: one schedule, read back from the tracker.

A checkpoint each epoch for 20 epochs, ``val_loss`` falling by 0.04 an epoch except at
epoch 7 (0.1), which stays the best; ``keep_last=2, keep_best=1``. Locally keepbest
keeps epochs 7 (``best``), 19 and 20 (``latest``). A subclass runs the schedule through
its tracker's publisher (``run_schedule``) and reads back what the tracker holds
(``read_back``); the test here checks both sides, and the subclass adds what only its
tracker shows (``check_tracker``).

Subclasses are collected in the tracker's test module (``class TestX(PublisherContract)``)
and give a ``tracker`` fixture: the tracker's run the schedule publishes to.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, NamedTuple

from keepbest import CheckpointManager

SERIES = "e{epoch:02d}"
VAL_LOSSES = [1.0 - 0.04 * e if e != 6 else 0.1 for e in range(20)]  # epoch 7 stays the best
KEEP_LAST, KEEP_BEST = 2, 1


def kept() -> list[tuple[int, int, tuple[str, ...]]]:
    """(epoch, version, aliases) of what retention keeps locally: the best and the last two.

    One version a save, numbered from 0: epoch ``e`` is version ``e - 1``.
    """
    last = len(VAL_LOSSES)
    best = 1 + VAL_LOSSES.index(min(VAL_LOSSES))
    aliases = {best: ("best", f"epoch_{best}"), last - 1: (f"epoch_{last - 1}",), last: ("latest", f"epoch_{last}")}
    return [(epoch, epoch - 1, aliases[epoch]) for epoch in sorted(aliases)]


class Tracked(NamedTuple):
    held: list[int]  # the keepbest versions the tracker holds, ascending
    best: int  # the keepbest version the tracker's ``best`` alias names


class PublisherContract:
    deletes = True  # whether the tracker deletes what retention deletes locally (offline W&B cannot)

    def run_schedule(self, folder: Path, tracker: Any) -> None:
        """Saves one checkpoint an epoch, with these ``val_loss`` values, keeping ``KEEP_LAST`` and
        ``KEEP_BEST``, into ``SERIES`` in ``folder``, published to ``tracker``."""
        raise NotImplementedError

    def read_back(self, tracker: Any) -> Tracked:
        raise NotImplementedError

    def check_tracker(self, tracker: Any, tracked: Tracked, warnings: str) -> None:
        """What only this tracker shows; ``warnings``: what keepbest logged at WARNING."""

    def test_retention_keeps_three_versions_locally_and_the_tracker_holds_them_or_says_why_not(self, tmp_path,
                                                                                               tracker, caplog):
        with caplog.at_level(logging.WARNING, logger="keepbest"):
            self.run_schedule(tmp_path, tracker)
        local = CheckpointManager(tmp_path, series=SERIES).checkpoints()
        assert [(c.epoch, c.version, c.aliases) for c in local] == kept()
        tracked = self.read_back(tracker)
        if self.deletes:
            assert tracked.held == [c.version for c in local]  # deleted on the tracker too
            assert "not deleted on" not in caplog.text
        else:
            assert tracked.held == list(range(len(VAL_LOSSES)))  # every version uploaded, none deleted ...
            assert "not deleted on" in caplog.text  # ... and the user is told
        assert tracked.best == next(c.version for c in local if "best" in c.aliases)
        self.check_tracker(tracker, tracked, caplog.text)
