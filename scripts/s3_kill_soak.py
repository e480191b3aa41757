#!/usr/bin/env python3
"""Runs the S3 SIGKILL harness for a long count and prints what it found.

    python3 scripts/s3_kill_soak.py [--kills 200] [--seed N] [--parallel 2]

Starts its own S3 server (moto's, on 127.0.0.1, as the tests do), then each kill is a saving process
(``tests/store/s3_kill_child.py``: a series under retention, a re-saved ``best`` folder and ``best.bin``
file, some uploaded in several parts) that SIGKILLs itself before a random request number, counted by a botocore hook;
the harness (``tests/store/s3_kill_harness.py``) then checks the prefix as the next run would. Prints the
counts (previous bests lost, partial checkpoints visible, orphans left after gc, failures), the checkpoints
a reader saw damaged before gc ran (pending: gc rolls them forward or back), and the figures: the request
numbers killed at, the kinds of request, what was being saved. Exit status 1 if a count is not zero. Needs
``moto[server]`` and ``keepbest[s3]`` (``python3 scripts/dev.py setup`` then ``.venv/bin/python``).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=200, help="children killed (default 200)")
    p.add_argument("--seed", type=int, default=random.SystemRandom().randrange(10**6))
    p.add_argument("--parallel", type=int, default=2, help="children at a time (default 2)")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.s3 import S3Server
    from tests.store.s3_kill_harness import run

    print(f"S3 kill soak: {a.kills} kills, {a.parallel} at a time, seed {a.seed}", flush=True)
    started = time.monotonic()

    def progress(summary) -> None:  # type: ignore[no-untyped-def]
        if summary.trials % 10 == 0:
            print(f"  {summary.trials} trials, {summary.kills} kills, {time.monotonic() - started:.0f} s: "
                  f"lost {summary.lost}, partial {summary.partial}, orphans {summary.orphans}, "
                  f"failed {summary.failed}", flush=True)

    server = S3Server()
    try:
        summary = run(server, a.kills, a.seed, parallel=a.parallel, progress=progress)
    finally:
        server.stop()
    print(summary.line())
    print(summary.figures())
    for problem in summary.problems:
        print(f"  {problem}")
    print(f"wall time {time.monotonic() - started:.0f} s")
    return 1 if summary.lost or summary.partial or summary.orphans or summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
