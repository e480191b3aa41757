"""Versions and aliases: each committed checkpoint of a series is a version (v0, v1, ...).

Aliases name versions, as W&B artifact aliases do:

- automatic ones, recomputed from the committed manifests after every commit:
  ``latest`` (the newest), ``best`` (the best by the series' monitor) and
  ``epoch_N`` (the newest checkpoint of epoch N, 1-based like file names);
- user ones (``keepbest promote DIR v3 --alias production``), which hold
  their version: retention never deletes it while the alias points there.

They are stored per series in ``<dir>/.keepbest/aliases/<series>.json``,
written atomically (temp file, fsync, rename) after the commit, under a
file lock so that ``keepbest promote`` in another process and the training
loop never lose each other's change. The automatic aliases are derived
state: if a crash falls between a commit and the alias update, the next
update (or any reader) recomputes them from the manifests.

Example:
    >>> from keepbest.manifest import Manifest, MonitorRecord
    >>> ms = [Manifest(name=f"c{e}", layout="dir", format="tensors", series="s", epoch=e, created=e,
    ...                version=e - 1, metrics={"loss": l}, monitor=MonitorRecord("loss", "min"))
    ...       for e, l in [(1, 3.0), (2, 1.0), (3, 2.0)]]
    >>> automatic(ms)
    {'epoch_1': 0, 'epoch_2': 1, 'epoch_3': 2, 'best': 1, 'latest': 2}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import urllib.parse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from keepbest import _fs
from keepbest.checkpoint import Checkpoint, best_by
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.manifest import Manifest
from keepbest.storage import INDEX_DIR

FORMAT = "keepbest/aliases"
FOLDER = "aliases"
_AUTOMATIC = re.compile(r"latest|best|epoch_\d+|v\d+")
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class AliasRecord:
    """What is stored for one series: the next version number and alias -> version."""

    series: str
    next_version: int = 0
    automatic: Mapping[str, int] = field(default_factory=dict)
    user: Mapping[str, int] = field(default_factory=dict)

    @property
    def all(self) -> dict[str, int]:
        return {**self.automatic, **self.user}

    def of(self, version: int | None) -> list[str]:
        """The aliases on ``version``: automatic ones first (``latest``, ``best``, ``epoch_N``), then the user's."""
        auto = sorted((a for a, v in self.automatic.items() if v == version), key=_alias_order)
        return auto + sorted(a for a, v in self.user.items() if v == version)


def _alias_order(alias: str) -> tuple[int, str]:
    return ({"latest": 0, "best": 1}.get(alias, 2), alias)


def is_automatic(alias: str) -> bool:
    """Whether keepbest sets ``alias`` itself (``latest``, ``best``, ``epoch_N``, ``vN``)."""
    return bool(_AUTOMATIC.fullmatch(alias))


def check_user_alias(alias: str) -> None:
    """Refuses names keepbest sets itself and names that could not be a W&B/MLflow alias."""
    if not isinstance(alias, str) or not _USER.fullmatch(alias):
        raise ValueError(f"Alias {alias!r} is not a valid name: use letters, digits, '_', '.' and '-' "
                         f"(at most 128, starting with a letter or digit). Received: alias={alias!r}")
    if is_automatic(alias):
        raise ValueError(f"Alias '{alias}' is set by keepbest itself (latest, best, epoch_N, vN) and moves with "
                         f"every save. Choose another name, such as 'production'. Received: alias={alias!r}")


def path(root: str | os.PathLike[str], series: str) -> Path:
    return Path(root, INDEX_DIR, FOLDER, urllib.parse.quote(series, safe="") + ".json")


def automatic(manifests: Sequence[Manifest]) -> dict[str, int]:
    """``latest``, ``best`` and ``epoch_N`` for one series' committed manifests."""
    versioned = sorted((m for m in manifests if m.version is not None), key=lambda m: (m.created, m.version))
    out: dict[str, int] = {}
    for m in versioned:  # newest last, so the newest checkpoint of an epoch wins
        if m.epoch is not None:
            out[f"epoch_{m.epoch}"] = m.version  # type: ignore[assignment]
    monitors = [m.monitor.name for m in versioned if m.monitor]
    best = best_by(versioned, monitors[-1]) if monitors else None
    if best is not None:
        out["best"] = best.version  # type: ignore[assignment]
    if versioned:
        out["latest"] = versioned[-1].version  # type: ignore[assignment]
    return out


def read(root: str | os.PathLike[str], series: str) -> AliasRecord:
    """The stored record of ``series``; an empty one when there is none yet."""
    p = path(root, series)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return AliasRecord(series)
    try:
        doc = json.loads(raw.decode("utf-8"))
        if doc.get("format") != FORMAT:
            raise ValueError(f"'format' is not '{FORMAT}'")
        record = AliasRecord(series, _count(doc["next_version"]), _mapping(doc["automatic"]), _mapping(doc["user"]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(
            f"Cannot read the aliases of series '{series}' from {p}: {e}. Checkpoints are not affected; "
            f"delete the file to recompute the automatic aliases (user aliases are then lost). "
            f"Received: {raw[:120]!r}") from None
    return record


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a version must be an integer >= 0, not {value!r}")
    return value


def _mapping(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError("aliases must be an object")
    return {str(k): _count(v) for k, v in value.items()}


def write(root: str | os.PathLike[str], record: AliasRecord) -> None:
    p = path(root, record.series)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "format_version": 1, "series": record.series, "next_version": record.next_version,
           "automatic": dict(record.automatic), "user": dict(record.user)}
    _fs.write_durably(p, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))


@contextlib.contextmanager
def locked(root: str | os.PathLike[str], series: str) -> Iterator[None]:
    """Holds the series' alias lock (a no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one writer per series is the rule there
        yield
        return
    lock = path(root, series).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def forget(root: str | os.PathLike[str], series: str) -> None:
    """Removes the record of a series whose checkpoints were all deleted on purpose (and its lock)."""
    p = path(root, series)
    p.unlink(missing_ok=True)
    p.with_suffix(".lock").unlink(missing_ok=True)
    if p.parent.is_dir() and not any(p.parent.iterdir()):  # other series' records may still be there
        p.parent.rmdir()


def current(root: str | os.PathLike[str], series: str, manifests: Sequence[Manifest]) -> AliasRecord:
    """The aliases as they are now: automatic ones from ``manifests``, user ones that still point at one."""
    stored = read(root, series)
    live = {m.version for m in manifests if m.version is not None}
    return AliasRecord(series, next_version(stored, manifests), automatic(manifests),
                       {a: v for a, v in stored.user.items() if v in live})


def next_version(record: AliasRecord, manifests: Sequence[Manifest]) -> int:
    """One more than any version ever given in this series (the record remembers deleted ones)."""
    return max([record.next_version, *((m.version + 1) for m in manifests if m.version is not None)])


def annotate(root: str | os.PathLike[str], manifests: Sequence[Manifest],
             checkpoints: Sequence[Checkpoint]) -> list[Checkpoint]:
    """``checkpoints`` with their aliases, computed per series from every manifest of the folder."""
    records = {s: current(root, s, [m for m in manifests if m.series == s])
               for s in {c.manifest.series for c in checkpoints}}
    return [replace(c, aliases=tuple(records[c.manifest.series].of(c.version))) if c.version is not None else c
            for c in checkpoints]


def resolve(record: AliasRecord, manifests: Sequence[Manifest], ref: str) -> Manifest:
    """The manifest that ``ref`` names: ``v3``, ``3``, an alias or a checkpoint name."""
    by_version = {m.version: m for m in manifests if m.version is not None}
    number: int | None = None
    if re.fullmatch(r"v?\d+", ref):
        number = int(ref.lstrip("v"))
    elif ref in record.all:
        number = record.all[ref]
    else:
        named = [m for m in manifests if m.name == ref]
        if named:
            return named[-1]
    if number is not None and number in by_version:
        return by_version[number]
    available = ", ".join(f"v{v}" for v in sorted(by_version)) or "none"
    raise CheckpointNotFoundError(f"No version '{ref}' in series '{record.series}'. Pass a live version, an alias or a "
                      f"checkpoint name. Available: {available}; aliases: {', '.join(sorted(record.all)) or 'none'}.")
