"""Helpers shared by the test folders (their fixtures are in ``tests/conftest.py``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence


def flip_byte(path: Path, offset: int = -1, mask: int = 0xFF) -> None:
    """Corrupts one byte of ``path`` in place (the last one by default), keeping its size."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def token_of(pid: int, start: int | None = None) -> str:
    """The owner token a keepbest writer with ``pid`` on this host and PID namespace would write."""
    from keepbest.store import _names

    host, ns, _pid, _start = _names.owner_token().split(".")
    if start is None:
        start = _names._start_time(pid) or 0
    return f"{host}.{ns}.{pid}.{start}"


def spawn(cmd: Sequence[str], ready: Callable[[], object] | None = None, timeout: float = 120.0,
          what: str = "the child process", **popen_kwargs: Any) -> subprocess.Popen:
    """Starts ``subprocess.Popen(cmd, **popen_kwargs)`` and returns it once ``ready()`` is true.

    With ``ready=None`` it returns at once. If the child exits before it is ready, or ``timeout``
    seconds pass, the child is killed (its whole process group with ``start_new_session=True``)
    and the test fails with the end of the child's output: what it wrote to a pipe, or to the
    file passed as ``stdout``.
    """
    child = subprocess.Popen(list(cmd), **popen_kwargs)
    name = getattr(popen_kwargs.get("stdout"), "name", None)  # a file opened by the caller
    child.output_file = Path(name) if isinstance(name, str) else None  # type: ignore[attr-defined]
    child.own_group = bool(popen_kwargs.get("start_new_session"))  # type: ignore[attr-defined]
    if ready is not None:
        wait_until(child, ready, timeout, f"{what} never got ready")
    return child


def wait_until(child: subprocess.Popen, condition: Callable[[], object], timeout: float = 120.0,
               what: str = "the condition never held", interval: float = 0.02) -> None:
    """Waits, while ``child`` (started by ``spawn``) runs, until ``condition()`` is true; fails the
    test as ``spawn`` does if the child exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if child.poll() is not None and not condition():  # (it may have got there just before it exited)
            _fail(child, f"{what}: it exited first, with status {child.returncode}")
        if time.monotonic() > deadline:
            _fail(child, f"{what} within {timeout:g} s")
        time.sleep(interval)


def _fail(child: subprocess.Popen, why: str) -> NoReturn:
    import pytest

    if child.poll() is None:
        if getattr(child, "own_group", False):
            os.killpg(child.pid, signal.SIGKILL)
        else:
            child.kill()
    out, err = child.communicate()
    text = "".join(part.decode(errors="replace") if isinstance(part, bytes) else part for part in (out, err) if part)
    output_file = getattr(child, "output_file", None)
    if output_file is not None and output_file.exists():
        text += output_file.read_text(errors="replace")
    pytest.fail(f"{why} ({' '.join(map(str, child.args))}); its output ends with:\n{text[-3000:]}", pytrace=False)
