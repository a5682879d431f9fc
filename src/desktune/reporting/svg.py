"""Line plots as inline SVG: axes with nice ticks, a title, a legend, one polyline per series."""

# Our own plotting, not matplotlib: no plotting dependency, and the same records always give the same self-contained
# text (no fonts, images or scripts to embed, nothing that differs from machine to machine).

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
WIDTH, HEIGHT = 560, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 52, 40  # margins around the plot area, in px
CHAR_PX = 6.5  # width of one legend character at the legend's font size, near enough to lay out entries


@dataclass(frozen=True)
class Series:
    """One named series of (x, y) points; `dashed` series also mark each point with a circle."""

    label: str
    points: list[tuple[float, float]]
    dashed: bool = False


def _span(lo: float, hi: float, step: float) -> tuple[int, int]:
    """The tick indices k (ticks at k * step) of the first tick at or below lo and the last at or above hi."""
    return math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round ticks (1, 2 or 5 times a power of ten apart, about `count` intervals) from at or below lo to hi."""
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    power = 10.0 ** math.floor(math.log10((hi - lo) / count))
    steps = [m * power for m in (1, 2, 5, 10)]
    step = min(steps, key=lambda s: abs(_span(lo, hi, s)[1] - _span(lo, hi, s)[0] - count))
    first, last = _span(lo, hi, step)
    return [round(k * step, 12) for k in range(first, last + 1)]


def tick_label(value: float) -> str:
    """A short label: 0.002, 2.5, 12000; scientific outside 1e-3..1e6 (1.5e-05)."""
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e6:
        return f"{value:.6f}".rstrip("0").rstrip(".")
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def _scale(lo: float, hi: float, out_lo: float, out_hi: float):
    span = (hi - lo) or 1.0
    return lambda v: out_lo + (v - lo) / span * (out_hi - out_lo)


def _axes(xt: list[float], yt: list[float], sx, sy, x_label: str, y_label: str) -> list[str]:
    """Grid lines, tick labels, the two axes and their labels."""
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP
    out = []
    for t in yt:
        y = sy(t)
        out.append(f'<line class="grid" x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}"/>')
        out.append(f'<text class="tick" x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{tick_label(t)}</text>')
    for t in xt:
        x = sx(t)
        out.append(f'<line class="grid" x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{y0 + 16}" text-anchor="middle">{tick_label(t)}</text>')
    out.append(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}"/>')
    out.append(f'<line class="axis" x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}"/>')
    out.append(f'<text class="axis-label" x="{(x0 + x1) / 2:.1f}" y="{HEIGHT - 6}" text-anchor="middle">'
               f"{escape(x_label)}</text>")
    mid = (y0 + y1) / 2
    out.append(f'<text class="axis-label" x="14" y="{mid:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 14 {mid:.1f})">{escape(y_label)}</text>')
    return out


def _series(s: Series, color: str, sx, sy) -> list[str]:
    """A polyline through the points; circles too where the series is dashed or has a single point."""
    coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
    dash = ' stroke-dasharray="5 3"' if s.dashed else ""
    out = [f'<polyline class="series" data-series="{escape(s.label)}" fill="none" stroke="{color}" '
           f'stroke-width="1.8"{dash} points="{coords}"/>']
    if s.dashed or len(s.points) == 1:
        dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3"/>' for x, y in s.points)
        out.append(f'<g class="series-points" data-series="{escape(s.label)}" fill="{color}">{dots}</g>')
    return out


def _legend(series: list[tuple[Series, str]]) -> list[str]:
    """One entry per series (a line sample and the label), left to right under the title."""
    out, x, y = [], float(LEFT), 38
    for s, color in series:
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        out.append(f'<line x1="{x:.1f}" y1="{y - 4}" x2="{x + 18:.1f}" y2="{y - 4}" stroke="{color}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<text class="legend-label" x="{x + 22:.1f}" y="{y}">{escape(s.label)}</text>')
        x += 34 + CHAR_PX * len(s.label)
    return [f'<g class="legend">{"".join(out)}</g>']


def line_plot(name: str, title: str, series: list[Series], *, x_label: str = "step", y_label: str = "") -> str:
    """An inline <svg data-plot=name>; a visible "no data" text in place of the series when none has points."""
    head = (f'<svg class="plot" data-plot="{escape(name)}" role="img" aria-label="{escape(title)}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">'
            f'<text class="plot-title" x="{LEFT}" y="18">{escape(title)}</text>')
    finite = [Series(s.label, [(x, y) for x, y in s.points if math.isfinite(x) and math.isfinite(y)], s.dashed)
              for s in series]
    drawn = [(s, PALETTE[i % len(PALETTE)]) for i, s in enumerate(finite) if s.points]
    if not drawn:
        return (f'{head}<rect class="frame" x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" '
                f'height="{HEIGHT - TOP - BOTTOM}"/><text class="no-data" x="{WIDTH / 2}" '
                f'y="{(TOP + HEIGHT - BOTTOM) / 2}" text-anchor="middle">no data</text></svg>')
    xs = [x for s, _ in drawn for x, _ in s.points]
    ys = [y for s, _ in drawn for _, y in s.points]
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    sx = _scale(xt[0], xt[-1], LEFT, WIDTH - RIGHT)
    sy = _scale(yt[0], yt[-1], HEIGHT - BOTTOM, TOP)
    parts = _axes(xt, yt, sx, sy, x_label, y_label)
    for s, color in drawn:
        parts += _series(s, color, sx, sy)
    parts += _legend(drawn)
    return head + "".join(parts) + "</svg>"
