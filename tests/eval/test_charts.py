"""The report's SVG charts: golden coordinates on linear and log axes, log ticks, smoothing, degenerate series."""

import math
import random
import re

import pytest

from tunesmith.eval.charts import Chart, Line, smooth, svg_chart

# width 472, height 334: the plot area is x ∈ [56, 456] (400 px), y ∈ [30, 300] (270 px)
SIZE = {"width": 472, "height": 334}


def polylines(svg: str) -> list[str]:
    return re.findall(r'<polyline[^>]*points="([^"]*)"', svg)


def y_ticks(svg: str) -> tuple[str, list[str]]:
    """The y axis's scale and its tick labels, bottom to top."""
    scale, body = re.search(r'<g class="y-axis" data-scale="(\w+)">(.*?)</g>', svg).groups()
    return scale, re.findall(r">([^<]+)</text>", body)


def x_ticks(svg: str) -> list[str]:
    body = re.search(r'<g class="x-axis">(.*?)</g>', svg).group(1)
    return re.findall(r">([^<]+)</text>", body)


def chart(*points, log_y=False, **kwargs) -> Chart:
    return Chart("Loss", (Line("loss", tuple(points), "#000"),), log_y=log_y, **kwargs)


def test_golden_coordinates_on_a_linear_axis():
    # y 1..26, widened by 4% of 25 each side to 0..27: 10 px a unit; x 0..20 over 400 px
    svg = svg_chart(chart((0, 1.0), (10, 13.5), (20, 26.0)), **SIZE)
    assert polylines(svg) == ["56,290 256,165 456,40"]
    assert y_ticks(svg) == ("linear", ["0", "10", "20"])
    assert x_ticks(svg) == ["0", "5", "10", "15", "20", "step"]
    assert 'viewBox="0 0 472 334"' in svg
    assert "legend" not in svg  # one series needs no legend


def test_golden_coordinates_and_decade_ticks_on_a_log_axis():
    # 10^0..10^2 widened by 0.08 decades each side: 2.16 decades over 270 px, 125 px a decade
    svg = svg_chart(chart((0, 1.0), (10, 10.0), (20, 100.0), log_y=True), **SIZE)
    assert polylines(svg) == ["56,290 256,165 456,40"]
    assert y_ticks(svg) == ("log", ["1", "2", "5", "10", "20", "50", "100"])
    assert '<text x="50" y="252.37"' in svg  # 2 sits log10(2) + 0.08 decades above the bottom: 300 − 47.63


@pytest.mark.parametrize(("lo", "hi", "labels"), [
    (1e-6, 1e4, ["1e-6", "1e-4", "0.01", "1", "100", "10000"]),  # many decades: every other power of ten
    (0.02, 3.0, ["0.02", "0.05", "0.1", "0.2", "0.5", "1", "2"]),  # 1, 2, 5 × 10^k
    (1.2, 4.0, ["2", "3", "4"]),  # inside a decade: every integer multiple of 10^k
    (10.66, 10.81, ["10.70", "10.75", "10.80"]),  # too narrow for those: linear steps, on the log scale
])
def test_log_axis_ticks(lo, hi, labels):
    svg = svg_chart(chart((0, lo), (1, hi), log_y=True))
    assert y_ticks(svg) == ("log", labels)


def test_log_axis_falls_back_to_linear_for_values_that_are_not_positive():
    svg = svg_chart(chart((0, 0.0), (10, 2.0), log_y=True), **SIZE)
    assert y_ticks(svg)[0] == "linear"
    # values ≥ 0: the axis starts at 0 rather than 4% of the span below it; 2 sits at 300 − 2/2.08·270
    assert polylines(svg) == ["56,300 456,40.38"]


def test_styles_legend_markers_and_x_range():
    lines = (Line("raw", ((0, 4.0), (10, 2.0)), "#00f", "faint"),
             Line("smoothed", ((0, 3.0), (10, 2.5)), "#00f"),
             Line("held-out", ((0, 3.5), (20, 1.0)), "#f80", "dots"))
    svg = svg_chart(Chart("Loss", lines, markers=((10, "epoch 2"),)), x_range=(0, 20), **SIZE)
    groups = re.findall(r'<g class="series" data-name="([^"]+)" data-style="(\w+)">', svg)
    assert groups == [("raw", "faint"), ("smoothed", "solid"), ("held-out", "dots")]
    assert 'stroke-opacity="0.3" stroke-linejoin="round" points="56,' in svg  # the raw line is faint
    assert re.findall(r"<title>(held-out, step [^<]+)</title></circle>", svg) == ["held-out, step 0: 3.5",
                                                                                 "held-out, step 20: 1"]
    legend = re.search(r'<g class="legend">(.*?)</g>', svg).group(1)
    assert re.findall(r">([^<]+)</text>", legend) == ["raw", "smoothed", "held-out"]
    marker = re.search(r'<g class="marker"><line x1="([^"]+)".*?>([^<]+)</text></g>', svg)
    assert marker.groups() == ("256", "epoch 2")  # step 10 of 0..20


def test_single_point_and_constant_series_sit_mid_plot():
    single = svg_chart(chart((3, 2.0)), **SIZE)
    constant = svg_chart(chart((0, 5.0), (10, 5.0)), **SIZE)
    zero = svg_chart(chart((0, 0.0), (0, 0.0)), **SIZE)
    flat_log = svg_chart(chart((0, 5.0), (10, 5.0), log_y=True), **SIZE)
    assert polylines(single) == ["256,165"]
    assert polylines(constant) == ["56,165 456,165"]
    assert polylines(zero) == ["256,165 256,165"]
    assert polylines(flat_log) == ["56,165 456,165"]
    for svg in (single, constant, zero, flat_log):
        numbers = re.findall(r'(?:points|c[xy]|x\d?|y\d?)="([^"]*)"', svg)
        assert all(math.isfinite(float(n)) for value in numbers for n in re.split(r"[ ,]", value))
        assert not re.search(r"\b(nan|inf)\b", svg, re.IGNORECASE)


def test_non_finite_points_are_skipped():
    svg = svg_chart(chart((0, 1.0), (5, math.nan), (10, math.inf), (math.nan, 2.0), (20, 26.0)), **SIZE)
    assert polylines(svg) == ["56,290 456,40"]
    empty = svg_chart(chart((0, math.nan)))
    assert polylines(empty) == [] and "no finite values" in empty


def test_tick_labels_use_readable_numbers():
    svg = svg_chart(Chart("Learning rate", (Line("lr", ((0, 0.0), (100, 1.6e-4)), "#000"),)))
    assert y_ticks(svg) == ("linear", ["0", "5e-5", "1e-4", "1.5e-4"])
    assert x_ticks(svg) == ["0", "50", "100", "step"]
    # steps are whole: a two-step run gets ticks 0, 1, 2, not 0.5
    assert x_ticks(svg_chart(chart((0, 1.0), (2, 2.0)))) == ["0", "1", "2", "step"]


def local_linear_reference(points, factor):
    """The fit solved row by row: weighted least squares of the values (as logarithms) on u = j − i."""
    values = [math.log(y) for _, y in points]
    fitted = []
    for i in range(len(values)):
        sums = [0.0] * 5
        for j, value in enumerate(values):
            w, u = factor ** abs(i - j), j - i
            for k, term in enumerate((w, w * u, w * u * u, w * value, w * u * value)):
                sums[k] += term
        w0, w1, w2, y0, y1 = sums
        fitted.append(math.exp((w2 * y0 - w1 * y1) / (w0 * w2 - w1 * w1)))
    return fitted


def test_smooth_matches_the_fit_solved_row_by_row():
    random.seed(0)
    points = [(step, 2.0 * 0.95 ** step * math.exp(random.gauss(0, 0.5))) for step in range(1, 61)]
    for factor in (0.5, 0.8, 0.97):
        assert [y for _, y in smooth(points, factor)] == pytest.approx(local_linear_reference(points, factor),
                                                                        rel=1e-9)


def test_smooth_golden_values():
    # values 0, 1, 0 with factor 0.5; at row 1: Σw = 1.75, Σwu = 1, Σwu² = 1.5, Σwy = .5, Σwuy = .5,
    # so (1.5·.5 − 1·.5) / (1.75·1.5 − 1) = 2/13; the middle row is the weighted mean, 1/2
    assert smooth([(1, 0.0), (2, 1.0), (3, 0.0)], 0.5) == [(1, pytest.approx(2 / 13)), (2, pytest.approx(0.5)),
                                                           (3, pytest.approx(2 / 13))]
    # positive values are fitted as logarithms: decades 0, 2, 0 come back as 10^(4/13), 10, 10^(4/13)
    assert smooth([(1, 1.0), (2, 100.0), (3, 1.0)], 0.5) == [(1, pytest.approx(10 ** (4 / 13))),
                                                             (2, pytest.approx(10.0)),
                                                             (3, pytest.approx(10 ** (4 / 13)))]


def test_smooth_follows_a_falling_loss_to_both_ends():
    falling = [(step, 3.0 * 0.8 ** step) for step in range(1, 31)]  # a straight line on the log axis
    assert smooth(falling, 0.9) == [(x, pytest.approx(y)) for x, y in falling]
    assert [y for _, y in smooth([(s, 2.0) for s in range(5)], 0.8)] == pytest.approx([2.0] * 5)
    single = smooth([(1, 3.0)], 0.9)  # one row: no line to fit, the value itself
    assert single == [(1, pytest.approx(3.0))]
