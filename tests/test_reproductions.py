"""The Reproductions report section's rules (tbptt_bench.report.sections.reproductions), on hand-made tables,
and its horizons against the engine's gradients."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tbptt_bench.analysis.gradients import flatten, method_gradient
from tbptt_bench.api import method_mask
from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.report.sections.reproductions import (
    chunked_horizon, curriculum_levels, influence_learning, influence_signs, influence_verdict, order_agreement,
    sab_verdict,
)
from tbptt_bench.tasks.influence import InfluenceBalancingTask


def test_chunked_horizon_is_where_the_engine_gradient_changes_sign() -> None:
    task = make_task("influence-balancing")
    horizon = chunked_horizon(task)
    assert horizon == 110
    model = make_model("influence-linear", task, 23, dtype="float64")
    zero = torch.zeros(1, 1, 23, dtype=torch.float64)
    signs = []
    for k in (horizon - 1, horizon):  # one chunk from the zero state at θ = 0: ĝ = −2 Σ_j c_j
        batch = task.sample(1, k, torch.Generator()).to("cpu", torch.float64)
        signs.append(float(flatten(method_gradient(model, batch, f"chunked:k={k}", "mse", zero))))
    assert signs[0] < 0 < signs[1]  # the full gradient at θ = 0 is positive (θ* = −1/6)


def test_influence_signs_reads_components_and_predicts_from_the_closed_form() -> None:
    params = json.dumps({"valid_length": 2000})
    rows = pd.DataFrame([
        {"family": f, "k": k, "seq_len": 400, "group": "all", "cosine_mean": c, "norm_ratio_mean": r, "task_params": params}
        for f, k, c, r in [("sliding", 10, -1.0, 3.0), ("sliding", 100, 1.0, 0.5), ("chunked", 40, -1.0, 2.0),
                           ("full", None, 1.0, 1.0)]])
    signs = influence_signs(rows).set_index(["family", "K"])
    assert signs.loc[("sliding", 10), "component"] == -3.0
    task = InfluenceBalancingTask(valid_length=2000)
    for (family, k), row in signs.iterrows():
        expect = np.sign(task.segment_influence(method_mask(f"{family}:k={k}", 400))) * np.sign(task.segment_influence(np.tril(np.ones((400, 400)))))
        assert row["predicted_sign"] == expect
    assert signs["predicted_sign"].to_dict() == {("chunked", 40): -1, ("sliding", 10): -1, ("sliding", 100): 1}


def curves(rows: list[tuple[str, int, float, float]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, curves) from (method, seed, initial loss, final loss); a NaN final marks a diverged run."""
    train = pd.DataFrame([{"key": f"{m}/{s}", "method": m, "status": "diverged" if np.isnan(f) else "ok"}
                          for m, s, _, f in rows])
    curve = pd.DataFrame([{"key": f"{m}/{s}", "method": m, "n_updates": u, "eval_loss": v}
                          for m, s, i, f in rows for u, v in ((0, i), (10, f)) if not np.isnan(v)])
    return train, curve


def test_learning_outcomes_and_verdicts() -> None:
    task = InfluenceBalancingTask()
    rows = [("chunked:k=10", s, 1.0, 1e6) for s in range(3)] + [("chunked:k=200", s, 1.0, 0.1) for s in range(3)]
    unbiased = [("uoro", 0, 1.0, 0.2), ("uoro", 1, 1.0, np.nan), ("uoro", 2, 1.0, 0.3)]
    table = influence_learning(*curves(rows + unbiased)).set_index("method")
    assert table.loc["chunked:k=10", "outcome"] == "diverges"
    assert table.loc["chunked:k=200", "outcome"] == "converges"
    assert table.loc["uoro", "outcome"].startswith("mixed (1 of 3 diverge, 2 improve)")
    assert influence_verdict(table.reset_index(), task).startswith("partly")
    good = influence_learning(*curves(rows + [("uoro", s, 1.0, 0.5) for s in range(3)]))
    assert influence_verdict(good, task).startswith("reproduced")
    bad = influence_learning(*curves([("chunked:k=40", 0, 1.0, 0.5), ("chunked:k=200", 0, 1.0, 0.1)]))
    assert influence_verdict(bad, task).startswith("not reproduced")
    slow = influence_learning(*curves(rows + [("chunked:k=100", 0, 1.0, 2.0), ("uoro", 0, 1.0, 0.5)]))
    assert slow.set_index("method").loc["chunked:k=100", "outcome"] == "grows"
    assert influence_verdict(slow, task) == ("partly — every truncation below the horizon (110 for chunked:k) moved "
                                             "away from the optimum as claimed, but within the budget: "
                                             "chunked:k=100: grows")


def test_curriculum_ordering() -> None:
    runs = pd.DataFrame([{"method": m, "seed": s, "curriculum_level": lv}
                         for m, lvs in [("rtrl:every=1", [5, 6]), ("snap:n=1,every=1", [4, 4]),
                                        ("kfrtrl:every=1", [4, 5]), ("uoro:every=1", [2, 3]), ("full", [9, 9])]
                         for s, lv in enumerate(lvs)])
    levels = curriculum_levels(runs)
    assert list(levels["method"])[0] == "full" and levels.set_index("method").loc["rtrl:every=1", "level_mean"] == 5.5
    kept, total, inverted = order_agreement(levels)
    assert (kept, total, inverted) == (5, 6, ["kfrtrl > snap:n=1"])


@pytest.mark.parametrize("means,verdict", [
    ({"sab/c": 0.9, "lstm/c": 0.25, "lstm/f": 0.95, "sab/f": 0.9}, "reproduced"),
    ({"sab/c": 0.5, "lstm/c": 0.25, "lstm/f": 0.95, "sab/f": 0.9}, "partly"),
    ({"sab/c": 0.25, "lstm/c": 0.3, "lstm/f": 0.95, "sab/f": 0.9}, "not reproduced —"),
    ({"sab/c": 0.26, "lstm/c": 0.25, "lstm/f": 0.27, "sab/f": 0.25}, "not reproduced (inconclusive)"),
])
def test_sab_verdicts(means: dict[str, float], verdict: str) -> None:
    table = pd.DataFrame([{"model": k.split("/")[0], "method": "full" if k.endswith("/f") else "chunked:k=10",
                           "mean": v} for k, v in means.items()])
    assert sab_verdict(table, 0.25).startswith(verdict)
