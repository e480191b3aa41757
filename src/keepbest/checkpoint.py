"""The committed record of one checkpoint, and which of a series is the best.

Example:
    >>> from keepbest.manifest import Manifest, MonitorRecord
    >>> ms = [Manifest(name=f"c{i}", layout="dir", format="t", series="s", created=i, metrics={"loss": v},
    ...                monitor=MonitorRecord("loss", "min")) for i, v in enumerate([3.0, 1.0, 2.0])]
    >>> best_by(ms, "loss").name
    'c1'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from keepbest.manifest import Manifest
from keepbest.policy import Candidate, best_candidate
from keepbest.store import Reader, Store


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: its manifest, where it lives, and what is known about it."""

    manifest: Manifest
    location: str
    """The checkpoint's path (local store) or URL."""
    is_best: bool = False
    evaluations: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """``{evaluator: record}``: what sidecar evaluators recorded for this very checkpoint."""
    aliases: tuple[str, ...] = ()
    """The aliases that name this version of its series (``latest``, ``best``, ``epoch_3``, user aliases)."""
    store: Store | None = field(default=None, compare=False, repr=False)
    """The store it is committed in."""

    @property
    def path(self) -> Path:
        """The local path of the checkpoint (a file or a folder)."""
        return Path(self.location)

    def reader(self) -> Reader:
        """Opens the checkpoint's files (see :class:`keepbest.store.Reader`)."""
        if self.store is None:
            raise ValueError(f"Checkpoint {self.name} was built without its store, so it cannot be read. "
                             "Get it from CheckpointManager or keepbest.list_checkpoints. Received: store=None")
        return self.store.reader(self.manifest)

    @property
    def version(self) -> int | None:
        """The version number within the series (v0, v1, ...); None for checkpoints of keepbest < 0.3."""
        return self.manifest.version

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def step(self) -> int | None:
        return self.manifest.step

    @property
    def epoch(self) -> int | None:
        return self.manifest.epoch

    @property
    def batch(self) -> int | None:
        return self.manifest.batch

    @property
    def metrics(self) -> Mapping[str, float]:
        return self.manifest.metrics

    @property
    def size(self) -> int:
        return sum(f.size for f in self.manifest.files)


def best_by(manifests: Sequence[Manifest], metric: str, mode: str | None = None) -> Manifest | None:
    """The best of the manifests that recorded ``metric`` as their monitor.

    ``mode`` defaults to the one the newest of them recorded (a restart that
    has not resolved an "auto" mode yet). NaN and inf never win.
    """
    scored = sorted((m for m in manifests if m.monitor and m.monitor.name == metric), key=lambda m: m.created)
    if not scored:
        return None
    found = best_candidate([Candidate(m.name, m.created, m.monitor_value) for m in scored],
                           mode or scored[-1].monitor.mode)  # type: ignore[union-attr]
    return next((m for m in scored if found is not None and m.name == found.key), None)


def bests(manifests: Sequence[Manifest]) -> set[str]:
    """Names of the best checkpoint of each series by each monitor its manifests recorded."""
    found: set[str] = set()
    for series in {m.series for m in manifests}:
        members = [m for m in manifests if m.series == series]
        for metric in {m.monitor.name for m in members if m.monitor}:
            best = best_by(members, metric)
            if best is not None:
                found.add(best.name)
    return found


def in_commit_order(manifests: Sequence[Manifest]) -> list[Manifest]:
    return sorted(manifests, key=lambda m: (m.created, m.name))
