"""Online (forward-mode) estimators: rtrl, snap, uoro, rflo (docs/design.md §7.3).

Checks against independent computations: full BPTT through the engine and per-loss autograd for RTRL;
a tanh RNN written out with closed-form Jacobians (no autograd) for SnAp's pattern and recursion,
RFLO's trace and UORO's rank-one recursion; exact enumeration of UORO's signs for its mean (zero
bias, exactly) and its variance; Monte Carlo over seeded draws for the library's sampling.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats

from tbptt_bench.analysis.bias import measure_bias
from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient
from tbptt_bench.analysis.online import alignment_matrix
from tbptt_bench.cli import main
from tbptt_bench.core.forward_mode import CellFunction, run_forward_mode, structural_pattern
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.seeding import derive_seed
from tbptt_bench.tasks.base import Batch

from reference import step_losses
from test_engine import make_model, real_batch, token_batch

CELLS = ["rnn", "lstm", "gru"]


# -- RTRL against BPTT --------------------------------------------------------------------------


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_rtrl_equals_full_bptt(cell: str, layers: int) -> None:
    model = make_model(cell, layers=layers)
    batch = token_batch(B=2, T=7)
    est = flatten(method_gradient(model, batch, "rtrl", "cross_entropy"))
    true = flatten(true_gradient(model, batch, "cross_entropy"))
    torch.testing.assert_close(est, true, rtol=1e-10, atol=1e-10)


def test_rtrl_equals_full_bptt_real_inputs_from_a_carried_state() -> None:
    model = make_model("lstm", kind="real")
    batch = real_batch(B=3, T=6)
    g = torch.Generator().manual_seed(3)
    state = tuple(torch.randn(1, 3, 4, generator=g, dtype=torch.float64) for _ in range(2))
    est = flatten(method_gradient(model, batch, "rtrl", "mse", state))
    true = flatten(true_gradient(model, batch, "mse", state))
    torch.testing.assert_close(est, true, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cell", CELLS)
def test_rtrl_per_step_gradient_is_the_gradient_of_that_loss(cell: str) -> None:
    model = make_model(cell, layers=2)
    batch = token_batch(B=2, T=5)
    h0 = model.initial_state(2)
    result = run_forward_mode(model, batch, "cross_entropy", h0, parse_method("rtrl").estimator, per_step=True)
    outputs, _ = model(batch.inputs, h0)
    losses = step_losses(outputs, batch.targets, batch.weights.to(outputs.dtype), "cross_entropy")
    names, params = zip(*model.named_parameters())
    assert result.per_step is not None and len(result.per_step) == 5
    for t in range(5):
        grads = torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)
        for name, g in zip(names, grads):
            ref = g if g is not None else torch.zeros_like(result.per_step[t][name])
            torch.testing.assert_close(result.per_step[t][name], ref, rtol=1e-10, atol=1e-10)


# -- a tanh RNN written out by hand --------------------------------------------------------------


def tanh_model(H: int = 3, C: int = 2, seed: int = 0) -> RecurrentNet:
    torch.manual_seed(seed)
    model = RecurrentNet("rnn", "real", C, 1, H, 1).double()
    with torch.no_grad():
        model.rnn.weight_hh_l0.mul_(2.0)
    return model


def closed_form_step(model: RecurrentNet, x: torch.Tensor, s: torch.Tensor):
    """h_t, D_t = diag(φ') W_hh and I_t (columns in named_parameters order) from the formulas."""
    We, be = model.encoder.weight, model.encoder.bias
    Wi, Wh, bi, bh = (getattr(model.rnn, n) for n in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"))
    B, H = s.shape
    u = x @ We.T + be
    h = torch.tanh(u @ Wi.T + bi + s @ Wh.T + bh)
    phi = 1 - h * h
    eye = torch.eye(H, dtype=s.dtype)
    blocks = [
        torch.einsum("bi,ik,bc->bikc", phi, Wi, x).reshape(B, H, -1),  # encoder.weight[k, c]
        torch.einsum("bi,ik->bik", phi, Wi),  # encoder.bias[k]
        torch.einsum("bi,ik,bj->bikj", phi, eye, u).reshape(B, H, -1),  # weight_ih[k, j]
        torch.einsum("bi,ik,bj->bikj", phi, eye, s).reshape(B, H, -1),  # weight_hh[k, j]
        torch.einsum("bi,ik->bik", phi, eye),  # bias_ih[k]
        torch.einsum("bi,ik->bik", phi, eye),  # bias_hh[k]
    ]
    return h.detach(), (phi[:, :, None] * Wh[None]).detach(), torch.cat(blocks, -1).detach()


def hand_pattern(H: int, C: int) -> torch.Tensor:
    """SnAp-1 for the tanh RNN: encoder parameters reach every unit; core parameters of row k reach unit k."""
    eye = torch.eye(H, dtype=torch.bool)
    row = eye[:, :, None].expand(H, H, H).reshape(H, H * H)
    return torch.cat([torch.ones(H, H * C + H, dtype=torch.bool), row, row, eye, eye], 1)


def closed_form_estimate(model: RecurrentNet, batch: Batch, rule: str, *, pattern=None, tau: float = 1.0,
                         signs=None, trained=None) -> torch.Tensor:
    """Σ_t of an online estimate for MSE with one output, all by hand; flat in named_parameters order.
    ``trained``: 1/0 over the recurrent parameters' entries, the ones UORO's norms run over (default all)."""
    B, T = batch.weights.shape
    H = model.hidden_size
    P = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("readout."))
    Wo, bo = model.readout.weight.detach(), model.readout.bias.detach()
    s = torch.zeros(B, H, dtype=torch.float64)
    M = torch.zeros(B, H, P, dtype=torch.float64)
    ht, tt = torch.zeros(B, H, dtype=torch.float64), torch.zeros(B, P, dtype=torch.float64)
    g = torch.zeros(P, dtype=torch.float64)
    gWo, gbo = torch.zeros_like(Wo), torch.zeros_like(bo)
    for t in range(T):
        s, D, I = closed_form_step(model, batch.inputs[:, t], s)
        if rule == "rtrl":
            M = D @ M + I
            M = M * pattern if pattern is not None else M
        elif rule == "rflo":
            M = (1 - 1 / tau) * M + I / tau
        err = (2.0 / B) * batch.weights[:, t, None] * (s @ Wo.T + bo - batch.targets[:, t])  # [B, 1]
        adj = err @ Wo
        gWo += err.T @ s
        gbo += err.sum(0)
        if rule == "uoro":
            nu = signs[t]
            dh = torch.einsum("bij,bj->bi", D, ht)
            nuI = torch.einsum("bi,bip->bp", nu, I)
            on = torch.ones(P, dtype=torch.float64) if trained is None else trained
            rho0 = torch.tensor([math.sqrt(a / b) if a > 0 and b > 0 else 1.0
                                 for a, b in zip((tt * on).norm(dim=1).tolist(), dh.norm(dim=1).tolist())],
                                dtype=torch.float64)
            rho1 = torch.sqrt((nuI * on).norm(dim=1) / nu.norm(dim=1))
            ht, tt = rho0[:, None] * dh + rho1[:, None] * nu, tt / rho0[:, None] + nuI / rho1[:, None]
            g += torch.einsum("b,bp->p", (adj * ht).sum(1), tt)
        else:
            g += torch.einsum("bs,bsp->p", adj, M)
    return torch.cat([g, gWo.reshape(-1), gbo])


def test_closed_form_rtrl_is_the_full_gradient() -> None:
    model, batch = tanh_model(), real_batch(B=2, T=6)
    true = flatten(true_gradient(model, batch, "mse"))
    torch.testing.assert_close(closed_form_estimate(model, batch, "rtrl"), true, rtol=1e-10, atol=1e-10)


def test_snap1_pattern_is_the_documented_one() -> None:
    model = tanh_model(H=3, C=2)
    pattern = structural_pattern(CellFunction(model), 1, torch.Generator().manual_seed(0))
    assert torch.equal(pattern, hand_pattern(3, 2))
    dense = structural_pattern(CellFunction(model), 2, torch.Generator().manual_seed(0))
    assert bool(dense.all())  # a fully connected core reaches every unit in two steps


def test_snap1_is_rtrl_masked_to_the_pattern() -> None:
    model, batch = tanh_model(), real_batch(B=2, T=6)
    ref = closed_form_estimate(model, batch, "rtrl", pattern=hand_pattern(3, 2).double())
    est = flatten(method_gradient(model, batch, "snap:n=1", "mse"))
    torch.testing.assert_close(est, ref, rtol=1e-10, atol=1e-10)
    assert float((est - flatten(true_gradient(model, batch, "mse"))).norm()) > 1e-3  # really truncated


@pytest.mark.parametrize("cell", CELLS)
def test_snap_with_a_dense_pattern_is_rtrl(cell: str) -> None:
    model, batch = make_model(cell, layers=1), token_batch(B=2, T=6)
    dense = flatten(method_gradient(model, batch, "snap:n=4", "cross_entropy"))
    torch.testing.assert_close(dense, flatten(method_gradient(model, batch, "rtrl", "cross_entropy")),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_rflo_matches_its_trace_written_out(tau: float) -> None:
    model, batch = tanh_model(), real_batch(B=2, T=6)
    est = flatten(method_gradient(model, batch, f"rflo:tau={tau}", "mse"))
    torch.testing.assert_close(est, closed_form_estimate(model, batch, "rflo", tau=tau), rtol=1e-10, atol=1e-10)


# -- UORO ----------------------------------------------------------------------------------------


def library_signs(spec: str, steps: int, shape: tuple[int, int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(derive_seed("online-signs", 0, parse_method(spec).spec))
    return [(2 * torch.randint(0, 2, shape, generator=g) - 1).double() for _ in range(steps)]


def test_uoro_follows_its_recursion_with_the_documented_draws() -> None:
    model, batch = tanh_model(), real_batch(B=2, T=5)
    est = flatten(method_gradient(model, batch, "uoro", "mse"))
    ref = closed_form_estimate(model, batch, "uoro", signs=library_signs("uoro", 5, (2, 3)))
    torch.testing.assert_close(est, ref, rtol=1e-10, atol=1e-10)


def test_uoro_normalises_over_the_trained_parameters_only() -> None:
    """With the recurrent bias frozen, ρ₀ and ρ₁ take θ̃'s norms over the trained entries: the estimate
    follows the hand recursion with those norms, and differs from the one with norms over all entries."""
    model, batch = tanh_model(), real_batch(B=2, T=5)
    model.rnn.bias_hh_l0.requires_grad_(False)
    recurrent = [(n, p) for n, p in model.named_parameters() if not n.startswith("readout.")]
    trained = torch.cat([torch.full((p.numel(),), float(p.requires_grad), dtype=torch.float64) for _, p in recurrent])
    keep = torch.cat([trained, torch.ones(sum(p.numel() for n, p in model.named_parameters()
                                              if n.startswith("readout.")), dtype=torch.float64)]).bool()
    signs = library_signs("uoro", 5, (2, 3))
    est = flatten(method_gradient(model, batch, "uoro", "mse"))
    ref = closed_form_estimate(model, batch, "uoro", signs=signs, trained=trained)[keep]
    torch.testing.assert_close(est, ref, rtol=1e-10, atol=1e-10)
    over_all = closed_form_estimate(model, batch, "uoro", signs=signs)[keep]
    assert float((over_all - ref).abs().max()) > 1e-6


def enumerate_uoro(model: RecurrentNet, batch: Batch) -> torch.Tensor:
    """UORO's estimate for every sign sequence (B = 1): rows of equally likely outcomes."""
    T, H = batch.length, model.hidden_size
    rows = []
    for bits in itertools.product([-1.0, 1.0], repeat=T * H):
        signs = [torch.tensor([bits[t * H:(t + 1) * H]], dtype=torch.float64) for t in range(T)]
        rows.append(closed_form_estimate(model, batch, "uoro", signs=signs))
    return torch.stack(rows)


def tiny_case() -> tuple[RecurrentNet, Batch]:
    model = tanh_model(H=2, C=1, seed=1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 1, generator=g, dtype=torch.float64)
    y = torch.randn(1, 2, 1, generator=g, dtype=torch.float64)
    return model, Batch(x, y, torch.ones(1, 2, dtype=torch.float64))


def test_uoro_is_exactly_unbiased_over_all_sign_draws() -> None:
    model, batch = tiny_case()
    outcomes = enumerate_uoro(model, batch)
    true = flatten(true_gradient(model, batch, "mse"))
    torch.testing.assert_close(outcomes.mean(0), true, rtol=1e-10, atol=1e-10)
    assert float(outcomes.var(0, unbiased=False).sum()) > 1e-3  # a real random variable


def test_uoro_monte_carlo_mean_and_variance_match_the_enumeration() -> None:
    model, batch = tiny_case()
    outcomes = enumerate_uoro(model, batch)
    true = flatten(true_gradient(model, batch, "mse"))
    var = outcomes.var(0, unbiased=False)
    method = parse_method("uoro:seed=7")  # one generator, fresh signs at every call
    draws = torch.stack([flatten(method_gradient(model, batch, method, "mse")) for _ in range(400)])
    keep = var > 1e-20  # read-out coordinates are exact
    torch.testing.assert_close(draws[:, ~keep], true[~keep].expand(400, -1), rtol=1e-10, atol=1e-10)
    z = (draws[:, keep].mean(0) - true[keep]) / torch.sqrt(var[keep] / 400)
    # Σ z² over coordinates is not χ² (coordinates correlate); Bonferroni on each |z| instead
    assert float(z.abs().max()) < stats.norm.ppf(1 - 0.001 / (2 * int(keep.sum())))
    for n in (25, 100, 400):  # the error of the mean shrinks like √(tr Cov / N)
        err = float((draws[:n].mean(0) - true).norm())
        assert err < 4 * math.sqrt(float(var.sum()) / n)
    ratio = float(draws.var(0).sum() / var.sum())
    assert 0.75 < ratio < 1.33, ratio


# -- through the analyses and the command line ---------------------------------------------------


def test_bias_path_measures_online_methods() -> None:
    from tbptt_bench.tasks import TASKS

    task = TASKS.get("copy")(n_symbols=3, n_remember=2)
    torch.manual_seed(0)
    model = RecurrentNet("rnn", task.input_kind, task.input_size, task.output_size, 4, 1)
    table = measure_bias(task, model, ["rtrl", "snap", "chunked:k=2"], seq_len=8, batch_size=2, n_batches=3,
                         seed=0, dtype="float64", n_flips=200, with_provenance=False)
    rows = table[table.group == "all"].set_index("family")
    assert rows.loc["rtrl", "relative_error_mean"] < 1e-10
    assert rows.loc["snap", "relative_error_mean"] > 1e-4
    assert math.isnan(rows.loc["rtrl", "extrapolation"])


def test_alignment_matrix_is_a_cosine_matrix() -> None:
    model, batch = make_model("gru"), token_batch(B=2, T=6)
    table = alignment_matrix(model, batch, ["full", "rtrl", "snap", "uoro", "chunked:k=2"], "cross_entropy")
    ests = {s: flatten(method_gradient(model, batch, s, "cross_entropy")) for s in ["full", "snap", "chunked:k=2"]}
    expect = float(torch.dot(ests["snap"], ests["chunked:k=2"]) / ests["snap"].norm() / ests["chunked:k=2"].norm())
    assert table.loc["snap:n=1,every=1,max_mib=1024", "chunked:k=2"] == pytest.approx(expect, abs=1e-12)
    assert table.loc["rtrl:every=1,max_mib=1024", "full"] == pytest.approx(1.0, abs=1e-12)
    assert (table.values.diagonal() == pytest.approx(1.0))


class UserModel(torch.nn.Module):
    """A model that follows the protocol but is not a built-in one."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 5)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(1, batch_size, 5)

    def forward(self, inputs, state):
        return self.emb(inputs), state


def test_undefined_models_and_oversized_influence_matrices_are_refused(capsys) -> None:
    model, batch = make_model("lstm"), token_batch()
    with pytest.raises(UsageError, match="rnn models only"):
        method_gradient(model, batch, "rflo", "cross_entropy")
    with pytest.raises(UsageError, match=r"hidden ≤ \d+ or batch ≤ \d+ would fit"):
        method_gradient(make_model("rnn", H=64), batch, "rtrl:max_mib=1", "cross_entropy")
    with pytest.raises(UsageError, match="built-in rnn/lstm/gru"):
        method_gradient(UserModel(), batch, "uoro", "cross_entropy")
    code = main(["grad", "--task", "copy", "--model", "gru", "--method", "rflo", "--seq-len", "22", "--hidden", "4"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rnn models only" in err[0]
