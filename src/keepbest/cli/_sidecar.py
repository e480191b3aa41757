"""``keepbest sidecar``: imports Keras only when it runs."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

from keepbest import store as stores
from keepbest.cli._common import UsageError
from keepbest.discovery import find


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
        raise UsageError(f"keepbest sidecar: --{what} must be 'module:function' or 'file.py:function'. "
                         f"Received: --{what} {spec}")
    try:
        if module_name.endswith(".py"):
            module = _load_file(module_name)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except (ImportError, OSError) as e:
        raise UsageError(f"keepbest sidecar: cannot import {module_name} for --{what}: {e}. Run from the folder "
                         f"that holds it, or pass a file path. Received: --{what} {spec}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        names = ", ".join(n for n in dir(module) if not n.startswith("_"))
        raise UsageError(f"keepbest sidecar: {module_name} has no '{attr}' for --{what}. Available: {names}. "
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
            mode=args.metric_mode, save_weights_only=args.save_weights_only, verbose=0 if args.json else 1))
    evaluator = keepbest.keras.SidecarEvaluator(
        model, make_data(), args.dir, steps=args.steps, max_evaluations=args.max_evaluations,  # type: ignore[operator]
        callbacks=callbacks, mode=args.mode, name=args.name, series=args.series,
        idle_timeout=args.idle_timeout, poll_interval=args.poll_interval, verbose=0 if args.json else 1)
    looks = "polling every" if stores.is_url(args.dir) else "file events, else a look every"
    if not args.json:
        print(f"keepbest sidecar: following {args.dir} (mode {args.mode}, evaluator '{args.name}', "
              f"{os.environ.get('KERAS_BACKEND', 'keras default')} backend, {looks} {args.poll_interval:g} s)",
              flush=True)
    evaluator.start()
    if args.json:  # one document once it stops: what it evaluated (as recorded beside each checkpoint) and why
        evaluated = [{"name": c.name, "epoch": c.manifest.epoch, "step": c.manifest.step,
                      **{k: c.evaluations[args.name].get(k) for k in ("metrics", "quarantined", "seconds")}}
                     for c in find(args.dir).checkpoints if args.name in c.evaluations]
        print(json.dumps({"evaluator": args.name, "stopped": evaluator.stop_reason, "evaluated": evaluated},
                         indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
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
    sc.add_argument("--json", action="store_true",
                    help="print nothing while it runs, then one JSON document of what it evaluated and why it stopped")
    sc.add_argument("--backend", choices=("jax", "torch", "tensorflow"), help="sets KERAS_BACKEND")
    sc.set_defaults(func=_sidecar)
