"""The effective-context section: the chunked K curve at checkpoints of training, and the K it takes to reach a level.

Drawn only when the results hold ``context`` rows (suites' ``[[context]]`` cells; docs/suites.md). The
effective context at a level L is the smallest K of the dyadic grid whose relative bias of chunked(K)
against the true gradient is at most L: under the interval rule (the upper end of its interval, which is
conservative), by the point estimate, or by the mean per-batch relative error (docs/bias.md, "Long horizons").
With ``context_lags`` rows (cells with ``max_lag``) it also draws the lag profile at each checkpoint.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns

from tbptt_bench.report import figures
from tbptt_bench.report.common import _fmt, _ok, _with_panel, method_label, seed_interval
from tbptt_bench.report.document import Document
from tbptt_bench.report.sections.bias import EXACT_ZERO, _zero_intervals

#: The readings of the effective context, as the figure and the table name them.
RULES = {"k_effective": "interval rule (conservative)", "k_effective_point": "point estimate",
         "k_effective_error": "per-batch relative error"}
#: The readings drawn in the figure (the table has every one).
DRAWN = ("k_effective", "k_effective_point")
#: Lag-profile values below this fraction of the largest are left out of the figure (they would set its scale).
LAG_FLOOR = 1e-30
#: Batches below which the relative bias has no interval (analysis/expectation.py).
MIN_BATCHES_FOR_INTERVALS = 4
#: Column names of the effective-context table as shown (the store's ``n_updates``: the checkpoint's update).
SHOWN = {"n_updates": "update"}


def _upper_median(values: pd.Series) -> float:
    """The upper median over seeds, a K "not reached" (NaN) counting as infinite: on a dyadic grid it is a
    grid value, and it errs towards the longer context (NaN when more than half did not reach the level)."""
    v = values.astype(float).fillna(np.inf)
    out = float(v.quantile(0.5, interpolation="higher")) if len(v) else np.nan
    return out if np.isfinite(out) else np.nan


def _tokens(value: float) -> str:
    return str(int(value)) if np.isfinite(value) else "–"


def _panelled(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with a ``panel`` label: the configuration that varies, and always the training method."""
    frame, _ = _with_panel(frame)
    if "method" in frame.columns:
        frame["panel"] = frame["panel"] + " · trained with " + frame["method"].astype(str).map(method_label)
    return frame


def context_section(doc: Document, tables: dict[str, pd.DataFrame]) -> None:
    """Effective context K(L) against training progress, relative bias against K per checkpoint, and a table."""
    curve = _ok(tables, "context")
    if curve.empty or "k" not in curve.columns:
        return
    levels = tables.get("effective_context", pd.DataFrame())
    levels = levels[levels["key"].isin(curve["key"])] if "key" in levels.columns else levels.iloc[0:0]
    o = doc.options
    doc.section("context", "Effective context over training")
    curve = _panelled(curve)
    few = int(curve["n_batches"].min()) < MIN_BATCHES_FOR_INTERVALS if "n_batches" in curve.columns else False
    kmax = int(curve["k"].max())
    seeds = int(curve.groupby("panel")["seed"].nunique().max()) if "seed" in curve.columns else 1
    doc.text("The model is trained with the method named in each panel; at update 0 and at every evaluation the "
             "chunked(K) gradient for K = 1, 2, 4, …, "
             f"{kmax} is compared with the true gradient on held-out stream segments of "
             f"{_fmt(curve['curve_seq_len'].iloc[0]) if 'curve_seq_len' in curve.columns else 'T'} steps. The "
             "effective context at a level L is the smallest K whose relative bias ‖E(ĝ_K − g)‖/‖E g‖ is ≤ L. "
             "Interval rule: the upper end of the bias's "
             f"{o.confidence:.0%} interval must be ≤ L — conservative, a K counts only when the data rule out a "
             "larger bias; point estimate: the noise-corrected estimate itself; per-batch relative error: the mean "
             "of ‖ĝ_K − g‖/‖g‖ over segments, a per-batch plug-in that includes the noise of ĝ_K − g."
             + (f" {seeds} seeds: thin lines per seed, bold the median." if seeds > 1 else ""))
    if few:
        doc.warning(f"Fewer than {MIN_BATCHES_FOR_INTERVALS} held-out segments per checkpoint: the relative bias has "
                    "no interval, so the interval rule gives no effective context; the point estimate and the "
                    "per-batch error are shown.")
    if not levels.empty:
        _context_figure(doc, _panelled(levels), kmax, few)
    marks = sorted(levels["level"].dropna().unique()) if "level" in levels.columns and len(levels) else [0.01, 0.05]
    _bias_figure(doc, curve, [float(v) for v in marks])
    lags = tables.get("context_lags", pd.DataFrame())
    lags = lags[lags["key"].isin(curve["key"])] if "key" in lags.columns else lags.iloc[0:0]
    if not lags.empty:
        _lag_figure(doc, _panelled(lags))
    if not levels.empty:
        _context_table(doc, _panelled(levels), kmax, few)


def _context_figure(doc: Document, levels: pd.DataFrame, kmax: int, few: bool) -> None:
    """K(L) against tokens trained on, one colour per level, one line style per rule."""
    rules = [r for r in DRAWN if r in levels.columns and not (few and r == "k_effective")]
    long = levels.melt(id_vars=["panel", "seed", "tokens", "n_updates", "level"], value_vars=rules,
                       var_name="rule", value_name="K")
    long["K"] = pd.to_numeric(long["K"], errors="coerce").astype(float)
    long["rule"] = long["rule"].map(RULES)
    label = {v: f"K({v:.0%}): bias ≤ {v:.0%}" for v in sorted(long["level"].unique())}
    long["level_label"] = long["level"].map(label)
    long["ceiling"] = float(kmax)
    colours = figures.palette(list(label.values()))
    fig = figures.seed_lines(long, x="tokens", y="K", hue="level_label", style="rule", unit="seed",
                             ceiling="ceiling", panel="panel", colours=colours, log_base=2, median=_upper_median,
                             xlabel="training tokens (loss positions × batch)",
                             ylabel="effective context K (steps, log₂)",
                             title="Effective context over training")
    doc.figure("effective_context", fig, "How much context the gradient needs as training goes on: the smallest "
               "chunk length K whose relative bias is ≤ 1% (or 5%), against the tokens trained on (x; update 0 at "
               "x = 0), on a log₂ axis. Solid: interval rule (the upper end of the bias's interval ≤ L, "
               "conservative"
               + (", not available with fewer than 4 segments" if few else "")
               + "); dashed: the point estimate (the table adds the per-batch relative error). With several seeds: "
               "thin lines per seed, bold the upper median. Open triangles at the grid's largest K: no K of the "
               "grid reached the level.")


def _bias_figure(doc: Document, curve: pd.DataFrame, level_values: list[float]) -> None:
    """Relative bias against K, one line per checkpoint coloured by training progress; the levels dashed."""
    o = doc.options
    curve = curve.assign(K=pd.to_numeric(curve["k"], errors="coerce").astype(float))
    by = ["panel", "n_updates", "K"]
    rel = seed_interval(curve, "relative_bias", by, low="relative_bias_lo", high="relative_bias_hi", options=o)
    rel = _zero_intervals(rel, curve, by)
    tokens = curve.groupby("n_updates")["tokens"].median()
    order = sorted(rel["n_updates"].unique())
    labels = {u: f"update {int(u)} ({_tokens(float(tokens.get(u, np.nan)))} tokens)" for u in order}
    rel["checkpoint"] = rel["n_updates"].map(labels)
    colours = dict(zip((labels[u] for u in order), sns.color_palette("viridis", n_colors=max(len(order), 1))))
    words = " and ".join(f"{v:.0%}" for v in level_values)
    refs = pd.DataFrame([{"panel": p, "y": v, "label": f"levels {words}"}
                         for p in rel["panel"].unique() for v in level_values])
    fig = figures.ci_lines(rel, x="K", y="mean", low="ci_low", high="ci_high", hue="checkpoint", panel="panel",
                           colours=colours, refs=refs, logx=True, logy=True, zero_below=EXACT_ZERO, sharey=True,
                           xlabel="chunk length K (steps)", ylabel="relative bias (fraction of ‖E g‖)",
                           title="Relative bias of chunked(K) at checkpoints of training")
    doc.figure("context_bias_vs_k", fig, "Where the effective context is read: relative bias ‖E(ĝ_K − g)‖/‖E g‖ "
               "(noise-corrected estimate) of chunked(K) against K, one line per checkpoint, from dark (update 0) "
               f"to light (last); band: its {o.confidence:.0%} interval where there are ≥ 4 segments; dashed: the "
               f"levels ({', '.join(f'{v:.0%}' for v in level_values)}). Open markers on the axis floor: a zero "
               f"estimate (exactly zero, ≤ {EXACT_ZERO:g}, when its interval is zero too; else with a bar up to its interval's upper end).")


def _lag_figure(doc: Document, lags: pd.DataFrame) -> None:
    """The lag profile φ̄_d against d, one line per checkpoint coloured by training progress."""
    o = doc.options
    phi = pd.to_numeric(lags["phi_mean"], errors="coerce")
    shown = lags[phi >= phi.max() * LAG_FLOOR]
    by = ["panel", "n_updates", "lag"]
    prof = seed_interval(shown, "phi_mean", by, se="phi_se", options=o)
    prof["ci_low"] = prof["ci_low"].clip(lower=prof["mean"] * 1e-3)
    tokens = lags.groupby("n_updates")["tokens"].median()
    order = sorted(prof["n_updates"].unique())
    labels = {u: f"update {int(u)} ({_tokens(float(tokens.get(u, np.nan)))} tokens)" for u in order}
    prof["checkpoint"] = prof["n_updates"].map(labels)
    colours = dict(zip((labels[u] for u in order), sns.color_palette("viridis", n_colors=max(len(order), 1))))
    positions = int(lags["n_positions"].max()) if "n_positions" in lags.columns else 0
    fig = figures.ci_lines(prof, x="lag", y="mean", low="ci_low", high="ci_high", hue="checkpoint", panel="panel",
                           colours=colours, logx=True, logy=True, markers=False, sharey=True,
                           xlabel="lag d (steps from the state to the loss)",
                           ylabel="mean ‖∂ℓ_t / ∂state‖ (float64)",
                           title="Lag profile at checkpoints of training")
    doc.figure("context_lag_profile", fig, "How far back a loss still pulls on the state: the lag profile φ̄_d, the "
               "mean over sampled losses of ‖∂ℓ_t/∂h_{t−d}‖ (each value exact, on a float64 copy of the model; "
               f"{positions} losses per checkpoint, pooled over the held-out segments), against the lag d, one line "
               "per checkpoint from dark (update 0) to light (last). Band: the "
               f"{o.confidence:.0%} interval from the spread across positions (one seed; its lower end is drawn "
               f"no lower than a thousandth of the mean) or across seeds. Values below {LAG_FLOOR:g} of the largest "
               "are not drawn (the store has them, and exact zeros where φ̄ falls below float64's range).")


def _context_table(doc: Document, levels: pd.DataFrame, kmax: int, few: bool) -> None:
    """Per checkpoint: tokens, held-out metric, and K(L) under each rule (upper median over seeds)."""
    values = [c for c in ("tokens", "eval_metric") if c in levels.columns]
    rules = [r for r in RULES if r in levels.columns]
    frame = levels.assign(**{r: pd.to_numeric(levels[r], errors="coerce").astype(float) for r in rules})
    wide = frame.pivot_table(index=["panel", "n_updates"], columns="level", values=rules, aggfunc=_upper_median,
                             dropna=False)
    base = frame.groupby(["panel", "n_updates"])[values].median()
    full = base.copy()
    shown = base.copy()
    if "tokens" in shown.columns:
        shown["tokens"] = shown["tokens"].map(_tokens)
    if "eval_metric" in shown.columns:
        shown["eval_metric"] = shown["eval_metric"].map(lambda v: _fmt(float(v), 4))
        shown = shown.rename(columns={"eval_metric": "held-out metric"})
    for level in sorted(frame["level"].unique()):
        for rule in rules:
            name = f"K({level:.0%}) {RULES[rule]}"
            column = wide[(rule, level)] if (rule, level) in wide.columns else pd.Series(np.nan, index=wide.index)
            full[name] = column
            unavailable = few and rule == "k_effective"
            shown[name] = column.map(lambda v: "n/a" if unavailable else f"> {kmax}" if np.isnan(v) else _fmt(int(v)))
    shown = shown.reset_index().rename(columns=SHOWN)
    doc.table("effective_context", shown, full.reset_index().rename(columns=SHOWN), caption=(
        "Effective context per checkpoint (upper median over seeds; held-out metric: the task's, e.g. bits per "
        "character, median over seeds): the smallest K with relative bias ≤ L under the "
        "interval rule (upper end of the interval ≤ L; conservative), the point estimate and the mean per-batch "
        f"relative error; > {kmax}: no K of the grid reached it"
        + ("; n/a: fewer than 4 segments, no interval" if few else "") + "."))
