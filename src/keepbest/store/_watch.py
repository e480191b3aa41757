"""Waiting for a folder to change: inotify on Linux, a short poll elsewhere."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import sys
from pathlib import Path
from typing import Sequence

from keepbest.store.base import Watch

_IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x8, 0x40, 0x80, 0x100, 0x200
_MASK = _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE

_libc = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.inotify_init1.argtypes = [ctypes.c_int]
        _libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        _libc = None


class FolderWatch(Watch):
    """Blocks until something is created, renamed or removed in one of ``folders``, or a timeout.

    Uses inotify where available (``uses_events``); otherwise, and for a folder
    that does not exist yet, waits at most ``poll_interval`` before returning,
    so callers simply look again. Either way a change is noticed well within
    a second.
    """

    def __init__(self, folders: Sequence[Path], poll_interval: float = 0.5) -> None:
        self.folders = list(folders)
        self.poll_interval = poll_interval
        self._fd = -1
        self._watched: set[Path] = set()
        if _libc is not None:
            fd = _libc.inotify_init1(os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
            self._fd = fd if fd >= 0 else -1  # out of inotify instances: poll

    @property
    def uses_events(self) -> bool:
        return self._fd >= 0

    def _add_missing(self) -> bool:
        """Adds watches for folders that exist now; True when every folder is watched."""
        for folder in self.folders:
            if folder not in self._watched and _libc is not None and folder.is_dir():
                if _libc.inotify_add_watch(self._fd, os.fsencode(folder), _MASK) >= 0:
                    self._watched.add(folder)
        return len(self._watched) == len(self.folders)

    def wait(self, timeout: float) -> bool:
        """Always True: events can be missed (a folder made meanwhile), so callers look again."""
        if self._fd < 0:
            select.select([], [], [], min(timeout, self.poll_interval))
            return True
        complete = self._add_missing()
        ready, _, _ = select.select([self._fd], [], [], timeout if complete else min(timeout, self.poll_interval))
        if ready:
            try:
                while os.read(self._fd, 65536):
                    pass
            except BlockingIOError:
                pass
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
