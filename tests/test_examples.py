"""Scripts outside the package (the demo, the benchmark) import only names that exist."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [ROOT / "examples" / "demo.py", ROOT / "examples" / "multiprocess.py",
           ROOT / "benchmarks" / "checkpoint_speed.py", ROOT / "benchmarks" / "s3_speed.py",
           ROOT / "benchmarks" / "multiprocess_speed.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_keepbest_name_a_script_imports_exists(script):
    missing = []
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keepbest"):
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)
                        and importlib.util.find_spec(f"{node.module}.{a.name}") is None]
    assert missing == []
