"""The lag profile out to thousands of lags on long streams, from a sample of loss positions.

The exact decomposition (:func:`tbptt_bench.core.lags.lag_decomposition`) gives ``φ_d(t)`` for every
loss ``t`` and every lag ``d ≤ D`` at the cost of ``D`` backward passes of the whole sequence: an
estimated 6.6 hours at T = 65,536 and D = 4096 for an LSTM of hidden 128 on one CPU thread (docs/bias.md). The profile
is a mean over losses, so it does not need every loss: this module takes ``n`` loss positions spread
evenly over the stream, and for each one the exact adjoint of that loss alone at every lag of a grid,
from one forward and one backward pass through the ``D`` steps before it.

**Definition** (the same as :mod:`tbptt_bench.core.lags`): ``φ_d(t) = w_t·‖∂ℓ_t/∂S_{t-d+1}‖`` where
``S_s`` is the state step ``s`` reads (0-based steps; ``S_{t-d+1}`` was produced by step ``t - d``), the
norm running over every state tensor. Only positions ``t ≥ D`` are sampled, so every lag of the grid
averages the same losses.

**How.** One no-gradient pass over the stream (read one slice at a time) stops at each window start
``t - D + 1`` and keeps that state. Windows are stacked along the batch in groups (``max_step_rows``
step-rows per group bound the memory), the core runs through each window in fused calls cut at the
grid's lags, and one ``autograd.grad`` of the windows' last-step losses returns the adjoint at every
cut. Cost: ``n·B·D`` step-rows forward and backward, independent of T except for the one pass
without gradient; memory: one group's graph.

**Statistics.** ``φ̄_d`` is the mean over sampled positions of each position's mean over its scored
rows; its standard error is the spread across positions over √n (positions at least ``T/n`` steps
apart are treated as independent: an assumption, named here and in docs/bias.md, not checked).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tbptt_bench.core.engine import Source, step_loss_sum
from tbptt_bench.core.lags import DecayFit, fit_decay, row_norms
from tbptt_bench.core.trajectory import cat_states, core_fn, leaf, parts, readout_fn
from tbptt_bench.errors import UsageError
from tbptt_bench.models.protocol import State, check_protocol, cross_cut_parts, map_state
from tbptt_bench.tasks.base import Batch

log = logging.getLogger(__name__)

#: Step-rows (rows × window steps) per group of windows: bounds the memory of one graph.
MAX_STEP_ROWS = 1 << 17


def lag_grid(max_lag: int, dense: int = 16, per_octave: int = 8) -> list[int]:
    """Lags ``1..dense`` one by one, then about ``per_octave`` lags per doubling up to ``max_lag``."""
    if max_lag < 1:
        raise UsageError(f"the maximum lag must be ≥ 1, got {max_lag}")
    lags = set(range(1, min(dense, max_lag) + 1))
    if max_lag > dense:
        n = max(2, math.ceil(per_octave * math.log2(max_lag / dense)) + 1)
        lags.update(int(round(v)) for v in np.geomspace(dense, max_lag, n))
    lags.add(max_lag)
    return sorted(lags)


def sample_positions(length: int, max_lag: int, n: int) -> list[int]:
    """``n`` loss positions spread evenly over ``max_lag..length-1`` (every one has all lags ≤ max_lag)."""
    if max_lag >= length:
        raise UsageError(f"the maximum lag D={max_lag} must be below the sequence length T={length}")
    if n < 1:
        raise UsageError(f"sample at least one loss position, got {n}")
    span = length - max_lag
    n = min(n, span)
    return sorted({max_lag + (i * span) // n + (span // n) // 2 for i in range(n)})


@dataclass
class LongLagProfile:
    """``φ_d(t)`` at the lags ``lags`` for the sampled loss positions, per stream row."""

    lags: np.ndarray  # [L] lags d ≥ 1
    positions: np.ndarray  # [n] 0-based loss positions t
    phi: np.ndarray  # [n, B, L]; NaN where the loss has zero weight
    horizon: int  # T

    def _per_position(self) -> np.ndarray:
        """[n, L]: each position's mean over its scored rows (positions with none are dropped)."""
        scored = ~np.isnan(self.phi[:, :, 0])
        keep = scored.any(1)
        with np.errstate(invalid="ignore"):
            return np.nanmean(self.phi[keep], axis=1)

    @property
    def n_positions(self) -> int:
        return int(self._per_position().shape[0])

    @property
    def mean(self) -> np.ndarray:
        """φ̄_d: mean over positions of the per-position mean over scored rows."""
        return self._per_position().mean(0)

    @property
    def standard_error(self) -> np.ndarray:
        """Spread of the per-position means across positions, over √n (NaN with fewer than 2)."""
        per = self._per_position()
        if per.shape[0] < 2:
            return np.full(per.shape[1], math.nan)
        return per.std(0, ddof=1) / math.sqrt(per.shape[0])

    @property
    def underflow(self) -> np.ndarray:
        """Share of scored pairs whose adjoint is exactly zero at each lag (below the dtype's range)."""
        scored = ~np.isnan(self.phi)
        return ((self.phi == 0) & scored).sum((0, 1)) / np.maximum(scored.sum((0, 1)), 1)

    def fit(self, fit_from: int = 1, fit_to: int | None = None) -> DecayFit:
        """Geometric decay of φ̄_d over the grid's lags (exact zeros left out), as for the full profile."""
        return fit_decay(self.lags, self.mean, fit_from, fit_to)

    def frame(self):  # type: ignore[no-untyped-def]
        """One row per lag: d, mean, standard error, share underflowed, positions averaged."""
        import pandas as pd

        return pd.DataFrame({"lag": self.lags, "phi_mean": self.mean, "phi_se": self.standard_error,
                             "underflow": self.underflow, "n_positions": self.n_positions})


def _window_starts(model: nn.Module, source: Source, starts: list[int], state: State) -> list[State]:
    """The states at steps ``starts`` (sorted), from one no-gradient pass read slice by slice."""
    core = core_fn(model)
    first = next(model.parameters())
    out, pos, h = [], 0, state
    with torch.no_grad():
        for s in starts:
            if s > pos:
                _, h = core(source.slice(pos, s).to(first.device, first.dtype).inputs, h)
                pos = s
            out.append(map_state(lambda t: t.detach(), h))
    return out


def _group_phi(model: nn.Module, source: Source, loss_kind: str, positions: list[int], starts: list[State],
               max_lag: int, lags: list[int]) -> np.ndarray:
    """[len(positions), B, len(lags)] φ for one group of windows stacked along the batch."""
    core, readout = core_fn(model), readout_fn(model)
    first = next(model.parameters())
    B = source.batch_size
    windows = [source.slice(t - max_lag + 1, t + 1).to(first.device, first.dtype) for t in positions]
    x = torch.cat([w.inputs for w in windows], dim=0)
    last = Batch(torch.cat([w.inputs[:, -1:] for w in windows]), torch.cat([w.targets[:, -1:] for w in windows]),
                 torch.cat([w.weights[:, -1:] for w in windows]))
    cuts = sorted({max_lag - d for d in lags})  # window offset of S_{t-d+1}; offset 0 is the window start
    h = leaf(cat_states(starts))
    at_cut = {0: h}
    bounds = [*cuts, max_lag]
    for a, b in zip(bounds[:-1], bounds[1:]):
        features, h = core(x[:, a:b], h)
        at_cut[b] = h
    loss = step_loss_sum(readout(features[:, -1:]), last, loss_kind, 1)  # Σ over rows of w·ℓ_t, each row its own
    wanted = [at_cut[max_lag - d] for d in lags]
    grads = torch.autograd.grad(loss, [t for s in wanted for t in parts(s)], allow_unused=True)
    n_rows, per = x.shape[0], len(parts(wanted[0]))
    adjoints = [g if g is not None else torch.zeros_like(t)
                for g, t in zip(grads, (t for s in wanted for t in parts(s)))]
    phi = torch.stack([row_norms(adjoints[j * per : (j + 1) * per], n_rows) for j in range(len(lags))], 1)
    phi = phi.cpu().numpy()
    scored = (last.weights[:, 0] != 0).cpu().numpy()
    phi[~scored] = np.nan
    return phi.reshape(len(positions), B, len(lags))


def long_lag_profile(
    model: nn.Module,
    source: Source,
    loss_kind: str,
    max_lag: int,
    *,
    n_positions: int = 64,
    lags: list[int] | None = None,
    state: State | None = None,
    max_step_rows: int = MAX_STEP_ROWS,
) -> LongLagProfile:
    """φ_d(t) at every lag of ``lags`` (default :func:`lag_grid`) for ``n_positions`` losses spread evenly
    over ``max_lag..T-1``, each exact; see the module docstring for the cost and the statistics."""
    check_protocol(model)
    if cross_cut_parts(model):
        raise UsageError(f"model {type(model).__name__} keeps state parts differentiable across a cut "
                         "(docs/design.md §7.1); its lag profile is not defined per state")
    T, B = source.length, source.batch_size
    grid = lag_grid(max_lag) if lags is None else sorted(set(int(d) for d in lags))
    if not grid or grid[0] < 1 or grid[-1] > max_lag:
        raise UsageError(f"lags must lie in 1..D = 1..{max_lag}, got {grid[:3]}…{grid[-3:]}")
    positions = sample_positions(T, max_lag, n_positions)
    h0 = model.initial_state(B) if state is None else state
    starts = _window_starts(model, source, [t - max_lag + 1 for t in positions], h0)
    per_group = max(1, max_step_rows // (B * max_lag))
    out = []
    for g in range(0, len(positions), per_group):
        out.append(_group_phi(model, source, loss_kind, positions[g : g + per_group], starts[g : g + per_group],
                              max_lag, grid))
        log.debug("long lag profile: %d of %d positions", min(g + per_group, len(positions)), len(positions))
    return LongLagProfile(np.asarray(grid), np.asarray(positions), np.concatenate(out), T)
