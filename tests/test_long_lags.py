"""The sampled long-lag profile against brute-force autograd and the full lag decomposition (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tbptt_bench.analysis.long_lags import lag_grid, long_lag_profile, sample_positions
from tbptt_bench.core.lags import lag_profile
from tbptt_bench.errors import UsageError
from tbptt_bench.tasks.base import Batch

from test_engine import make_model, real_batch, token_batch
from test_kcurve_long import RecordingSource
from test_lags import leaky_case


def brute_force_phi(model, batch: Batch, loss_kind: str, t: int, lags: list[int], h0=None) -> np.ndarray:
    """[B, len(lags)]: w_t·‖∂ℓ_t/∂S_{t-d+1}‖ from one graph of the whole prefix, every state kept."""
    B = batch.batch_size
    h = model.initial_state(B) if h0 is None else h0
    kept = []
    for s in range(t + 1):
        kept.append(h)
        out, h = model(batch.inputs[:, s : s + 1], h)
    w = batch.weights[:, t].to(out.dtype)
    if loss_kind == "cross_entropy":
        per = torch.nn.functional.cross_entropy(out[:, 0], batch.targets[:, t], reduction="none")
    else:
        per = ((out[:, 0] - batch.targets[:, t].to(out.dtype)) ** 2).sum(-1)
    loss = (per * w).sum()
    wanted = [kept[t - d + 1] for d in lags]
    flat = [p for s in wanted for p in (s if isinstance(s, tuple) else (s,))]
    grads = torch.autograd.grad(loss, flat, allow_unused=True)
    per_state = len(flat) // len(wanted)
    phi = np.zeros((B, len(lags)))
    for j in range(len(lags)):
        total = torch.zeros(B, dtype=torch.float64)
        for g in grads[j * per_state : (j + 1) * per_state]:
            if g is not None:
                total += g.transpose(0, 1).reshape(B, -1).pow(2).sum(1)
        phi[:, j] = total.sqrt().numpy()
    return phi


@pytest.mark.parametrize("cell,kind,layers", [("rnn", "tokens", 1), ("lstm", "tokens", 2), ("gru", "real", 1),
                                              ("lstm", "real", 1)])
def test_every_value_equals_brute_force_autograd(cell: str, kind: str, layers: int) -> None:
    model = make_model(cell, kind, layers=layers)
    batch = token_batch(B=3, T=30) if kind == "tokens" else real_batch(B=3, T=30)
    loss_kind = "cross_entropy" if kind == "tokens" else "mse"
    lags = [1, 2, 3, 5, 9]
    prof = long_lag_profile(model, batch, loss_kind, 9, n_positions=5, lags=lags, max_step_rows=3 * 9 * 2)
    assert list(prof.lags) == lags and len(prof.positions) == 5
    for i, t in enumerate(prof.positions):
        ref = brute_force_phi(model, batch, loss_kind, int(t), lags)
        scored = batch.weights[:, t].numpy() != 0
        np.testing.assert_allclose(prof.phi[i][scored], ref[scored], rtol=1e-10, atol=1e-14)
        assert np.isnan(prof.phi[i][~scored]).all()
    assert np.all(prof.mean > 0) and np.all(prof.underflow == 0)


def test_carried_state_and_tuple_state_model() -> None:
    model, batch, h0 = leaky_case(20)
    prof = long_lag_profile(model, batch, "mse", 6, n_positions=4, lags=[1, 4, 6], state=h0)
    for i, t in enumerate(prof.positions):
        ref = brute_force_phi(model, batch, "mse", int(t), [1, 4, 6], h0)
        scored = batch.weights[:, t].numpy() != 0
        np.testing.assert_allclose(prof.phi[i][scored], ref[scored], rtol=1e-10, atol=1e-14)


def test_mean_equals_the_full_decomposition_scored_at_the_same_losses() -> None:
    """With only the sampled losses scored, the full lag profile's mean is the sampled mean at every lag."""
    model = make_model("gru")
    T, D = 40, 8
    positions = sample_positions(T, D, 6)
    w = torch.zeros(3, T, dtype=torch.float64)
    w[:, positions] = 1.0
    batch = token_batch(B=3, T=T, scored=w)
    full = lag_profile(model, batch, "cross_entropy", D)
    prof = long_lag_profile(model, batch, "cross_entropy", D, n_positions=6, lags=list(range(1, D + 1)))
    assert list(prof.positions) == positions
    np.testing.assert_allclose(prof.mean, full.mean, rtol=1e-10)
    per = np.nanmean(prof.phi, axis=1)
    np.testing.assert_allclose(prof.standard_error, per.std(0, ddof=1) / math.sqrt(6), rtol=1e-12)


def test_groups_do_not_change_the_values() -> None:
    model = make_model("lstm")
    batch = token_batch(B=2, T=50)
    one = long_lag_profile(model, batch, "cross_entropy", 12, n_positions=7)
    many = long_lag_profile(model, batch, "cross_entropy", 12, n_positions=7, max_step_rows=1)
    np.testing.assert_allclose(one.phi, many.phi, rtol=1e-12)


def test_unscored_positions_are_left_out_of_the_statistics() -> None:
    model = make_model("rnn")
    T, D = 30, 5
    positions = sample_positions(T, D, 4)
    w = torch.ones(2, T, dtype=torch.float64)
    w[:, positions[1]] = 0.0
    w[0, positions[2]] = 0.0
    prof = long_lag_profile(model, token_batch(B=2, T=T, scored=w), "cross_entropy", D, n_positions=4)
    assert np.isnan(prof.phi[1]).all() and np.isnan(prof.phi[2, 0]).all() and not np.isnan(prof.phi[2, 1]).any()
    assert prof.n_positions == 3
    expected = np.mean([prof.phi[0].mean(0), prof.phi[2, 1], prof.phi[3].mean(0)], axis=0)
    np.testing.assert_allclose(prof.mean, expected, rtol=1e-12)
    frame = prof.frame()
    assert list(frame["lag"]) == list(prof.lags) and (frame["n_positions"] == 3).all()


def test_data_are_read_in_slices_no_longer_than_a_window_or_a_gap() -> None:
    model = make_model("lstm")
    T, D, n = 200, 10, 5
    source = RecordingSource(token_batch(B=2, T=T))
    prof = long_lag_profile(model, source, "cross_entropy", D, n_positions=n)
    direct = long_lag_profile(model, source.batch, "cross_entropy", D, n_positions=n)
    np.testing.assert_allclose(prof.phi, direct.phi, rtol=1e-12)
    gap = max(b - a for a, b in zip(prof.positions[:-1], prof.positions[1:]))
    assert max(b - a for a, b in source.asked) <= max(D, gap + 1 + D)
    assert all(b - a <= D for a, b in source.asked[-n:])


def test_underflow_share_counts_exact_zeros() -> None:
    model = make_model("rnn")
    with torch.no_grad():  # a cell that ignores its state: every state adjoint is exactly zero
        model.rnn.weight_hh_l0.zero_()
    prof = long_lag_profile(model, token_batch(B=2, T=20), "cross_entropy", 4, n_positions=3)
    assert np.all(prof.underflow == 1) and np.all(prof.mean == 0)
    assert prof.fit().n_points == 0  # zeros are left out of the decay fit


def test_lag_grid_and_positions() -> None:
    assert lag_grid(10) == list(range(1, 11))
    grid = lag_grid(4096)
    assert grid[:16] == list(range(1, 17)) and grid[-1] == 4096 and grid == sorted(set(grid))
    assert len(grid) == 16 + 8 * 8  # 16 dense, then 8 per doubling from 16 to 4096 (16 counted once)
    ratios = np.diff(np.log2(grid[16:]))
    assert ratios.max() < 0.2
    pos = sample_positions(100, 10, 9)
    assert len(pos) == 9 and pos[0] >= 10 and pos[-1] <= 99 and np.all(np.diff(pos) == 10)
    assert sample_positions(12, 10, 50) == [10, 11]


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_lag=30), "below the sequence length"),
    (dict(max_lag=0), "maximum lag"),
    (dict(max_lag=5, n_positions=0), "at least one loss position"),
    (dict(max_lag=5, lags=[0, 1]), "lags must lie"),
    (dict(max_lag=5, lags=[6]), "lags must lie"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        long_lag_profile(make_model("rnn"), token_batch(B=2, T=30), "cross_entropy", **kwargs)
