"""The ``keepbest`` command: ``ls``, ``verify``, ``gc``, ``promote``/``demote`` and ``sidecar``.

Imports no framework; ``sidecar`` imports Keras only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import Sequence

from keepbest import evaluation, store as stores
from keepbest._version import __version__
from keepbest.discovery import Found, find
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from keepbest.listing import as_json, table
from keepbest.manager import CheckpointManager


def _find(path: str) -> Found | None:
    """What ``path`` holds; None (with a message) when it does not exist or cannot be served."""
    try:
        found = find(path)
    except (StorageError, ValueError) as e:
        print(f"keepbest: {e}", file=sys.stderr)
        return None
    if found.name is None and not found.store.exists():
        print(f"keepbest: {path} does not exist. Pass a folder of checkpoints, a checkpoint folder or a "
              f"Keras file. Received: {path}", file=sys.stderr)
        return None
    return found


def _ls(args: argparse.Namespace) -> int:
    found = _find(args.dir)
    if found is None:
        return 2
    if args.json:
        print(json.dumps(as_json(found.checkpoints, found.damaged), indent=2))
    else:
        print(table(found.checkpoints, found.damaged))
    return 1 if found.damaged else 0


def _verify(args: argparse.Namespace) -> int:
    found = _find(args.dir)
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


def _series(found: Found, wanted: str | None) -> str:
    """The series to act on: the one asked for, or the folder's only one."""
    names = sorted({c.manifest.series for c in found.checkpoints})
    if wanted is not None and wanted in names:
        return wanted
    if wanted is None and len(names) == 1:
        return names[0]
    what = f"has no series '{wanted}'" if wanted else f"holds {len(names)} series, so --series must pick one"
    raise SystemExit(f"keepbest: {found.store.where()} {what}. Available: {', '.join(names) or 'none'}. "
                     f"Received: --series {wanted}")


def _promote(args: argparse.Namespace) -> int:
    found = _find(args.dir)
    if found is None:
        return 2
    mgr = CheckpointManager(found.store.url, series=_series(found, args.series))
    try:
        ckpt = mgr.promote(args.version, args.alias)
    except (ValueError, CheckpointNotFoundError) as e:
        raise SystemExit(f"keepbest promote: {e}") from None
    print(f"{args.alias} -> v{ckpt.version} ({ckpt.name}, epoch {ckpt.epoch}); retention keeps it while the "
          "alias points there")
    return 0


def _demote(args: argparse.Namespace) -> int:
    found = _find(args.dir)
    if found is None:
        return 2
    mgr = CheckpointManager(found.store.url, series=_series(found, args.series))
    try:
        mgr.demote(args.alias)
    except KeyError as e:
        raise SystemExit(f"keepbest demote: {e.args[0]}") from None
    print(f"removed alias {args.alias}")
    return 0


_loaded: dict[str, object] = {}


def _load_file(path: str) -> object:
    """Imports a .py file once (--model and --data often name the same file)."""
    key = os.path.realpath(path)
    if key not in _loaded:
        spec = importlib.util.spec_from_file_location(f"_keepbest_factory_{len(_loaded)}", key)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded[key] = module
    return _loaded[key]


def _resolve(spec: str, what: str) -> object:
    """``module:attr`` or ``path/to/file.py:attr``, imported from the current folder."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"keepbest sidecar: --{what} must be 'module:function' or 'file.py:function'. "
                         f"Received: --{what} {spec}")
    try:
        if module_name.endswith(".py"):
            module = _load_file(module_name)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as e:
        raise SystemExit(f"keepbest sidecar: cannot import {module_name} for --{what}: {e}. Run from the folder "
                         f"that holds it, or pass a file path. Received: --{what} {spec}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        names = ", ".join(n for n in dir(module) if not n.startswith("_"))
        raise SystemExit(f"keepbest sidecar: {module_name} has no '{attr}' for --{what}. Available: {names}. "
                         f"Received: --{what} {spec}") from None


def _sidecar(args: argparse.Namespace) -> int:
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    make_model, make_data = _resolve(args.model, "model"), _resolve(args.data, "data")
    import keepbest.keras  # the framework is imported only here

    model = make_model()  # type: ignore[operator]
    callbacks = []
    if args.export:
        callbacks.append(keepbest.keras.SidecarEvaluatorModelExport(
            args.export, os.path.join(args.dir, args.series or "ckpt"), monitor=args.monitor,
            mode=args.metric_mode, save_weights_only=args.save_weights_only, verbose=1))
    evaluator = keepbest.keras.SidecarEvaluator(
        model, make_data(), args.dir, steps=args.steps, max_evaluations=args.max_evaluations,  # type: ignore[operator]
        callbacks=callbacks, mode=args.mode, name=args.name, series=args.series,
        idle_timeout=args.idle_timeout, poll_interval=args.poll_interval, verbose=1)
    looks = "polling every" if stores.is_url(args.dir) else "file events, else a look every"
    print(f"keepbest sidecar: following {args.dir} (mode {args.mode}, evaluator '{args.name}', "
          f"{os.environ.get('KERAS_BACKEND', 'keras default')} backend, {looks} {args.poll_interval:g} s)", flush=True)
    evaluator.start()
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
    sc = sub.add_parser("sidecar", help="evaluate each checkpoint training commits (a process of its own)",
                        description="Follows DIR, evaluates each committed checkpoint with the model and data "
                                    "that the factories build, records the metrics beside each checkpoint, and "
                                    "optionally exports the best. Stops when training ends.")
    sc.add_argument("dir", help="the folder training saves checkpoints into")
    sc.add_argument("--model", required=True, help="module:function returning a compiled Keras model")
    sc.add_argument("--data", required=True, help="module:function returning the evaluation data ((x, y) or a dataset)")
    sc.add_argument("--mode", choices=("every", "latest"), default="every",
                    help="evaluate every checkpoint (default) or jump to the newest")
    sc.add_argument("--steps", type=int, help="batches per evaluation (default: all of the data)")
    sc.add_argument("--max-evaluations", type=int, help="stop after this many evaluations")
    sc.add_argument("--name", default="eval", help="this evaluator's name (default: eval)")
    sc.add_argument("--series", help="only checkpoints of this filepath template, e.g. 'ckpt-{epoch:04d}'")
    sc.add_argument("--idle-timeout", type=float, help="stop after this many seconds without a new checkpoint")
    sc.add_argument("--poll-interval", type=float, default=0.5,
                    help="seconds between looks for new checkpoints where file events are missing (a bucket: one "
                         "LIST request per look; default: 0.5)")
    sc.add_argument("--export", help="export the best evaluated model here, e.g. 'best/best-{epoch:04d}.keras'")
    sc.add_argument("--monitor", default="loss", help="evaluation metric that decides the best (default: loss)")
    sc.add_argument("--metric-mode", default="auto", choices=("auto", "min", "max"), help="for --monitor")
    sc.add_argument("--save-weights-only", action="store_true", help="export weights only")
    sc.add_argument("--backend", choices=("jax", "torch", "tensorflow"), help="sets KERAS_BACKEND")
    sc.set_defaults(func=_sidecar)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
