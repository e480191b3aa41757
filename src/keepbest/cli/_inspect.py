"""``keepbest show``, ``diff`` and ``export``: imports Keras only to export to a Keras format."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, Callable, Collection, Sequence

from keepbest import exporting
from keepbest.checkpoint import Checkpoint
from keepbest.cli._common import OK, PROBLEM, USAGE
from keepbest.comparison import Comparison, compare
from keepbest.errors import CheckpointNotFoundError, CorruptCheckpointError, StorageError
from keepbest.inspection import TensorInfo, checkpoint_at, describe, tensor_files, tensors_of
from keepbest.listing import human_size
from keepbest.progress import bar

CKPT_HELP = ("a checkpoint folder, a Keras file or a URL; or a folder of checkpoints with @REF, where REF is v3, 3, "
             "an alias (latest, best, production) or a checkpoint name: runs/a@best")
SERIES_HELP = "the series (filepath template) REF is looked up in, when the folder holds several"


def _open(spec: str, series: str | None, damaged: int = PROBLEM) -> Checkpoint | int:
    """The checkpoint ``spec`` names, or the exit code (with a message): ``damaged`` when it cannot be used,
    USAGE when it is not there."""
    try:
        return checkpoint_at(spec, series)
    except CorruptCheckpointError as e:
        print(f"keepbest: {e}", file=sys.stderr)
        return damaged
    except (CheckpointNotFoundError, StorageError, ValueError) as e:
        print(f"keepbest: {e}", file=sys.stderr)
        return USAGE


def _table(rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def _shape(shape: Sequence[int]) -> str:
    return "[" + ",".join(map(str, shape)) + "]"


def _tensor_json(t: TensorInfo) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes, "file": t.file,
            "group": t.group}


def _show_text(doc: dict[str, Any], tensors: list[TensorInfo] | None) -> str:
    mon = doc["monitor"]
    lines = [f"checkpoint  {doc['location']}",
             f"series      {doc['series']}  version {'-' if doc['version'] is None else 'v' + str(doc['version'])}"
             f"  aliases {', '.join(doc['aliases']) or '-'}",
             f"format      {doc['format']} ({doc['layout']})",
             f"position    epoch {doc['epoch'] if doc['epoch'] is not None else '-'}  step "
             f"{doc['step'] if doc['step'] is not None else '-'}  batch {doc['batch'] if doc['batch'] is not None else '-'}",
             f"metrics     {'  '.join(f'{k}={_number(v)}' for k, v in doc['metrics'].items()) or '-'}"
             + (f"  (monitor {mon['name']}, {mon['mode']}{', best' if doc['best'] else ''})" if mon else ""),
             f"created     {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(doc['created']))}",
             f"versions    {'  '.join(f'{k}={v}' for k, v in sorted(doc['versions'].items())) or '-'}"]
    if doc["extra"]:
        lines.append(f"extra       {json.dumps(doc['extra'], sort_keys=True)[:2000]}")
    lines.append(f"files       {len(doc['files'])}, {human_size(doc['size'])}")
    rows = [["  " + f["path"], human_size(f["size"]), next(f"{a} {f[a][:16]}" for a in ("blake3", "sha256") if a in f)]
            for f in doc["files"]]
    lines += _table(rows, {1}) if rows else []
    if tensors is None:
        lines.append(f"tensors     none listed: a '{doc['format']}' checkpoint has no safetensors files (Keras's "
                     ".keras and .h5 formats keep tensors in HDF5); tensor tables need safetensors")
    else:
        lines.append(f"tensors     {len(tensors)}, {human_size(sum(t.nbytes for t in tensors))}")
        rows = [["  name", "dtype", "shape", "bytes", "file", "group"]] + [
            ["  " + t.name, t.dtype, _shape(t.shape), human_size(t.nbytes), t.file, t.group or "-"] for t in tensors]
        lines += _table(rows, {3}) if tensors else []
    return "\n".join(lines)


def _number(value: Any) -> str:
    if isinstance(value, str):
        return value
    return f"{value:.6g}"


def _show(args: argparse.Namespace) -> int:
    ckpt = _open(args.ckpt, args.series)
    if isinstance(ckpt, int):
        return ckpt
    try:
        tensors = tensors_of(ckpt) if tensor_files(ckpt) else None
    except CorruptCheckpointError as e:
        print(f"keepbest show: {e}", file=sys.stderr)
        return PROBLEM
    doc = describe(ckpt)
    if args.json:
        print(json.dumps({**doc, "tensors": None if tensors is None else [_tensor_json(t) for t in tensors]},
                         indent=2))
    else:
        print(_show_text(doc, tensors))
    return OK


def _diff_json(result: Comparison) -> dict[str, Any]:
    def num(v: float | None) -> float | str | None:
        return v if v is None or math.isfinite(v) else str(v)

    return {"identical": result.identical, "summary": result.summary(), "files_read": result.files_read,
            "other_files": result.other_files,
            "tensors": [{"name": c.name, "status": c.status, "max_abs": num(c.max_abs), "max_rel": num(c.max_rel),
                         "reason": c.reason or None, "a": None if c.a is None else _tensor_json(c.a),
                         "b": None if c.b is None else _tensor_json(c.b)} for c in result.tensors]}


def _diff_text(result: Comparison) -> str:
    rows = [["name", "status", "max abs", "max rel", "dtype", "shape"]]
    for c in result.tensors:
        t = c.b or c.a
        assert t is not None
        detail = [f"{c.max_abs:.4g}", f"{c.max_rel:.4g}"] if c.max_abs is not None and c.max_rel is not None \
            else [c.reason or "-", "-"]
        rows.append([c.name, c.status, *detail, t.dtype, _shape(t.shape)])
    others = [f"file {path}: {status}" for path, status in result.other_files.items()]
    return "\n".join(_table(rows, {2, 3}) + others + [result.summary()])


def _diff(args: argparse.Namespace) -> int:
    a, b = _open(args.a, args.series, USAGE), _open(args.b, args.series, USAGE)
    if isinstance(a, int) or isinstance(b, int):
        return a if isinstance(a, int) else b  # type: ignore[return-value]
    digests = {(f.path, f.digest) for f in tensor_files(a)}
    total = sum(f.size for f in tensor_files(b) if (f.path, f.digest) not in digests)  # what may be read
    try:
        with bar(f"comparing {a.name} and {b.name}", total) as p:
            result = compare(a, b, p.advance)
    except (CorruptCheckpointError, CheckpointNotFoundError, ValueError) as e:
        print(f"keepbest diff: {e}", file=sys.stderr)
        return USAGE
    print(json.dumps(_diff_json(result), indent=2) if args.json else _diff_text(result))
    return OK if result.identical else PROBLEM


def _export(args: argparse.Namespace) -> int:
    try:
        kind = exporting.kind_of(args.to)
    except ValueError as e:
        print(f"keepbest export: {e}", file=sys.stderr)
        return USAGE
    source = _open(args.ckpt, args.series)
    if isinstance(source, int):
        return source
    run: Callable[..., Checkpoint]
    if kind in ("keras", "weights.h5"):
        try:
            from keepbest.keras._export import export_keras  # Keras is imported only here
        except ImportError as e:
            print(f"keepbest export: exporting to .{kind} needs Keras, which cannot be imported here ({e}). Install "
                  "it (pip install 'keepbest[keras]' plus a backend), or export to .safetensors or a folder. "
                  f"Received: --to {args.to}", file=sys.stderr)
            return USAGE
        run = export_keras
    else:
        run = exporting.copy_checkpoint if kind == exporting.FOLDER else exporting.export_safetensors
    try:
        with bar(f"exporting {source.name}", source.size) as p:
            exported = run(source, args.to, progress=p.advance)
    except CorruptCheckpointError as e:
        print(f"keepbest export: {e}", file=sys.stderr)
        return PROBLEM
    except (OSError, ValueError) as e:  # not found, exists, a folder where a file is wanted, cannot write
        print(f"keepbest export: {e}", file=sys.stderr)
        return USAGE
    if args.json:
        print(json.dumps({"source": source.location, "exported": exported.location, "kind": kind, "verified": True,
                          "files": describe(exported)["files"]}, indent=2))
    else:
        print(f"exported {source.location} -> {exported.location} ({kind}, {human_size(exported.size)}, "
              "digests verified)")
    return OK


def register(sub: argparse._SubParsersAction) -> None:
    show = sub.add_parser("show", help="print a checkpoint's manifest and its tensors (reads headers only)",
                          description="Prints the manifest (series, version, aliases, position, metrics, files with "
                                      "sizes and digests) and a table of tensors (name, dtype, shape, bytes, file, "
                                      "trainable or frozen) read from the safetensors headers alone: no tensor data, "
                                      "no framework. Exit codes: 0 shown, 1 a damaged header, 2 not found.")
    show.add_argument("ckpt", metavar="CKPT", help=CKPT_HELP)
    show.add_argument("--series", help=SERIES_HELP)
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(func=_show)
    diff = sub.add_parser("diff", help="compare two checkpoints tensor by tensor; exit 0 same, 1 different",
                          description="For each tensor: unchanged, changed (with the largest absolute and relative "
                                      "difference, or why: dtype or shape), added or removed, then a summary line. "
                                      "Files whose digests are equal are not read (only one header, for the names). "
                                      "Exit codes, as diff(1): 0 identical, 1 different, 2 trouble (not found, "
                                      "damaged).")
    diff.add_argument("a", metavar="A", help="the first checkpoint: " + CKPT_HELP)
    diff.add_argument("b", metavar="B", help="the second checkpoint, in the same forms")
    diff.add_argument("--series", help=SERIES_HELP)
    diff.add_argument("--json", action="store_true", help="print JSON instead of a table")
    diff.set_defaults(func=_diff)
    ex = sub.add_parser("export", help="a verified copy: .keras, .weights.h5, .safetensors, or a folder/bucket",
                        description="Copies a checkpoint, verified, to what --to names: PATH.keras (a Keras model) or "
                                    "PATH.weights.h5 (Keras weights; both need Keras and a checkpoint with the model "
                                    "config), PATH.safetensors (every tensor of the weights file in one file), or a "
                                    "folder or bucket URL without a suffix (or ending in '/'): the checkpoint is "
                                    "copied into it under its own name. Exit codes: 0 exported, 1 the source is "
                                    "damaged (nothing written), 2 bad input.")
    ex.add_argument("ckpt", metavar="CKPT", help=CKPT_HELP)
    ex.add_argument("--to", required=True, help="where: out/model.keras, out/w.weights.h5, out/model.safetensors, "
                                                "exported/ or s3://bucket/prefix")
    ex.add_argument("--series", help=SERIES_HELP)
    ex.add_argument("--json", action="store_true", help="print JSON instead of a line")
    ex.set_defaults(func=_export)
