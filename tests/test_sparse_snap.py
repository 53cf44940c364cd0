"""Sparse cores and SnAp-n with sparse storage (``snap:n=N,storage=sparse``; Menick et al. 2021).

Checks against independent computations, float64:

* the reference is SnAp's definition written here: the dense RTRL recursion ``M ← Π ⊙ (D M + I)`` with ``D`` and
  ``I`` taken by ``torch.autograd.functional.jacobian`` of the model's **fused** path (not the per-row cell
  equations the library steps), and ``Π`` grown from the Jacobians' nonzero patterns; the stored entries must be
  that pattern, exactly, and their values the reference's to 1e-12 at every step;
* for the one-layer tanh RNN the pattern is also written by hand from the mask (unit k's parameters reach k and
  the units k feeds), and its size counted from the mask;
* where the pattern is the whole reachability set (a closure n, or a mask whose SnAp-2 pattern is dense) the
  estimate equals RTRL and full BPTT through the engine; SnAp-1 and SnAp-2 equal the dense masked ``snap``.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.func import functional_call

from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient
from tbptt_bench.core.forward_mode import CellFunction
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.recurrent import RecurrentNet

from test_engine import real_batch, token_batch

CELLS = ["rnn", "gru", "lstm"]
V = 5


def sparse_model(cell: str, H: int = 5, layers: int = 1, sparsity: float = 0.7, seed: int = 0,
                 mask_seed: int = 0, kind: str = "tokens") -> RecurrentNet:
    torch.manual_seed(seed)
    sizes = (V, V) if kind == "tokens" else (2, 1)
    model = RecurrentNet(cell, kind, *sizes, H, layers, sparsity=sparsity, mask_seed=mask_seed).double()
    with torch.no_grad():  # larger recurrent weights so that the recursion matters
        for n, p in model.named_parameters():
            if "weight_hh" in n:
                p.mul_(3.0)
    return model


# -- the sparse core --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_sparse_core_keeps_pruned_weights_at_zero_with_zero_gradient(cell: str) -> None:
    model = sparse_model(cell, H=6, layers=2, sparsity=0.75)
    batch = token_batch(B=2, T=6, V=V)
    for layer in range(2):
        w, mask = getattr(model.rnn, f"weight_hh_l{layer}"), model.recurrent_mask(layer)
        assert int(mask.sum()) == round(0.25 * w.numel())
        assert torch.all(w[~mask] == 0) and torch.all(w[mask] != 0)
    outputs = {}
    for path in ("fused", "cell"):
        model.path = path
        model.zero_grad()
        out, _ = model(batch.inputs, model.initial_state(2))
        out.square().sum().backward()
        outputs[path] = out.detach()
        for layer in range(2):
            grad, mask = getattr(model.rnn, f"weight_hh_l{layer}").grad, model.recurrent_mask(layer)
            assert torch.all(grad[~mask] == 0) and grad[mask].abs().sum() > 0
    torch.testing.assert_close(outputs["fused"], outputs["cell"], rtol=1e-12, atol=1e-12)
    torch.optim.Adam(model.parameters(), lr=0.1).step()
    assert all(torch.all(getattr(model.rnn, f"weight_hh_l{k}")[~model.recurrent_mask(k)] == 0) for k in range(2))


def test_mask_is_fixed_by_mask_seed_not_by_the_model_seed() -> None:
    a, b, c = sparse_model("gru", seed=0), sparse_model("gru", seed=1), sparse_model("gru", mask_seed=1)
    assert torch.equal(a.recurrent_mask(0), b.recurrent_mask(0))
    assert not torch.equal(a.recurrent_mask(0), c.recurrent_mask(0))
    assert RecurrentNet("rnn", "tokens", V, V, 4).recurrent_mask(0) is None
    with pytest.raises(UsageError, match=r"in \[0, 1\)"):
        RecurrentNet("rnn", "tokens", V, V, 4, sparsity=1.0)
    assert sparse_model("rnn").input_fold() is None  # the fold would copy W_ih only; the mask is on W_hh


# -- the reference: SnAp's definition on the fused path ---------------------------------------------------------


class Reference:
    """Dense masked RTRL on the model's fused path, one batch row at a time (no code shared with the library's
    per-row cell function): state ``s = (h of every layer, then c of every layer)``."""

    def __init__(self, model: RecurrentNet) -> None:
        self.model = model
        self.names = [n for n, _ in model.named_parameters() if not n.startswith("readout.")]
        params = dict(model.named_parameters())
        self.shapes = [params[n].shape for n in self.names]
        self.theta = torch.cat([params[n].detach().reshape(-1) for n in self.names])
        self.L, self.H = model.num_layers, model.hidden_size
        self.S = self.L * self.H * (2 if model.cell == "lstm" else 1)

    def step(self, theta: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        pieces, at = {}, 0
        for name, shape in zip(self.names, self.shapes):
            pieces[name] = theta[at:at + shape.numel()].view(shape)
            at += shape.numel()
        parts = s.view(-1, self.L, 1, self.H)  # [1 or 2, L, B = 1, H]
        state = (parts[0], parts[1]) if self.model.cell == "lstm" else parts[0]
        inputs = x.view(1, 1, -1) if x.is_floating_point() else x.view(1, 1)
        _, new = functional_call(self.model, pieces, (inputs, state))
        return torch.cat([p.reshape(-1) for p in (new if isinstance(new, tuple) else (new,))])

    def jacobians(self, theta: torch.Tensor, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``I`` ``[S, P]`` and ``D`` ``[S, S]`` of one row."""
        return jacobian(lambda th, z: self.step(th, x, z), (theta, s))  # type: ignore[return-value]

    def pattern(self, n: int) -> torch.Tensor:
        """Π_n grown from the Jacobians' nonzeros at random θ (pruned weights masked by the model), random states,
        every token (real inputs: random ones)."""
        g = torch.Generator().manual_seed(11)
        theta = torch.randn(self.theta.shape, generator=g, dtype=torch.float64)
        first = torch.zeros(self.S, self.theta.numel(), dtype=torch.bool)
        transition = torch.zeros(self.S, self.S, dtype=torch.bool)
        tokens = isinstance(self.model.encoder, torch.nn.Embedding)
        probes = [torch.tensor(v) for v in range(V)] if tokens else list(torch.randn(4, 2, generator=g, dtype=torch.float64))
        for x in probes:
            I, D = self.jacobians(theta, x, torch.randn(self.S, generator=g, dtype=torch.float64))
            first |= I != 0
            transition |= D != 0
        pattern = first
        for _ in range(n - 1):
            pattern = first | ((transition.double() @ pattern.double()) != 0)
        return pattern


def run_both(model: RecurrentNet, n: int, T: int = 5, B: int = 2, kind: str = "tokens") -> tuple:  # type: ignore[type-arg]
    """Step the library's sparse estimator and the reference side by side; the largest difference of the stored
    values from the reference's on the pattern, and the estimator and reference pattern."""
    ref = Reference(model)
    pattern = ref.pattern(n)
    est = parse_method(f"snap:n={n},storage=sparse").estimator(CellFunction(model), B)
    batch = token_batch(B=B, T=T, V=V, seed=3) if kind == "tokens" else real_batch(B=B, T=T, seed=3)
    s = torch.randn(B, ref.S, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    M = torch.zeros(B, ref.S, ref.theta.numel(), dtype=torch.float64)
    worst = 0.0
    for t in range(T):
        x = batch.inputs[:, t]
        new_rows = []
        for b in range(B):
            I, D = ref.jacobians(ref.theta, x[b], s[b])
            M[b] = (D @ M[b] + I) * pattern
            new_rows.append(ref.step(ref.theta, x[b], s[b]).detach())
        s_lib = est.advance(x, s)
        s = torch.stack(new_rows)
        torch.testing.assert_close(s_lib, s, rtol=1e-13, atol=1e-13)
        assert est.M.shape == (B, int(pattern.sum()))  # nothing stored off the pattern
        rows, cols = est.pattern.rows, est.pattern.cols
        worst = max(worst, float((est.M - M[:, rows, cols]).abs().max()))
    return worst, est, pattern, M


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_sparse_snap_equals_masked_rtrl_on_sparse_cores(cell: str, n: int) -> None:
    worst, est, pattern, _ = run_both(sparse_model(cell, H=5, sparsity=0.7), n)
    stored = torch.zeros_like(pattern)
    stored[est.pattern.rows, est.pattern.cols] = True
    assert torch.equal(stored, pattern) and est.entries == int(pattern.sum())
    assert worst < 1e-12


@pytest.mark.parametrize("cell", CELLS)
def test_sparse_snap_two_layers_and_real_inputs(cell: str) -> None:
    worst, est, pattern, _ = run_both(sparse_model(cell, H=4, layers=2, sparsity=0.6), 2, T=4)
    assert est.entries == int(pattern.sum()) and worst < 1e-12
    worst, est, pattern, _ = run_both(sparse_model(cell, H=4, sparsity=0.6, kind="real"), 2, T=4, kind="real")
    assert est.entries == int(pattern.sum()) and worst < 1e-12


def test_rnn_pattern_by_hand_and_its_size() -> None:
    """One-layer tanh RNN, tokens: SnAp-2 keeps, for unit k's kept core parameters, unit k and the units i with
    mask[i, k]; for the encoder every unit (it feeds all through W_ih); nothing for a pruned weight."""
    H = 8
    model = sparse_model("rnn", H=H, sparsity=0.85)
    cell = CellFunction(model)
    est = parse_method("snap:n=2,storage=sparse").estimator(cell, 1)
    mask = model.recurrent_mask(0)
    hand = torch.zeros(H, cell.P, dtype=torch.bool)
    at = 0
    for name, size in zip(cell.names, cell.sizes):
        for flat in range(size):
            if name == "encoder.weight":
                hand[:, at + flat] = True
            else:
                k = flat // H if "weight" in name else flat
                if name == "rnn.weight_hh_l0" and not mask[k, flat % H]:
                    continue
                hand[k, at + flat] = True
                hand[mask[:, k], at + flat] = True
        at += size
    stored = torch.zeros_like(hand)
    stored[est.pattern.rows, est.pattern.cols] = True
    assert torch.equal(stored, hand)
    reach = 1 + (mask & ~torch.eye(H, dtype=torch.bool)).sum(0)  # units a row-k parameter reaches in ≤ 2 steps
    per_row = 2 * H + 2 - (~mask).sum(1)  # kept W_ih, W_hh, b_ih, b_hh entries of row k
    assert est.entries == V * H * H + int((per_row * reach).sum())
    assert est.entries < 0.5 * cell.S * cell.P


# -- where the pattern is everything reachable: RTRL, full BPTT --------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_closure_pattern_equals_rtrl_and_full_bptt(cell: str) -> None:
    model = sparse_model(cell, H=4, sparsity=0.75)
    batch = token_batch(B=2, T=7, V=V, seed=5)
    full = flatten(true_gradient(model, batch, "cross_entropy"))
    closure = flatten(method_gradient(model, batch, "snap:n=9,storage=sparse", "cross_entropy"))  # n > S: closed
    rtrl = flatten(method_gradient(model, batch, "rtrl", "cross_entropy"))
    torch.testing.assert_close(closure, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rtrl, full, rtol=1e-10, atol=1e-12)


def test_a_sparse_gru_whose_two_step_pattern_is_dense_is_rtrl() -> None:
    """A 2/3-sparse GRU mask in which every (unit i, unit j) keeps W_hh[g·H + i, j] for exactly one gate g: D is
    dense, so SnAp-2's pattern is every (state entry, kept parameter) and SnAp-2 is RTRL."""
    H = 4
    model = sparse_model("gru", H=H, sparsity=2 / 3)
    gate = torch.arange(H)[:, None] + torch.arange(H)[None, :]  # one gate per (i, j), all three used
    mask = torch.zeros(3 * H, H, dtype=torch.bool)
    for g in range(3):
        mask[g * H:(g + 1) * H] = (gate % 3) == g
    with torch.no_grad():
        model.mask_hh_l0.copy_(mask)
        model.rnn.weight_hh_l0.mul_(mask)
        model.rnn.weight_hh_l0.add_(0.5 * mask * (model.rnn.weight_hh_l0 == 0))
    cell = CellFunction(model)
    est = parse_method("snap:n=2,storage=sparse").estimator(cell, 1)
    assert est.entries == cell.S * (cell.P - int((~mask).sum()))  # dense on every kept parameter
    batch = token_batch(B=2, T=6, V=V, seed=6)
    snap2 = flatten(method_gradient(model, batch, "snap:n=2,storage=sparse", "cross_entropy"))
    full = flatten(true_gradient(model, batch, "cross_entropy"))
    torch.testing.assert_close(snap2, full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_sparse_storage_equals_the_dense_masked_snap(cell: str, n: int) -> None:
    """SnAp-1 (and SnAp-2) with sparse storage give the dense masked implementation's estimate, on a dense core
    (where SnAp-2 is RTRL) and on a sparse one."""
    batch = token_batch(B=2, T=6, V=V, seed=7)
    for sparsity in (0.0, 0.7):
        model = sparse_model(cell, H=4, sparsity=sparsity)
        sparse = flatten(method_gradient(model, batch, f"snap:n={n},storage=sparse", "cross_entropy"))
        dense = flatten(method_gradient(model, batch, f"snap:n={n}", "cross_entropy"))
        torch.testing.assert_close(sparse, dense, rtol=1e-11, atol=1e-13)


def test_refusals() -> None:
    model = sparse_model("rnn", H=4)
    with pytest.raises(UsageError, match="dense cores"):
        parse_method("kfrtrl").estimator(CellFunction(model), 2)
    with pytest.raises(UsageError, match="dense or sparse"):
        parse_method("snap:storage=csr")
    with pytest.raises(UsageError, match="pattern entries"):
        parse_method("snap:n=2,storage=sparse,max_mib=1").estimator(CellFunction(model), 2**20)


def test_sparse_snap_steps_on_cuda_without_a_host_sync(simulated_cuda) -> None:  # type: ignore[no-untyped-def]
    model = sparse_model("gru", H=4).cuda()
    est = parse_method("snap:n=2,storage=sparse").estimator(CellFunction(model), 3)
    x = torch.randint(0, V, (3,)).cuda()
    s = torch.randn(3, 4, dtype=torch.float64).cuda()
    with simulated_cuda.counting() as seen:
        for _ in range(2):
            s = est.advance(x, s)
        g = est.read(torch.ones_like(s))
    assert seen == [] and g.is_cuda
