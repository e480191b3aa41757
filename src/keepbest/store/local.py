"""The local backend: checkpoints in one folder of a local (or mounted) filesystem.

A checkpoint is an *entry* named ``name`` in the store's ``root``: either one
file (``layout="file"``, e.g. ``best_model.keras``) whose manifest lives in
``root/.keepbest/<name>.json``, or one folder (``layout="dir"``) with its
manifest inside as ``manifest.json``. Names of work in progress are made in
:mod:`keepbest.store._names`.

Commit protocol (invariants 1 and 2 of DESIGN.md):

- the payload is written to a temporary sibling ``.keepbest-tmp-<owner>-<rand>-<tail>``
  and fsynced, file by file;
- file layout: the new manifest is written durably as a pending intent in
  ``.keepbest/``, the data is ``os.replace``d onto ``name``, the directory is
  fsynced, then the intent is renamed onto ``<name>.json``. A crash between
  the two renames is rolled forward (data matches the intent) or back (it
  does not) by :meth:`LocalStore.recover`;
- dir layout: ``manifest.json`` is written inside the staged folder last, then
  the folder is renamed into place (atomically swapped with the previous one
  where the OS can, else moved aside as ``.keepbest-old-*`` and restored by
  ``recover`` if the process dies in between).

A checkpoint file that is a symbolic link is written through: the new file
is staged beside the link's target and replaces the target, so the link
stays a link (Keras's own writers follow links too).

Deleting un-commits first: the manifest is renamed to a deleting marker
(file) or the folder is renamed to ``.keepbest-trash-*`` (dir), then the data
goes. What a crash leaves behind is an orphan that ``recover``/``keepbest gc``
removes, never a half checkpoint that looks whole.

Records are JSON files under ``.keepbest/`` (``aliases/<series>.json``, ...),
replaced atomically; compare-and-swap holds an ``flock`` on
``.keepbest/.keepbest-records.lock`` for the compare and the replace.

Example:
    >>> import tempfile
    >>> from keepbest.manifest import Manifest
    >>> store = LocalStore(tempfile.mkdtemp())
    >>> staged = store.stage("a.bin", "file")
    >>> with open(staged.local_path(), "wb") as f: _ = f.write(b"hello")
    >>> m = store.commit(staged, Manifest(name="a.bin", layout="file", format="bytes", series="a"))
    >>> [c.name for c in store.list().manifests], m.files[0].size
    (['a.bin'], 5)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from keepbest.manifest import FileEntry, Manifest
from keepbest.store import _fs, _names
from keepbest.store._local_files import LocalReader, LocalStaged, local_staged
from keepbest.store._local_records import LocalRecords
from keepbest.store._local_recovery import LocalRecovery
from keepbest.store._names import DELETING, MANIFEST, OLD, PENDING, RESERVED, TMP, TRASH
from keepbest.store._watch import FolderWatch
from keepbest.store.base import Damaged, Listing, Staged, Store, Watch


class LocalStore(LocalRecords, LocalRecovery, Store):
    """Atomic checkpoint entries and records in one local directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        # Absolute now: a relative path must not follow a later os.chdir().
        self.root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
        self.url = str(self.root)

    # -- fault-injection seam: tests subclass and raise at a chosen point --------
    def _reached(self, point: str) -> None:
        """Called at each step of commit and delete; does nothing in production."""

    # -- where ----------------------------------------------------------------------
    def where(self, name: str | None = None) -> str:
        return str(self.root if name is None else self.root / name)

    def exists(self) -> bool:
        return self.root.is_dir()

    def entry_kind(self) -> str | None:
        if self.root.is_file():
            return "file"
        if (self.root / MANIFEST).is_file():
            return "dir"
        return None

    def parent(self) -> "LocalStore":
        return LocalStore(self.root.parent)

    def _target(self, name: str) -> Path:
        """Where the data of ``name`` is written: the entry, or the target of a link in its place."""
        entry = self.root / name
        return Path(os.path.realpath(entry)) if entry.is_symlink() else entry

    # -- writing ----------------------------------------------------------------
    def stage(self, name: str, layout: str) -> LocalStaged:
        self.check_name(name)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(
                e.errno, f"Cannot create checkpoint directory {self.root}: {e.strerror}. "
                "Check the path and its permissions", str(self.root)
            ) from e
        path = self._target(name).parent / _names.temp(TMP, name)
        if layout == "dir":
            path.mkdir()
        return LocalStaged(self, name, layout, path)

    def discard(self, staged: Staged) -> None:
        _fs.remove(local_staged(staged).path)

    def join(self, handle: Mapping[str, Any]) -> LocalStaged:
        name, path = str(handle.get("name", "")), Path(str(handle.get("path", "")))
        self.check_name(name)
        if handle.get("layout") != "dir" or path.parent != self._target(name).parent or \
                not path.name.startswith(TMP):
            raise ValueError(f"Cannot write into staged entry {path}: it is not a folder that {self.root} stages "
                             f"for checkpoint {name!r} (the processes must save to the same folder). "
                             f"Received: handle={dict(handle)!r}")
        if not path.is_dir():
            raise StorageError(errno.ENOENT, f"Cannot write into staged entry {path}: it does not exist here. All "
                               "processes must see the same folder (a shared filesystem) to save one checkpoint "
                               f"together; use a shared path or an s3:// URL. Received: handle={dict(handle)!r}",
                               str(path))
        return LocalStaged(self, name, "dir", path, joined=True)

    def commit(self, staged: Staged, manifest: Manifest) -> Manifest:
        path = local_staged(staged).path
        target = self._target(manifest.name)
        try:
            _fs.fsync_tree(path)
            if not manifest.files:
                manifest = manifest.with_files(self._describe(path, manifest.layout, manifest.name))
            self._reached("staged")
            if manifest.layout == "file":
                self._publish_file(path, target, manifest)
            else:
                self._publish_dir(path, target, manifest)
        except BaseException:
            _fs.remove(path)
            raise
        return manifest

    def _describe(self, staged: Path, layout: str, name: str) -> tuple[FileEntry, ...]:
        if layout == "file":
            size, digest = _fs.digest_file(staged)
            return (FileEntry(path=name, size=size, digest=digest),)
        entries = []
        for dirpath, _dirs, files in os.walk(staged):
            for f in files:
                p = Path(dirpath) / f
                rel = p.relative_to(staged).as_posix()
                if rel == MANIFEST:
                    continue
                size, digest = _fs.digest_file(p)
                entries.append(FileEntry(path=rel, size=size, digest=digest))
        return tuple(sorted(entries, key=lambda e: e.path))

    def _fsync_folders(self, target: Path) -> None:
        _fs.fsync_dir(target.parent)
        if target.parent != self.root:  # written through a link: the link's folder did not change
            _fs.fsync_dir(self.root)

    def _publish_file(self, staged: Path, target: Path, manifest: Manifest) -> None:
        if target.is_dir():
            raise IsADirectoryError(
                f"Cannot save checkpoint to {self.root / manifest.name}: it is an existing directory. "
                f"Choose a file path. Received: filepath={self.root / manifest.name}"
            )
        self.index.mkdir(exist_ok=True)
        pending = self.index / _names.intent(PENDING, manifest.name)
        _fs.write_durably(pending, manifest.to_json())
        # A marker of an earlier failed delete of this name describes data about to be replaced.
        for marker in self.index.glob(_names.intent_glob(DELETING, manifest.name)):
            marker.unlink(missing_ok=True)
        self._reached("intent_written")
        os.replace(staged, target)
        try:
            self._fsync_folders(target)
            self._reached("data_published")
        finally:  # the data is in place: the manifest must follow it, even if this process goes on after an error
            os.replace(pending, self._manifest_path(manifest.name))
            _fs.fsync_dir(self.index)

    def _publish_dir(self, staged: Path, target: Path, manifest: Manifest) -> None:
        _fs.write_durably(staged / MANIFEST, manifest.to_json())
        if not target.exists():
            os.rename(staged, target)
            self._fsync_folders(target)
            return
        if not (target / MANIFEST).is_file():
            raise StorageError(
                errno.EEXIST, f"Cannot save checkpoint to {target}: it exists and is not a keepbest checkpoint "
                "(no manifest.json), so replacing it could destroy your data. Move it away or "
                f"choose another path. Received: filepath={target}", str(target)
            )
        if _fs.exchange(staged, target):
            self._fsync_folders(target)
            self._reached("data_published")
            _fs.remove(staged)  # now holds the previous checkpoint, already invisible
            return
        old = target.parent / _names.temp(OLD, manifest.name)
        os.rename(target, old)
        try:
            self._reached("old_moved_aside")
            os.rename(staged, target)
        except BaseException:  # the process lives on: put the previous checkpoint back now
            os.rename(old, target)
            raise
        self._fsync_folders(target)
        self._reached("data_published")
        _fs.remove(old)

    def delete(self, manifest: Manifest) -> None:
        entry = self.entry_path(manifest.name)
        if manifest.layout == "file":
            marker = self.index / _names.intent(DELETING, manifest.name)
            os.replace(self._manifest_path(manifest.name), marker)
            _fs.fsync_dir(self.index)
            self._reached("uncommitted")
            entry.unlink(missing_ok=True)  # a link in the entry's place goes, not its target
            _fs.fsync_dir(self.root)
            marker.unlink(missing_ok=True)
        else:
            trash = self.root / _names.temp(TRASH, manifest.name)
            os.rename(entry, trash)
            _fs.fsync_dir(self.root)
            self._reached("uncommitted")
            _fs.remove(trash)

    # -- reading ----------------------------------------------------------------
    def list(self) -> Listing:
        out = Listing()
        if self.index.is_dir():
            for p in sorted(self.index.iterdir()):
                if p.name.endswith(".json") and not p.name.startswith(RESERVED) and p.is_file():
                    self._read_into(out, p, None, "file")
        if self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if not p.name.startswith(RESERVED) and (p / MANIFEST).is_file():
                    self._read_into(out, p / MANIFEST, p.name, "dir")
                elif _names.is_model_file(p.name) and not (self.index / _names.manifest_file(p.name)).exists():
                    out.unmanaged.append(p.name)
        return out

    def _read_into(self, out: Listing, path: Path, folder: str | None, layout: str) -> None:
        shown = folder if folder is not None else path.name[: -len(".json")]
        try:
            m = Manifest.from_json(path.read_bytes(), source=str(path))
        except CorruptCheckpointError as e:
            out.damaged.append(Damaged(shown, str(e)))
            return
        except FileNotFoundError:  # deleted between listing and reading
            return
        if m.layout != layout:
            out.damaged.append(Damaged(shown, str(CorruptCheckpointError(
                f"Invalid manifest {path}: layout '{m.layout}' does not match where it is stored "
                f"('{layout}'). The checkpoint cannot be trusted: load another one, or restore or delete it. "
                f"Received: layout={m.layout}"))))
            return
        if folder is None and path.name != _names.manifest_file(m.name):
            out.damaged.append(Damaged(shown, str(CorruptCheckpointError(
                f"Invalid manifest {path}: it describes '{m.name}', which it is not named after. The "
                f"checkpoint cannot be trusted: delete this manifest. Received: name={m.name!r}"))))
            return
        if folder is not None and m.name != folder:  # the folder was renamed or copied: where it is now wins
            m = replace(m, name=folder)
        problem = self._absent(m)
        if problem is None:
            out.manifests.append(m)
        elif not self._gone(m):  # else deleted or saved again while listed, or a live commit is half-way
            out.damaged.append(Damaged(m.name, problem, m))

    def _absent(self, m: Manifest) -> str | None:
        """Why the data of ``m`` is not all there (a missing or resized file), else None."""
        for entry in m.files:
            path = self.file_path(m, entry)
            try:
                size = path.stat().st_size
            except (FileNotFoundError, NotADirectoryError):
                return (f"Checkpoint {m.name} is incomplete: file {path} is missing. Restore it from a copy or "
                        "delete the checkpoint (`keepbest gc` removes the manifest of a file deleted by hand). "
                        "Received: missing file")
            if size != entry.size:
                return (f"Checkpoint {m.name} is corrupt: file {path} does not match its manifest (it was "
                        "truncated or modified after it was committed). Load another checkpoint or restore the "
                        f"file. Received: size={size}, expected size={entry.size}")
        return None

    def reader(self, manifest: Manifest) -> LocalReader:
        return LocalReader(self, manifest)

    def replacing(self, name: str) -> bool:
        if not self.index.is_dir():
            return False
        for p in self.index.glob(_names.intent_glob(PENDING, name)):
            owner = _names.owner(p.name, PENDING)
            if owner is not None and _names.liveness(owner) != _names.DEAD:
                return True
        return False

    def _current(self, manifest: Manifest) -> Manifest | None:
        """The manifest committed under ``manifest.name`` now, or None."""
        path = self._manifest_path(manifest.name) if manifest.layout == "file" else \
            self.entry_path(manifest.name) / MANIFEST
        try:
            return Manifest.from_json(path.read_bytes(), source=str(path))
        except (OSError, CorruptCheckpointError):
            return None

    def _gone(self, manifest: Manifest) -> bool:
        now = self._current(manifest)
        return now is None or _identity(now) != _identity(manifest) \
            or (manifest.layout == "file" and self.replacing(manifest.name))

    def verify(self, manifest: Manifest, progress: Callable[[int], None] | None = None) -> None:
        for entry in manifest.files:
            path = self.file_path(manifest, entry)
            try:
                size, digest = _fs.digest_file(path, entry.algorithm)
            except (FileNotFoundError, NotADirectoryError):
                if self._gone(manifest):
                    raise _gone_error(manifest, self.root) from None
                raise CorruptCheckpointError(
                    f"Checkpoint {manifest.name} is incomplete: file {path} is missing. "
                    "Restore it from a copy or delete the checkpoint. Received: missing file"
                ) from None
            if size != entry.size or digest != entry.digest:
                if self._gone(manifest):
                    raise _gone_error(manifest, self.root)
                raise CorruptCheckpointError(
                    f"Checkpoint {manifest.name} is corrupt: file {path} does not match its manifest "
                    "(it was truncated or modified after it was committed). Load another "
                    f"checkpoint or restore the file. Received: size={size} {entry.algorithm}={digest[:16]}..., "
                    f"expected size={entry.size} {entry.algorithm}={entry.digest[:16]}..."
                )
            if progress is not None:
                progress(entry.size)

    # -- uploads, watching, cleanup ---------------------------------------------------------
    def snapshot(self, manifest: Manifest) -> Path:
        folder = self.index / "uploads" / _names.temp(TMP)
        dest = folder / manifest.name
        folder.mkdir(parents=True)
        if manifest.layout == "file":
            _fs.link_or_copy(self.entry_path(manifest.name), dest)
        else:
            for entry in manifest.files:
                (dest / entry.path).parent.mkdir(parents=True, exist_ok=True)
                _fs.link_or_copy(self.file_path(manifest, entry), dest / entry.path)
            (dest / MANIFEST).write_bytes(manifest.to_json())
        return dest

    def release(self, snapshot: Path) -> None:
        folder = snapshot.parent
        if folder.parent != self.index / "uploads" or not folder.name.startswith(TMP):
            raise ValueError(f"{snapshot} is not an upload snapshot of {self.root}. Received: {snapshot}")
        shutil.rmtree(folder)

    def watch(self, poll_interval: float = 0.5, records: Sequence[str] = ()) -> Watch:
        folders = [self.root, self.index, *(self.index.joinpath(*p.split("/")) for p in records)]
        return FolderWatch(folders, poll_interval)

    def remove_if_empty(self) -> None:
        if self.index.is_dir():
            with self._records_locked():  # no writer creates a record meanwhile
                for dirpath, _dirs, _files in os.walk(self.index, topdown=False):
                    if Path(dirpath) != self.index:
                        with contextlib.suppress(OSError):  # a folder with records stays
                            os.rmdir(dirpath)
            if [p.name for p in self.index.iterdir()] == [_names.LOCK]:
                (self.index / _names.LOCK).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.index.rmdir()
        if self.root.is_dir() and not any(self.root.iterdir()):
            self.root.rmdir()
            _fs.fsync_dir(self.root.parent)


def _identity(m: Manifest) -> tuple[object, ...]:
    """What tells one commit of a name from another (a re-save has another time and usually other sizes)."""
    return m.created, tuple((f.path, f.size) for f in m.files)


def _gone_error(manifest: Manifest, root: Path) -> CheckpointNotFoundError:
    return CheckpointNotFoundError(
        f"Checkpoint {manifest.name} in {root} was deleted or saved again while it was read (retention or a "
        "new save), so it is gone, not damaged. List the folder again. Received: a vanished checkpoint")
