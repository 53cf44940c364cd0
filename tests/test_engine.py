"""The engine's gradient estimates against independent computations (float64)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from tbptt_bench.analysis.gradients import method_gradient, true_gradient
from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.tasks.base import Batch

from reference import finite_difference, masked_reference



def token_batch(B=3, T=9, V=5, seed=0, scored=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    w = torch.ones(B, T, dtype=torch.float64) if scored is None else scored
    return Batch(x, y, w)


def real_batch(B=3, T=9, C=2, D=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, T, C, generator=g, dtype=torch.float64)
    y = torch.rand(B, T, D, generator=g, dtype=torch.float64)
    w = (torch.rand(B, T, generator=g, dtype=torch.float64) > 0.3).to(torch.float64)
    return Batch(x, y, w)


def make_model(cell, kind="tokens", layers=1, H=4, V=5, path="fused", seed=0):
    torch.manual_seed(seed)
    in_size, out_size = (V, V) if kind == "tokens" else (2, 1)
    model = RecurrentNet(cell, kind, in_size, out_size, H, layers, path).double()
    with torch.no_grad():  # larger recurrent weights so that long lags matter
        for n, p in model.named_parameters():
            if "weight_hh" in n:
                p.mul_(3.0)
    return model


def assert_close(a, b, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_full_gradient_equals_finite_differences(cell):
    model = make_model(cell, "real", layers=2, H=3)
    batch = real_batch(B=2, T=6)
    g = true_gradient(model, batch, "mse")
    fd = finite_difference(model, batch, "mse")
    assert_close(g, fd, tol=1e-7)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_fused_equals_cell_path(cell):
    fused = make_model(cell, layers=2, path="fused")
    cell_model = make_model(cell, layers=2, path="cell")
    batch = token_batch()
    out_f, s_f = fused(batch.inputs, fused.initial_state(3))
    out_c, s_c = cell_model(batch.inputs, cell_model.initial_state(3))
    torch.testing.assert_close(out_f, out_c, rtol=1e-10, atol=1e-10)
    for spec in ["full", "tbptt:k1=2,k2=5", "sliding:k=3"]:
        assert_close(method_gradient(fused, batch, spec, "cross_entropy"), method_gradient(cell_model, batch, spec, "cross_entropy"))


SPECS = [
    "full", "full:checkpoint=2", "chunked:k=1", "chunked:k=3", "chunked:k=4",
    "tbptt:k1=2,k2=5", "tbptt:k1=3,k2=3", "tbptt:k1=4,k2=2", "tbptt:k1=4,k2=1", "tbptt:k1=5,k2=7",
    "tbptt:k1=1,k2=3", "sliding:k=1", "sliding:k=3", "sliding:k=4,k1=2",
]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_estimate_equals_brute_force_masked_reference(cell, spec):
    model = make_model(cell, layers=2 if cell == "lstm" else 1)
    batch = token_batch(T=9)  # 9 is not a multiple of 2, 4, 5: trailing segments exercised
    method = parse_method(spec)
    est = method_gradient(model, batch, method, "cross_entropy")
    ref = masked_reference(model, batch, mask_matrix(method.updates(9), 9), "cross_entropy")
    assert_close(est, ref)


def test_random_k1_k2_against_reference_real_inputs():
    rng = np.random.default_rng(0)
    model = make_model("gru", "real", layers=1)
    for _ in range(6):
        T = int(rng.integers(3, 11))
        k1, k2 = (int(v) for v in rng.integers(1, 8, size=2))
        batch = real_batch(T=T, seed=int(rng.integers(1000)))
        method = parse_method(f"tbptt:k1={k1},k2={k2}")
        est = method_gradient(model, batch, method, "mse")
        ref = masked_reference(model, batch, mask_matrix(method.updates(T), T), "mse")
        assert_close(est, ref)


@pytest.mark.parametrize(
    "spec", ["tbptt:k1=9,k2=9", "tbptt:k1=3,k2=9", "tbptt:k1=1,k2=12", "tbptt:k1=12,k2=10", "sliding:k=9", "sliding:k=20"]
)
def test_long_truncation_equals_full(spec):
    """k2 ≥ T (with every window reaching step 0) and sliding(K ≥ T) give the full gradient."""
    model = make_model("lstm")
    batch = token_batch(T=9)
    assert_close(method_gradient(model, batch, spec, "cross_entropy"), true_gradient(model, batch, "cross_entropy"))


def test_truncation_is_not_full_when_short():
    model = make_model("rnn")
    batch = token_batch(T=9)
    full = true_gradient(model, batch, "cross_entropy")
    est = method_gradient(model, batch, "chunked:k=2", "cross_entropy")
    diff = max(float((est[k] - full[k]).abs().max()) for k in full)
    assert diff > 1e-4
    torch.testing.assert_close(est["readout.weight"], full["readout.weight"])  # read-out term kept


def test_bit_identical_twice():
    batch = token_batch()
    a = method_gradient(make_model("lstm"), batch, "tbptt:k1=2,k2=4", "cross_entropy")
    b = method_gradient(make_model("lstm"), batch, "tbptt:k1=2,k2=4", "cross_entropy")
    for k in a:
        assert torch.equal(a[k], b[k])


def test_forward_trajectory_identical_under_every_method():
    from tbptt_bench.core.engine import Engine

    model = make_model("gru")
    batch = token_batch(T=9)
    finals = []
    for spec in ["full", "chunked:k=2", "tbptt:k1=2,k2=5", "tbptt:k1=4,k2=1", "sliding:k=3"]:
        m = parse_method(spec)
        res = Engine(model, "cross_entropy").run(batch, m.updates(9), model.initial_state(3))
        finals.append(res.final_state)
        model.zero_grad()
    for f in finals[1:]:
        torch.testing.assert_close(f, finals[0], rtol=1e-12, atol=1e-12)


def test_update_losses_sum_to_total_loss():
    from tbptt_bench.core.engine import Engine

    model = make_model("lstm")
    batch = token_batch(T=9)
    out, _ = model(batch.inputs, model.initial_state(3))
    from reference import step_losses

    total = step_losses(out, batch.targets, batch.weights, "cross_entropy").sum()
    for spec in ["full", "tbptt:k1=2,k2=5", "tbptt:k1=4,k2=1", "sliding:k=2"]:
        res = Engine(model, "cross_entropy").run(batch, parse_method(spec).updates(9), model.initial_state(3))
        torch.testing.assert_close(res.update_losses.sum(), total)
