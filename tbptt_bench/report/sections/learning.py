"""The learning section: learning curves, final metrics, bias over training, time to target."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from tbptt_bench.report import figures
from tbptt_bench.report import stats
from tbptt_bench.report.common import TRAINING_BIAS_COLUMNS, _ci, _fmt, _metric_labels, _ok, _unit, _with_panel, method_sort_key, order_methods
from tbptt_bench.report.document import Document


def learning_section(doc: Document, tables: dict[str, pd.DataFrame], palette: dict[str, Any]) -> pd.DataFrame:
    """Learning curves, final metrics and time to target; returns per-seed final rows (for statistics)."""
    o = doc.options
    doc.section("learning", "Learning")
    train = _ok(tables["results"], "train")
    if train.empty:
        doc.text("No train measurements in these results.")
        return train
    unit = _unit(train)
    train, _ = _with_panel(train)
    metrics = _metric_labels(train)
    train = train.merge(metrics, on="task", how="left", suffixes=("_row", ""))
    train["panel"] = train["panel"] + " (" + train["metric_name"] + np.where(train["higher"], " ↑", " ↓") + ")"
    panel_of = train[["key", "panel"]].drop_duplicates("key")
    seeds = int(train.groupby(["panel", "method"])[unit].nunique().min())
    doc.text(f"{train['method'].nunique()} method configuration(s) on {train['panel'].nunique()} "
             f"task/model configuration(s); at least {seeds} seed(s) each. Intervals are {o.confidence:.0%} "
             "bootstrap intervals (BCa, scipy.stats.bootstrap) over seeds; ↑ marks a metric where higher is "
             "better, ↓ where lower is better. Dashed lines: the task's trivial memoryless baseline.")
    if seeds < stats.FEW_SEEDS:
        doc.warning(f"Only {seeds} seed(s) per configuration: bootstrap intervals over so few seeds are too narrow "
                    "and are shown for orientation only.")

    curves = tables.get("curves", pd.DataFrame())
    if not curves.empty and "key" in curves.columns:
        curves = curves[curves["key"].isin(train["key"])].merge(panel_of, on="key", how="left")
    if not curves.empty and {"update", "eval_metric"} <= set(curves.columns):
        summary = stats.summarise(curves, "eval_metric", ["panel", "method", "update"], confidence=o.confidence,
                                  n_resamples=o.n_resamples, seed=o.seed)
        refs = train.groupby("panel", as_index=False)["baseline"].first().rename(columns={"baseline": "y"}) \
            if "baseline" in train.columns else None
        if refs is not None:
            refs["label"] = "trivial baseline"
        fig = figures.ci_lines(summary, x="update", y="mean", low="ci_low", high="ci_high", hue="method",
                               panel="panel", colours=palette, refs=refs, xlabel="update",
                               ylabel="held-out metric", title="Learning curves (mean over seeds, band: "
                               f"{o.confidence:.0%} CI)")
        doc.figure("learning_curves", fig, "Held-out task metric against updates, per method; band: bootstrap "
                   "interval over seeds; dashed: trivial baseline.")
        _bias_over_training(doc, curves, palette)
    else:
        doc.text("No learning curves (curves table) in these results.")

    final = stats.summarise(train, "eval_metric", ["panel", "task", "method"], confidence=o.confidence,
                            n_resamples=o.n_resamples, seed=o.seed)
    final["order"] = final["method"].map(lambda m: method_sort_key(m))
    final = final.sort_values(["panel", "order"]).drop(columns="order")
    if "baseline" in train.columns:
        final = final.merge(train.groupby("panel", as_index=False)["baseline"].first(), on="panel", how="left")
    refs = final.groupby("panel", as_index=False)["baseline"].first().rename(columns={"baseline": "y"}) \
        if "baseline" in final.columns else None
    if refs is not None:
        refs["label"] = "trivial baseline"
    fig = figures.ci_points(final, label="method", y="mean", low="ci_low", high="ci_high", panel="panel",
                            colours=palette, refs=refs, ylabel="final held-out metric",
                            title=f"Final metric per method (mean, {o.confidence:.0%} CI over seeds)")
    doc.figure("final_metric", fig, "Final held-out task metric per method: mean over seeds with its bootstrap "
               "interval; dashed: trivial baseline.")
    shown = final[["panel", "method", "n"]].copy()
    shown["final metric [CI]"] = final.apply(_ci, axis=1)
    if "baseline" in final.columns:
        shown["trivial baseline"] = final["baseline"].map(_fmt)
    doc.table("final_metric", shown, final, caption="Final held-out metric per method.")
    _time_to_target(doc, train, curves, palette)
    return train


def training_bias(curves: pd.DataFrame, column: str) -> pd.DataFrame:
    """Bias snapshots of the learning curves in long form: one row per (run, update, measured method).

    The snapshot of the first measured method is in ``column`` (its spec in ``bias_method``, else the
    trained method); further methods are in ``SPEC/column``. ``series`` names the measured method, and
    the trained one where they differ.
    """
    base = ["key", "panel", "method", "update"]
    first = curves[base].assign(measured=curves["bias_method"] if "bias_method" in curves else curves["method"],
                                value=curves[column])
    pieces = [first]
    for col in curves.columns:
        spec, sep, name = col.rpartition("/")
        if sep and name == column and spec:
            pieces.append(curves[base].assign(measured=spec, value=curves[col]))
    long = pd.concat(pieces, ignore_index=True).dropna(subset=["value"])
    long["measured"] = long["measured"].fillna(long["method"]).astype(str)
    long["series"] = np.where(long["measured"] == long["method"], long["measured"],
                              long["measured"] + " (training " + long["method"] + ")")
    return long


def _bias_over_training(doc: Document, curves: pd.DataFrame, palette: dict[str, Any]) -> None:
    o = doc.options
    cols = [c for c in TRAINING_BIAS_COLUMNS if c in curves.columns and curves[c].notna().any()]
    doc.heading("Bias over training")
    if not cols:
        doc.text("These results hold no bias snapshots taken during training (learning-curve columns "
                 f"{', '.join(TRAINING_BIAS_COLUMNS)}; `train --bias-at` records them).")
        return
    col = cols[0]
    long = training_bias(curves, col)
    summary = stats.summarise(long, "value", ["panel", "series", "update"], confidence=o.confidence,
                              n_resamples=o.n_resamples, seed=o.seed)
    label = col.replace("_", " ")
    fig = figures.ci_lines(summary, x="update", y="mean", low="ci_low", high="ci_high", hue="series",
                           panel="panel", colours=figures.palette(order_methods(summary["series"]), palette),
                           logy=col != "cosine", xlabel="update", ylabel=label, title=f"{label} over training")
    doc.figure("bias_over_training", fig, f"{label} of the measured method's gradient against the true gradient at "
               "the evaluation points of training (at the trained parameters); band: bootstrap interval over seeds.")


def time_to_target(curves: pd.DataFrame, *, target: float, higher: bool, unit: str) -> pd.DataFrame:
    """Per run (key): the first evaluation from which on the held-out metric stays beyond ``target``.

    "Stays" guards against a lucky evaluation of a small model; a run whose last evaluation is not
    beyond the target has NaN (censored at ``last_update``).
    """
    rows = []
    for key, run in curves.sort_values("update").groupby("key"):
        beyond = (run["eval_metric"] > target) if higher else (run["eval_metric"] < target)
        after = beyond[::-1].cummin()[::-1].to_numpy()
        first = run[after].iloc[0] if after.any() else None
        rows.append({"key": key, unit: run[unit].iloc[0], "method": run["method"].iloc[0],
                     "updates": float(first["update"]) if first is not None else math.nan,
                     "seconds": float(first["wall_time"]) if first is not None and "wall_time" in run else math.nan,
                     "last_update": float(run["update"].max())})
    return pd.DataFrame(rows)


def _time_to_target(doc: Document, train: pd.DataFrame, curves: pd.DataFrame, palette: dict[str, Any]) -> None:
    doc.heading("Time to target")
    if curves.empty or "update" not in curves.columns:
        doc.text("No learning curves, so no time to target.")
        return
    unit = _unit(train)
    rows, per_run = [], []
    for (panel, task), grp in train.groupby(["panel", "task"]):
        higher = bool(grp["higher"].iloc[0])
        target, source = doc.options.targets.get(str(task)), "given with --target"
        if target is None and "baseline" in grp.columns and grp["baseline"].notna().any():
            target, source = float(grp["baseline"].iloc[0]), "trivial baseline"
        if target is None:
            continue
        runs = time_to_target(curves[curves["key"].isin(grp["key"])], target=target, higher=higher, unit=unit)
        runs["panel"] = panel
        per_run.append(runs)
        for method, m in runs.groupby("method"):
            reached = m["updates"].notna()
            med = float(np.median(m["updates"].fillna(np.inf)))
            rows.append({"panel": panel, "method": method, "target": target, "target source": source,
                         "reached": f"{int(reached.sum())}/{len(m)}",
                         "median updates": med if math.isfinite(med) else math.nan,
                         "median seconds": float(np.median(m["seconds"].fillna(np.inf)))
                         if math.isfinite(med) else math.nan})
    if not rows:
        doc.text("No task in these results defines a target.")
        return
    doc.text("Time to target: the first evaluation from which on the held-out metric stays better than the "
             "target (the task's trivial baseline unless given with --target TASK=VALUE). Medians count runs that "
             "never reach it as infinitely slow, so a median is shown only when at least half the seeds reach it.")
    table = pd.DataFrame(rows)
    table["order"] = table["method"].map(method_sort_key)
    table = table.sort_values(["panel", "order"]).drop(columns="order")
    runs = pd.concat(per_run, ignore_index=True)
    fig = figures.seed_strip(runs, label="method", y="updates", censored="last_update", panel="panel",
                             colours=palette, order=order_methods(runs["method"]), ylabel="updates to target",
                             title="Updates to the target, one point per seed (×: not reached)")
    doc.figure("time_to_target", fig, "Updates each seed needed to get and stay better than the target; × marks a "
               "seed that did not (drawn at its last update).")
    shown = table.copy()
    for col in ("target", "median updates", "median seconds"):
        shown[col] = shown[col].map(_fmt)
    doc.table("time_to_target", shown, table, caption="Time to target per method.")
