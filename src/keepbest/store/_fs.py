"""Durable-filesystem primitives of the local backend: fsync, atomic replace and exchange, hashing files."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

from keepbest import _digest
from keepbest.store import _names

_WRITE_BYTES = 64 << 20  # one write() call; well under Linux's 2 GiB cap per call
_PARALLEL_HASH_BYTES = 4 << 20  # below this a hashing thread costs more than it saves
_CHUNK = 8 << 20


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Makes a rename or unlink inside ``path`` durable (no-op where unsupported)."""
    if sys.platform == "win32":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsyncs every file and folder under ``path`` (a file or a folder)."""
    if path.is_dir():
        for dirpath, _dirs, files in os.walk(path):
            for f in files:
                fsync_file(Path(dirpath) / f)
            fsync_dir(Path(dirpath))
    else:
        fsync_file(path)


def write_durably(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically: temp sibling, fsync, replace, fsync parent."""
    tmp = path.with_name(_names.temp(_names.TMP) + ".json")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove(path: Path) -> None:
    """Removes a file, a link or a whole folder; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def digest_file(path: str | os.PathLike[str], algorithm: str = _digest.DEFAULT) -> tuple[int, str]:
    """Size in bytes and hex digest of the file at ``path``."""
    h = _digest.new(algorithm, threads=True)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if algorithm == "blake3" and size > _CHUNK:
            h.update_mmap(path)  # mapped and hashed on all cores, without the GIL
            # the size hashed is the size mapped: a file that changed in between fails the comparison
            return size, h.hexdigest()
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return size, h.hexdigest()


def write_pieces(path: Path, pieces: Sequence[memoryview], digest: str | None = None) -> tuple[int, str]:
    """Writes ``pieces`` one after the other into the new file ``path``; returns (size, BLAKE3 digest).

    Without a known ``digest`` it is computed from the same memory as the
    write, on a second thread while the write proceeds, so the file is never
    read back and hashing costs no wall time. The caller owns fsync and the
    atomic rename.
    """
    size = sum(p.nbytes for p in pieces)
    h = _digest.new() if digest is None else None
    hashing = threading.Thread(target=_hash_all, args=(h, pieces), name="keepbest-hash") \
        if h is not None and size >= _PARALLEL_HASH_BYTES else None
    if h is not None and hashing is None:
        _hash_all(h, pieces)
    elif hashing is not None:
        hashing.start()  # BLAKE3 releases the GIL, so it runs beside the writes
    try:
        with open(path, "wb", buffering=0) as f:
            for piece in pieces:
                for begin in range(0, piece.nbytes, _WRITE_BYTES):
                    _write_all(f, piece[begin : begin + _WRITE_BYTES])
    finally:
        if hashing is not None:
            hashing.join()
    return size, str(h.hexdigest()) if h is not None else str(digest)


def _hash_all(h: Any, pieces: Sequence[memoryview]) -> None:
    for piece in pieces:
        h.update(piece)


def _write_all(f: Any, view: memoryview) -> None:
    while view.nbytes:
        written = f.write(view)
        view = view[written:]


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _renameat2 = _libc.renameat2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (OSError, AttributeError):  # old glibc: the two-rename fallback is used
        _renameat2 = None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swaps two paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False when the platform or filesystem cannot do it, so the caller
    falls back to two renames with crash recovery.
    """
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOENT)


def hard_link(source: Path, dest: Path) -> bool:
    """Hard-links a committed, never-modified file; False where the filesystem cannot (the caller writes it)."""
    try:
        os.link(source, dest)
    except OSError as e:
        if e.errno in _NO_LINK:
            return False
        raise
    return True


def link_or_copy(source: Path, dest: Path) -> None:
    if not hard_link(source, dest):  # a filesystem without hard links: a copy is the same bytes
        shutil.copy2(source, dest)
