"""True gradients: checkpointed = exact, float64 copies, and forward-mode probes with error bars."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbptt_bench.errors import UsageError
from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient
from tbptt_bench.analysis.truegrad import directional_derivatives, estimate_from_probes, in_dtype, probe_compare, probe_directions

from test_engine import assert_close, make_model, token_batch
from test_protocol import LeakyTwoState


@pytest.mark.parametrize("checkpoint", [2, 5, 20])
def test_checkpointed_true_gradient_equals_exact(checkpoint: int) -> None:
    model = make_model("lstm", layers=2)
    batch = token_batch(T=11)
    assert_close(true_gradient(model, batch, "cross_entropy", checkpoint=checkpoint),
                 true_gradient(model, batch, "cross_entropy"), tol=1e-12)


def test_float64_copy_gives_the_float64_gradient() -> None:
    model32 = make_model("gru").float()
    model64 = in_dtype(model32, torch.float64)
    assert model64 is not model32 and next(model64.parameters()).dtype == torch.float64
    assert in_dtype(model64, torch.float64) is model64
    reference = make_model("gru")  # the same float64 weights before rounding to float32
    with torch.no_grad():
        for p, q in zip(reference.parameters(), model32.parameters()):
            p.copy_(q.double())
    batch = token_batch()
    assert_close(true_gradient(model64, batch, "cross_entropy"), true_gradient(reference, batch, "cross_entropy"))


def test_directional_derivatives_equal_v_dot_g() -> None:
    """Forward mode, chunked (state and tangent carried), from a non-zero state: exactly vᵀg."""
    torch.manual_seed(0)
    model = LeakyTwoState()
    g = torch.Generator().manual_seed(5)
    from tbptt_bench.tasks.base import Batch

    batch = Batch(torch.rand(2, 10, 2, generator=g, dtype=torch.float64),
                  torch.rand(2, 10, 1, generator=g, dtype=torch.float64), torch.ones(2, 10, dtype=torch.float64))
    h0 = (torch.rand(1, 2, 3, generator=g, dtype=torch.float64), torch.rand(1, 2, 3, generator=g, dtype=torch.float64))
    truth = true_gradient(model, batch, "mse", h0)
    dirs = probe_directions(model, 4, seed=1, kind="gaussian")
    got = directional_derivatives(model, batch, "mse", dirs, h0, chunk=3)
    want = torch.stack([torch.dot(flatten(v, list(truth)), flatten(truth)) for v in dirs])
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_probes_run_on_the_float32_fused_lstm() -> None:
    """oneDNN's float32 LSTM kernel has no forward-mode derivative; the probes must still work."""
    model = make_model("lstm").float()
    batch = token_batch(T=6)
    truth = true_gradient(model, batch, "cross_entropy")
    dirs = probe_directions(model, 2, seed=0)
    got = directional_derivatives(model, batch, "cross_entropy", dirs, chunk=4)
    want = torch.stack([torch.dot(flatten(v, list(truth)), flatten(truth)) for v in dirs])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_probe_estimates_agree_with_exact_within_their_error() -> None:
    model = make_model("lstm")
    batch = token_batch(B=3, T=8)
    est = method_gradient(model, batch, "chunked:k=3", "cross_entropy")
    truth = true_gradient(model, batch, "cross_entropy")
    fe, fg = flatten(est), flatten(truth)
    exact = {
        "sq_error": float(((fe - fg) ** 2).sum()), "sq_true_norm": float((fg**2).sum()), "dot": float(fe @ fg),
        "relative_error": float((fe - fg).norm() / fg.norm()), "cosine": float(fe @ fg / (fe.norm() * fg.norm())),
    }
    pe = probe_compare(model, batch, "cross_entropy", est, n_probes=24, seed=3, chunk=5)
    for key, value in exact.items():
        se = getattr(pe, f"{key}_se")
        assert se > 0
        assert abs(getattr(pe, key) - value) < 3 * se, (key, getattr(pe, key), value, se)


def test_probe_statistics_are_unbiased_on_a_known_vector() -> None:
    """Averaged over many Rademacher probes, the estimators hit ‖ĝ-g‖², ĝᵀg and ‖g‖² (no model)."""
    rng = np.random.default_rng(0)
    est, true = rng.normal(size=20), rng.normal(size=20)
    v = rng.choice([-1.0, 1.0], size=(4000, 20))
    pe = estimate_from_probes(v @ est, v @ true, float(np.linalg.norm(est)))
    assert abs(pe.sq_error - ((est - true) ** 2).sum()) < 4 * pe.sq_error_se
    assert abs(pe.dot - est @ true) < 4 * pe.dot_se
    assert abs(pe.sq_true_norm - true @ true) < 4 * pe.sq_true_norm_se


def test_bad_probe_arguments() -> None:
    model = make_model("rnn")
    with pytest.raises(UsageError, match="probe distribution"):
        probe_directions(model, 4, 0, kind="uniform")
    with pytest.raises(UsageError, match="at least 2 probes"):
        probe_directions(model, 1, 0)
