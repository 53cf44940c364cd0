"""Memory-augmented models ``xl``, ``sab``, ``sab-cut`` and model-declared cut sets (docs/design.md §7.1, §7.2).

Independent checks, float64: full gradients against central finite differences; ``xl`` and ``sab-cut``
(whole state cut) against the brute-force masked reference; ``sab`` (memory crosses the cut) against
finite differences of the surrogate loss in which (h, c) at every cut boundary are frozen at their
trajectory values while the memory is recomputed — exactly the contributions §7.1 keeps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbptt_bench.analysis.gradients import method_gradient, true_gradient
from tbptt_bench.analysis.kcurve import kcurve_gradients
from tbptt_bench.cli import main
from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.core.engine import Engine
from tbptt_bench.core.lags import lag_decomposition
from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.attention import SegmentAttention, SparseAttentiveLSTM
from tbptt_bench.tasks.base import Batch

from reference import finite_difference, masked_reference, step_losses


def token_batch(B=2, T=9, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    return Batch(x, y, torch.ones(B, T, dtype=torch.float64))


def xl(H=4, heads=2, memory=3, layers=1, seed=0):
    torch.manual_seed(seed)
    model = SegmentAttention("tokens", 5, 5, H, layers, heads, memory).double()
    with torch.no_grad():  # non-zero offset biases so that every parameter matters
        for layer in model.layers:
            layer.offset_bias.normal_()
    return model


def sab(H=3, mem=3, katt=2, ktop=2, cut=False, seed=0):
    torch.manual_seed(seed)
    model = SparseAttentiveLSTM("tokens", 5, 5, H, mem=mem, katt=katt, ktop=ktop, cut_memory=cut).double()
    with torch.no_grad():  # larger attention weights so that the memory path carries real gradient
        for lin in (model.query, model.key, model.value):
            lin.weight.mul_(3.0)
    return model


def assert_close(a, b, tol=1e-10):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


def frozen_cut_fd(model, batch, cuts, eps=1e-6):
    """Central differences of L̃(θ): (h, c) at the boundaries ``cuts`` replaced by their values at θ₀."""
    B = batch.batch_size
    frozen = {}

    def loss(record: bool) -> float:
        state, outs, a = model.initial_state(B), [], 0
        for b in [*sorted(cuts), batch.length]:
            out, state = model(batch.inputs[:, a:b], state)
            outs.append(out)
            if record:
                frozen[b] = (state[0].clone(), state[1].clone())
            state = (*frozen[b], *state[2:])
            a = b
        return float(step_losses(torch.cat(outs, 1), batch.targets, batch.weights, "cross_entropy").sum())

    grads = {}
    with torch.no_grad():
        loss(True)
        for n, p in model.named_parameters():
            g, flat = torch.zeros_like(p), p.view(-1)
            for i in range(flat.numel()):
                orig = flat[i].item()
                flat[i] = orig + eps
                up = loss(False)
                flat[i] = orig - eps
                down = loss(False)
                flat[i] = orig
                g.view(-1)[i] = (up - down) / (2 * eps)
            grads[n] = g
    return grads


# -- full gradients ---------------------------------------------------------------------------


@pytest.mark.parametrize("build", [lambda: xl(layers=2), lambda: sab(), lambda: sab(cut=True)], ids=["xl", "sab", "sab-cut"])
def test_full_gradient_equals_finite_differences(build):
    model = build()
    batch = token_batch(T=7)
    assert_close(true_gradient(model, batch, "cross_entropy"), finite_difference(model, batch, "cross_entropy"), tol=1e-7)


# -- whole-state cuts: the plain mask -------------------------------------------------------------

SPECS = ["full", "full:checkpoint=2", "chunked:k=1", "chunked:k=3", "tbptt:k1=2,k2=5", "tbptt:k1=4,k2=2",
         "sliding:k=3", "hybrid:k1=2,k2=2,every=2,long=0"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("build", [lambda: xl(), lambda: sab(cut=True)], ids=["xl", "sab-cut"])
def test_whole_state_cut_equals_masked_reference(build, spec):
    model = build()
    batch = token_batch(T=9)
    method = parse_method(spec)
    est = method_gradient(model, batch, method, "cross_entropy")
    ref = masked_reference(model, batch, mask_matrix(method.updates(9), 9), "cross_entropy")
    assert_close(est, ref)


# -- memory across the cut (§7.1) ------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["chunked:k=1", "chunked:k=2", "chunked:k=4", "tbptt:k1=3,k2=3"])
def test_sab_keeps_memory_contributions_across_the_cut(spec):
    model = sab()
    batch = token_batch(T=9)
    updates = parse_method(spec).updates(9)
    est = method_gradient(model, batch, spec, "cross_entropy")
    cuts = {u.loss_start for u in updates} - {0}
    assert_close(est, frozen_cut_fd(model, batch, cuts), tol=1e-7)
    # it is neither the plain-truncation mask nor the full gradient
    plain = masked_reference(model, batch, mask_matrix(updates, 9), "cross_entropy")
    full = true_gradient(model, batch, "cross_entropy")
    gap = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a)  # noqa: E731
    assert gap(est, plain) > 1e-4 and gap(est, full) > 1e-4


def test_sab_chunk_as_long_as_the_sequence_is_full_bptt():
    model = sab()
    batch = token_batch(T=8)
    assert_close(method_gradient(model, batch, "chunked:k=8", "cross_entropy"), true_gradient(model, batch, "cross_entropy"))


def crosscut_fd(model, batch, updates, keep=(2,), eps=1e-6):
    """Central differences of Σ_t ℓ̃_t, the definition of docs/design.md §7.1 for any update list.

    Loss t of update u with window start w = u.start_for(t) is computed by a step-by-step forward in
    which the state at each position p is replaced by s₀ + f·(s − s₀) per part (s₀ its value at θ₀):
    for p > w, f is u's scale at p (1 if none), on every part; for p ≤ w, f is the scale of the update
    whose losses straddle p, and undeclared parts get f = 0 where p is a window start of any loss.
    A loss with an empty window (w > t) sees θ only through the read-out.
    """
    B, T = batch.batch_size, batch.length
    cuts = {u.start_for(t) for u in updates for t in range(u.loss_start, u.loss_end) if 0 < u.start_for(t) <= t}
    owner = {p: f for u in updates for p, f in u.scales if u.loss_start < p < u.loss_end}
    s0, feats0 = [model.initial_state(B)], []
    with torch.no_grad():
        for s in range(T):
            f, st = model.core(batch.inputs[:, s : s + 1], s0[-1])
            s0.append(st)
            feats0.append(f)

    def ell(out, s):
        return float(step_losses(out, batch.targets[:, s : s + 1], batch.weights[:, s : s + 1], "cross_entropy").sum())

    def group_loss(u, t):
        w = u.start_for(t)
        if w > t:
            return ell(model.readout(feats0[t]), t)
        state, scales = model.initial_state(B), dict(u.scales)
        for s in range(t + 1):
            if s > w:
                f_all, frozen = scales.get(s, 1.0), False
            else:
                f_all, frozen = owner.get(s, 1.0), s in cuts
            state = tuple(ref + (0.0 if frozen and i not in keep else f_all) * (x - ref)
                          for i, (x, ref) in enumerate(zip(state, s0[s])))
            out, state = model(batch.inputs[:, s : s + 1], state)
        return ell(out, t)

    def total():
        return sum(group_loss(u, t) for u in updates for t in range(u.loss_start, u.loss_end))

    grads = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            g, flat = torch.zeros_like(p), p.view(-1)
            for i in range(flat.numel()):
                orig = flat[i].item()
                flat[i] = orig + eps
                up = total()
                flat[i] = orig - eps
                down = total()
                flat[i] = orig
                g.view(-1)[i] = (up - down) / (2 * eps)
            grads[n] = g
    return grads


def engine_gradient(model, batch, updates, force=False):
    model.zero_grad()
    engine = Engine(model, "cross_entropy")
    engine.force_crosscut = force
    engine.run(batch, updates, model.initial_state(batch.batch_size))
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


CROSSCUT_SPECS = ["tbptt:k1=2,k2=4", "tbptt:k1=3,k2=5", "tbptt:k1=4,k2=2", "sliding:k=3",
                  "hybrid:k1=2,k2=2,every=2,long=0", "hybrid:k1=3,k2=3,every=2,long=5", "artbp:c=0.5,min=1"]


@pytest.mark.parametrize("spec", CROSSCUT_SPECS)
def test_sab_under_every_family_equals_finite_differences_of_the_cut_loss(spec):
    """Overlapping and per-loss windows, windows after the losses, long updates and ARTBP scales (§7.1)."""
    model, T = sab(), 8
    batch = token_batch(T=T)
    updates = parse_method(spec).updates(T, rng=np.random.default_rng(3)) if spec.startswith("artbp") \
        else parse_method(spec).updates(T)
    est = engine_gradient(model, batch, updates)
    assert_close(est, crosscut_fd(model, batch, updates), tol=1e-7)
    plain = masked_reference(model, batch, mask_matrix(updates, T), "cross_entropy")
    assert max(float((est[k] - plain[k]).abs().max()) for k in est) > 1e-4  # the memory paths count


def test_crosscut_reference_reduces_to_the_chunked_definition():
    """The general definition and the frozen-at-cuts loss agree on chunks (two independent references)."""
    model, batch = sab(), token_batch(T=8)
    updates = parse_method("chunked:k=3").updates(8)
    assert_close(crosscut_fd(model, batch, updates), frozen_cut_fd(model, batch, {3, 6}), tol=1e-8)


@pytest.mark.parametrize("spec", ["chunked:k=1", "chunked:k=3", "full"])
def test_general_crosscut_path_equals_the_chunk_path(spec):
    model, batch = sab(), token_batch(T=9)
    updates = parse_method(spec).updates(9)
    assert_close(engine_gradient(model, batch, updates, force=True), engine_gradient(model, batch, updates), tol=1e-12)


def test_sab_cut_memory_under_overlapping_windows_is_the_plain_mask():
    """With nothing declared the general definition is §2.4's mask (sab-cut runs the ordinary engine)."""
    model, batch = sab(cut=True), token_batch(T=8)
    updates = parse_method("tbptt:k1=2,k2=4").updates(8)
    assert_close(crosscut_fd(model, batch, updates, keep=()),
                 masked_reference(model, batch, mask_matrix(updates, 8), "cross_entropy"), tol=1e-7)


def test_sab_refused_by_lag_analysis_and_kcurve_falls_back():
    model, batch = sab(), token_batch(T=8)
    with pytest.raises(UsageError, match="--max-lag 0"):
        lag_decomposition(model, batch, "cross_entropy", 3)
    assert kcurve_gradients(model, batch, "cross_entropy", ["chunked:k=2", "chunked:k=4"]) == {}
    assert kcurve_gradients(sab(cut=True), batch, "cross_entropy", ["chunked:k=2", "chunked:k=4"])


@pytest.mark.parametrize("spec", ["chunked:k=3", "tbptt:k1=2,k2=5", "sliding:k=3", "hybrid:k1=2,k2=2,every=2,long=0"])
def test_sab_trains_across_optimiser_steps(spec):
    """A kept memory graph stays usable after in-place optimiser steps (θ copied per call)."""
    model = sab().float()
    batch = token_batch(T=12)
    batch = Batch(batch.inputs, batch.targets, batch.weights.float())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(i, u, loss):
        opt.step()
        opt.zero_grad()

    before = [p.detach().clone() for p in model.parameters()]
    res = Engine(model, "cross_entropy").run(batch, parse_method(spec).updates(12), model.initial_state(2), step)
    assert len(res.update_losses) == len(parse_method(spec).updates(12)) and bool(res.update_losses.isfinite().all())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- forward invariance and the memory bound -----------------------------------------------------------


def chunked_forward(model, inputs, sizes):
    state, outs, a = model.initial_state(inputs.shape[0]), [], 0
    for n in sizes:
        out, state = model(inputs[:, a : a + n], state)
        outs.append(out)
        a += n
    return torch.cat(outs, 1), state


@pytest.mark.parametrize("build", [lambda: xl(memory=5, layers=2), lambda: sab()], ids=["xl", "sab"])
def test_outputs_do_not_depend_on_chunking(build):
    model = build()
    inputs = token_batch(T=70).inputs  # > XL_PIECE: xl's internal pieces exercised too
    whole, s_whole = chunked_forward(model, inputs, [70])
    for sizes in ([1] * 70, [3, 7, 60], [65, 5]):
        out, s = chunked_forward(model, inputs, sizes)
        torch.testing.assert_close(out, whole, rtol=1e-12, atol=1e-12)
        for a, b in zip(s if isinstance(s, tuple) else (s,), s_whole if isinstance(s_whole, tuple) else (s_whole,)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("build", [lambda: xl(), lambda: sab(), lambda: sab(cut=True)], ids=["xl", "sab", "sab-cut"])
def test_engine_final_state_identical_under_every_method(build):
    model = build()
    batch = token_batch(T=9)
    specs = ["full", "chunked:k=2", "tbptt:k1=3,k2=3", "tbptt:k1=2,k2=5", "tbptt:k1=4,k2=1", "sliding:k=3",
             "hybrid:k1=2,k2=2,every=2,long=0"]
    _, expect = model(batch.inputs, model.initial_state(2))
    for spec in specs:
        res = Engine(model, "cross_entropy").run(batch, parse_method(spec).updates(9), model.initial_state(2))
        model.zero_grad()
        for a, b in zip(res.final_state if isinstance(res.final_state, tuple) else (res.final_state,),
                        expect if isinstance(expect, tuple) else (expect,)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_sab_memory_holds_the_last_mem_stored_states():
    model = sab(mem=3, katt=2)
    batch = token_batch(T=11)
    h0 = model.initial_state(2)
    features, state = model.core(batch.inputs, h0)
    stored = [p for p in range(11) if (p + 1) % 2 == 0][-3:]  # positions 1, 3, 5, 7, 9 stored; last 3 kept
    assert state[2].shape == (3, 2, 3)
    torch.testing.assert_close(state[2], features[:, stored].transpose(0, 1))
    assert state[3].sum().item() == 6.0 and state[4][0].tolist() == [11.0, 11.0]
    _, early = model.core(batch.inputs[:, :3], h0)  # one store so far: one valid slot, the newest
    assert early[3][:, 0].tolist() == [0.0, 0.0, 1.0]


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, params, match", [
    ("sab", {"ktop": 4, "mem": 3}, "ktop=4 exceeds"),
    ("sab", {"mem": 0}, "mem must be"),
    ("sab", {"katt": 0}, "katt must be"),
    ("sab-cut", {"ktop": 0}, "ktop must be"),
    ("xl", {"memory": 0}, "memory must be"),
    ("xl", {"heads": 3}, "multiple of heads"),
    ("xl", {"window": 3}, "does not accept"),
])
def test_bad_model_parameters_are_usage_errors(name, params, match):
    with pytest.raises(UsageError, match=match):
        make_model(name, make_task("copy"), 8, model_params=params)


def test_cli_bad_model_parameter_exits_2(capsys):
    code = main(["grad", "--task", "copy", "--model", "sab", "--model-param", "ktop=9", "--seq-len", "24",
                 "--batch", "2", "--hidden", "4", "--method", "chunked:k=4"])
    assert code == 2
    assert "ktop=9 exceeds" in capsys.readouterr().err


def test_cli_grad_runs_sab_with_model_params(capsys):
    code = main(["grad", "--task", "copy", "--model", "sab", "--model-param", "mem=4", "--model-param", "ktop=2",
                 "--seq-len", "24", "--batch", "2", "--hidden", "4", "--method", "chunked:k=4", "--dtype", "float64",
                 "--json"])
    assert code == 0
    assert '"relative_error"' in capsys.readouterr().out


def test_adaptive_and_forward_mode_refuse_sab_in_one_line():
    """Families that need a lag profile or the cell equations say so instead of failing deeper down."""
    with pytest.raises(UsageError, match="adaptive chooses K from the lag profile"):
        method_gradient(sab(), token_batch(T=8), "adaptive:delta=0.1,kmin=2,kmax=4,every=2", "cross_entropy")
    with pytest.raises(UsageError, match="forward-mode method runs the built-in"):
        method_gradient(sab(), token_batch(T=8), "rtrl", "cross_entropy")
