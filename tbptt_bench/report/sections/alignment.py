"""The alignment section: how far each estimator points from the true gradient, against K, one figure per task."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tbptt_bench.methods.base import describe
from tbptt_bench.report import figures
from tbptt_bench.analysis.bias import TRUE_SPEC
from tbptt_bench.report.common import _fmt, _ok, _with_panel, with_method_axes
from tbptt_bench.report.document import Document


def alignment_matrices(tables: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Per panel (task · model · …), the square table of mean cosines (averaged over seeds), rows and columns
    labelled by the methods' own labels in their own order (``describe(spec)``); empty without an
    ``alignment`` table (stores written before it existed)."""
    align = tables.get("alignment", pd.DataFrame())
    if align.empty or not {"spec", "other", "cosine_mean"} <= set(align.columns):
        return {}
    align = _ok(align, "bias")
    if "group" in align.columns:
        align = align[align["group"] == "all"]
    if align.empty:
        return {}
    align, _ = _with_panel(align)
    out: dict[str, pd.DataFrame] = {}
    for panel, grp in align.groupby("panel", sort=False):
        mean = grp.groupby(["spec", "other"])["cosine_mean"].mean().unstack("other")
        order = sorted(set(mean.index) | set(mean.columns), key=lambda s: describe(s)["sort_key"])
        labels = [_label(grp, s) for s in order]
        matrix = mean.reindex(index=order, columns=order)
        matrix.index, matrix.columns = labels, labels
        out[str(panel)] = matrix
    return out


def _label(rows: pd.DataFrame, spec: str) -> str:
    """The label a measurement gave ``spec`` (the true gradient's is its own), else its description's."""
    given = rows.loc[rows["spec"] == spec, "label"] if "label" in rows.columns else pd.Series(dtype=object)
    return str(given.iloc[0]) if len(given) and pd.notna(given.iloc[0]) else str(describe(spec)["label"])


def misalignment(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per panel, series and K: 1 − mean cos(ĝ, g) against the true gradient (``full``, or the measurement's
    own true gradient), averaged over seeds, with a band of ±1.96 standard errors of the cosine (averaged over
    seeds as well). Columns task, panel, series, K, mean, ci_low, ci_high."""
    align = tables.get("alignment", pd.DataFrame())
    if align.empty or not {"spec", "other", "cosine_mean"} <= set(align.columns):
        return pd.DataFrame()
    align = _ok(align, "bias")
    if "group" in align.columns:
        align = align[align["group"] == "all"]
    truth = align["other"].isin(["full", TRUE_SPEC]) & ~align["spec"].isin(["full", TRUE_SPEC])
    align = align[truth]
    if align.empty:
        return pd.DataFrame()
    align, _ = _with_panel(with_method_axes(align, column="spec"))
    align = align[align["K"].notna()]
    se = align["cosine_se"].fillna(0.0) if "cosine_se" in align.columns else 0.0
    align = align.assign(mean=1 - align["cosine_mean"], ci_low=1 - (align["cosine_mean"] + 1.96 * se),
                         ci_high=1 - (align["cosine_mean"] - 1.96 * se))
    return align.groupby(["task", "panel", "series", "K"], as_index=False, sort=False)[["mean", "ci_low", "ci_high"]] \
        .mean()


def alignment_section(doc: Document, tables: dict[str, pd.DataFrame], palette: dict[str, Any]) -> None:
    """Per task, 1 − cos(ĝ, g) against K per method series on a log axis, one panel per model in the report's
    order (docs/design.md §7.3); the full matrices of mean cosines between every pair of estimators go to
    tables/alignment_N.csv. Nothing for stores without the alignment table."""
    curves = misalignment(tables)
    matrices = alignment_matrices(tables)
    if curves.empty and not matrices:
        return
    doc.heading("Alignment between estimators")
    doc.text("How far each estimator's direction is from the true gradient's: 1 − cos(ĝ, g), the mean over "
             "batches of each batch's cosine, averaged over seeds (0: the same direction); log axis, so "
             "differences between 0.9 and 0.999 stay visible. Band: ±1.96 standard errors of the cosine.")
    for task, grp in curves.groupby("task", sort=False):
        fig = figures.ci_lines(grp, x="K", y="mean", low="ci_low", high="ci_high", hue="series", panel="panel",
                               colours=palette, logx=True, logy=True, zero_below=1e-12, sharey=True,
                               xlabel="truncation length K (steps)", ylabel="1 − cos(ĝ, g)",
                               title=f"Misalignment with the true gradient against K · {task}")
        doc.figure(f"alignment_{task}", fig, f"{task}: 1 − mean cos(ĝ, g) against K per method series, one panel per "
                   "model; lower is better aligned. Panels share the y axis.")
    for i, (panel, matrix) in enumerate(matrices.items()):
        doc.table(f"alignment_{i + 1}", matrix.reset_index(names="method").map(_fmt), matrix.reset_index(names="method"),
                  caption=f"{panel}: mean cos(ĝ_i, ĝ_j) on the same batch between every pair of estimators.")
