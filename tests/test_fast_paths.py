"""The engine's fast paths compute exactly what the slow, obvious computations do (float64).

* tbptt(k1 < k2) at fixed θ reuses the graphs of overlapping windows (each segment forwarded once);
  once θ moves it recomputes every window from the stored state — tested against hand-written loops
  (benchmarks/baselines.py) and the brute-force per-loss reference;
* activation checkpointing (``full:checkpoint=C``) gives the exact gradient, in estimates and in training;
* the compiled per-step cell gives the eager cell's numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from reference import masked_reference

from tbptt_bench.core.engine import Engine, _later_minimum
from tbptt_bench.analysis.gradients import method_gradient, true_gradient
from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.tasks.base import Batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import baselines

V = 5


def token_batch(B=3, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g),
                 (torch.rand(B, T, generator=g) > 0.2).to(torch.float64))


def make_model(cell="lstm", H=4, path="fused", seed=0):
    torch.manual_seed(seed)
    model = RecurrentNet(cell, "tokens", V, V, H, 1, path).double()
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(3.0)  # long lags matter
    return model


def recorder(model, lr, through_data=False):
    """A step() that records each update's gradient, then (lr > 0) takes an SGD step and clears.

    ``through_data``: update ``p.data`` in place, which does not bump the version counter.
    """
    grads = []

    def step():
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        if lr:
            with torch.no_grad():
                for p in model.parameters():
                    (p.data if through_data else p).sub_(lr * p.grad)
        model.zero_grad(set_to_none=True)

    return grads, step


def engine_updates(model, batch, spec, lr, fixed_params=None, through_data=False):
    grads, step = recorder(model, lr, through_data)
    method = parse_method(spec)
    Engine(model, "cross_entropy", checkpoint=method.checkpoint).run(
        batch, method.updates(batch.length), model.initial_state(batch.batch_size), lambda i, u, loss: step(),
        fixed_params=fixed_params)
    return grads


def max_diff(a, b):
    assert len(a) == len(b)
    return max(float((x[n] - y[n]).abs().max()) for x, y in zip(a, b) for n in x)


def test_later_minimum():
    values = [5, 3, 8, 1, 9, 2]
    assert _later_minimum(values) == [min(values[i + 1 :], default=10**18) for i in range(len(values))]


def count_core_calls(model):
    calls = []
    core = model.core

    def counted(inputs, state):
        calls.append(inputs.shape[1])
        return core(inputs, state)

    model.core = counted
    return calls


def test_fixed_theta_forwards_each_segment_once_and_is_exact():
    model, batch = make_model("lstm"), token_batch(T=14)
    calls = count_core_calls(model)
    spec = "tbptt:k1=2,k2=6"
    est = method_gradient(model, batch, spec, "cross_entropy")
    assert calls == [2] * 7  # each 2-step segment forwarded once, graphs of later windows reused
    ref = masked_reference(model, batch, mask_matrix(parse_method(spec).updates(14), 14), "cross_entropy")
    for k in ref:
        torch.testing.assert_close(est[k], ref[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fixed_params", [None, True])
def test_moving_theta_recomputes_windows(fixed_params):
    model, batch = make_model("lstm"), token_batch(T=32)
    calls = count_core_calls(model)
    engine_updates(model, batch, "tbptt:k1=4,k2=16", lr=0.1, fixed_params=fixed_params)
    # update u recomputes [max(0, u-16), u) as 4-step calls: 1+2+3+4 for the first four, then 4 each
    # (with fixed_params=True the first update keeps its segment, the second finds it stale)
    assert sum(calls) == 4 * (1 + 2 + 3 + 4 + 4 * 4)


def test_callback_with_fixed_params_reuses_graphs_and_gives_per_update_gradients():
    batch = token_batch(T=24)
    model = make_model()
    calls = count_core_calls(model)
    fast = engine_updates(model, batch, "tbptt:k1=4,k2=12", lr=0.0, fixed_params=True)
    assert calls == [4] * 6
    slow = engine_updates(make_model(), batch, "tbptt:k1=4,k2=12", lr=0.0, fixed_params=False)
    assert max_diff(fast, slow) < 1e-12


@pytest.mark.parametrize("fixed_params, through_data", [(True, False), (None, True)])
def test_parameter_changes_are_never_missed(fixed_params, through_data):
    """An optimiser step under fixed_params=True is seen (version counter); p.data steps are safe by default."""
    batch = token_batch(T=24)
    engine = engine_updates(make_model(), batch, "tbptt:k1=4,k2=12", lr=0.1, fixed_params=fixed_params,
                            through_data=through_data)
    model = make_model()
    hand, step = recorder(model, 0.1)
    baselines.tbptt_recompute(model, batch, 4, 12, step)
    assert max_diff(engine, hand) < 1e-12


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("k1, k2", [(4, 12), (2, 8), (4, 4)])
def test_training_equals_hand_written_recompute(cell, k1, k2):
    batch = token_batch(T=24)
    engine = engine_updates(make_model(cell), batch, f"tbptt:k1={k1},k2={k2}", lr=0.1)
    model = make_model(cell)
    hand, step = recorder(model, 0.1)
    baselines.tbptt_recompute(model, batch, k1, k2, step)
    assert max_diff(engine, hand) < 1e-12


def test_hand_written_alternatives_give_the_engines_gradient_at_fixed_theta():
    batch = token_batch(T=24)
    engine = engine_updates(make_model(), batch, "tbptt:k1=4,k2=12", lr=0.0)
    for alternative in (baselines.tbptt_recompute, baselines.tbptt_one_call, baselines.tbptt_keep_graphs,
                        baselines.tbptt_per_step):
        model = make_model()
        grads, step = recorder(model, 0.0)
        alternative(model, batch, 4, 12, step)
        assert max_diff(engine, grads) < 1e-12, alternative.__name__


def test_only_recompute_keeps_the_engines_gradient_once_theta_moves():
    batch = token_batch(T=24)
    engine = engine_updates(make_model(), batch, "tbptt:k1=4,k2=12", lr=0.1)
    for alternative, same in ((baselines.tbptt_recompute, True), (baselines.tbptt_one_call, False),
                              (baselines.tbptt_keep_graphs, False)):
        model = make_model()
        grads, step = recorder(model, 0.1)
        alternative(model, batch, 4, 12, step)
        assert (max_diff(engine, grads) < 1e-12) == same, alternative.__name__


@pytest.mark.parametrize("spec, hand", [("chunked:k=8", lambda m, b, s: baselines.chunked(m, b, 8, s)),
                                        ("full", baselines.full),
                                        ("full", lambda m, b, s: baselines.full_split(m, b, 5, s))])
def test_overhead_baselines_compute_the_engines_updates(spec, hand):
    batch = token_batch(T=24)
    engine = engine_updates(make_model(), batch, spec, lr=0.1)
    model = make_model()
    grads, step = recorder(model, 0.1)
    hand(model, batch, step)
    assert max_diff(engine, grads) < 1e-12


@pytest.mark.parametrize("spec", ["full", "chunked:k=7", "tbptt:k1=4,k2=10", "tbptt:k1=6,k2=3", "sliding:k=5"])
def test_split_fused_calls_are_the_same_math(spec):
    """Calls cut into pieces of at most 3 steps (the CPU default is 64) against the brute-force reference."""
    model, batch = make_model("gru"), token_batch(T=13)
    method = parse_method(spec)
    Engine(model, "cross_entropy", max_fused_steps=3).run(batch, method.updates(13), model.initial_state(3))
    est = {n: p.grad for n, p in model.named_parameters()}
    ref = masked_reference(model, batch, mask_matrix(method.updates(13), 13), "cross_entropy")
    for k in ref:
        torch.testing.assert_close(est[k], ref[k], rtol=1e-10, atol=1e-12)


def test_fused_call_length_defaults():
    model = make_model()
    assert Engine(model, "cross_entropy").max_fused_steps == 64
    calls = count_core_calls(model)
    batch = token_batch(T=150)
    Engine(model, "cross_entropy").run(batch, parse_method("full").updates(150), model.initial_state(3))
    assert calls == [64, 64, 22]


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("checkpoint", [1, 7, 50])
def test_checkpointed_gradient_equals_exact(cell, checkpoint):
    model, batch = make_model(cell), token_batch(T=20)
    exact = true_gradient(model, batch, "cross_entropy")
    ckpt = method_gradient(model, batch, f"full:checkpoint={checkpoint}", "cross_entropy")
    for k in exact:
        torch.testing.assert_close(ckpt[k], exact[k], rtol=1e-12, atol=1e-14)


def test_checkpointed_training_equals_exact_training():
    batches = [token_batch(T=20, seed=s) for s in range(3)]
    runs = []
    for spec in ("full", "full:checkpoint=4"):
        model = make_model("lstm")
        runs.append([g for b in batches for g in engine_updates(model, b, spec, lr=0.1)])
    assert max_diff(*runs) < 1e-12


def test_compiled_cell_flag_is_off_by_default():
    model = make_model(path="cell")
    assert model._compiled_step is None


@pytest.mark.slow
def test_compiled_cell_matches_eager_cell():
    batch = token_batch(T=12)
    eager, compiled = make_model(path="cell"), make_model(path="cell")
    compiled.compile_cell()
    for spec in ("full", "tbptt:k1=3,k2=6"):
        a = method_gradient(eager, batch, spec, "cross_entropy")
        b = method_gradient(compiled, batch, spec, "cross_entropy")
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)
