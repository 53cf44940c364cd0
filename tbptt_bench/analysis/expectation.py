"""Bias of a gradient estimator's *expectation*, estimated without the plug-in's upward bias.

For a fixed θ and N independent batches we have d_i = ĝ_i − g_i and g_i (rows of N×P arrays). The
quantity of interest is ‖E d‖ / ‖E g‖. The plug-in ‖mean d‖ / ‖mean g‖ over-states it, because
E‖mean d‖² = ‖E d‖² + tr Cov(d)/N: an exactly unbiased method looks biased by its own noise.

This module estimates ‖E d‖² and ‖E g‖² with the U-statistic U(x) = Σ_{i≠j} x_iᵀx_j / N(N−1), which
is unbiased (E U = ‖E x‖², also when E x = 0); gives ‖E d‖ and the ratio ‖E d‖/‖E g‖ confidence
intervals by inverting a studentised test of each hypothesised value, with Var U from unbiased
estimates of its Hoeffding parts evaluated at the hypothesis (score-type, Fieller-type for the
ratio), so that an interval reaches 0 whenever the data are consistent with no bias; and tests
E d = 0 three ways (sign-flip randomisation, Chen–Qin normal approximation, Hotelling's T²).
Derivations, assumptions and measured coverage: docs/statistics.md.

Everything works on the N×N Gram matrices, so the cost is O(N²P) for the intervals and O(NP) for
the point estimates; nothing here depends on torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from tbptt_bench.errors import UsageError

log = logging.getLogger(__name__)

#: Random sign patterns drawn for the randomisation test (p-values are multiples of 1/(n_flips+1)).
DEFAULT_FLIPS = 999
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


# -- intervals by test inversion ------------------------------------------------------------------

#: The interval for ‖E x‖ alone is the ratio interval against an exactly known signal ‖E g‖ = 1
#: (no noise: zero variance parts; n is not used).
_UNIT_SIGNAL = SqNormSummary(1.0, 0.0, 0.0, 0.0, 0)


def _check_level(level: float) -> None:
    """UsageError unless 0 < level < 1."""
    if not 0.0 < level < 1.0:
        raise UsageError(f"level must be strictly between 0 and 1 (e.g. 0.95); got {level}")


def _critical_value(level: float, n: int) -> float:
    """Two-sided Student-t quantile with N−1 degrees of freedom (→ the normal one for large N)."""
    _check_level(level)
    return float(stats.t.ppf(0.5 + level / 2.0, df=n - 1))


def _clip(value: float, bound: float) -> float:
    """``value`` limited to [−bound, bound]."""
    return min(max(value, -bound), bound)


def _acceptance(d: SqNormSummary, g: SqNormSummary, cross: tuple[float, float], q: float, n: int) -> np.ndarray:
    """Coefficients in s (numpy.polyval order) of f(s) = (U_d − s² U_g)² − q² V(s); accept s iff f(s) ≤ 0.

    s is the hypothesised ‖E d‖ / ‖E g‖; W = U_d − s² U_g has mean 0 at the true s, and V(s) is its
    variance with every mean-dependent term evaluated *at the hypothesis* (a score interval, as
    Wilson's for a proportion): μ_dᵀΣ_dμ_d = s² ‖E g‖² r_d, μ_gᵀΣ_gμ_g = ‖E g‖² r_g, the cross term
    s ‖E g‖² c, with ‖E g‖² ≈ U_g, Rayleigh quotients r from :attr:`SqNormSummary.rayleigh` and c
    kept within ±√(r_d r_g); the degenerate parts clipped to a valid (positive semidefinite) pair.
    Then V(s) = 4 U_g s² (r_d − 2 s c + s² r_g) / N + 2 (δ_d − 2 s² δ_dg + s⁴ δ_g) / N(N−1) ≥ 0.
    """
    r_d, r_g = d.rayleigh, g.rayleigh
    bound = math.sqrt(r_d * r_g)
    if d.estimate > 0 and g.estimate > 0:
        c = _clip(cross[0] / math.sqrt(d.estimate * g.estimate), bound)
    else:
        c = -bound  # direction unknown: the sign that makes V largest
    deg_d, deg_g = max(d.degenerate, 0.0), max(g.degenerate, 0.0)
    deg_dg = _clip(cross[1], math.sqrt(deg_d * deg_g))
    a, b = 4.0 * max(g.estimate, 0.0) / n, 2.0 / (n * (n - 1))
    u_d, u_g = d.estimate, g.estimate
    resid = np.array([u_g * u_g, 0.0, -2.0 * u_d * u_g, 0.0, u_d * u_d])
    var = a * np.array([r_g, -2.0 * c, r_d, 0.0, 0.0]) + b * np.array([deg_g, 0.0, -2.0 * deg_dg, 0.0, deg_d])
    return resid - q * q * var


def _accepted_range(poly: np.ndarray, point: float, from_zero: bool) -> tuple[float, float]:
    """Hull of {s ≥ 0 : poly(s) ≤ 0}, widened to contain ``point`` (the estimate; NaN: none) and, with
    ``from_zero``, 0. Between consecutive real roots the sign is constant, so one probe each decides.
    An unbounded set gives hi = inf; an empty one (only when the estimate is below 0) gives (0, 0).
    """
    if not np.any(poly):
        return 0.0, math.inf
    roots = np.roots(np.trim_zeros(poly, "f"))
    # a tangent (double) root comes back with a tiny imaginary part; an extra grid point is harmless
    roots = roots[np.abs(roots.imag) <= 1e-6 * np.abs(roots)].real
    marks = [0.0, *roots[roots > 0.0]] + ([point] if math.isfinite(point) else [])
    grid = np.unique(marks)
    grid = np.append(grid, 2.0 * grid[-1] + 1.0)
    seg_in = np.polyval(poly, (grid[:-1] + grid[1:]) / 2.0) <= 0.0
    inside = np.concatenate([grid[:-1][seg_in], grid[1:][seg_in], grid[np.polyval(poly, grid) <= 0.0]])
    if math.isfinite(point):
        inside = np.append(inside, point)
    if from_zero:
        inside = np.append(inside, 0.0)
    if not inside.size:
        return 0.0, 0.0
    return float(inside.min()), (math.inf if seg_in[-1] else float(inside.max()))


def _norm_interval(x: SqNormSummary, q: float) -> tuple[float, float]:
    """Interval for ‖E x‖ (test inversion of U − s² against its variance at s)."""
    poly = _acceptance(x, _UNIT_SIGNAL, (0.0, 0.0), q, x.n)
    return _accepted_range(poly, math.sqrt(max(x.estimate, 0.0)), from_zero=x.estimate <= 0)


def sq_norm_interval(x: ArrayLike, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval for ‖E x‖² from the rows of ``x`` (N ≥ 4); see :func:`_acceptance`.

    It is {θ ≥ 0 : (U − θ)² ≤ t² (4 θ r̂ / N + 2 tr̂Σ² / N(N−1))}, t the Student quantile with N−1
    degrees of freedom: it contains 0 exactly when U ≤ t·√(2 tr̂Σ² / N(N−1)).
    """
    summary = sq_norm_summary(x)
    lo, hi = _norm_interval(summary, _critical_value(level, summary.n))
    return lo * lo, hi * hi


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

    def as_row(self) -> dict[str, Any]:
        """The fields as a flat dict (one table row)."""
        return asdict(self)


def _ratio(num: float, den: float) -> float:
    """num / den for den > 0, else NaN."""
    return num / den if den > 0 else math.nan


def _intervals(gd: np.ndarray, gg: np.ndarray, level: float) -> dict[str, float]:
    """SEs of both U-statistics, the interval for ‖E d‖ and the Fieller-type one for ‖E d‖ / ‖E g‖.

    The ratio's interval inverts the test of s = ‖E d‖/‖E g‖ built on the U-statistic of the kernel
    d_iᵀd_j − s² g_iᵀg_j (mean exactly 0 at the true s); its variance parts come from the polarised
    components of the two Gram matrices (see :func:`_acceptance`).
    """
    n = gd.shape[0]
    if n < MIN_BATCHES_FOR_INTERVALS:
        log.warning("%d batches: intervals need at least %d; left NaN", n, MIN_BATCHES_FOR_INTERVALS)
        return dict.fromkeys(("sq_bias_se", "sq_signal_se", "bias_norm_lo", "bias_norm_hi",
                              "relative_bias_lo", "relative_bias_hi"), math.nan)
    d, g = _summary(gd), _summary(gg)
    q = _critical_value(level, n)
    bias_lo, bias_hi = _norm_interval(d, q)
    point = math.sqrt(max(d.estimate, 0.0) / g.estimate) if g.estimate > 0 else math.nan
    rel_lo, rel_hi = _accepted_range(_acceptance(d, g, _components(gd, gg), q, n), point,
                                     from_zero=d.estimate <= 0)
    if g.estimate <= 0:
        rel_hi = math.inf
    return {"sq_bias_se": d.se, "sq_signal_se": g.se, "bias_norm_lo": bias_lo, "bias_norm_hi": bias_hi,
            "relative_bias_lo": rel_lo, "relative_bias_hi": rel_hi}


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
    test = _zero_mean_test(d_arr, gd, n_flips, _rng(seed))
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
        flips_enumerated=test.flips_enumerated,
        **_intervals(gd, gg, level),
    )
    log.debug("expectation bias: N=%d P=%d relative %.4g [%.4g, %.4g], p=%.3g", n, p, result.relative_bias,
              result.relative_bias_lo, result.relative_bias_hi, result.p_value)
    return result
