"""Closed-form cases: a scalar linear recurrence whose truncated gradients and lag profile are known.

Model (a user model following the protocol, float64):

    h_t = a·h_{t-1} + b·x_t,  h_0 = 0,   y_t = c·h_t (read-out),   loss = (y_T - 0)² at the last step only,

with geometric inputs ``x_t = u^t`` (one ``u`` per batch row), so that ``h_t = b·u·(u^t - a^t)/(u - a)``.
With ``e = ∂ℓ_T/∂h_T = (2/B)·c²·h_T`` (the loss is averaged over the B rows) the contribution of lag d
to the gradient is ``e·a^d·h_{T-d-1}`` for a and ``e·a^d·x_{T-d}`` for b, and summing the geometric
series gives, for the lags ``d < K`` that sliding(K) keeps,

    ĝ_a(K) = e·b·u/(u - a) · [u^{T-1}·(1 - (a/u)^K)/(1 - a/u) - K·a^{T-1}]
    ĝ_b(K) = e·u^T·(1 - (a/u)^K)/(1 - a/u)
    ĝ_c    = (2/B)·c·h_T²             (read-out: kept by every method)

summed over rows; the true gradient is K = T and the bias is ĝ(T) - ĝ(K). Chunked(K) gives the last
loss the lags 0..j with j = (T-1) mod K, i.e. ĝ(j + 1). The lag profile of the single scored loss is
``φ_d = 2c²·|h_T|·|a|^d``: exactly geometric with rate |a|.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tbptt_bench.analysis.gradients import method_gradient
from tbptt_bench.analysis.kcurve import kcurve_gradients
from tbptt_bench.core.lags import build_profile, extrapolated_bias, lag_decomposition, lag_profile
from tbptt_bench.tasks.base import Batch

A, B_IN, C = 0.8, 0.7, 1.3
US = (0.5, 0.9, 1.1)
T = 12


class ScalarLinear(nn.Module):
    """h_t = a h_{t-1} + b x_t, read-out c h_t; state [1, B, 1]."""

    def __init__(self, a: float = A, b: float = B_IN, c: float = C) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))
        self.lin = nn.Module()
        self.lin.c = nn.Parameter(torch.tensor(c, dtype=torch.float64))

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(1, batch_size, 1, dtype=torch.float64)

    def core(self, inputs: torch.Tensor, state: torch.Tensor):
        h = state[0]
        out = []
        for t in range(inputs.shape[1]):
            h = self.a * h + self.b * inputs[:, t]
            out.append(h)
        return torch.stack(out, 1), h[None]

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        return self.lin.c * features

    def forward(self, inputs, state):
        f, s = self.core(inputs, state)
        return self.readout(f), s


def geometric_batch(us=US, length=T) -> Batch:
    u = torch.tensor(us, dtype=torch.float64)[:, None]
    t = torch.arange(1, length + 1, dtype=torch.float64)[None, :]
    x = (u**t)[..., None]
    w = torch.zeros(len(us), length, dtype=torch.float64)
    w[:, -1] = 1.0
    return Batch(x, torch.zeros_like(x), w)


def closed_form(k: int, a=A, b=B_IN, c=C, us=US, length=T) -> dict[str, float]:
    """ĝ of sliding(k) from the formulas in the module docstring (k = length: the true gradient)."""
    n = len(us)
    ga = gb = gc = 0.0
    for u in us:
        h_T = b * u * (u**length - a**length) / (u - a)
        e = 2.0 / n * c * c * h_T
        r = a / u
        geo = (1 - r**k) / (1 - r)
        ga += e * b * u / (u - a) * (u ** (length - 1) * geo - k * a ** (length - 1))
        gb += e * u**length * geo
        gc += 2.0 / n * c * h_T * h_T
    return {"a": ga, "b": gb, "lin.c": gc}


def assert_matches(grad: dict[str, torch.Tensor], expected: dict[str, float], tol: float = 1e-8) -> None:
    for name, value in expected.items():
        got = float(grad[name])
        assert math.isclose(got, value, rel_tol=tol, abs_tol=tol), f"{name}: {got} != {value}"


def test_true_gradient_is_the_closed_form() -> None:
    model, batch = ScalarLinear(), geometric_batch()
    assert_matches(method_gradient(model, batch, "full", "mse"), closed_form(T))


@pytest.mark.parametrize("k", range(1, T + 1))
def test_sliding_every_k_closed_form(k: int) -> None:
    """Decomposition, engine (one update, k1 = T) and closed form agree; so does the bias."""
    model, batch = ScalarLinear(), geometric_batch()
    dec = lag_decomposition(model, batch, "mse", T)
    expected = closed_form(k)
    assert_matches(dec.sliding(k), expected)
    assert_matches(method_gradient(model, batch, f"sliding:k={k},k1={T}", "mse"), expected)
    full = closed_form(T)
    bias = {n: float(method_gradient(model, batch, "full", "mse")[n] - dec.sliding(k)[n]) for n in full}
    for n in full:
        assert math.isclose(bias[n], full[n] - expected[n], rel_tol=1e-8, abs_tol=1e-10)


def test_chunked_ladder_closed_form() -> None:
    """The K-curve ladder reproduces chunked(K): the last loss keeps lags 0..(T-1) mod K."""
    model, batch = ScalarLinear(), geometric_batch()
    ks = [1, 2, 4, 8]
    grads = kcurve_gradients(model, batch, "mse", [f"chunked:k={k}" for k in ks])
    for k in ks:
        expected = closed_form((T - 1) % k + 1)
        assert_matches(next(g for m, g in grads.items() if m.params["k"] == k), expected)


def test_tbptt_extension_closed_form() -> None:
    """tbptt(K, 2K-1): the last loss, at offset j = (T-1) mod K of its chunk, keeps lags 0..j+K-1."""
    model, batch = ScalarLinear(), geometric_batch()
    specs = [f"tbptt:k1={k},k2={2 * k - 1}" for k in (1, 2, 4)] + ["chunked:k=4"]
    grads = kcurve_gradients(model, batch, "mse", specs)
    for m, g in grads.items():
        k = m.params.get("k1", m.params.get("k"))
        ext = m.params.get("k2", k) - k
        assert_matches(g, closed_form(min(T, (T - 1) % k + 1 + ext)))


@pytest.mark.parametrize("a", [0.8, -0.7, 0.95])
def test_lag_profile_exact_geometric_rate(a: float) -> None:
    model, batch = ScalarLinear(a=a), geometric_batch()
    prof = lag_profile(model, batch, "mse", T - 1)
    h_T = np.array([B_IN * u * (u**T - a**T) / (u - a) for u in US])
    base = 2 * C * C * np.abs(h_T)
    d = np.arange(1, T)
    np.testing.assert_allclose(prof.mean, base.mean() * np.abs(a) ** d, rtol=1e-10)
    np.testing.assert_allclose(prof.q50, np.median(base) * np.abs(a) ** d, rtol=1e-10)
    assert math.isclose(prof.fit.rate, abs(a), rel_tol=1e-10)
    assert math.isclose(prof.fit.rate_robust, abs(a), rel_tol=1e-10)
    for k in (1, 3, 7):
        tail = base.mean() * (abs(a) ** k - abs(a) ** T) / (1 - abs(a))
        assert math.isclose(prof.tail(k), tail, rel_tol=1e-10)
    assert prof.tail(T) == 0.0 and extrapolated_bias(prof, T) == 0.0


def test_profile_extrapolates_with_the_fitted_rate() -> None:
    """With D < T the unmeasured lags come from the fit, which is exact here."""
    model, batch = ScalarLinear(a=0.6), geometric_batch()
    full = lag_profile(model, batch, "mse", T - 1)
    short = build_profile(lag_decomposition(model, batch, "mse", 4).samples)
    for k in (2, 5, 9):
        assert math.isclose(short.tail(k), full.tail(k), rel_tol=1e-9)


def test_decay_check_holds_on_the_geometric_chain() -> None:
    prof = lag_profile(ScalarLinear(a=0.8), geometric_batch(), "mse", T - 1)
    check = prof.decay_check()
    assert check.geometric and check.r_squared == pytest.approx(1.0, abs=1e-12)
    assert check.rate == pytest.approx(0.8, rel=1e-10)
    assert check.extrapolated_share == 0.0  # every lag up to the horizon was measured


def test_decay_check_counts_the_extrapolated_share() -> None:
    """With D = 4 of T - 1 = 11 lags measured, the share of sliding(1)'s tail beyond D is the geometric
    series' remainder: Σ_{d>4} a^d / Σ_{d≥1} a^d over the lags that exist (d ≤ T - 1)."""
    a = 0.6
    short = build_profile(lag_decomposition(ScalarLinear(a=a), geometric_batch(), "mse", 4).samples)
    d = np.arange(1, T)
    assert short.decay_check().extrapolated_share == pytest.approx((a ** d[d > 4]).sum() / (a**d).sum(), rel=1e-9)


def test_extrapolation_is_not_a_bound_on_the_geometric_chain() -> None:
    """The decay assumption holds exactly here, yet the extrapolated relative bias can fall below the
    exact relative bias (it measures in state space): so it is named an extrapolation, never a bound."""
    a, us = 0.6, (0.3,)
    prof = lag_profile(ScalarLinear(a=a), geometric_batch(us=us), "mse", T - 1)
    assert prof.decay_check().geometric
    g = np.array(list(closed_form(T, a=a, us=us).values()))
    exact = float(np.linalg.norm(g - np.array(list(closed_form(4, a=a, us=us).values()))) / np.linalg.norm(g))
    assert exact == pytest.approx(0.604, abs=5e-4)
    assert prof.extrapolated_bias(4) == pytest.approx(0.213, abs=5e-4)  # below the exact value
