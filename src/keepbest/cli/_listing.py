"""``keepbest ls`` and ``keepbest verify``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Any

from keepbest.cli._common import OK, PROBLEM, USAGE, find_or_report
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError
from keepbest.listing import as_json, compact, table
from keepbest.progress import bar


def terminal_width() -> int:
    """``COLUMNS`` when set, else the terminal's width, else 80 (a pipe)."""
    try:
        return max(40, int(os.environ["COLUMNS"]))
    except (KeyError, ValueError):
        pass
    try:
        return max(40, os.get_terminal_size(sys.stdout.fileno()).columns)
    except (OSError, ValueError, AttributeError):
        return 80


def _note(text: str | None, stream: Any = None) -> None:
    if text:
        print(textwrap.fill(text, terminal_width(), break_long_words=False, break_on_hyphens=False),
              file=stream or sys.stdout)


def _ls(args: argparse.Namespace) -> int:
    found = find_or_report(args.dir)
    if found is None:
        return USAGE
    if args.json:
        print(json.dumps(as_json(found.checkpoints, found.damaged), indent=2))
        _note(found.unmanaged_note(), sys.stderr)
    else:
        print(table(found.checkpoints, found.damaged) if args.wide
              else compact(found.checkpoints, found.damaged, width=terminal_width()))
        _note(found.unmanaged_note())
    return PROBLEM if found.damaged else OK


def _verify(args: argparse.Namespace) -> int:
    found = find_or_report(args.dir)
    if found is None:
        return USAGE
    results: list[dict[str, Any]] = []
    total_bytes = sum(c.size for c in found.checkpoints)
    with bar("verifying", total_bytes, enabled=False if args.json else None) as progress:
        for c in found.checkpoints:
            progress.describe(f"verifying {c.name}")
            try:
                found.store.verify(c.manifest, progress=progress.advance)
            except CorruptCheckpointError as e:
                results.append({"name": c.name, "status": "corrupt", "reason": str(e)})
            except CheckpointNotFoundError:
                results.append({"name": c.name, "status": "gone",
                                "reason": "deleted or saved again while it was verified: not damaged"})
            else:
                results.append({"name": c.name, "status": "ok", "files": len(c.manifest.files), "size": c.size})
    results += [{"name": d.name, "status": "corrupt", "reason": d.reason} for d in found.damaged]
    bad = sum(r["status"] == "corrupt" for r in results)
    gone = sum(r["status"] == "gone" for r in results)
    total = len(results) - gone
    nothing = total == 0
    code = PROBLEM if bad or (nothing and found.unmanaged) else OK
    if args.json:
        print(json.dumps({"checkpoints": results, "verified": total - bad, "problems": bad, "gone": gone,
                          "unmanaged": found.unmanaged, "exit_code": code}, indent=2))
        return code
    for r in results:
        if r["status"] == "ok":
            print(f"ok      {r['name']} ({r['files']} file(s), digests verified)")
        elif r["status"] == "gone":
            print(f"gone    {r['name']} ({r['reason']})")
        else:
            print(f"CORRUPT {r['name']}: {r['reason']}")
    if nothing and found.unmanaged:
        print("nothing verified: no keepbest checkpoint here")
    elif nothing:
        print("nothing to verify: no committed checkpoints here")
    else:
        print(f"{total - bad} of {total} checkpoint(s) verified" + (f"; {bad} problem(s)" if bad else "")
              + (f"; {gone} deleted meanwhile" if gone else ""))
    _note(found.unmanaged_note())
    return code


WHERE = "a folder of checkpoints, one checkpoint (folder or Keras file), or a bucket URL (s3://bucket/run)"


def register(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser("ls", help="list committed checkpoints (epoch, monitored metric, best, aliases, size, age)",
                        description="Lists the committed checkpoints, oldest first, fitted to the terminal "
                                    "(COLUMNS). Exit 1 when a checkpoint is damaged.")
    ls.add_argument("dir", help=WHERE)
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.add_argument("--wide", action="store_true",
                    help="every column: each metric, each evaluator's metrics, batch, step, save time")
    ls.set_defaults(func=_ls)
    verify = sub.add_parser("verify", help="re-hash every committed checkpoint; exit 1 on any mismatch",
                            description="Re-hashes every file of every committed checkpoint against its manifest. "
                                        "Exit 1 on a mismatch, a damaged checkpoint, or when the folder holds "
                                        "only model files keepbest did not write (nothing could be verified).")
    verify.add_argument("dir", help=WHERE)
    verify.add_argument("--json", action="store_true", help="print one JSON document with each checkpoint's status")
    verify.set_defaults(func=_verify)
