#!/usr/bin/env python3
"""Sets up a virtual environment and runs the demo or the test suite.

    python3 scripts/dev.py demo     # set up, then run examples/demo.py (Keras)
    python3 scripts/dev.py demo torch       # ... examples/torch_demo.py (plain PyTorch)
    python3 scripts/dev.py demo lightning   # ... examples/lightning_demo.py
    python3 scripts/dev.py test     # set up, then run the suite on JAX and on torch
    python3 scripts/dev.py setup    # only set up

Needs nothing but Python 3.10+. It creates ``.venv``, installs ``uv`` into it
and installs the pinned dependencies from ``requirements/dev.lock``. torch is
installed as the CPU build only (a plain ``pip install torch`` on Linux pulls
several GB of CUDA wheels): from a local wheel folder when the machine has one
(``KEEPBEST_TORCH_WHEELS``, default ``/opt/wheels``), else from PyTorch's CPU
index.

The lock is compiled with (torch and its CUDA wheels left out, see above)::

    uv pip compile pyproject.toml --extra dev --extra jax --universal --no-header \
        --python-version 3.10 -o requirements/dev.lock \
        --no-emit-package torch --no-emit-package triton  # and one for each cuda-*/nvidia-* name listed at its end
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
LOCK = ROOT / "requirements" / "dev.lock"
STAMP = VENV / ".keepbest-setup"
TORCH = "2.13.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Backends the suite runs on; the core tests are framework-free and run once.
BACKENDS = ("jax", "torch")


def run(cmd: list[str], **kw: object) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)  # type: ignore[arg-type]


def torch_source() -> list[str]:
    folder = Path(os.environ.get("KEEPBEST_TORCH_WHEELS", "/opt/wheels"))
    local = sorted(folder.glob(f"torch-{TORCH}+cpu-*.whl")) if folder.is_dir() else []
    if local:
        return ["--find-links", str(folder), f"torch=={TORCH}+cpu"]
    return ["--index-url", TORCH_CPU_INDEX, "--extra-index-url", "https://pypi.org/simple", f"torch=={TORCH}"]


def browser() -> None:
    """Installs Debian's ``chromium`` (the report tests render pages in it) where apt exists and it is missing.

    Not fatal: without it the browser tests skip, saying why; this prints why it could not be installed.
    """
    if shutil.which("chromium") or not shutil.which("apt-get"):
        if not shutil.which("chromium"):
            print("chromium is not installed and there is no apt-get here: the report's browser tests will skip. "
                  "Install a chromium package to run them.", flush=True)
        return
    sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if sudo is None:
        print("chromium is not installed and installing it needs root (no sudo here): the report's browser tests "
              "will skip. Run: apt-get install chromium", flush=True)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([*sudo, "apt-get", "update", "-q"], [*sudo, "apt-get", "install", "-y", "-q", "chromium"]):
        print("+", " ".join(cmd), flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"could not install chromium ({' '.join(cmd)} exited {done.returncode}: "
                  f"{done.stderr.strip()[-500:]}): the report's browser tests will skip.", flush=True)
            return


def setup() -> None:
    browser()
    want = hashlib.sha256(LOCK.read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text() == want:
        return
    t0 = time.time()
    if not PY.exists():
        run([sys.executable, "-m", "venv", VENV])
    env = {**os.environ, "UV_COMPILE_BYTECODE": "1", "VIRTUAL_ENV": str(VENV)}
    run([PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "uv>=0.4"])
    uv = [PY, "-m", "uv", "pip", "install", "--python", PY, "--quiet"]
    # torch first: Lightning needs it, and the lock leaves it (and its CUDA wheels) out, so that the
    # installed CPU build satisfies it instead of a GB-sized download from the registry.
    run([*uv, *torch_source()], env=env)
    run([*uv, "-r", LOCK], env=env)
    run([*uv, "--no-deps", "-e", ROOT], env=env)
    STAMP.write_text(want)
    print(f"set-up done in {time.time() - t0:.0f} s", flush=True)


def framework_env(backend: str) -> dict[str, str]:
    return {
        **os.environ,
        "KERAS_BACKEND": backend,
        # The machine-wide keras.json may name another backend; keep Keras's files in the project.
        "KERAS_HOME": str(ROOT / ".keras_home"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def test(extra: list[str]) -> int:
    setup()
    failures = 0
    for i, backend in enumerate(BACKENDS):
        # The first pass runs everything; later passes only what depends on the backend.
        # The SIGKILL test runs its full count (40 kills) once; later backends get a shorter run.
        paths = ["tests"] if i == 0 else ["tests/keras"]
        env = framework_env(backend)
        if i > 0:
            env.setdefault("KEEPBEST_KILLS", "4")
        print(f"\n=== tests on the {backend} backend: {' '.join(paths)} ===", flush=True)
        rc = subprocess.run([str(PY), "-m", "pytest", *paths, *extra], cwd=ROOT, env=env).returncode
        failures += rc != 0
    print(f"\n{'all backends passed' if not failures else f'{failures} backend run(s) failed'}"
          f" ({', '.join(BACKENDS)})", flush=True)
    return 1 if failures else 0


DEMOS = {"keras": "examples/demo.py", "torch": "examples/torch_demo.py", "lightning": "examples/lightning_demo.py"}


def demo(extra: list[str]) -> int:
    setup()
    which = extra.pop(0) if extra and extra[0] in DEMOS else "keras"
    return subprocess.run([str(PY), DEMOS[which], *extra], cwd=ROOT, env=framework_env("jax")).returncode


def main() -> int:
    cmd, extra = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if cmd == "setup":
        setup()
        return 0
    if cmd == "test":
        return test(extra)
    if cmd == "demo":
        return demo(extra)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
