"""The exact expectation over a random method's draws, and the asv bias figures built on it.

Checked against brute force: Σ over every cut set of P(cuts)·mask(cuts) for the expected mask, and the
engine's ĝ averaged over every cut set for E ĝ. Then what asv relies on: a change that only reorders the
random draws moves no tracked figure, and a weakened compensation shows at every measurement seed.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tbptt_bench.methods.randomised as randomised
from tbptt_bench.analysis.bias import analyse_bias
from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient
from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.core.mask import Update, mask_matrix
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import expectation_updates, parse_method
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.tasks.base import Batch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def all_cut_sets(length: int):
    for r in range(length):
        yield from itertools.combinations(range(1, length), r)


@pytest.mark.parametrize(("length", "c", "min_len"), [(7, 0.3, 1), (8, 0.5, 2), (9, 0.7, 3), (6, 0.9, 5)])
def test_expected_mask_is_the_probability_weighted_sum_over_every_cut_set(length, c, min_len):
    brute = sum(randomised.cuts_probability(length, cuts, c, min_len)
                * mask_matrix(randomised.artbp_updates(length, cuts, c, min_len), length)
                for cuts in all_cut_sets(length))
    np.testing.assert_allclose(randomised.expected_mask(length, c, min_len), brute, rtol=0, atol=1e-14)


def test_cut_marginals_match_enumeration():
    length, c, min_len = 9, 0.4, 2
    brute = np.zeros(length)
    brute[0] = 1.0
    for cuts in all_cut_sets(length):
        for a in cuts:
            brute[a] += randomised.cuts_probability(length, cuts, c, min_len)
    np.testing.assert_allclose(randomised.cut_marginals(length, c, min_len), brute, atol=1e-14)


def tiny(cell: str = "gru") -> tuple[RecurrentNet, Batch]:
    torch.manual_seed(1)
    model = RecurrentNet(cell, "tokens", 4, 4, 3, 1).double()
    g = torch.Generator().manual_seed(2)
    batch = Batch(torch.randint(0, 4, (2, 7), generator=g), torch.randint(0, 4, (2, 7), generator=g),
                  torch.ones(2, 7, dtype=torch.float64))
    return model, batch


def weakened_updates(length, cuts, c, min_len, original=randomised.artbp_updates):
    """ARTBP with the compensation weakened from 1/(1 − c) to 1/(1 − 0.9c): biased."""
    return [Update(u.loss_start, u.loss_end, u.window_start, u.max_lag,
                   tuple((p, 1.0 / (1.0 - 0.9 * c)) for p, _ in u.scales))
            for u in original(length, cuts, c, min_len)]


@pytest.mark.parametrize("weaken", [False, True])
def test_exact_expected_gradient_is_the_average_over_every_draw(weaken, monkeypatch):
    """E ĝ from the expected mask = Σ_cuts P(cuts) ĝ(cuts) through the engine; = g exactly when compensated."""
    if weaken:
        monkeypatch.setattr(randomised, "artbp_updates", weakened_updates)
    model, batch = tiny()
    method = parse_method("artbp:c=0.4,min=2")
    from tbptt_bench.core.engine import Engine

    brute = torch.zeros(())
    for cuts in all_cut_sets(7):
        model.zero_grad(set_to_none=True)
        Engine(model, "cross_entropy").run(batch, randomised.artbp_updates(7, cuts, 0.4, 2), model.initial_state(2))
        brute = brute + randomised.cuts_probability(7, cuts, 0.4, 2) * flatten(
            {n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    exact = flatten(method_gradient(model, batch, method, "cross_entropy", expectation=True))
    truth = flatten(true_gradient(model, batch, "cross_entropy"))
    torch.testing.assert_close(exact, brute, rtol=1e-12, atol=1e-13)
    gap = float(torch.linalg.vector_norm(exact - truth) / torch.linalg.vector_norm(truth))
    assert (gap > 1e-3) if weaken else (gap < 1e-13), gap


def test_expectation_updates_realise_any_positive_mask():
    rng = np.random.default_rng(0)
    m = np.tril(rng.uniform(0.2, 2.0, (6, 6)))
    np.fill_diagonal(m, 1.0)
    np.testing.assert_allclose(mask_matrix(expectation_updates(m), 6), m, rtol=1e-13)
    with pytest.raises(UsageError, match="positive on and below"):
        expectation_updates(np.tril(np.ones((3, 3))) - np.eye(3) * 0.5)


def test_no_exact_expectation_is_a_usage_error():
    model, batch = tiny("rnn")
    with pytest.raises(UsageError, match="no exact expectation"):
        method_gradient(model, batch, parse_method("uoro"), "cross_entropy", expectation=True)


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_artbp_exact_bias_is_zero_at_any_data_and_weakened_is_nonzero_at_every_seed(seed, monkeypatch):
    task = make_task("copy")
    model = make_model("lstm", task, 8, seed=seed, dtype="float64")
    spec = "artbp:c=0.2,min=2"
    kwargs = dict(seq_len=24, batch_size=3, n_batches=4, seed=seed, n_flips=0, max_lag=0, with_provenance=False,
                  expectation="exact")
    row = analyse_bias(task, model, [spec], **kwargs).table.query("group == 'all'").iloc[0]
    assert row["exact_relative_bias"] <= 1e-12 and row["exact_relative_error_max"] <= 1e-12
    monkeypatch.setattr(randomised, "artbp_updates", weakened_updates)
    broken = analyse_bias(task, model, [spec], **kwargs).table.query("group == 'all'").iloc[0]
    assert broken["exact_relative_bias"] > 1e-4


def reversed_draws(length, c, min_len, rng):
    """The same cut distribution, drawn differently: all uniforms first, consumed from the end."""
    u = rng.random(length)[::-1]
    cuts, last = [], 0
    for p in range(1, length):
        if p - last >= min_len and u[p] < c:
            cuts.append(p)
            last = p
    return cuts


@pytest.fixture
def gradient_bias(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("asv_bench.gradient_bias", None)
    from asv_bench import gradient_bias as module

    yield module
    sys.modules.pop("asv_bench.gradient_bias", None)


def test_reordering_draws_changes_the_draws_but_not_the_exact_figures(monkeypatch):
    task = make_task("copy")
    model = make_model("lstm", task, 8, seed=0, dtype="float64")
    specs = ["artbp:c=0.2,min=2", "artbp:c=0.5", "chunked:k=4"]
    kwargs = dict(seq_len=24, batch_size=3, n_batches=4, seed=3, n_flips=0, max_lag=0, with_provenance=False,
                  expectation="exact")
    before = analyse_bias(task, model, specs, **kwargs).table
    monkeypatch.setattr(randomised, "sample_cuts", reversed_draws)
    after = analyse_bias(task, model, specs, **kwargs).table
    assert not np.allclose(before["relative_bias_plugin"], after["relative_bias_plugin"])  # the draws did change
    np.testing.assert_allclose(after["exact_relative_bias"], before["exact_relative_bias"], rtol=1e-12, atol=1e-15)


@pytest.mark.slow  # ~2-8 min: 64 batches per cell, the weakened expectation needs one update per loss
def test_asv_reordering_draws_moves_no_tracked_figure_and_weakening_is_flagged(gradient_bias, monkeypatch):
    before = {seed: gradient_bias.bias_figures("copy", "artbp", seed=seed) for seed in (0, 1)}
    monkeypatch.setattr(randomised, "sample_cuts", reversed_draws)
    after = {seed: gradient_bias.bias_figures("copy", "artbp", seed=seed) for seed in (0, 1)}
    for seed in before:
        assert after[seed]["relative_bias"] == pytest.approx(before[seed]["relative_bias"], abs=1e-15)
        assert before[seed]["relative_bias"] < 1e-12
    monkeypatch.setattr(randomised, "artbp_updates", weakened_updates)
    for seed in (0, 1):
        assert gradient_bias.bias_figures("copy", "artbp", seed=seed)["relative_bias"] > 1e-4


def test_cli_prints_the_exact_expectation_as_its_own_json_field(capsys):
    import json

    from tbptt_bench.cli import main

    argv = ["bias", "--task", "copy", "--model", "rnn", "--method", "artbp:c=0.3,min=2,chunked:k=4", "--seq-len", "24",
            "--batch", "2", "--hidden", "4", "--batches", "4", "--dtype", "float64", "--flips", "0", "--max-lag", "8",
            "--expectation", "exact", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    exact = {r["spec"]: r for r in out["exact"] if r["group"] == "all"}
    assert exact["artbp:c=0.3,min=2"]["exact_relative_bias"] < 1e-12
    chunked = [r for r in out["rows"] if r["spec"] == "chunked:k=4" and r["group"] == "all"][0]
    assert exact["chunked:k=4"]["exact_relative_bias"] == chunked["relative_bias_plugin"]  # deterministic: ĝ itself
    assert exact["chunked:k=4"]["extrapolation_ratio"] == pytest.approx(
        chunked["extrapolation"] / chunked["exact_relative_bias"])
    assert out["meta"]["expectation"] == "exact"
    assert main(argv[:-1]) == 0
    text = capsys.readouterr().out
    assert "ext/exact" in text and "Checked: only whether the lag norms decay geometrically" in text


def test_bad_expectation_option_is_a_usage_error():
    task = make_task("copy")
    model = make_model("rnn", task, 4, seed=0, dtype="float64")
    with pytest.raises(UsageError, match="expectation must be one of sampled, exact"):
        analyse_bias(task, model, ["chunked:k=2"], seq_len=24, batch_size=2, n_batches=2, seed=0, expectation="mean")
    with pytest.raises(UsageError, match="probes=0"):
        analyse_bias(task, model, ["chunked:k=2"], seq_len=24, batch_size=2, n_batches=2, seed=0, expectation="exact",
                     probes=4)


@pytest.mark.parametrize("model_name", ["rnn", "lstm"])
def test_every_family_that_draws_random_numbers_says_so(model_name, gradient_bias):
    """At frozen θ and data, two draw seeds give the same estimate exactly when the family declares itself
    deterministic: the exact columns and asv's draw-free figures rest on that declaration."""
    from asv_bench import grid

    task = make_task("copy")
    model = make_model(model_name, task, 6, seed=0, dtype="float64")
    batch = task.sample(2, 24, torch.Generator().manual_seed(0), "valid")
    checked = 0
    for family in grid.METHODS.names():
        try:
            m = parse_method(grid.representative_spec(family, 24))
            a, b = (flatten(method_gradient(model, batch, m, task.loss_kind, seed=s)) for s in (1, 2))
        except UsageError:  # a family defined for other models only, or one that needs parameters listed
            continue
        assert torch.equal(a, b) == m.deterministic, (family, m.spec)
        checked += 1
    assert checked >= 8


def test_asv_tracks_uoro_by_its_test_and_rtrl_by_its_exact_bias(gradient_bias, monkeypatch):
    """UORO has no exact expectation: only its 0/1 test is tracked, never a figure that moves with its draws;
    RTRL is deterministic and exact, so its tracked bias is ~0."""
    monkeypatch.setattr(gradient_bias, "N_BATCHES", 8)
    uoro = gradient_bias.bias_figures("copy", "uoro")
    assert uoro["bias_detected"] in (0.0, 1.0)
    assert np.isnan(uoro["relative_bias"]) and np.isnan(uoro["one_minus_cosine"])
    rtrl = gradient_bias.bias_figures("copy", "rtrl")
    assert rtrl["relative_bias"] < 1e-12 and np.isnan(rtrl["bias_detected"])
