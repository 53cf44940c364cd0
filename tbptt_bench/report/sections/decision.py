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
    both; ``K``: the K measured (NaN where none); ``busy``: whether either was measured on a busy machine."""
    none = {"speed": math.nan, "memory": math.nan, "K": math.nan, "busy": False}
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
    busy = bool(pd.concat([at, ref]).get("busy", pd.Series(dtype=object)).fillna(False).astype(bool).any())
    return {"speed": speed, "memory": memory, "K": float(at["K"].iloc[0]), "T": int(common[-1]), "busy": busy}


#: The columns that say how large a cost measurement was.
SIZE = ("hidden_size", "batch_size")


def split_sizes(perf: pd.DataFrame, train: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The perf rows at the training sizes, and those of the realistic-size block: the largest hidden × batch
    measured, where no training run has that size (empty where there is none, or no sizes are recorded)."""
    if perf.empty or not set(SIZE) <= set(perf.columns):
        return perf, perf.iloc[0:0]
    area = perf["hidden_size"].astype(float) * perf["batch_size"].astype(float)
    trained = set()
    if not train.empty and set(SIZE) <= set(train.columns):
        trained = {(float(h), float(b)) for h, b in train[list(SIZE)].drop_duplicates().itertuples(index=False)}
    big = perf[area == area.max()]
    size = (float(big["hidden_size"].iloc[0]), float(big["batch_size"].iloc[0]))
    if area.nunique() < 2 or size in trained:
        return perf, perf.iloc[0:0]
    return perf[area != area.max()], big


def _at_training_size(perf: pd.DataFrame, train: pd.DataFrame) -> pd.DataFrame:
    """Perf rows of one task × model at the size its runs trained with (all rows where sizes are unknown)."""
    cols = [c for c in (*SIZE, "seq_len") if c in perf.columns and c in train.columns]
    if perf.empty or train.empty or not cols:
        return perf
    keep = perf.merge(train[cols].drop_duplicates(), on=cols, how="inner")
    return keep if len(keep) else perf.iloc[0:0]


def scale_words(scale: pd.DataFrame) -> str:
    """The realistic-size block in words, e.g. ``copy · lstm, hidden 256, batch 32, T 1024``."""
    if scale.empty:
        return ""
    first = scale.iloc[0]
    return (f"{first['task']} · {first['model']}, hidden {int(first['hidden_size'])}, batch "
            f"{int(first['batch_size'])}, T {int(scale['seq_len'].max())}")


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
    last = runs.sort_values("n_updates").groupby("key", as_index=False).last()
    return last.groupby(["task", "model", "method"], as_index=False)["k_used"].median().rename(columns={"k_used": "K"})


def decision_table(tables: dict[str, pd.DataFrame], train: pd.DataFrame, unit: str = "seed") -> pd.DataFrame:
    """The decision summary, unrounded: one row per task × model × series with a K grid in the bias rows.

    Cost is read twice: at the task × model's training size (``speed_*``, ``memory_*``) and in the
    realistic-size perf block (``speed_scale_*``, ``memory_scale_*``; :func:`split_sizes`); ``busy_*`` says
    whether a busy machine measured either side of a ratio.
    """
    bias = _bias_rows(tables)
    if bias.empty or "relative_bias_hi" not in bias.columns:
        return pd.DataFrame()
    bias = with_method_axes(bias)
    perf = _ok(tables, "perf")
    perf = with_method_axes(perf) if not perf.empty and "tokens_per_s" in perf.columns else pd.DataFrame()
    train = with_method_axes(train) if not train.empty else train
    small, scale = split_sizes(perf, train)
    limits = [smallest_k(bias, t).rename(columns={"K": f"k_{t:g}"}) for t in THRESHOLDS]
    table = limits[0].merge(limits[1].drop(columns="largest_k"), on=["task", "model", "series"])
    rank = bias.groupby("series")["method"].agg(lambda specs: min(describe(m)["sort_key"] for m in specs))
    table["order"] = table["series"].map({name: i for i, name in enumerate(rank.sort_values().index)})
    rows = []
    for row in table.to_dict("records"):
        learned = train[(train["task"] == row["task"]) & (train["model"] == row["model"])] if len(train) else train
        cost = small[(small["task"] == row["task"]) & (small["model"] == row["model"])] if len(small) else small
        cost = _at_training_size(cost, learned)
        for t in THRESHOLDS:
            k = row[f"k_{t:g}"]
            for suffix, rows_used in (("", cost), ("_scale", scale)):
                c = cost_ratio(rows_used, row["series"], k) if len(rows_used) else \
                    {"speed": math.nan, "memory": math.nan, "K": math.nan, "busy": False}
                row |= {f"speed{suffix}_{t:g}": c["speed"], f"memory{suffix}_{t:g}": c["memory"],
                        f"cost_k{suffix}_{t:g}": c["K"], f"busy{suffix}_{t:g}": c["busy"]}
            g = learning_gap(learned, row["series"], k, unit) if len(learned) else {"gap": math.nan, "K": math.nan}
            row |= {f"metric_gap_{t:g}": g["gap"], f"train_k_{t:g}": g["K"]}
        row["perf_cells"] = len(cost)
        row["trained"] = len(learned) > 0
        if len(learned) and "metric_name" in learned.columns:
            arrow = " ↑" if bool(learned["higher"].iloc[0]) else " ↓"
            row["metric"] = str(learned["metric_name"].iloc[0]) + arrow
        rows.append(row)
    return pd.DataFrame(rows)


def _k_cell(k: float, largest: float) -> str:
    return f"{k:g}" if math.isfinite(k) else f"> {largest:g}"


def overhead_words(table: pd.DataFrame, t: float = THRESHOLDS[0]) -> str:
    """One sentence where cost at the training size is dominated by per-update overhead: some series runs at
    under half of its realistic-size speed ratio there (truncation does no more arithmetic per token than full
    BPTT for chunked and tbptt, so such a gap is overhead, not the method); "" otherwise."""
    small, big = table.get(f"speed_{t:g}"), table.get(f"speed_scale_{t:g}")
    if small is None or big is None:
        return ""
    both = pd.DataFrame({"small": small, "big": big}).dropna()
    if both.empty or not (both["small"] < 0.5 * both["big"]).any():
        return ""
    return (f"At the training sizes per-update overhead dominates cost (truncation at {both['small'].min():.2g}–"
            f"{both['small'].max():.2g}× full BPTT's tokens/s); at scale the same K runs at "
            f"{both['big'].min():.2g}–{both['big'].max():.2g}×. ")


def _ratio(value: float) -> str:
    """A ratio to full BPTT such as ``0.52×``; ``–`` where there is none."""
    return f"{value:.2g}×" if math.isfinite(value) else "–"


def _cell(row: dict[str, Any], units: str, t: float = THRESHOLDS[0]) -> str:
    """One family's answer for one task × model in three short lines: K (and the metric against full BPTT
    there), cost at the training size, cost at scale; a value that is missing says why."""
    k = row[f"k_{t:g}"]
    first = "K " + " · ".join(_k_cell(row[f"k_{u:g}"], row["largest_k"]) for u in THRESHOLDS)
    if not math.isfinite(k):
        return f"{first}\nbias not shown below {t:.0%} at any K measured"
    gap, trained = row[f"metric_gap_{t:g}"], row[f"train_k_{t:g}"]
    if math.isfinite(gap):
        first += f" · metric {gap:+.2g} vs full" + ("" if trained == k else f" (K={trained:g})")
    else:
        first += " · not trained"
    lines = [first]
    for suffix, where in (("", "train size"), ("_scale", "at scale")):
        measured, busy = row[f"cost_k{suffix}_{t:g}"], "*" if row[f"busy{suffix}_{t:g}"] else ""
        speed, memory = (_ratio(row[f"{what}{suffix}_{t:g}"]) for what in ("speed", "memory"))
        if speed == "–":
            lines.append(f"{where}: not measured")
        else:
            at = "" if measured == k else f" (K={measured:g})"
            lines.append(f"{where}{at}: {speed} tok/s, {memory} mem{busy}")
    return "\n".join(lines)


def first_screen(table: pd.DataFrame, trained: pd.DataFrame, units: str) -> pd.DataFrame:
    """The decision summary as shown: one row per task × model, one column per method series, each cell
    :func:`_cell`; task × model pairs that were trained but not measured for bias get a row saying so."""
    series = list(table.sort_values("order", kind="stable")["series"].drop_duplicates())
    rows = []
    for (task, model), grp in table.groupby(["task", "model"], sort=False):
        metric = grp["metric"].dropna().iloc[0] if "metric" in grp and grp["metric"].notna().any() else ""
        row = {"task · model": f"{task} · {model}" + (f"\n({metric})" if metric else "")}
        cells = {r["series"]: _cell(r, units) for r in grp.to_dict("records")}
        row |= {name: cells.get(name, "no bias measured for this family") for name in series}
        rows.append(row)
    if not trained.empty:
        measured = set(zip(table["task"], table["model"]))
        for task, model in trained[["task", "model"]].drop_duplicates().itertuples(index=False):
            if (task, model) not in measured:
                rows.append({"task · model": f"{task} · {model}"} |
                            {name: "trained, but no bias measured in this suite" for name in series})
    return pd.DataFrame(rows, columns=["task · model", *series])


def busy_words(perf: pd.DataFrame) -> str:
    """How many perf cells a busy machine measured (docs/perf.md, "Busy machine"); "" without perf cells."""
    if perf.empty:
        return ""
    busy = perf["busy"].fillna(False).astype(bool) if "busy" in perf.columns else pd.Series(False, index=perf.index)
    if not busy.any():
        return f"All {len(perf)} perf cells were measured on a quiet machine. "
    return f"{int(busy.sum())} of {len(perf)} perf cells were measured on a busy machine (marked *). "


def decision_section(doc: Document, slot: list[tuple[str, Any]], tables: dict[str, pd.DataFrame],
                     train: pd.DataFrame) -> None:
    """Fill ``slot`` (at the top of the report) with the decision summary: one screen that answers, per task ×
    model and method family, which K is enough and what it costs at the training size and at scale."""
    units = AXIS_UNITS[doc.options.axis]
    with doc.into(slot):
        doc.section("decision", "Which K, and at what cost")
        table = decision_table(tables, train)
        if table.empty:
            doc.text("No bias measurements with intervals over a K grid, so no K can be recommended.")
            return
        perf = _ok(tables, "perf")
        perf = perf[perf["tokens_per_s"].notna()] if "tokens_per_s" in perf.columns else perf.iloc[0:0]
        _, scale = split_sizes(with_method_axes(perf) if len(perf) else perf, train)
        at_scale = (f"at scale ({scale_words(scale)}); " if len(scale) else
                    "at scale (this suite has no realistic-size perf block); ")
        doc.text(f"K: the smallest K with gradient bias below 5% · 1%; at the 5% K, the metric's mean paired "
                 f"difference from full BPTT at equal {units}, and tokens/s and peak memory over full BPTT's at the "
                 f"training size and {at_scale}“not measured”: no such perf cell in this suite. "
                 + overhead_words(table) + busy_words(perf))
        shown = first_screen(table, train, units)
        doc.table("decision", shown, table, caption="Which K is enough, and what it costs (details below the table).")
        doc.text("How to read it: the bias bound is the upper end of every seed's interval (relative_bias_hi, "
                 "docs/design.md §3.3), so “below” is what the data support, not just the estimate; “> K”: no K "
                 "of the grid got there. “(K=n)”: the "
                 "nearest K that was measured or trained, where the chosen one was not. Cost ratios are medians "
                 "over timed repeats at the largest T both were measured at; the 1% columns are in "
                 "tables/decision.csv. ↑: higher is better, ↓: lower.")
        chosen = chosen_k(tables.get("curves", pd.DataFrame()), train)
        if len(chosen):
            chosen = chosen.assign(family=chosen["method"].map(lambda m: describe(m)["family"]))
            doc.table("chosen_k", chosen[["task", "model", "family", "K"]].assign(K=chosen["K"].map(_fmt)), chosen,
                      caption="K at the end of training for methods that choose K as they train (median over seeds "
                      "of the last K used).")
