"""The ``keepbest`` command: one module per group of commands, each with a ``register(sub)``.

Imports no framework; ``sidecar`` (and the Keras conversions of ``export``) import Keras only when they run.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from keepbest._version import __version__
from keepbest.cli import _listing, _maintenance, _report, _sidecar

COMMANDS = (_listing, _maintenance, _report, _sidecar)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keepbest", description="Inspect and check keepbest checkpoints.")
    parser.add_argument("--version", action="version", version=f"keepbest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
