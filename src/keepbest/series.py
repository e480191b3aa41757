"""The series index: version numbers and aliases of one series, kept with compare-and-swap.

Each committed checkpoint of a series (one ``filepath`` template in one
folder) is a version: v0, v1, ... Numbers are reserved before the commit by
a compare-and-swap on the series record, so two writers never take the same
number, and never reused (the record remembers the next one).

Aliases name versions, as W&B artifact aliases do:

- automatic ones, recomputed from the committed manifests after every commit:
  ``latest`` (the newest), ``best`` (the best by the series' monitor) and
  ``epoch_N`` (the newest checkpoint of epoch N, 1-based like file names);
- user ones (``keepbest promote DIR v3 --alias production``), which hold
  their version: retention never deletes it while the alias points there.

The record lives in the store (``.keepbest/aliases/<series>.json`` on a
local folder). Every change is a read-modify-write with compare-and-swap,
so ``keepbest promote`` in another process and the training loop never lose
each other's change. Retention first *retires* the versions it is about to
delete (in the record: a later promote refuses them), then deletes them. The
automatic aliases are derived state: a crash between a commit and the
alias update costs nothing. A record that cannot be read is set aside
(never overwritten), reported once, and replaced by one recomputed from the
manifests; while the damaged copy exists, retention in that series deletes
nothing, since the user aliases it held are unknown.

Example:
    >>> from keepbest.manifest import Manifest, MonitorRecord
    >>> ms = [Manifest(name=f"c{e}", layout="dir", format="tensors", series="s", epoch=e, created=e,
    ...                version=e - 1, metrics={"loss": l}, monitor=MonitorRecord("loss", "min"))
    ...       for e, l in [(1, 3.0), (2, 1.0), (3, 2.0)]]
    >>> automatic(ms)
    {'epoch_1': 0, 'epoch_2': 1, 'epoch_3': 2, 'best': 1, 'latest': 2}
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

from keepbest.checkpoint import best_by
from keepbest.errors import CheckpointNotFoundError
from keepbest.manifest import Manifest
from keepbest.store import Record, RecordConflictError, Store

FORMAT = "keepbest/aliases"
FOLDER = "aliases"
_AUTOMATIC = re.compile(r"latest|best|epoch_\d+|v\d+")
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_warned: set[tuple[str, str]] = set()  # (store, key) of damaged records already reported


@dataclass(frozen=True)
class AliasRecord:
    """What is stored for one series: the next version number, alias -> version, retired versions."""

    series: str
    next_version: int = 0
    automatic: Mapping[str, int] = field(default_factory=dict)
    user: Mapping[str, int] = field(default_factory=dict)
    retired: frozenset[int] = frozenset()
    """Versions retention is deleting: no alias may be moved onto them."""
    damaged_copy: str | None = None
    """The key of a damaged record set aside; while it exists, retention deletes nothing."""

    @property
    def all(self) -> dict[str, int]:
        return {**self.automatic, **self.user}

    def of(self, version: int | None) -> list[str]:
        """The aliases on ``version``: automatic ones first (``latest``, ``best``, ``epoch_N``), then the user's."""
        auto = sorted((a for a, v in self.automatic.items() if v == version), key=_alias_order)
        return auto + sorted(a for a, v in self.user.items() if v == version)

    def to_json(self) -> bytes:
        doc = {"format": FORMAT, "format_version": 1, "series": self.series, "next_version": self.next_version,
               "automatic": dict(self.automatic), "user": dict(self.user)}
        if self.retired:
            doc["retired"] = sorted(self.retired)
        if self.damaged_copy:
            doc["damaged_copy"] = self.damaged_copy
        return json.dumps(doc, indent=1, sort_keys=True).encode("utf-8")


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


def _decode(series: str, raw: bytes) -> AliasRecord:
    doc = json.loads(raw.decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"'format' is not '{FORMAT}'")
    retired = doc.get("retired", [])
    if not isinstance(retired, list):
        raise ValueError("'retired' must be a list of versions")
    damaged = doc.get("damaged_copy")
    if damaged is not None and not isinstance(damaged, str):
        raise ValueError("'damaged_copy' must be a record key")
    return AliasRecord(series, _count(doc["next_version"]), _mapping(doc["automatic"]), _mapping(doc["user"]),
                       frozenset(_count(v) for v in retired), damaged)


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a version must be an integer >= 0, not {value!r}")
    return value


def _mapping(value: object) -> dict[str, int]:
    if not isinstance(value, dict):
        raise ValueError("aliases must be an object")
    return {str(k): _count(v) for k, v in value.items()}


def next_version(record: AliasRecord, manifests: Sequence[Manifest]) -> int:
    """One more than any version ever given in this series (the record remembers deleted ones)."""
    return max([record.next_version, *((m.version + 1) for m in manifests if m.version is not None)])


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


class SeriesIndex:
    """Versions and aliases of series ``series`` in ``store``, changed only by compare-and-swap."""

    def __init__(self, store: Store, series: str) -> None:
        self.store, self.series = store, series
        self.key = store.record_key(FOLDER, series)

    # -- reading ------------------------------------------------------------------------
    def _parse(self, record: Record | None, repair: bool = False) -> AliasRecord | None:
        """The stored record; None when there is none.

        A damaged one is reported once; with ``repair`` (writers only) it is
        set aside and replaced by an empty record that points at the copy.
        """
        if record is None:
            return None
        try:
            return _decode(self.series, record.data)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            aside = self.store.set_aside(self.key) if repair else None
            kept = self.store.record_where(aside or self.key)
            self._report(f"Cannot read the aliases of series '{self.series}' in {self.store.where()}: {e}. "
                         "The automatic aliases (latest, best, epoch_N) are recomputed from the manifests. The "
                         f"damaged record is kept as {kept}; until you have set the user aliases again "
                         "(keepbest promote) and deleted that file, retention of this series deletes nothing. "
                         f"Received: {record.data[:120]!r}")
            if aside is None:
                return AliasRecord(self.series, damaged_copy=self.key)
            fresh = AliasRecord(self.series, damaged_copy=aside)
            try:
                self.store.write_record(self.key, fresh.to_json(), expect=None)
            except RecordConflictError:  # another writer repaired it first
                pass
            return fresh

    def _report(self, message: str) -> None:
        if (self.store.url, self.key) not in _warned:
            _warned.add((self.store.url, self.key))
            warnings.warn(message, UserWarning, stacklevel=4)

    def stored(self) -> AliasRecord:
        """The stored record (an empty one when there is none)."""
        return self._parse(self.store.read_record(self.key)) or AliasRecord(self.series)

    def current(self, manifests: Sequence[Manifest]) -> AliasRecord:
        """The aliases as they are now: automatic ones from ``manifests``, user ones that still point at one."""
        return self._recomputed(self.stored(), manifests)

    def _recomputed(self, stored: AliasRecord, manifests: Sequence[Manifest]) -> AliasRecord:
        live = {m.version for m in manifests if m.version is not None}
        return AliasRecord(self.series, next_version(stored, manifests), automatic(manifests),
                           {a: v for a, v in stored.user.items() if v in live}, stored.retired & live,
                           stored.damaged_copy)

    def holds_all(self, record: AliasRecord) -> bool:
        """True while a damaged record's copy exists: its user aliases are unknown, so nothing may go."""
        if record.damaged_copy is None:
            return False
        if self.store.read_record(record.damaged_copy) is not None:
            self._report(f"Retention of series '{self.series}' in {self.store.where()} deletes nothing while the "
                         f"damaged alias record {self.store.record_where(record.damaged_copy)} is kept: set the user "
                         "aliases again "
                         "(keepbest promote), then delete that file.")
            return True
        return False

    # -- changing (each a compare-and-swap) -------------------------------------------------
    def _change(self, change: Callable[[AliasRecord], AliasRecord | None]) -> AliasRecord:
        out: list[AliasRecord] = []

        def apply(current: Record | None) -> bytes | None:
            before = self._parse(current, repair=True) or AliasRecord(self.series)
            after = change(before)
            out[:] = [after or before]
            if after is None or (current is not None and after.to_json() == current.data):
                return None
            return after.to_json()

        self.store.update_record(self.key, apply)
        return out[0]

    def reserve(self, manifests: Sequence[Manifest]) -> int:
        """Takes the next version number for a checkpoint about to be committed."""
        taken: list[int] = []

        def bump(r: AliasRecord) -> AliasRecord:
            taken[:] = [next_version(r, manifests)]
            return _with(r, next_version=taken[0] + 1)

        self._change(bump)
        return taken[0]

    def retire(self, doomed: Sequence[Manifest]) -> list[Manifest]:
        """Marks ``doomed`` as being deleted; returns those that may go (no user alias holds them)."""
        allowed: list[Manifest] = []

        def mark(r: AliasRecord) -> AliasRecord | None:
            held = set(r.user.values())
            allowed[:] = [m for m in doomed if m.version is None or m.version not in held]
            if self.holds_all(r):
                allowed.clear()
            numbers = {m.version for m in allowed if m.version is not None}
            return _with(r, retired=r.retired | numbers) if numbers - r.retired else None

        self._change(mark)
        return allowed

    def refresh(self, manifests: Sequence[Manifest]) -> AliasRecord:
        """Stores the aliases recomputed from the series' committed ``manifests``."""
        return self._change(lambda r: self._recomputed(r, manifests))

    def promote(self, manifests: Sequence[Manifest], ref: str, alias: str) -> Manifest:
        """Points user alias ``alias`` at the version ``ref`` names; returns that version's manifest."""
        check_user_alias(alias)
        found: list[Manifest] = []

        def point(r: AliasRecord) -> AliasRecord:
            current = self._recomputed(r, manifests)
            target = resolve(current, manifests, ref)
            if target.version is None or target.version in current.retired:
                raise CheckpointNotFoundError(
                    f"Version '{ref}' of series '{self.series}' is being deleted by retention (or has no version "
                    f"number: written by keepbest < 0.3), so no alias can hold it. Pick another version. "
                    f"Received: {ref}")
            found[:] = [target]
            return _with(current, user={**current.user, alias: target.version})

        self._change(point)
        return found[0]

    def demote(self, manifests: Sequence[Manifest], alias: str) -> AliasRecord:
        """Removes user alias ``alias``."""
        def drop(r: AliasRecord) -> AliasRecord:
            current = self._recomputed(r, manifests)
            if alias not in current.user:
                raise KeyError(f"Series '{self.series}' in {self.store.where()} has no user alias '{alias}'. "
                               f"User aliases: {', '.join(sorted(current.user)) or 'none'}.")
            return _with(current, user={a: v for a, v in current.user.items() if a != alias})

        return self._change(drop)

    def forget(self) -> None:
        """Removes the record of a series whose checkpoints were all deleted on purpose."""
        self.store.delete_record(self.key)


def _with(record: AliasRecord, **changes: object) -> AliasRecord:
    return replace(record, **changes)  # type: ignore[arg-type]
