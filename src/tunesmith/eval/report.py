"""The run report: one self-contained ``report.html`` (inline CSS and SVG, no scripts, no external resources).

``render_report`` builds the page as a string; ``write_report`` writes it atomically; ``format_before_after`` and
``format_samples`` are the same tables for the terminal. Charts are inline SVG drawn by ``tunesmith.eval.charts``,
so the report opens offline and needs nothing beyond the standard library. The page: run facts beside the
before → after table, the loss on a log axis (raw, smoothed, held-out) and then every other quantity that changes,
in two columns on a wide screen; the held-out samples; the environment and resolved config, folded. Every piece of
user text (titles, prompts, model outputs, config, environment, notes) goes through ``html.escape``.
"""

from __future__ import annotations

import html
import math
import os
import tempfile
from pathlib import Path

from tunesmith.eval.charts import Chart, Line, format_scientific, smooth, svg_chart, trim_zeros
from tunesmith.eval.score import SUBSET_RATES, answers_match

# Series that belong on one chart; the loss has a chart of its own (``loss_chart``), and any other numeric key in
# metrics.jsonl that is neither here nor in NOT_CHARTED gets a chart under its own name.
CHART_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Learning rate", ("lr",)),
    ("Gradient norm", ("grad_norm",)),
    ("Throughput (tokens/s)", ("tokens_per_s",)),
    ("Reward accuracy", ("reward_accuracy",)),
    ("Held-out preference accuracy", ("eval_preference_accuracy",)),
    ("Reward margin", ("margin",)),
    ("Chosen and rejected rewards", ("chosen_reward", "rejected_reward")),
    ("KL divergence", ("kl",)),
)
# Logged but not charted: the epoch becomes markers on the loss chart; cumulative tokens only rise and trained
# tokens per step only echo the batch; the held-out perplexity is exp(eval_loss), which the loss chart's log axis
# already shows; peak memory is a running maximum, shown as one number in the Run table.
NOT_CHARTED = frozenset({"loss", "eval_loss", "epoch", "tokens", "trained_tokens", "skipped", "eval_perplexity",
                         "peak_memory_gib", "peak_reserved_gib"})
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
TRAIN_COLOR, HELD_OUT_COLOR = "#1f77b4", "#e8590c"
# The loss's smoothed line (charts.smooth, from SMOOTH_MIN_POINTS rows on; fewer are shown as they are) weighs
# about 1/SMOOTH_WINDOWS of the rows each side (``smoothing_factor``): the same look for 50 rows as for 5,000.
SMOOTH_MIN_POINTS, SMOOTH_WINDOWS = 10, 10
# The metrics the terminal's before/after table shows first (task rates per subset and per field follow).
HEADLINE_METRICS = ("eval_loss", "perplexity", "chosen_loss", "preference_accuracy", "likelihood_accuracy",
                    "valid_json_rate", "exact_match")
# How the Environment table names summary.json's ``environment`` keys (any other key is shown as it is).
ENVIRONMENT_NAMES = {"python": "Python", "torch": "PyTorch", "transformers": "Transformers", "cuda": "CUDA"}

# One column by default, two from 62rem; the charts scale with their column (the SVG viewBox), a small chart no
# wider than 36rem in one column so its text stays near the page's size, the wide loss chart scrolling sideways
# rather than shrinking its text below about 7px on a phone.
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1280px;
       padding: 1.5rem 1.5rem 3rem; color: #1f2328; }
h1 { font-size: 1.5rem; margin: 0 0 1rem; }
h2 { font-size: 1.1rem; margin: 2rem 0 .6rem; padding-bottom: .3rem; border-bottom: 1px solid #ddd; }
h2.in-grid { margin-top: 0; }
.grid { display: grid; grid-template-columns: minmax(0, 1fr); gap: 1.25rem 2rem; align-items: start; }
.charts > div { max-width: 36rem; }
.charts > .wide { max-width: none; overflow-x: auto; }
.wide svg.chart { min-width: 40rem; }
@media (min-width: 62rem) {
  .grid { grid-template-columns: repeat(2, minmax(0, 1fr)); }
  .grid > .wide { grid-column: 1 / -1; }
  .charts > div { max-width: none; }
}
svg.chart { display: block; width: 100%; height: auto; font-size: 11px; }
.caption { color: #666; font-size: .85rem; margin: .3rem 0 0; }
table { border-collapse: collapse; margin: .25rem 0; }
th, td { border: 1px solid #ddd; padding: .3rem .6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.text { white-space: pre-wrap; max-width: 28rem; font-family: ui-monospace, monospace; font-size: .85rem; }
td.ok { color: #1a7f37; text-align: center; } td.bad { color: #cf222e; text-align: center; }
td.better { color: #1a7f37; } td.worse { color: #cf222e; }
details { margin: .5rem 0; } summary { cursor: pointer; font-weight: 600; padding: .2rem 0; }
pre { background: #f6f8fa; padding: .8rem; overflow-x: auto; font-size: .85rem; }
"""


def metric_charts(metrics: list[dict], before: dict | None = None, after: dict | None = None) -> list[Chart]:
    """The report's charts from metrics.jsonl rows: the loss (``loss_chart``) first, then the groups of
    ``CHART_GROUPS`` and any other numeric key, each only if one of its series takes two or more values."""
    series = _series(metrics)
    charts = [loss_chart(metrics, before, after)] if series.get("loss") or series.get("eval_loss") else []
    grouped = set(NOT_CHARTED)
    groups = []
    for title, keys in CHART_GROUPS:
        grouped.update(keys)
        groups.append((title, [key for key in keys if key in series]))
    groups += [(key, [key]) for key in series if key not in grouped]
    for title, keys in groups:
        if any(len({y for _, y in series[key]}) > 1 for key in keys):
            lines = tuple(Line(key, tuple(series[key]), COLORS[i % len(COLORS)]) for i, key in enumerate(keys))
            charts.append(Chart(title, lines))
    return charts


def loss_chart(metrics: list[dict], before: dict | None, after: dict | None) -> Chart:
    """The loss on a log axis: the logged train loss faint, smoothed (``smoothing_factor``) over it, and the held-out
    loss as dots: ``before``'s at step 0, any ``eval_loss`` rows, ``after``'s at the last logged step (where it
    replaces a row's value: the same model, evaluated once more). Epoch starts are marked."""
    series = _series(metrics)
    train = series.get("loss", [])
    lines = []
    if len(train) >= SMOOTH_MIN_POINTS:
        lines += [Line("train (raw)", tuple(train), TRAIN_COLOR, "faint"),
                  Line("train (smoothed)", tuple(smooth(train, smoothing_factor(len(train)))), TRAIN_COLOR)]
    elif train:
        lines.append(Line("train", tuple(train), TRAIN_COLOR))
    held_out = dict(series.get("eval_loss", []))
    if before and _is_number(before.get("eval_loss")):
        held_out[0] = before["eval_loss"]
    steps = [row["step"] for row in metrics if _is_number(row.get("step"))]
    if after and _is_number(after.get("eval_loss")) and steps:
        held_out[max(steps)] = after["eval_loss"]
    if held_out:
        lines.append(Line("held-out", tuple(sorted(held_out.items())), HELD_OUT_COLOR, "dots"))
    markers, epoch, previous = [], None, None
    for row in metrics:
        if _is_number(row.get("epoch")) and _is_number(row.get("step")):
            if epoch is not None and row["epoch"] > epoch:
                markers.append((previous, f"epoch {int(row['epoch']) + 1}"))
            epoch, previous = row["epoch"], row["step"]
    return Chart("Loss", tuple(lines), log_y=True, markers=tuple(markers))


def smoothing_factor(rows: int) -> float:
    """The smoothing factor for a loss of ``rows`` points: 1 − 1/w for a window of w = rows / ``SMOOTH_WINDOWS``
    rows (at least 2), rounded to three decimals so the caption shows the factor used: 0.5 up to 20 rows, 0.9 at
    100, 0.99 at 1,000."""
    return round(1 - 1 / max(2, rows / SMOOTH_WINDOWS), 3)


def _series(metrics: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Each numeric key's ``(step, value)`` points, from the rows that have it as a finite number."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in metrics:
        step = row.get("step")
        if not _is_number(step):
            continue
        for key, value in row.items():
            if key != "step" and _is_number(value) and math.isfinite(value):
                series.setdefault(key, []).append((step, value))
    return series


def render_report(*, title: str, metrics: list[dict], before: dict | None, after: dict | None,
                  examples: list[dict], config_yaml: str, timing: dict, environment: dict | None = None,
                  notes: list[str] | tuple[str, ...] = (), drops: dict | None = None) -> str:
    """The whole report page as an HTML string (see ``write_report``)."""
    esc = html.escape
    facts = dict(timing)
    peaks = [row["peak_memory_gib"] for row in metrics if _is_number(row.get("peak_memory_gib"))]
    if peaks:
        facts["peak_memory"] = f"{max(peaks):.2f} GiB"
    evaluation = _comparison_table(before, after) if before or after else "<p>No evaluation results.</p>"
    sections = [f"<h1>{esc(title)}</h1>",
                '<div class="grid"><section><h2 class="in-grid">Run</h2>' + _timing_table(facts) + "</section>"
                '<section><h2 class="in-grid">Evaluation: before → after</h2>' + evaluation + "</section></div>"]
    if notes:
        sections.append("<ul>" + "".join(f"<li>{esc(str(note))}</li>" for note in notes) + "</ul>")
    if drops and any(d and d["count"] for d in drops.values()):
        sections += ["<h2>Dropped rows</h2>", _drops_table(drops)]
    sections.append("<h2>Training curves</h2>")
    sections.append(_charts(metrics, before, after) if metrics else "<p>No metrics recorded.</p>")
    sections.append("<h2>Held-out samples</h2>")
    sections.append(_examples_table(examples) if examples else "<p>No examples.</p>")
    sections.append("<h2>Config and environment</h2>")
    if environment:
        sections.append("<details><summary>Environment</summary><table>" + "".join(
            f"<tr><th>{esc(ENVIRONMENT_NAMES.get(key, key))}</th><td>{esc(str(value))}</td></tr>"
            for key, value in environment.items()) + "</table></details>")
    sections.append(f"<details><summary>Config (config.yaml)</summary><pre>{esc(config_yaml)}</pre></details>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def _charts(metrics: list[dict], before: dict | None, after: dict | None) -> str:
    """The charts in a grid, every x axis from step 0 to the last step; the loss chart wide, with its key."""
    charts = metric_charts(metrics, before, after)
    if not charts:
        return "<p>No metrics recorded.</p>"
    steps = [row["step"] for row in metrics if _is_number(row.get("step"))]
    x_range = (0, max(steps)) if steps else None
    parts = []
    for chart in charts:
        if chart.title == "Loss":
            parts.append('<div class="wide">' + svg_chart(chart, x_range=x_range, width=960, height=300)
                         + f'<p class="caption">{_loss_key(chart)}</p></div>')
        else:
            parts.append("<div>" + svg_chart(chart, x_range=x_range) + "</div>")
    return '<div class="grid charts">' + "".join(parts) + "</div>"


def _loss_key(chart: Chart) -> str:
    """The loss chart's caption: its scale, and how each line was drawn."""
    key = ["Log scale." if all(y > 0 for line in chart.lines for _, y in line.points) else "Linear scale."]
    raw = [line for line in chart.lines if line.style == "faint"]
    if raw:
        key.append(f"Faint: the loss at each logged step. Solid: smoothed, a line fitted around each row to the "
                   f"logarithm of the loss, the rows d away weighing {smoothing_factor(len(raw[0].points)):g}^d "
                   "(an exponential moving average run both ways), so it neither lags nor drifts at the ends.")
    if any(line.style == "dots" for line in chart.lines):
        key.append("Dots: held-out loss before training (step 0), during it, and after (the last step).")
    return " ".join(key)


def write_report(path, *, title: str, metrics: list[dict], before: dict | None, after: dict | None,
                 examples: list[dict], config_yaml: str, timing: dict, environment: dict | None = None,
                 notes: list[str] | tuple[str, ...] = (), drops: dict | None = None) -> None:
    """Write the report to ``path`` atomically: a temp file in the same folder, then ``os.replace``.

    ``metrics`` are metrics.jsonl rows (``step`` plus any numeric series); ``before``/``after`` are evaluation
    dicts (a nested ``fields`` dict is shown as ``field: <name>`` rows; either may be None); ``examples`` have
    ``prompt``, ``expected``, ``before``, ``after`` and ``subset`` (any may be missing); ``timing`` is shown as the
    Run table (with the peak memory the metrics logged), ``environment`` (versions, device) as a folded table
    beside the folded config, and ``notes`` as a list; ``drops`` maps a dataset (``train``, ``eval``) to its
    ``PreparedData.drops()`` (or None) and is shown as a table of reasons with the first row or line numbers.
    """
    path = Path(path)
    page = render_report(title=title, metrics=metrics, before=before, after=after, examples=examples,
                         config_yaml=config_yaml, timing=timing, environment=environment, notes=notes,
                         drops=drops)
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
        return format_scientific(value)
    decimals = max(0, 3 - math.floor(math.log10(abs(value))))
    return trim_zeros(f"{value:.{decimals}f}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_rate(key: str) -> bool:
    per_subset = key.startswith(tuple(f"{rate}_" for rate in SUBSET_RATES))
    return per_subset or key.startswith("field: ") or key.endswith(("_rate", "accuracy", "exact_match"))


def _lower_is_better(key: str) -> bool:
    return "loss" in key or "perplexity" in key


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
