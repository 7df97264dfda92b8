"""The run report: golden SVG coordinates, degenerate series, the before → after table, escaping, offline-ness."""

import math
import os
import re
from html.parser import HTMLParser

import pytest

from tunesmith.eval import report
from tunesmith.eval.report import format_number, metric_charts, svg_line_chart, write_report


def polylines(svg: str) -> list[str]:
    return re.findall(r'<polyline[^>]*points="([^"]*)"', svg)


def svg_coordinates(svg: str) -> list[float]:
    """Every number in polyline points and circle centres."""
    numbers = [n for points in polylines(svg) for n in re.split(r"[ ,]", points)]
    numbers += re.findall(r'c[xy]="([^"]*)"', svg)
    return [float(n) for n in numbers]


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


def test_golden_polyline_coordinates():
    # Plot area x ∈ [56, 624], y ∈ [28, 204]; x 0..20 and y 1..4 span it, so y=2 sits 1/3 up: 204 − 176/3.
    svg = svg_line_chart({"loss": [(0, 4.0), (10, 2.0), (20, 1.0)]}, title="Loss", width=640, height=240)
    assert polylines(svg) == ["56,28 340,145.33 624,204"]
    assert 'viewBox="0 0 640 240"' in svg
    assert "legend" not in svg  # one series needs no legend


def test_series_share_axes_and_get_a_legend():
    svg = svg_line_chart({"loss": [(0, 4.0), (10, 2.0), (20, 1.0)], "eval_loss": [(10, 3.0)]}, title="Loss")
    assert polylines(svg) == ["56,28 340,145.33 624,204", "340,86.67"]
    legend = re.search(r'<g class="legend">(.*?)</g>', svg).group(1)
    assert re.findall(r">([^<]+)</text>", legend) == ["eval_loss", "loss"]


def test_single_point_and_constant_series_sit_mid_plot():
    single = svg_line_chart({"loss": [(3, 2.0)]}, title="one")
    constant = svg_line_chart({"loss": [(0, 5.0), (10, 5.0)]}, title="flat")
    zero = svg_line_chart({"loss": [(0, 0.0), (0, 0.0)]}, title="zero")
    assert polylines(single) == ["340,116"]
    assert polylines(constant) == ["56,116 624,116"]
    assert polylines(zero) == ["340,116 340,116"]
    for svg in (single, constant, zero):
        assert all(math.isfinite(v) for v in svg_coordinates(svg))
        assert not re.search(r"\b(nan|inf)\b", svg, re.IGNORECASE)


def test_non_finite_points_are_skipped():
    svg = svg_line_chart({"loss": [(0, 1.0), (5, math.nan), (10, math.inf), (math.nan, 2.0), (20, 3.0)]},
                         title="Loss")
    assert polylines(svg) == ["56,204 624,28"]
    empty = svg_line_chart({"loss": [(0, math.nan)]}, title="Loss")
    assert polylines(empty) == [] and "no finite values" in empty


def test_tick_labels_use_readable_numbers():
    svg = svg_line_chart({"lr": [(0, 0.0), (100, 2e-4)]}, title="Learning rate")
    labels = re.findall(r'fill="#555">([^<]+)</text>', svg)
    assert labels == ["0", "5e-5", "1e-4", "1.5e-4", "2e-4", "0", "50", "100", "step"]
    assert [format_number(v) for v in (1.23, 0.87 - 1.23, 12345.6, 3.4e-5, 2.5e7, 7)] == \
        ["1.23", "-0.36", "12346", "3.4e-5", "2.5e7", "7"]


def test_metric_charts_group_series_and_keep_only_rows_with_the_key():
    metrics = [{"step": 1, "loss": 3.0, "lr": 1e-4}, {"step": 2, "loss": 2.5, "lr": 2e-4, "eval_loss": 2.8},
               {"step": 3, "loss": 2.0, "lr": 2e-4, "kl": 0.1, "is_best": True, "note": "x"}]
    charts = dict(metric_charts(metrics))
    assert list(charts) == ["Loss", "Learning rate", "KL divergence"]
    assert charts["Loss"] == {"loss": [(1, 3.0), (2, 2.5), (3, 2.0)], "eval_loss": [(2, 2.8)]}


@pytest.fixture()
def report_page(tmp_path):
    metrics = [{"step": s, "loss": 3.0 / s, "lr": 2e-4, "grad_norm": 1.0 + s, "tokens_per_s": 900.0 + s}
               for s in range(1, 6)]
    metrics[2]["eval_loss"] = 1.5
    metrics[4].update(eval_loss=1.2, eval_perplexity=math.exp(1.2), custom_metric=0.5)
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
                 notes=["loss went <down>"])
    assert os.listdir(tmp_path) == ["report.html"]  # the temp file was renamed into place
    return path.read_text(encoding="utf-8")


def test_report_has_every_chart(report_page):
    titles = re.findall(r"<svg[^>]*><title>([^<]+)</title>", report_page)
    assert titles == ["Loss", "Learning rate", "Gradient norm", "Throughput (tokens/s)", "Eval perplexity",
                      "custom_metric"]


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
