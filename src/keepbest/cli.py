"""The ``keepbest`` command: ``ls``, ``verify`` and ``gc``. Imports no framework."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from keepbest import __version__
from keepbest.errors import CorruptCheckpointError
from keepbest.listing import as_json, table
from keepbest.checkpoint import find_checkpoints
from keepbest.storage import LocalStore


def _missing(path: str) -> bool:
    if os.path.exists(path):
        return False
    print(f"keepbest: {path} does not exist. Pass a folder of checkpoints, a checkpoint folder or a "
          f"Keras file. Received: {path}", file=sys.stderr)
    return True


def _ls(args: argparse.Namespace) -> int:
    if _missing(args.dir):
        return 2
    store, ckpts = find_checkpoints(args.dir)
    listing = store.list()
    if args.json:
        print(json.dumps(as_json(ckpts), indent=2))
    else:
        print(table(ckpts))
    for err in listing.errors:
        print(f"warning: {err}", file=sys.stderr)
    return 0


def _verify(args: argparse.Namespace) -> int:
    if _missing(args.dir):
        return 2
    store, ckpts = find_checkpoints(args.dir)
    bad = 0
    for c in ckpts:
        try:
            store.verify(c.manifest)
        except CorruptCheckpointError as e:
            bad += 1
            print(f"CORRUPT {c.name}: {e}")
        else:
            print(f"ok      {c.name} ({len(c.manifest.files)} file(s), digests verified)")
    for err in store.list().errors:
        bad += 1
        print(f"CORRUPT {err}")
    print(f"{len(ckpts) - min(bad, len(ckpts))} of {len(ckpts)} checkpoint(s) verified"
          + (f"; {bad} problem(s)" if bad else ""))
    return 1 if bad else 0


def _gc(args: argparse.Namespace) -> int:
    store = LocalStore(args.dir)
    if args.dry_run:
        for p in store.orphans():
            print(f"would remove {p}")
        return 0
    report = store.recover()
    for name in report.rolled_forward:
        print(f"completed interrupted commit of {name}")
    for name in report.rolled_back:
        print(f"rolled back interrupted commit of {name} (the previous version is kept)")
    for name in report.restored:
        print(f"restored {name} (a replacement was interrupted)")
    for removed in report.removed:
        print(f"removed {removed}")
    if not (report.rolled_forward or report.rolled_back or report.restored or report.removed):
        print("nothing to clean")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keepbest", description="Inspect and check keepbest checkpoints.")
    parser.add_argument("--version", action="version", version=f"keepbest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("ls", help="list committed checkpoints (epoch, metrics, best, size)")
    ls.add_argument("dir", help="a checkpoint folder, a Keras file, or a folder holding checkpoints")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_ls)
    verify = sub.add_parser("verify", help="re-hash every committed checkpoint; exit 1 on any mismatch")
    verify.add_argument("dir")
    verify.set_defaults(func=_verify)
    gc = sub.add_parser("gc", help="finish or undo interrupted saves and remove orphaned temporary files")
    gc.add_argument("dir")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(func=_gc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
