"""Scripts outside the package (the demos, the benchmarks) import only names that exist; the PyTorch and
Lightning demos run to the end (each checks its own exact resume)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [ROOT / "examples" / "demo.py", ROOT / "examples" / "multiprocess.py",
           ROOT / "examples" / "torch_demo.py", ROOT / "examples" / "lightning_demo.py",
           ROOT / "benchmarks" / "checkpoint_speed.py", ROOT / "benchmarks" / "s3_speed.py",
           ROOT / "benchmarks" / "multiprocess_speed.py", ROOT / "benchmarks" / "torch_speed.py",
           ROOT / "benchmarks" / "sidecar_latency.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_keepbest_name_a_script_imports_exists(script):
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keepbest"):
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                        and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert missing == []


@pytest.mark.slow
@pytest.mark.parametrize("script, args, expected", [
    ("torch_demo.py", ["--epochs", "2"], "largest difference 0.0e+00"),
    ("lightning_demo.py", ["--epochs", "4"], "largest difference 0.0e+00"),
])
def test_demo_runs_to_the_end(tmp_path, script, args, expected):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert expected in result.stdout and "keepbest ls" in result.stdout


@pytest.mark.slow
def test_keras_demo_runs_and_its_folder_lists_in_80_columns_with_a_report(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--epochs", "3"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    listed = subprocess.run([sys.executable, "-m", "keepbest.cli", "ls", "demo_checkpoints"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
    lines = listed.stdout.splitlines()
    assert listed.returncode == 0 and len(lines) == 4, listed.stdout + listed.stderr
    assert max(len(line) for line in lines) <= 80, listed.stdout
    page = (tmp_path / "demo_checkpoints-report.html").read_text()
    assert 'id="metric-curve"' in page and 'id="best-marker"' in page
