"""Figures for reports: lines and points with their confidence intervals, drawn with seaborn/matplotlib.

Every function takes a tidy DataFrame whose intervals are already computed (by
:mod:`tbptt_bench.report.stats`), so the numbers in a figure are the numbers in the report's tables. One
panel per value of ``panel`` (e.g. ``copy · lstm · cpu``); colours follow one palette per report so a
method keeps its colour from figure to figure. Figures use the non-interactive Agg backend.
"""

from __future__ import annotations

import io
import logging
import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from tbptt_bench.report import FORMATS  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

#: Leave out dates and version stamps so that regenerating a report changes only what changed.
_STABLE_METADATA: dict[str, dict[str, None]] = {"png": {"Software": None}, "svg": {"Date": None},
                                                "pdf": {"CreationDate": None}}
PANEL_W, PANEL_H = 4.0, 3.0
MAX_COLS = 3


class Palette(dict):
    """Colours by name (a method's spec, label or series) with a ``markers`` map beside them."""

    markers: dict[str, str]


def palette(labels: Sequence[str], base: dict[str, tuple[float, float, float]] | None = None
            ) -> dict[str, tuple[float, float, float]]:
    """A fixed colour per label that is not a method (in the given order): colour-blind safe for up to ten
    labels, tab20 (strong colours first) up to twenty, evenly spaced hues beyond. Methods take
    :func:`method_palette` instead, whose colours do not depend on what else a report holds.

    With ``base``, its labels keep their colours and new labels take the next ones.
    """
    base = base if base is not None else {}
    new = [label for label in dict.fromkeys(labels) if label not in base]
    total = len(base) + len(new)
    if total <= 10:
        colours = sns.color_palette("colorblind", n_colors=max(total, 1))
    elif total <= 20:  # tab20's ten strong colours first, then their light partners
        tab = sns.color_palette("tab20", n_colors=20)
        colours = [tab[i] for i in (*range(0, 20, 2), *range(1, 20, 2))]
    else:
        colours = sns.color_palette("husl", n_colors=total)
    markers = dict(getattr(base, "markers", {}))
    out = Palette(base)
    out.update(zip(new, colours[len(base):]))
    out.markers = markers | {label: MARKERS[(len(markers) + i) % len(MARKERS)] for i, label in enumerate(new)}
    return out


#: Markers cycled with the colours, so that 20 methods stay distinguishable where colours come close.
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "p", "h", "*")
#: Full BPTT, the reference every figure compares against: dark grey.
REFERENCE_COLOUR = (0.25, 0.25, 0.25)


def _family_styles() -> dict[str, tuple[tuple[float, float, float], str]]:
    """Colour and marker of every registered method family, in the families' own order (rank, then name):
    the colour-blind palette without its grey (reserved for full BPTT), then seaborn's dark palette."""
    import tbptt_bench.methods  # noqa: F401  (registers the built-in families)
    from tbptt_bench.methods.base import METHODS

    families = sorted(METHODS.names(), key=lambda n: (METHODS.get(n).rank, n))
    blind = sns.color_palette("colorblind", 10)
    # blue, orange, green, then purple before vermilion (so the fourth family is not a second orange)
    colours = [blind[i] for i in (0, 1, 2, 4, 3, 5, 6, 8, 9)] + list(sns.color_palette("dark", 10))
    styles: dict[str, tuple[tuple[float, float, float], str]] = {}
    for i, family in enumerate(f for f in families if f != "full"):
        styles[family] = (colours[i % len(colours)], MARKERS[i % len(MARKERS)])
    styles["full"] = (REFERENCE_COLOUR, "o")
    return styles


def _shade(colour: tuple[float, float, float], i: int, n: int) -> tuple[float, float, float]:
    """The ``i``-th of ``n`` shades of ``colour``: the colour itself first, then lighter ones (at most
    halfway to white, so the lightest still reads on a white background)."""
    if n <= 1 or i == 0:
        return tuple(colour)  # type: ignore[return-value]
    mix = 0.5 * i / (n - 1)
    return tuple(c + (1 - c) * mix for c in colour)  # type: ignore[return-value]


def method_palette(specs: Sequence[str]) -> Palette:
    """Colours and markers of methods, keyed by spec, label and series (:func:`describe`).

    A family's colour and marker come from the family alone (its place among the registered families),
    so a series looks the same in every figure of every report. Several series of one family (e.g.
    ``tbptt(K,2K)`` and ``tbptt(K,3K)``) take shades of it, and so do the labels within a series (``chunked
    K=2``, ``K=4``: darkest first, in the methods' own order); every label keeps its series' marker.
    """
    from tbptt_bench.methods.base import describe, order_specs

    styles = _family_styles()
    described = [describe(s) for s in order_specs(specs)]
    out = Palette()
    out.markers = {}
    by_family: dict[str, list[str]] = {}
    for d in described:
        by_family.setdefault(d["family"], [])
        if d["series"] not in by_family[d["family"]]:
            by_family[d["family"]].append(d["series"])
    series_style: dict[str, tuple[tuple[float, float, float], str]] = {}
    for family, series in by_family.items():
        colour, marker = styles.get(family) or (_hashed_colour(family), MARKERS[len(family) % len(MARKERS)])
        for i, name in enumerate(series):
            series_style[name] = (_shade(colour, i, len(series)), MARKERS[(MARKERS.index(marker) + i) % len(MARKERS)])
    for name in dict.fromkeys(d["series"] for d in described):
        members = [d for d in described if d["series"] == name]
        colour, marker = series_style[name]
        for i, d in enumerate(members):
            shade = _shade(colour, i, len(members))
            for key in (d["spec"], d["label"]):
                out.setdefault(key, shade)
                out.markers.setdefault(key, marker)
        out[name], out.markers[name] = colour, marker
    for spec, d in zip(order_specs(specs), described):
        out.setdefault(str(spec), out[d["spec"]])
        out.markers.setdefault(str(spec), out.markers[d["spec"]])
    return out


def _hashed_colour(name: str) -> tuple[float, float, float]:
    """A colour that depends on ``name`` only (a family no registry knows, e.g. a plugin not loaded)."""
    import zlib

    return tuple(sns.color_palette("husl", 24)[zlib.crc32(name.encode()) % 24])  # type: ignore[return-value]


#: Characters of a legend entry or a panel title before it wraps.
LABEL_WIDTH = 44
#: Widest figure (inches): at the report's 80 dpi it fits the HTML page's 1100-pixel column.
MAX_WIDTH = 13.0


def _layout(n: int) -> tuple[int, int, float]:
    """Columns, rows and panel width (inches) of a grid of ``n`` panels that wraps at three columns."""
    cols = 1 if n == 1 else 2 if n in (2, 4) else MAX_COLS
    rows = math.ceil(n / cols)
    width = 6.5 if n == 1 else min(PANEL_W + 0.4, MAX_WIDTH / cols)
    return cols, rows, width


def _panels(names: Sequence[object], *, sharey: bool = False) -> tuple[Figure, list[plt.Axes]]:
    """A seaborn FacetGrid of one panel per name, wrapping at three columns (only as many axes as names), under
    matplotlib's constrained layout so that the legend can sit below the panels."""
    n = max(len(names), 1)
    cols, rows, width = _layout(n)
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.05)
    grid = sns.FacetGrid(pd.DataFrame({"panel": range(n)}), col="panel", col_wrap=cols if n > 1 else None,
                         height=PANEL_H, aspect=width / PANEL_H, sharex=False, sharey=sharey, despine=False)
    fig = grid.figure
    fig.set_layout_engine("constrained")
    fig.set_size_inches(width * cols, PANEL_H * rows + 0.6)
    axes = list(grid.axes.flat)[:n]
    for ax in axes:
        ax.set_title("")
    return fig, axes


def _groups(data: pd.DataFrame, panel: str | None) -> list[tuple[object, pd.DataFrame]]:
    if panel is None:
        return [("", data)]
    return [(key, grp) for key, grp in data.groupby(panel, sort=False)]


def wrap(text: str, width: int = LABEL_WIDTH) -> str:
    """``text`` broken into lines of at most ``width`` characters, at spaces or after commas."""
    return textwrap.fill(str(text).replace(",", ", ").replace(",  ", ", "), width=width,
                         break_long_words=True, break_on_hyphens=False)


def _finish(fig: Figure, axes: list[plt.Axes], title: str) -> Figure:
    """Wrapped titles, and one legend of every labelled artist below the panels (in drawing order)."""
    width_in = fig.get_figwidth()
    fig.suptitle(wrap(title, int(width_in * 10)), fontsize=11)
    for ax in axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log" and not isinstance(axis.get_major_formatter(), ticker.FixedFormatter):
                _plain_log_ticks(axis)
    cols = _layout(len(axes))[0]
    seen: dict[str, object] = {}
    for ax in axes:
        ax.set_title(wrap(ax.get_title(), max(24, int(width_in / cols * 11))), fontsize=9)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if not label.startswith("_"):
                seen.setdefault(label, handle)
    if seen:
        _legend(fig, list(seen.values()), [wrap(label) for label in seen])
    return fig


def _legend(fig: Figure, handles: list[object], labels: list[str]) -> None:
    """One legend below the panels, in as many columns as fit the figure's width; the figure grows by the
    legend's height so that the panels keep theirs."""
    renderer = fig.canvas.get_renderer()
    longest = max(len(line) for label in labels for line in label.splitlines()) + 5
    ncols = max(1, min(len(labels), int(fig.get_figwidth() * 13) // longest))
    while True:
        legend = fig.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False, fontsize=8)
        box = legend.get_window_extent(renderer)
        if box.width <= 0.98 * fig.bbox.width or ncols == 1:
            break
        legend.remove()
        ncols -= 1
    fig.set_figheight(fig.get_figheight() + box.height / fig.dpi)


def _plain_log_ticks(axis: object) -> None:
    """Tick labels of a log axis as plain numbers (``0.01``, ``2``); minor ones only where the axis spans
    little more than a decade (matplotlib's own choice of which: ``minor_thresholds``)."""
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))  # type: ignore[attr-defined]
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False,  # type: ignore[attr-defined]
                                                minor_thresholds=(1.2, 0.5)))


class _PlainLogFormatter(ticker.LogFormatter):
    """matplotlib's choice of which log ticks to label, written as plain numbers."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def _wants_log(*columns: pd.Series) -> bool:
    """A log axis only where every value is positive and they span more than a factor of 4."""
    v = pd.to_numeric(pd.concat(columns), errors="coerce").dropna()
    return bool(len(v)) and bool((v > 0).all()) and float(v.max() / v.min()) > 4


def _ordered(names: Sequence[object], colours: dict[str, tuple[float, float, float]]) -> list[str]:
    """Names in palette order (so legends list methods the same way in every figure), others after."""
    present = [str(n) for n in dict.fromkeys(names)]
    return [n for n in colours if n in present] + [n for n in present if n not in colours]


def _marker(name: str, colours: dict[str, tuple[float, float, float]]) -> str:
    """The marker a palette gives ``name`` (:class:`Palette`), else one by its place in the palette."""
    if isinstance(colours, Palette) and name in colours.markers:
        return colours.markers[name]
    order = list(colours)
    return MARKERS[order.index(name) % len(MARKERS)] if name in order else "o"


def _exact_floor(values: pd.Series, zero_below: float) -> float:
    """Where a log axis draws exact zeros: a third of the smallest value above ``zero_below``."""
    v = pd.to_numeric(values, errors="coerce")
    v = v[v > zero_below]
    return float(v.min()) / 3 if len(v) else 1e-3


def ci_lines(
    data: pd.DataFrame,
    *,
    x: str,
    y: str,
    hue: str,
    low: str | None = None,
    high: str | None = None,
    panel: str | None = None,
    colours: dict[str, tuple[float, float, float]] | None = None,
    refs: pd.DataFrame | None = None,
    logx: bool = False,
    logy: bool = False,
    markers: bool = True,
    zero_below: float | None = None,
    sharey: bool = False,
    from_zero: bool = False,
    flag: str | None = None,
    flag_label: str = "",
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str = "",
) -> Figure:
    """Mean lines of ``y`` against ``x`` per ``hue``, with the ``[low, high]`` interval as a band.

    ``refs`` (columns ``panel``, ``y``, ``label``) draws horizontal reference lines, e.g. full BPTT
    or a task's memoryless baseline. Log axes are used where asked and the data allow. With ``zero_below``
    and a log y axis, values at or below it count as exactly zero and are drawn as "exact" on the axis
    floor (a marker with its own legend entry), so they cannot stretch the axis. ``sharey`` gives every
    panel the same y axis, where values are to be compared across panels. ``from_zero`` starts a linear y
    axis at 0 (a ratio or a memory). Rows whose boolean ``flag`` column is true get an open marker on top
    (legend: ``flag_label``, e.g. measured on a busy machine). A series whose points equal an earlier one's is
    drawn dashed with larger open markers, and its legend entry says so.
    """
    groups = _groups(data, panel)
    colours = colours or palette(data[hue].astype(str).unique())
    single = data[x].nunique() == 1
    logx = logx and not single and _wants_log(data[x])
    exact = (data[y] <= zero_below) if zero_below is not None else pd.Series(False, index=data.index)
    lows = data.loc[~exact, low] if low else pd.Series(dtype=float)
    lows = lows[lows > (zero_below or 0.0)] if zero_below is not None else lows
    logy = logy and _wants_log(data.loc[~exact, y], lows, *([refs["y"]] if refs is not None and len(refs) else []))
    floor = _exact_floor(data[y], zero_below or 0.0) if logy else 0.0
    fig, axes = _panels([k for k, _ in groups], sharey=sharey)
    for ax, (key, grp) in zip(axes, groups):
        names = _ordered(grp[hue].astype(str), colours)
        drawn: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i, name in enumerate(names):
            line = grp[grp[hue].astype(str) == name].sort_values(x)
            colour, mark = colours.get(name), _marker(name, colours)
            zero = exact.loc[line.index].to_numpy() if logy else np.zeros(len(line), bool)
            his = line[high].to_numpy(float) if high else np.full(len(line), np.nan)
            if single and not zero[0]:
                _point(ax, i, line.iloc[0], y, low, high, colour, name, mark)
                if flag is not None and bool(line[flag].fillna(False).iloc[0]):
                    ax.plot([i], [line[y].iloc[0]], ls="none", marker=mark, ms=8, mfc="white", mew=1.3, color=colour,
                            zorder=4)
                continue
            if single:
                _zeros(ax, np.array([i]), his[:1], floor, zero_below or 0.0, colour, mark, name)
                continue
            shown = line[~zero]
            twin = _same_as(drawn, shown[x].to_numpy(float), shown[y].to_numpy(float))
            drawn[name] = (shown[x].to_numpy(float), shown[y].to_numpy(float))
            if twin is None:
                ax.plot(shown[x], shown[y], marker=mark if markers else None, ms=3.5, lw=1.6, color=colour, label=name)
            else:  # on top of an earlier series: dashed, with larger open markers, so both stay visible
                ax.plot(shown[x], shown[y], marker=mark if markers else None, ms=7, mfc="none", mew=1.4, lw=1.6,
                        ls=(0, (4, 3)), color=colour, zorder=3, label=f"{name} (same values as {twin})")
            if flag is not None and line[flag].fillna(False).astype(bool).any():
                busy = line[line[flag].fillna(False).astype(bool) & ~zero]
                ax.plot(busy[x], busy[y], ls="none", marker=mark, ms=8, mfc="white", mew=1.3, color=colour, zorder=4)
            if zero.any():
                _zeros(ax, line[x].to_numpy(float)[zero], his[zero], floor, zero_below or 0.0, colour, mark,
                       None if len(shown) else name)
            if low and high and len(shown) and shown[[low, high]].notna().any().all():
                lo = shown[low].clip(lower=floor) if logy else shown[low]
                if len(shown) == 1:
                    _point(ax, float(shown[x].iloc[0]), shown.iloc[0], y, low, high, colour, None, mark)
                else:
                    ax.fill_between(shown[x], lo, shown[high], color=colour, alpha=0.2, lw=0)
        _reference_lines(ax, refs, key if panel is not None else None)
        if flag is not None and grp[flag].fillna(False).astype(bool).any():
            ax.plot([], [], ls="none", marker="o", ms=8, mfc="white", color="0.3", label=flag_label)
        _x_axis(ax, data[x], names if single else None, logx)
        if logy:
            ax.set_yscale("log")
            if exact.any():
                ax.set_ylim(bottom=floor / 1.5)
                _zero_legend(ax, data.loc[exact, high] if high else pd.Series(dtype=float), zero_below or 0.0)
        if from_zero and not logy:
            _from_zero(ax)
        ax.set_title(str(key), fontsize=9)
        ax.set_xlabel(f"{xlabel or x} = {data[x].iloc[0]:g}" if single else (xlabel or x))
        ax.set_ylabel(ylabel or y)
    return _finish(fig, axes, title)


def _from_zero(ax: plt.Axes) -> None:
    """A linear y axis from 0, with room above the largest value so that its marker is not cut."""
    top = ax.get_ylim()[1]
    ax.set_ylim(0, top * 1.06 if top > 0 else 1.0)


def _same_as(drawn: dict[str, tuple[np.ndarray, np.ndarray]], xs: np.ndarray, ys: np.ndarray) -> str | None:
    """The first series already drawn at the same points (to rounding), else None."""
    for name, (x0, y0) in drawn.items():
        if len(xs) and len(x0) == len(xs) and np.allclose(x0, xs) and np.allclose(y0, ys, rtol=1e-6, atol=0):
            return name
    return None


def _zeros(ax: plt.Axes, xs: np.ndarray, his: np.ndarray, floor: float, zero_below: float, colour: object,
           marker: str, label: str | None) -> None:
    """Zero estimates on the floor of a log axis: an open marker when the interval is zero too (exactly 0),
    an open marker with a bar up to the interval's upper end when only the estimate is (not told from 0)."""
    bounded = np.isfinite(his) & (his > zero_below)
    if (~bounded).any():  # the floor lies inside the axis (its limit is below it), so nothing is unclipped
        ax.plot(xs[~bounded], np.full(int((~bounded).sum()), floor), ls="none", marker=marker, ms=6, mfc="white",
                color=colour, label=label)
    if bounded.any():
        ax.errorbar(xs[bounded], np.full(int(bounded.sum()), floor), yerr=[np.zeros(int(bounded.sum())),
                    his[bounded] - floor], fmt="v", ms=6, mfc="white", capsize=3, color=colour,
                    label=label if not (~bounded).any() else None)


def _zero_legend(ax: plt.Axes, his: pd.Series, zero_below: float) -> None:
    """Legend entries that say what the markers on the axis floor mean."""
    bounded = pd.to_numeric(his, errors="coerce") > zero_below
    if (~bounded).any():
        ax.plot([], [], ls="none", marker="o", mfc="white", color="0.3",
                label=f"exactly 0 (estimate and interval ≤ {zero_below:g}), on the axis floor")
    if bounded.any():
        ax.plot([], [], ls="-", marker="v", mfc="white", color="0.3",
                label="estimate 0, not told from zero: on the floor, bar to the interval's upper end")


def _point(ax: plt.Axes, pos: float, row: pd.Series, y: str, low: str | None, high: str | None,
           colour: object, label: str | None, marker: str = "o") -> None:
    """One mean with its interval as an error bar (where a line of one point would show no band)."""
    err = None
    if low and high and np.isfinite([row[low], row[high]]).all():
        err = np.array([[max(row[y] - row[low], 0.0)], [max(row[high] - row[y], 0.0)]])
    ax.errorbar(pos, row[y], yerr=err, fmt=marker, ms=5, capsize=3, color=colour, label=label)


def _x_axis(ax: plt.Axes, values: pd.Series, categories: list[str] | None, log: bool) -> None:
    """Categories as positions named in the legend (no tick labels); a log axis with ticks at the measured
    values when there are few."""
    if categories is not None:
        ax.set_xticks([])
        ax.set_xlim(-0.6, len(categories) - 0.4)
        return
    if log:
        ax.set_xscale("log")
        ticks = sorted(pd.to_numeric(values, errors="coerce").dropna().unique())
        if len(ticks) <= 8:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()


def _reference_lines(ax: plt.Axes, refs: pd.DataFrame | None, key: object) -> None:
    """Horizontal lines (``refs``: columns ``y``, ``label`` and, with panels, ``panel``; optional ``colour`` and
    ``style``, else dashed grey)."""
    if refs is None or not len(refs):
        return
    mine = refs[refs["panel"] == key] if key is not None and "panel" in refs.columns else refs
    for _, ref in mine.iterrows():
        if np.isfinite(ref["y"]):
            colour = ref["colour"] if "colour" in mine.columns and isinstance(ref["colour"], tuple) else "0.35"
            style = ref["style"] if "style" in mine.columns else "--"
            ax.axhline(ref["y"], ls=style, lw=1.3 if style == ":" else 1.1, color=colour, label=str(ref["label"]))


def measured_vs_extrapolation(
    data: pd.DataFrame,
    *,
    x: str,
    y: str,
    low: str,
    high: str,
    extrapolation: str,
    hue: str,
    panel: str | None = None,
    colours: dict[str, tuple[float, float, float]] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str = "",
) -> Figure:
    """Measured ``y`` (solid, with its band) and its ``extrapolation`` (dashed, same colour) against ``x``.

    The y axis is set by the measured values and their intervals only; an extrapolation beyond it is drawn
    as an open triangle on the axis edge (legend: "off scale"). Infinite extrapolations are left out.
    """
    groups = _groups(data, panel)
    colours = colours or palette(data[hue].astype(str).unique())
    single = data[x].nunique() == 1
    logx = not single and _wants_log(data[x])
    measured = pd.concat([data[y], data[low], data[high]])
    logy = _wants_log(measured[measured > 0])
    fig, axes = _panels([k for k, _ in groups])
    for ax, (key, grp) in zip(axes, groups):
        names = _ordered(grp[hue].astype(str), colours)
        values = pd.concat([grp[y], grp[low], grp[high]]).replace([np.inf, -np.inf], np.nan).dropna()
        values = values[values > 0] if logy else values
        bottom, top = _measured_range(values, logy)
        off = False
        drawn: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i, name in enumerate(names):
            line = grp[grp[hue].astype(str) == name].sort_values(x)
            colour, mark = colours.get(name), _marker(name, colours)
            pos = np.full(len(line), float(i)) if single else line[x].to_numpy(float)
            twin = None if single else _same_as(drawn, pos, line[y].to_numpy(float))
            drawn[name] = (pos, line[y].to_numpy(float))
            if single:
                _point(ax, i - 0.12, line.iloc[0], y, low, high, colour, name, mark)
            elif twin is not None:  # on top of an earlier series: dashed, larger open markers, both visible
                ax.plot(pos, line[y], marker=mark, ms=7, mfc="none", mew=1.4, lw=1.6, ls=(0, (4, 3)), color=colour,
                        zorder=3, label=f"{name}: measured (same values as {twin})")
            else:
                ax.plot(pos, line[y], marker=mark, ms=3.5, lw=1.6, color=colour, label=f"{name}: measured")
                ax.fill_between(pos, line[low].clip(lower=bottom), line[high], color=colour, alpha=0.2, lw=0)
            b = line[extrapolation].replace([np.inf, -np.inf], np.nan).to_numpy(float)
            off |= _extrapolated(ax, pos + (0.12 if single else 0), b, bottom, top, colour,
                                 None if single else f"{name}: extrapolated (not a bound)")
        if single:
            ax.plot([], [], marker="^", ls="none", color="0.3", label="extrapolated (not a bound)")
        if off:
            ax.plot([], [], marker="^", ls="none", mfc="white", color="0.3", label="extrapolation off scale (edge)")
        _x_axis(ax, data[x], names if single else None, logx)
        if logy:
            ax.set_yscale("log")
        ax.set_ylim(bottom, top)
        ax.set_title(str(key), fontsize=9)
        ax.set_xlabel(f"{xlabel or x} = {data[x].iloc[0]:g}" if single else (xlabel or x))
        ax.set_ylabel(ylabel or y)
    return _finish(fig, axes, title)


def _measured_range(values: pd.Series, log: bool) -> tuple[float, float]:
    """Axis limits around the measured values, with a margin (a factor on a log axis)."""
    if values.empty:
        return (1e-3, 1.0) if log else (0.0, 1.0)
    lo, hi = float(values.min()), float(values.max())
    if log:
        return lo / 1.6, hi * 1.6
    pad = 0.08 * (hi - lo) if hi > lo else max(abs(hi), 1e-3) * 0.2
    return min(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad


def _extrapolated(ax: plt.Axes, pos: np.ndarray, values: np.ndarray, bottom: float, top: float, colour: object,
                  label: str | None) -> bool:
    """Extrapolations as a dashed line inside the measured range, off-scale ones as open triangles on the
    edge; True when any was off scale."""
    ok = np.isfinite(values)
    if not ok.any():
        return False
    inside = np.where(ok & (values <= top) & (values >= bottom), values, np.nan)
    ax.plot(pos, inside, ls="--" if len(pos) > 1 else "none", marker="^", ms=4, lw=1.2, color=colour, label=label)
    high, low = ok & (values > top), ok & (values < bottom)
    for where, edge, mark in ((high, top, "^"), (low, bottom, "v")):
        if where.any():  # an empty unclipped line would enter the layout with an unbounded extent
            ax.plot(pos[where], np.full(int(where.sum()), edge), ls="none", marker=mark, ms=7, mfc="white",
                    color=colour, clip_on=False)
    return bool(high.any() or low.any())


def ratio_dots(data: pd.DataFrame, *, x: str, y: str, hue: str, facet: str, colours: dict[str, tuple[float, float, float]],
               flag: str | None = None, flag_label: str = "", reference: float = 1.0, xlabel: str = "",
               title: str = "") -> Figure:
    """Ratios as dots on a linear axis from zero (seaborn objects): one row per ``y`` category, dodged per
    ``hue`` in the palette's colours and markers, one column per ``facet`` value, and a dashed line at
    ``reference`` (e.g. full BPTT = 1). Rows whose ``flag`` is true are drawn as open markers (legend:
    ``flag_label``)."""
    import seaborn.objects as so

    names = _ordered(data[hue].astype(str), colours)
    data = data.assign(**{hue: data[hue].astype(str)})
    marks = {n: _marker(n, colours) for n in names}
    rows = data[y].nunique()
    facets = data[facet].nunique()
    width = min(MAX_WIDTH, 3.2 + 3.6 * facets)
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.05)
    fig = plt.figure(figsize=(width, 0.9 + rows * (0.22 + 0.08 * len(names))), layout="constrained")
    top = float(np.nanmax(data[x].to_numpy(float))) if len(data) else reference
    plot = so.Plot(data, x=x, y=y, color=hue, marker=hue)
    if flag is not None and data[flag].any():
        plot = plot.add(so.Dot(pointsize=6, edgewidth=1.3), so.Dodge(), fill=data[flag].map({True: "open",
                                                                                          False: "filled"}))
        plot = plot.scale(fill={"open": False, "filled": True})
    else:
        plot = plot.add(so.Dot(pointsize=6), so.Dodge())
    plot = plot.facet(col=facet).scale(color={n: colours.get(n, (0.3, 0.3, 0.3)) for n in names}, marker=marks) \
        .limit(x=(0, max(top, reference) * 1.08)).label(x=xlabel, y="", col="") \
        .theme({**sns.axes_style("whitegrid"), "axes.titlesize": 9})
    plot.on(fig).plot()
    handles, labels = [], []
    for legend in list(fig.legends):
        for handle, text in zip(legend.legend_handles, legend.get_texts()):
            label = text.get_text()
            if label in ("open", "filled"):
                if label == "filled":
                    continue
                label = flag_label
            handles.append(handle)
            labels.append(label)
    fig.legends.clear()  # seaborn's legend sits beside the panels; one below them, as in every other figure
    axes = [ax for ax in fig.axes if ax.get_visible()]
    for ax in axes:
        ax.axvline(reference, ls="--", lw=1.1, color="0.35")
        ax.tick_params(axis="y", labelsize=8)
    handles.append(plt.Line2D([], [], ls="--", color="0.35"))
    labels.append(f"full BPTT (= {reference:g})")
    if flag is not None and data[flag].any() and flag_label not in labels:
        handles.append(plt.Line2D([], [], ls="none", marker="o", ms=7, mfc="white", color="0.3"))
        labels.append(flag_label)
    fig.suptitle(wrap(title, int(width * 10)), fontsize=11)
    _legend(fig, handles, [wrap(label) for label in labels])
    return fig


def ci_points(
    data: pd.DataFrame,
    *,
    label: str,
    y: str,
    low: str,
    high: str,
    panel: str | None = None,
    colours: dict[str, tuple[float, float, float]] | None = None,
    refs: pd.DataFrame | None = None,
    logy: bool = False,
    from_zero: bool = False,
    ylabel: str | None = None,
    title: str = "",
) -> Figure:
    """One point per ``label`` (a method configuration) with its interval as an error bar; the labels are
    named in the legend (colour and marker), not on the axis. ``from_zero`` starts a linear y axis at 0."""
    groups = _groups(data, panel)
    colours = colours or palette(data[label].astype(str).unique())
    logy = logy and _wants_log(data[y], data[low])
    fig, axes = _panels([k for k, _ in groups])
    for ax, (key, grp) in zip(axes, groups):
        names = [str(v) for v in grp[label]]
        for i, (_, row) in enumerate(grp.iterrows()):
            err = np.array([[row[y] - row[low]], [row[high] - row[y]]])
            err = np.where(np.isfinite(err), err, 0.0)
            ax.errorbar(i, row[y], yerr=err, fmt=_marker(names[i], colours), ms=5, capsize=3,
                        color=colours.get(names[i]), label=names[i])
        _reference_lines(ax, refs, key if panel is not None else None)
        _x_axis(ax, grp[label], names, False)
        if logy:
            ax.set_yscale("log")
        elif from_zero:
            _from_zero(ax)
        ax.set_title(str(key), fontsize=9)
        ax.set_ylabel(ylabel or y)
        ax.set_xlabel("method (see legend)")
    return _finish(fig, axes, title)


def seed_strip(
    data: pd.DataFrame,
    *,
    label: str,
    y: str,
    censored: str,
    panel: str | None = None,
    colours: dict[str, tuple[float, float, float]] | None = None,
    order: Sequence[str] | None = None,
    ylabel: str | None = None,
    title: str = "",
) -> Figure:
    """One point per seed and ``label``; a seed whose ``y`` is NaN is drawn as × at its ``censored`` value.
    Labels are named in the legend, not on the axis."""
    groups = _groups(data, panel)
    names = list(order) if order is not None else sorted(data[label].astype(str).unique())
    colours = colours or palette(names)
    fig, axes = _panels([k for k, _ in groups])
    rng = np.random.default_rng(0)
    for ax, (key, grp) in zip(axes, groups):
        present = [n for n in names if n in set(grp[label].astype(str))]
        for i, name in enumerate(present):
            rows = grp[grp[label].astype(str) == name]
            jitter = rng.uniform(-0.12, 0.12, size=len(rows))
            hit = rows[y].notna().to_numpy()
            colour = colours.get(name)
            ax.scatter(i + jitter[hit], rows[y][hit], s=22, color=colour, marker=_marker(name, colours), zorder=3,
                       label=name)
            ax.scatter(i + jitter[~hit], rows[censored][~hit], s=30, marker="x", color=colour, zorder=3)
        if not grp[y].notna().all():
            ax.scatter([], [], s=30, marker="x", color="0.3", label="not reached (at its last evaluation)")
        _x_axis(ax, grp[label], present, False)
        top = pd.concat([grp[y], grp[censored]]).max()
        ax.set_ylim(0, (top if np.isfinite(top) and top > 0 else 1.0) * 1.08)
        ax.set_title(str(key), fontsize=9)
        ax.set_ylabel(ylabel or y)
        ax.set_xlabel("method (see legend)")
    return _finish(fig, axes, title)


def seed_lines(
    data: pd.DataFrame,
    *,
    x: str,
    y: str,
    hue: str,
    unit: str,
    style: str | None = None,
    ceiling: str | None = None,
    panel: str | None = None,
    colours: dict[str, tuple[float, float, float]] | None = None,
    log_base: float | None = None,
    median: Callable[[pd.Series], float] | str = "median",
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str = "",
) -> Figure:
    """``y`` against ``x``: one thin line per ``unit`` (seed) and ``hue`` (× ``style``: solid, then dashed, …),
    and their ``median`` (a pandas aggregation) in a bold line where there are several units. A NaN ``y`` (no
    value reached) is drawn as an open triangle at the row's ``ceiling`` (legend: "not reached").
    ``log_base`` sets a log y axis."""
    groups = _groups(data, panel)
    colours = colours or palette(data[hue].astype(str).unique())
    styles = list(dict.fromkeys(data[style].astype(str))) if style else [""]
    dashes = ("-", "--", ":", "-.")
    fig, axes = _panels([k for k, _ in groups])
    for ax, (key, grp) in zip(axes, groups):
        missed = False
        for name in _ordered(grp[hue].astype(str), colours):
            for j, kind in enumerate(styles):
                rows = grp[grp[hue].astype(str) == name]
                rows = rows[rows[style].astype(str) == kind] if style else rows
                if rows.empty:
                    continue
                colour, ls = colours.get(name), dashes[j % len(dashes)]
                label = f"{name}, {kind}" if style else name
                units = list(rows.groupby(unit, sort=True))
                several = len(units) > 1
                for i, (_, one) in enumerate(units):
                    one = one.sort_values(x)
                    ax.plot(one[x], one[y], ls=ls, lw=0.9 if several else 1.6, alpha=0.45 if several else 1.0,
                            marker=_marker(name, colours), ms=3 if several else 4, color=colour,
                            label=None if several or i else label)
                    gone = one[one[y].isna()]
                    if ceiling and len(gone):
                        missed = True
                        ax.plot(gone[x], gone[ceiling], ls="none", marker="^", ms=7, mfc="white", color=colour)
                if several:
                    middle = rows.groupby(x, as_index=False)[y].agg(median).sort_values(x)
                    ax.plot(middle[x], middle[y], ls=ls, lw=2.2, color=colour, label=f"{label} (median over seeds)")
        if missed:
            ax.plot([], [], ls="none", marker="^", ms=7, mfc="white", color="0.3",
                    label="not reached within the K grid: drawn at its largest K")
        if log_base:
            ax.set_yscale("log", base=log_base)
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.set_title(str(key), fontsize=9)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel or y)
    return _finish(fig, axes, title)


def tradeoff(
    data: pd.DataFrame,
    *,
    x: str,
    y: str,
    label: str,
    hue: str,
    xerr: tuple[str, str] | None = None,
    yerr: tuple[str, str] | None = None,
    panel: str | None = None,
    colours: dict[str, tuple[float, float, float]] | None = None,
    logx: bool = False,
    logy: bool = False,
    flag: str | None = None,
    flag_label: str = "",
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str = "",
) -> Figure:
    """Quality against cost, one point per method configuration (named in the legend by ``label``, coloured
    by ``hue``), intervals on both axes. Markers are open, so points that coincide stay visible as
    overlapping outlines of different shapes; rows whose ``flag`` is true get a larger white-filled marker
    (legend: ``flag_label``)."""
    groups = _groups(data, panel)
    colours = colours or palette(data[hue].astype(str).unique())
    logx = logx and _wants_log(data[x])
    logy = logy and _wants_log(data[y])
    fig, axes = _panels([k for k, _ in groups])
    for ax, (key, grp) in zip(axes, groups):
        grp = grp.assign(_order=grp[hue].astype(str).map({n: i for i, n in enumerate(colours)})).sort_values("_order")
        for _, row in grp.iterrows():
            kw: dict[str, object] = {}
            for name, pair, value in (("xerr", xerr, row[x]), ("yerr", yerr, row[y])):
                if pair is not None and np.isfinite([row[pair[0]], row[pair[1]]]).all():
                    kw[name] = np.array([[max(value - row[pair[0]], 0.0)], [max(row[pair[1]] - value, 0.0)]])
            busy = flag is not None and bool(row[flag])
            ax.errorbar(row[x], row[y], fmt=_marker(str(row[hue]), colours), ms=8 if busy else 6, capsize=2,
                        elinewidth=0.8, mew=1.3, mfc="white" if busy else "none", alpha=0.9,
                        color=colours.get(str(row[hue])), label=str(row[label]), **kw)
        if flag is not None and grp[flag].astype(bool).any():
            ax.plot([], [], ls="none", marker="o", ms=8, mfc="white", color="0.3", label=flag_label)
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        ax.set_title(str(key), fontsize=9)
        ax.set_xlabel(xlabel or x)
        ax.set_ylabel(ylabel or y)
    return _finish(fig, axes, title)


def _save_png(fig: Figure, path: Path, dpi: int) -> None:
    """PNG with a 256-colour palette: line plots lose nothing visible and the file shrinks about 3×."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata=_STABLE_METADATA["png"])
    buffer.seek(0)
    with Image.open(buffer) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        small.save(path, format="PNG", optimize=True)


def save(fig: Figure, folder: Path, name: str, formats: Sequence[str] = ("png", "pdf"), dpi: int = 90) -> list[Path]:
    """Write ``fig`` as ``folder/name.<format>`` for each format and close it; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        if fmt not in FORMATS:
            raise ValueError(f"unknown figure format {fmt!r}; accepted: {', '.join(FORMATS)}")
        path = folder / f"{name}.{fmt}"
        if fmt == "png":
            _save_png(fig, path, dpi)
        else:
            fig.savefig(path, dpi=dpi, metadata=_STABLE_METADATA[fmt])
        paths.append(path)
    plt.close(fig)
    log.debug("wrote figure %s (%s)", name, ", ".join(formats))
    return paths
