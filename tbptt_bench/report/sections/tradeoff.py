"""The trade-off section: quality or bias against cost, one point per method, every task × model with data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tbptt_bench.core.mask import step_counts
from tbptt_bench.methods.base import parse_method
from tbptt_bench.report import figures
from tbptt_bench.report import stats
from tbptt_bench.report.common import _with_panel, method_label
from tbptt_bench.report.sections.cost import BUSY_LEGEND, BUSY_MARK
from tbptt_bench.report.sections.decision import split_sizes
from tbptt_bench.report.document import AXIS_UNITS, Document
from tbptt_bench.report.sections.bias import EXACT_ZERO


def steps_per_token(spec: str, seq_len: int, draws: int = 16) -> float:
    """Recurrent steps forwarded + backpropagated per loss position of one sequence of ``seq_len`` under the
    method's schedule (the compute proxy of docs/design.md §3.7), averaged over ``draws`` schedules for a
    randomised method."""
    method = parse_method(spec)
    totals = []
    for draw in range(draws):
        updates = method.updates(seq_len, rng=np.random.default_rng(draw))
        forward, backward = step_counts(updates)
        scored = sum(u.loss_end - u.loss_start for u in updates)
        totals.append((forward + backward) / max(scored, 1))
    return float(np.mean(totals))


def tradeoff_section(doc: Document, train: pd.DataFrame, bias_summary: pd.DataFrame, perf: pd.DataFrame,
                     palette: dict[str, Any]) -> None:
    doc.section("tradeoff", "Trade-off")
    drawn = _metric_against_time(doc, train, palette)
    drawn |= _bias_against_compute(doc, bias_summary, palette)
    drawn |= _bias_against_perf(doc, bias_summary, perf, palette)
    if drawn:
        doc.text("The figures a reader uses to pick K: a point that is both cheaper (left) and better (lower bias; "
                 "a higher ↑ or lower ↓ metric) than another dominates it; compare each truncated method with full "
                 "BPTT in the same panel.")
    else:
        doc.text("Neither train nor bias-and-perf measurements are present, so there is no trade-off to draw.")


def _metric_against_time(doc: Document, train: pd.DataFrame, palette: dict[str, Any]) -> bool:
    o = doc.options
    if train.empty or not {"wall_time", "tokens"} <= set(train.columns):
        return False
    runs = train[train["tokens"] > 0].copy()
    runs["ms_per_ktoken"] = 1e6 * runs["wall_time"] / runs["tokens"]
    cost = stats.summarise(runs, "ms_per_ktoken", ["panel", "method"], confidence=o.confidence,
                           n_resamples=o.n_resamples, seed=o.seed)
    quality = stats.summarise(runs, "eval_metric", ["panel", "method"], confidence=o.confidence,
                              n_resamples=o.n_resamples, seed=o.seed)
    both = cost.merge(quality, on=["panel", "method"], suffixes=("_cost", "_q"))
    both["short"] = both["method"].map(method_label)
    units = AXIS_UNITS[o.axis]
    fig = figures.tradeoff(both, x="mean_cost", y="mean_q", label="short", hue="method",
                           xerr=("ci_low_cost", "ci_high_cost"), yerr=("ci_low_q", "ci_high_q"),
                           panel="panel", colours=palette, xlabel="training ms per 1000 tokens",
                           ylabel=f"held-out metric at equal {units}",
                           title="Held-out metric against training time per token (one point per method)")
    doc.figure("tradeoff_metric_cost", fig, f"Which method learns best for its time: held-out metric at equal "
               f"{units} against training wall time per 1000 tokens in the same runs (evaluation excluded); error "
               "bars: intervals over seeds (t from three seeds, the range of two).")
    concurrency = train["concurrency"].max() if "concurrency" in train.columns else 1
    if concurrency and concurrency > 1:
        doc.warning(f"Train cells ran up to {int(concurrency)} at a time, so their time per token is "
                    "inflated by contention; use the cost section's perf cells for timing claims.")
    return True


def _bias_against_compute(doc: Document, bias_summary: pd.DataFrame, palette: dict[str, Any]) -> bool:
    """Bias against the schedule's compute per token, for every task × model with bias rows."""
    if bias_summary.empty or "seq_len" not in bias_summary.columns:
        return False
    both = bias_summary[bias_summary["mean"].notna()].copy()
    cache: dict[tuple[str, int], float] = {}
    for spec, t in set(zip(both["method"], both["seq_len"].astype(int))):
        cache[(spec, t)] = steps_per_token(spec, t)
    both["steps_per_token"] = [cache[(m, int(t))] for m, t in zip(both["method"], both["seq_len"])]
    both = both[both["mean"] > EXACT_ZERO]
    if both.empty:
        return False
    both["short"] = both["method"].map(method_label)
    fig = figures.tradeoff(both, x="steps_per_token", y="mean", label="short", hue="method",
                           yerr=("ci_low", "ci_high"), panel="panel", colours=palette, logy=True,
                           xlabel="recurrent steps per token (forward + backward)",
                           ylabel="relative bias (fraction of ‖E g‖)",
                           title="Relative gradient bias against compute per token (one point per method)")
    doc.figure("tradeoff_bias_compute", fig, "Which K buys the most bias reduction per unit of compute: relative "
               "bias against the recurrent steps each token costs under the method's schedule (forward + backward, "
               "docs/design.md §3.7), for every task × model measured; methods whose estimate is zero (≤ "
               f"{EXACT_ZERO:g}: full BPTT, and estimates not told from zero; see bias_vs_k) are left out.")
    return True


def _bias_against_perf(doc: Document, bias_summary: pd.DataFrame, perf: pd.DataFrame, palette: dict[str, Any]) -> bool:
    if bias_summary.empty or perf.empty:
        return False
    small, _ = split_sizes(perf, pd.DataFrame())
    perf = small.assign(busy=small["busy"].fillna(False).astype(bool) if "busy" in small.columns else False)
    on = ["task", "model", "method"] + (["seq_len"] if "seq_len" in bias_summary.columns else [])
    cost = perf.groupby(on, as_index=False).agg(ms_per_update=("ms_per_update", "median"), busy=("busy", "any"))
    both = bias_summary.merge(cost, on=on, how="inner")
    both = both[both["mean"] > EXACT_ZERO]
    if both.empty:
        return False
    both["short"] = both["method"].map(method_label)
    both, _ = _with_panel(both.drop(columns=["panel"], errors="ignore"))
    fig = figures.tradeoff(both, x="ms_per_update", y="mean", label="short", hue="method",
                           yerr=("ci_low", "ci_high"), panel="panel", colours=palette, logx=True, logy=True,
                           flag="busy", flag_label=BUSY_LEGEND, xlabel="ms per update (perf cells)", ylabel="relative bias (fraction of ‖E g‖)",
                           title="Relative gradient bias against measured time per update")
    doc.figure("tradeoff_bias_cost", fig, "The same trade-off in measured time: relative bias against the median "
               "time per update of the perf cells of the same task, model, method and T (only where perf cells "
               "exist; the realistic-size block is left out). " + (BUSY_MARK if perf["busy"].any() else ""))
    return True
