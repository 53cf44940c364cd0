"""Bias of a gradient estimator's *expectation*, estimated without the plug-in's upward bias.

For a fixed θ and N independent batches we have d_i = ĝ_i − g_i and g_i (rows of N×P arrays). The
quantity of interest is ‖E d‖ / ‖E g‖. The plug-in ‖mean d‖ / ‖mean g‖ over-states it, because
E‖mean d‖² = ‖E d‖² + tr Cov(d)/N: an exactly unbiased method looks biased by its own noise.

This module estimates ‖E d‖² and ‖E g‖² with the U-statistic U(x) = Σ_{i≠j} x_iᵀx_j / N(N−1), which
is unbiased (E U = ‖E x‖², also when E x = 0); gives ‖E d‖ and the ratio ‖E d‖/‖E g‖ confidence
intervals by a studentised bootstrap over batches (standard errors of U from its unbiased Hoeffding
variance, the jackknife's where that is not positive, the sample's never below a bias-corrected plug-in
floor; Fieller's linear combination for the ratio),
with 0 inside exactly when the sign-flip test does not reject; and tests E d = 0 three ways (sign-flip
randomisation, exact by enumeration up to 16 batches; Chen–Qin normal approximation; Hotelling's T²).
Derivations, assumptions and measured coverage: docs/statistics.md.

Everything works on the N×N Gram matrices, so the cost is O(N²P) for the Gram matrices and O(B N²)
for B bootstrap resamples (a resample is a vector of batch counts, so each costs a few length-N by
N×N products); nothing here depends on torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from tbptt_bench.analysis.bias_options import FLIPS
from tbptt_bench.errors import UsageError

log = logging.getLogger(__name__)

#: Random sign patterns drawn for the randomisation test (p-values are multiples of 1/(n_flips+1)); declared with
#: the bias options, which the command line reads without importing scipy.
DEFAULT_FLIPS = FLIPS
#: Up to this many batches the sign-flip test enumerates all 2^(N−1) distinct patterns (exact p-value).
MAX_ENUMERATED_BATCHES = 16
#: The variance estimates need four distinct batches.
MIN_BATCHES_FOR_INTERVALS = 4

__all__ = [
    "DEFAULT_FLIPS", "ExpectationBias", "SqNormSummary", "ZeroMeanTest", "expectation_bias",
    "sq_norm_interval", "sq_norm_summary", "unbiased_sq_norm_of_mean", "zero_mean_test",
]


# -- input ---------------------------------------------------------------------------------------


def _as_rows(name: str, x: ArrayLike) -> np.ndarray:
    """``x`` as a finite float64 array of shape (N batches, P parameters), N ≥ 2; else UsageError."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise UsageError(f"{name} must be a 2-D array of shape (N batches, P parameters); got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise UsageError(f"{name} has {arr.shape[0]} batch(es); an unbiased estimate of ‖E {name}‖² needs at "
                         f"least 2 independent batches (rows), and its interval at least {MIN_BATCHES_FOR_INTERVALS}")
    if arr.shape[1] < 1:
        raise UsageError(f"{name} has no columns; need at least one parameter")
    if not np.isfinite(arr).all():
        raise UsageError(f"{name} contains NaN or infinite values; every entry must be finite")
    return arr


def _as_pair(d: ArrayLike, g: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays validated, with the same shape (one row per batch, one column per parameter)."""
    d_arr, g_arr = _as_rows("d", d), _as_rows("g", g)
    if d_arr.shape != g_arr.shape:
        raise UsageError(f"d and g must have the same shape (N batches, P parameters); got {d_arr.shape} "
                         f"and {g_arr.shape}")
    return d_arr, g_arr


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    """A Generator from a seed, or the Generator itself (never the global numpy state)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


# -- the U-statistic and its variance -------------------------------------------------------------


def unbiased_sq_norm_of_mean(x: ArrayLike) -> float:
    """Unbiased estimate of ‖E x‖² from the rows of ``x``: Σ_{i≠j} x_iᵀx_j / N(N−1), in O(NP).

    Computed as (‖Σ_i x_i‖² − Σ_i ‖x_i‖²) / N(N−1). It can be negative (when E x is small against the
    noise); that is the price of unbiasedness, and averaging it over runs stays unbiased.
    """
    arr = _as_rows("x", x)
    n = arr.shape[0]
    total = arr.sum(axis=0)
    return float((total @ total - np.einsum("ij,ij->", arr, arr)) / (n * (n - 1)))


def _falling(n: int, k: int) -> float:
    """n (n−1) … (n−k+1): the number of ordered k-tuples of distinct batches."""
    return float(math.prod(range(n - k + 1, n + 1)))


def _components(k: np.ndarray, l: np.ndarray) -> tuple[float, float]:
    """Unbiased estimates of the Hoeffding components of two kernels, polarised (bilinear in K, L).

    K and L are N×N symmetric kernel matrices (K_ij = h(x_i, x_j)); only off-diagonal entries are
    used. With K = L = Gram: (μᵀΣμ, tr Σ²). The three sums over distinct indices
        pair = Σ_{i≠j} K_ij L_ij,  path = Σ_{i,j,k distinct} K_ij L_jk,  disjoint = Σ_{i,j,k,l distinct} K_ij L_kl
    are unbiased for N(N−1)·E[h12²], (N)_3·E[h12 h23], (N)_4·θ²; inclusion–exclusion gives them in O(N²).
    Returns (ζ1, δ): ζ1 = Var E[h(X, Y) | X], δ = ζ2 − 2ζ1 the variance of the degenerate part.
    """
    n = k.shape[0]
    k0, l0 = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    rk, rl = k0.sum(axis=1), l0.sum(axis=1)
    pair = float(np.einsum("ij,ij->", k0, l0))
    path = float(rk @ rl) - pair
    disjoint = float(rk.sum() * rl.sum()) - 4.0 * path - 2.0 * pair
    sq_mean = disjoint / _falling(n, 4)
    zeta1 = path / _falling(n, 3) - sq_mean
    zeta2 = pair / _falling(n, 2) - sq_mean
    return zeta1, zeta2 - 2.0 * zeta1


def _top_eigenvalue(gram: np.ndarray) -> float:
    """Largest eigenvalue of the sample covariance (ddof 1), from the centred N×N Gram matrix."""
    centred = gram - gram.mean(axis=0) - gram.mean(axis=1)[:, None] + gram.mean()
    return max(float(np.linalg.eigvalsh(centred)[-1]) / (gram.shape[0] - 1), 0.0)


@dataclass(frozen=True)
class SqNormSummary:
    """U = Σ_{i≠j} x_iᵀx_j / N(N−1) with what its interval needs.

    Var(U) = 4 μᵀΣμ / N + 2 tr Σ² / N(N−1) exactly (Hoeffding): ``linear`` and ``degenerate`` are
    unbiased estimates of μᵀΣμ and tr Σ² (either can come out negative). ``top_eigenvalue`` is the
    largest eigenvalue of the sample covariance, which caps μᵀΣμ ≤ λ_max ‖μ‖².
    """

    estimate: float
    linear: float
    degenerate: float
    top_eigenvalue: float
    n: int

    @property
    def rayleigh(self) -> float:
        """Estimate of r = μᵀΣμ / ‖μ‖² (linear / U, kept in [0, λ̂max]); λ̂max, the worst case, if U ≤ 0."""
        if self.estimate <= 0:
            return self.top_eigenvalue
        return min(max(self.linear / self.estimate, 0.0), self.top_eigenvalue)

    @property
    def se(self) -> float:
        """Standard error of U at the estimate: √(4 U⁺ r̂ / N + 2 max(tr Σ², 0) / N(N−1))."""
        n = self.n
        lin = 4.0 * max(self.estimate, 0.0) * self.rayleigh / n
        return math.sqrt(lin + 2.0 * max(self.degenerate, 0.0) / (n * (n - 1)))


def _summary(gram: np.ndarray) -> SqNormSummary:
    """All of :class:`SqNormSummary` from a Gram matrix (N ≥ 4)."""
    n = gram.shape[0]
    linear, degenerate = _components(gram, gram)
    u = float((gram.sum() - np.trace(gram)) / (n * (n - 1)))
    return SqNormSummary(u, linear, degenerate, _top_eigenvalue(gram), n)


def sq_norm_summary(x: ArrayLike) -> SqNormSummary:
    """U(x), unbiased estimates of μᵀΣμ and tr Σ², and λ̂max, from the rows of ``x``; N ≥ 4."""
    arr = _as_rows("x", x)
    if arr.shape[0] < MIN_BATCHES_FOR_INTERVALS:
        raise UsageError(f"the variance of the U-statistic needs at least {MIN_BATCHES_FOR_INTERVALS} batches; "
                         f"got {arr.shape[0]}")
    return _summary(arr @ arr.T)


# -- intervals: studentised bootstrap over batches, 0 decided by the sign-flip test ----------------

#: Bootstrap resamples of the batches for the studentised intervals.
DEFAULT_BOOTSTRAP = 999


def _check_level(level: float) -> None:
    """UsageError unless 0 < level < 1."""
    if not 0.0 < level < 1.0:
        raise UsageError(f"level must be strictly between 0 and 1 (e.g. 0.95); got {level}")


def _resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of the n batches occurs in each row of ``idx`` (shape [R, N]), as floats."""
    offsets = (np.arange(idx.shape[0])[:, None] * n + idx).ravel()
    return np.bincount(offsets, minlength=idx.shape[0] * n).reshape(idx.shape[0], n).astype(np.float64)


def _weighted_u(k: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """U of each resample and its leave-one-out values, from a kernel matrix K (N×N) and counts w (R×N).

    A resample holds batch i w_i times; its Gram matrix is K at the drawn indices, so every sum over
    distinct *positions* is a sum over batches weighted by w (K w per resample: O(N²), no gathering).
    Leave-one-out value i drops one copy of batch i (the jackknife weighs it by w_i).
    """
    n = k.shape[0]
    diag = np.diag(k)
    kw = w @ k
    total, trace = (kw * w).sum(-1), w @ diag
    u = (total - trace) / (n * (n - 1))
    loo = ((total[:, None] - 2.0 * kw + diag) - (trace[:, None] - diag)) / ((n - 1) * (n - 2))
    return u, loo


def _weighted_jackknife(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Jackknife covariance (N−1)/N Σ_positions (a − ā)(b − b̄) of leave-one-out values, weighted by counts w."""
    n = w.shape[-1]
    ca = a - (w * a).sum(-1, keepdims=True) / n
    cb = b - (w * b).sum(-1, keepdims=True) / n
    return (n - 1) / n * (w * ca * cb).sum(-1)


def _weighted_variance(k: np.ndarray, l: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Unbiased (Hoeffding) estimate of Cov(U_K, U_L) = 4ζ1/N + 2δ/N(N−1) per resample (counts w, R×N).

    The sums of :func:`_components` over distinct positions, written with the counts (a position pair
    that repeats a batch still counts: the resampled rows are independent draws). Can be ≤ 0.
    """
    n = k.shape[0]
    dk, dl = np.diag(k), np.diag(l)
    pair = (w * (w @ (k * l))).sum(-1) - w @ (dk * dl)
    rk, rl = w @ k - dk, w @ l - dl
    path = (w * rk * rl).sum(-1) - pair
    disjoint = (w * rk).sum(-1) * (w * rl).sum(-1) - 4.0 * path - 2.0 * pair
    sq_mean = disjoint / _falling(n, 4)
    zeta1 = path / _falling(n, 3) - sq_mean
    zeta2 = pair / _falling(n, 2) - sq_mean
    return 4.0 * zeta1 / n + 2.0 * (zeta2 - 2.0 * zeta1) / _falling(n, 2)


def _quadratic(coef: tuple[float, float, float], x: np.ndarray | float) -> np.ndarray | float:
    """c_dd − 2x c_dg + x² c_gg: a bilinear component of U_d − x U_g from its three polarised parts."""
    return coef[0] - 2.0 * x * coef[1] + x * x * coef[2]


@dataclass(frozen=True)
class _VarianceFloor:
    """A second estimate of Var(U_d − x U_g) for the sample itself, which its studentising variance never
    goes below (:meth:`_Pivot.var`).

    The unbiased Hoeffding estimate of the linear component ζ1 = Var(μ_dᵀd − x μ_gᵀg) is a difference of two
    large terms (E[h12 h13] and the square of the mean), so at N = 8 it can come out far below ζ1, and the
    interval's upper end with it. The floor takes the larger of that estimate and the plug-in sample variance
    of d̄ᵀd_i − x ḡᵀg_i less its leading bias δ/N (exact for Gaussian rows: E[āᵀMΣ̂Mā] = ζ1 + tr((MΣ)²)/N,
    M = diag(I, −xI)), keeping the unbiased degenerate component δ. The resamples keep the plain
    estimate: the floor only ever widens the bootstrap-t interval. docs/statistics.md has the measurements.
    """

    zeta1: tuple[float, float, float]
    delta: tuple[float, float, float]
    plug_in: tuple[float, float, float]
    n: int

    @classmethod
    def of(cls, gd: np.ndarray, gg: np.ndarray) -> _VarianceFloor:
        """The three polarised parts of ζ1, δ and the plug-in linear variance, from the sample's Gram matrices."""
        dd, dg, gg_ = _components(gd, gd), _components(gd, gg), _components(gg, gg)
        rows = np.stack([gd.mean(axis=1), gg.mean(axis=1)])  # d̄ᵀd_i, ḡᵀg_i
        cov = np.cov(rows, ddof=1)
        return cls((dd[0], dg[0], gg_[0]), (dd[1], dg[1], gg_[1]),
                   (float(cov[0, 0]), float(cov[0, 1]), float(cov[1, 1])), gd.shape[0])

    def _combine(self, zeta1: np.ndarray | float, delta: np.ndarray | float,
                 plug_in: np.ndarray | float) -> np.ndarray | float:
        """4 max(ζ̂1, plug-in − δ̂⁺/N)/N + 2 δ̂⁺/N(N−1) from one kernel's three estimates."""
        n = self.n
        delta = np.maximum(delta, 0.0)
        return 4.0 * np.maximum(zeta1, plug_in - delta / n) / n + 2.0 * delta / (n * (n - 1))

    def var(self, x: np.ndarray | float) -> np.ndarray | float:
        """The floor for U_d − x U_g."""
        return self._combine(_quadratic(self.zeta1, x), _quadratic(self.delta, x), _quadratic(self.plug_in, x))

    def var_gg(self) -> float:
        """The floor for U_g alone (the coefficient of x² as x → ∞)."""
        return float(self._combine(self.zeta1[2], self.delta[2], self.plug_in[2]))


@dataclass(frozen=True)
class _Pivot:
    """U(d), U(g) of R data sets and two estimates of Var(U_d − x U_g) = v_dd − 2x v_dg + x² v_gg.

    ``hoeffding`` (unbiased, can be ≤ 0) is used where positive, else ``jackknife`` (never negative); the
    sample's own pivot also has a ``floor`` (:class:`_VarianceFloor`), the resamples' do not.
    """

    ud: np.ndarray
    ug: np.ndarray
    hoeffding: tuple[np.ndarray, np.ndarray, np.ndarray]
    jackknife: tuple[np.ndarray, np.ndarray, np.ndarray]
    floor: _VarianceFloor | None = None

    @classmethod
    def of(cls, gd: np.ndarray, gg: np.ndarray, w: np.ndarray) -> _Pivot:
        """Pivots of the data sets that hold batch i w[r, i] times (resamples; no floor)."""
        ud, d_loo = _weighted_u(gd, w)
        ug, g_loo = _weighted_u(gg, w)
        hoeffding = (_weighted_variance(gd, gd, w), _weighted_variance(gd, gg, w), _weighted_variance(gg, gg, w))
        jackknife = (_weighted_jackknife(d_loo, d_loo, w), _weighted_jackknife(d_loo, g_loo, w),
                     _weighted_jackknife(g_loo, g_loo, w))
        return cls(ud, ug, hoeffding, jackknife)

    @classmethod
    def sample(cls, gd: np.ndarray, gg: np.ndarray) -> _Pivot:
        """The pivot of the sample itself, with its variance floor."""
        return replace(cls.of(gd, gg, np.ones((1, gd.shape[0]))), floor=_VarianceFloor.of(gd, gg))

    def var(self, x: np.ndarray | float) -> np.ndarray:
        """Estimated Var(U_d − x U_g): Hoeffding's where positive, else the jackknife's; never below the floor."""
        unbiased = _quadratic(self.hoeffding, x)
        out = np.where(unbiased > 0, unbiased, np.maximum(_quadratic(self.jackknife, x), 0.0))
        return out if self.floor is None else np.maximum(out, self.floor.var(x))

    def z(self, x: np.ndarray | float) -> np.ndarray:
        """The studentised (U_d − x U_g) / √Var at x = s², s the hypothesised ratio (0/0 counts as 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (self.ud - x * self.ug) / np.sqrt(self.var(x))
        return np.where(np.isnan(out), 0.0, out)

    def t(self, truth: np.ndarray | float) -> np.ndarray:
        """The studentised (U_d − truth) / SE(U_d) for ‖E d‖² (0/0 counts as 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (self.ud - truth) / np.sqrt(self.var(0.0))
        return np.where(np.isnan(out), 0.0, out)

    def limit(self) -> float:
        """lim_{s→∞} Z(s²) = −U_g / √Var(U_g) of the first data set (±inf when that variance is 0)."""
        hgg, jgg = float(self.hoeffding[2][0]), float(self.jackknife[2][0])
        vgg = hgg if hgg > 0 else max(jgg, 0.0)
        if self.floor is not None:
            vgg = max(vgg, self.floor.var_gg())
        ug = float(self.ug[0])
        return -ug / math.sqrt(vgg) if vgg > 0 else -math.copysign(math.inf, ug)


def _bootstrap_quantiles(gd: np.ndarray, gg: np.ndarray, level: float, n_boot: int,
                         rng: np.random.Generator) -> tuple[tuple[float, float], tuple[float, float]]:
    """Quantiles (α/2, 1 − α/2) of the studentised pivots over ``n_boot`` resamples of the batches:
    (U*_d − ‖d̄‖²)/SE* for the norm, and Z*(s_b²) for the ratio at the resampled world's truth
    s_b² = ‖d̄‖²/‖ḡ‖² (rows drawn with replacement are i.i.d. from the sample, whose means are d̄, ḡ)."""
    n = gd.shape[0]
    x_d, x_g = gd.sum() / n**2, gg.sum() / n**2  # ‖d̄‖², ‖ḡ‖²
    x_b = x_d / x_g if x_g > 0 else 0.0
    piv = _Pivot.of(gd, gg, _resample_counts(rng.integers(0, n, size=(n_boot, n)), n))
    tail = (1.0 - level) / 2.0
    qn, qr = _quantiles(piv.t(x_d), tail), _quantiles(piv.z(x_b), tail)
    return (float(qn[0]), float(qn[1])), (float(qr[0]), float(qr[1]))


def _quantiles(x: np.ndarray, tail: float) -> np.ndarray:
    """Quantiles ``tail`` and ``1 − tail`` of ``x``, interpolated; one that falls between two infinite values
    (resamples with zero variance) is that infinity, not the NaN interpolation would give."""
    probs = np.array([tail, 1.0 - tail])
    with np.errstate(invalid="ignore"):
        q = np.quantile(x, probs)
    between_infinities = np.isnan(q)
    if between_infinities.any():
        q[between_infinities] = np.quantile(x, probs[between_infinities], method="nearest")
    return q


def _ratio_range(piv: _Pivot, q: tuple[float, float]) -> tuple[float, float]:
    """Hull of {s ≥ 0 : q_lo ≤ Z(s²) ≤ q_hi} (Fieller: the studentised U_d − s² U_g, never a quotient).

    Z is continuous in s, so a fine logarithmic grid around the scale of the data finds the accepted
    stretches and bisection pins their ends to ~1e-12; the set is unbounded (hi = inf) when Z's limit
    −U_g/√vgg lies in [q_lo, q_hi], i.e. when E g cannot be told from 0. Empty: (0, 0).
    """
    ud, ug = float(piv.ud[0]), float(piv.ug[0])
    vdd, vgg = float(piv.var(0.0)[0]), float(piv.jackknife[2][0])
    scale = math.sqrt(max(abs(ud), math.sqrt(vdd), np.finfo(float).tiny)
                      / max(abs(ug), math.sqrt(vgg), np.finfo(float).tiny))
    grid = np.concatenate([[0.0], scale * np.geomspace(1e-8, 1e8, 4001)])

    def accept(s: np.ndarray) -> np.ndarray:
        z = piv.z(s * s)
        return (z >= q[0]) & (z <= q[1])

    ok = accept(grid)
    if not ok.any():
        return 0.0, 0.0

    def edge(inside: float, outside: float) -> float:
        for _ in range(60):
            mid = 0.5 * (inside + outside)
            inside, outside = (mid, outside) if accept(np.array(mid)) else (inside, mid)
        return inside

    first, last = int(np.flatnonzero(ok)[0]), int(np.flatnonzero(ok)[-1])
    lo = grid[first] if first == 0 else edge(grid[first], grid[first - 1])
    limit = piv.limit()
    if q[0] <= limit <= q[1]:
        return float(lo), math.inf
    hi = grid[last] if last == grid.size - 1 else edge(grid[last], grid[last + 1])
    return float(lo), float(hi)


def bootstrap_intervals(gd: np.ndarray, gg: np.ndarray, level: float, *, zero: bool, n_boot: int = DEFAULT_BOOTSTRAP,
                        rng: np.random.Generator) -> tuple[tuple[float, float], tuple[float, float]]:
    """Intervals for ‖E d‖ and ‖E d‖/‖E g‖ from Gram matrices (N ≥ 4): studentised bootstrap over batches.

    ‖E d‖² is U_d − (bootstrap quantiles of (U* − ‖d̄‖²)/SE*)·SE, SE from the U-statistic's unbiased
    (Hoeffding) variance, the jackknife's where that is ≤ 0 (:meth:`_Pivot.var`), and for the sample itself
    never below :class:`_VarianceFloor`; mapped through √ (negative ends → 0). The ratio inverts the same
    pivot for the Fieller combination U_d − s² U_g (:func:`_ratio_range`). ``zero``: the data are consistent with
    E d = 0 (the sign-flip test does not reject at 1 − level), so both intervals start at 0 — the
    bootstrap cannot decide that itself, since a resampled world is never exactly unbiased.
    """
    piv = _Pivot.sample(gd, gg)
    qn, qr = _bootstrap_quantiles(gd, gg, level, n_boot, rng)
    se = math.sqrt(float(piv.var(0.0)[0]))
    ud = float(piv.ud[0])
    norm = (math.sqrt(max(ud - qn[1] * se, 0.0)), math.sqrt(max(ud - qn[0] * se, 0.0)))
    ratio = _ratio_range(piv, qr)
    if zero:
        norm, ratio = (0.0, norm[1]), (0.0, ratio[1])
    return norm, ratio


def sq_norm_interval(x: ArrayLike, level: float = 0.95, *, n_flips: int = DEFAULT_FLIPS,
                     seed: int | np.random.Generator = 0) -> tuple[float, float]:
    """Confidence interval for ‖E x‖² from the rows of ``x`` (N ≥ 4), as :func:`expectation_bias` gives it."""
    r = expectation_bias(x, np.ones_like(np.asarray(x, dtype=np.float64)), level=level, n_flips=n_flips, seed=seed)
    return r.bias_norm_lo**2, r.bias_norm_hi**2


# -- the test of E d = 0 ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ZeroMeanTest:
    """Tests of H0: E x = 0 against E x ≠ 0, all one-sided in the U-statistic (large U rejects).

    ``p_value`` is the sign-flip randomisation test: exact when each row is symmetric about 0 under
    H0, asymptotically valid (N → ∞, fixed P) when only E x = 0. Up to
    :data:`MAX_ENUMERATED_BATCHES` batches it enumerates every sign pattern (``flips_enumerated``), so it
    is the exact randomisation p-value, not a Monte Carlo one. ``p_value_min`` is the smallest p-value
    the test can give with these N and flips: above the test level, it cannot reject whatever the data. ``p_value_chen_qin`` is the normal
    approximation of Chen & Qin (2010), valid when P and N are both large; NaN for N < 4.
    ``p_value_hotelling`` is Hotelling's T² (exact for Gaussian rows), NaN unless N > P.
    """

    statistic: float
    p_value: float
    n_flips: int
    flips_enumerated: bool
    p_value_min: float
    chen_qin_z: float
    p_value_chen_qin: float
    hotelling_f: float
    p_value_hotelling: float


def sign_patterns(n: int) -> np.ndarray:
    """All 2^(n−1) sign vectors ε ∈ {±1}ⁿ with ε₁ = +1 (ε and −ε give the same ‖Σ ε_i x_i‖²), as rows."""
    bits = (np.arange(2 ** (n - 1))[:, None] >> np.arange(n - 1)) & 1
    return np.hstack([np.ones((2 ** (n - 1), 1)), 1.0 - 2.0 * bits])


def _sign_flip_p(gram: np.ndarray, n_flips: int, rng: np.random.Generator) -> tuple[float, bool, float]:
    """Randomisation p-value of ‖Σ ε_i x_i‖² = εᵀGε over signs ε (observed: ε = 1), whether every pattern
    was enumerated, and the smallest attainable p-value.

    Σ‖x_i‖² does not change under sign flips, so this ranks U itself. With N ≤ MAX_ENUMERATED_BATCHES
    every distinct pattern counts (p = #{patterns ≥ observed} / 2^(N−1), at least 2/2^N); otherwise
    p = (1 + #{random flips ≥ observed}) / (1 + n_flips), valid for any number of flips. Ties (within
    rounding) count against rejection.
    """
    n = gram.shape[0]
    tol = 1e-10 * max(float(np.trace(gram)), np.finfo(float).tiny)
    observed = float(gram.sum())
    if n <= MAX_ENUMERATED_BATCHES:
        signs = sign_patterns(n)
        quad = np.einsum("bi,bi->b", signs @ gram, signs)
        return float(np.count_nonzero(quad >= observed - tol) / signs.shape[0]), True, 1.0 / signs.shape[0]
    signs = rng.integers(0, 2, size=(n_flips, n)) * 2.0 - 1.0
    quad = np.einsum("bi,bi->b", signs @ gram, signs)
    floor = max(1.0 / (n_flips + 1), 2.0 ** (1 - n))
    return float((1 + np.count_nonzero(quad >= observed - tol)) / (n_flips + 1)), False, floor


def _hotelling(x: np.ndarray) -> tuple[float, float]:
    """Hotelling's one-sample T² as its F statistic, F(P, N−P) under H0 for Gaussian rows; NaN if N ≤ P."""
    n, p = x.shape
    if n <= p:
        return math.nan, math.nan
    mean = x.mean(axis=0)
    cov = np.atleast_2d(np.cov(x, rowvar=False, ddof=1))
    try:
        t2 = n * float(mean @ np.linalg.solve(cov, mean))
    except np.linalg.LinAlgError:
        log.warning("Hotelling's T²: singular sample covariance; p-value left NaN")
        return math.nan, math.nan
    f_stat = (n - p) / (p * (n - 1)) * t2
    return f_stat, float(stats.f.sf(f_stat, p, n - p))


def _zero_mean_test(x: np.ndarray, gram: np.ndarray, n_flips: int, rng: np.random.Generator) -> ZeroMeanTest:
    """All three tests from the data and its Gram matrix (shared with the intervals)."""
    n = x.shape[0]
    u = float((gram.sum() - np.trace(gram)) / (n * (n - 1)))
    z, p_cq = math.nan, math.nan
    if n >= MIN_BATCHES_FOR_INTERVALS:
        _, trace_sq = _components(gram, gram)
        if trace_sq > 0:
            z = u / math.sqrt(2.0 * trace_sq / (n * (n - 1)))
            p_cq = float(stats.norm.sf(z))
    f_stat, p_h = _hotelling(x)
    p_flip, enumerated, floor = _sign_flip_p(gram, n_flips, rng) if n_flips > 0 else (math.nan, False, math.nan)
    return ZeroMeanTest(u, p_flip, n_flips, enumerated, floor, z, p_cq, f_stat, p_h)


def zero_mean_test(x: ArrayLike, *, n_flips: int = DEFAULT_FLIPS,
                   seed: int | np.random.Generator = 0) -> ZeroMeanTest:
    """Test H0: E x = 0 from the rows of ``x`` (independent batches); see :class:`ZeroMeanTest`.

    ``n_flips = 0`` skips the sign-flip test; any other value enumerates every pattern when N is small
    and otherwise draws that many from ``seed`` (an int or a numpy Generator), so results repeat.
    """
    arr = _as_rows("x", x)
    if n_flips < 0:
        raise UsageError(f"n_flips must be ≥ 0 (0 skips the randomisation test); got {n_flips}")
    return _zero_mean_test(arr, arr @ arr.T, n_flips, _rng(seed))


# -- everything together --------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectationBias:
    """Bias of E ĝ against E g from N batches, with its uncertainty and the estimator's noise.

    sq_bias, sq_signal:   unbiased U-statistic estimates of ‖E d‖², ‖E g‖² (may be < 0); *_se their
                          standard errors at the estimate (:attr:`SqNormSummary.se`)
    bias_norm:            √max(sq_bias, 0), with interval bias_norm_lo/hi at ``level``
    relative_bias:        √(max(sq_bias, 0) / sq_signal) — a ratio of unbiased estimates: consistent,
                          not itself unbiased; NaN when sq_signal ≤ 0. Interval relative_bias_lo/hi by
                          Fieller-type test inversion (hi = inf when E g cannot be told from 0)
    *_plugin:             ‖mean d‖, ‖mean g‖ and their ratio — biased upward by tr Cov / N
    variance_trace:       tr Cov(d) (ddof 1); variance_trace_estimate: tr Cov(ĝ), ĝ = g + d
    snr_of_mean:          ‖E g‖² / (tr Cov(ĝ) / N), from the unbiased sq_signal: signal over the noise
                          of the mean of N estimates ĝ
    p_value, p_value_chen_qin, p_value_hotelling: tests of E d = 0 (:class:`ZeroMeanTest`);
                          p_value_min the smallest p the sign-flip test can reach here
    zero_in_interval:     whether 0 belongs to the confidence sets, decided by the sign-flip test at
                          1 − level; when False and ``*_lo`` is 0 the set is (0, hi]: every small
                          positive value is consistent with the data, 0 itself is not
    """

    n_batches: int
    n_params: int
    level: float
    sq_bias: float
    sq_bias_se: float
    sq_signal: float
    sq_signal_se: float
    bias_norm: float
    bias_norm_lo: float
    bias_norm_hi: float
    signal_norm: float
    relative_bias: float
    relative_bias_lo: float
    relative_bias_hi: float
    bias_norm_plugin: float
    signal_norm_plugin: float
    relative_bias_plugin: float
    variance_trace: float
    variance_trace_estimate: float
    snr_of_mean: float
    p_value: float
    p_value_chen_qin: float
    p_value_hotelling: float
    n_flips: int
    p_value_min: float = math.nan
    flips_enumerated: bool = False
    zero_in_interval: bool = True

    def as_row(self) -> dict[str, Any]:
        """The fields as a flat dict (one table row)."""
        return asdict(self)


def _ratio(num: float, den: float) -> float:
    """num / den for den > 0, else NaN."""
    return num / den if den > 0 else math.nan


def _intervals(gd: np.ndarray, gg: np.ndarray, level: float, zero: bool, rng: np.random.Generator) -> dict[str, float]:
    """SEs of both U-statistics and the intervals of :func:`bootstrap_intervals`; NaN below 4 batches."""
    n = gd.shape[0]
    if n < MIN_BATCHES_FOR_INTERVALS:
        log.warning("%d batches: intervals need at least %d; left NaN", n, MIN_BATCHES_FOR_INTERVALS)
        return dict.fromkeys(("sq_bias_se", "sq_signal_se", "bias_norm_lo", "bias_norm_hi",
                              "relative_bias_lo", "relative_bias_hi"), math.nan)
    (bias_lo, bias_hi), (rel_lo, rel_hi) = bootstrap_intervals(gd, gg, level, zero=zero, rng=rng)
    u_d = float((gd.sum() - np.trace(gd)) / (n * (n - 1)))
    u_g = float((gg.sum() - np.trace(gg)) / (n * (n - 1)))
    bias_hi = max(bias_hi, math.sqrt(max(u_d, 0.0)))  # the interval holds its own estimate
    if u_g > 0:
        rel_hi = max(rel_hi, math.sqrt(max(u_d, 0.0) / u_g))
    else:
        rel_hi = math.inf
    return {"sq_bias_se": _summary(gd).se, "sq_signal_se": _summary(gg).se, "bias_norm_lo": min(bias_lo, bias_hi),
            "bias_norm_hi": bias_hi, "relative_bias_lo": min(rel_lo, rel_hi), "relative_bias_hi": rel_hi}


def expectation_bias(d: ArrayLike, g: ArrayLike, *, level: float = 0.95, n_flips: int = DEFAULT_FLIPS,
                     seed: int | np.random.Generator = 0) -> ExpectationBias:
    """Estimate ‖E d‖, ‖E d‖/‖E g‖ with intervals, and test E d = 0, from N independent batches.

    ``d`` (N×P) holds ĝ_i − g_i and ``g`` (N×P) the true gradients g_i, one row per batch, all at the
    same θ. ``level`` is the two-sided confidence level; ``n_flips`` random sign patterns (from
    ``seed``, an int or numpy Generator) make the randomisation test. N ≥ 2 (intervals: N ≥ 4).
    """
    d_arr, g_arr = _as_pair(d, g)
    _check_level(level)
    if n_flips < 0:
        raise UsageError(f"n_flips must be ≥ 0 (0 skips the randomisation test); got {n_flips}")
    n, p = d_arr.shape
    gd, gg = d_arr @ d_arr.T, g_arr @ g_arr.T
    u_d = float((gd.sum() - np.trace(gd)) / (n * (n - 1)))
    u_g = float((gg.sum() - np.trace(gg)) / (n * (n - 1)))
    rng = _rng(seed)
    test = _zero_mean_test(d_arr, gd, n_flips, rng)
    # the intervals start at 0 exactly when the sign-flip test does not reject at 1 − level
    p_zero = test.p_value if n_flips > 0 else _sign_flip_p(gd, DEFAULT_FLIPS, rng)[0]
    est = d_arr + g_arr
    var_est = float(((est - est.mean(axis=0)) ** 2).sum() / (n - 1))
    mean_d, mean_g = float(np.linalg.norm(d_arr.mean(axis=0))), float(np.linalg.norm(g_arr.mean(axis=0)))
    result = ExpectationBias(
        n_batches=n, n_params=p, level=level,
        sq_bias=u_d, sq_signal=u_g,
        bias_norm=math.sqrt(max(u_d, 0.0)), signal_norm=math.sqrt(max(u_g, 0.0)),
        relative_bias=math.sqrt(max(u_d, 0.0) / u_g) if u_g > 0 else math.nan,
        bias_norm_plugin=mean_d, signal_norm_plugin=mean_g, relative_bias_plugin=_ratio(mean_d, mean_g),
        variance_trace=float(((d_arr - d_arr.mean(axis=0)) ** 2).sum() / (n - 1)),
        variance_trace_estimate=var_est, snr_of_mean=_ratio(u_g * n, var_est),
        p_value=test.p_value, p_value_chen_qin=test.p_value_chen_qin,
        p_value_hotelling=test.p_value_hotelling, n_flips=n_flips, p_value_min=test.p_value_min,
        flips_enumerated=test.flips_enumerated, zero_in_interval=bool(p_zero > 1.0 - level),
        **_intervals(gd, gg, level, p_zero > 1.0 - level, rng),
    )
    log.debug("expectation bias: N=%d P=%d relative %.4g [%.4g, %.4g], p=%.3g", n, p, result.relative_bias,
              result.relative_bias_lo, result.relative_bias_hi, result.p_value)
    return result
