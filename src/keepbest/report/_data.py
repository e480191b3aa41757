"""What a report shows, gathered through the storage contract: the committed manifests, the append-only
history (what retention deleted, and why; what publishers uploaded), the evaluation records and the
series index (versions and aliases)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from keepbest import evaluation, history
from keepbest.checkpoint import Checkpoint
from keepbest.discovery import find
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.manifest import Manifest
from keepbest.series import SeriesIndex, is_automatic
from keepbest.store import Store

STATES = ("kept", "deleted", "damaged")


@dataclass
class Save:
    """One save of a series, whether its checkpoint is still there (``kept``), was deleted (``deleted``,
    with the ``reason`` the history recorded: the retention rule, a re-save under the same name, ...) or
    cannot be used (``damaged``). Figures a save did not record are None."""

    name: str
    version: int | None
    created: float
    step: int | None = None
    epoch: int | None = None
    value: float | None = None
    """The monitored metric at save time."""
    state: str = "kept"
    reason: str | None = None
    best: bool = False
    aliases: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    evaluations: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """``{evaluator: {metric: value}}`` recorded by sidecar evaluators."""
    size: int | None = None
    reused: int | None = None
    stall: float | None = None
    persist: float | None = None
    integrity: str = ""
    """``ok`` (listed complete), ``verified`` (re-hashed), or what is wrong; empty for deleted saves."""
    published: Mapping[str, bool] = field(default_factory=dict)
    """``{publisher: uploaded}``."""

    @property
    def written(self) -> int | None:
        """Bytes this save wrote (its size less what dedup reused); None where unknown."""
        return None if self.size is None or self.reused is None else self.size - self.reused

    @property
    def marked(self) -> bool:
        """Kept, best or holding an alias a person cares about: its marker is never thinned out."""
        return self.state == "kept" or self.best or bool(self.user_aliases)

    @property
    def user_aliases(self) -> tuple[str, ...]:
        """The aliases other than ``best`` and ``epoch_N`` (``latest`` and the user's own)."""
        return tuple(a for a in self.aliases if a == "latest" or not is_automatic(a))


@dataclass
class SeriesReport:
    """One series: its saves oldest first, its monitor and its aliases (``alias -> version``)."""

    name: str
    saves: list[Save]
    monitor: str | None = None
    mode: str | None = None
    aliases: Mapping[str, int] = field(default_factory=dict)
    ended: float | None = None
    """When training of the series was marked as ended, if it was."""

    @property
    def axis(self) -> str:
        """What the x axis counts: ``epoch`` when every save has one and they never go back (a run restarted
        from scratch counts again from 1), else ``step`` on the same terms, else ``save`` (the commit order)."""
        for key in ("epoch", "step"):
            values = [getattr(s, key) for s in self.saves]
            if values and None not in values and all(a <= b for a, b in zip(values, values[1:])):
                return key
        return "save"

    def xs(self) -> list[float]:
        """Each save's position on the x axis (see :attr:`axis`)."""
        axis = self.axis
        return [float(i if axis == "save" else getattr(s, axis)) for i, s in enumerate(self.saves)]


@dataclass
class ReportData:
    """Everything one report shows."""

    location: str
    series: list[SeriesReport]
    generated: float = 0.0
    damaged: list[str] = field(default_factory=list)
    """``name: reason`` of checkpoints that cannot be used and belong to no series shown."""


def _number(value: Any) -> float | None:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metrics(raw: Any) -> dict[str, float]:
    out = {}
    for key, value in (raw or {}).items() if isinstance(raw, Mapping) else ():
        number = _number(value)
        if number is not None:
            out[str(key)] = number
    return out


def _from_checkpoint(c: Checkpoint, integrity: str) -> Save:
    m = c.manifest
    return Save(name=m.name, version=m.version, created=m.created, step=m.step, epoch=m.epoch,
                value=m.monitor_value, best=c.is_best, aliases=c.aliases, metrics=dict(m.metrics),
                evaluations={who: _metrics(r.get("metrics")) for who, r in c.evaluations.items()},
                size=sum(f.size for f in m.files), reused=m.reused_bytes, stall=m.stall, persist=m.persist,
                integrity=integrity)


def _from_event(e: Mapping[str, Any], evaluations: Mapping[str, Mapping[str, Any]]) -> Save:
    monitor = e.get("monitor") if isinstance(e.get("monitor"), Mapping) else {}
    created = _number(e.get("created")) or 0.0
    name = str(e.get("name"))
    cid = evaluation.commit_id(Manifest(name=name, layout="dir", format="", series="", created=created))
    return Save(name=name, version=e.get("version") if isinstance(e.get("version"), int) else None,
                created=created, step=e.get("step") if isinstance(e.get("step"), int) else None,
                epoch=e.get("epoch") if isinstance(e.get("epoch"), int) else None,
                value=_number(monitor.get("value")) if monitor else None,
                metrics=_metrics(e.get("metrics")) or ({monitor["name"]: v} if monitor and isinstance(
                    monitor.get("name"), str) and (v := _number(monitor.get("value"))) is not None else {}),
                evaluations={who: _metrics(r.get("metrics")) for who, r in evaluations.get(cid, {}).items()},
                size=e.get("size") if isinstance(e.get("size"), int) else None,
                reused=e.get("reused") if isinstance(e.get("reused"), int) else None,
                stall=_number(e.get("stall")), persist=_number(e.get("persist")))


def _integrity(store: Store, c: Checkpoint, verify: bool) -> str:
    if not verify:
        return "ok"
    try:
        store.verify(c.manifest)
    except CorruptCheckpointError as err:
        return f"corrupt: {err}"
    except CheckpointNotFoundError:
        return "gone (deleted while the report was made)"
    return "verified"


def series_report(store: Store, name: str, checkpoints: Sequence[Checkpoint], *, verify: bool = False,
                  records: Mapping[str, Mapping[str, Any]] | None = None,
                  ended: Mapping[str, float] | None = None, damaged: Sequence[Save] = ()) -> SeriesReport:
    """The report of series ``name`` from its committed ``checkpoints`` and its history in ``store``."""
    records = records if records is not None else evaluation.read_records(store)
    present = {(c.name, c.manifest.created): _from_checkpoint(c, _integrity(store, c, verify)) for c in checkpoints}
    saves: dict[tuple[str, float], Save] = {}
    unusable = {(s.name, s.created) for s in damaged}
    for e in history.read(store, name):
        key = (str(e.get("name")), _number(e.get("created")) or 0.0)
        if e.get("event") == "committed" and key not in present and key not in unusable:
            saves.setdefault(key, _from_event(e, records))
        elif e.get("event") == "deleted" and key in saves:
            saves[key].state, saves[key].reason = "deleted", str(e.get("reason") or "deleted")
        elif e.get("event") == "published" and isinstance(e.get("publisher"), str):
            target = present.get(key) or saves.get(key)
            if target is not None:
                target.published = {**target.published, e["publisher"]: bool(e.get("uploaded"))}
    for save in saves.values():  # committed, never recorded as deleted, and not listed: gone without a trace
        if save.state == "kept":
            save.state, save.reason = "deleted", "not listed (deleted outside keepbest, or its history was lost)"
    every = sorted([*present.values(), *saves.values(), *damaged],
                   key=lambda s: (s.created, -1 if s.version is None else s.version))
    newest = next((c.manifest for c in reversed(checkpoints) if c.manifest.monitor is not None), None)
    aliases = SeriesIndex(store, name).current([c.manifest for c in checkpoints]).all if checkpoints else {}
    return SeriesReport(name=name, saves=every, monitor=newest.monitor.name if newest and newest.monitor else None,
                        mode=newest.monitor.mode if newest and newest.monitor else None, aliases=aliases,
                        ended=(ended or {}).get(name))


def gather(location: str | os.PathLike[str] | Store, *, series: str | None = None, verify: bool = False,
           storage_options: Mapping[str, Any] | None = None) -> ReportData:
    """The report of the checkpoints at ``location`` (a folder or a bucket URL): every series, or ``series``.

    Raises ValueError naming the series there when ``series`` is not one of them.
    """
    found = find(location, storage_options)
    names = sorted({c.manifest.series for c in found.checkpoints})
    if series is not None and series not in names:
        raise ValueError(f"Cannot report series '{series}': {found.store.where()} has no such series. Pick one "
                         f"with --series. Available: {', '.join(names) or 'none'}. Received: series={series!r}")
    records = evaluation.read_records(found.store) if found.checkpoints else {}
    ended = evaluation.ended_series(found.store) if found.checkpoints else {}
    broken: dict[str | None, list[Save]] = {}
    for d in found.damaged:
        m = d.manifest
        broken.setdefault(m.series if m else None, []).append(Save(
            name=d.name, version=m.version if m else None, created=m.created if m else 0.0,
            step=m.step if m else None, epoch=m.epoch if m else None, value=m.monitor_value if m else None,
            state="damaged", integrity=d.reason, size=sum(f.size for f in m.files) if m else None))
    shown = [n for n in names if series is None or n == series]
    reports = [series_report(found.store, n, [c for c in found.checkpoints if c.manifest.series == n],
                             verify=verify, records=records, ended=ended, damaged=broken.pop(n, []))
               for n in shown]
    loose = [f"{s.name}: {s.integrity}" for saves in broken.values() for s in saves] if series is None else []
    return ReportData(location=found.store.where(), series=reports, generated=time.time(), damaged=loose)


def finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]
