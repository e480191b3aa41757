"""``keepbest ls`` and ``keepbest verify``."""

from __future__ import annotations

import argparse
import json

from keepbest.cli._common import find_or_report
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.listing import as_json, table


def _ls(args: argparse.Namespace) -> int:
    found = find_or_report(args.dir)
    if found is None:
        return 2
    if args.json:
        print(json.dumps(as_json(found.checkpoints, found.damaged), indent=2))
    else:
        print(table(found.checkpoints, found.damaged))
    return 1 if found.damaged else 0


def _verify(args: argparse.Namespace) -> int:
    found = find_or_report(args.dir)
    if found is None:
        return 2
    bad = gone = 0
    for c in found.checkpoints:
        try:
            found.store.verify(c.manifest)
        except CorruptCheckpointError as e:
            bad += 1
            print(f"CORRUPT {c.name}: {e}")
        except CheckpointNotFoundError:
            gone += 1
            print(f"gone    {c.name} (deleted or saved again while it was verified: not damaged)")
        else:
            print(f"ok      {c.name} ({len(c.manifest.files)} file(s), digests verified)")
    for d in found.damaged:
        bad += 1
        print(f"CORRUPT {d.name}: {d.reason}")
    total = len(found.checkpoints) - gone + len(found.damaged)
    print(f"{total - bad} of {total} checkpoint(s) verified" + (f"; {bad} problem(s)" if bad else "")
          + (f"; {gone} deleted meanwhile" if gone else ""))
    return 1 if bad else 0


def register(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser("ls", help="list committed checkpoints (epoch, metrics, best, size)")
    ls.add_argument("dir", help="a checkpoint folder, a Keras file, or a folder holding checkpoints")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_ls)
    verify = sub.add_parser("verify", help="re-hash every committed checkpoint; exit 1 on any mismatch")
    verify.add_argument("dir")
    verify.set_defaults(func=_verify)
