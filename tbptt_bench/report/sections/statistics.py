"""The statistics section: paired tests of the final metric with Holm's correction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from tbptt_bench.methods.base import describe
from tbptt_bench.report import stats
from tbptt_bench.report.common import _ci, _fmt, _unit, method_label, order_methods
from tbptt_bench.report.document import AXIS_UNITS, Document


def default_comparisons(methods: Sequence[str], best_fixed: str | None) -> list[tuple[str, str]]:
    """Each method against the exact gradient's method (full BPTT), and each against the best fixed-K method
    (each pair once)."""
    pairs: list[tuple[str, str]] = []
    names = order_methods(methods)
    reference = next((m for m in names if describe(m)["exact"]), None)
    for m in names:
        if reference is not None and m != reference:
            pairs.append((m, reference))
    if best_fixed is not None:
        for m in names:
            if m not in (best_fixed, reference):
                pairs.append((m, best_fixed))
    return pairs


def fixed_k(spec: str) -> bool:
    """Whether a method truncates at one K throughout, as it describes itself (e.g. tbptt, chunked, sliding)."""
    return bool(describe(spec)["fixed_k"])


def statistics_section(doc: Document, train: pd.DataFrame) -> None:
    o = doc.options
    doc.section("statistics", "Statistics")
    if train.empty:
        doc.text("No train measurements, so no paired comparisons of final metrics.")
        return
    unit = _unit(train)
    results = []
    for panel, grp in train.groupby("panel"):
        higher = bool(grp["higher"].iloc[0])
        means = grp.groupby("method")["eval_metric"].mean()
        fixed = means[[m for m in means.index if fixed_k(m)]]
        best = (fixed.idxmax() if higher else fixed.idxmin()) if len(fixed) else None
        pairs = list(o.comparisons) or default_comparisons(list(means.index), best)
        table = grp.drop_duplicates(["method", unit], keep="first")
        res = stats.paired_comparisons(table, value="eval_metric", condition="method", unit=unit, pairs=pairs,
                                       test=o.test, confidence=o.confidence, seed=o.seed, alpha=o.alpha)
        res.insert(0, "panel", panel)
        res["best fixed K"] = best or ""
        ahead = np.sign(res["mean_diff"].astype(float)) * (1 if higher else -1)
        res["better on average"] = np.where(ahead > 0, res["treatment"], np.where(ahead < 0, res["reference"], "tie"))
        results.append(res)
    res = pd.concat(results, ignore_index=True) if results else pd.DataFrame()
    if res.empty:
        doc.text("No declared comparison has both methods in the results.")
        return
    res["p_holm"] = stats.holm(res["p"].to_numpy())
    res["significant"] = res["p_holm"] <= o.alpha
    family = int(res["p"].notna().sum())
    res["warning"] = [stats.seed_warning(int(n), alpha=o.alpha, family_size=family) for n in res["n"]]
    test_name = "Wilcoxon signed-rank (scipy.stats.wilcoxon, exact for small n)" if o.test == "wilcoxon" else \
        "paired permutation test of the mean difference (scipy.stats.permutation_test, exact for small n)"
    declared = "the comparisons given with --compare" if o.comparisons else \
        "each method against full BPTT, and each against the best fixed-K method of its panel"
    units = AXIS_UNITS[o.axis]
    doc.text(f"Held-out metric at equal {units} (each panel's largest {units} budget that every run reached; see "
             f"the learning section), paired by seed (the same seed gives the same initial parameters and data "
             f"to every method). Comparisons: {declared}. Test: {test_name}, two-sided. Holm's step-down "
             f"correction over the whole family of {family} comparisons; significant means Holm-adjusted p ≤ "
             f"α = {o.alpha:g}. Effect size: the mean paired difference (treatment − reference, in metric units) "
             f"with its {o.confidence:.0%} bootstrap interval, and Cohen's d_z (mean / sd of the differences).")
    if not o.comparisons:
        doc.text("The best fixed K is chosen on the same seeds it is then compared on, which favours it; treat "
                 "those comparisons as exploratory.")
    need = stats.seeds_needed(o.alpha, family)
    fewest = int(res["n"].min())
    doc.text(f"With {family} comparisons, an exact two-sided test needs at least {need} paired seeds before any "
             f"comparison can be significant after Holm's correction (smallest attainable p × {family} ≤ α); "
             f"these results have {fewest}" + (f" to {int(res['n'].max())}" if res["n"].max() != fewest else "")
             + " per comparison.")
    warnings = sorted(set(w for w in res["warning"] if w))
    for w in warnings:
        doc.warning(w)
    shown = pd.DataFrame({
        "panel": res["panel"], "treatment": res["treatment"].map(method_label),
        "reference": res["reference"].map(method_label), "seeds": res["n"],
        "p (Holm)": res["p_holm"].map(_fmt),
        f"mean diff at equal {units} [CI]": res.apply(lambda r: _ci(r, "mean_diff", "diff_low", "diff_high"), axis=1),
        "d_z": res["effect_dz"].map(_fmt), "better on average": res["better on average"].map(_maybe_label),
        "significant": res["significant"].map(_fmt),
    })
    doc.table("statistics", shown, res, caption=f"Paired tests of the held-out metric at equal {units} (raw p, "
              "statistic and warnings in tables/statistics.csv).")


def _maybe_label(spec: str) -> str:
    return spec if spec == "tie" else method_label(spec)
