"""How bytes become durable on a local filesystem. Knows nothing of tensors.

A checkpoint is an *entry* named ``name`` in the store's ``root``: either one
file (``layout="file"``, e.g. ``best_model.keras``) whose manifest lives in
``root/.keepbest/<name>.json``, or one folder (``layout="dir"``) with its
manifest inside as ``manifest.json``.

Commit protocol (invariant 1 and 2 of DESIGN.md):

- the payload is written to a temporary sibling ``.keepbest-tmp-<pid>-<rand>-<name>``
  and fsynced, file by file;
- file layout: the new manifest is written durably as ``<name>.json.pending-<pid>``
  (the intent), the data is ``os.replace``d onto ``name``, the directory is
  fsynced, then the pending manifest is renamed onto ``<name>.json``. A crash
  between the two renames is rolled forward (data matches the intent) or back
  (it does not) by :meth:`LocalStore.recover`;
- dir layout: ``manifest.json`` is written inside the staged folder last, then
  the folder is renamed into place (atomically swapped with the previous one
  where the OS can, else moved aside as ``.keepbest-old-*`` and restored by
  ``recover`` if the process dies in between).

Deleting un-commits first: the manifest is renamed to ``<name>.json.deleting``
(file) or the folder is renamed to ``.keepbest-trash-*`` (dir), then the data
goes. What a crash leaves behind is an orphan that ``recover``/``keepbest gc``
removes, never a half checkpoint that looks whole.

Example:
    >>> import tempfile, pathlib
    >>> store = LocalStore(pathlib.Path(tempfile.mkdtemp()))
    >>> staged = store.stage("a.bin")
    >>> _ = staged.write_bytes(b"hello")
    >>> m = store.commit(staged, Manifest(name="a.bin", layout="file", format="bytes", series="a"))
    >>> [c.name for c in store.list().manifests], m.files[0].size
    (['a.bin'], 5)
"""

from __future__ import annotations

import builtins
import glob
import os
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from keepbest import _digest, _fs
from keepbest.errors import CorruptCheckpointError, StorageError
from keepbest.manifest import FileEntry, Manifest

MANIFEST_NAME = "manifest.json"
INDEX_DIR = ".keepbest"
TMP_PREFIX = ".keepbest-tmp-"
OLD_PREFIX = ".keepbest-old-"
TRASH_PREFIX = ".keepbest-trash-"
PENDING = ".json.pending-"
DELETING = ".json.deleting"
_TOKEN = re.compile(r"\d+(\.\d+)?")


@dataclass
class Listing:
    """Committed manifests of a store, and the manifests that could not be read."""

    manifests: list[Manifest] = field(default_factory=list)
    errors: list[CorruptCheckpointError] = field(default_factory=list)


@dataclass
class Recovery:
    """What :meth:`LocalStore.recover` found and did."""

    rolled_forward: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _owner(name: str, prefix: str) -> str | None:
    """The writer's token in a temp/old/trash name (``<prefix><token>-...``), or None if not ours."""
    head = name[len(prefix) :].split("-", 1)[0]
    return head if name.startswith(prefix) and _TOKEN.fullmatch(head) else None


def _suffix_owner(name: str, marker: str) -> str | None:
    """The writer's token after ``marker`` (``<name><marker><token>``), or None."""
    tail = name.rsplit(marker, 1)[-1] if marker in name else ""
    return tail if _TOKEN.fullmatch(tail) else None


class LocalStore:
    """Atomic checkpoint entries in one local directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # -- fault-injection seam: tests subclass and raise at a chosen point --------
    def _reached(self, point: str) -> None:
        """Called at each step of commit and delete; does nothing in production."""

    # -- paths ------------------------------------------------------------------
    @property
    def index(self) -> Path:
        return self.root / INDEX_DIR

    def entry_path(self, name: str) -> Path:
        return self.root / name

    def file_path(self, manifest: Manifest, entry: FileEntry) -> Path:
        base = self.root / manifest.name if manifest.layout == "dir" else self.root
        return base / entry.path

    def _manifest_path(self, name: str) -> Path:
        return self.index / f"{name}.json"

    # -- writing ----------------------------------------------------------------
    def stage(self, name: str) -> Path:
        """A fresh temporary sibling path for ``name`` (same directory, same suffix)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                e.errno, f"Cannot create checkpoint directory {self.root}: {e.strerror}. "
                "Check the path and its permissions", str(self.root)
            ) from e
        return self.root / f"{TMP_PREFIX}{_fs.owner_token()}-{os.urandom(4).hex()}-{name}"

    def discard(self, staged: Path) -> None:
        """Removes a staged entry that will not be committed."""
        _remove(staged)

    def commit(self, staged: Path, manifest: Manifest) -> Manifest:
        """Makes ``staged`` visible as ``manifest.name``; returns the committed manifest.

        When ``manifest.files`` is empty the files are hashed here.
        """
        target = self.entry_path(manifest.name)
        try:
            _fs.fsync_tree(staged)
            if not manifest.files:
                manifest = manifest.with_files(self._describe(staged, manifest.layout, manifest.name))
            self._reached("staged")
            if manifest.layout == "file":
                self._publish_file(staged, target, manifest)
            else:
                self._publish_dir(staged, target, manifest)
        except BaseException:
            _remove(staged)
            raise
        return manifest

    def _describe(self, staged: Path, layout: str, name: str) -> tuple[FileEntry, ...]:
        if layout == "file":
            size, digest = _digest.of_file(staged)
            return (FileEntry(path=name, size=size, digest=digest),)
        entries = []
        for dirpath, _dirs, files in os.walk(staged):
            for f in files:
                p = Path(dirpath) / f
                rel = p.relative_to(staged).as_posix()
                if rel == MANIFEST_NAME:
                    continue
                size, digest = _digest.of_file(p)
                entries.append(FileEntry(path=rel, size=size, digest=digest))
        return tuple(sorted(entries, key=lambda e: e.path))

    def _publish_file(self, staged: Path, target: Path, manifest: Manifest) -> None:
        if target.is_dir():
            raise IsADirectoryError(
                f"Cannot save checkpoint to {target}: it is an existing directory. "
                f"Choose a file path. Received: filepath={target}"
            )
        self.index.mkdir(exist_ok=True)
        pending = self.index / f"{manifest.name}{PENDING}{_fs.owner_token()}"
        _fs.write_durably(pending, manifest.to_json())
        # A marker of an earlier failed delete of this name describes data about to be replaced.
        for marker in self.index.glob(f"{glob.escape(manifest.name)}{DELETING}*"):
            marker.unlink(missing_ok=True)
        self._reached("intent_written")
        os.replace(staged, target)
        try:
            _fs.fsync_dir(self.root)
            self._reached("data_published")
        finally:  # the data is in place: the manifest must follow it, even if this process goes on after an error
            os.replace(pending, self._manifest_path(manifest.name))
            _fs.fsync_dir(self.index)

    def _publish_dir(self, staged: Path, target: Path, manifest: Manifest) -> None:
        _fs.write_durably(staged / MANIFEST_NAME, manifest.to_json())
        if not target.exists():
            os.rename(staged, target)
            _fs.fsync_dir(self.root)
            return
        if not (target / MANIFEST_NAME).is_file():
            raise StorageError(
                17, f"Cannot save checkpoint to {target}: it exists and is not a keepbest checkpoint "
                "(no manifest.json), so replacing it could destroy your data. Move it away or "
                f"choose another path. Received: filepath={target}", str(target)
            )
        if _fs.exchange(staged, target):
            _fs.fsync_dir(self.root)
            self._reached("data_published")
            _remove(staged)  # now holds the previous checkpoint, already invisible
            return
        old = self.root / f"{OLD_PREFIX}{_fs.owner_token()}-{os.urandom(4).hex()}-{manifest.name}"
        os.rename(target, old)
        try:
            self._reached("old_moved_aside")
            os.rename(staged, target)
        except BaseException:  # the process lives on: put the previous checkpoint back now
            os.rename(old, target)
            raise
        _fs.fsync_dir(self.root)
        self._reached("data_published")
        _remove(old)

    def delete(self, manifest: Manifest) -> None:
        """Removes a committed checkpoint; the manifest goes first."""
        target = self.entry_path(manifest.name)
        if manifest.layout == "file":
            marker = self.index / f"{manifest.name}{DELETING}-{_fs.owner_token()}"
            os.replace(self._manifest_path(manifest.name), marker)
            _fs.fsync_dir(self.index)
            self._reached("uncommitted")
            target.unlink(missing_ok=True)
            _fs.fsync_dir(self.root)
            marker.unlink(missing_ok=True)
        else:
            trash = self.root / f"{TRASH_PREFIX}{_fs.owner_token()}-{os.urandom(4).hex()}-{manifest.name}"
            os.rename(target, trash)
            _fs.fsync_dir(self.root)
            self._reached("uncommitted")
            _remove(trash)

    # -- reading ----------------------------------------------------------------
    def list(self) -> Listing:
        """Every committed checkpoint in ``root`` (nothing staged, pending or deleted)."""
        out = Listing()
        if self.index.is_dir():
            for p in sorted(self.index.glob("*.json")):
                self._read_into(out, p, p.name[: -len(".json")], "file")
        if self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if not p.name.startswith(".keepbest-") and (p / MANIFEST_NAME).is_file():
                    self._read_into(out, p / MANIFEST_NAME, p.name, "dir")
        return out

    def _read_into(self, out: Listing, path: Path, name: str, layout: str) -> None:
        try:
            m = Manifest.from_json(path.read_bytes(), source=str(path))
        except CorruptCheckpointError as e:
            out.errors.append(e)
            return
        except FileNotFoundError:  # deleted between listing and reading
            return
        if m.layout != layout:
            out.errors.append(CorruptCheckpointError(
                f"Invalid manifest {path}: layout '{m.layout}' does not match where it is stored "
                f"('{layout}'). The checkpoint cannot be trusted: load another one, or restore or delete it. "
                f"Received: layout={m.layout}"))
            return
        if m.name != name:  # the folder was renamed or copied: where it is now wins
            m = replace(m, name=name)
        out.manifests.append(m)

    def replacing(self, name: str) -> bool:
        """Whether a live writer is between the two renames of a file checkpoint's commit of ``name``.

        Then the data on disk is already the new version while the manifest
        still describes the old one: a reader sees a mismatch that is not damage.
        """
        if not self.index.is_dir():
            return False
        for p in self.index.glob(f"{glob.escape(name)}{PENDING}*"):
            owner = _suffix_owner(p.name, PENDING)
            if owner is not None and _fs.owner_is_alive(owner):
                return True
        return False

    def verify(self, manifest: Manifest) -> None:
        """Re-hashes every file of ``manifest``; raises CorruptCheckpointError naming the file."""
        for entry in manifest.files:
            path = self.file_path(manifest, entry)
            try:
                size, digest = _digest.of_file(path, entry.algorithm)
            except FileNotFoundError:
                raise CorruptCheckpointError(
                    f"Checkpoint {manifest.name} is incomplete: file {path} is missing. "
                    "Restore it from a copy or delete the checkpoint. Received: missing file"
                ) from None
            if size != entry.size or digest != entry.digest:
                raise CorruptCheckpointError(
                    f"Checkpoint {manifest.name} is corrupt: file {path} does not match its manifest "
                    "(it was truncated or modified after it was committed). Load another "
                    f"checkpoint or restore the file. Received: size={size} {entry.algorithm}={digest[:16]}..., "
                    f"expected size={entry.size} {entry.algorithm}={entry.digest[:16]}..."
                )

    # -- crash recovery ----------------------------------------------------------
    def orphans(self) -> builtins.list[Path]:
        """Leftovers of dead writers: temp entries, swapped-out and half-deleted data."""
        found: builtins.list[Path] = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                for prefix in (TMP_PREFIX, OLD_PREFIX, TRASH_PREFIX):
                    owner = _owner(p.name, prefix)
                    if owner is not None and not _fs.owner_is_alive(owner):
                        found.append(p)
        if self.index.is_dir():
            for p in self.index.iterdir():
                owner = _owner(p.name, TMP_PREFIX) or _suffix_owner(p.name, PENDING) \
                    or _suffix_owner(p.name, DELETING + "-")
                if owner is not None and not _fs.owner_is_alive(owner):
                    found.append(p)
            # Sidecar records (evaluators/, evaluations/<name>/, ended/) and aliases are written through temp files,
            # and upload snapshots (uploads/) are temp folders of their own.
            for dirpath, dirs, files in os.walk(self.index):
                if Path(dirpath) == self.index:
                    continue
                for f in files + dirs:
                    owner = _owner(f, TMP_PREFIX)
                    if owner is not None and not _fs.owner_is_alive(owner):
                        found.append(Path(dirpath) / f)
        return sorted(found)

    def recover(self) -> Recovery:
        """Finishes or undoes what dead writers left half done. Safe to repeat."""
        report = Recovery()
        for p in self.orphans():
            if PENDING in p.name:
                self._settle_pending(p, report)
            elif DELETING in p.name:
                _remove(self.root / p.name.rsplit(DELETING, 1)[0])
                p.unlink(missing_ok=True)
                report.removed.append(str(p))
            elif p.name.startswith(OLD_PREFIX):
                name = p.name[len(OLD_PREFIX) :].split("-", 2)[-1]
                if not self.entry_path(name).exists() and (p / MANIFEST_NAME).is_file():
                    os.rename(p, self.entry_path(name))
                    report.restored.append(name)
                else:
                    _remove(p)
                    report.removed.append(str(p))
            else:
                _remove(p)
                report.removed.append(str(p))
        if report.restored or report.removed:
            _fs.fsync_dir(self.root)
        return report

    def _settle_pending(self, pending: Path, report: Recovery) -> None:
        name = pending.name.split(PENDING, 1)[0]
        try:
            intent = Manifest.from_json(pending.read_bytes(), source=str(pending))
            data = self.entry_path(name)
            matches = len(intent.files) == 1 and data.is_file() and \
                _digest.of_file(data, intent.files[0].algorithm) == (intent.files[0].size, intent.files[0].digest)
        except CorruptCheckpointError:
            matches = False
        if matches:  # the data rename happened: finish the commit
            os.replace(pending, self._manifest_path(name))
            report.rolled_forward.append(name)
        else:  # the data rename never happened: the old manifest still describes the data
            pending.unlink()
            report.rolled_back.append(name)
        _fs.fsync_dir(self.index)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
