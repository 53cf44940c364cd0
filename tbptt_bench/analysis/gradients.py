"""Gradient estimates: a method's ĝ (sum of its update gradients at frozen θ) and the true g.

Both are computed by the engine over the same batch, from the same initial state, with the same loss
normalisation (docs/design.md §3), and returned as ``{parameter name: tensor}`` in ``state_dict`` order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from tbptt_bench.core.engine import Engine, Source
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.truncation import Full
from tbptt_bench.core.forward_mode import run_forward_mode
from tbptt_bench.methods.base import Method, parse_method
from tbptt_bench.methods.online import OnlineMethod
from tbptt_bench.seeding import method_rng
from tbptt_bench.models.protocol import State, check_protocol, parameter_group

Gradient = dict[str, torch.Tensor]


def method_gradient(
    model: nn.Module,
    source: Source,
    method: Method | str,
    loss_kind: str,
    state: State | None = None,
    *,
    seed: int = 0,
    expectation: bool = False,
) -> Gradient:
    """ĝ: the sum over the method's updates of each update's gradient, θ fixed throughout.

    A method that draws random choices (ARTBP's cut points) draws them from ``method_rng(seed)``
    (docs/design.md §2.9): pass the run's seed, so that replicates are independent and reruns equal.
    ``expectation=True`` gives E ĝ over those draws exactly (:meth:`Method.expected_updates`, no draws);
    UsageError for a method that has no exact expectation."""
    check_protocol(model)
    method = parse_method(method)
    updates = method.expected_updates(source.length) if expectation else None
    if expectation and (updates is None or isinstance(method, OnlineMethod)):
        raise UsageError(f"method {method.spec!r} has no exact expectation over its random draws; use a mask "
                         "method whose family declares expected_mask (e.g. artbp) or a deterministic one")
    if isinstance(method, OnlineMethod):  # forward mode: no mask, no engine (docs/design.md §7.3)
        h0 = model.initial_state(source.batch_size) if state is None else state
        return run_forward_mode(model, source, loss_kind, h0, method.estimator).gradient
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        engine = Engine(model, loss_kind, checkpoint=method.checkpoint)
        h0 = model.initial_state(source.batch_size) if state is None else state
        method.observe(0, model, source, h0, loss_kind)  # stateful methods (adaptive K) estimate at this θ
        engine.run(source, updates if expectation else method.updates(source.length, rng=method_rng(seed)), h0)
        return {
            name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in model.named_parameters()
            if p.requires_grad
        }
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def true_gradient(
    model: nn.Module, source: Source, loss_kind: str, state: State | None = None, checkpoint: int | None = None
) -> Gradient:
    """g: full BPTT over the whole source (optionally with activation checkpointing)."""
    return method_gradient(model, source, Full(checkpoint=checkpoint), loss_kind, state)


def flatten(grad: Gradient, names: list[str] | None = None) -> torch.Tensor:
    """One vector of the named tensors (all, or those in ``names``), in a fixed order."""
    keys = list(grad) if names is None else names
    if not keys:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([grad[k].reshape(-1).to(torch.float64) for k in keys])


@dataclass(frozen=True)
class Comparison:
    """Per-batch agreement of an estimate with the true gradient."""

    relative_error: float
    cosine: float
    norm_ratio: float

    def as_dict(self) -> dict[str, float]:
        return {"relative_error": self.relative_error, "cosine": self.cosine, "norm_ratio": self.norm_ratio}


def compare_vectors(estimate: torch.Tensor, true: torch.Tensor) -> Comparison:
    """‖ĝ - g‖/‖g‖, cos(ĝ, g) and ‖ĝ‖/‖g‖ (NaN where ‖g‖ or ‖ĝ‖ is zero)."""
    ng = float(torch.linalg.vector_norm(true))
    ne = float(torch.linalg.vector_norm(estimate))
    diff = float(torch.linalg.vector_norm(estimate - true))
    nan = math.nan
    cos = float(torch.dot(estimate, true)) / (ne * ng) if ne > 0 and ng > 0 else nan
    return Comparison(diff / ng if ng > 0 else nan, cos, ne / ng if ng > 0 else nan)


def compare(estimate: Gradient, true: Gradient) -> dict[str, Comparison]:
    """Comparisons overall (key ``"all"``) and per parameter group (input, recurrent, bias, readout)."""
    out = {"all": compare_vectors(flatten(estimate), flatten(true))}
    groups: dict[str, list[str]] = {}
    for name in true:
        groups.setdefault(parameter_group(name), []).append(name)
    for group, names in sorted(groups.items()):
        out[group] = compare_vectors(flatten(estimate, names), flatten(true, names))
    return out
