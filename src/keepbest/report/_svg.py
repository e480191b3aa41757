"""The report's plots, drawn as inline SVG: no plotting library, no script.

Curves are thinned to at most :data:`CURVE_POINTS` points (the lowest and the highest of each bucket, so
the shape and the extremes stay); markers of kept, best and aliased saves are never thinned. Every deleted
save is drawn too, but as one compact path: only :data:`TOOLTIPS` of each kind get an element of their own
with a tooltip (an SVG ``<title>``, shown on hover without JavaScript).

Example:
    >>> thin([0.0, 1.0, 2.0, 3.0], [5.0, 1.0, 4.0, 2.0], budget=100)
    [0, 1, 2, 3]
"""

from __future__ import annotations

import math
import re
from html import escape
from typing import Callable, Sequence

from keepbest.listing import human_size
from keepbest.report._data import Save, SeriesReport, finite

CURVE_POINTS = 1200
TOOLTIPS = 250
BARS = 300
W, H = 880, 280
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 14, 40


def thin(xs: Sequence[float], ys: Sequence[float], budget: int = CURVE_POINTS) -> list[int]:
    """Indices of the points to draw so that at most about ``budget`` remain: the first and the last, and in
    each of ``budget // 2`` buckets along x the lowest and the highest point."""
    n = len(xs)
    if n <= budget:
        return list(range(n))
    buckets = max(1, budget // 2)
    keep = {0, n - 1}
    for b in range(buckets):
        chunk = range(b * n // buckets, (b + 1) * n // buckets)
        if len(chunk):
            keep.add(min(chunk, key=lambda i: ys[i]))
            keep.add(max(chunk, key=lambda i: ys[i]))
    return sorted(keep)


def spread(count: int, limit: int) -> list[int]:
    """``limit`` indices spread evenly over ``range(count)`` (all of them when there are fewer)."""
    if count <= limit:
        return list(range(count))
    return sorted({round(i * (count - 1) / (limit - 1)) for i in range(limit)})


def slug(save: Save) -> str:
    """The part of a marker's DOM id that names its save: ``v<version>``, or the name made id-safe."""
    return f"v{save.version}" if save.version is not None else re.sub(r"[^A-Za-z0-9_.-]", "_", save.name)


def number(value: float | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


class Frame:
    """Maps data to pixels inside a chart's plotting area and draws its axes."""

    def __init__(self, xs: Sequence[float], ys: Sequence[float], height: int = H, *, floor: bool = False,
                 yformat: Callable[[float], str] = lambda v: number(v, 3)) -> None:
        self.height, self.yformat = height, yformat
        self.integer_x = all(float(x).is_integer() for x in xs)
        self.x0, self.x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        self.y0, self.y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
        if self.x1 == self.x0:
            self.x0, self.x1 = self.x0 - 1, self.x1 + 1
        if self.y1 == self.y0:
            self.y0, self.y1 = self.y0 - 1, self.y1 + 1
        pad = (self.y1 - self.y0) * 0.05
        self.y0, self.y1 = (0.0 if floor else self.y0 - pad), self.y1 + pad

    def xticks(self) -> list[float]:
        """Round values along x, 1, 2 or 5 times a power of ten apart (whole numbers on an axis of counts)."""
        span = self.x1 - self.x0
        base = 10.0 ** math.floor(math.log10(span / 5))
        step = next(m * base for m in (1, 2, 5, 10) if m * base >= span / 5)
        step = max(step, 1.0) if self.integer_x else step
        first = math.ceil(self.x0 / step) * step
        return [first + k * step for k in range(int((self.x1 - first) / step + 1e-9) + 1)]

    def px(self, x: float) -> float:
        return LEFT + (x - self.x0) / (self.x1 - self.x0) * (W - LEFT - RIGHT)

    def py(self, y: float | None) -> float:
        bottom = self.height - BOTTOM
        if y is None or not math.isfinite(y):
            return float(bottom)  # a save without a finite value sits on the x axis
        return bottom - (y - self.y0) / (self.y1 - self.y0) * (bottom - TOP)

    def axes(self, xlabel: str, ylabel: str) -> str:
        bottom = self.height - BOTTOM
        out = [f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{bottom - TOP}"/>']
        for i in range(5):
            y = self.y0 + (self.y1 - self.y0) * i / 4
            out.append(f'<text class="tick" x="{LEFT - 4}" y="{self.py(y) + 4:.1f}" text-anchor="end">'
                       f'{escape(self.yformat(y))}</text>')
        for x in self.xticks():
            out.append(f'<text class="tick" x="{self.px(x):.1f}" y="{bottom + 14}" text-anchor="middle">'
                       f'{number(x, 6)}</text>')
        out.append(f'<text class="label" x="{(LEFT + W - RIGHT) / 2}" y="{self.height - 6}" '
                   f'text-anchor="middle">{escape(xlabel)}</text>')
        out.append(f'<text class="label" x="12" y="{(TOP + bottom) / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 12 {(TOP + bottom) / 2})">{escape(ylabel)}</text>')
        return "".join(out)

    def polyline(self, xs: Sequence[float], ys: Sequence[float], attrs: str) -> str:
        keep = thin(xs, ys)
        points = " ".join(f"{self.px(xs[i]):.1f},{self.py(ys[i]):.1f}" for i in keep)
        return f'<polyline {attrs} points="{points}"/>'


def svg(body: str, label: str, height: int = H) -> str:
    return (f'<svg viewBox="0 0 {W} {height}" width="{W}" height="{height}" '
            f'role="img" aria-label="{escape(label)}">{body}</svg>')


def describe(save: Save, monitor: str | None) -> str:
    what = f"v{save.version} " if save.version is not None else ""
    where = f" epoch {save.epoch}" if save.epoch is not None else ""
    where += f" step {save.step}" if save.step is not None else ""
    value = f", {monitor}={number(save.value)}" if monitor else ""
    state = save.state + (f" ({save.reason})" if save.reason else "")
    extra = (", best" if save.best else "") + (f", aliases: {', '.join(save.user_aliases)}" if save.user_aliases else "")
    return escape(f"{what}{save.name}{where}{value}: {state}{extra}")


def run_chart(series: SeriesReport, suffix: str = "") -> str:
    """The monitored metric per save, with every save marked (kept, deleted, best, aliased)."""
    saves = series.saves
    xs = series.xs()
    frame = Frame(xs, finite([s.value for s in saves]))
    body = [frame.axes(series.axis, series.monitor or "(no monitored metric)")]
    valued = [i for i, s in enumerate(saves) if s.value is not None and math.isfinite(s.value)]
    body.append(frame.polyline([xs[i] for i in valued], [saves[i].value or 0.0 for i in valued],
                               f'id="metric-curve{suffix}" class="curve"'))
    for state, shape in (("deleted", "deleted"), ("kept", "kept")):
        idx = [i for i, s in enumerate(saves) if s.state == state]
        dots = "".join(f"M{frame.px(xs[i]):.1f} {frame.py(saves[i].value):.1f}h0" for i in idx)
        body.append(f'<path id="{shape}-markers{suffix}" class="{shape}-dots" d="{dots or "M0 0"}"/>')
        for j in spread(len(idx), TOOLTIPS):
            i = idx[j]
            body.append(f'<circle id="{shape}-{slug(saves[i])}{suffix}" class="{shape}-marker" '
                        f'cx="{frame.px(xs[i]):.1f}" cy="{frame.py(saves[i].value):.1f}" r="3">'
                        f'<title>{describe(saves[i], series.monitor)}</title></circle>')
    for i, s in enumerate(saves):
        if s.state == "damaged":
            body.append(f'<circle id="damaged-{slug(s)}{suffix}" class="damaged-marker" cx="{frame.px(xs[i]):.1f}" '
                        f'cy="{frame.py(s.value):.1f}" r="5"><title>{describe(s, series.monitor)}</title></circle>')
        if s.user_aliases:
            x, y = frame.px(xs[i]), frame.py(s.value)
            body.append(f'<g id="alias-{slug(s)}{suffix}" class="alias-marker"><circle cx="{x:.1f}" cy="{y:.1f}" '
                        f'r="7"/><text x="{x:.1f}" y="{y - 10:.1f}" text-anchor="middle">'
                        f'{escape(", ".join(s.user_aliases))}</text><title>{describe(s, series.monitor)}</title></g>')
        if s.best:
            body.append(f'<path id="best-marker{suffix}" class="best-marker" d="{_star(frame.px(xs[i]), frame.py(s.value))}">'
                        f'<title>best: {describe(s, series.monitor)}</title></path>')
    return svg("".join(body), f"{series.monitor or 'saves'} per {series.axis}")


def _star(x: float, y: float, r: float = 8.0) -> str:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = math.pi / 2 + k * math.pi / 5
        points.append(f"{x + radius * math.cos(angle):.1f} {y - radius * math.sin(angle):.1f}")
    return "M" + "L".join(points) + "Z"


def lines_chart(series: SeriesReport, ylabel: str, lines: Sequence[tuple[str, str, Sequence[float | None]]],
                chart_id: str, height: int = 220, *, floor: bool = False,
                yformat: Callable[[float], str] = lambda v: number(v, 3)) -> str:
    """One chart of several lines over the saves: ``(css class, label, value per save)``; None is a gap."""
    xs = series.xs()
    frame = Frame(xs, finite([v for _c, _l, values in lines for v in values]), height, floor=floor, yformat=yformat)
    body = [frame.axes(series.axis, ylabel)]
    for css, label, values in lines:
        idx = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
        body.append(frame.polyline([xs[i] for i in idx], [values[i] or 0.0 for i in idx],
                                   f'class="{css}" data-label="{escape(label)}"'))
        if len(idx) <= 60:  # few points (evaluations): mark each, with its value on hover
            body += [f'<circle class="{css} dot" cx="{frame.px(xs[i]):.1f}" cy="{frame.py(values[i]):.1f}" r="2.5">'
                     f'<title>{escape(label)} {number(values[i])} at {series.axis} {number(xs[i])}</title></circle>'
                     for i in idx]
    return f'<div class="chart" id="{escape(chart_id)}">{svg("".join(body), ylabel, height)}</div>'


def bytes_chart(series: SeriesReport, chart_id: str, height: int = 200) -> str:
    """Bytes per save, written (solid) and reused by dedup (light), in at most :data:`BARS` bars (the
    largest save of each bucket)."""
    saves = [s for s in series.saves if s.size is not None]
    groups = [saves[a:b] for a, b in zip([i * len(saves) // BARS for i in range(BARS)],
                                         [(i + 1) * len(saves) // BARS for i in range(BARS)]) if b > a] \
        if len(saves) > BARS else [[s] for s in saves]
    tops = [max(g, key=lambda s: s.size or 0) for g in groups]
    frame = Frame([0.0, float(max(len(saves), 1))], [0.0, float(max((s.size or 0) for s in tops) if tops else 1)],
                  height, floor=True, yformat=lambda v: human_size(int(v)))
    width = max(1.0, (W - LEFT - RIGHT) / max(len(tops), 1) * 0.8)
    written, reused = [], []
    first = 0
    for group, s in zip(groups, tops):
        x = frame.px(first + len(group) / 2)
        first += len(group)
        size = float(s.size or 0)
        known = s.written
        split = size if known is None else float(known)
        written.append(f"M{x:.1f} {frame.py(0):.1f}V{frame.py(split):.1f}")
        if split < size:
            reused.append(f"M{x:.1f} {frame.py(split):.1f}V{frame.py(size):.1f}")
    body = [frame.axes("saves, oldest first", "bytes"),
            f'<path class="written-bars" stroke-width="{width:.1f}" d="{"".join(written) or "M0 0"}"/>',
            f'<path class="reused-bars" stroke-width="{width:.1f}" d="{"".join(reused) or "M0 0"}"/>']
    return f'<div class="chart" id="{escape(chart_id)}">{svg("".join(body), "bytes per save", height)}</div>'
