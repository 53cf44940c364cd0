"""Report figures stay readable from 1 to 20 methods and 1 to 12 panels: after drawing, no two visible text
boxes (titles, axis and tick labels, legend entries, annotations) overlap and every one lies inside the
figure; exact zeros and off-scale extrapolations do not set a log axis."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from matplotlib.text import Text

from tbptt_bench.report import figures

LABELS = ["full", "tbptt(4, 8)", "chunked K=2", "chunked K=4", "chunked K=8", "sliding K=4",
          "hybrid (k2=4, every=3, long=0) K=4", "adaptive:delta=0.5,kmin=2,kmax=12,every=8,window=100,family=overlap",
          "artbp:c=0.25,min=1", "curriculum:start=2,end=8,over=24,family=chunked"]


def _names(n: int) -> list[str]:
    return [LABELS[i] if i < len(LABELS) else f"{LABELS[i % len(LABELS)]} #{i}" for i in range(n)]


def _panels(n: int) -> list[str]:
    tasks = ["copy", "adding", "char-lm", "copy-stream · lag=4 length=4000 valid_length=400"]
    models = ["rnn", "lstm", "gru"]
    return [f"{t} · {m} (accuracy ↑)" for t, m in itertools.islice(itertools.product(tasks, models), n)]


def _frame(methods: int, panels: int, xs: tuple[float, ...] = (2, 4, 8, 16)) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for p, name in itertools.product(_panels(panels), _names(methods)):
        for x in xs:
            y = float(rng.uniform(0.01, 0.5)) * 0.8 ** x
            rows.append({"panel": p, "method": name, "x": float(x), "y": y, "lo": y * 0.7, "hi": y * 1.4,
                         "ext": y * float(rng.choice([0.5, 2.0, 1e4])), "cost": float(rng.uniform(1, 100)),
                         "cost_lo": 0.9, "cost_hi": 110.0, "at": float(rng.choice([np.nan, 8 * x])), "last": 96.0})
    return pd.DataFrame(rows)


def _text_boxes(fig: Figure) -> list[tuple[str, object]]:
    """Window extents of every text that is drawn: visible, non-empty, and for tick labels only the ticks
    inside the view."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    drawn_ticks: set[int] = set()
    all_ticks: set[int] = set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                all_ticks.update({id(tick.label1), id(tick.label2)})
            for tick in axis._update_ticks():
                drawn_ticks.update({id(tick.label1)} if tick.label1.get_visible() else set())
    boxes = []
    for text in fig.findobj(Text):
        if not text.get_visible() or not text.get_text().strip():
            continue
        if id(text) in all_ticks and id(text) not in drawn_ticks:
            continue
        if text.axes is not None and not text.axes.get_visible():
            continue
        boxes.append((text.get_text(), text.get_window_extent(renderer)))
    return boxes


def assert_readable(fig: Figure) -> None:
    boxes = _text_boxes(fig)
    frame = fig.bbox
    for text, box in boxes:
        assert box.x0 >= frame.x0 - 1 and box.y0 >= frame.y0 - 1 and box.x1 <= frame.x1 + 1 \
            and box.y1 <= frame.y1 + 1, f"text {text!r} leaves the figure: {box} outside {frame}"
    for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
        overlap_x = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        overlap_y = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        assert overlap_x <= 1 or overlap_y <= 1, f"texts {a!r} and {b!r} overlap"


def _ci_lines(d: pd.DataFrame, sharey: bool = False) -> Figure:
    return figures.ci_lines(d, x="x", y="y", low="lo", high="hi", hue="method", panel="panel", logx=True,
                            logy=True, zero_below=1e-12, sharey=sharey, xlabel="truncation length K (steps)",
                            ylabel="relative bias (fraction)", title="Relative bias of the gradient against K")


def _ci_points(d: pd.DataFrame) -> Figure:
    last = d[d["x"] == d["x"].max()]
    return figures.ci_points(last, label="method", y="y", low="lo", high="hi", panel="panel",
                             ylabel="held-out metric", title="Held-out metric at equal tokens")


def _seed_strip(d: pd.DataFrame) -> Figure:
    return figures.seed_strip(d, label="method", y="at", censored="last", panel="panel", ylabel="tokens to target",
                              title="Tokens to the target, one point per seed (×: not reached)")


def _tradeoff(d: pd.DataFrame) -> Figure:
    last = d[d["x"] == d["x"].max()]
    return figures.tradeoff(last, x="cost", y="y", label="method", hue="method", xerr=("cost_lo", "cost_hi"),
                            yerr=("lo", "hi"), panel="panel", logx=True, xlabel="training ms per 1000 tokens",
                            ylabel="held-out metric", title="Held-out metric against training time per token")


def _extrapolation(d: pd.DataFrame) -> Figure:
    return figures.measured_vs_extrapolation(d, x="x", y="y", low="lo", high="hi", extrapolation="ext",
                                             hue="method", panel="panel", xlabel="truncation length K (steps)",
                                             ylabel="relative bias (fraction)", title="Measured and extrapolated")


FIGURES: dict[str, Callable[[pd.DataFrame], Figure]] = {
    "ci_lines": _ci_lines, "ci_lines_shared": lambda d: _ci_lines(d, sharey=True), "ci_points": _ci_points, "seed_strip": _seed_strip, "tradeoff": _tradeoff,
    "measured_vs_extrapolation": _extrapolation}


@pytest.mark.parametrize("methods,panels", [(1, 1), (20, 1), (1, 12), (20, 12)])
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_no_text_overlaps_or_leaves_the_figure(name: str, methods: int, panels: int) -> None:
    fig = FIGURES[name](_frame(methods, panels))
    try:
        assert_readable(fig)
    finally:
        figures.plt.close(fig)


def _ratio_dots(d: pd.DataFrame) -> Figure:
    last = d[d["x"] == d["x"].max()]
    long = pd.concat([last.assign(what="tokens/s ÷ full BPTT's", ratio=last["y"] * 3),
                      last.assign(what="peak memory ÷ full BPTT's", ratio=last["y"])])
    return figures.ratio_dots(long.assign(busy=long["cost"] > 50), x="ratio", y="panel", hue="method", facet="what",
                              colours=figures.palette(_names(d["method"].nunique())), flag="busy",
                              flag_label="open marker: measured on a busy machine", xlabel="multiple of full BPTT",
                              title="Throughput and peak memory relative to full BPTT")


FIGURES["ratio_dots"] = _ratio_dots


def test_method_colours_and_markers_do_not_depend_on_the_other_methods() -> None:
    """A series keeps its colour and marker whatever else a report holds; labels within a series share its
    marker and take shades of its colour, the smallest K the series' own colour."""
    alone = figures.method_palette(["sliding:k=4"])
    many = figures.method_palette(["full", "tbptt:k1=4,k2=8", "chunked:k=2", "chunked:k=8", "sliding:k=4",
                                   "artbp:c=0.25"])
    assert alone["sliding"] == many["sliding"] and alone.markers["sliding"] == many.markers["sliding"]
    assert many["chunked K=2"] == many["chunked"] != many["chunked K=8"]
    assert many.markers["chunked K=2"] == many.markers["chunked K=8"] == many.markers["chunked"]
    assert len({many[s] for s in ("full", "tbptt(K,2K)", "chunked", "sliding")}) == 4
    assert many["full"] == figures.REFERENCE_COLOUR
    light = np.array(many["chunked K=8"])
    assert (light >= np.array(many["chunked"]) - 1e-12).all()  # a lighter shade of the same colour


def test_identical_series_stay_visible() -> None:
    """Two series with the same values: the second is drawn dashed with larger open markers, and says so."""
    d = pd.DataFrame({"x": [2, 4, 8] * 2, "y": [0.3, 0.1, 0.01] * 2, "method": ["sliding"] * 3 + ["chunked"] * 3})
    fig = figures.ci_lines(d, x="x", y="y", hue="method", colours=figures.method_palette(["chunked:k=2", "sliding:k=2"]))
    try:
        lines = [ln for ln in fig.axes[0].get_lines() if not ln.get_label().startswith("_")]
        second = [ln for ln in lines if "same values" in ln.get_label()]
        assert [ln.get_label() for ln in second] == ["sliding (same values as chunked)"]
        assert second[0].get_linestyle() != "-" and second[0].get_markersize() > lines[0].get_markersize()
    finally:
        figures.plt.close(fig)


def test_busy_rows_get_open_markers_and_a_legend_entry() -> None:
    d = pd.DataFrame({"x": [2, 4, 8], "y": [3.0, 2.0, 1.0], "method": "chunked", "busy": [False, True, False]})
    fig = figures.ci_lines(d, x="x", y="y", hue="method", flag="busy", flag_label="open: busy",
                           colours=figures.method_palette(["chunked:k=2"]))
    try:
        open_ = [ln for ln in fig.axes[0].get_lines() if ln.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))
                 and len(ln.get_xdata())]
        assert [list(ln.get_xdata()) for ln in open_] == [[4]]
        assert "open: busy" in [t.get_text() for t in fig.legends[0].get_texts()]
    finally:
        figures.plt.close(fig)


def test_memory_axis_starts_at_zero() -> None:
    d = pd.DataFrame({"x": [24, 96], "y": [4.2, 4.6], "method": "full"})
    fig = figures.ci_lines(d, x="x", y="y", hue="method", from_zero=True)
    try:
        assert fig.axes[0].get_ylim()[0] == 0
    finally:
        figures.plt.close(fig)


def test_single_k_is_drawn_without_rotated_tick_labels() -> None:
    fig = _ci_lines(_frame(20, 3, xs=(4,)))
    try:
        assert_readable(fig)
        assert all(not ax.get_xticklabels() or all(t.get_rotation() == 0 for t in ax.get_xticklabels())
                   for ax in fig.axes)
    finally:
        figures.plt.close(fig)


def test_exact_zero_is_drawn_on_the_floor_not_at_1e16() -> None:
    d = _frame(2, 1)
    d.loc[d["method"] == d["method"].iloc[0], ["y", "lo", "hi"]] = [1e-17, 0.0, 1e-16]
    fig = figures.ci_lines(d, x="x", y="y", low="lo", high="hi", hue="method", panel="panel", logx=True, logy=True,
                           zero_below=1e-12, xlabel="K (steps)", ylabel="relative bias", title="t")
    try:
        ax = fig.axes[0]
        positive = d.loc[d["y"] > 1e-12, "lo"].min()
        assert ax.get_ylim()[0] > positive / 10
        assert any("exactly 0" in t.get_text() for t in fig.legends[0].get_texts())
        assert_readable(fig)
    finally:
        figures.plt.close(fig)


def test_zero_estimate_with_an_interval_is_told_apart_from_exact_zero() -> None:
    d = _frame(2, 2)
    first = d["method"] == d["method"].iloc[0]
    d.loc[first, ["y", "lo", "hi"]] = [0.0, 0.0, 0.05]
    fig = _ci_lines(d, sharey=True)
    try:
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert any("not told from zero" in t for t in texts) and not any("exactly 0" in t for t in texts)
        assert fig.axes[0].get_ylim()[0] > d.loc[~first, "lo"].min() / 10
        assert_readable(fig)
    finally:
        figures.plt.close(fig)


def test_extrapolations_do_not_set_the_scale() -> None:
    d = _frame(3, 2)
    d["ext"] = 5.0  # far above every measured value (all < 0.5)
    fig = _extrapolation(d)
    try:
        for ax in fig.axes:
            assert ax.get_ylim()[1] < 1.0
        assert any("off scale" in t.get_text() for t in fig.legends[0].get_texts())
    finally:
        figures.plt.close(fig)
