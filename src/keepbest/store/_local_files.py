"""Staged entries and readers of the local backend: temporary siblings written with fsync, committed
files read through memory maps."""

from __future__ import annotations

import builtins
import errno
import mmap
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from keepbest.errors import StorageError
from keepbest.manifest import FileEntry, Manifest
from keepbest.store import _fs, _names
from keepbest.store.base import Listing, Reader, Staged


class LocalFolder:
    """Where things are in a local checkpoint folder ``root``: entries, their files, the index."""

    root: Path

    @property
    def index(self) -> Path:
        return self.root / _names.INDEX

    def entry_path(self, name: str) -> Path:
        return self.root / name

    def file_path(self, manifest: Manifest, entry: FileEntry | str) -> Path:
        rel = entry if isinstance(entry, str) else entry.path
        base = self.root / manifest.name if manifest.layout == "dir" else self.root
        return base / rel

    def _manifest_path(self, name: str) -> Path:
        return self.index / _names.manifest_file(name)

    def list(self) -> Listing:
        raise NotImplementedError


class LocalStaged(Staged):
    """A staged entry of :class:`LocalStore`: a temporary sibling of the final name."""

    def __init__(self, store: LocalFolder, name: str, layout: str, path: Path, joined: bool = False) -> None:
        self.store, self.name, self.layout, self.path = store, name, layout, path
        self.joined = joined  # another process staged it: never recreate it once that process removed it

    def local_path(self) -> Path:
        return self.path

    def _dest(self, rel: str) -> Path:
        if self.layout != "dir":
            if rel == self.name:  # the one file of a file checkpoint
                return self.path
            raise ValueError(f"Staged file checkpoint {self.name} has no files inside; write local_path() or "
                             f"write({self.name!r}, ...). Received: rel={rel!r}")
        if self.joined and not self.path.is_dir():
            raise StorageError(errno.ENOENT, f"Cannot write {rel} into staged checkpoint {self.path}: it is gone (the "
                               "process that staged it gave up this save). Nothing was committed. "
                               f"Received: rel={rel!r}", str(self.path))
        dest = self.path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        return dest

    def write(self, rel: str, data: bytes | Sequence[memoryview], digest: str | None = None) -> FileEntry:
        pieces = [memoryview(data)] if isinstance(data, (bytes, bytearray, memoryview)) else builtins.list(data)
        size, digest = _fs.write_pieces(self._dest(rel), pieces, digest)
        return FileEntry(path=rel, size=size, digest=digest)

    def link(self, rel: str, base: Manifest, entry: FileEntry) -> bool:
        source = self.store.file_path(base, entry)
        try:
            intact = _fs.digest_file(source, entry.algorithm) == (entry.size, entry.digest)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return intact and _fs.hard_link(source, self._dest(rel))

    def free_bytes(self) -> int | None:
        return shutil.disk_usage(self.path.parent).free

    def handle(self) -> dict[str, Any]:
        return {"name": self.name, "layout": self.layout, "path": str(self.path)}


class LocalReader(Reader):
    """Reads a committed checkpoint of :class:`LocalStore` (files memory-mapped)."""

    def __init__(self, store: LocalFolder, manifest: Manifest) -> None:
        self.store, self.manifest = store, manifest

    def _path(self, rel: str) -> Path:
        return self.store.file_path(self.manifest, rel)

    def buffer(self, rel: str, private: bool = False) -> Any:
        with open(self._path(rel), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not size:
                return bytearray() if private else b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if private else mmap.ACCESS_READ)

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        with open(self._path(rel), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def local_path(self) -> Path:
        return self.store.entry_path(self.manifest.name)

    def where(self, rel: str | None = None) -> str:
        return str(self.local_path() if rel is None else self._path(rel))


def local_staged(staged: Staged) -> LocalStaged:
    if not isinstance(staged, LocalStaged):
        raise TypeError(f"A LocalStore commits only what it staged. Received: {staged!r}")
    return staged
