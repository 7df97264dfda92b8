"""Inline SVG line charts for the run report: a linear or log y axis, a faint raw line under its smoothed one,
sparse values as dots, vertical markers (epoch starts).

Each chart is one ``<svg>`` with a ``viewBox``, so CSS can scale it to its column; nothing is scripted or fetched.
The structure is meant to be read back: the y tick labels sit in ``<g class="y-axis" data-scale="log|linear">``,
each series in ``<g class="series" data-name=… data-style=…>``, the legend in ``<g class="legend">``.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

# Plot-area margins inside the SVG: room for the title and legend above, tick labels left and below.
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 30, 34
Y_PAD = 0.04  # share of the y span left free above and below the data, so no line runs along the frame
MAX_TICKS = 8
MAX_MARKED_POINTS = 30  # a solid series this sparse (eval every N steps) gets a dot per point, so single points show


@dataclass(frozen=True)
class Line:
    """One series of ``(step, value)`` points drawn in ``color``.

    ``style``: ``solid``; ``faint``, the raw values under their smoothed line; ``dots``, sparse values such as
    held-out evaluations, a dot per point (its value as a tooltip) joined by a dashed line."""

    name: str
    points: tuple[tuple[float, float], ...]
    color: str
    style: str = "solid"


@dataclass(frozen=True)
class Chart:
    """A titled chart of ``lines``, drawn in order (a faint raw line goes before its smoothed one).

    ``log_y`` asks for a log y axis, which falls back to linear when a value is not positive; ``markers`` are
    ``(step, label)`` vertical lines."""

    title: str
    lines: tuple[Line, ...]
    log_y: bool = False
    markers: tuple[tuple[float, str], ...] = ()


def smooth(points, factor: float) -> list[tuple[float, float]]:
    """``(x, y)`` points smoothed by a local linear fit: each value becomes, at its own row, the least-squares
    line through all the values, the value j rows away weighing ``factor``^|j|.

    The weights are those of an exponential moving average run both ways; fitting a line rather than taking
    their weighted mean keeps the smoothed curve on a falling loss, where a mean trails it (a one-sided EMA lags
    by about factor / (1 − factor) rows) or, near the first rows, sees only the later, lower values and starts
    too low. Values that are all positive are fitted as logarithms, as a log axis shows them; a loss falling
    geometrically comes back unchanged. The weight decays per row, not per step.

    Running sums (``_decayed_moments``) make it one pass each way; ``tests/eval/test_charts.py`` checks it
    against the fit solved row by row.

    >>> [round(y, 4) for _, y in smooth([(1, 0.0), (2, 1.0), (3, 0.0)], 0.5)]  # 2/13, 1/2, 2/13
    [0.1538, 0.5, 0.1538]
    """
    log = all(y > 0 for _, y in points)
    values = [math.log(y) if log else y for _, y in points]
    left = _decayed_moments(values, factor)
    right = _decayed_moments(values[::-1], factor)[::-1]
    fitted = []
    for value, (l0, l1, l2, ly0, ly1), (r0, r1, r2, ry0, ry1) in zip(values, left, right):
        # weighted sums over u = j − i, u ≤ 0 on the left: Σw, Σw·u, Σw·u², Σw·y, Σw·u·y (row i counted once)
        w0, w1, w2, y0, y1 = l0 + r0 - 1, r1 - l1, l2 + r2, ly0 + ry0 - value, ry1 - ly1
        det = w0 * w2 - w1 * w1
        fitted.append((w2 * y0 - w1 * y1) / det if det > 1e-12 else y0 / w0)  # the line's value at u = 0
    return [(x, math.exp(m) if log else m) for (x, _), m in zip(points, fitted)]


def _decayed_moments(values: list[float], factor: float) -> list[tuple[float, ...]]:
    """For each i, Σ_{j ≤ i} factor^d · (1, d, d², v_j, d·v_j) with d = i − j: one step further, every old d
    grows by one, so (d + 1)² = d² + 2d + 1 updates the sums without revisiting the values."""
    moments, s0, s1, s2, t0, t1 = [], 0.0, 0.0, 0.0, 0.0, 0.0
    for value in values:
        s2, s1, t1 = factor * (s2 + 2 * s1 + s0), factor * (s1 + s0), factor * (t1 + t0)
        s0, t0 = factor * s0 + 1, factor * t0 + value
        moments.append((s0, s1, s2, t0, t1))
    return moments


def svg_chart(chart: Chart, *, x_range: tuple[float, float] | None = None, width: int = 480,
              height: int = 220) -> str:
    """``chart`` as an inline SVG with axes, ticks and, for more than one series, a legend.

    Points with a NaN or infinite coordinate are skipped. The plot area is
    ``[MARGIN_LEFT, width - MARGIN_RIGHT] × [MARGIN_TOP, height - MARGIN_BOTTOM]``; ``x_range`` (default: the
    data's) spans its width, and the data's y range, widened by ``Y_PAD`` of its span on each side, its height.
    A single point or a constant series gets a padded range, so nothing divides by zero.
    """
    lines = [Line(line.name, tuple((float(x), float(y)) for x, y in line.points
                                   if math.isfinite(x) and math.isfinite(y)), line.color, line.style)
             for line in chart.lines]
    lines = [line for line in lines if line.points]
    left, right = MARGIN_LEFT, width - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, height - MARGIN_BOTTOM
    # The legend shares the title's row when both fit (rough text widths: no font metrics without a renderer),
    # else it gets a row of its own under the title and the plot starts lower.
    legend_row = 18
    if len(lines) > 1 and left + 8 * len(chart.title) + _legend_width(lines) > right:
        legend_row, top = 36, top + 18
    title = html.escape(chart.title)
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{title}">', f"<title>{title}</title>",
             f'<text x="{left}" y="18" font-weight="600" font-size="13">{title}</text>']
    if not lines:
        parts.append(f'<text x="{(left + right) / 2:g}" y="{(top + bottom) / 2:g}" text-anchor="middle" '
                     'fill="#888">no finite values</text></svg>')
        return "".join(parts)

    ys = [y for line in lines for _, y in line.points]
    log = chart.log_y and min(ys) > 0
    scale = math.log10 if log else float
    y_lo, y_hi = _y_range(ys, log)
    xs = [x for line in lines for x, _ in line.points]
    x_lo, x_hi = _padded_range(*(x_range or (min(xs), max(xs))))

    def px(x: float) -> str:
        return _coord(left + (x - x_lo) / (x_hi - x_lo) * (right - left))

    def py(y: float) -> str:
        return _coord(bottom - (scale(y) - scale(y_lo)) / (scale(y_hi) - scale(y_lo)) * (bottom - top))

    parts.append(f'<g class="y-axis" data-scale="{"log" if log else "linear"}">')
    for value, label in (_log_ticks if log else _linear_ticks)(y_lo, y_hi):
        y = py(value)
        parts.append(f'<line x1="{left}" y1="{y}" x2="{right}" y2="{y}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y}" text-anchor="end" dominant-baseline="middle" '
                     f'fill="#555">{label}</text>')
    parts.append('</g><g class="x-axis">')
    for value, label in _linear_ticks(x_lo, x_hi, integer=True):
        x = px(value)
        parts.append(f'<line x1="{x}" y1="{bottom}" x2="{x}" y2="{bottom + 4}" stroke="#888"/>'
                     f'<text x="{x}" y="{bottom + 16}" text-anchor="middle" fill="#555">{label}</text>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>'
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888"/>'
                 f'<text x="{right}" y="{height - 4}" text-anchor="end" fill="#555">step</text></g>')
    for step, label in chart.markers:
        if x_lo <= step <= x_hi:
            x = px(step)
            parts.append(f'<g class="marker"><line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" stroke="#aaa" '
                         f'stroke-dasharray="3 3"/><text x="{x}" y="{bottom - 5}" dx="4" fill="#888" '
                         f'font-size="10">{html.escape(label)}</text></g>')
    for line in lines:
        parts.append(_series(line, px, py))
    if len(lines) > 1:
        parts.append(_legend(lines, right, legend_row))
    parts.append("</svg>")
    return "".join(parts)


def _series(line: Line, px, py) -> str:
    name = html.escape(line.name)
    coords = " ".join(f"{px(x)},{py(y)}" for x, y in line.points)
    stroke = {"solid": 'stroke-width="2"', "faint": 'stroke-width="1.2" stroke-opacity="0.3"',
              "dots": 'stroke-width="1.2" stroke-dasharray="4 3"'}[line.style]
    parts = [f'<g class="series" data-name="{name}" data-style="{line.style}">'
             f'<polyline fill="none" stroke="{line.color}" {stroke} stroke-linejoin="round" points="{coords}">'
             f"<title>{name}</title></polyline>"]
    if line.style == "dots":
        parts += [f'<circle cx="{px(x)}" cy="{py(y)}" r="4" fill="{line.color}" stroke="#fff" stroke-width="1.5">'
                  f"<title>{name}, step {_number_label(x)}: {_number_label(y)}</title></circle>"
                  for x, y in line.points]
    elif line.style == "solid" and len(line.points) <= MAX_MARKED_POINTS:
        parts += [f'<circle cx="{px(x)}" cy="{py(y)}" r="2.5" fill="{line.color}"/>' for x, y in line.points]
    return "".join(parts) + "</g>"


def _legend_width(lines: list[Line]) -> int:
    return sum(_legend_entry_width(line) for line in lines)


def _legend_entry_width(line: Line) -> int:
    return round(6.5 * len(line.name)) + 30  # a key 18 wide, a gap, the name at about 6.5 a character


def _legend(lines: list[Line], right: int, baseline: int) -> str:
    """Legend entries on the row at ``baseline``, laid out leftwards from the plot's right edge."""
    parts, x, mid = [], right, baseline - 4
    for line in reversed(lines):
        x -= _legend_entry_width(line)
        if line.style == "dots":
            key = (f'<line x1="{x}" y1="{mid}" x2="{x + 18}" y2="{mid}" stroke="{line.color}" '
                   f'stroke-dasharray="4 3"/><circle cx="{x + 9}" cy="{mid}" r="4" fill="{line.color}" '
                   'stroke="#fff" stroke-width="1.5"/>')
        else:
            opacity = ' stroke-opacity="0.3"' if line.style == "faint" else ""
            key = (f'<line x1="{x}" y1="{mid}" x2="{x + 18}" y2="{mid}" stroke="{line.color}" '
                   f'stroke-width="2"{opacity}/>')
        parts.append(f'{key}<text x="{x + 22}" y="{baseline}" fill="#333">{html.escape(line.name)}</text>')
    return '<g class="legend">' + "".join(reversed(parts)) + "</g>"


def _coord(value: float) -> str:
    return trim_zeros(f"{value:.2f}")


def trim_zeros(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_scientific(value: float) -> str:
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{trim_zeros(mantissa)}e{int(exponent)}"


def _number_label(value: float) -> str:
    """Up to six significant digits without an exponent; scientific below 1e-3 and from 1e5."""
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return trim_zeros(f"{value:.6g}")
    return format_scientific(value)


def _padded_range(lo: float, hi: float) -> tuple[float, float]:
    """``(lo, hi)``, widened around the value when it has no width, so scaling never divides by zero."""
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def _y_range(ys: list[float], log: bool) -> tuple[float, float]:
    """The data's range widened by ``Y_PAD`` of its span each side (in decades on a log axis); a linear range of
    values that are all ≥ 0 stops at 0 rather than showing negative ticks nothing can reach."""
    lo, hi = min(ys), max(ys)
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
        pad = (hi - lo) * Y_PAD or 0.05
        return 10 ** (lo - pad), 10 ** (hi + pad)
    if hi == lo:
        return _padded_range(lo, hi)
    pad = (hi - lo) * Y_PAD
    return (max(lo - pad, 0.0) if lo >= 0 else lo - pad), hi + pad


def _linear_ticks(lo: float, hi: float, target: int = 4, integer: bool = False) -> list[tuple[float, str]]:
    """Ticks at multiples of a 1/2/5 × 10^k step inside ``[lo, hi]``, labelled at the step's precision: the
    smallest such step of at least ``(hi - lo) / target``, or a finer one until three ticks fit (``integer``: a
    step of at least 1, for step counts)."""
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    steps = [m * magnitude for m in (0.2, 0.5, 1, 2, 5, 10)]
    i = next(i for i, step in enumerate(steps) if raw <= step)
    while i > 0 and math.floor(hi / steps[i] + 1e-9) - math.ceil(lo / steps[i] - 1e-9) < 2:
        i -= 1
    step = max(steps[i], 1) if integer else steps[i]
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    scientific = step < 1e-3 or max(abs(lo), abs(hi)) >= 1e6
    decimals = max(0, -math.floor(math.log10(step)))
    ticks = []
    for k in range(first, last + 1):
        value = k * step
        if k == 0:
            label = "0"
        elif scientific:
            label = format_scientific(value)
        else:
            label = f"{value:.{decimals}f}"
        ticks.append((value, label))
    return ticks


def _log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """Ticks for a log axis over ``[lo, hi]`` (both > 0): the densest of 10^k, {1, 2, 5} × 10^k and
    {1, …, 9} × 10^k that gives 3 to ``MAX_TICKS`` ticks. Many decades keep every n-th power of ten; a range too
    narrow for three of any of them (inside one decade, such as 10.6 to 10.8) gets linear 1/2/5-step ticks,
    placed on the log scale all the same."""
    k_lo, k_hi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    chosen = None
    for mantissas in ((1,), (1, 2, 5), range(1, 10)):
        values = [m * 10.0 ** k for k in range(k_lo, k_hi + 1) for m in mantissas
                  if lo * (1 - 1e-9) <= m * 10.0 ** k <= hi * (1 + 1e-9)]
        if len(values) > MAX_TICKS:
            if mantissas == (1,):
                chosen = values[::math.ceil(len(values) / MAX_TICKS)]
            break
        if len(values) >= 3:
            chosen = values
    if chosen is None:
        return _linear_ticks(lo, hi)
    return [(value, _number_label(value)) for value in chosen]
