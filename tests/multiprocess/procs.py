"""Real local process groups for the multi-process tests: N children of one script, a free port, outputs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Group:
    """N children started together; each one's output goes to a file (so a pipe never blocks it)."""

    children: list[subprocess.Popen]
    logs: list[Path]

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def wait(self, timeout: float) -> list[int]:
        """Exit codes of every child; kills all and fails with their output after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        codes = []
        for rank, child in enumerate(self.children):
            try:
                codes.append(child.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"process {rank} still ran after {timeout} s:\n" + self.report()) from None
        return codes

    def kill(self) -> None:
        for child in self.children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()

    def report(self) -> str:
        return "\n".join(f"--- process {r} (exit {c.poll()}) ---\n{self.output(r)[-3000:]}"
                         for r, c in enumerate(self.children))

    def check(self, timeout: float) -> None:
        codes = self.wait(timeout)
        assert codes == [0] * len(codes), self.report()


def start(script: str, n: int, args: Sequence[str], folder: Path, env: dict[str, str] | None = None) -> Group:
    """Starts ``python -m tests.multiprocess.<script> --rank r --world n --port P <args>`` for r < n."""
    port = free_port()
    children, logs = [], []
    folder.mkdir(parents=True, exist_ok=True)
    for rank in range(n):
        log = folder / f"{script}-{rank}-{time.monotonic_ns()}.log"
        with open(log, "wb") as out:
            children.append(subprocess.Popen(
                [sys.executable, "-u", "-m", f"tests.multiprocess.{script}", "--rank", str(rank), "--world", str(n),
                 "--port", str(port), *args],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}))
        logs.append(log)
    return Group(children, logs)


def child_main(main: Callable[[], None]) -> None:
    """Runs a child's ``main``; on an error, prints it and exits 1 at once.

    At once: JAX's exit handler waits for every process at a shutdown barrier (``shutdown_timeout_seconds``)
    and then aborts when one is dead, so a job that lost a process ends here, as a launcher would end it.
    """
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        if "jax" in sys.modules:
            os._exit(1)
        sys.exit(1)
