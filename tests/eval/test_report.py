"""The run report: which charts exist and how the loss is drawn, the page's layout, the before → after table,
the samples, escaping, offline-ness."""

import math
import os
import re
from html.parser import HTMLParser

import pytest

from tunesmith.eval import report
from tunesmith.eval.report import format_number, metric_charts, write_report


class TableCells(HTMLParser):
    """Text of each table row's cells, one list per row."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def table_rows(page: str) -> list[list[str]]:
    parser = TableCells()
    parser.feed(page)
    return parser.rows


# A 20-step, two-epoch run: the loss falls from 4.4 to 0.052, zig-zagging; held-out loss at steps 0, 10 and 20
LOSSES = [4 * 0.8 ** (step - 1) * (1.1 if step % 2 else 0.9) for step in range(1, 21)]
ENVIRONMENT = {"python": "3.11.7", "tunesmith": "0.1.0", "torch": "2.13.0+cpu", "transformers": "5.25.0",
               "device": "GPU <80GB> & co", "dtype": "bfloat16"}


def chart_svgs(page: str) -> dict[str, str]:
    """Each chart's SVG by its title, in page order."""
    svgs = re.findall(r'<svg class="chart".*?</svg>', page)
    return {re.search(r"<title>([^<]+)</title>", svg).group(1): svg for svg in svgs}


def y_axis(svg: str) -> tuple[str, list[str]]:
    scale, body = re.search(r'<g class="y-axis" data-scale="(\w+)">(.*?)</g>', svg).groups()
    return scale, re.findall(r">([^<]+)</text>", body)


def series(svg: str) -> list[tuple[str, str]]:
    return re.findall(r'<g class="series" data-name="([^"]+)" data-style="(\w+)">', svg)


def test_metric_charts_keep_series_that_change_and_mean_something():
    metrics = [{"step": 1, "epoch": 0, "loss": 3.0, "lr": 1e-4, "tokens": 10, "trained_tokens": 4, "kl": 0.0},
               {"step": 2, "epoch": 0, "loss": 2.5, "lr": 2e-4, "tokens": 20, "trained_tokens": 4, "kl": 0.0,
                "eval_loss": 2.8, "eval_perplexity": 16.4},
               {"step": 3, "epoch": 0, "loss": 2.0, "lr": 2e-4, "tokens": 30, "trained_tokens": 5, "kl": 0.0,
                "margin": 0.1, "is_best": True, "note": "x"}]
    charts = metric_charts(metrics, before={"eval_loss": 3.1}, after={"eval_loss": 2.2})
    # kl is constant, margin has one value; epoch, tokens, trained_tokens and eval_perplexity never get a chart
    assert [chart.title for chart in charts] == ["Loss", "Learning rate"]
    loss = charts[0]
    assert loss.log_y and loss.markers == ()
    # too few rows to smooth: the loss as it is; held-out loss before (step 0), during, and after (the last step)
    assert [(line.name, line.style, line.points) for line in loss.lines] == [
        ("train", "solid", ((1, 3.0), (2, 2.5), (3, 2.0))),
        ("held-out", "dots", ((0, 3.1), (2, 2.8), (3, 2.2)))]
    assert charts[1].lines[0].points == ((1, 1e-4), (2, 2e-4), (3, 2e-4))


def test_held_out_after_replaces_the_last_rows_evaluation():
    metrics = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "eval_loss": 2.51}]
    held_out = report.loss_chart(metrics, before=None, after={"eval_loss": 2.5}).lines[-1]
    assert held_out.points == ((2, 2.5),)
    assert report.loss_chart(metrics, before=None, after=None).lines[-1].points == ((2, 2.51),)


def test_non_finite_losses_are_left_out_before_smoothing():
    # a skipped step logs its loss as null (MetricsLog); a NaN would poison every smoothed value after it
    metrics = [{"step": s, "loss": 2.0} for s in range(1, 13)]
    metrics[1]["loss"], metrics[2]["loss"] = None, math.nan
    raw, smoothed = report.loss_chart(metrics, before=None, after=None).lines
    assert [x for x, _ in raw.points] == [1] + list(range(4, 13))
    assert [y for _, y in smoothed.points] == pytest.approx([2.0] * 10)


def test_smoothing_factor_follows_the_run_length():
    assert [report.smoothing_factor(rows) for rows in (10, 20, 48, 100, 1000)] == [0.5, 0.5, 0.792, 0.9, 0.99]


@pytest.fixture()
def report_page(tmp_path):
    metrics = [{"step": s, "epoch": (s - 1) // 10, "loss": LOSSES[s - 1], "lr": 2e-4 * (1 - s / 20),
                "grad_norm": 1.0 + s % 3, "tokens": 100 * s, "trained_tokens": 40, "tokens_per_s": 900.0 + s,
                "skipped": False, "const_metric": 0.5, "peak_memory_gib": 1.0 + s / 40} for s in range(1, 21)]
    metrics[9].update(eval_loss=0.5, eval_perplexity=math.exp(0.5), custom_metric=0.25)
    metrics[19].update(custom_metric=0.5)
    before = {"eval_loss": 1.23, "perplexity": 3.4, "valid_json_rate": 0.1, "exact_match": 0.05,
              "fields": {"name": 0.2, "date": 0.0}}
    after = {"eval_loss": 0.87, "perplexity": 2.4, "valid_json_rate": 0.92, "exact_match": 0.6,
             "fields": {"name": 0.9, "date": 0.75}}
    examples = [{"prompt": 'Book <script>alert("x")</script> & go', "before": "nope",
                 "after": '  {"name": "Ann"}\n', "expected": '{"name": "Ann"}', "subset": "unseen"},
                {"prompt": "second", "after": "wrong", "expected": "right", "subset": "seen"},
                {"prompt": "no expected answer", "before": "a", "after": "b"},
                {"prompt": "same JSON, other spelling", "before": '```json\n{"n":1,"m":[true]}\n```',
                 "after": '{"m": [1], "n": 1}', "expected": '{"m": [true], "n": 1}'}]
    path = tmp_path / "report.html"
    path.write_text("old report")
    write_report(path, title="Run <1> & co", metrics=metrics, before=before, after=after, examples=examples,
                 config_yaml="lora:\n  r: 8  # <b>&</b>\n", timing={"train_seconds": 201.3, "device": "cpu"},
                 environment=ENVIRONMENT, notes=["loss went <down>"])
    assert os.listdir(tmp_path) == ["report.html"]  # the temp file was renamed into place
    return path.read_text(encoding="utf-8")


def test_report_charts_only_what_changes_and_means_something(report_page):
    # not charted: epoch (markers instead), cumulative tokens, trained tokens per step, a constant series,
    # the held-out perplexity (exp of the held-out loss), peak memory (a number in the Run table)
    assert list(chart_svgs(report_page)) == ["Loss", "Learning rate", "Gradient norm", "Throughput (tokens/s)",
                                             "custom_metric"]
    assert ["peak memory", "1.50 GiB"] in table_rows(report_page)


def test_loss_chart_is_log_with_smoothed_raw_and_held_out(report_page):
    loss = chart_svgs(report_page)["Loss"]
    assert y_axis(loss) == ("log", ["0.05", "0.1", "0.2", "0.5", "1", "2", "5"])
    assert series(loss) == [("train (raw)", "faint"), ("train (smoothed)", "solid"), ("held-out", "dots")]
    raw, smoothed, held_out = re.findall(r'points="([^"]*)"', loss)
    assert len(raw.split()) == len(smoothed.split()) == 20
    # x 0..20 over the wide chart's 888 px from 56: the held-out points at steps 0, 10 and 20
    assert re.findall(r'<circle cx="([^"]+)"[^>]*><title>(held-out[^<]*)</title>', loss) == [
        ("56", "held-out, step 0: 1.23"), ("500", "held-out, step 10: 0.5"), ("944", "held-out, step 20: 0.87")]
    assert re.findall(r'<g class="marker">.*?>([^<]+)</text></g>', loss) == ["epoch 2"]
    assert 'viewBox="0 0 960 300"' in loss
    caption = re.search(r'<p class="caption">([^<]*)</p>', report_page).group(1)
    assert caption.startswith("Log scale. Faint: the loss at each logged step. Solid: smoothed")
    assert "the rows d away weighing 0.5^d" in caption
    assert caption.endswith("Dots: held-out loss before training (step 0), during it, and after (the last step).")


def test_other_charts_are_linear_and_share_the_step_axis(report_page):
    charts = chart_svgs(report_page)
    assert y_axis(charts["Learning rate"]) == ("linear", ["0", "5e-5", "1e-4", "1.5e-4"])
    for title in ("Learning rate", "Gradient norm", "Throughput (tokens/s)", "custom_metric"):
        assert 'viewBox="0 0 480 220"' in charts[title]
        assert re.search(r'<g class="x-axis">.*?>0</text>.*?>20</text>', charts[title])  # steps 0 to 20


def test_charts_sit_in_two_columns_on_a_wide_screen(report_page):
    css = re.search(r"<style>(.*?)</style>", report_page, re.S).group(1)
    assert ".grid { display: grid; grid-template-columns: minmax(0, 1fr);" in css  # one column by default
    wide = re.search(r"@media \(min-width: 62rem\) \{(.*?)\n\}", css, re.S).group(1)
    assert ".grid { grid-template-columns: repeat(2, minmax(0, 1fr)); }" in wide
    assert ".grid > .wide { grid-column: 1 / -1; }" in wide
    assert "svg.chart { display: block; width: 100%; height: auto;" in css  # scales with the column
    charts = re.search(r'<div class="grid charts">(.*?)</div>\n', report_page, re.S).group(1)
    assert re.findall(r'<div( class="wide")?><svg class="chart"[^>]*aria-label="([^"]+)"', charts) == [
        (' class="wide"', "Loss"), ("", "Learning rate"), ("", "Gradient norm"), ("", "Throughput (tokens/s)"),
        ("", "custom_metric")]


def test_environment_and_config_are_folded(report_page):
    folded = re.findall(r"<details><summary>([^<]+)</summary>(.*?)</details>", report_page, re.S)
    assert [summary for summary, _ in folded] == ["Environment", "Config (config.yaml)"]
    assert table_rows(folded[0][1]) == [["Python", "3.11.7"], ["tunesmith", "0.1.0"], ["PyTorch", "2.13.0+cpu"],
                                        ["Transformers", "5.25.0"], ["device", "GPU <80GB> & co"],
                                        ["dtype", "bfloat16"]]
    assert "<td>GPU &lt;80GB&gt; &amp; co</td>" in folded[0][1]
    assert folded[1][1] == "<pre>lora:\n  r: 8  # &lt;b&gt;&amp;&lt;/b&gt;\n</pre>"


def test_numbers_are_readable():
    assert [format_number(v) for v in (1.23, 0.87 - 1.23, 12345.6, 3.4e-5, 2.5e7, 7)] == \
        ["1.23", "-0.36", "12346", "3.4e-5", "2.5e7", "7"]


def test_before_after_table_formats_rates_and_changes(report_page):
    rows = table_rows(report_page)
    assert ["metric", "before", "after", "change"] in rows
    assert ["eval_loss", "1.23", "0.87", "-0.36 (-29.3%)"] in rows
    assert ["perplexity", "3.4", "2.4", "-1 (-29.4%)"] in rows
    assert ["valid_json_rate", "10.0%", "92.0%", "+82.0 pp"] in rows
    assert ["exact_match", "5.0%", "60.0%", "+55.0 pp"] in rows
    assert ["field: name", "20.0%", "90.0%", "+70.0 pp"] in rows
    assert ["field: date", "0.0%", "75.0%", "+75.0 pp"] in rows
    assert ["train seconds", "3 min 21 s"] in rows and ["device", "cpu"] in rows


def test_missing_before_shows_dashes(tmp_path):
    path = tmp_path / "report.html"
    write_report(path, title="t", metrics=[], before=None, after={"exact_match": 0.5}, examples=[],
                 config_yaml="", timing={})
    page = path.read_text(encoding="utf-8")
    assert ["exact_match", "—", "50.0%", "—"] in table_rows(page)
    assert "No metrics recorded." in page and "No examples." in page


def test_user_text_is_escaped_and_nothing_is_external(report_page):
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; go" in report_page
    assert "<script" not in report_page.lower()
    assert "<title>Run &lt;1&gt; &amp; co</title>" in report_page
    assert "# &lt;b&gt;&amp;&lt;/b&gt;" in report_page and "loss went &lt;down&gt;" in report_page
    assert "http://" not in report_page and "https://" not in report_page
    assert not re.search(r"\b(src|href)=|@import|url\(", report_page)


def test_samples_are_marked_against_expected_as_the_task_metrics_count(report_page):
    rows = table_rows(report_page)
    assert ["#", "subset", "prompt", "expected", "before", "match", "after", "match"] in rows
    first, second, third, fourth = (row for row in rows if row and row[0] in ("1", "2", "3", "4"))
    assert first[1] == "unseen" and second[1] == "seen" and third[1] == "—"
    assert first[5:] == ["✗", '  {"name": "Ann"}\n', "✓"]  # equal after strip
    assert second[4:] == ["—", "", "wrong", "✗"]  # no before output: no mark
    assert third[5] == "" and third[7] == ""  # no expected answer: nothing to mark
    # JSON answers match on values with their types: a fenced, reordered object matches; 1 is not true
    assert fourth[5] == "✓" and fourth[7] == "✗"
    assert report_page.count("✓") == 2 and report_page.count("✗") == 3


def test_subset_rates_are_rates(tmp_path):
    path = tmp_path / "report.html"
    write_report(path, title="t", metrics=[], config_yaml="", timing={}, examples=[],
                 before={"exact_match_unseen": 0.25, "valid_json_rate_unseen": 0.5},
                 after={"exact_match_unseen": 0.75, "valid_json_rate_unseen": 1.0})
    rows = table_rows(path.read_text(encoding="utf-8"))
    assert ["exact_match_unseen", "25.0%", "75.0%", "+50.0 pp"] in rows
    assert ["valid_json_rate_unseen", "50.0%", "100.0%", "+50.0 pp"] in rows
    table = report.format_before_after({"eval_loss": 2.0, "exact_match": 0.0, "fields": {"city": 0.5}},
                                       {"eval_loss": 1.5, "exact_match": 0.5, "exact_match_unseen": 0.25,
                                        "fields": {"city": 1.0}, "eval_tokens": 40})
    assert table.splitlines() == ["metric                   before       after",
                                  "eval_loss                     2         1.5",
                                  "exact_match                0.0%       50.0%",
                                  "exact_match_unseen            —       25.0%",
                                  "field: city               50.0%      100.0%"]


def test_failed_write_keeps_the_old_report(tmp_path, monkeypatch):
    path = tmp_path / "report.html"
    path.write_text("old report")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(path, title="t", metrics=[], before=None, after=None, examples=[], config_yaml="",
                     timing={})
    assert path.read_text() == "old report"
    assert os.listdir(tmp_path) == ["report.html"]
