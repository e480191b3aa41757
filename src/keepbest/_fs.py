"""Small durable-filesystem primitives used by the local store."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import sys
from pathlib import Path

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
    tmp = path.with_name(f".keepbest-tmp-{owner_token()}-{os.urandom(4).hex()}-{path.name}")
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


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, Linux), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def owner_token() -> str:
    """Names this process in temp names: ``<pid>.<start time>`` (or ``<pid>`` where unknown).

    A restarted process often gets the same pid (pid 1 in a container); the
    start time tells its leftovers from the files of a live writer.
    """
    pid = os.getpid()
    start = _start_time(pid)
    return f"{pid}.{start}" if start else str(pid)


def owner_is_alive(token: str) -> bool:
    """Whether the writer named by ``token`` (from :func:`owner_token`) still runs.

    When liveness cannot be decided the answer is True: a live writer's files
    are never treated as leftovers.
    """
    pid_text, _, start = token.partition(".")
    pid = int(pid_text)
    if pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # PermissionError: it exists, owned by someone else; anything else: unknown
            pass
    return not start or _start_time(pid) in (None, start)


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
