"""The README's Python examples run as written, so the documentation cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(tmp_path, index, request):
    if "s3://kbest/" in BLOCKS[index]:  # an object-store example: it runs against the test S3 server
        request.getfixturevalue("s3")
    result = subprocess.run([sys.executable, "-c", BLOCKS[index]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONWARNINGS": "error::UserWarning"})
    assert result.returncode == 0, result.stderr[-3000:]
