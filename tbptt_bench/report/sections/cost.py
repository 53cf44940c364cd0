"""The cost section: throughput, time per update and peak memory."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tbptt_bench.methods.base import describe
from tbptt_bench.report import figures
from tbptt_bench.report.common import (_ci, _device_label, _fmt, _ok, _with_panel, method_label, method_sort_key,
                                       with_method_axes)
from tbptt_bench.report.document import Document


def cost_section(doc: Document, tables: dict[str, pd.DataFrame], palette: dict[str, Any]) -> pd.DataFrame:
    """Throughput, time per update and peak memory; returns the perf rows used."""
    doc.section("cost", "Cost")
    perf = _ok(tables["results"], "perf")
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
    for x in ("K", "seq_len"):
        data, _ = _with_panel(perf, exclude=("seq_len",) if x == "seq_len" else ())
        full = data[data["method"].map(lambda m: bool(describe(m)["exact"]))]
        data = data[data[x].notna()]
        if x == "K" and data.empty:
            continue
        if x == "seq_len" and data.groupby(["panel", "method"])[x].nunique().max() < 2:
            continue
        for metric, label, name in (("tokens_per_s", "tokens / s", "tokens"), ("ms_per_update", "ms / update", "ms")):
            agg = _median_band(data, ["panel", "series" if x == "K" else "method", x], metric)
            refs = None
            if x == "K" and not full.empty:
                refs = full.groupby("panel", as_index=False)[metric].median().rename(columns={metric: "y"})
                refs["label"] = "full BPTT"
            hue = "series" if x == "K" else "method"
            xl = "truncation length K (steps)" if x == "K" else "sequence length T (steps)"
            if hue == "method":
                agg["method"] = agg["method"].map(method_label)
            fig = figures.ci_lines(agg, x=x, y="value", low="p10", high="p90", hue=hue, panel="panel",
                                   colours={method_label(m): c for m, c in palette.items()} if hue == "method" else None,
                                   refs=refs, logx=True, logy=True,
                                   xlabel=xl, ylabel=label, title=f"{label} against {xl}")
            doc.figure(f"cost_{name}_vs_{'k' if x == 'K' else 't'}", fig,
                       f"What each K costs: {label} against {xl} per method (median; band: 10th–90th percentile "
                       "over repeats; dashed: full BPTT).")
    if "peak_mib" in perf.columns and perf["peak_mib"].notna().any():
        data, _ = _with_panel(perf, exclude=("seq_len",))
        agg = data.groupby(["panel", "method", "seq_len"], as_index=False)["peak_mib"].median()
        agg["label"] = agg["method"].map(method_label)
        labelled = {method_label(m): c for m, c in palette.items()}
        if agg["seq_len"].nunique() > 1:
            fig = figures.ci_lines(agg, x="seq_len", y="peak_mib", hue="label", panel="panel", colours=labelled,
                                   logx=True, logy=True, xlabel="sequence length T (steps)",
                                   ylabel="peak memory added (MiB)",
                                   title="Peak memory against T")
        else:
            agg["order"] = agg["method"].map(method_sort_key)
            agg = agg.sort_values(["panel", "order"])
            fig = figures.ci_points(agg.assign(lo=agg["peak_mib"], hi=agg["peak_mib"]), label="label",
                                    y="peak_mib", low="lo", high="hi", panel="panel", colours=labelled,
                                    ylabel="peak memory added (MiB)",
                                    title=f"Peak memory per method (T = {int(agg['seq_len'].iloc[0])})")
        doc.figure("memory_vs_t", fig, "How memory grows with T: peak memory that training adds, per method (median "
                   "over cells).")
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
    doc.table("cost", shown, full_table, caption="Cost per configuration.")
    return perf


def _median_band(frame: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    lo, hi = f"{metric}_p10", f"{metric}_p90"
    agg = frame.groupby(by, as_index=False).agg(value=(metric, "median"),
                                                p10=(lo if lo in frame else metric, "min"),
                                                p90=(hi if hi in frame else metric, "max"))
    return agg
