"""Independent reference computations for tests (no use of the engine).

``masked_reference`` unrolls the model one step at a time with a separate copy θ_s of the parameters
at every step s, so that ∂ℓ_t/∂θ_s is exactly the contribution of lag d = t - s; each loss is
backpropagated on its own and the contributions are weighted by the mask matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from tbptt_bench.models.protocol import has_readout


def step_losses(outputs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, loss_kind: str) -> torch.Tensor:
    """ℓ_t for each t: [T] (sum over batch of weighted losses divided by B)."""
    B, T = weights.shape
    if loss_kind == "cross_entropy":
        per = torch.stack([F.cross_entropy(outputs[:, t], targets[:, t], reduction="none") for t in range(T)], 1)
    else:
        per = ((outputs - targets) ** 2).sum(-1)
    return (per * weights).sum(0) / B


def masked_reference(model, batch, mask, loss_kind, state=None):
    """Σ_t Σ_s M[t, s] ∂ℓ_t/∂θ_s, plus the read-out's direct term for every loss."""
    T = batch.length
    names = [n for n, p in model.named_parameters()]
    readout = {n for n in names if n.startswith("readout.")} if has_readout(model) else set()
    copies = [{n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()} for _ in range(T)]
    state = model.initial_state(batch.batch_size) if state is None else state
    outs = []
    for t in range(T):
        out, state = functional_call(model, copies[t], (batch.inputs[:, t : t + 1], state))
        outs.append(out)
    outputs = torch.cat(outs, 1)
    losses = step_losses(outputs, batch.targets, batch.weights, loss_kind)
    grads = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for t in range(T):
        flat = [copies[s][n] for s in range(t + 1) for n in names]
        gs = torch.autograd.grad(losses[t], flat, retain_graph=True, allow_unused=True)
        i = 0
        for s in range(t + 1):
            for n in names:
                g = gs[i]
                i += 1
                if g is None:
                    continue
                w = (1.0 if s == t else 0.0) if n in readout else float(mask[t, s])
                if w:
                    grads[n] += w * g
    return grads


def finite_difference(model, batch, loss_kind, eps=1e-6, state=None):
    """Central differences of L = Σ_t ℓ_t for every parameter entry (float64 models only)."""
    grads = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            g = torch.zeros_like(p)
            flat, gflat = p.view(-1), g.view(-1)
            for i in range(flat.numel()):
                orig = flat[i].item()
                vals = []
                for sign in (1, -1):
                    flat[i] = orig + sign * eps
                    h0 = model.initial_state(batch.batch_size) if state is None else state
                    out, _ = model(batch.inputs, h0)
                    vals.append(step_losses(out, batch.targets, batch.weights, loss_kind).sum().item())
                flat[i] = orig
                gflat[i] = (vals[0] - vals[1]) / (2 * eps)
            grads[n] = g
    return grads
