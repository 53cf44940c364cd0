"""The gradient-bias section: relative bias and cosine against K, the lag profile and its extrapolation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tbptt_bench.report import figures
from tbptt_bench.report import stats
from tbptt_bench.report.common import _ci, _fmt, _ok, _unit, _with_panel, method_sort_key, seed_interval, with_method_axes
from tbptt_bench.report.document import Document


#: Relative biases at or below this are exact zeros up to rounding (drawn as "exact", not on a log scale).
EXACT_ZERO = 1e-12


def _bias_rows(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Bias rows of the whole gradient (group ``all``), with a ``method`` column."""
    bias = _ok(tables, "bias")
    if bias.empty:
        return bias
    if "spec" in bias.columns:
        bias["method"] = bias["spec"].where(bias["spec"].notna(), bias.get("method"))
    if "group" in bias.columns:
        bias = bias[bias["group"] == "all"]
    return bias[bias["method"].notna()].copy()


def bias_section(doc: Document, tables: dict[str, pd.DataFrame], palette: dict[str, Any]) -> pd.DataFrame:
    """Relative bias and cosine against K, the lag profile and the extrapolated bias; returns the bias summary."""
    o = doc.options
    doc.section("bias", "Gradient bias")
    columns = ["task", "model", "method", "mean", "ci_low", "ci_high"]
    bias = _bias_rows(tables)
    if bias.empty or "relative_bias" not in bias.columns:
        doc.text("No bias measurements in these results.")
        return pd.DataFrame(columns=columns)
    bias, _ = _with_panel(bias)
    bias = with_method_axes(bias)
    seeds = int(bias.groupby(["panel", "method"])[_unit(bias)].nunique().min()) if _unit(bias) in bias else 1
    doc.text("Relative bias ‖E(ĝ − g)‖ / ‖E g‖ estimated from the measured batches without their noise floor "
             "(U-statistics; docs/statistics.md), and the mean cosine of ĝ with "
             "the true gradient g, for the whole parameter vector. "
             + (f"Means over {seeds}+ seeds with {o.confidence:.0%} Student t intervals over seeds (each seed's "
                "estimate averages its batches, so the spread between seeds holds the batch noise as well)."
                if seeds > 2 else "Two seeds: the mean and the range of the two seeds' values, labelled as a range — "
                "no confidence level is claimed from two values." if seeds == 2 else
                "One seed: intervals are the measurement's own over batches (studentised bootstrap for "
                "the relative bias, ±z·standard error for the cosine; docs/statistics.md)."))
    if bias["K"].nunique() == 1:
        doc.text(f"These results hold one truncation length (K = {bias['K'].dropna().iloc[0]:g}), so the figures "
                 "against K show one point per method; a suite with a grid of K draws curves.")
    by = ["panel", "task", "model", "method", "series", "K"]
    rel = seed_interval(bias, "relative_bias", by, low="relative_bias_lo", high="relative_bias_hi", options=o)
    cos = seed_interval(bias, "cosine_mean", by, se="cosine_se", options=o) if "cosine_mean" in bias else None
    rel = _zero_intervals(rel, bias, by)
    truncated = rel[rel["K"].notna()]
    refs = None
    if not truncated.empty:
        fig = figures.ci_lines(truncated, x="K", y="mean", low="ci_low", high="ci_high", hue="series",
                               panel="panel", colours=palette, logx=True, logy=True, zero_below=EXACT_ZERO, sharey=True,
                               xlabel="truncation length K (steps)", ylabel="relative bias (fraction of ‖E g‖)",
                               title="Relative bias of the gradient against K")
        doc.figure("bias_vs_k", fig, "How fast the bias falls with K: relative bias ‖E(ĝ − g)‖/‖E(g)‖ "
                   "(noise-corrected estimate) against K per method series; band: "
                   f"{o.confidence:.0%} interval; open markers on the axis floor: a zero estimate, exactly zero (≤ "
                   f"{EXACT_ZERO:g}, rounding) when its interval is zero too, else with a bar up to its interval's "
                   "upper end (bias not told from zero). Panels share the y axis. Full BPTT has zero bias by definition.")
    if cos is not None and not cos[cos["K"].notna()].empty:
        refs = pd.DataFrame({"panel": cos["panel"].unique(), "y": 1.0, "label": "full BPTT (cosine 1)"})
        fig = figures.ci_lines(cos[cos["K"].notna()], x="K", y="mean", low="ci_low", high="ci_high", hue="series",
                               panel="panel", colours=palette, refs=refs, logx=True, sharey=True, xlabel="truncation length K (steps)",
                               ylabel="cosine(ĝ, g) (1 = aligned)", title="Alignment with the true gradient against K")
        doc.figure("cosine_vs_k", fig, "Whether single-batch gradients point the right way: mean cosine between ĝ "
                   f"and g over batches against K; band: {o.confidence:.0%} interval.")
    _lag_profile(doc, tables, bias)
    if "extrapolation" in bias.columns and np.isfinite(bias["extrapolation"].astype(float)).any():
        audited = [c for c in ("extrapolation", "exact_relative_bias") if c in bias.columns]
        extrapolated = bias.groupby(by, as_index=False, dropna=False)[audited].median()
        both = rel.merge(extrapolated, on=by, how="left")
        both = both[both["K"].notna() & (both["mean"] > EXACT_ZERO)]
        if not both.empty:
            fig = figures.measured_vs_extrapolation(
                both, x="K", y="mean", low="ci_low", high="ci_high", extrapolation="extrapolation", hue="series",
                panel="panel", colours=palette, xlabel="truncation length K (steps)", ylabel="relative bias (fraction of ‖E g‖)",
                title="Measured relative bias and the lag-profile extrapolation")
            doc.figure("bias_extrapolation", fig, "Whether the lag profile predicts the measured bias: measured "
                       "relative bias (solid, with its interval; it sets the axis) next to the "
                       "bias extrapolated from the lag profile (dashed, after Aicher, Foti & Fox 2019). The "
                       "extrapolation assumes geometric decay and a constant ∂h/∂θ; it is not a bound and can be far from "
                       "the exact value in either direction (docs/statistics.md: 12–101× above on four small cells, "
                       "1.6–2.8× below on a geometric chain); the table gives the exact figure and the ratio. "
                       "Open triangles on the axis edge: extrapolations off that scale.")
        rel = rel.merge(extrapolated, on=by, how="left")
    rel["order"] = rel["method"].map(method_sort_key)
    rel = rel.sort_values(["panel", "order"]).drop(columns="order")
    shown = rel[["panel", "method", "n"]].copy()
    shown["relative bias [CI]"] = rel.apply(_ci, axis=1)
    if cos is not None:
        merged = rel[by].merge(cos, on=by, how="left")
        shown["cosine [CI]"] = merged.apply(_ci, axis=1, digits=5).to_numpy()
        rel = rel.merge(cos.rename(columns={"mean": "cosine", "ci_low": "cosine_low", "ci_high": "cosine_high"})
                        .drop(columns="n"), on=by, how="left")
    if "extrapolation" in rel.columns:
        shown["extrapolated (not a bound)"] = rel["extrapolation"].map(_fmt).to_numpy()
        if "exact_relative_bias" in rel.columns:  # the extrapolation is audited against the exact figure
            exact = rel["exact_relative_bias"].astype(float)
            shown["exact at the batches"] = exact.map(_fmt).to_numpy()
            ratio = rel["extrapolation"].astype(float) / exact.where(exact > 1e-12)
            shown["extrap./exact"] = ratio.map(_fmt).to_numpy()
    doc.table("bias", shown, rel, caption="Gradient bias per method (whole parameter vector).")
    if seeds == 1 and "relative_bias_hi" in bias.columns:
        one = bias[bias["group"] == "all"] if "group" in bias.columns else bias
        n_batches = int(one["n_batches"].min()) if "n_batches" in one.columns else 0
        n_flips = int(one["n_flips"].min()) if "n_flips" in one.columns else 0
        for note in stats.interval_notes(one.drop_duplicates("spec"), level=o.confidence, n_batches=n_batches,
                                         n_flips=n_flips):
            doc.text(note)
    summary = rel[[c for c in columns if c in rel.columns] + ["panel"]]
    if "seq_len" in bias.columns:
        summary = summary.merge(bias.groupby(["panel", "method"], as_index=False)["seq_len"].first(),
                                on=["panel", "method"], how="left")
    return summary


def _zero_intervals(rel: pd.DataFrame, bias: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Where the mean estimate is zero, the upper end of the interval is the largest per-seed upper end
    (``relative_bias_hi``): a bootstrap over seeds whose estimates are all zero has a zero-width interval even
    when every seed's own interval says the bias may be up to that end."""
    if "relative_bias_hi" not in bias.columns:
        return rel
    worst = bias.groupby(by, dropna=False)["relative_bias_hi"].max().rename("seed_hi").reset_index()
    rel = rel.merge(worst, on=by, how="left")
    zero = (rel["mean"] <= EXACT_ZERO) & (rel["seed_hi"] > rel["ci_high"].fillna(0))
    rel.loc[zero, "ci_high"] = rel.loc[zero, "seed_hi"]
    return rel.drop(columns="seed_hi")


def _lag_profile(doc: Document, tables: dict[str, pd.DataFrame], bias: pd.DataFrame) -> None:
    lags = tables.get("lags", pd.DataFrame())
    doc.heading("Lag profile")
    need = {"key", "lag", "mean"}
    if lags.empty or not need <= set(lags.columns):
        doc.text("No lag profiles (lags table) in these results.")
        return
    lags = lags[lags["key"].isin(bias["key"])].drop(columns=["panel"], errors="ignore")
    lags = lags.merge(bias[["key", "panel"]].drop_duplicates("key"), on="key", how="left")
    lags = lags[lags["mean"] > 0]
    if lags.empty:
        doc.text("The lag profiles in these results are empty.")
        return
    agg = {"phi": ("mean", "mean")}
    agg.update({n: (n, "mean") for n in ("q10", "q90", "fitted", "rate") if n in lags.columns})
    prof = lags.groupby(["panel", "lag"], as_index=False).agg(**agg)
    prof["what"] = "mean φ_d"
    frames = [prof]
    if "fitted" in prof.columns:
        frames.append(prof.assign(phi=prof["fitted"], q10=np.nan, q90=np.nan, what="geometric fit"))
    long = pd.concat(frames, ignore_index=True)
    fig = figures.ci_lines(long, x="lag", y="phi", low="q10" if "q10" in long else None,
                           high="q90" if "q90" in long else None, hue="what", panel="panel", logy=True,
                           markers=False, xlabel="lag d (steps)", ylabel="‖∂ℓ_t/∂h_{t−d}‖ (per scored loss)",
                           title="Lag profile φ_d (band: 10th–90th percentile over losses)")
    doc.figure("lag_profile", fig, "How far back the losses reach: lag profile φ_d = ‖∂ℓ_t/∂h_{t−d}‖: mean over "
               "losses and batches (averaged over "
               "seeds), band from the 10th to the 90th percentile, and the fitted geometric decay.")
    if "rate" in prof.columns:
        rates = prof.groupby("panel", as_index=False)["rate"].first()
        doc.table("lag_rates", rates.assign(rate=rates["rate"].map(_fmt)), rates,
                  caption="Fitted geometric decay rate β of the lag profile (φ_d ≈ c·β^d).")
