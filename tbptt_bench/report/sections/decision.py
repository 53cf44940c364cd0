"""The decision summary at the top of the report: which K is enough, what it costs, and how it learns.

Per task × model and method series: the smallest K whose relative bias is below 5% and below 1%, judged
by the upper end of every seed's interval (``relative_bias_hi``, docs/design.md §3.3), so that "below" is a
claim the data support; its throughput and peak memory against full BPTT (perf rows at that K, or the
nearest measured K, named in the cell); and its held-out metric against full BPTT at equal budget
(the learning section's axis, §3.7). Beside it, the K that methods which choose K ended training with.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from tbptt_bench.methods.base import describe
from tbptt_bench.report.common import _fmt, _ok, order_methods, with_method_axes
from tbptt_bench.report.document import AXIS_UNITS, Document
from tbptt_bench.report.sections.bias import _bias_rows

THRESHOLDS = (0.05, 0.01)


def smallest_k(bias: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Per (task, model, series): the smallest K whose ``relative_bias_hi`` is below ``threshold`` for every
    seed (NaN where none is; ``largest_k``: the largest K measured). ``bias`` has columns task, model,
    series, K, relative_bias_hi."""
    rows = bias[bias["K"].notna()]
    worst = rows.groupby(["task", "model", "series", "K"], as_index=False)["relative_bias_hi"] \
        .agg(lambda v: v.max() if v.notna().all() else math.nan)
    out = []
    for (task, model, series), grp in worst.groupby(["task", "model", "series"], sort=False):
        below = grp[grp["relative_bias_hi"] < threshold]
        out.append({"task": task, "model": model, "series": series,
                    "K": float(below["K"].min()) if len(below) else math.nan, "largest_k": float(grp["K"].max())})
    return pd.DataFrame(out, columns=["task", "model", "series", "K", "largest_k"])


def nearest(frame: pd.DataFrame, k: float) -> pd.DataFrame:
    """Rows of ``frame`` (column K) at the measured K nearest ``k`` on a log scale (the larger on a tie)."""
    ks = frame["K"].dropna().unique()
    if not len(ks) or not math.isfinite(k):
        return frame.iloc[0:0]
    dist = np.abs(np.log2(ks) - math.log2(k))
    best = max(ks[dist == dist.min()])
    return frame[frame["K"] == best]


def _reference(methods: pd.Series) -> str | None:
    """Full BPTT of a set of methods: the first exact one in the methods' own order."""
    exact = [m for m in order_methods(methods.dropna().astype(str).unique()) if describe(m)["exact"]]
    return exact[0] if exact else None


def cost_ratio(perf: pd.DataFrame, series: str, k: float) -> dict[str, Any]:
    """Tokens/s and peak memory of the series at (nearest) K over full BPTT's, at the largest T measured for
    both; ``K``: the K measured (NaN where none)."""
    none = {"speed": math.nan, "memory": math.nan, "K": math.nan}
    full = _reference(perf["method"]) if len(perf) else None
    if full is None or not math.isfinite(k):
        return none
    mine = perf[perf["series"] == series]
    common = sorted(set(mine["seq_len"]) & set(perf.loc[perf["method"] == full, "seq_len"]))
    if not common:
        return none
    at = nearest(mine[mine["seq_len"] == common[-1]], k)
    ref = perf[(perf["method"] == full) & (perf["seq_len"] == common[-1])]
    if at.empty:
        return none
    speed = float(at["tokens_per_s"].median() / ref["tokens_per_s"].median())
    memory = math.nan
    if "mem_delta_bytes" in perf.columns and ref["mem_delta_bytes"].median() > 0:
        memory = float(at["mem_delta_bytes"].median() / ref["mem_delta_bytes"].median())
    return {"speed": speed, "memory": memory, "K": float(at["K"].iloc[0]), "T": int(common[-1])}


def learning_gap(train: pd.DataFrame, series: str, k: float, unit: str) -> dict[str, Any]:
    """Mean paired difference (method − full BPTT) of the held-out metric at equal budget, for the series'
    trained method at (nearest) K; ``K``: the K trained (NaN where none)."""
    none = {"gap": math.nan, "K": math.nan, "n": 0}
    full = _reference(train["method"]) if len(train) else None
    if full is None or not math.isfinite(k):
        return none
    at = nearest(train[train["series"] == series], k)
    if at.empty:
        return none
    pairs = at.merge(train[train["method"] == full], on=unit, suffixes=("", "_full"))
    if pairs.empty:
        return none
    return {"gap": float((pairs["eval_metric"] - pairs["eval_metric_full"]).mean()), "K": float(at["K"].iloc[0]),
            "n": len(pairs)}


def chosen_k(curves: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Per task × model and method that chooses K as it trains (its ``k_used`` varies over a run): the median
    over seeds of its last ``k_used``."""
    if curves.empty or "k_used" not in curves.columns or train.empty:
        return pd.DataFrame(columns=["task", "model", "method", "K"])
    choosers = [m for m in train["method"].unique() if not describe(m)["fixed_k"] and not describe(m)["exact"]]
    runs = curves[curves["key"].isin(train.loc[train["method"].isin(choosers), "key"]) & curves["k_used"].notna()]
    if runs.empty:
        return pd.DataFrame(columns=["task", "model", "method", "K"])
    varied = runs.groupby("key")["k_used"].nunique()
    runs = runs[runs["key"].isin(varied[varied > 1].index)]
    last = runs.sort_values("update").groupby("key", as_index=False).last()
    return last.groupby(["task", "model", "method"], as_index=False)["k_used"].median().rename(columns={"k_used": "K"})


def decision_table(tables: dict[str, pd.DataFrame], train: pd.DataFrame, unit: str = "seed") -> pd.DataFrame:
    """The decision summary, unrounded: one row per task × model × series with a K grid in the bias rows."""
    bias = _bias_rows(tables)
    if bias.empty or "relative_bias_hi" not in bias.columns:
        return pd.DataFrame()
    bias = with_method_axes(bias)
    perf = _ok(tables["results"], "perf")
    perf = with_method_axes(perf) if not perf.empty and "tokens_per_s" in perf.columns else pd.DataFrame()
    train = with_method_axes(train) if not train.empty else train
    limits = [smallest_k(bias, t).rename(columns={"K": f"k_{t:g}"}) for t in THRESHOLDS]
    table = limits[0].merge(limits[1].drop(columns="largest_k"), on=["task", "model", "series"])
    rows = []
    for row in table.to_dict("records"):
        cost = perf[(perf["task"] == row["task"]) & (perf["model"] == row["model"])] if len(perf) else perf
        learned = train[(train["task"] == row["task"]) & (train["model"] == row["model"])] if len(train) else train
        for t in THRESHOLDS:
            k = row[f"k_{t:g}"]
            c = cost_ratio(cost, row["series"], k) if len(cost) else {"speed": math.nan, "memory": math.nan,
                                                                        "K": math.nan}
            g = learning_gap(learned, row["series"], k, unit) if len(learned) else {"gap": math.nan, "K": math.nan}
            row |= {f"speed_{t:g}": c["speed"], f"memory_{t:g}": c["memory"], f"cost_k_{t:g}": c["K"],
                    f"metric_gap_{t:g}": g["gap"], f"train_k_{t:g}": g["K"]}
        if len(learned) and "metric_name" in learned.columns:
            arrow = " ↑" if bool(learned["higher"].iloc[0]) else " ↓"
            row["metric"] = str(learned["metric_name"].iloc[0]) + arrow
        rows.append(row)
    return pd.DataFrame(rows)


def _k_cell(k: float, largest: float) -> str:
    return f"{k:g}" if math.isfinite(k) else f"> {largest:g}"


def _at(value: float, measured_k: float, k: float, digits: int = 2) -> str:
    """A ratio or difference, with the K it was measured at where that is not the K asked for."""
    if not math.isfinite(value):
        return "–"
    text = _fmt(value, digits)
    return text if measured_k == k else f"{text} (K={measured_k:g})"


def decision_section(doc: Document, slot: list[tuple[str, Any]], tables: dict[str, pd.DataFrame],
                     train: pd.DataFrame) -> None:
    """Fill ``slot`` (at the top of the report) with the decision summary."""
    units = AXIS_UNITS[doc.options.axis]
    with doc.into(slot):
        doc.section("decision", "Which K, and at what cost")
        table = decision_table(tables, train)
        if table.empty:
            doc.text("No bias measurements with intervals over a K grid, so no K can be recommended.")
            return
        doc.text("Smallest K whose relative gradient bias is below 5% (and 1%): judged by the upper end of the "
                 "bias interval of every seed (relative_bias_hi), so “below” is what the data support, not just "
                 "the estimate; “> K” means no measured K got there. Speed and memory: tokens/s and peak memory "
                 "over full BPTT's, at the largest T measured (the K in brackets is the nearest K with perf "
                 f"cells, where the chosen one has none). Metric vs full: the mean paired difference of the "
                 f"held-out metric at equal {units} (↑: higher is better, ↓: lower); the K in brackets is the "
                 "nearest trained K. Details in the sections below.")
        shown = pd.DataFrame({"task": table["task"], "model": table["model"], "series": table["series"]})
        for t in THRESHOLDS:
            k = table[f"k_{t:g}"]
            shown[f"K: bias < {t:.0%}"] = [_k_cell(a, b) for a, b in zip(k, table["largest_k"])]
            shown[f"speed ×full @K<{t:.0%}"] = [_at(v, m, a) for v, m, a in zip(table[f"speed_{t:g}"],
                                                                                    table[f"cost_k_{t:g}"], k)]
            shown[f"memory ×full @K<{t:.0%}"] = [_at(v, m, a) for v, m, a in zip(table[f"memory_{t:g}"],
                                                                                     table[f"cost_k_{t:g}"], k)]
            shown[f"metric vs full @K<{t:.0%}, equal {units}"] = [
                _at(v, m, a, 3) for v, m, a in zip(table[f"metric_gap_{t:g}"], table[f"train_k_{t:g}"], k)]
        if "metric" in table.columns:
            shown.insert(3, "metric", table["metric"].fillna("–"))
        doc.table("decision", shown, table, caption="Decision summary: which K is enough, and what it costs.")
        chosen = chosen_k(tables.get("curves", pd.DataFrame()), train)
        if len(chosen):
            chosen = chosen.assign(family=chosen["method"].map(lambda m: describe(m)["family"]))
            doc.table("chosen_k", chosen[["task", "model", "family", "K"]].assign(K=chosen["K"].map(_fmt)), chosen,
                      caption="K at the end of training for methods that choose K as they train (median over seeds "
                      "of the last K used).")
