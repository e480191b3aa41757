"""Crash recovery of the local backend: what dead writers left half done is finished or undone.

Every work-in-progress name carries its writer's owner token (:mod:`keepbest.store._names`). A
leftover of a dead writer is settled: a pending intent rolled forward (the data matches it) or back,
a deleting marker finished, a folder moved aside restored or removed, temporary data removed. A
leftover whose writer's liveness cannot be known here (another host or PID namespace) is left and
reported. Manifests whose data was deleted by hand are removed as stale.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from keepbest.errors import CorruptCheckpointError
from keepbest.manifest import Manifest
from keepbest.store import _fs, _names
from keepbest.store._names import DELETING, MANIFEST, OLD, PENDING, TMP, TRASH
from keepbest.store._local_files import LocalFolder
from keepbest.store.base import Orphans, Recovery


class LocalRecovery(LocalFolder):
    """The recovery half of :class:`keepbest.store.local.LocalStore`."""

    def _leftovers(self) -> Iterator[tuple[Path, str]]:
        """Every work-in-progress name and its writer's liveness."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                for prefix in (TMP, OLD, TRASH):
                    owner = _names.owner(p.name, prefix)
                    if owner is not None:
                        yield p, _names.liveness(owner)
        if self.index.is_dir():
            for dirpath, dirs, files in os.walk(self.index):
                for f in files + dirs:
                    for prefix in (TMP, PENDING, DELETING):
                        owner = _names.owner(f, prefix)
                        if owner is not None:
                            yield Path(dirpath) / f, _names.liveness(owner)

    def orphans(self) -> Orphans:
        out = Orphans()
        for path, state in sorted(self._leftovers()):
            if state == _names.DEAD:
                out.dead.append(str(path))
            elif state == _names.UNKNOWN:
                out.undecided.append(str(path))
        # exists() follows links: a link whose target is gone counts as gone.
        out.stale = [d.manifest.name for d in self.list().damaged if d.manifest is not None
                     and d.manifest.layout == "file" and not self.entry_path(d.manifest.name).exists()]
        return out

    def recover(self) -> Recovery:
        found = self.orphans()
        report = Recovery(undecided=found.undecided)
        for p in found.dead:
            self._settle(Path(p), report)
        for name in found.stale:
            self._manifest_path(name).unlink(missing_ok=True)  # its data was deleted by hand
            report.stale.append(name)
        if report.changed:
            _fs.fsync_dir(self.root)
            if self.index.is_dir():
                _fs.fsync_dir(self.index)
        return report

    def _settle(self, p: Path, report: Recovery) -> None:
        if p.parent == self.index and p.name.startswith(PENDING):
            self._settle_pending(p, report)
        elif p.parent == self.index and p.name.startswith(DELETING):
            doomed = _read_manifest(p)
            if doomed is not None:
                _fs.remove(self.entry_path(doomed.name))
            p.unlink(missing_ok=True)
            report.removed.append(str(p))
        elif p.parent == self.root and p.name.startswith(OLD):
            moved = _read_manifest(p / MANIFEST)
            if moved is not None and not self.entry_path(moved.name).exists():
                os.rename(p, self.entry_path(moved.name))
                report.restored.append(moved.name)
            else:
                _fs.remove(p)
                report.removed.append(str(p))
        else:
            _fs.remove(p)
            report.removed.append(str(p))

    def _settle_pending(self, pending: Path, report: Recovery) -> None:
        intent = _read_manifest(pending)
        matches = False
        if intent is not None and len(intent.files) == 1:
            data = self.entry_path(intent.name)
            try:
                matches = data.is_file() and _fs.digest_file(data, intent.files[0].algorithm) == (
                    intent.files[0].size, intent.files[0].digest)
            except OSError:
                matches = False
        name = intent.name if intent is not None else pending.name
        if matches:  # the data rename happened: finish the commit
            assert intent is not None
            os.replace(pending, self._manifest_path(intent.name))
            report.rolled_forward.append(name)
        else:  # the data rename never happened: the old manifest still describes the data
            pending.unlink(missing_ok=True)
            report.rolled_back.append(name)
        _fs.fsync_dir(self.index)

def _read_manifest(path: Path) -> Manifest | None:
    try:
        return Manifest.from_json(path.read_bytes(), source=str(path))
    except (OSError, CorruptCheckpointError):
        return None
