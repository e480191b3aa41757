"""``keepbest gc``, ``promote`` and ``demote``."""

from __future__ import annotations

import argparse
import sys

from keepbest import evaluation, store as stores
from keepbest.cli._common import find_or_report, series_of
from keepbest.errors import CheckpointNotFoundError, StorageError
from keepbest.manager import CheckpointManager


def _gc(args: argparse.Namespace) -> int:
    try:
        store = stores.open(args.dir)
    except (StorageError, ValueError) as e:
        print(f"keepbest: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        orphans = store.orphans()
        for p in orphans.dead:
            print(f"would remove {p}")
        for name in orphans.stale:
            print(f"would remove the stale manifest of {name} (its data is gone)")
        for p in orphans.undecided:
            print(f"would leave {p}: its writer may still run on another host or in another PID namespace")
        if not (orphans.dead or orphans.stale or orphans.undecided):
            print("nothing to clean")
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
    for name in report.stale:
        print(f"removed the stale manifest of {name} (its data was deleted)")
    for record in evaluation.prune_records(store, store.list().manifests):
        print(f"removed {record} (evaluation of a checkpoint that is gone)")
        report.removed.append(record)
    for left in report.undecided:
        print(f"left {left}: its writer may still run on another host or in another PID namespace; remove it "
              "by hand once no keepbest process writes here")
    if not (report.changed or report.undecided):
        print("nothing to clean")
    return 0


def _promote(args: argparse.Namespace) -> int:
    found = find_or_report(args.dir)
    if found is None:
        return 2
    mgr = CheckpointManager(found.store.url, series=series_of(found, args.series))
    try:
        ckpt = mgr.promote(args.version, args.alias)
    except (ValueError, CheckpointNotFoundError) as e:
        raise SystemExit(f"keepbest promote: {e}") from None
    print(f"{args.alias} -> v{ckpt.version} ({ckpt.name}, epoch {ckpt.epoch}); retention keeps it while the "
          "alias points there")
    return 0


def _demote(args: argparse.Namespace) -> int:
    found = find_or_report(args.dir)
    if found is None:
        return 2
    mgr = CheckpointManager(found.store.url, series=series_of(found, args.series))
    try:
        mgr.demote(args.alias)
    except KeyError as e:
        raise SystemExit(f"keepbest demote: {e.args[0]}") from None
    print(f"removed alias {args.alias}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    gc = sub.add_parser("gc", help="finish or undo interrupted saves and remove orphaned temporary files")
    gc.add_argument("dir")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(func=_gc)
    pr = sub.add_parser("promote", help="point a user alias (e.g. production) at a version; retention keeps it")
    pr.add_argument("dir", help="the folder holding the checkpoints")
    pr.add_argument("version", help="v3, 3, an alias (best, latest, epoch_7) or a checkpoint name")
    pr.add_argument("--alias", required=True, help="the alias to set, e.g. production")
    pr.add_argument("--series", help="the filepath template of the series, when the folder holds several")
    pr.set_defaults(func=_promote)
    de = sub.add_parser("demote", help="remove a user alias; its version is subject to retention again")
    de.add_argument("dir")
    de.add_argument("--alias", required=True)
    de.add_argument("--series")
    de.set_defaults(func=_demote)
