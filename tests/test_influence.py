"""Influence balancing (tbptt_bench.tasks.influence, models.influence): the closed forms, and the truncated
gradients the engine computes on it, checked against a numpy simulation of the linear system in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient
from tbptt_bench.api import method_mask
from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.errors import UsageError
from tbptt_bench.tasks.influence import InfluenceBalancingTask


def simulate(task: InfluenceBalancingTask, theta: float, s0: np.ndarray, T: int) -> np.ndarray:
    """States s_1..s_T of s_t = A s_{t−1} + θ v, by plain iteration."""
    A, v, s, out = task.transition(), task.signs(), s0.copy(), []
    for _ in range(T):
        s = A @ s + theta * v
        out.append(s)
    return np.array(out)


def kept_lags(spec: str, t: int) -> int:
    """How many lags loss t (1-based) keeps under ``spec`` (written from docs/design.md §2.5, not the code)."""
    family, k = spec.split(":k=")
    return min(int(k), t) if family == "sliding" else (t - 1) % int(k) + 1


def reference_gradient(task: InfluenceBalancingTask, theta: float, s0: np.ndarray, T: int, spec: str | None) -> float:
    """dL/dθ of L = Σ_t (s¹_t − target)², each loss keeping its lags; lag d's influence (A^d v)₁ by matrix powers."""
    states = simulate(task, theta, s0, T)
    A, v = task.transition(), task.signs()
    lag = [np.linalg.matrix_power(A, d) @ v for d in range(T)]
    total = 0.0
    for t in range(1, T + 1):
        keep = t if spec is None else kept_lags(spec, t)
        total += 2 * (states[t - 1, 0] - task.target) * sum(lag[d][0] for d in range(keep))
    return total


@pytest.mark.parametrize("diagonal,superdiagonal,n,p", [(0.5, 0.5, 23, 10), (0.3, 0.6, 9, 4)])
def test_closed_forms(diagonal: float, superdiagonal: float, n: int, p: int) -> None:
    task = InfluenceBalancingTask(n=n, n_positive=p, diagonal=diagonal, superdiagonal=superdiagonal)
    A, v = task.transition(), task.signs()
    a = task.lag_influences(60)
    np.testing.assert_allclose(a, [(np.linalg.matrix_power(A, d) @ v)[0] for d in range(60)], atol=1e-12)
    # ((I − A)⁻¹)_{1j} = b^{j−1} / (1 − a)^j: the full influence as a finite sum
    closed = sum(v[j] * superdiagonal ** j / (1 - diagonal) ** (j + 1) for j in range(n))
    assert task.full_influence() == pytest.approx(closed, rel=1e-12)
    assert task.optimum() == pytest.approx(task.target / closed, rel=1e-12)
    states = simulate(task, task.optimum(), np.ones(n), 4000)
    assert states[-1, 0] == pytest.approx(task.target, abs=1e-9)  # the fixed point of θ* puts s¹ on the target


def test_default_horizon_is_41_and_the_full_influence_minus_6() -> None:
    task = InfluenceBalancingTask()
    assert task.full_influence() == pytest.approx(2 * (10 - 13))
    sums = np.cumsum(task.lag_influences(200))
    assert task.balance_horizon() == 41
    assert (sums[:40] > 0).all() and sums[40] < 0 and (sums[40:] < 0).all()
    np.testing.assert_allclose(task.lag_influences(10), np.ones(10))  # the first 10 lags see +θ only


@pytest.mark.parametrize("spec", ["sliding:k=1", "sliding:k=7", "sliding:k=30", "chunked:k=5", "chunked:k=12", None])
def test_engine_gradients_match_the_simulation(spec: str | None) -> None:
    task = make_task("influence-balancing")
    model = make_model("influence-linear", task, 23, dtype="float64", model_params={"theta0": 0.25})
    s0 = np.linspace(-1, 1, 23)
    batch = task.sample(1, 36, torch.Generator()).to("cpu", torch.float64)
    state = torch.tensor(s0)[None, None]
    got = flatten(true_gradient(model, batch, "mse", state) if spec is None
                  else method_gradient(model, batch, spec, "mse", state))
    assert float(got) == pytest.approx(reference_gradient(task, 0.25, s0, 36, spec), rel=1e-10)


@pytest.mark.parametrize("family", ["sliding", "chunked"])
def test_sign_of_the_truncated_gradient_follows_the_segment_influence(family: str) -> None:
    """At θ = 0 from the zero state s¹ − 1 = −1 throughout, so ĝ_K = −2·segment_influence: wrong sign (the
    opposite of the full gradient's) for every K below the horizon of a segment, right above it."""
    task = make_task("influence-balancing")
    model = make_model("influence-linear", task, 23, dtype="float64")
    T = 300
    batch = task.sample(1, T, torch.Generator()).to("cpu", torch.float64)
    zero = torch.zeros(1, 1, 23, dtype=torch.float64)
    g = float(flatten(true_gradient(model, batch, "mse", zero)))
    assert g == pytest.approx(-2 * task.segment_influence(np.tril(np.ones((T, T)))), rel=1e-10) and g > 0
    signs = []
    for k in (1, 10, 30, 40, 41, 60, 100, 150, 300):
        est = float(flatten(method_gradient(model, batch, f"{family}:k={k}", "mse", zero)))
        assert est == pytest.approx(-2 * task.segment_influence(method_mask(f"{family}:k={k}", T)), rel=1e-10, abs=1e-9)
        signs.append(np.sign(est) == np.sign(g))
    assert signs[:4] == [False] * 4  # below the lag horizon 41 every truncation points the wrong way
    assert signs[-1]


def test_forward_mode_runs_the_declared_model() -> None:
    task = make_task("influence-balancing")
    model = make_model("influence-linear", task, 23, dtype="float64", model_params={"theta0": -0.1})
    batch = task.sample(1, 20, torch.Generator()).to("cpu", torch.float64)
    true = flatten(true_gradient(model, batch, "mse"))
    torch.testing.assert_close(flatten(method_gradient(model, batch, "rtrl", "mse")), true, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(flatten(method_gradient(model, batch, "uoro", "mse"))).all()
    with pytest.raises(UsageError, match="snap"):
        method_gradient(model, batch, "snap:n=1", "mse")


def test_refusals() -> None:
    with pytest.raises(UsageError, match="n_positive"):
        InfluenceBalancingTask(n=5, n_positive=5)
    with pytest.raises(UsageError, match="diagonal"):
        InfluenceBalancingTask(diagonal=1.0)
    with pytest.raises(UsageError, match="hidden_size = 23"):
        make_model("influence-linear", make_task("influence-balancing"), 8)
    with pytest.raises(UsageError, match="influence-balancing task only"):
        make_model("influence-linear", make_task("copy"), 23)
