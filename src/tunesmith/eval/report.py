"""The run report: one self-contained ``report.html`` (inline CSS and SVG, no scripts, no external resources).

``render_report`` builds the page as a string; ``write_report`` writes it atomically; ``format_before_after`` and
``format_samples`` are the same tables for the terminal. Charts are drawn by
``svg_line_chart`` so the report opens offline and needs nothing beyond the standard library. Every piece of
user text (titles, prompts, model outputs, config, notes) goes through ``html.escape``.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from pathlib import Path

from tunesmith.eval.score import SUBSET_RATES, answers_match

# Series that belong on one chart; any other numeric key in metrics.jsonl gets a chart of its own.
CHART_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Loss", ("loss", "eval_loss")),
    ("Learning rate", ("lr",)),
    ("Gradient norm", ("grad_norm",)),
    ("Throughput (tokens/s)", ("tokens_per_s",)),
    ("Eval perplexity", ("eval_perplexity",)),
    ("Reward accuracy", ("reward_accuracy",)),
    ("Reward margin", ("margin",)),
    ("Chosen and rejected rewards", ("chosen_reward", "rejected_reward")),
    ("KL divergence", ("kl",)),
)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
# Plot-area margins inside the SVG: room for the title and legend above, tick labels left and below.
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 28, 36
MAX_MARKED_POINTS = 30  # sparse series (eval every N steps) get a dot per point so single points show
# The metrics the terminal's before/after table shows first (task rates per subset and per field follow).
HEADLINE_METRICS = ("eval_loss", "perplexity", "chosen_loss", "preference_accuracy", "likelihood_accuracy",
                    "valid_json_rate", "exact_match")

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5rem 0; }
th, td { border: 1px solid #ddd; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; max-width: 28rem; font-family: ui-monospace, monospace; font-size: .85rem; }
td.ok { color: #1a7f37; text-align: center; } td.bad { color: #cf222e; text-align: center; }
td.better { color: #1a7f37; } td.worse { color: #cf222e; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .85rem; }
.charts { display: flex; flex-wrap: wrap; gap: 1rem; }
svg.chart { background: #fff; border: 1px solid #eee; font-size: 11px; }
"""


def svg_line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, width: int = 640,
                   height: int = 240) -> str:
    """An inline SVG line chart of ``series`` (name → ``(x, y)`` points), with axes, ticks and a legend.

    Points with a NaN or infinite coordinate are skipped. A single point or a constant series gets a
    padded axis range, so nothing divides by zero. The plot area is
    ``[MARGIN_LEFT, width - MARGIN_RIGHT] × [MARGIN_TOP, height - MARGIN_BOTTOM]``; the smallest x maps to
    its left edge and the largest y to its top edge.
    """
    finite = {name: [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
              for name, points in series.items()}
    finite = {name: points for name, points in finite.items() if points}
    left, right = MARGIN_LEFT, width - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, height - MARGIN_BOTTOM
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{html.escape(title)}">',
             f"<title>{html.escape(title)}</title>",
             f'<text x="{left}" y="18" font-weight="bold" font-size="13">{html.escape(title)}</text>']
    if not finite:
        parts.append(f'<text x="{(left + right) / 2:g}" y="{(top + bottom) / 2:g}" text-anchor="middle" '
                     'fill="#888">no finite values</text></svg>')
        return "".join(parts)

    all_points = [p for points in finite.values() for p in points]
    x_lo, x_hi = _padded_range(min(x for x, _ in all_points), max(x for x, _ in all_points))
    y_lo, y_hi = _padded_range(min(y for _, y in all_points), max(y for _, y in all_points))

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)

    for value, label in _ticks(y_lo, y_hi):
        y = _coord(py(value))
        parts.append(f'<line x1="{left}" y1="{y}" x2="{right}" y2="{y}" stroke="#eee"/>'
                     f'<text x="{left - 6}" y="{y}" text-anchor="end" dominant-baseline="middle" '
                     f'fill="#555">{label}</text>')
    for value, label in _ticks(x_lo, x_hi):
        x = _coord(px(value))
        parts.append(f'<line x1="{x}" y1="{bottom}" x2="{x}" y2="{bottom + 4}" stroke="#888"/>'
                     f'<text x="{x}" y="{bottom + 16}" text-anchor="middle" fill="#555">{label}</text>')
    parts.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>'
                 f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888"/>'
                 f'<text x="{right}" y="{height - 4}" text-anchor="end" fill="#555">step</text>')

    for i, (name, points) in enumerate(finite.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{_coord(px(x))},{_coord(py(y))}" for x, y in points)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}">'
                     f"<title>{html.escape(name)}</title></polyline>")
        if len(points) <= MAX_MARKED_POINTS:
            parts.extend(f'<circle cx="{_coord(px(x))}" cy="{_coord(py(y))}" r="2.5" fill="{color}"/>'
                         for x, y in points)
    if len(finite) > 1:
        parts.append(_legend(list(finite), right))
    parts.append("</svg>")
    return "".join(parts)


def metric_charts(metrics: list[dict]) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """``(title, series)`` per chart from metrics.jsonl rows; a series holds only the rows that have its key."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in metrics:
        step = row.get("step")
        if not _is_number(step):
            continue
        for key, value in row.items():
            if key != "step" and _is_number(value):
                series.setdefault(key, []).append((step, value))
    charts = []
    grouped = set()
    for title, keys in CHART_GROUPS:
        present = {key: series[key] for key in keys if key in series}
        grouped.update(keys)
        if present:
            charts.append((title, present))
    charts += [(key, {key: points}) for key, points in series.items() if key not in grouped]
    return charts


def render_report(*, title: str, metrics: list[dict], before: dict | None, after: dict | None,
                  examples: list[dict], config_yaml: str, timing: dict,
                  notes: list[str] | tuple[str, ...] = (), drops: dict | None = None) -> str:
    """The whole report page as an HTML string (see ``write_report``)."""
    esc = html.escape
    charts = metric_charts(metrics)
    sections = [f"<h1>{esc(title)}</h1>", "<h2>Run</h2>", _timing_table(timing)]
    if notes:
        sections.append("<ul>" + "".join(f"<li>{esc(str(note))}</li>" for note in notes) + "</ul>")
    if drops and any(d and d["count"] for d in drops.values()):
        sections += ["<h2>Dropped rows</h2>", _drops_table(drops)]
    sections.append("<h2>Evaluation: before → after</h2>")
    sections.append(_comparison_table(before, after) if before or after else "<p>No evaluation results.</p>")
    sections.append("<h2>Training curves</h2>")
    sections.append('<div class="charts">' + "".join(svg_line_chart(s, title=t) for t, s in charts) + "</div>"
                    if charts else "<p>No metrics recorded.</p>")
    sections.append("<h2>Held-out samples</h2>")
    sections.append(_examples_table(examples) if examples else "<p>No examples.</p>")
    sections.append(f"<h2>Config</h2><pre>{esc(config_yaml)}</pre>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def write_report(path, *, title: str, metrics: list[dict], before: dict | None, after: dict | None,
                 examples: list[dict], config_yaml: str, timing: dict,
                 notes: list[str] | tuple[str, ...] = (), drops: dict | None = None) -> None:
    """Write the report to ``path`` atomically: a temp file in the same folder, then ``os.replace``.

    ``metrics`` are metrics.jsonl rows (``step`` plus any numeric series); ``before``/``after`` are evaluation
    dicts (a nested ``fields`` dict is shown as ``field: <name>`` rows; either may be None); ``examples`` have
    ``prompt``, ``expected``, ``before``, ``after`` and ``subset`` (any may be missing); ``timing`` is shown as a table and
    ``notes`` as a list; ``drops`` maps a dataset (``train``, ``eval``) to its ``PreparedData.drops()`` (or None)
    and is shown as a table of reasons with the first row or line numbers.
    """
    path = Path(path)
    page = render_report(title=title, metrics=metrics, before=before, after=after, examples=examples,
                         config_yaml=config_yaml, timing=timing, notes=notes, drops=drops)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def format_number(value) -> str:
    """Up to four significant digits without an exponent; scientific only for very large or small values."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return _scientific(value)
    decimals = max(0, 3 - math.floor(math.log10(abs(value))))
    return _trim(f"{value:.{decimals}f}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rate(key: str) -> bool:
    per_subset = key.startswith(tuple(f"{rate}_" for rate in SUBSET_RATES))
    return per_subset or key.startswith("field: ") or key.endswith(("_rate", "accuracy", "exact_match"))


def _lower_is_better(key: str) -> bool:
    return "loss" in key or "perplexity" in key


def _trim(text: str) -> str:
    return text.rstrip("0").rstrip(".") if "." in text else text


def _scientific(value: float) -> str:
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{_trim(mantissa)}e{int(exponent)}"


def _coord(value: float) -> str:
    return _trim(f"{value:.2f}")


def _padded_range(lo: float, hi: float) -> tuple[float, float]:
    """``(lo, hi)``, widened around the value when it has no width, so scaling never divides by zero."""
    if hi > lo:
        return lo, hi
    pad = abs(lo) * 0.1 or 1.0
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, target: int = 4) -> list[tuple[float, str]]:
    """Tick values at multiples of a 1/2/5 × 10^k step inside ``[lo, hi]``, with labels at the step's precision."""
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if raw <= m * magnitude)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    scientific = step < 1e-3 or max(abs(lo), abs(hi)) >= 1e6
    decimals = max(0, -math.floor(math.log10(step)))
    ticks = []
    for k in range(first, last + 1):
        value = k * step
        if k == 0:
            label = "0"
        elif scientific:
            label = _scientific(value)
        else:
            label = f"{value:.{decimals}f}"
        ticks.append((value, label))
    return ticks


def _legend(names: list[str], right: int) -> str:
    """Legend entries in the title row, laid out leftwards from the plot's right edge."""
    parts, x = [], right
    for i in reversed(range(len(names))):
        x -= 7 * len(names[i]) + 26  # a rough text width: no font metrics without a renderer
        color = COLORS[i % len(COLORS)]
        parts.append(f'<line x1="{x}" y1="14" x2="{x + 16}" y2="14" stroke="{color}" stroke-width="2"/>'
                     f'<text x="{x + 20}" y="18" fill="#333">{html.escape(names[i])}</text>')
    return '<g class="legend">' + "".join(parts) + "</g>"


def _flatten_eval(result: dict | None) -> dict:
    flat = {}
    for key, value in (result or {}).items():
        if key == "fields" and isinstance(value, dict):
            flat.update({f"field: {name}": v for name, v in value.items()})
        else:
            flat[key] = value
    return flat


def _format_metric(key: str, value) -> str:
    if value is None:
        return "—"
    if _is_rate(key) and _is_number(value):
        return f"{value * 100:.1f}%"
    return format_number(value)


def _format_change(key: str, old, new) -> tuple[str, str]:
    """The change cell's text and its CSS class (better / worse, when the direction is known)."""
    if not (_is_number(old) and _is_number(new)) or not math.isfinite(new - old):
        return "—", ""
    delta = new - old
    if _is_rate(key):
        text = f"{delta * 100:+.1f} pp"
    else:
        text = ("+" if delta > 0 else "") + format_number(delta)
        if old != 0:
            text += f" ({delta / abs(old) * 100:+.1f}%)"
    if delta == 0 or not (_is_rate(key) or _lower_is_better(key)):
        return text, ""
    improved = delta < 0 if _lower_is_better(key) else delta > 0
    return text, "better" if improved else "worse"


def _comparison_table(before: dict | None, after: dict | None) -> str:
    old, new = _flatten_eval(before), _flatten_eval(after)
    rows = ["<table><tr><th>metric</th><th>before</th><th>after</th><th>change</th></tr>"]
    for key in list(old) + [k for k in new if k not in old]:
        change, css = _format_change(key, old.get(key), new.get(key))
        rows.append(f"<tr><td>{html.escape(key)}</td>"
                    f'<td class="num">{html.escape(_format_metric(key, old.get(key)))}</td>'
                    f'<td class="num">{html.escape(_format_metric(key, new.get(key)))}</td>'
                    f'<td class="num {css}">{html.escape(change)}</td></tr>')
    return "".join(rows) + "</table>"


def _mark(output, expected) -> str:
    """✓ when the answer is an exact match as the task metrics count it (``tunesmith.eval.score``)."""
    if output is None or expected is None:
        return "<td></td>"
    if answers_match(str(output), str(expected)):
        return '<td class="ok" title="matches expected">✓</td>'
    return '<td class="bad" title="differs from expected">✗</td>'


def _examples_table(examples: list[dict]) -> str:
    """Prompt, expected, and each output present in any example (before, after), with a ✓/✗ cell per output;
    a subset column when any example names one."""
    outputs = [key for key in ("before", "after") if any(key in ex for ex in examples)]
    subsets = any(ex.get("subset") for ex in examples)
    header = "<th>#</th>" + ("<th>subset</th>" if subsets else "") + "<th>prompt</th><th>expected</th>" + "".join(
        f"<th>{key}</th><th>match</th>" for key in outputs)
    rows = [f"<table><tr>{header}</tr>"]
    for i, example in enumerate(examples, 1):
        expected = example.get("expected")
        cells = [f'<td class="num">{i}</td>'] + ([_text_cell(example.get("subset"))] if subsets else [])
        cells += [_text_cell(example.get("prompt")), _text_cell(expected)]
        for key in outputs:
            cells += [_text_cell(example.get(key)), _mark(example.get(key), expected)]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(rows) + "</table>"


def _text_cell(value) -> str:
    return '<td class="text">' + ("—" if value is None else html.escape(str(value))) + "</td>"


def _drops_table(drops: dict) -> str:
    rows = ["<table><tr><th>data</th><th>reason</th><th>rows</th><th>first</th></tr>"]
    for data, found in drops.items():
        for reason, d in (found or {"by_reason": {}})["by_reason"].items():
            more = ", …" if d["count"] > len(d["first"]) else ""
            unit = found["unit"] + ("s" if d["count"] > 1 else "")
            first = f"{unit} " + ", ".join(map(str, d["first"])) + more
            rows.append(f"<tr><td>{html.escape(data)}</td><td>{html.escape(reason)}</td>"
                        f'<td class="num">{d["count"]}</td><td>{html.escape(first)}</td></tr>')
    return "".join(rows) + "</table>"


def _timing_table(timing: dict) -> str:
    rows = ["<table>"]
    for key, value in timing.items():
        if key.endswith("_seconds") and _is_number(value):
            text = _format_duration(value)
        else:
            text = format_number(value)
        rows.append(f"<tr><th>{html.escape(key.replace('_', ' '))}</th><td>{html.escape(text)}</td></tr>")
    return "".join(rows) + "</table>"


def _format_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {rest} s" if hours else f"{minutes} min {rest} s"


def format_before_after(before: dict | None, after: dict) -> str:
    """A plain-text before/after table of the headline metrics, then the task rates per subset and per field."""
    old, new = _flatten_eval(before), _flatten_eval(after)
    keys = [key for key in HEADLINE_METRICS if key in new]
    keys += [key for key in new if key not in keys and _is_rate(key) and _is_number(new[key])]
    width = max([16] + [len(key) + 1 for key in keys])
    lines = [f"{'metric':<{width}}{'before':>12}{'after':>12}"]
    for key in keys:
        lines.append(f"{key:<{width}}{_format_metric(key, old.get(key)):>12}{_format_metric(key, new[key]):>12}")
    return "\n".join(lines)


def format_samples(samples: list[dict]) -> str:
    """Scored rows for the terminal: the prompt, the expected answer and each answer with ✓ / ✗."""
    blocks = []
    for sample in samples:
        subset = f" [{sample['subset']}]" if sample.get("subset") else ""
        lines = [f"row {sample['row']}{subset}", f"  prompt   : {sample['prompt']}",
                 f"  expected : {sample['expected']}"]
        for key in ("before", "after"):
            if key in sample:
                mark = "✓" if answers_match(sample[key], sample["expected"]) else "✗"
                lines.append(f"  {key:<9}: {sample[key]}  {mark}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
