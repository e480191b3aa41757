"""``keepbest gc`` (clean-up, and retention rules applied after the fact), ``promote`` and ``demote``."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import Any

from keepbest import evaluation
from keepbest.cli._common import OK, USAGE, UsageError, find_or_report, series_of
from keepbest.discovery import Found, find
from keepbest.errors import CheckpointNotFoundError
from keepbest.manager import CheckpointManager
from keepbest.policy import Monitor, Rule, rules_from
from keepbest.store import Store

Action = dict[str, Any]


def _cleanup(store: Store, dry_run: bool) -> list[Action]:
    """Interrupted saves finished or undone, orphans removed (or, with ``dry_run``, what would be)."""
    if dry_run:
        orphans = store.orphans()
        return ([{"action": "remove", "target": str(p), "text": f"would remove {p}"} for p in orphans.dead]
                + [{"action": "remove stale manifest", "target": n,
                    "text": f"would remove the stale manifest of {n} (its data is gone)"} for n in orphans.stale]
                + [{"action": "leave", "target": str(p), "text": f"would leave {p}: its writer may still run on "
                    "another host or in another PID namespace"} for p in orphans.undecided])
    report = store.recover()
    done = ([{"action": "complete", "target": n, "text": f"completed interrupted commit of {n}"}
             for n in report.rolled_forward]
            + [{"action": "roll back", "target": n,
                "text": f"rolled back interrupted commit of {n} (the previous version is kept)"}
               for n in report.rolled_back]
            + [{"action": "restore", "target": n, "text": f"restored {n} (a replacement was interrupted)"}
               for n in report.restored]
            + [{"action": "remove", "target": str(p), "text": f"removed {p}"} for p in report.removed]
            + [{"action": "remove stale manifest", "target": n,
                "text": f"removed the stale manifest of {n} (its data was deleted)"} for n in report.stale])
    done += [{"action": "remove", "target": str(r), "text": f"removed {r} (evaluation of a checkpoint that is gone)"}
             for r in evaluation.prune_records(store, store.list().manifests)]
    done += [{"action": "leave", "target": str(p), "text": f"left {p}: its writer may still run on another host or "
              "in another PID namespace; remove it by hand once no keepbest process writes here"}
             for p in report.undecided]
    return done


def _rules(args: argparse.Namespace) -> tuple[Rule, ...]:
    try:
        return rules_from(keep_last=args.keep_last, keep_best=args.keep_best, keep_every=args.keep_every,
                          keep_period=args.keep_period, max_bytes=args.max_bytes)
    except ValueError as e:
        message = str(e).replace(" or None (no such rule)", "").replace(" or None.", ".")
        for name in ("keep_last", "keep_best", "keep_every", "keep_period", "max_bytes"):
            flag = "--" + name.replace("_", "-")
            message = message.replace(f"`{name}`", flag).replace(f"{name}=", f"{flag} ").replace(name, flag)
        raise _Usage(message) from None


class _Usage(Exception):
    """Bad input: printed, exit code 2."""


def _choose(found: Found, args: argparse.Namespace) -> tuple[str, Monitor | None] | None:
    """The series the rules prune and its monitor, checked before anything changes (None: nothing to prune)."""
    where = found.store.where()
    if found.name is not None:
        raise _Usage(f"retention rules prune a folder of checkpoints, and {args.dir} is one checkpoint ("
                     f"{found.name}). Pass its folder, {where}, to prune the series it belongs to. "
                     f"Received: {args.dir}")
    series = sorted({c.manifest.series for c in found.checkpoints})
    if not series:
        return None
    if args.series is None and len(series) > 1:
        raise _Usage(f"{where} holds {len(series)} series, so --series must pick the one to prune. "
                     f"Available: {', '.join(series)}. Received: --series None")
    if args.series is not None and args.series not in series:
        raise _Usage(f"{where} has no series '{args.series}'. Available: {', '.join(series)}. "
                     f"Received: --series {args.series}")
    chosen = args.series or series[0]
    recorded = [c.manifest.monitor for c in found.checkpoints if c.manifest.series == chosen and c.manifest.monitor]
    if args.keep_best is not None and not recorded:
        raise _Usage(f"--keep-best ranks checkpoints by their monitored metric, but series '{chosen}' in {where} "
                     "recorded none. Use the other rules. Received: --keep-best "
                     f"{args.keep_best}")
    return chosen, (Monitor(recorded[-1].name, recorded[-1].mode) if recorded else None)


def _retention(found: Found, args: argparse.Namespace, rules: tuple[Rule, ...], chosen: str,
               monitor: Monitor | None) -> tuple[list[Action], list[str]]:
    """What the rules delete in the chosen series (or would, with ``--dry-run``), and the limits not met."""
    mgr = CheckpointManager(found.store.url, monitor=monitor, series=chosen, recover=not args.dry_run)
    sizes = {c.name: c.size for c in found.checkpoints}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = mgr.plan_retention(rules)
        gone = list(plan.drop) if args.dry_run else mgr.prune(rules)
    problems = list(plan.problems) if args.dry_run else [str(w.message) for w in caught]
    verb = "would delete" if args.dry_run else "deleted"
    return [{"action": "delete", "target": n, "reason": plan.drop.get(n, "retention"), "size": sizes.get(n),
             "text": f"{verb} {n} ({plan.drop.get(n, 'retention')})"} for n in gone], problems


def _gc(args: argparse.Namespace) -> int:
    found = find_or_report(args.dir)
    if found is None:
        return USAGE
    try:
        rules = _rules(args)
        target = _choose(found, args) if rules else None  # bad input is refused before anything changes
        actions = _cleanup(found.store, args.dry_run)
        problems: list[str] = []
        if target is not None:
            deleted, problems = _retention(find(found.store), args, rules, *target)
            actions += deleted
    except _Usage as e:
        print(f"keepbest gc: {e}", file=sys.stderr)
        return USAGE
    if args.json:
        print(json.dumps({"location": found.store.where(), "dry_run": args.dry_run,
                          "actions": [{k: v for k, v in a.items() if k != "text"} for a in actions],
                          "warnings": problems}, indent=2))
        return OK
    for a in actions:
        print(a["text"])
    for p in problems:
        print(f"keepbest gc: warning: {p}", file=sys.stderr)
    if not actions:
        print("nothing to clean")
    return OK


def _manager_for(found: Found, args: argparse.Namespace, verb: str) -> CheckpointManager | None:
    if not found.checkpoints:
        print(f"keepbest {verb}: {found.store.where()} holds no committed checkpoints, so there is no version to "
              f"{verb}. Pass the folder a training run saved into (keepbest ls lists what a folder holds). "
              f"Received: {args.dir}", file=sys.stderr)
        return None
    return CheckpointManager(found.store.url, series=series_of(found, args.series))


def _promote(args: argparse.Namespace) -> int:
    found = find_or_report(args.dir)
    mgr = None if found is None else _manager_for(found, args, "promote")
    if mgr is None:
        return USAGE
    try:
        ckpt = mgr.promote(args.version, args.alias)
    except (ValueError, CheckpointNotFoundError) as e:
        raise UsageError(f"keepbest promote: {e}") from None
    if args.json:
        print(json.dumps({"alias": args.alias, "version": ckpt.version, "name": ckpt.name, "epoch": ckpt.epoch,
                          "series": mgr.series}))
    else:
        print(f"{args.alias} -> v{ckpt.version} ({ckpt.name}, epoch {ckpt.epoch}); retention keeps it while the "
              "alias points there")
    return OK


def _demote(args: argparse.Namespace) -> int:
    found = find_or_report(args.dir)
    mgr = None if found is None else _manager_for(found, args, "demote")
    if mgr is None:
        return USAGE
    version = mgr.aliases.get(args.alias)
    try:
        mgr.demote(args.alias)
    except KeyError as e:
        raise UsageError(f"keepbest demote: {e.args[0]}") from None
    if args.json:
        print(json.dumps({"alias": args.alias, "removed": True, "version": version, "series": mgr.series}))
    else:
        print(f"removed alias {args.alias}")
    return OK


_DIR = "a folder of checkpoints (a path, file:// or s3:// URL)"
_SERIES = "the series to act on (its filepath template, e.g. ckpt-{epoch:02d}), when the folder holds several"


def register(sub: argparse._SubParsersAction) -> None:
    gc = sub.add_parser(
        "gc", help="finish or undo interrupted saves, remove orphaned temporary files, and apply retention rules",
        description="Finishes or undoes interrupted saves and removes orphaned temporary files. With rules "
        "(--keep-last, ...), also deletes the checkpoints they let go, as training's retention would: a "
        "checkpoint stays when any --keep-* rule keeps it, then --max-bytes deletes the oldest until the rest "
        "fits. The newest, the best, an aliased checkpoint and one an evaluator holds always stay. Run with "
        "--dry-run first.")
    gc.add_argument("dir", help=_DIR)
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed or deleted, and why")
    gc.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest checkpoints")
    gc.add_argument("--keep-best", type=int, metavar="K", help="keep the K best by the recorded monitor")
    gc.add_argument("--keep-every", type=int, metavar="N", help="keep the checkpoints of every N-th epoch")
    gc.add_argument("--keep-period", type=float, metavar="SECONDS", help="keep the first checkpoint of each period")
    gc.add_argument("--max-bytes", metavar="SIZE", help="a budget, e.g. 50GB, 1.5GiB or a number of bytes: the "
                    "oldest checkpoints are deleted until the rest fits")
    gc.add_argument("--series", help=_SERIES)
    gc.add_argument("--json", action="store_true", help="print what was done as JSON")
    gc.set_defaults(func=_gc)
    pr = sub.add_parser("promote", help="point a user alias (e.g. production) at a version; retention keeps it")
    pr.add_argument("dir", help=_DIR)
    pr.add_argument("version", help="v3, 3, an alias (best, latest, epoch_7) or a checkpoint name")
    pr.add_argument("--alias", required=True, help="the user alias to set, e.g. production")
    pr.add_argument("--series", help=_SERIES)
    pr.add_argument("--json", action="store_true", help="print the alias and its version as JSON")
    pr.set_defaults(func=_promote)
    de = sub.add_parser("demote", help="remove a user alias; its version is subject to retention again")
    de.add_argument("dir", help=_DIR)
    de.add_argument("--alias", required=True, help="the user alias to remove, e.g. production")
    de.add_argument("--series", help=_SERIES)
    de.add_argument("--json", action="store_true", help="print the removed alias as JSON")
    de.set_defaults(func=_demote)
