"""Staged entries and readers of the object-store backend.

Writing: a folder checkpoint's files are uploaded by :meth:`ObjectStaged.write` as they come (streamed,
hashed on the way) to keys that no committed manifest references; a framework's own writer (``.keras``,
``.h5``) writes a local temporary file, uploaded at commit.

Reading goes through a *verified local cache*: each file is downloaded once per process (streamed,
hashed on the way), kept only if its digest is the manifest's, and memory-mapped from local disk. A file
that differs raises :class:`~keepbest.errors.CorruptCheckpointError` naming its URL. The cache is a
temporary folder removed when the process exits (``KEEPBEST_CACHE_DIR`` chooses another place). It holds
at most ``KEEPBEST_CACHE_BYTES`` (default 4 GiB) beyond the checkpoint being read: the least recently
used files go first, so a sidecar that evaluates checkpoints for days does not fill the disk (a file
removed while mapped stays readable through its mapping).
"""

from __future__ import annotations

import atexit
import builtins
import errno
import mmap
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from keepbest.errors import CorruptCheckpointError, StorageError
from keepbest.manifest import FileEntry, Manifest
from keepbest.store import _fs
from keepbest.store._object_io import PART, Bucket
from keepbest.store.base import Reader, Staged

_CACHE: Path | None = None
_CACHE_LOCK = threading.Lock()
_LRU: "OrderedDict[Path, int]" = OrderedDict()  # cached files, least recently used first -> size
DEFAULT_CACHE_BYTES = 4 << 30


def _folder(kind: str) -> Path:
    """The folder ``kind`` of the process's cache, made on first use."""
    global _CACHE
    with _CACHE_LOCK:
        if _CACHE is None:
            chosen = os.environ.get("KEEPBEST_CACHE_DIR")
            if chosen:
                os.makedirs(chosen, exist_ok=True)
                _CACHE = Path(tempfile.mkdtemp(prefix="keepbest-", dir=chosen))
            else:
                _CACHE = Path(tempfile.mkdtemp(prefix="keepbest-cache-"))
            atexit.register(shutil.rmtree, _CACHE, True)
        folder = _CACHE / kind
        folder.mkdir(exist_ok=True)
    return folder


def scratch(kind: str) -> Path:
    """A fresh local folder under the process's cache (``kind``: what it is for)."""
    return Path(tempfile.mkdtemp(dir=_folder(kind)))


def file_pieces(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(PART):
            yield chunk


class ObjectStaged(Staged):
    """A checkpoint being written to an object store; the writer holds the name's commit lock.

    ``store`` is the :class:`keepbest.store.object.ObjectStore` (typed loosely: that module imports this one).
    """

    def __init__(self, store: Any, name: str, layout: str, lock: tuple[str, str],
                 files_under: str, previous: tuple[Manifest, str] | None) -> None:
        self.store, self.name, self.layout = store, name, layout
        self.lock = lock  # (record key, ETag)
        self.files_under = files_under
        self.previous = previous  # the committed manifest of this name and its ETag, if any
        self.written: list[FileEntry] = []
        self.intent: Manifest | None = None  # a Keras file's manifest, recorded in the lock before its upload completes
        self.shared = False  # other processes write into it too (handle() was given out)
        self.joined = False  # this process writes into another's staged entry
        self._local: Path | None = None

    def data_key(self, rel: str) -> str:
        """The key of file ``rel`` of this checkpoint, relative to the store's prefix."""
        return self.store.data_key(self.name, self.layout, self.files_under, rel)

    def local_path(self) -> Path:
        if self._local is None:
            folder = scratch("staged")
            self._local = folder / self.name
            if self.layout == "dir":
                self._local.mkdir()
        return self._local

    def write(self, rel: str, data: bytes | Sequence[memoryview], digest: str | None = None) -> FileEntry:
        pieces = [memoryview(data)] if isinstance(data, (bytes, bytearray, memoryview)) else builtins.list(data)
        if self.layout != "dir":
            if rel != self.name:
                raise ValueError(f"Staged file checkpoint {self.name} has no files inside; write local_path() or "
                                 f"write({self.name!r}, ...). Received: rel={rel!r}")
            size, computed = _fs.write_pieces(self.local_path(), pieces, digest)  # uploaded at commit
            return FileEntry(path=rel, size=size, digest=computed)
        if self.joined and self.store.bucket.head(self.lock[0]) is None:
            raise StorageError(errno.ENOENT, f"Cannot write {rel} of checkpoint {self.store.where(self.name)}: the "
                               "process that staged it gave up this save (its commit lock is gone). Nothing was "
                               f"committed. Received: rel={rel!r}", self.store.where(self.name))
        size, computed = self.store.bucket.upload(self.data_key(rel), pieces, digest=digest)
        entry = FileEntry(path=rel, size=size, digest=computed)
        self.written.append(entry)
        return entry

    def link(self, rel: str, base: Manifest, entry: FileEntry) -> bool:
        return False  # an object store cannot share one object between two checkpoints without a copy

    def free_bytes(self) -> int | None:
        return None

    def handle(self) -> dict[str, Any]:
        self.shared = True
        return {"name": self.name, "layout": self.layout, "files_under": self.files_under, "lock": list(self.lock)}

    def local_files(self) -> list[tuple[str, Path]]:
        """Files a framework wrote into :meth:`local_path` (relative name, path)."""
        if self._local is None or not self._local.exists():
            return []
        if self.layout == "file":
            return [(self.name, self._local)]
        return sorted((p.relative_to(self._local).as_posix(), p) for p in self._local.rglob("*") if p.is_file())

    def cleanup(self) -> None:
        if self._local is not None:
            shutil.rmtree(self._local.parent, ignore_errors=True)
            self._local = None


class ObjectReader(Reader):
    """Reads a committed checkpoint of an object store through the verified local cache."""

    def __init__(self, store: Any, manifest: Manifest) -> None:
        self.store, self.manifest = store, manifest
        self._fetched: set[Path] = set()  # never evicted for another file of this checkpoint

    def _entry(self, rel: str) -> FileEntry:
        for f in self.manifest.files:
            if f.path == rel:
                return f
        raise CorruptCheckpointError(
            f"Checkpoint {self.manifest.name} has no file {rel} in its manifest ({self.where()}). Load another "
            f"checkpoint. Received: {rel!r}")

    def _key(self, rel: str) -> str:
        m = self.manifest
        return self.store.data_key(m.name, m.layout, m.files_under, rel)

    def fetch(self, rel: str) -> Path:
        """File ``rel`` in the local cache, downloaded (and verified) if it is not there yet."""
        entry = self._entry(rel)
        path = cached(self.store.bucket, self._key(rel), entry, lambda: self.store.gone(self.manifest),
                      keep=self._fetched)
        self._fetched.add(path)
        return path

    def buffer(self, rel: str, private: bool = False) -> Any:
        with open(self.fetch(rel), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if not size:
                return bytearray() if private else b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY if private else mmap.ACCESS_READ)

    def read_range(self, rel: str, offset: int, length: int) -> bytes:
        return self.store.bucket.read_range(self._key(rel), offset, length)

    def local_path(self) -> Path:
        """The checkpoint under its own name, as symbolic links into the cache (made afresh each call)."""
        view = scratch("views") / self.manifest.name
        if self.manifest.layout == "file":
            view.symlink_to(self.fetch(self.manifest.name))
        else:
            for f in self.manifest.files:
                (view / f.path).parent.mkdir(parents=True, exist_ok=True)
                (view / f.path).symlink_to(self.fetch(f.path))
            (view / "manifest.json").write_bytes(self.manifest.to_json())
        return view

    def where(self, rel: str | None = None) -> str:
        if rel is None:
            return self.store.where(self.manifest.name)
        return self.store.bucket.where(self._key(rel))


_FETCHING: dict[str, threading.Lock] = {}


def cached(bucket: Bucket, key: str, entry: FileEntry, gone: Callable[[], bool], keep: Iterable[Path] = ()
           ) -> Path:
    """The verified local copy of object ``key`` (``entry`` says what it must hold); ``keep``: files that
    must stay cached (the rest of the checkpoint being read)."""
    path = _cache_dir() / f"{entry.algorithm}-{entry.digest}"
    with _CACHE_LOCK:
        lock = _FETCHING.setdefault(str(path), threading.Lock())
    with lock:
        if path.is_file():
            _used(path, entry.size, keep)
            return path
        tmp = path.with_name(f"{path.name}.{os.urandom(4).hex()}.part")
        try:
            with open(tmp, "wb") as f:
                try:
                    size, digest = bucket.download(key, f, entry.algorithm)
                except FileNotFoundError:
                    raise missing(bucket, key, gone) from None
            if (size, digest) != (entry.size, entry.digest):
                if gone():
                    raise missing(bucket, key, gone)
                raise CorruptCheckpointError(
                    f"Checkpoint file {bucket.where(key)} does not match its manifest (it was truncated or "
                    "modified after it was committed). Load another checkpoint or restore the object. "
                    f"Received: size={size} {entry.algorithm}={digest[:16]}..., expected size={entry.size} "
                    f"{entry.algorithm}={entry.digest[:16]}...")
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        _used(path, entry.size, keep)
    return path


def _used(path: Path, size: int, keep: Iterable[Path]) -> None:
    """Marks ``path`` just used, then removes the least recently used files beyond the cache's budget."""
    budget = int(os.environ.get("KEEPBEST_CACHE_BYTES") or DEFAULT_CACHE_BYTES)
    spared = {path, *keep}
    with _CACHE_LOCK:
        _LRU[path] = size
        _LRU.move_to_end(path)
        total = sum(_LRU.values())
        for old in list(_LRU):
            if total <= budget:
                break
            if old not in spared:
                total -= _LRU.pop(old)
                old.unlink(missing_ok=True)


def missing(bucket: Bucket, key: str, gone: Callable[[], bool]) -> Exception:
    from keepbest.errors import CheckpointNotFoundError

    if gone():
        return CheckpointNotFoundError(
            f"Checkpoint file {bucket.where(key)} was deleted or saved again while it was read (retention or a "
            "new save), so the checkpoint is gone, not damaged. List the folder again. Received: a vanished "
            "checkpoint")
    return CorruptCheckpointError(
        f"Checkpoint file {bucket.where(key)} is missing although its manifest lists it. Restore it from a copy "
        "or delete the checkpoint. Received: missing object")


def _cache_dir() -> Path:
    return _folder("objects")


def link(source: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)
