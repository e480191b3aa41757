"""The package ships py.typed, so its annotations must hold: mypy over src/ finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "keepbest"


def test_package_is_type_clean():
    result = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-error-summary",
                             "--cache-dir", "/dev/null", str(SRC)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_py_typed_marker_is_shipped():
    assert (SRC / "py.typed").is_file()
