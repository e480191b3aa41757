"""What every benchmark here measures the same way: sizes on the command line, wall time, clean-up, and the
disk's own limit (``dd`` with fsync) for the same bytes."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable


def parse_size(text: str) -> int:
    """``"10MB"`` -> 10_000_000 (KB, MB, GB are powers of 1000; a bare number is bytes)."""
    units = {"KB": 1e3, "MB": 1e6, "GB": 1e9}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def dd_seconds(target: Path, nbytes: int) -> float:
    """Seconds for ``dd if=/dev/zero bs=64M conv=fsync`` to write ``nbytes`` (rounded to 64 MiB blocks, then
    scaled back to ``nbytes``) at ``target``, which is removed afterwards."""
    count = max(1, round(nbytes / (64 << 20)))
    seconds = timed(lambda: subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=64M", f"count={count}", "conv=fsync"],
        check=True, capture_output=True))
    drop(target)
    return seconds * nbytes / (count * (64 << 20))
