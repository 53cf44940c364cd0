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
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

log = logging.getLogger(__name__)

FORMATS = ("png", "svg", "pdf")
#: Leave out dates and version stamps so that regenerating a report changes only what changed.
_STABLE_METADATA: dict[str, dict[str, None]] = {"png": {"Software": None}, "svg": {"Date": None},
                                                "pdf": {"CreationDate": None}}
PANEL_W, PANEL_H = 4.0, 3.0
MAX_COLS = 3


def palette(labels: Sequence[str], base: dict[str, tuple[float, float, float]] | None = None
            ) -> dict[str, tuple[float, float, float]]:
    """A fixed colour per label (in the given order), colour-blind safe for up to ten labels.

    With ``base``, its labels keep their colours and new labels take the next ones.
    """
    base = dict(base or {})
    new = [label for label in dict.fromkeys(labels) if label not in base]
    total = len(base) + len(new)
    colours = sns.color_palette("colorblind" if total <= 10 else "husl", n_colors=max(total, 1))
    base.update(zip(new, colours[len(base):]))
    return base


def _panels(names: Sequence[object], *, sharey: bool = False) -> tuple[Figure, list[plt.Axes]]:
    n = max(len(names), 1)
    cols = min(n, MAX_COLS)
    rows = math.ceil(n / cols)
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.05)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_W * cols, PANEL_H * rows + 0.5), squeeze=False,
                             sharey=sharey, constrained_layout=True)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _groups(data: pd.DataFrame, panel: str | None) -> list[tuple[object, pd.DataFrame]]:
    if panel is None:
        return [("", data)]
    return [(key, grp) for key, grp in data.groupby(panel, sort=False)]


def _finish(fig: Figure, axes: list[plt.Axes], title: str) -> Figure:
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 11)), fontsize=11)
    seen: dict[str, object] = {}
    width_chars = int(fig.get_figwidth() * 14)  # characters of 8-point text across the figure
    for ax in axes:
        ax.set_title(textwrap.fill(ax.get_title(), width=max(20, width_chars // max(1, min(len(axes), MAX_COLS)))),
                     fontsize=9)
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    if seen:
        longest = max(len(label) for label in seen) + 6
        ncols = max(1, min(len(seen), 2 * min(len(axes), MAX_COLS), width_chars // longest))
        fig.legend(list(seen.values()), list(seen.keys()), loc="outside lower center",
                   ncols=ncols, frameon=False, fontsize=8)
    return fig


def _wants_log(*columns: pd.Series) -> bool:
    """A log axis only where every value is positive and they span more than a factor of 4."""
    v = pd.to_numeric(pd.concat(columns), errors="coerce").dropna()
    return bool(len(v)) and bool((v > 0).all()) and float(v.max() / v.min()) > 4


def _ordered(names: Sequence[object], colours: dict[str, tuple[float, float, float]]) -> list[str]:
    """Names in palette order (so legends list methods the same way in every figure), others after."""
    present = [str(n) for n in dict.fromkeys(names)]
    return [n for n in colours if n in present] + [n for n in present if n not in colours]


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
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str = "",
) -> Figure:
    """Mean lines of ``y`` against ``x`` per ``hue``, with the ``[low, high]`` interval as a band.

    ``refs`` (columns ``panel``, ``y``, ``label``) draws horizontal reference lines, e.g. full BPTT
    or a task's trivial baseline. Log axes are used where asked and the data allow.
    """
    groups = _groups(data, panel)
    colours = colours or palette(data[hue].astype(str).unique())
    single = data[x].nunique() == 1
    logx = logx and not single and _wants_log(data[x])
    logy = logy and _wants_log(data[y], *([data[low]] if low else []),
                               *([refs["y"]] if refs is not None and len(refs) else []))
    fig, axes = _panels([k for k, _ in groups])
    for ax, (key, grp) in zip(axes, groups):
        names = _ordered(grp[hue].astype(str), colours)
        for i, name in enumerate(names):
            line = grp[grp[hue].astype(str) == name].sort_values(x)
            colour = colours.get(name)
            if single:
                _point(ax, i, line.iloc[0], y, low, high, colour, name)
                continue
            ax.plot(line[x], line[y], marker="o" if markers else None, ms=3.5, lw=1.6, color=colour, label=name)
            if low and high and line[[low, high]].notna().any().all():
                if len(line) == 1:
                    _point(ax, float(line[x].iloc[0]), line.iloc[0], y, low, high, colour, None)
                else:
                    ax.fill_between(line[x], line[low], line[high], color=colour, alpha=0.2, lw=0)
        _reference_lines(ax, refs, key if panel is not None else None)
        _x_axis(ax, data[x], names if single else None, logx)
        if logy:
            ax.set_yscale("log")
        ax.set_title(str(key), fontsize=9)
        ax.set_xlabel(f"{xlabel or x} = {data[x].iloc[0]:g}" if single else (xlabel or x))
        ax.set_ylabel(ylabel or y)
    return _finish(fig, axes, title)


def _point(ax: plt.Axes, pos: float, row: pd.Series, y: str, low: str | None, high: str | None,
           colour: object, label: str | None) -> None:
    """One mean with its interval as an error bar (where a line of one point would show no band)."""
    err = None
    if low and high and np.isfinite([row[low], row[high]]).all():
        err = np.array([[max(row[y] - row[low], 0.0)], [max(row[high] - row[y], 0.0)]])
    ax.errorbar(pos, row[y], yerr=err, fmt="o", ms=5, capsize=3, color=colour, label=label)


def _x_axis(ax: plt.Axes, values: pd.Series, categories: list[str] | None, log: bool) -> None:
    """Categories as tick labels; a log axis with ticks at the measured values when there are few."""
    if categories is not None:
        ax.set_xticks(np.arange(len(categories)), categories, rotation=35, ha="right", fontsize=7.5)
        ax.set_xlim(-0.6, len(categories) - 0.4)
        return
    if log:
        ax.set_xscale("log")
        ticks = sorted(pd.to_numeric(values, errors="coerce").dropna().unique())
        if len(ticks) <= 10:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()


def _reference_lines(ax: plt.Axes, refs: pd.DataFrame | None, key: object) -> None:
    """Dashed horizontal lines (``refs``: columns ``y``, ``label`` and, with panels, ``panel``)."""
    if refs is None or not len(refs):
        return
    mine = refs[refs["panel"] == key] if key is not None and "panel" in refs.columns else refs
    for _, ref in mine.iterrows():
        if np.isfinite(ref["y"]):
            ax.axhline(ref["y"], ls="--", lw=1.1, color="0.35", label=str(ref["label"]))


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

    Infinite extrapolations are left out of the line (no number is drawn where the profile does not decay).
    """
    groups = _groups(data, panel)
    colours = colours or palette(data[hue].astype(str).unique())
    finite = data[extrapolation].replace([np.inf, -np.inf], np.nan)
    single = data[x].nunique() == 1
    logx = not single and _wants_log(data[x])
    logy = _wants_log(data[y], data[low], finite.dropna())
    fig, axes = _panels([k for k, _ in groups])
    for ax, (key, grp) in zip(axes, groups):
        names = _ordered(grp[hue].astype(str), colours)
        for i, name in enumerate(names):
            line = grp[grp[hue].astype(str) == name].sort_values(x)
            colour = colours.get(name)
            b = line[extrapolation].replace([np.inf, -np.inf], np.nan)
            if single:
                _point(ax, i - 0.12, line.iloc[0], y, low, high, colour, None)
                if b.notna().any():
                    ax.plot(i + 0.12, b.iloc[0], marker="^", ms=6, ls="none", color=colour)
                continue
            ax.plot(line[x], line[y], marker="o", ms=3.5, lw=1.6, color=colour, label=f"{name}: measured")
            ax.fill_between(line[x], line[low], line[high], color=colour, alpha=0.2, lw=0)
            if b.notna().any():
                ax.plot(line[x], b, ls="--", marker="^", ms=3.5, lw=1.2, color=colour, label=f"{name}: extrapolated")
        if single:
            ax.errorbar([], [], yerr=[], fmt="o", color="0.3", label="measured (interval)")
            ax.plot([], [], marker="^", ls="none", color="0.3", label="extrapolated")
        _x_axis(ax, data[x], names if single else None, logx)
        if logy:
            ax.set_yscale("log")
        ax.set_title(str(key), fontsize=9)
        ax.set_xlabel(f"{xlabel or x} = {data[x].iloc[0]:g}" if single else (xlabel or x))
        ax.set_ylabel(ylabel or y)
    return _finish(fig, axes, title)


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
    ylabel: str | None = None,
    title: str = "",
) -> Figure:
    """One point per ``label`` (a method configuration) with its interval as an error bar."""
    groups = _groups(data, panel)
    colours = colours or palette(data[label].astype(str).unique())
    logy = logy and _wants_log(data[y], data[low])
    fig, axes = _panels([k for k, _ in groups])
    for ax, (key, grp) in zip(axes, groups):
        names = [str(v) for v in grp[label]]
        pos = np.arange(len(names))
        for i, (_, row) in enumerate(grp.iterrows()):
            err = np.array([[row[y] - row[low]], [row[high] - row[y]]])
            err = np.where(np.isfinite(err), err, 0.0)
            ax.errorbar(i, row[y], yerr=err, fmt="o", ms=5, capsize=3, color=colours.get(names[i]))
        _reference_lines(ax, refs, key if panel is not None else None)
        ax.set_xticks(pos, names, rotation=35, ha="right", fontsize=7.5)
        if logy:
            ax.set_yscale("log")
        ax.set_title(str(key), fontsize=9)
        ax.set_ylabel(ylabel or y)
        ax.set_xlabel("")
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
    """One point per seed and ``label``; a seed whose ``y`` is NaN is drawn as × at its ``censored`` value."""
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
            ax.scatter(i + jitter[hit], rows[y][hit], s=22, color=colour, zorder=3)
            ax.scatter(i + jitter[~hit], rows[censored][~hit], s=30, marker="x", color=colour, zorder=3)
        ax.set_xticks(np.arange(len(present)), present, rotation=35, ha="right", fontsize=7.5)
        ax.set_xlim(-0.6, len(present) - 0.4)
        top = pd.concat([grp[y], grp[censored]]).max()
        ax.set_ylim(0, (top if np.isfinite(top) and top > 0 else 1.0) * 1.08)
        ax.set_title(str(key), fontsize=9)
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
    xlabel: str | None = None,
    ylabel: str | None = None,
    title: str = "",
) -> Figure:
    """Quality against cost, one annotated point per method configuration, intervals on both axes."""
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
            ax.errorbar(row[x], row[y], fmt="o", ms=5, capsize=2, elinewidth=0.8,
                        color=colours.get(str(row[hue])), label=str(row[hue]), **kw)
            ax.annotate(str(row[label]), (row[x], row[y]), textcoords="offset points", xytext=(4, 3), fontsize=6.5)
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
