"""Periodic hybrid truncation against tbptt and the brute-force masked reference (float64)."""

from __future__ import annotations

import pytest
import torch

from tbptt_bench.cli import main
from tbptt_bench.core.engine import Engine
from tbptt_bench.errors import UsageError
from tbptt_bench.analysis.gradients import method_gradient
from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.tasks.base import Batch

from reference import masked_reference


def tiny_model(cell: str = "gru", layers: int = 1, seed: int = 0) -> RecurrentNet:
    torch.manual_seed(seed)
    model = RecurrentNet(cell, "tokens", 5, 5, 4, layers).double()
    with torch.no_grad():  # larger recurrent weights so that long lags matter
        for name, p in model.named_parameters():
            if "weight_hh" in name:
                p.mul_(3.0)
    return model


def token_batch(B: int = 3, T: int = 11, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, 5, (B, T), generator=g), torch.randint(0, 5, (B, T), generator=g),
                 torch.ones(B, T, dtype=torch.float64))


def engine_estimate(model, batch, updates):
    model.zero_grad(set_to_none=True)
    Engine(model, "cross_entropy").run(batch, updates, model.initial_state(batch.batch_size))
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def assert_close(a, b, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("k1,k2,long", [(3, 3, 7), (2, 4, 6), (4, 2, 5), (3, 3, 0), (2, 2, 2)])
def test_every_one_is_tbptt_with_the_long_window(k1, k2, long):
    T = 11
    model, batch = tiny_model("lstm"), token_batch(T=T)
    hybrid = parse_method(f"hybrid:k1={k1},k2={k2},every=1,long={long}")
    tbptt = parse_method(f"tbptt:k1={k1},k2={long or T + k1}")  # long=0: reach step 0, i.e. k2 = ∞
    assert hybrid.updates(T, first_update=5) == tbptt.updates(T)
    assert_close(method_gradient(model, batch, hybrid, "cross_entropy"),
                 method_gradient(model, batch, tbptt, "cross_entropy"))


@pytest.mark.parametrize("cell,spec,first_update", [
    ("rnn", "hybrid:k1=3,every=2,long=7", 0), ("lstm", "hybrid:k1=3,every=2,long=7", 1),
    ("gru", "hybrid:k1=2,k2=3,every=3", 2), ("rnn", "hybrid:k1=2,k2=3,every=3", 1),
    ("lstm", "hybrid:k1=4,k2=2,every=2,long=9", 0), ("gru", "hybrid:k1=4,k2=2,every=2,long=9", 1),
])
def test_estimate_equals_masked_reference(cell, spec, first_update):
    T = 11
    model, batch = tiny_model(cell, layers=2 if cell == "lstm" else 1), token_batch(T=T)
    updates = parse_method(spec).updates(T, first_update=first_update)
    ref = masked_reference(model, batch, mask_matrix(updates, T), "cross_entropy")
    assert_close(engine_estimate(model, batch, updates), ref)


@pytest.mark.parametrize("long", [5, 0])
def test_long_updates_follow_the_global_count_across_sequences(long):
    """Update n (1-based over the run) reaches back `long` steps iff every | n, across sequence boundaries."""
    k1, k2, every = 2, 2, 3
    method = parse_method(f"hybrid:k1={k1},k2={k2},every={every},long={long}")
    n = 0
    for length in (5, 4, 7, 2):  # trailing segments shorter than k1 are updates of their own
        for a, u in zip(range(0, length, k1), method.updates(length, first_update=n)):
            n += 1
            reach = (long or 10**9) if n % every == 0 else k2
            assert (u.loss_start, u.loss_end) == (a, min(a + k1, length))
            assert u.window_start == max(0, a + k1 - reach)
            assert method.k_used(n - 1) == (None if reach == 10**9 else reach)
    assert n == 3 + 2 + 4 + 1


@pytest.mark.parametrize("spec,needle", [
    ("hybrid:k1=4,every=0", "every=0 must be an integer ≥ 1"),
    ("hybrid:k1=4,k2=6,every=2,long=5", "long=5 must be ≥ k2=6"),
    ("hybrid:k1=4,every=2,long=-1", "long=-1"),
    ("hybrid:every=2", "needs k1="),
])
def test_bad_specs_are_usage_errors(spec, needle, capsys):
    with pytest.raises(UsageError, match=needle):
        parse_method(spec)
    assert main(["explain", spec, "--seq-len", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
