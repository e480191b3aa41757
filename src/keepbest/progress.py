"""Progress bars for long operations (``verify``, ``export``, uploads, a sidecar's backlog).

A bar is drawn with ``rich`` on standard error when standard error is a
terminal, and is silent otherwise (a pipe, a log file, ``--json``, CI), so
nothing a script parses ever changes. ``KEEPBEST_PROGRESS=0`` turns bars
off, ``KEEPBEST_PROGRESS=1`` turns them on even without a terminal. Without
``rich`` installed (it comes with Keras) bars are silent too.

Example:
    >>> with bar("hashing", total=3, unit="files", enabled=False) as p:
    ...     for _ in range(3):
    ...         p.advance(1)
    >>> p.done, p.shown
    (3, False)
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any, TextIO


def wanted(stream: TextIO | None = None) -> bool:
    """Whether bars are drawn: ``KEEPBEST_PROGRESS`` if set, else whether ``stream`` (stderr) is a terminal."""
    setting = os.environ.get("KEEPBEST_PROGRESS", "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Bar:
    """One progress bar; use :func:`bar` to make one. ``advance`` is cheap when the bar is silent."""

    def __init__(self, description: str, total: float | None, unit: str, enabled: bool | None,
                 stream: TextIO | None) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.done = 0.0 if unit == "bytes" else 0
        self._rich: Any = None
        self._task: Any = None
        stream = sys.stderr if stream is None else stream
        if enabled if enabled is not None else wanted(stream):
            self._start(stream)

    @property
    def shown(self) -> bool:
        return self._rich is not None

    def _start(self, stream: TextIO) -> None:
        try:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeRemainingColumn, TransferSpeedColumn)
        except ImportError:  # rich comes with Keras; without it the operation simply runs without a bar
            return
        amount = [DownloadColumn(), TransferSpeedColumn()] if self.unit == "bytes" else [MofNCompleteColumn()]
        self._rich = Progress(TextColumn("{task.description}"), BarColumn(), *amount, TimeRemainingColumn(),
                              console=Console(file=stream, force_terminal=True), transient=True,
                              redirect_stdout=False, redirect_stderr=False)  # never capture others' output
        self._rich.start()
        self._task = self._rich.add_task(self.description, total=self.total)

    def advance(self, n: float = 1) -> None:
        self.done += n  # type: ignore[assignment]
        if self._rich is not None:
            self._rich.update(self._task, advance=n)

    def set_total(self, total: float | None) -> None:
        """Changes the amount the bar counts up to (more work arrived)."""
        self.total = total
        if self._rich is not None:
            self._rich.update(self._task, total=total)

    def describe(self, description: str) -> None:
        """Changes the text beside the bar (e.g. the checkpoint being hashed)."""
        self.description = description
        if self._rich is not None:
            self._rich.update(self._task, description=description)

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def bar(description: str, total: float | None = None, *, unit: str = "bytes", enabled: bool | None = None,
        stream: TextIO | None = None) -> Bar:
    """A progress bar of ``total`` ``unit`` ("bytes" shows sizes and speed; anything else counts items)."""
    return Bar(description, total, unit, enabled, stream)
