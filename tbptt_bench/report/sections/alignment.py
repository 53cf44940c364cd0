"""The alignment section: mean cosine between every pair of gradient estimators, one heatmap per panel."""

from __future__ import annotations

import pandas as pd

from tbptt_bench.methods.base import describe
from tbptt_bench.report import figures
from tbptt_bench.report.common import _ok, _with_panel
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


def alignment_section(doc: Document, tables: dict[str, pd.DataFrame]) -> None:
    """One heatmap of mean cos(ĝ_i, ĝ_j) per panel (docs/design.md §7.3); nothing for stores without the table."""
    matrices = alignment_matrices(tables)
    if not matrices:
        return
    doc.heading("Alignment between estimators")
    for i, (panel, matrix) in enumerate(matrices.items()):
        fig = figures.heatmap(matrix, cbar_label="mean cosine", title=f"Alignment between estimators · {panel}")
        doc.figure(f"alignment_{i + 1}", fig, f"{panel}: mean over batches (and seeds) of cos(ĝ_i, ĝ_j) on the same "
                   "batch; 1 = same direction; read a row against the true gradient for accuracy, against another "
                   "method for agreement: an estimator equally aligned with everything is noisy, not biased.")
