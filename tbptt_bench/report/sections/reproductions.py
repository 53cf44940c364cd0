"""The Reproductions section: each classic result's published claim beside what the suites measured, with a verdict.

Three experiments (docs/reproductions.md), each drawn only when its rows are in the results:

* **influence balancing** (``tasks/influence.toml``, task ``influence-balancing``): the sign of every truncated
  gradient along the true one against K, beside the closed form; learning with truncation, ARTBP and UORO;
* **copy curriculum** (``tasks/copy-curriculum.toml``, curves with ``curriculum_level``): the string length
  each estimator reaches, and whether the published ordering holds;
* **sparse attentive backtracking at long delays** (``tasks/sab-long.toml``, suites ``sab-long*``): final
  recall accuracy of SAB and LSTM under short truncation against full BPTT.

The published numbers were looked up for this section; where one could not be found it says so. A verdict
is computed from the measured rows by the rule printed beside it, never set by hand.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.methods.base import parse_method
from tbptt_bench.report.common import _fmt, _ok
from tbptt_bench.report.document import Document
from tbptt_bench.tasks.influence import InfluenceBalancingTask

#: A final loss this many times the initial one counts as divergence (the loss grows geometrically there).
DIVERGED_FACTOR = 10.0


@dataclass(frozen=True)
class Claim:
    """A published result: where it is, what it says (paraphrased) and the numbers found for it."""

    source: str
    where: str
    says: str
    numbers: str


INFLUENCE = Claim(
    "Tallec & Ollivier, \"Unbiased Online Recurrent Optimization\", ICLR 2018 (§6, influence balancing); also "
    "\"Unbiasing Truncated Backpropagation Through Time\", 2017 (ARTBP)",
    "the influence-balancing figure of the UORO paper; the abstract of both papers",
    "when a parameter's short-term influence on the loss has one sign and its long-term influence the other, "
    "truncated BPTT diverges unless its truncation is much longer than the range of the interactions, while "
    "the unbiased estimators (UORO, ARTBP) converge",
    "system as in the public reproductions of the experiment: n = 23 units, 10 driven by +θ, 13 by −θ, "
    "A = ½I + ½·shift, loss on unit 1; the truncation lengths, learning rates and curves of the figure could "
    "not be found with the search tool (searched again 2026-12-07)",
)
CURRICULUM = Claim(
    "Mujika, Meier & Steger, NeurIPS 2018 (KF-RTRL); Menick et al., ICLR 2021 (SnAp)",
    "the copy-task curriculum experiments of both papers",
    "on a copy task whose string grows once the model copies it below 0.15 bits per symbol, the length reached "
    "orders the estimators: RTRL ≥ SnAp-2 ≥ SnAp-1 ≥ KF-RTRL ≥ UORO, with truncated BPTT limited by its window",
    "KF-RTRL learned dependencies of up to 36 steps (found in a summary of the KF-RTRL paper); the SnAp paper's "
    "abstract (found) says SnAp-1 costs no more than backpropagation and that on highly sparse networks SnAp-2 "
    "stays tractable and can learn faster than BPTT when updates are online (hence its run on a sparse "
    "core, tasks/copy-curriculum-sparse.toml); the lengths reached by UORO, RTRL and truncated BPTT in the "
    "KF-RTRL paper, and every length of the SnAp paper, could not be found with the search tool (searched again "
    "2026-12-07: the stored copies of both papers return only their openings)",
)
SAB = Claim(
    "Ke et al., \"Sparse Attentive Backtracking\", NeurIPS 2018",
    "the copy-task table (delays T = 100, 200, 300)",
    "with a short truncation SAB approaches full BPTT on copy at long delays, while truncated LSTM fails",
    "the table's accuracies could not be found with the search tool (searched again 2026-12-07)",
)

#: The published order of the curriculum's estimators (best first); families not listed are not ranked.
PUBLISHED_ORDER = ("rtrl", "snap:n=2", "snap:n=1", "kfrtrl", "uoro")


def reproductions_section(doc: Document, tables: dict[str, pd.DataFrame]) -> None:
    """The Reproductions section; nothing when the results hold none of the three experiments."""
    curves = tables.get("curves", pd.DataFrame())
    influence = _where(tables, "task", lambda task: task == "influence-balancing")
    curriculum = _curriculum_runs(curves)
    sab = _where(tables, "suite", lambda suite: suite.astype(str).str.startswith("sab-long"))
    if not influence and curriculum.empty and not sab:
        return
    doc.section("reproductions", "Reproductions")
    doc.text("Each classic result's published claim (paraphrased, with its source) beside what these results "
             "measured, and a verdict computed from the rows by the rule stated with it: reproduced, partly, or "
             "not, with the reason. The suites are scaled down to run on two CPU cores (docs/reproductions.md).")
    if influence:
        _influence(doc, influence, curves)
    if not curriculum.empty:
        _curriculum(doc, curriculum)
    if sab:
        _sab(doc, sab)


def _where(tables: dict[str, pd.DataFrame], column: str,
           keep: Callable[[pd.Series], pd.Series]) -> dict[str, pd.DataFrame]:
    """The rows of the train and bias tables whose ``column`` passes ``keep`` (tables left without rows are
    left out)."""
    out = {}
    for measure in ("train", "bias"):
        frame = tables.get(measure, pd.DataFrame())
        if column in frame.columns and (rows := frame[keep(frame[column])]).shape[0]:
            out[measure] = rows
    return out


def _claim(doc: Document, claim: Claim) -> None:
    doc.text(f"**Published** ({claim.source}; {claim.where}): {claim.says}. Numbers: {claim.numbers}.")


def _task(rows: pd.DataFrame) -> InfluenceBalancingTask:
    params = json.loads(rows["task_params"].dropna().iloc[0]) if "task_params" in rows.columns and \
        rows["task_params"].notna().any() else {}
    return InfluenceBalancingTask(**params)


# -- influence balancing -----------------------------------------------------------------------------


def influence_signs(bias: pd.DataFrame) -> pd.DataFrame:
    """Per truncation (sliding or chunked) of the bias rows: the measured component of ĝ_K along the true
    gradient (``cos · ‖ĝ‖/‖g‖``) and the closed form's sign for the same segment (``segment_influence``)."""
    if bias.empty or not {"group", "family", "k", "seq_len", "cosine_mean", "norm_ratio_mean"} <= set(bias.columns):
        return pd.DataFrame()
    rows = bias[(bias["group"] == "all") & bias["family"].isin(["sliding", "chunked"])]
    out = []
    for (family, k, seq_len), grp in rows.groupby(["family", "k", "seq_len"]):
        task = _task(grp)
        T = int(seq_len)
        truncation = parse_method(f"{family}:k={int(k)}").updates(T)
        predicted = np.sign(task.segment_influence(mask_matrix(truncation, T))) * \
            np.sign(task.segment_influence(np.tril(np.ones((T, T)))))
        out.append({"family": family, "K": int(k), "seq_len": int(seq_len),
                    "cosine": float(grp["cosine_mean"].mean()),
                    "component": float((grp["cosine_mean"] * grp["norm_ratio_mean"]).mean()),
                    "predicted_sign": int(predicted)})
    return pd.DataFrame(out)


def unbiased_rows(bias: pd.DataFrame) -> pd.DataFrame:
    """The bias rows of ARTBP and UORO (group ``all``): cosine and relative bias with interval and p-value."""
    columns = ["spec", "cosine_mean", "relative_bias", "relative_bias_lo", "relative_bias_hi", "bias_p_value"]
    if bias.empty or not {"family", "group", *columns} <= set(bias.columns):
        return pd.DataFrame()
    rows = bias[(bias["group"] == "all") & bias["family"].isin(["artbp", "uoro"])]
    return rows[columns].reset_index(drop=True)


def influence_learning(train: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Per method: initial and final held-out loss (mean, min and max over seeds), diverged seeds, and the
    outcome: ``diverges`` (NaN or above ``DIVERGED_FACTOR`` × the initial loss on every seed), ``grows``
    (above the initial loss on every seed, not all that far), ``converges`` (below it on every seed), or mixed."""
    out = []
    for method, grp in train.groupby("method", sort=False):
        keys = set(grp["key"])
        runs = curves[curves["key"].isin(keys)] if not curves.empty else curves
        first = runs[runs["n_updates"] == 0].groupby("key")["eval_loss"].first()
        last = runs.sort_values("n_updates").groupby("key")["eval_loss"].last()
        initial = float(first.mean()) if len(first) else float("nan")
        diverged = int((grp["status"] == "diverged").sum())
        finals = last.reindex(list(keys))
        grew = int((finals > DIVERGED_FACTOR * initial).sum())
        rose = int((finals > initial).sum())
        fell = int((finals < initial).sum())
        n = len(keys)
        outcome = ("diverges" if diverged + grew == n else "grows" if diverged + rose == n else
                   "converges" if fell == n else f"mixed ({diverged + grew} of {n} diverge, {fell} improve)")
        out.append({"method": method, "seeds": n, "initial_loss": initial, "final_loss_mean": float(finals.mean()),
                    "final_loss_min": float(finals.min()), "final_loss_max": float(finals.max()),
                    "diverged_seeds": diverged + grew, "outcome": outcome})
    return pd.DataFrame(out)


def _influence(doc: Document, rows: dict[str, pd.DataFrame], curves: pd.DataFrame) -> None:
    doc.heading("Influence balancing")
    _claim(doc, INFLUENCE)
    task = _task(next(iter(rows.values())))
    horizon = task.balance_horizon()
    doc.text(f"**Closed form** (docs/reproductions.md): θ's influence on the observed unit at lag d is "
             f"a_d = (A^d v)₁, +1 for the first {task.n_positive} lags; the truncated influence Σ_{{d<K}} a_d turns "
             f"to the sign of the full one ({_fmt(task.full_influence())}) only at the balance horizon K* = "
             f"{horizon} lags per loss. Below it every truncated gradient points away from the true one.")
    signs = influence_signs(_ok(rows, "bias"))
    if not signs.empty:
        signs["measured_sign"] = np.sign(signs["cosine"]).astype(int)
        signs["agrees"] = signs["measured_sign"] == signs["predicted_sign"]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        for family, grp in signs.groupby("family"):
            ax.plot(grp["K"], grp["component"], marker="o", label=f"{family}:k=K")
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(horizon, color="grey", ls="--", lw=0.8, label=f"K* = {horizon}")
        ax.axvline(chunked_horizon(task), color="grey", ls=":", lw=0.8, label=f"chunked horizon {chunked_horizon(task)}")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_xlabel("truncation K")
        ax.set_ylabel("⟨ĝ_K, g⟩ / ‖g‖²")
        ax.legend()
        doc.figure("reproduction_influence_sign", fig, "Influence balancing at θ = 0: the component of each truncated "
                   "gradient along the exact gradient (bias cells, float64), per truncation family. Negative = wrong "
                   "sign: gradient descent moves θ away from the optimum.")
        wrong = signs[signs["measured_sign"] < 0]
        doc.table("reproduction_influence_sign", signs.assign(cosine=signs["cosine"].map(_fmt),
                  component=signs["component"].map(_fmt)),
                  caption=f"{int(signs['agrees'].sum())} of {len(signs)} measured signs equal the closed form's for "
                  f"the same segment; wrong sign up to " + ", ".join(
                      f"{f}:k={k}" for f, k in wrong.groupby("family")["K"].max().items()) + " on this segment.")
    unbiased = unbiased_rows(_ok(rows, "bias"))
    if not unbiased.empty:
        doc.table("reproduction_influence_unbiased", unbiased.assign(**{c: unbiased[c].map(_fmt) for c in
                  ("cosine_mean", "relative_bias", "relative_bias_lo", "relative_bias_hi", "bias_p_value")}),
                  caption="The unbiased estimators at θ = 0 over their draws: the mean cosine of single draws, and "
                  "the noise-corrected relative bias ‖E[ĝ − g]‖/‖g‖ with its interval and the test of zero bias "
                  "(docs/statistics.md).")
    runs = rows.get("train", pd.DataFrame(columns=["status"]))
    train = pd.concat([_ok(rows, "train"), runs[runs["status"] == "diverged"]])
    if train.empty:
        return
    learning = influence_learning(train, curves)
    doc.table("reproduction_influence_learning", learning.assign(
        **{c: learning[c].map(_fmt) for c in ("initial_loss", "final_loss_mean", "final_loss_min", "final_loss_max")}),
        caption=f"Held-out loss of unit 1 before and after training; 'diverges' = NaN or a final loss above "
                f"{DIVERGED_FACTOR:g}× the initial one on every seed, 'converges' = below the initial one on every seed.")
    _learning_figure(doc, train, curves)
    doc.text(f"**Verdict: {influence_verdict(learning, task)}**")


def _learning_figure(doc: Document, train: pd.DataFrame, curves: pd.DataFrame) -> None:
    runs = curves[curves["key"].isin(set(train["key"]))]
    if runs.empty:
        return
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for method, grp in runs.groupby("method", sort=False):
        mean = grp.groupby("tokens")["eval_loss"].mean()
        ax.plot(mean.index, mean.values, label=str(method))
    ax.set_yscale("log")
    ax.set_xlabel("tokens (steps of the stream)")
    ax.set_ylabel("held-out loss (mean over seeds)")
    ax.legend(fontsize="small")
    doc.figure("reproduction_influence_learning", fig, "Influence balancing, learning with plain SGD: held-out "
               "squared error of unit 1 against tokens, mean over seeds (log scale).")


def truncation_k(method: str) -> int | None:
    """K of a ``chunked:k=K`` spec, else None."""
    return int(method.split("k=")[1].split(",")[0]) if method.startswith("chunked:k=") else None


def influence_verdict(learning: pd.DataFrame, task: InfluenceBalancingTask) -> str:
    """Reproduced when every chunked truncation below its horizon diverges and every unbiased estimator
    (ARTBP, UORO) and every truncation above the horizon converges. Partly when every truncation below the
    horizon at least moves away (``grows``) and some of the rest fails. Not reproduced when a truncation
    below the horizon does not move away from the optimum on every seed."""
    horizon = chunked_horizon(task)
    below = learning[learning["method"].map(lambda m: (truncation_k(m) or horizon) < horizon)]
    unbiased = learning[learning["method"].str.startswith(("artbp", "uoro"))]
    above = learning[learning["method"].map(lambda m: (truncation_k(m) or 0) >= horizon)]
    away = below["outcome"].isin(["diverges", "grows"])
    if below.empty or not away.all():
        return (f"not reproduced — truncation below the chunked horizon {horizon} did not move away from the "
                f"optimum on every seed ({', '.join(below.loc[~away, 'method'])})")
    failing = pd.concat([below[below["outcome"] != "diverges"], unbiased[unbiased["outcome"] != "converges"],
                         above[above["outcome"] != "converges"]])
    if failing.empty:
        return (f"reproduced — every truncation below the horizon ({horizon} for chunked:k) diverged, the "
                "unbiased estimators and the longer truncations converged")
    reasons = ", ".join(f"{m}: {o}" for m, o in zip(failing["method"], failing["outcome"]))
    return (f"partly — every truncation below the horizon ({horizon} for chunked:k) moved away from the optimum "
            f"as claimed, but within the budget: {reasons}")


def chunked_horizon(task: InfluenceBalancingTask, max_k: int = 5000) -> int:
    """The smallest chunk length whose summed influence has the full one's sign (110 for the defaults)."""
    sums = np.cumsum(np.cumsum(task.lag_influences(max_k)))
    return int(np.nonzero(np.sign(sums) == np.sign(task.full_influence()))[0][0]) + 1


# -- copy curriculum ---------------------------------------------------------------------------------


def _curriculum_runs(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per curriculum run: method, seed and the level in force at its last evaluation."""
    if curves.empty or "curriculum_level" not in curves.columns:
        return pd.DataFrame()
    runs = curves[curves["curriculum_level"].notna()].sort_values("n_updates")
    if runs.empty:
        return pd.DataFrame()
    last = runs.groupby("key").last().reset_index()
    return last[["key", "method", "seed", "curriculum_level", "tokens"]]


def curriculum_levels(runs: pd.DataFrame) -> pd.DataFrame:
    """Per method: the level reached (mean, min, max over seeds), best first."""
    table = runs.groupby("method")["curriculum_level"].agg(["mean", "min", "max", "count"]).reset_index()
    return table.sort_values("mean", ascending=False).rename(columns={"mean": "level_mean", "min": "level_min",
                                                                      "max": "level_max", "count": "seeds"})


def _family(method: str) -> str:
    if method.startswith("snap"):
        return method.split(",")[0]
    return method.split(":")[0]


def order_agreement(levels: pd.DataFrame) -> tuple[int, int, list[str]]:
    """Pairs of published-ranked methods whose measured mean levels keep the published order (ties count
    as kept), the pairs compared, and the inverted pairs."""
    means = {_family(m): v for m, v in zip(levels["method"], levels["level_mean"])}
    ranked = [f for f in PUBLISHED_ORDER if f in means]
    kept, total, inverted = 0, 0, []
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            total += 1
            if means[a] >= means[b]:
                kept += 1
            else:
                inverted.append(f"{b} > {a}")
    return kept, total, inverted


def _curriculum(doc: Document, runs: pd.DataFrame) -> None:
    doc.heading("Online estimators on a copy curriculum")
    _claim(doc, CURRICULUM)
    levels = curriculum_levels(runs)
    doc.table("reproduction_curriculum", levels.assign(level_mean=levels["level_mean"].map(_fmt)),
              caption="String length (curriculum level) in force at the end of an equal token budget, over seeds.")
    kept, total, inverted = order_agreement(levels)
    if total == 0:
        verdict = "not assessed — fewer than two of the published-ranked estimators were run"
    elif kept == total:
        verdict = f"reproduced (ordering) — all {total} ranked pairs keep the published order; the absolute lengths " \
                  "are not comparable (scaled-down model and budget)"
    elif kept >= total / 2:
        verdict = f"partly — {kept} of {total} ranked pairs keep the published order (inverted: {', '.join(inverted)})"
    else:
        verdict = f"not reproduced — only {kept} of {total} ranked pairs keep the published order " \
                  f"(inverted: {', '.join(inverted)})"
    doc.text(f"**Verdict: {verdict}.** Rule: pairs among {', '.join(PUBLISHED_ORDER)} whose mean levels keep the "
             "published order (ties kept); all = reproduced, at least half = partly.")


# -- sparse attentive backtracking ------------------------------------------------------------------


def _sab(doc: Document, rows: dict[str, pd.DataFrame]) -> None:
    doc.heading("Sparse attentive backtracking at long delays")
    _claim(doc, SAB)
    train = _ok(rows, "train")
    if train.empty:
        doc.text("No finished training runs of the sab-long suite.")
        return
    keys = ["model", "method", "seq_len"]
    table = train.groupby(keys)["eval_metric"].agg(["mean", "min", "max", "count"]).reset_index()
    baseline = float(train["baseline"].mean()) if "baseline" in train.columns else float("nan")
    doc.table("reproduction_sab", table.assign(mean=table["mean"].map(_fmt)),
              caption=f"Final recall accuracy over seeds; memoryless baseline {_fmt(baseline)}.")
    doc.text(f"**Verdict: {sab_verdict(table, baseline)}**")


def sab_verdict(table: pd.DataFrame, baseline: float) -> str:
    """Reproduced when SAB under truncation beats truncated LSTM and comes within 0.1 accuracy of full BPTT
    while truncated LSTM stays within 0.05 of the baseline; inconclusive when no run beats the baseline by 0.05."""
    def mean(model: str, full: bool) -> float:
        sel = table[(table["model"] == model) & (table["method"].str.startswith("full") == full)]
        return float(sel["mean"].mean()) if len(sel) else float("nan")

    sab_t, lstm_t, full = mean("sab", False), mean("lstm", False), max(mean("lstm", True), mean("sab", True))
    if not (table["mean"] > baseline + 0.05).any():
        return ("not reproduced (inconclusive) — no run rose 0.05 above the memoryless baseline within the budget, "
                "so the comparison says nothing about truncation")
    if sab_t > lstm_t and sab_t >= full - 0.1 and lstm_t <= baseline + 0.05:
        return "reproduced — SAB under truncation came within 0.1 of full BPTT while truncated LSTM stayed at baseline"
    if sab_t > lstm_t:
        return f"partly — SAB under truncation ({_fmt(sab_t)}) beat truncated LSTM ({_fmt(lstm_t)}) but not to full BPTT's {_fmt(full)}"
    return f"not reproduced — SAB under truncation ({_fmt(sab_t)}) did not beat truncated LSTM ({_fmt(lstm_t)})"
