"""What is on disk, as a table or as JSON (``keepbest ls`` and the demo)."""

from __future__ import annotations

import time
from typing import Any, Sequence

from keepbest.checkpoint import Checkpoint
from keepbest.store import Damaged


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover - the loop always returns


def _metric_order(name: str) -> tuple[int, int, str]:
    base = name.removeprefix("val_")
    return (name.startswith("val_"), base != "loss", base)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _number(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def table(checkpoints: Sequence[Checkpoint], damaged: Sequence[Damaged] = ()) -> str:
    """A fixed-width table: one row per checkpoint, oldest first, ``*`` on the best, then version and aliases.

    Metrics a sidecar evaluator recorded appear as ``<evaluator>:<metric>`` columns. Checkpoints that
    cannot be used (``damaged``) follow, one line each with the reason.
    """
    if not checkpoints:
        return "\n".join(["(no committed checkpoints)", *_damaged_lines(damaged)])
    metrics = sorted({k for c in checkpoints for k in c.metrics}, key=_metric_order)
    evaluated = sorted({(who, k) for c in checkpoints for who, rec in c.evaluations.items() for k in rec["metrics"]},
                       key=lambda wk: (wk[0], _metric_order(wk[1])))
    quarantined = any(rec.get("quarantined") for c in checkpoints for rec in c.evaluations.values())
    versioned = any(c.version is not None for c in checkpoints)
    header = ["name", "epoch", "batch", "step", *metrics, *(f"{who}:{k}" for who, k in evaluated), "best", "size",
              "saved", *(["version", "aliases"] if versioned else []), *(["evaluation"] if quarantined else [])]
    rows = [header]
    for c in checkpoints:
        m = c.manifest
        rows.append([
            c.name,
            "-" if m.epoch is None else str(m.epoch),
            "-" if m.batch is None else str(m.batch),
            "-" if m.step is None else str(m.step),
            *(_cell(c.metrics.get(k)) for k in metrics),
            *(_cell(_number(c.evaluations.get(who, {}).get("metrics", {}).get(k))) for who, k in evaluated),
            f"* {m.monitor.name}" if c.is_best and m.monitor else "",
            human_size(c.size),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created)),
            *([("-" if c.version is None else f"v{c.version}"), ",".join(c.aliases)] if versioned else []),
            *([", ".join(f"quarantined by {who}" for who, rec in c.evaluations.items() if rec.get("quarantined"))]
              if quarantined else []),
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    numeric = set(range(1, 4 + len(metrics) + len(evaluated)))
    lines = []
    for r in rows:
        cells = [cell.rjust(w) if i in numeric else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines + _damaged_lines(damaged))


def _damaged_lines(damaged: Sequence[Damaged]) -> list[str]:
    return [f"{d.name}  DAMAGED: {d.reason}" for d in damaged]


def as_json(checkpoints: Sequence[Checkpoint], damaged: Sequence[Damaged] = ()) -> list[dict[str, Any]]:
    """One object per checkpoint (as :func:`table`); a damaged one is ``{"name", "damaged": reason}``."""
    out: list[dict[str, Any]] = []
    for c in checkpoints:
        m = c.manifest
        out.append({
            "name": c.name,
            "path": c.location,
            "series": m.series,
            "format": m.format,
            "epoch": m.epoch,
            "batch": m.batch,
            "step": m.step,
            "metrics": {k: (v if v == v and abs(v) != float("inf") else str(v)) for k, v in m.metrics.items()},
            "monitor": None if m.monitor is None else {"name": m.monitor.name, "mode": m.monitor.mode},
            "best": c.is_best,
            "version": c.version,
            "aliases": list(c.aliases),
            "size": c.size,
            "created": m.created,
            "files": [{"path": f.path, "size": f.size, f.algorithm: f.digest} for f in m.files],
            "evaluations": {who: {"metrics": rec["metrics"], "quarantined": rec.get("quarantined"),
                                  "seconds": rec.get("seconds"), "evaluated_at": rec.get("evaluated_at")}
                            for who, rec in c.evaluations.items()},
        })
    out += [{"name": d.name, "damaged": d.reason} for d in damaged]
    return out
