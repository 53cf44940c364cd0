"""The lag decomposition and lag profile against independent computations (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbptt_bench.errors import UsageError
from tbptt_bench.analysis.gradients import method_gradient, true_gradient
from tbptt_bench.core.lags import build_profile, fit_decay, kept_lags, lag_decomposition, lag_profile
from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.methods.base import parse_method

from reference import masked_reference
from test_engine import assert_close, make_model, real_batch, token_batch
from test_protocol import LeakyTwoState


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_lags_sum_to_full_gradient_and_give_every_sliding_k(cell: str) -> None:
    """Σ_d G_d = full BPTT; Σ_{d<K} G_d = sliding(K) by the engine and by the brute-force reference."""
    model = make_model(cell, layers=2 if cell == "lstm" else 1)
    batch = token_batch(T=9)
    dec = lag_decomposition(model, batch, "cross_entropy", 9, max_rows=7)  # pieces of 2 positions
    assert_close(dec.total(), true_gradient(model, batch, "cross_entropy"))
    for k in range(1, 10):
        spec = f"sliding:k={k},k1=9"
        assert_close(dec.sliding(k), method_gradient(model, batch, spec, "cross_entropy"))
    ref = masked_reference(model, batch, mask_matrix(parse_method("sliding:k=3,k1=9").updates(9), 9), "cross_entropy")
    assert_close(dec.sliding(3), ref)


def leaky_case(T: int):
    """A user model with a tuple state (no read-out split), T steps of real inputs, a random start state."""
    torch.manual_seed(2)
    model = LeakyTwoState()
    g = torch.Generator().manual_seed(4)
    batch = real_batch(B=2, T=T, C=2, D=1)
    h0 = (torch.rand(1, 2, 3, generator=g, dtype=torch.float64), torch.rand(1, 2, 3, generator=g, dtype=torch.float64))
    return model, batch, h0


def test_user_model_with_tuple_state_and_initial_state() -> None:
    model, batch, h0 = leaky_case(8)
    dec = lag_decomposition(model, batch, "mse", 8, h0, max_rows=6)
    assert_close(dec.total(), true_gradient(model, batch, "mse", h0))
    for k in (1, 4, 7):
        ref = masked_reference(model, batch, mask_matrix(parse_method(f"sliding:k={k},k1=8").updates(8), 8), "mse", h0)
        assert_close(dec.sliding(k), ref)


def test_profile_values_are_state_adjoint_norms() -> None:
    """φ_d of the last loss equals ‖∂loss/∂h‖ computed by plain autograd from the stored states."""
    model = make_model("gru")
    T, B = 7, 3
    w = torch.zeros(B, T, dtype=torch.float64)
    w[:, -1] = 1.0
    batch = token_batch(B=B, T=T, scored=w)
    prof = lag_profile(model, batch, "cross_entropy", T - 1)
    h = model.initial_state(B).requires_grad_(True)
    states = []
    for t in range(T):
        states.append(h)
        out, h = model(batch.inputs[:, t : t + 1], h)
    loss = torch.nn.functional.cross_entropy(out[:, 0], batch.targets[:, -1], reduction="sum")
    grads = torch.autograd.grad(loss, states)
    for d in range(1, T):
        norms = grads[T - d].reshape(B, -1).norm(dim=1)  # state entering step T-d+1 = h_{T-d}
        assert prof.mean[d - 1] == pytest.approx(float(norms.mean()), rel=1e-10)
        assert prof.n_pairs[d - 1] == B


def test_unscored_losses_and_early_lags_are_not_counted() -> None:
    model = make_model("rnn", "real")
    batch = real_batch(B=3, T=8)
    prof = lag_profile(model, batch, "mse", 7)
    w = batch.weights.numpy()
    for d in range(1, 8):
        assert prof.n_pairs[d - 1] == int((w[:, d:] != 0).sum())


def test_bad_lags() -> None:
    model, batch = make_model("rnn"), token_batch(T=5)
    for bad in (0, 6):
        with pytest.raises(UsageError, match="maximum lag D"):
            lag_decomposition(model, batch, "cross_entropy", bad)
    dec = lag_decomposition(model, batch, "cross_entropy", 3)
    with pytest.raises(UsageError, match="K ≤ D"):
        dec.sliding(4)


def test_kept_lags_follow_the_mask() -> None:
    assert kept_lags(parse_method("chunked:k=3").updates(7), 7).tolist() == [1, 2, 3, 1, 2, 3, 1]
    assert kept_lags(parse_method("tbptt:k1=2,k2=3").updates(6), 6).tolist() == [1, 2, 2, 3, 2, 3]
    assert kept_lags(parse_method("sliding:k=3,k1=7").updates(7), 7).tolist() == [1, 2, 3, 3, 3, 3, 3]
    assert kept_lags(parse_method("full").updates(4), 4).tolist() == [1, 2, 3, 4]


def test_fit_decay_least_squares_and_theil_sen() -> None:
    d = np.arange(1, 30)
    rng = np.random.default_rng(0)
    values = 3.0 * 0.7**d * np.exp(rng.normal(0, 0.05, len(d)))
    values[2] *= 50  # one outlier: Theil–Sen ignores it, least squares does not
    fit = fit_decay(d, values)
    slope, _ = np.polyfit(d, np.log(values), 1)
    assert fit.rate == pytest.approx(np.exp(slope), rel=1e-12)
    assert abs(fit.rate_robust - 0.7) < abs(fit.rate - 0.7)
    assert fit.rate_robust_lo <= fit.rate_robust <= fit.rate_robust_hi
    assert np.isnan(fit_decay(d[:1], values[:1]).rate)


def test_extrapolation_is_decreasing_and_method_extrapolations_order() -> None:
    model = make_model("lstm")
    batch = token_batch(B=4, T=12)
    prof = build_profile(lag_decomposition(model, batch, "cross_entropy", 11).samples)
    bounds = [prof.extrapolated_bias(k) for k in range(1, 13)]
    assert all(a >= b for a, b in zip(bounds, bounds[1:])) and bounds[-1] == 0.0
    # sliding(K) keeps at least as many lags per loss as chunked(K): its extrapolation is not larger
    assert prof.method_extrapolation(parse_method("sliding:k=4,k1=12").updates(prof.horizon)) <= prof.method_extrapolation(parse_method("chunked:k=4").updates(prof.horizon))
    assert prof.method_extrapolation(parse_method("sliding:k=4,k1=12").updates(prof.horizon)) == pytest.approx(prof.extrapolated_bias(4), rel=1e-12)
    frame = prof.to_frame()
    assert list(frame["lag"]) == list(range(1, 12))
    assert {"mean", "q10", "q50", "q90", "rate", "rate_robust", "extrapolation"} <= set(frame.columns)


def _profile_of(values: np.ndarray) -> "LagProfile":
    """A profile whose mean at lag d is values[d-1] (one scored loss per position, T = len + 1)."""
    from tbptt_bench.core.lags import LagProfile

    d = np.arange(1, len(values) + 1)
    fit = fit_decay(d, values)
    ones = np.ones(len(values) + 1)
    return LagProfile(d, values, values, values, values, np.ones(len(values), int), [None] * len(values),
                      ones, len(values) + 1, fit)


@pytest.mark.parametrize(
    ("name", "values", "geometric", "reason"),
    [
        ("geometric", 2.0 * 0.7 ** np.arange(1, 20), True, "fits"),
        ("flat", np.ones(19), False, "no decay"),
        ("growing", 1.05 ** np.arange(1, 20), False, "no decay"),
        ("oscillating", 0.9 ** np.arange(1, 20) * (1 + 0.9 * (-1) ** np.arange(1, 20)), False, "not geometric"),
        ("two points", np.array([1.0, 0.5]), False, "only 2 lags"),
    ],
)
def test_decay_check_flags_profiles_that_are_not_geometric(name, values, geometric, reason) -> None:
    check = _profile_of(values).decay_check()
    assert check.geometric is geometric, (name, check)
    assert reason in check.reason
