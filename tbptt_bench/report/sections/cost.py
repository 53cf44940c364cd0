"""The cost section: throughput, time per update and peak memory."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tbptt_bench.methods.base import describe
from tbptt_bench.report import figures
from tbptt_bench.report.common import (_ci, _device_label, _fmt, _ok, _with_panel, method_label, method_sort_key,
                                       with_method_axes)
from tbptt_bench.report.document import Document

#: How a figure says that open markers are measurements on a busy machine (docs/perf.md, "Busy machine").
BUSY_LEGEND = "open marker: measured on a busy machine"
BUSY_MARK = ("Open markers: measured on a busy machine (other processes used the CPUs while it was timed; "
             "docs/perf.md, “Busy machine”).")


def cost_section(doc: Document, tables: dict[str, pd.DataFrame], palette: dict[str, Any]) -> pd.DataFrame:
    """Throughput, time per update and peak memory; returns the perf rows used."""
    doc.section("cost", "Cost")
    perf = _ok(tables, "perf")
    perf = perf[perf["tokens_per_s"].notna()] if "tokens_per_s" in perf.columns else perf.iloc[0:0]
    if perf.empty:
        doc.text("No perf measurements in these results.")
        return perf
    perf = with_method_axes(perf)
    if "mem_delta_bytes" in perf.columns:
        perf["peak_mib"] = perf["mem_delta_bytes"] / 2**20
    threads = ", ".join(sorted({_fmt(v) for v in perf.get("threads", pd.Series(dtype=float)).dropna()}))
    doc.text("Medians over timed repeats after warm-up (bands and error bars: 10th–90th percentile over the "
             f"repeats, not a confidence interval); torch threads: {threads or 'not recorded'}. Peak memory is "
             "what training adds to the baseline of model, optimiser and batch (CPU: resident-set high-water "
             "mark in a fresh process; GPU: max_memory_allocated). CPU and GPU are separate panels. Full BPTT "
             "has no K: it is the dashed line in plots against K.")
    perf["busy"] = perf["busy"].fillna(False).astype(bool) if "busy" in perf.columns else False
    busy = BUSY_MARK if perf["busy"].any() else ""
    _ratios(doc, perf, palette, busy)
    for x in ("K", "seq_len"):
        data, _ = _with_panel(perf, exclude=("seq_len",) if x == "seq_len" else ())
        exact = data[data["method"].map(lambda m: bool(describe(m)["exact"]))]
        data = data[data[x].notna()]
        curves = _curve_panels(data, x, "series" if x == "K" else "method")
        if x == "seq_len" and not len(curves):
            continue
        if not len(curves):  # one K per series everywhere: one point per series in every panel
            curves = pd.Index(data["panel"].unique())
        elif len(curves) < data["panel"].nunique():
            doc.text(f"{data['panel'].nunique() - len(curves)} of {data['panel'].nunique()} perf configurations hold "
                     f"one {'K per series' if x == 'K' else 'T per method'}; they are left out of the plots against "
                     f"{'K' if x == 'K' else 'T'} (their ratios to full BPTT are in cost_ratio).")
        data, exact = data[data["panel"].isin(curves)], exact[exact["panel"].isin(curves)]
        if data.empty:
            continue
        for metric, label, name in (("tokens_per_s", "tokens / s", "tokens"), ("ms_per_update", "ms / update", "ms")):
            hue = "series" if x == "K" else "label"
            agg = _median_band(data.assign(label=data["method"].map(method_label)), ["panel", hue, x], metric)
            refs = _exact_lines(exact, metric, palette) if x == "K" else None
            xl = "truncation length K (steps)" if x == "K" else "sequence length T (steps)"
            fig = figures.ci_lines(agg, x=x, y="value", low="p10", high="p90", hue=hue, panel="panel",
                                   colours=palette, refs=refs, logx=True, logy=True, flag="busy",
                                   flag_label=BUSY_LEGEND, xlabel=xl, ylabel=label, title=f"{label} against {xl}")
            doc.figure(f"cost_{name}_vs_{'k' if x == 'K' else 't'}", fig,
                       f"What each K costs: {label} against {xl} per method (median; band: 10th–90th percentile "
                       "over repeats). " + ("Dashed: full BPTT (`full` alone); dotted: its checkpointed variants, each "
                                            "its own line. " if x == "K" else "") + busy)
    if "peak_mib" in perf.columns and perf["peak_mib"].notna().any():
        data, _ = _with_panel(perf, exclude=("seq_len",))
        agg = data.groupby(["panel", "method", "seq_len"], as_index=False).agg(peak_mib=("peak_mib", "median"),
                                                                               busy=("busy", "any"))
        agg["label"] = agg["method"].map(method_label)
        curves = _curve_panels(agg, "seq_len", "method")
        if len(curves):
            fig = figures.ci_lines(agg[agg["panel"].isin(curves)], x="seq_len", y="peak_mib", hue="label", panel="panel", colours=palette,
                                   logx=True, from_zero=True, flag="busy", flag_label=BUSY_LEGEND,
                                   xlabel="sequence length T (steps)", ylabel="peak memory added (MiB)",
                                   title="Peak memory against T")
        else:
            agg["order"] = agg["method"].map(method_sort_key)
            agg = agg.sort_values(["panel", "order"])
            fig = figures.ci_points(agg.assign(lo=agg["peak_mib"], hi=agg["peak_mib"]), label="label",
                                    y="peak_mib", low="lo", high="hi", panel="panel", colours=palette,
                                    ylabel="peak memory added (MiB)", from_zero=True,
                                    title=f"Peak memory per method (T = {int(agg['seq_len'].iloc[0])})")
        doc.figure("memory_vs_t", fig, "How memory grows with T: peak memory that training adds, per method (median "
                   "over cells; the axis starts at 0). " + busy)
    shown_cols = [c for c in ("device_label", "task", "model", "method", "seq_len", "batch_size", "hidden_size",
                              "tokens_per_s", "tokens_per_s_p10", "tokens_per_s_p90", "ms_per_update",
                              "ms_per_update_p10", "ms_per_update_p90", "peak_mib", "threads")
                  if c in perf.columns or c == "device_label"]
    full_table = perf.assign(device_label=_device_label(perf))[shown_cols]
    full_table = full_table.assign(order=full_table["method"].map(method_sort_key)) \
        .sort_values(["device_label", "task", "model", "seq_len", "order"]).drop(columns="order")
    shown = full_table.copy()
    shown["tokens/s [p10, p90]"] = full_table.apply(lambda r: _ci(r, "tokens_per_s", "tokens_per_s_p10",
                                                                     "tokens_per_s_p90"), axis=1)
    shown["ms/update [p10, p90]"] = full_table.apply(lambda r: _ci(r, "ms_per_update", "ms_per_update_p10",
                                                                      "ms_per_update_p90"), axis=1)
    keep = [c for c in ("device_label", "task", "model", "method", "seq_len") if c in shown.columns]
    keep += ["tokens/s [p10, p90]", "ms/update [p10, p90]"] + (["peak_mib"] if "peak_mib" in shown.columns else [])
    shown = shown[keep].rename(columns={"device_label": "device", "seq_len": "T", "peak_mib": "peak MiB"})
    shown = shown.map(_fmt)
    marked = perf.loc[full_table.index, "busy"].to_numpy()
    shown["tokens/s [p10, p90]"] = [v + (" (busy)" if b else "") for v, b in zip(shown["tokens/s [p10, p90]"], marked)]
    caption = "Cost per configuration."
    if perf["busy"].any():
        caption += (f" (busy): measured on a busy machine ({int(perf['busy'].sum())} of {len(perf)} cells; "
                    "docs/perf.md, “Busy machine”).")
    doc.table("cost", shown, full_table.assign(busy=marked), caption=caption)
    return perf


def _curve_panels(data: pd.DataFrame, x: str, by: str) -> pd.Index:
    """The panels where some ``by`` group (a series or a method) was measured at two or more values of ``x``,
    so a plot against ``x`` draws a curve there, not one point per method."""
    if data.empty:
        return pd.Index([])
    varied = data.groupby(["panel", by])[x].nunique().groupby("panel").max()
    return varied.index[varied > 1]


def ratio_rows(perf: pd.DataFrame) -> pd.DataFrame:
    """Per configuration (panel) and method other than ``full``: median tokens/s and peak memory over those of
    ``full`` in the same configuration, in long form (columns panel, label, what, ratio, busy)."""
    data, _ = _with_panel(perf)
    data["label"] = data["method"].map(method_label)
    cols = {"tokens_per_s": "tokens/s ÷ full BPTT's"}
    if "peak_mib" in data.columns and data["peak_mib"].notna().any():
        cols["peak_mib"] = "peak memory ÷ full BPTT's"
    med = data.groupby(["panel", "method", "label"], as_index=False, sort=False) \
        .agg(**{c: (c, "median") for c in cols}, busy=("busy", "any"))
    full = med[med["label"] == "full"].set_index("panel")
    rows = []
    for row in med[med["label"] != "full"].to_dict("records"):
        if row["panel"] not in full.index:
            continue
        ref = full.loc[row["panel"]]
        for col, what in cols.items():
            if ref[col] > 0:
                rows.append({"panel": row["panel"], "method": row["method"], "label": row["label"], "what": what,
                             "ratio": row[col] / ref[col], "busy": bool(row["busy"] or ref["busy"])})
    return pd.DataFrame(rows, columns=["panel", "method", "label", "what", "ratio", "busy"])


def _ratios(doc: Document, perf: pd.DataFrame, palette: dict[str, Any], busy: str) -> None:
    """The cost of every method as a multiple of full BPTT's in the same configuration, axis from zero."""
    rows = ratio_rows(perf)
    if rows.empty:
        return
    rows = rows.assign(order=rows["method"].map(method_sort_key)).sort_values(["panel", "order"], kind="stable")
    fig = figures.ratio_dots(rows, x="ratio", y="panel", hue="label", facet="what", colours=palette, flag="busy",
                             flag_label=BUSY_LEGEND, xlabel="multiple of full BPTT (1 = the same)",
                             title="Throughput and peak memory relative to full BPTT, per configuration")
    doc.figure("cost_ratio", fig, "What each method costs against full BPTT in the same configuration (task · model "
               "· size): median tokens/s and peak memory over full BPTT's; the axis starts at 0 and the dashed line "
               "is full BPTT. Above 1 on tokens/s is faster; below 1 on memory is smaller. At tiny sizes per-update "
               "overhead dominates tokens/s. " + busy)


def _exact_lines(exact: pd.DataFrame, metric: str, palette: dict[str, Any]) -> pd.DataFrame | None:
    """Horizontal lines per panel for methods without K: full BPTT itself (``full``, dashed) and each of its
    variants (e.g. checkpointed) as its own dotted line in its own colour, never pooled."""
    if exact.empty:
        return None
    lines = exact.groupby(["panel", "method"], as_index=False)[metric].median().rename(columns={metric: "y"})
    lines["label"] = lines["method"].map(method_label)
    lines["colour"] = lines["label"].map(lambda lab: palette.get(lab, figures.REFERENCE_COLOUR))
    lines["style"] = ["--" if describe(m)["label"] == "full" else ":" for m in lines["method"]]
    return lines


def _median_band(frame: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    lo, hi = f"{metric}_p10", f"{metric}_p90"
    agg = frame.groupby(by, as_index=False).agg(value=(metric, "median"),
                                                p10=(lo if lo in frame else metric, "min"),
                                                p90=(hi if hi in frame else metric, "max"),
                                                busy=("busy", "any"))
    return agg
