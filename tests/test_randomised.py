"""ARTBP: the sampled mask against the brute-force reference, and unbiasedness, exactly and by Monte Carlo."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from tbptt_bench.cli import main
from tbptt_bench.core.engine import Engine
from tbptt_bench.errors import UsageError
from tbptt_bench.analysis.gradients import flatten, true_gradient
from tbptt_bench.core.mask import Update, mask_matrix
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.methods.randomised import artbp_updates, cuts_probability, sample_cuts
from tbptt_bench.tasks.base import Batch

from reference import masked_reference


def tiny_model(cell: str = "rnn", layers: int = 1, hidden: int = 3, seed: int = 0) -> RecurrentNet:
    torch.manual_seed(seed)
    model = RecurrentNet(cell, "tokens", 4, 4, hidden, layers).double()
    with torch.no_grad():  # larger recurrent weights so that long lags matter
        for name, p in model.named_parameters():
            if "weight_hh" in name:
                p.mul_(3.0)
    return model


def token_batch(B: int = 2, T: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, 4, (B, T), generator=g), torch.randint(0, 4, (B, T), generator=g),
                 torch.ones(B, T, dtype=torch.float64))


def estimate(model, batch, updates) -> torch.Tensor:
    """The engine's ĝ for these updates, as one float64 vector."""
    model.zero_grad(set_to_none=True)
    Engine(model, "cross_entropy").run(batch, updates, model.initial_state(batch.batch_size))
    g = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return flatten(g)


def uncompensated(updates: list[Update]) -> list[Update]:
    """The same random truncation without the 1/(1-c) factors (plain random-length TBPTT)."""
    return [Update(u.loss_start, u.loss_end, u.window_start, u.max_lag) for u in updates]


def all_cut_sets(length: int):
    positions = range(1, length)
    for r in range(length):
        yield from itertools.combinations(positions, r)


@pytest.mark.parametrize("cell,spec,seed", [
    ("rnn", "artbp:c=0.3", 0), ("lstm", "artbp:c=0.3,min=2", 1), ("gru", "artbp:c=0.6,min=3", 2),
    ("lstm", "artbp:c=0.5", 3),
])
def test_fixed_draw_equals_masked_reference(cell, spec, seed):
    T = 10
    model, batch = tiny_model(cell, layers=2 if cell == "lstm" else 1), token_batch(T=T, seed=seed)
    updates = parse_method(spec).updates(T, rng=np.random.default_rng(seed))
    assert any(u.scales for u in updates)  # the draw exercises the compensation factors
    ref = masked_reference(model, batch, mask_matrix(updates, T), "cross_entropy")
    got = estimate(model, batch, updates)
    torch.testing.assert_close(got, flatten(ref), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("c,min_len", [(0.3, 1), (0.5, 2), (0.8, 1)])
def test_exact_expectation_over_every_draw_is_the_full_gradient(c, min_len):
    """Σ over all cut sets of P(cuts)·ĝ(cuts) = g, to float64 precision (T = 6: 32 cut sets)."""
    T = 6
    model, batch = tiny_model("gru"), token_batch(T=T)
    total_p, mean = 0.0, torch.zeros(())
    biased = torch.zeros(())
    for cuts in all_cut_sets(T):
        p = cuts_probability(T, cuts, c, min_len)
        if p == 0.0:
            continue
        updates = artbp_updates(T, cuts, c, min_len)
        total_p += p
        mean = mean + p * estimate(model, batch, updates)
        biased = biased + p * estimate(model, batch, uncompensated(updates))
    g = flatten(true_gradient(model, batch, "cross_entropy"))
    assert total_p == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(mean, g, rtol=1e-10, atol=1e-10)
    assert float(torch.linalg.vector_norm(biased - g)) > 1e-3 * float(torch.linalg.vector_norm(g))


@pytest.mark.parametrize("c,min_len", [(0.4, 1), (0.3, 2)])
def test_sampler_follows_the_stated_distribution(c, min_len):
    """Frequencies of sampled cut sets match cuts_probability (chi-square goodness of fit)."""
    T, n = 6, 20000
    rng = np.random.default_rng(7)
    sets = [s for s in all_cut_sets(T) if cuts_probability(T, s, c, min_len) > 0]
    index = {s: i for i, s in enumerate(sets)}
    counts = np.zeros(len(sets))
    for _ in range(n):
        counts[index[tuple(sample_cuts(T, c, min_len, rng))]] += 1
    expected = n * np.array([cuts_probability(T, s, c, min_len) for s in sets])
    assert stats.chisquare(counts, expected).pvalue > 1e-4


def test_monte_carlo_mean_converges_to_the_full_gradient():
    """Over N seeded draws, the mean of ĝ is within 4.5 standard errors of g along several directions,
    including the exact bias direction of the uncompensated estimator — which the same test rejects."""
    T, N, c = 8, 400, 0.3
    model, batch = tiny_model("rnn"), token_batch(T=T)
    g = flatten(true_gradient(model, batch, "cross_entropy"))
    bias_dir = sum(cuts_probability(T, s, c, 1) * estimate(model, batch, uncompensated(artbp_updates(T, s, c, 1)))
                   for s in all_cut_sets(T)) - g
    gen = torch.Generator().manual_seed(3)
    directions = [bias_dir] + [torch.randn(g.numel(), generator=gen, dtype=torch.float64) for _ in range(4)]
    method, rng = parse_method(f"artbp:c={c}"), np.random.default_rng(11)
    draws, plain = [], []
    for _ in range(N):
        updates = method.updates(T, rng=rng)
        draws.append(estimate(model, batch, updates))
        plain.append(estimate(model, batch, uncompensated(updates)))
    for samples, unbiased in ((torch.stack(draws), True), (torch.stack(plain), False)):
        z = []
        for v in directions:
            x = samples @ v
            z.append(float((x.mean() - g @ v) / (x.std() / N**0.5)))
        if unbiased:
            assert max(abs(v) for v in z) < 4.5, z
        else:
            assert abs(z[0]) > 4.5, z


def test_draws_are_seeded():
    method = parse_method("artbp:c=0.2,min=2")
    a = method.updates(200, rng=np.random.default_rng(5))
    b = method.updates(200, rng=np.random.default_rng(5))
    c = method.updates(200, rng=np.random.default_rng(6))
    assert a == b and a != c
    first, second = method.updates(200), method.updates(200)  # without a generator: the method's own stream
    assert first != second and parse_method("artbp:c=0.2,min=2").updates(200) == first


@pytest.mark.parametrize("spec", ["artbp:c=0", "artbp:c=1", "artbp:c=1.5", "artbp:c=-0.2", "artbp:c=0.5,min=0",
                                  "artbp"])
def test_bad_probabilities_are_usage_errors(spec, capsys):
    with pytest.raises(UsageError):
        parse_method(spec)
    assert main(["explain", spec, "--seq-len", "8"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# -- seeded draws ---------------------------------------------------------------------------------


def test_seeds_give_independent_draws_and_reruns_are_identical() -> None:
    from tbptt_bench.analysis.gradients import method_gradient

    model = tiny_model()
    batch = token_batch(T=16)
    grads = {s: method_gradient(model, batch, "artbp:c=0.4", "cross_entropy", seed=s) for s in (0, 1, 2)}
    again = method_gradient(model, batch, "artbp:c=0.4", "cross_entropy", seed=0)
    assert all(torch.equal(grads[0][n], again[n]) for n in again)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert any(not torch.equal(grads[a][n], grads[b][n]) for n in again), (a, b)


def test_bias_batches_draw_their_own_cuts() -> None:
    """Within one bias measurement every batch draws its own cut points (independent replicates)."""
    from tbptt_bench.analysis.bias import method_estimates

    model = tiny_model()
    batch = token_batch(T=16)
    spec = parse_method("artbp:c=0.4")
    a = method_estimates(model, batch, "cross_entropy", [spec], None, seed=1)[spec]
    b = method_estimates(model, batch, "cross_entropy", [spec], None, seed=2)[spec]
    assert any(not torch.equal(a[n], b[n]) for n in a)
