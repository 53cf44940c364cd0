"""Lag analysis: the exact per-lag decomposition of the gradient, the lag profile, and the bias it extrapolates.

**Decomposition.** ``G_d = Σ_t c(t, d)`` (docs/design.md §2) for ``d < D``, so that
``sliding(K) = Σ_{d<K} G_d`` for every ``K ≤ D`` at once and ``Σ_{d<T} G_d`` is the full gradient.
``G_0`` also holds the read-out's direct term (read-out parameters have no other lag).

How it is computed (time-parallel, lag-sequential): one forward pass stores the state at every
position; the core is then run once, one step from every stored state, all positions stacked along
the batch (``T·B`` rows). That one-step graph is reused for every lag. The adjoint of loss ``t`` at
the state ``d`` steps back is the adjoint at lag ``d-1`` pushed through one step, so iteration ``d``
feeds each row the input-state gradient that iteration ``d-1`` left at the next position, and one
backward call through the stacked step returns ``G_d`` (its parameter gradient, summed over all
positions) and the cotangents of iteration ``d+1``. Each row of iteration ``d`` carries exactly one
loss (``t = s + d``), so the lag profile comes out of the same sweep. Cost: ``D`` backward calls, each
about one full backward pass; memory: one stacked step (positions are processed in pieces of at most
``max_rows`` rows, the last piece first, handing the boundary adjoints of every lag to the piece
before).

**Profile.** ``φ_d(t) = w_t·‖∂loss_t/∂h_{t-d}‖`` per sequence row and scored loss, ``d = 1..D``, where
``h_{t-d}`` is the state ``d`` steps before the state of the loss's own step (``h_{t-1}`` is the state
that step reads) and the norm runs over all state tensors (``h`` and ``c`` of every layer for the LSTM).
Lag 0 lives in the core's feature space, which a black-box core does not tie to its state, so the
profile starts at ``d = 1``. With 0-based loss positions a pair is counted iff ``t ≥ d``, i.e. its state
``h_{t-d}`` (1-based) was produced by a step; the pair reaching the initial state carries no contribution
``c(t, d)`` and is left out (docs/design.md §3.4).

**Decay fit and extrapolated bias** (after Aicher, Foti & Fox 2019). ``log φ̄_d`` against ``d`` is fitted
by least squares (rate ``β = e^slope``, with its R²) and by the Theil–Sen estimator (robust to a
non-geometric start). The *extrapolated relative bias* of a method is ``tail / lower``: ``tail`` is the
mean, over scored losses, of the profile mass that the method's mask drops (measured lags, then the
fitted geometric tail up to the horizon T); ``lower`` is ``max_K (‖Σ_{1≤d<K} m_d‖ - tail(K))`` with
``m_d`` the mean adjoint vector at lag ``d``. It is **not a bound** (docs/design.md §3): it measures
everything in state space, so it assumes ``∂⁺h/∂θ`` has a roughly constant norm, and beyond D it
assumes geometric decay. :meth:`LagProfile.decay_check` tests the second assumption on the measured
profile; the first can only be checked against an exact bias (``bias`` reports both side by side).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from tbptt_bench.core.engine import Source, step_loss_sum
from tbptt_bench.errors import UsageError
from tbptt_bench.core.mask import Update, update_owner
from tbptt_bench.models.protocol import State, check_protocol, cross_cut_parts
from tbptt_bench.tasks.base import Batch
from tbptt_bench.core.trajectory import core_fn, dense_states, leaf, parts, prepare, readout_fn, rows

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

Gradient = dict[str, torch.Tensor]

#: Rows (positions × batch) stacked into one piece of the decomposition.
MAX_ROWS = 32768


@dataclass
class LagSamples:
    """Raw lag-profile data of one or more batches of the same length T."""

    horizon: int
    max_lag: int
    phi: list[list[np.ndarray]] = field(default_factory=list)  # phi[d-1]: arrays of φ_d values
    vector_sum: list[np.ndarray | None] = field(default_factory=list)  # Σ of adjoint vectors at lag d
    scored: np.ndarray | None = None  # scored losses per position t (summed over rows and batches)

    @classmethod
    def empty(cls, horizon: int, max_lag: int) -> "LagSamples":
        return cls(horizon, max_lag, [[] for _ in range(max_lag)], [None] * max_lag, np.zeros(horizon))

    def merge(self, other: "LagSamples") -> "LagSamples":
        """Pool the samples of two batches (same T and D)."""
        if (self.horizon, self.max_lag) != (other.horizon, other.max_lag):
            raise ValueError("lag samples of different T or D cannot be pooled")
        out = LagSamples.empty(self.horizon, self.max_lag)
        for d in range(self.max_lag):
            out.phi[d] = self.phi[d] + other.phi[d]
            a, b = self.vector_sum[d], other.vector_sum[d]
            out.vector_sum[d] = b if a is None else (a if b is None else a + b)
        assert self.scored is not None and other.scored is not None
        out.scored = self.scored + other.scored
        return out


@dataclass
class LagDecomposition:
    """``G_d`` for ``d = 0..D-1`` (``per_lag[name][d]``) and the lag-profile samples of the same sweep."""

    per_lag: dict[str, torch.Tensor]
    max_lag: int
    samples: LagSamples

    def sliding(self, k: int) -> Gradient:
        """ĝ of ``sliding(k)``: ``Σ_{d<k} G_d`` (plus the read-out term, held in ``G_0``)."""
        if not 1 <= k <= self.max_lag:
            raise UsageError(f"sliding K={k} needs lags up to {k}; the decomposition has D={self.max_lag} (K ≤ D)")
        return {n: g[:k].sum(0) for n, g in self.per_lag.items()}

    def total(self) -> Gradient:
        """``Σ_{d<D} G_d``: the full gradient when D ≥ T."""
        return self.sliding(self.max_lag)


def _stack_steps(x: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Steps ``a..b-1`` of ``[B, T, ...]`` as one-step rows ``[(b-a)·B, 1, ...]``, position-major."""
    piece = x[:, a:b]
    return piece.transpose(0, 1).reshape((b - a) * x.shape[0], 1, *x.shape[2:])


def row_norms(tensors: Sequence[torch.Tensor], n_rows: int) -> torch.Tensor:
    """Per-row Euclidean norm over all state tensors (batch in dimension 1)."""
    total = torch.zeros(n_rows, dtype=torch.float64, device=tensors[0].device)
    for s in tensors:
        flat = s.transpose(0, 1).reshape(n_rows, -1).to(torch.float64)
        total += (flat * flat).sum(1)
    return total.sqrt()


def _row_vectors(tensors: Sequence[torch.Tensor], n_rows: int) -> torch.Tensor:
    return torch.cat([s.transpose(0, 1).reshape(n_rows, -1).to(torch.float64) for s in tensors], dim=1)


def lag_decomposition(
    model: nn.Module,
    source: Source,
    loss_kind: str,
    max_lag: int,
    state: State | None = None,
    *,
    profile: bool = True,
    max_rows: int = MAX_ROWS,
) -> LagDecomposition:
    """The exact per-lag gradients ``G_0..G_{D-1}`` of a sequence (and its lag profile φ_1..φ_D)."""
    check_protocol(model)
    if cross_cut_parts(model):
        raise UsageError(
            f"model {type(model).__name__} keeps state parts differentiable across a cut (docs/design.md §7.1), so "
            "its gradient has no lag decomposition; use --max-lag 0, and --engine (suites: fast = false) for sliding methods"
        )
    T, B = source.length, source.batch_size
    if not 1 <= max_lag <= T:
        raise UsageError(f"the maximum lag D must be between 1 and the sequence length T={T}, got {max_lag}")
    names, params, data, h0 = prepare(model, source, state)
    core, readout = core_fn(model), readout_fn(model)
    dense = dense_states(model, data, h0)
    weights = data.weights.to(torch.float64)
    samples = LagSamples.empty(T, max_lag)
    assert samples.scored is not None
    samples.scored += (weights != 0).sum(0).cpu().numpy()
    per_lag = {n: torch.zeros((max_lag, *p.shape), dtype=p.dtype, device=p.device) for n, p in zip(names, params)}
    step = max(1, max_rows // B)
    inflow: list[tuple[torch.Tensor, ...] | None] = [None] * max_lag
    for p0 in reversed(range(0, T, step)):
        p1 = min(T, p0 + step)
        n = (p1 - p0) * B
        piece = Batch(_stack_steps(data.inputs, p0, p1), _stack_steps(data.targets, p0, p1),
                      _stack_steps(data.weights, p0, p1))
        h_in = leaf(rows(dense, p0 * B, p1 * B))
        features, h_out = core(piece.inputs, h_in)
        loss = step_loss_sum(readout(features), piece, loss_kind, B)
        grads = torch.autograd.grad(loss, [*params, *parts(h_in)], retain_graph=True, allow_unused=True)
        _accumulate(per_lag, names, grads[: len(params)], 0)
        in_grad = [g if g is not None else torch.zeros_like(s) for g, s in zip(grads[len(params):], parts(h_in))]
        outflow: list[tuple[torch.Tensor, ...] | None] = [tuple(g[:, :B] for g in in_grad)]
        for d in range(1, max_lag + 1):
            if p0 + d > T - 1:  # no loss d steps after any position of this piece
                outflow.extend([None] * (max_lag - len(outflow)))
                break
            cot = []
            for j, g in enumerate(in_grad):
                c = torch.zeros_like(g)
                c[:, : n - B] = g[:, B:]
                incoming = inflow[d - 1]
                if incoming is not None:
                    c[:, n - B :] = incoming[j]
                cot.append(c)
            if profile:
                _record(samples, d, cot, weights, p0, p1, B)
            if d == max_lag:
                break
            grads = torch.autograd.grad(parts(h_out), [*params, *parts(h_in)], grad_outputs=cot,
                                        retain_graph=True, allow_unused=True)
            _accumulate(per_lag, names, grads[: len(params)], d)
            in_grad = [g if g is not None else torch.zeros_like(s) for g, s in zip(grads[len(params):], parts(h_in))]
            outflow.append(tuple(g[:, :B] for g in in_grad))
        inflow = outflow[:max_lag] + [None] * (max_lag - len(outflow))
        del features, h_out, loss, grads
    return LagDecomposition(per_lag, max_lag, samples)


def _accumulate(per_lag: dict[str, torch.Tensor], names: list[str], grads: Sequence[torch.Tensor | None], d: int) -> None:
    for name, g in zip(names, grads):
        if g is not None:
            per_lag[name][d] += g


def _record(samples: LagSamples, d: int, cot: list[torch.Tensor], weights: torch.Tensor, p0: int, p1: int, B: int) -> None:
    """φ_d of every scored pair in rows of steps ``s = p0..p1-1`` (loss ``t = s + d``)."""
    T = weights.shape[1]
    last = min(p1, T - d)  # steps s with s + d ≤ T - 1
    if last <= p0:
        return
    n = (last - p0) * B
    used = [c[:, :n] for c in cot]
    w = weights[:, p0 + d : last + d].transpose(0, 1).reshape(-1)  # rows position-major, like cot
    keep = w != 0
    if not bool(keep.any()):
        return
    phi = (row_norms(used, n) * B)[keep]
    vec = (_row_vectors(used, n) * B)[keep].sum(0)
    samples.phi[d - 1].append(phi.cpu().numpy())
    prev = samples.vector_sum[d - 1]
    samples.vector_sum[d - 1] = vec.cpu().numpy() if prev is None else prev + vec.cpu().numpy()


def lag_samples(model: nn.Module, source: Source, loss_kind: str, max_lag: int, state: State | None = None) -> LagSamples:
    """Only the profile samples of :func:`lag_decomposition` (same cost)."""
    return lag_decomposition(model, source, loss_kind, max_lag, state).samples


@dataclass(frozen=True)
class DecayFit:
    """``log φ̄_d ≈ intercept + d·log(rate)`` over lags ``fit_from..fit_to``."""

    rate: float
    intercept: float
    rate_robust: float
    intercept_robust: float
    rate_robust_lo: float
    rate_robust_hi: float
    fit_from: int
    fit_to: int
    n_points: int
    r_squared: float = math.nan


@dataclass(frozen=True)
class DecayCheck:
    """Whether the measured profile supports the geometric-tail assumption of the extrapolation."""

    geometric: bool
    reason: str
    r_squared: float
    rate: float
    rate_robust_hi: float
    extrapolated_share: float


def fit_decay(lags: np.ndarray, values: np.ndarray, fit_from: int = 1, fit_to: int | None = None) -> DecayFit:
    """Geometric decay rate of ``values`` over ``lags``: least squares on the log, and Theil–Sen."""
    fit_to = int(lags.max()) if fit_to is None and len(lags) else (fit_to or 0)
    sel = (lags >= fit_from) & (lags <= fit_to) & np.isfinite(values) & (values > 0)
    x, y = lags[sel].astype(float), np.log(values[sel])
    nan = math.nan
    if len(x) < 2:
        return DecayFit(nan, nan, nan, nan, nan, nan, fit_from, fit_to, int(len(x)))
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    spread = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / spread if spread > 0 else 1.0
    from scipy import stats  # imported where used: the CLI starts without scipy

    ts = stats.theilslopes(y, x, alpha=0.95)
    return DecayFit(float(np.exp(slope)), float(intercept), float(np.exp(ts.slope)), float(ts.intercept),
                    float(np.exp(ts.low_slope)), float(np.exp(ts.high_slope)), fit_from, fit_to, int(len(x)), r2)


@dataclass
class LagProfile:
    """The lag profile φ_d (d = 1..D): statistics over scored losses, decay fit, tails and extrapolations."""

    lags: np.ndarray
    mean: np.ndarray
    q10: np.ndarray
    q50: np.ndarray
    q90: np.ndarray
    n_pairs: np.ndarray
    mean_vector: list[np.ndarray | None]
    scored: np.ndarray
    horizon: int
    fit: DecayFit
    use_robust: bool = False

    @property
    def n_losses(self) -> float:
        return float(self.scored.sum())

    @property
    def max_lag(self) -> int:
        return int(self.lags[-1]) if len(self.lags) else 0

    @property
    def rate(self) -> float:
        """The fitted decay rate used for extrapolation (least squares, or Theil–Sen if ``use_robust``)."""
        return self.fit.rate_robust if self.use_robust else self.fit.rate

    def _reach(self, d: int) -> float:
        """Fraction of scored losses that have a lag ``d`` (``t ≥ d``)."""
        return float(self.scored[d:].sum()) / self.n_losses if self.n_losses else 0.0

    def mean_at(self, d: int) -> float:
        """φ̄_d: measured for ``d ≤ D``, the fitted geometric curve beyond."""
        if 1 <= d <= self.max_lag and self.n_pairs[d - 1] > 0:
            return float(self.mean[d - 1])
        if d > self.max_lag:
            if self.use_robust:
                return float(np.exp(self.fit.intercept_robust + d * np.log(self.fit.rate_robust)))
            return float(np.exp(self.fit.intercept + d * np.log(self.fit.rate)))
        return 0.0

    def dropped_tail(self, kept: np.ndarray, extrapolate: bool = True) -> float:
        """Mean over scored losses of Σ_d φ_d(t) over the lags each loss drops.

        ``kept[t]`` is the number of lags loss ``t`` receives (lags ``0..kept[t]-1``); it drops lags
        ``kept[t]..t``. Lags beyond D use the fitted curve (or count 0 with ``extrapolate=False``);
        lags beyond the horizon do not exist.
        """
        n = self.n_losses
        if n == 0:
            return math.nan
        T = self.horizon
        delta = np.zeros(T + 1)
        lo = np.clip(kept[:T], 1, T)
        for t in np.flatnonzero(self.scored[:T]):
            if lo[t] <= t:
                delta[lo[t]] += self.scored[t]
                delta[t + 1] -= self.scored[t]
        frac = np.cumsum(delta)[:T] / n
        total = 0.0
        for d in np.flatnonzero(frac > 0):
            if not extrapolate and d > self.max_lag:
                break
            value = self.mean_at(int(d))
            if not math.isfinite(value):
                return math.inf
            total += value * float(frac[d])
        return total

    def tail(self, k: int) -> float:
        """Per-loss profile mass dropped by ``sliding(k)`` (lags ``d ≥ k``)."""
        t = np.arange(self.horizon)
        return self.dropped_tail(np.minimum(k, t + 1))

    def cumulative_norm(self, k: int) -> float:
        """‖Σ_{1≤d<k} m_d‖: the state-space proxy of the gradient kept by ``sliding(k)`` (measured lags)."""
        vecs = [v for v in self.mean_vector[: max(0, min(k, self.max_lag + 1) - 1)] if v is not None]
        return float(np.linalg.norm(np.sum(vecs, axis=0))) if vecs else 0.0

    def lower_norm(self) -> float:
        """A lower bound on the norm of the state-space gradient proxy: max_K (cum(K) - tail(K))."""
        best = 0.0
        for k in range(2, self.max_lag + 2):
            best = max(best, self.cumulative_norm(k) - self.tail(k))
        return best

    def extrapolated_bias(self, k: int) -> float:
        """Extrapolated relative bias of ``sliding(k)`` (after Aicher et al.): tail / lower. Not a bound."""
        return _ratio(self.tail(k), self.lower_norm())

    def method_extrapolation(self, updates: Sequence[Update], length: int | None = None) -> float:
        """The same extrapolation for any method, given its updates: the mass its mask drops, over lower."""
        return _ratio(self.dropped_tail(kept_lags(updates, length or self.horizon)), self.lower_norm())

    def decay_check(self, min_r2: float = 0.9) -> DecayCheck:
        """Check the geometric-tail assumption on the measured lags.

        It holds when at least three lags were fitted, log φ̄_d is close to a line (R² ≥ ``min_r2``), and
        the Theil–Sen interval of the rate lies below 1 (the profile decays). ``extrapolated_share`` is
        the part of sliding(1)'s dropped mass that comes from lags beyond D, i.e. from the assumption.
        """
        f = self.fit
        measured = self.dropped_tail(np.minimum(np.arange(self.horizon) + 1, 1), extrapolate=False)
        total = self.tail(1)
        share = 0.0 if total == 0 or not math.isfinite(total) else max(0.0, 1.0 - measured / total)
        if f.n_points < 3:
            reason = f"only {f.n_points} lags with a positive profile to fit (need ≥ 3)"
        elif not f.rate_robust_hi < 1.0:
            reason = f"no decay: the rate's 95% interval reaches {f.rate_robust_hi:.3g} ≥ 1"
        elif not f.r_squared >= min_r2:
            reason = f"not geometric: R² of the log-linear fit is {f.r_squared:.3f} < {min_r2}"
        else:
            reason = ""
        return DecayCheck(not reason, reason or "geometric decay fits the measured lags",
                          f.r_squared, self.rate, f.rate_robust_hi, share)

    def to_frame(self) -> "pd.DataFrame":
        """One row per lag d: statistics, fitted curves and rates, tail and extrapolated bias of sliding(K = d)."""
        f = self.fit
        lower = self.lower_norm()
        fitted = np.exp(f.intercept + self.lags * np.log(f.rate)) if math.isfinite(f.rate) else np.full(len(self.lags), math.nan)
        robust = (np.exp(f.intercept_robust + self.lags * np.log(f.rate_robust))
                  if math.isfinite(f.rate_robust) else np.full(len(self.lags), math.nan))
        tails = np.array([self.tail(int(k)) for k in self.lags])
        import pandas as pd  # imported where used: the CLI starts without pandas

        return pd.DataFrame({
            "lag": self.lags, "mean": self.mean, "q10": self.q10, "q50": self.q50, "q90": self.q90,
            "mass": self.mean * np.array([self._reach(int(d)) for d in self.lags]),
            "n_pairs": self.n_pairs, "fitted": fitted, "fitted_robust": robust,
            "rate": f.rate, "rate_robust": f.rate_robust, "rate_robust_lo": f.rate_robust_lo,
            "rate_robust_hi": f.rate_robust_hi, "fit_from": f.fit_from, "fit_to": f.fit_to,
            "r_squared": f.r_squared, "tail": tails, "lower_norm": lower,
            "extrapolation": [_ratio(t, lower) for t in tails], "decay_geometric": self.decay_check().geometric,
            "horizon": self.horizon,
        })


def _ratio(a: float, b: float) -> float:
    if not math.isfinite(a):
        return math.inf
    if a == 0.0:
        return 0.0
    return a / b if b > 0 else math.inf


def kept_lags(updates: Sequence[Update], length: int) -> np.ndarray:
    """For each loss ``t`` of a sequence of ``length``, how many lags it receives (``0..kept-1``).

    Read from a method's updates over that length (the mask): loss ``t`` reaches steps ``start_for(t)..t``.
    """
    owner = update_owner(updates, length)
    return np.array([t - updates[owner[t]].start_for(t) + 1 for t in range(length)])


def build_profile(samples: LagSamples, fit_from: int = 1, fit_to: int | None = None, robust: bool = False) -> LagProfile:
    """Statistics of pooled lag samples and the geometric decay fit."""
    D = samples.max_lag
    lags = np.arange(1, D + 1)
    mean, q10, q50, q90, n_pairs = (np.full(D, math.nan) for _ in range(5))
    for i in range(D):
        values = np.concatenate(samples.phi[i]) if samples.phi[i] else np.zeros(0)
        n_pairs[i] = len(values)
        if len(values):
            mean[i] = values.mean()
            q10[i], q50[i], q90[i] = np.quantile(values, [0.1, 0.5, 0.9])
    n_pairs = np.nan_to_num(n_pairs).astype(int)
    assert samples.scored is not None
    n_losses = float(samples.scored.sum())
    vectors = [None if v is None or n_losses == 0 else v / n_losses for v in samples.vector_sum]
    fit = fit_decay(lags, mean, fit_from, fit_to if fit_to is not None else D)
    return LagProfile(lags, mean, q10, q50, q90, n_pairs, vectors, samples.scored.copy(), samples.horizon, fit, robust)


def lag_profile(
    model: nn.Module,
    source: Source,
    loss_kind: str,
    max_lag: int,
    state: State | None = None,
    *,
    fit_from: int = 1,
    fit_to: int | None = None,
    robust: bool = False,
) -> LagProfile:
    """The lag profile φ_1..φ_D of one source: mean and quantiles per lag, decay fit, extrapolations.

    ``robust=True`` extrapolates the tail with the Theil–Sen rate instead of least squares.
    """
    return build_profile(lag_samples(model, source, loss_kind, max_lag, state), fit_from, fit_to, robust)


def extrapolated_bias(profile: LagProfile, k: int) -> float:
    """Extrapolated relative bias of ``sliding(k)`` from a lag profile (after Aicher, Foti & Fox 2019).

    An estimate under two assumptions (module docstring), not a bound."""
    return profile.extrapolated_bias(k)


def decomposition_profile(decompositions: Sequence[LagDecomposition], fit_from: int = 1, robust: bool = False) -> LagProfile:
    """Pool the profile samples of several decompositions (same T and D) into one profile."""
    pooled = decompositions[0].samples
    for dec in decompositions[1:]:
        pooled = pooled.merge(dec.samples)
    return build_profile(pooled, fit_from, None, robust)
