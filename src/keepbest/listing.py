"""What is on disk, as a table or as JSON (``keepbest ls`` and the demo)."""

from __future__ import annotations

import time
from typing import Any, Sequence

from keepbest.checkpoint import Checkpoint
from keepbest.policy import format_size
from keepbest.store import Damaged


def human_size(n: float) -> str:
    """``1.5 GB``: decimal units, as ``max_bytes="50GB"`` reads them, so a listing and a budget agree."""
    return format_size(n)


def number(value: float | None) -> str:
    """A metric for a table: 4 decimals, or 4 significant digits where decimals would mislead or overflow."""
    if value is None:
        return "-"
    v = float(value)
    if v != v or v in (float("inf"), float("-inf")):
        return str(v)
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
        return f"{v:.4g}"
    return f"{v:.4f}"


def age(seconds: float) -> str:
    """``45s``, ``12m``, ``3h``, ``2d``: how long ago, in one short field."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _metric_order(name: str) -> tuple[int, int, str]:
    base = name.removeprefix("val_")
    return (name.startswith("val_"), base != "loss", base)


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
            *(number(c.metrics.get(k)) for k in metrics),
            *(number(_number(c.evaluations.get(who, {}).get("metrics", {}).get(k))) for who, k in evaluated),
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
    # Not wrapped: the reason names paths, which must stay whole to be copied.
    return [f"{d.name}  DAMAGED: {d.reason}" for d in damaged]


def _shorten(text: str, room: int, middle: bool) -> str:
    if len(text) <= room:
        return text
    if middle:  # names end in what tells them apart (the epoch), so keep both ends
        head = (room - 1) // 2
        return text[:head] + "…" + text[len(text) - (room - 1 - head):]
    return text[: room - 1] + "…"


def compact(checkpoints: Sequence[Checkpoint], damaged: Sequence[Damaged] = (), *, width: int = 80,
            now: float | None = None) -> str:
    """What ``keepbest ls`` prints by default, fitted to ``width`` columns: name, epoch, the monitored metric,
    best (``*``), version and aliases, size and age. Long names and alias lists are shortened with ``…``;
    :func:`table` (``--wide``) shows every metric and evaluation.
    """
    if not checkpoints:
        return "\n".join(["(no committed checkpoints)", *_damaged_lines(damaged)])
    now = time.time() if now is None else now
    monitors = {c.manifest.monitor.name for c in checkpoints if c.manifest.monitor is not None}
    header = ["name", "epoch", monitors.pop() if len(monitors) == 1 else "monitored", "best/aliases", "size", "age"]
    rows = [header]
    for c in checkpoints:
        m = c.manifest
        value = "-" if m.monitor is None else number(_number(m.monitor_value))
        if m.monitor is not None and header[2] == "monitored":
            value = f"{m.monitor.name}={value}"
        tags = " ".join(t for t in ("*" if c.is_best else "", "" if c.version is None else f"v{c.version}",
                                    ",".join(c.aliases)) if t)
        rows.append([c.name, "-" if m.epoch is None else str(m.epoch), value, tags, human_size(c.size),
                     age(now - m.created)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    excess = sum(widths) + 2 * (len(widths) - 1) - width
    for col, floor in ((0, 12), (3, 12), (2, 10)):  # shrink the name, then the aliases, then the metric
        if excess > 0 and widths[col] > floor:
            cut = min(excess, widths[col] - floor)
            widths[col] -= cut
            excess -= cut
    right = {1, 2, 4, 5}
    lines = []
    for r in rows:
        cells = [_shorten(cell, w, middle=i == 0) for i, (cell, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                               for i, (cell, w) in enumerate(zip(cells, widths))).rstrip())
    return "\n".join(lines + _damaged_lines(damaged))


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
