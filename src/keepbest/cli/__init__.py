"""The ``keepbest`` command: one module per group of commands, each with a ``register(sub)``.

Imports no framework; ``sidecar`` (and the Keras conversions of ``export``) import Keras only when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from keepbest._version import __version__
from keepbest.cli._common import OK, USAGE, UsageError
from keepbest.cli import _inspect, _listing, _maintenance, _report, _sidecar

COMMANDS = (_listing, _maintenance, _inspect, _report, _sidecar)

EPILOG = """\
Every command takes a local path or a bucket URL (s3://bucket/prefix). Pass --json for machine-readable output.

exit codes:
  0  success (for diff: the checkpoints are equal)
  1  a problem was found: a damaged or corrupt checkpoint, or only model files without manifests
     (for diff: the checkpoints differ)
  2  bad input: a path that does not exist, a URL that cannot be served, a wrong argument
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keepbest", description="Inspect and check keepbest checkpoints.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"keepbest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()
    except UsageError as e:
        print(e, file=sys.stderr)
        return USAGE
    except BrokenPipeError:
        # The reader went away (`keepbest ls | head`): stop quietly, as other command-line tools do. Pointing
        # stdout at /dev/null keeps Python's exit-time flush from raising the same error again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return OK
    return code
