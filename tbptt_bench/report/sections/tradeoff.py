"""The trade-off section: quality or bias against cost, one point per method."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tbptt_bench.report import figures
from tbptt_bench.report import stats
from tbptt_bench.report.common import _with_panel, method_label
from tbptt_bench.report.document import Document


def tradeoff_section(doc: Document, train: pd.DataFrame, bias_summary: pd.DataFrame, perf: pd.DataFrame,
                     palette: dict[str, Any]) -> None:
    o = doc.options
    doc.section("tradeoff", "Trade-off")
    drawn = False
    if not train.empty and {"wall_time", "update"} <= set(train.columns):
        runs = train[train["update"] > 0].copy()
        runs["ms_per_update_train"] = 1000.0 * runs["wall_time"] / runs["update"]
        cost = stats.summarise(runs, "ms_per_update_train", ["panel", "method"], confidence=o.confidence,
                               n_resamples=o.n_resamples, seed=o.seed)
        quality = stats.summarise(runs, "eval_metric", ["panel", "method"], confidence=o.confidence,
                                  n_resamples=o.n_resamples, seed=o.seed)
        both = cost.merge(quality, on=["panel", "method"], suffixes=("_cost", "_q"))
        both["short"] = both["method"].map(method_label)
        fig = figures.tradeoff(both, x="mean_cost", y="mean_q", label="short", hue="method",
                               xerr=("ci_low_cost", "ci_high_cost"), yerr=("ci_low_q", "ci_high_q"),
                               panel="panel", colours=palette, xlabel="ms per update (training)",
                               ylabel="final held-out metric",
                               title="Final metric against training time per update (one point per method)")
        doc.figure("tradeoff_metric_cost", fig, "Final held-out metric against the time per update measured in the "
                   "same training runs (wall time of training without evaluation / updates); error bars: "
                   "bootstrap intervals over seeds.")
        concurrency = train["concurrency"].max() if "concurrency" in train.columns else 1
        if concurrency and concurrency > 1:
            doc.warning(f"Train cells ran up to {int(concurrency)} at a time, so their time per update is "
                        "inflated by contention; use the cost section's perf cells for timing claims.")
        drawn = True
    if not bias_summary.empty and not perf.empty:
        cost = perf.groupby(["task", "model", "method"], as_index=False)["ms_per_update"].median()
        both = bias_summary.merge(cost, on=["task", "model", "method"], how="inner")
        if not both.empty:
            both["short"] = both["method"].map(method_label)
            both, _ = _with_panel(both)
            fig = figures.tradeoff(both, x="ms_per_update", y="mean", label="short", hue="method",
                                   yerr=("ci_low", "ci_high"), panel="panel", colours=palette, logx=True, logy=True,
                                   xlabel="ms per update (perf cells)", ylabel="relative bias",
                                   title="Relative gradient bias against cost (one point per method)")
            doc.figure("tradeoff_bias_cost", fig, "Relative bias of each method's gradient against the median time "
                       "per update of its perf cells (same task and model).")
            drawn = True
    if drawn:
        doc.text("The figures a reader uses to pick K: a point that is both cheaper (left) and better (lower bias; "
                 "a higher ↑ or lower ↓ metric) than another dominates it; compare each truncated method with full "
                 "BPTT in the same panel.")
    else:
        doc.text("Neither train nor bias-and-perf measurements are present, so there is no trade-off to draw.")
