"""The report page: one self-contained HTML document (inline CSS and SVG, no script, nothing fetched)."""

from __future__ import annotations

import datetime
from collections import Counter
import re
from html import escape
from typing import Sequence

from keepbest.listing import human_size
from keepbest.report._data import ReportData, Save, SeriesReport
from keepbest.report._svg import bytes_chart, lines_chart, number, run_chart

TABLE_ROWS = 300
METRIC_CHARTS = 6

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2430;max-width:940px}
h1{font-size:20px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 6px;border-bottom:1px solid #d0d6de}
h3{font-size:14px;margin:18px 0 4px}.muted{color:#5f6b7a}
table{border-collapse:collapse;font-size:12px;margin:6px 0}td,th{border:1px solid #d0d6de;padding:2px 6px;text-align:left}
th{background:#f1f4f7}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.deleted td{color:#8a94a3}tr.damaged td{color:#b3261e}
svg{display:block;background:#fff}.frame{fill:#fbfcfd;stroke:#c5ccd5}.tick{font-size:10px;fill:#5f6b7a}
.label{font-size:11px;fill:#3b4656}polyline{fill:none;stroke-width:1.6}
.curve{stroke:#2f6db5}.kept-dots{stroke:#2f6db5;stroke-width:6;stroke-linecap:round}
.deleted-dots{stroke:#8d96a3;stroke-width:6;stroke-linecap:square}
.kept-marker{fill:#2f6db5;fill-opacity:0;stroke:none}.deleted-marker{fill:#8d96a3;fill-opacity:0;stroke:none}
.kept-marker:hover,.deleted-marker:hover{fill-opacity:1;stroke:#1d2430}
.best-marker{fill:#e8a400;stroke:#7a5600}.damaged-marker{fill:none;stroke:#b3261e;stroke-width:2}
.alias-marker circle{fill:none;stroke:#7b3fb5;stroke-width:2}.alias-marker text{font-size:10px;fill:#7b3fb5}
.train{stroke:#2f6db5}.eval{stroke:#c2410c;stroke-dasharray:5 3}.dot{stroke:none}.train.dot{fill:#2f6db5}
.eval.dot{fill:#c2410c}.stall{stroke:#b3261e}.persist{stroke:#2f7d4f}.stall.dot{fill:#b3261e}.persist.dot{fill:#2f7d4f}
.written-bars{stroke:#2f6db5}.reused-bars{stroke:#a9c4e6}
.legend span{display:inline-block;margin-right:14px;font-size:12px}.sw{display:inline-block;width:10px;height:10px;
margin-right:4px;border-radius:5px;vertical-align:-1px}
"""



def _id_safe(text: str) -> str:
    """A metric name as part of a DOM id: what a name may hold (quotes, spaces, markup) never reaches the page."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)

def _when(t: float | None) -> str:
    if not t:
        return "—"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(t: float | None) -> str:
    if t is None:
        return "—"
    return f"{t * 1000:.3g} ms" if t < 1 else f"{t:.2f} s"


def _size(n: int | None) -> str:
    return "—" if n is None else human_size(n)


def _legend(items: Sequence[tuple[str, str]]) -> str:
    return '<p class="legend">' + "".join(f'<span><i class="sw" style="background:{color}"></i>{escape(label)}</span>'
                                          for color, label in items) + "</p>"


def _summary(series: SeriesReport) -> str:
    states = Counter(s.state for s in series.saves)
    reasons = Counter(s.reason for s in series.saves if s.state == "deleted")
    best = next((s for s in series.saves if s.best), None)
    rows = [("monitor", f"{series.monitor} ({series.mode})" if series.monitor else "none: no save is ranked"),
            ("saves", f"{len(series.saves)}: {states['kept']} kept, {states['deleted']} deleted"
                      + (f", {states['damaged']} damaged" if states["damaged"] else "")),
            ("best", f"v{best.version} {best.name}: {series.monitor}={number(best.value)}" if best else "—"),
            ("training", f"ended {_when(series.ended)}" if series.ended else "not marked as ended")]
    rows += [(f"deleted: {reason}", str(count)) for reason, count in reasons.most_common()]
    aliases = ", ".join(f"{a} → v{v}" for a, v in sorted(series.aliases.items(), key=lambda kv: (kv[1], kv[0]))
                        if not a.startswith("epoch_")) or "—"
    rows.append(("aliases", aliases))
    return "<table class=\"summary\">" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>"
                                                  for k, v in rows) + "</table>"


def _metric_charts(series: SeriesReport, suffix: str) -> str:
    training = sorted({k for s in series.saves for k in s.metrics})
    evaluated = sorted({(who, k) for s in series.saves for who, ms in s.evaluations.items() for k in ms})
    names = [*training, *sorted({k for _w, k in evaluated} - set(training))][:METRIC_CHARTS]
    out = []
    for name in names:
        lines = [("train", f"training {name}", [s.metrics.get(name) for s in series.saves])] if name in training else []
        lines += [("eval", f"{who} {name}", [s.evaluations.get(who, {}).get(name) for s in series.saves])
                  for who, k in evaluated if k == name]
        out.append(f"<h3>{escape(name)}</h3>" + lines_chart(series, name, lines, f"metric-{_id_safe(name)}{suffix}"))
    if not out:
        return '<p class="muted">No metrics were recorded.</p>'
    return _legend([("#2f6db5", "training (at save time)"), ("#c2410c", "sidecar evaluation (dashed)")]) + "".join(out)


def _published(save: Save) -> str:
    return ", ".join(f"{who}: {'uploaded' if ok else 'FAILED'}" for who, ok in sorted(save.published.items())) or "—"


def _row(save: Save, monitor: str | None) -> str:
    state = save.state + (f": {save.reason}" if save.reason else "")
    evals = "; ".join(f"{who}: " + ", ".join(f"{k}={number(v)}" for k, v in sorted(ms.items()))
                      for who, ms in sorted(save.evaluations.items())) or "—"
    cells = [f"v{save.version}" if save.version is not None else "—", save.name,
             str(save.epoch) if save.epoch is not None else "—", str(save.step) if save.step is not None else "—",
             number(save.value) if monitor else "—", state + (" ★ best" if save.best else ""),
             ", ".join(a for a in save.aliases if not a.startswith("epoch_")) or "—", _size(save.size),
             _size(save.written), _size(save.reused), _seconds(save.stall), _seconds(save.persist),
             save.integrity or "—", evals, _published(save)]
    numeric = {2, 3, 4, 7, 8, 9, 10, 11}
    return f'<tr class="{save.state}">' + "".join(
        f'<td class="n">{escape(c)}</td>' if i in numeric else f"<td>{escape(c)}</td>" for i, c in enumerate(cells)) + "</tr>"


def _table(series: SeriesReport, suffix: str) -> str:
    saves = series.saves
    always = {i for i, s in enumerate(saves) if s.best or s.user_aliases or s.state == "damaged"}
    newest = [i for i in reversed(range(len(saves))) if i not in always]
    shown = always | set(newest[:max(0, TABLE_ROWS - len(always))])
    note = "" if len(shown) == len(saves) else (
        f'<p class="muted">Showing {len(shown)} of {len(saves)} saves: the newest, the best and the aliased ones. '
        "<code>keepbest ls</code> lists every kept checkpoint.</p>")
    head = ["version", "name", "epoch", "step", series.monitor or "monitor", "state", "aliases", "size", "written",
            "reused", "stall", "persist", "integrity", "evaluations", "published"]
    return (note + f'<table id="saves{suffix}" class="saves"><tr>' + "".join(f"<th>{escape(h)}</th>" for h in head)
            + "</tr>" + "".join(_row(saves[i], series.monitor) for i in sorted(shown)) + "</table>")


def _section(series: SeriesReport, suffix: str) -> str:
    timed = any(s.stall is not None or s.persist is not None for s in series.saves)
    timing = lines_chart(series, "seconds", [("stall", "stall", [s.stall for s in series.saves]),
                                            ("persist", "persist", [s.persist for s in series.saves])],
                         f"timing{suffix}", floor=True, yformat=_seconds) if timed else '<p class="muted">No save recorded its timing.</p>'
    return "".join([
        f'<section id="series{suffix}"><h2>Series {escape(series.name)}</h2>', _summary(series),
        f"<h3>{escape(series.monitor or 'saves')} per {series.axis}</h3>",
        _legend([("#2f6db5", "kept"), ("#8d96a3", "deleted (retention, re-save)"), ("#e8a400", "best"),
                 ("#7b3fb5", "alias (latest, user)"), ("#b3261e", "damaged")]),
        f'<div class="chart" id="run{suffix}">{run_chart(series, suffix)}</div>',
        "<h3>Training and evaluation metrics</h3>", _metric_charts(series, suffix),
        "<h3>Bytes per save</h3>", _legend([("#2f6db5", "written"), ("#a9c4e6", "reused (dedup)")]),
        bytes_chart(series, f"bytes{suffix}"),
        "<h3>Stall and persist time per save</h3>",
        _legend([("#b3261e", "stall (training blocked)"), ("#2f7d4f", "persist (writing to commit)")]), timing,
        "<h3>Checkpoints</h3>", _table(series, suffix), "</section>"])


def render(data: ReportData) -> str:
    """The report as one HTML document."""
    sections = "".join(_section(s, "" if i == 0 else f"-{i}") for i, s in enumerate(data.series))
    damaged = ("<h2>Damaged checkpoints</h2><ul>" + "".join(f"<li>{escape(d)}</li>" for d in data.damaged)
               + "</ul>") if data.damaged else ""
    empty = "" if data.series else '<p id="empty">No committed keepbest checkpoints here.</p>'
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>keepbest report: {escape(data.location)}</title><style>{CSS}</style></head><body>"
            f"<h1>keepbest report</h1><p class=\"muted\">{escape(data.location)} · generated {_when(data.generated)}"
            f" · hover a marker for its details</p>{empty}{sections}{damaged}</body></html>\n")
