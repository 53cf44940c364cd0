"""The learning section: learning curves, final metrics, bias over training, time to target."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from tbptt_bench.report import figures
from tbptt_bench.report import stats
from tbptt_bench.report.budget import at_common_budget, axis_column, grid, interpolate_runs
from tbptt_bench.report.common import (TRAINING_BIAS_COLUMNS, _ci, _fmt, _metric_labels, _ok, _unit, _with_panel,
                                       method_label, method_sort_key, order_methods)
from tbptt_bench.report.document import AXIS_UNITS, AXIS_WORDS, Document


def learning_section(doc: Document, tables: dict[str, pd.DataFrame], palette: dict[str, Any]) -> pd.DataFrame:
    """Learning curves, final metrics and time to target on the report's axis (docs/design.md §3.7); returns
    per-seed rows whose ``eval_metric`` is the value at the panel's common budget (for statistics)."""
    o = doc.options
    doc.section("learning", "Learning")
    train = _ok(tables, "train")
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
    x, words, units = axis_column(o.axis), AXIS_WORDS[o.axis], AXIS_UNITS[o.axis]
    doc.text(f"{train['method'].nunique()} method configuration(s) on {train['panel'].nunique()} "
             f"task/model configuration(s); at least {seeds} seed(s) each. Every comparison in this section and "
             f"in the statistics is at equal {words}: each run's curve is interpolated linearly between its "
             "evaluations (never beyond its last one), and final values are read at the largest budget every run "
             f"of the panel reached. Intervals over seeds are {o.confidence:.0%} Student t intervals from three seeds, "
             "the seeds' range with two (labelled so; no level claimed); ↑ marks a metric where higher is better, "
             "↓ where lower is better.")
    if seeds < stats.FEW_SEEDS:
        doc.warning(f"Only {seeds} seed(s) per configuration: intervals over so few seeds are wide (a t interval "
                    "with few degrees of freedom) or, with two, only the seeds' range.")

    curves = tables.get("curves", pd.DataFrame())
    if not curves.empty and "key" in curves.columns:
        curves = curves[curves["key"].isin(train["key"])].merge(panel_of, on="key", how="left")
    has_curves = not curves.empty and {x, "eval_metric"} <= set(curves.columns) and curves[x].notna().any()
    refs = _baseline_refs(train)
    if has_curves:
        _learning_curves(doc, curves, refs, palette, x, units)
        _bias_over_training(doc, curves, palette)
        final_at = at_common_budget(curves, x, "eval_metric")
        train = train.drop(columns=["eval_metric"]).merge(final_at.rename(columns={"value": "eval_metric"}),
                                                          on="key", how="inner")
    else:
        doc.text(f"No learning curves with a {x} column in these results, so final values are each run's last "
                 "evaluation, at whatever budget it reached.")
        train["budget"] = train[x] if x in train.columns else np.nan
    final = stats.summarise(train, "eval_metric", ["panel", "task", "method"], confidence=o.confidence,
                            n_resamples=o.n_resamples, seed=o.seed)
    final["order"] = final["method"].map(lambda m: method_sort_key(m))
    final = final.sort_values(["panel", "order"]).drop(columns="order")
    final = final.merge(train.groupby("panel", as_index=False)["budget"].first(), on="panel", how="left")
    if "baseline" in train.columns:
        final = final.merge(train.groupby("panel", as_index=False)["baseline"].first(), on="panel", how="left")
    final["label"] = final["method"].map(method_label)
    fig = figures.ci_points(final, label="label", y="mean", low="ci_low", high="ci_high", panel="panel",
                            colours=palette, refs=refs, ylabel="held-out metric",
                            title=f"Held-out metric at equal {units} (mean, {o.confidence:.0%} CI over seeds)")
    doc.figure("final_metric", fig, f"Which method learns most for the same {units}: the held-out metric of each "
               f"method at the largest {units} budget every run of the panel reached (mean over seeds with its "
               "interval over seeds); dashed: memoryless baseline.")
    shown = final[["panel", "method", "n"]].copy()
    shown[f"at {units}"] = final["budget"].map(_fmt)
    shown["metric [CI]"] = final.apply(_ci, axis=1)
    if "baseline" in final.columns:
        shown["memoryless baseline"] = final["baseline"].map(_fmt)
    doc.table("final_metric", shown, final, caption=f"Held-out metric per method at equal {units}.")
    _time_to_target(doc, train, curves if has_curves else pd.DataFrame(), palette, x, units)
    return train


def _baseline_refs(train: pd.DataFrame) -> pd.DataFrame | None:
    if "baseline" not in train.columns:
        return None
    refs = train.groupby("panel", as_index=False)["baseline"].first().rename(columns={"baseline": "y"})
    refs["label"] = "memoryless baseline"
    return refs


def _learning_curves(doc: Document, curves: pd.DataFrame, refs: pd.DataFrame | None, palette: dict[str, Any],
                     x: str, units: str) -> None:
    o = doc.options
    pieces = []
    for panel, grp in curves.groupby("panel", sort=False):
        pieces.append(interpolate_runs(grp, x, "eval_metric", grid(grp, x)))
    long = pd.concat(pieces, ignore_index=True)
    summary = stats.summarise(long, "value", ["panel", "method", "budget"], confidence=o.confidence,
                              n_resamples=min(o.n_resamples, 500), seed=o.seed)
    summary["label"] = summary["method"].map(method_label)
    fig = figures.ci_lines(summary, x="budget", y="mean", low="ci_low", high="ci_high", hue="label",
                           panel="panel", colours=palette, refs=refs, markers=False,
                           xlabel=units, ylabel="held-out metric",
                           title=f"Learning curves against {units} (mean over seeds, band: {o.confidence:.0%} CI)")
    doc.figure("learning_curves", fig, f"How fast each method learns per {units[:-1] if units.endswith('s') else units}: "
               f"held-out metric against {units}, each run interpolated between its evaluations; band: "
               "interval over seeds; dashed: memoryless baseline.")


def training_bias(curves: pd.DataFrame, column: str) -> pd.DataFrame:
    """Bias snapshots of the learning curves in long form: one row per (run, update, measured method).

    The snapshot of the first measured method is in ``column`` (its spec in ``bias_method``, else the
    trained method); further methods are in ``SPEC/column``. ``series`` names the measured method, and
    the trained one where they differ.
    """
    base = ["key", "panel", "method", "n_updates"]
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
    summary = stats.summarise(long, "value", ["panel", "series", "n_updates"], confidence=o.confidence,
                              n_resamples=o.n_resamples, seed=o.seed)
    label = col.replace("_", " ")
    fig = figures.ci_lines(summary, x="n_updates", y="mean", low="ci_low", high="ci_high", hue="series",
                           panel="panel", colours=figures.palette(order_methods(summary["series"]), palette),
                           logy=col != "cosine", zero_below=1e-12 if col != "cosine" else None,
                           xlabel="updates (snapshots are taken at update counts)",
                           ylabel=f"{label} ({'1 = aligned' if col == 'cosine' else 'fraction of ‖g‖'})",
                           title=f"{label} over training")
    doc.figure("bias_over_training", fig, f"Whether the bias grows or shrinks as the parameters train: {label} of the "
               "measured method's gradient against the true gradient at the evaluation points of training (at the "
               "trained parameters), against updates, not tokens (the snapshots are taken at update counts); band: "
               "interval over seeds.")


def time_to_target(curves: pd.DataFrame, *, target: float, higher: bool, unit: str, x: str = "n_updates") -> pd.DataFrame:
    """Per run (key): the value of ``x`` at the first evaluation from which on the held-out metric stays beyond
    ``target`` (column ``at``), and the run's last ``x`` (``last``).

    "Stays" guards against a lucky evaluation of a small model; a run whose last evaluation is not
    beyond the target has NaN (censored at ``last``).
    """
    rows = []
    for key, run in curves.sort_values(x).groupby("key"):
        beyond = (run["eval_metric"] > target) if higher else (run["eval_metric"] < target)
        after = beyond[::-1].cummin()[::-1].to_numpy()
        first = run[after].iloc[0] if after.any() else None
        rows.append({"key": key, unit: run[unit].iloc[0], "method": run["method"].iloc[0],
                     "at": float(first[x]) if first is not None else math.nan, "last": float(run[x].max())})
    return pd.DataFrame(rows, columns=["key", unit, "method", "at", "last"])


def _time_to_target(doc: Document, train: pd.DataFrame, curves: pd.DataFrame, palette: dict[str, Any], x: str,
                    units: str) -> None:
    doc.heading("Time to target")
    if curves.empty or x not in curves.columns:
        doc.text("No learning curves, so no time to target.")
        return
    unit = _unit(train)
    rows, per_run = [], []
    for (panel, task), grp in train.groupby(["panel", "task"]):
        higher = bool(grp["higher"].iloc[0])
        target, source = doc.options.targets.get(str(task)), "given with --target"
        if target is None and "baseline" in grp.columns and grp["baseline"].notna().any():
            target, source = float(grp["baseline"].iloc[0]), "memoryless baseline"
        if target is None:
            continue
        runs = time_to_target(curves[curves["key"].isin(grp["key"])], target=target, higher=higher, unit=unit, x=x)
        runs["panel"] = panel
        per_run.append(runs)
        for method, m in runs.groupby("method"):
            reached = m["at"].notna()
            med = float(np.median(m["at"].fillna(np.inf)))
            rows.append({"panel": panel, "method": method, "target": target, "target source": source,
                         "reached": f"{int(reached.sum())}/{len(m)}",
                         f"median {units}": med if math.isfinite(med) else math.nan})
    if not rows:
        doc.text("No task in these results defines a target.")
        return
    doc.text(f"Time to target, in {units}: the first evaluation from which on the held-out metric stays better "
             "than the target (the task's memoryless baseline unless given with --target TASK=VALUE). Medians count "
             "runs that never reach it as infinitely slow, so a median is shown only when at least half the seeds "
             "reach it.")
    table = pd.DataFrame(rows)
    table["order"] = table["method"].map(method_sort_key)
    table = table.sort_values(["panel", "order"]).drop(columns="order")
    runs = pd.concat(per_run, ignore_index=True)
    reached = runs.groupby("panel")["at"].apply(lambda v: bool(v.notna().any()))
    if not reached.all():
        doc.text(f"No seed of any method reached the target in {', '.join(map(str, reached.index[~reached]))}; "
                 "those panels are left out of the figure (the table lists them).")
    runs = runs[runs["panel"].isin(reached.index[reached])]
    if runs.empty:
        shown = table.map(_fmt)
        doc.table("time_to_target", shown, table, caption=f"Time to target per method, in {units}.")
        return
    runs["label"] = runs["method"].map(method_label)
    order = [method_label(m) for m in order_methods(runs["method"])]
    fig = figures.seed_strip(runs, label="label", y="at", censored="last", panel="panel",
                             colours=palette, order=order, ylabel=f"{units} to target",
                             title=f"{units.capitalize()} to the target, one point per seed (×: not reached)")
    doc.figure("time_to_target", fig, f"Which method gets past the target with the fewest {units}: one point per "
               "seed; × marks a seed that never stayed past it (drawn at its last evaluation).")
    shown = table.copy()
    for col in ("target", f"median {units}"):
        shown[col] = shown[col].map(_fmt)
    doc.table("time_to_target", shown, table, caption=f"Time to target per method, in {units}.")
