"""Records of the local backend: JSON files under ``.keepbest/``, replaced atomically, compared under a lock.

Compare-and-swap holds an ``flock`` on ``.keepbest/.keepbest-records.lock`` for the compare and the
replace (a thread lock where ``fcntl`` is missing). A record's token is a digest of its bytes.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Iterator

from keepbest import _digest
from keepbest.store import _fs, _names
from keepbest.store._local_files import LocalFolder
from keepbest.store._names import RESERVED
from keepbest.store.base import ANY, Record, RecordConflictError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: compare-and-swap is per process there
    fcntl = None  # type: ignore[assignment]

_THREAD_LOCK = threading.Lock()


class LocalRecords(LocalFolder):
    """The record half of :class:`keepbest.store.local.LocalStore`."""

    def record_key(self, *parts: str) -> str:
        return "/".join(_names.component(p) for p in parts)

    def _record_path(self, key: str) -> Path:
        *folders, last = key.split("/")
        return self.index.joinpath(*folders, last + ".json")

    def read_record(self, key: str) -> Record | None:
        path = self._record_path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return Record(key, data, _token(data))

    @contextlib.contextmanager
    def _records_locked(self) -> Iterator[None]:
        self.index.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover - Windows
            with _THREAD_LOCK:
                yield
            return
        with open(self.index / _names.LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _check_expected(self, key: str, path: Path, expect: str | None) -> None:
        if expect == ANY:
            return
        try:
            now: str | None = _token(path.read_bytes())
        except FileNotFoundError:
            now = None
        if now != expect:
            raise RecordConflictError(
                f"Record {key} in {self.root} changed since it was read (another writer updated it). "
                f"Read it again and retry. Received: expected={expect}, found={now}")

    def write_record(self, key: str, data: bytes, *, expect: str | None = ANY) -> str:
        path = self._record_path(key)
        with self._records_locked():
            self._check_expected(key, path, expect)
            path.parent.mkdir(parents=True, exist_ok=True)
            _fs.write_durably(path, data)
        return _token(data)

    def delete_record(self, key: str, *, expect: str | None = ANY) -> None:
        path = self._record_path(key)
        if expect == ANY and not path.exists():
            return
        with self._records_locked():
            self._check_expected(key, path, expect)
            path.unlink(missing_ok=True)
            _fs.fsync_dir(path.parent)

    def list_records(self, prefix: str) -> builtins.list[str]:
        folder = self.index.joinpath(*prefix.split("/"))
        if not folder.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(folder):
            rel = Path(dirpath).relative_to(self.index).as_posix()
            keys += [f"{rel}/{f[: -len('.json')]}" for f in files
                     if f.endswith(".json") and not f.startswith(RESERVED)]
        return sorted(keys)

    def set_aside(self, key: str) -> str | None:
        aside = f"damaged/{key}-{time.strftime('%Y%m%dT%H%M%S')}-{os.urandom(2).hex()}"
        dest = self._record_path(aside)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(self._record_path(key), dest)
        except FileNotFoundError:
            return None
        _fs.fsync_dir(dest.parent)
        _fs.fsync_dir(self._record_path(key).parent)
        return aside

    def record_where(self, key: str) -> str:
        return str(self._record_path(key))


def _token(data: bytes) -> str:
    return _digest.of_bytes(data)[:32]
