"""KF-RTRL (Mujika, Meier & Steger 2018; tbptt_bench.core.kfrtrl): unbiased at fixed θ.

Checks: the mean over every sign sequence (enumerated, each equally likely) equals full BPTT, for token
and real inputs; one step is exact whatever the signs; the library's seeded sampling agrees with the
enumerated mean within its standard error; models it is not defined for are refused.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient
from tbptt_bench.core.forward_mode import run_forward_mode
from tbptt_bench.core.kfrtrl import KroneckerFactors
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.tasks.base import Batch

from test_engine import make_model, real_batch, token_batch

GROUPS = 2  # encoder and core


def estimate_with(model, batch: Batch, loss_kind: str, bits: tuple[float, ...]) -> torch.Tensor:
    """KF-RTRL's estimate when step t of row b draws the signs ``bits[(t·B + b)·GROUPS : …]``."""
    queue = list(bits)

    def signs(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        n = shape[0] * shape[1]
        out = torch.tensor(queue[:n], dtype=torch.float64, device=device).reshape(shape)
        del queue[:n]
        return out

    h0 = model.initial_state(batch.batch_size)
    result = run_forward_mode(model, batch, loss_kind, h0, lambda cell, B: KroneckerFactors(cell, B, signs))
    assert not queue
    return flatten(result.gradient)


def enumerate_kfrtrl(model, batch: Batch, loss_kind: str) -> torch.Tensor:
    n = batch.length * batch.batch_size * GROUPS
    return torch.stack([estimate_with(model, batch, loss_kind, bits)
                        for bits in itertools.product([-1.0, 1.0], repeat=n)])


CASES = {
    "tokens": (lambda: make_model("rnn", "tokens", H=3, V=4, seed=2), lambda: token_batch(B=1, T=3, V=4, seed=3),
               "cross_entropy"),
    "real": (lambda: make_model("rnn", "real", H=3, seed=4), lambda: real_batch(B=1, T=3, seed=5), "mse"),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_kfrtrl_is_exactly_unbiased_over_all_sign_draws(kind: str) -> None:
    build, data, loss_kind = CASES[kind]
    model, batch = build(), data()
    outcomes = enumerate_kfrtrl(model, batch, loss_kind)
    true = flatten(true_gradient(model, batch, loss_kind))
    torch.testing.assert_close(outcomes.mean(0), true, rtol=1e-10, atol=1e-10)
    assert float(outcomes.var(0, unbiased=False).sum()) > 1e-6  # a real random variable, not RTRL


def test_one_step_is_exact_for_any_signs() -> None:
    model, batch = make_model("rnn", "real", H=3, seed=4), real_batch(B=2, T=1, seed=6)
    true = flatten(true_gradient(model, batch, "mse"))
    for bits in itertools.product([-1.0, 1.0], repeat=2 * GROUPS):
        torch.testing.assert_close(estimate_with(model, batch, "mse", bits), true, rtol=1e-10, atol=1e-10)


def test_library_sampling_matches_the_enumerated_mean() -> None:
    build, data, loss_kind = CASES["tokens"]
    model, batch = build(), data()
    outcomes = enumerate_kfrtrl(model, batch, loss_kind)
    mean, var = outcomes.mean(0), outcomes.var(0, unbiased=False)
    method = parse_method("kfrtrl:seed=3")
    n = 300
    draws = torch.stack([flatten(method_gradient(model, batch, method, loss_kind)) for _ in range(n)])
    keep = var > 1e-20
    torch.testing.assert_close(draws[:, ~keep], mean[~keep].expand(n, -1), rtol=1e-10, atol=1e-10)
    z = (draws[:, keep].mean(0) - mean[keep]) / torch.sqrt(var[keep] / n)
    assert float(z.abs().max()) < stats.norm.ppf(1 - 0.001 / (2 * int(keep.sum())))


@pytest.mark.parametrize("cell,layers", [("lstm", 1), ("gru", 1), ("rnn", 2)])
def test_models_it_is_not_defined_for_are_refused(cell: str, layers: int) -> None:
    model, batch = make_model(cell, "real", layers=layers, H=3), real_batch(B=1, T=2)
    with pytest.raises(UsageError, match="kfrtrl"):
        method_gradient(model, batch, "kfrtrl", "mse")
