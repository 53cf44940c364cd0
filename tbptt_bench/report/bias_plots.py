"""The bias figure: relative bias and cosine against K with confidence bands, and the lag profile.

Drawn with seaborn's styles on a plain matplotlib ``Figure``, in the report's colours (one per method series,
:func:`tbptt_bench.report.figures.method_palette`) and written atomically (temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tbptt_bench.atomic import atomic_path
from tbptt_bench.errors import UsageError
from tbptt_bench.report.figures import REFERENCE_COLOUR, method_palette

FIGURE_FORMATS = ("png", "pdf", "svg")


def bias_figure(table: pd.DataFrame, lags: pd.DataFrame, title: str = "") -> Figure:
    """Three panels: relative bias (with its CI and the lag-profile extrapolation), cosine (±1.96 SE), profile."""
    rows = table[(table["group"] == "all") & np.isfinite(table["k"].astype(float))]
    families = list(dict.fromkeys(rows["series"]))
    colors = method_palette(rows["spec"].astype(str).unique()) if "spec" in rows.columns else \
        dict(zip(families, sns.color_palette("colorblind", max(len(families), 1))))
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(15, 4.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax_bias, ax_cos, ax_lag = fig.subplots(1, 3)
    for fam in families:
        r = rows[rows["series"] == fam].sort_values("k")
        c = colors.get(fam, REFERENCE_COLOUR)
        k = r["k"].to_numpy(float)
        value = r["relative_bias"].to_numpy(float)
        pos = value > 0
        ax_bias.plot(k[pos], value[pos], "o-", color=c, label=f"{fam}: measured")
        lo, hi = r["relative_bias_lo"].to_numpy(float), r["relative_bias_hi"].to_numpy(float)
        band = pos & np.isfinite(lo) & np.isfinite(hi) & (lo > 0)
        ax_bias.fill_between(k[band], lo[band], hi[band], color=c, alpha=0.25, linewidth=0)
        if "extrapolation" in r and np.isfinite(r["extrapolation"].to_numpy(float)).any():
            b = r["extrapolation"].to_numpy(float)
            ok = np.isfinite(b) & (b > 0)
            ax_bias.plot(k[ok], b[ok], "--", color=c, alpha=0.8, label=f"{fam}: extrapolated (lag profile)")
        mean, se = r["cosine_mean"].to_numpy(float), r["cosine_se"].to_numpy(float)
        ax_cos.plot(k, mean, "o-", color=c, label=fam)
        se = np.nan_to_num(se)
        ax_cos.fill_between(k, mean - 1.96 * se, mean + 1.96 * se, color=c, alpha=0.25, linewidth=0)
    for ax in (ax_bias, ax_cos):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("truncation K")
    ax_bias.set_yscale("log")
    ax_bias.set_ylabel("relative bias ‖mean(ĝ−g)‖ / ‖mean g‖")
    ax_bias.set_title("bias of the expectation (95% CI)")
    ax_cos.set_ylabel("cosine(ĝ, g), mean over batches")
    ax_cos.set_title("alignment (±1.96 SE)")
    if families:
        ax_bias.legend(fontsize=7)
        ax_cos.legend(fontsize=7)
    _lag_panel(ax_lag, lags)
    if title:
        fig.suptitle(title)
    return fig


def _lag_panel(ax, lags: pd.DataFrame) -> None:  # type: ignore[no-untyped-def]
    ax.set_title("lag profile φ_d = ‖∂ℓ_t/∂h_{t−d}‖")
    ax.set_xlabel("lag d")
    if lags is None or not len(lags):
        ax.text(0.5, 0.5, "no lag profile (max lag 0)", ha="center", va="center", transform=ax.transAxes)
        return
    d = lags["lag"].to_numpy(float)
    mean = lags["mean"].to_numpy(float)
    ok = np.isfinite(mean) & (mean > 0)
    c = sns.color_palette("colorblind")[0]
    ax.plot(d[ok], mean[ok], "-", color=c, label="mean")
    q10, q90 = lags["q10"].to_numpy(float), lags["q90"].to_numpy(float)
    band = ok & (q10 > 0) & (q90 > 0)
    ax.fill_between(d[band], q10[band], q90[band], color=c, alpha=0.25, linewidth=0, label="10–90% quantiles")
    rate = float(lags["rate"].iloc[0])
    if math.isfinite(rate):
        ax.plot(d, lags["fitted"], "--", color="k", linewidth=1, label=f"geometric fit, rate {rate:.3g}")
    robust = float(lags["rate_robust"].iloc[0])
    if math.isfinite(robust):
        ax.plot(d, lags["fitted_robust"], ":", color="grey", linewidth=1, label=f"Theil–Sen, rate {robust:.3g}")
    ax.set_yscale("log")
    ax.set_ylabel("φ_d (per scored loss)")
    ax.legend(fontsize=7)


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Write ``fig`` to ``path`` (png, pdf or svg by suffix) atomically."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FIGURE_FORMATS:
        raise UsageError(f"cannot write a figure to {path}: use a file ending in {', '.join('.' + f for f in FIGURE_FORMATS)}")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format=fmt, dpi=120)


