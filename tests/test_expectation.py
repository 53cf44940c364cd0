"""tbptt_bench.analysis.expectation against independent computations and by simulation.

Exact identities are checked against brute-force loops over index tuples and a published closed
form; unbiasedness, coverage, level and power by seeded simulation (tolerances a few binomial
standard errors wide, so the fixed seeds do not need to be lucky); the textbook tests against scipy.
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from tbptt_bench.analysis import expectation as ex
from tbptt_bench.errors import UsageError

# -- exact identities -----------------------------------------------------------------------------


def test_u_statistic_is_the_double_loop() -> None:
    x = np.random.default_rng(0).normal(0.3, 1.0, size=(9, 4))
    n = len(x)
    loop = sum(float(x[i] @ x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    assert ex.unbiased_sq_norm_of_mean(x) == pytest.approx(loop, rel=1e-12, abs=1e-12)
    assert ex.expectation_bias(x, x + 1.0, n_flips=0).sq_bias == pytest.approx(loop, rel=1e-12, abs=1e-12)


def _falling(n: int, k: int) -> int:
    return math.prod(range(n - k + 1, n + 1))


def _brute_components(k: np.ndarray, l: np.ndarray) -> tuple[float, float]:
    """ζ1 and δ = ζ2 − 2ζ1 from explicit sums over ordered tuples of distinct indices."""
    n = len(k)
    pair = sum(k[i, j] * l[i, j] for i, j in itertools.permutations(range(n), 2))
    path = sum(k[i, j] * l[j, m] for i, j, m in itertools.permutations(range(n), 3))
    disjoint = sum(k[i, j] * l[a, b] for i, j, a, b in itertools.permutations(range(n), 4))
    sq_mean = disjoint / _falling(n, 4)
    zeta1 = path / _falling(n, 3) - sq_mean
    return zeta1, pair / _falling(n, 2) - sq_mean - 2 * zeta1


def test_variance_components_are_the_explicit_tuple_sums() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.5, 1.0, size=(7, 3)), rng.normal(-0.2, 1.0, size=(7, 3))
    gx, gy = x @ x.T, y @ y.T
    for k, l in ((gx, gx), (gx, gy), (gy, gx)):
        # _components symmetrises over (K, L); the brute force is averaged over both orders
        a, b = _brute_components(k, l), _brute_components(l, k)
        np.testing.assert_allclose(ex._components(k, l), np.add(a, b) / 2, rtol=1e-10, atol=1e-12)


def test_trace_sigma_sq_estimate_is_himeno_yamadas_and_the_order_four_u_statistic() -> None:
    x = np.random.default_rng(2).normal(1.0, 2.0, size=(8, 5))
    n = len(x)
    centred = x - x.mean(0)
    s = centred.T @ centred / (n - 1)
    q = float(((centred**2).sum(1) ** 2).sum()) / (n - 1)
    # Himeno & Yamada (2014), unbiased for tr Σ² without normality
    hy = (n - 1) / (n * (n - 2) * (n - 3)) * ((n - 1) * (n - 2) * np.trace(s @ s) + np.trace(s) ** 2 - n * q)
    # E[((X1 − X2)ᵀ(X3 − X4))²] = 4 tr Σ²
    four = sum(float((x[i] - x[j]) @ (x[a] - x[b])) ** 2
               for i, j, a, b in itertools.permutations(range(n), 4)) / (4 * _falling(n, 4))
    est = ex.sq_norm_summary(x).degenerate
    assert est == pytest.approx(hy, rel=1e-10)
    assert est == pytest.approx(four, rel=1e-10)


def test_top_eigenvalue_is_that_of_the_sample_covariance() -> None:
    x = np.random.default_rng(3).normal(size=(12, 6)) * np.arange(1, 7)
    want = np.linalg.eigvalsh(np.cov(x, rowvar=False)).max()
    assert ex.sq_norm_summary(x).top_eigenvalue == pytest.approx(want, rel=1e-10)


# -- unbiasedness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mu_norm", [0.0, 0.5])
def test_u_statistic_and_variance_parts_are_unbiased(mu_norm: float) -> None:
    rng = np.random.default_rng(4)
    n, p, reps = 12, 20, 3000
    lam = 1.0 / np.arange(1, p + 1)
    mu = rng.normal(size=p)
    mu *= mu_norm / np.linalg.norm(mu)
    draws = np.array([(ex.unbiased_sq_norm_of_mean(x), s.linear, s.degenerate, np.sum(x.mean(0) ** 2))
                      for x in (mu + rng.normal(size=(n, p)) * np.sqrt(lam) for _ in range(reps))
                      for s in [ex.sq_norm_summary(x)]])
    u, lin, deg, plugin = draws.T
    se = draws.std(0, ddof=1) / math.sqrt(reps)
    theta, zeta1, trace_sq = mu @ mu, mu @ (lam * mu), float((lam**2).sum())
    assert abs(u.mean() - theta) < 4 * se[0]
    assert abs(lin.mean() - zeta1) < 4 * se[1]
    assert abs(deg.mean() - trace_sq) < 4 * se[2]
    # the plug-in carries tr Σ / N of noise: clearly above the truth
    assert plugin.mean() - theta == pytest.approx(lam.sum() / n, rel=0.1)
    # and Var U is Hoeffding's 4 μᵀΣμ / N + 2 tr Σ² / N(N−1)
    assert u.var(ddof=1) == pytest.approx(4 * zeta1 / n + 2 * trace_sq / (n * (n - 1)), rel=0.1)


# -- coverage -------------------------------------------------------------------------------------


def _coverage(n: int, p: int, kappa: float, *, top: bool, reps: int, seed: int) -> tuple[float, float]:
    """Share of intervals containing the true ‖E d‖ and ‖E d‖/‖E g‖ (κ = 0: containing 0).

    d_i = μ_d − 0.3 ξ_i + η_i, g_i = μ_g + ξ_i; noise covariance I, or diag(1/k) with the bias along
    its top direction (``top``); ‖μ_d‖² = κ null standard errors of U; ‖μ_g‖² ≈ 10 tr Cov(ĝ) / N.
    """
    rng = np.random.default_rng(seed)
    lam = 1.0 / np.arange(1, p + 1) if top else np.ones(p)
    sd = np.sqrt(lam)
    null_se = math.sqrt(2 * float((lam**2).sum()) / (n * (n - 1)))
    u = np.eye(p)[0] if top else rng.normal(size=p)
    mu_d = u / np.linalg.norm(u) * math.sqrt(kappa * null_se)
    mu_g = np.full(p, math.sqrt(10 * 2 * lam.sum() / n / p))
    truth, ratio = np.linalg.norm(mu_d), np.linalg.norm(mu_d) / np.linalg.norm(mu_g)
    hits = np.zeros(2)
    for _ in range(reps):
        xi = rng.normal(size=(n, p)) * sd
        r = ex.expectation_bias(mu_d - 0.3 * xi + rng.normal(size=(n, p)) * sd, mu_g + xi, n_flips=0, seed=rng)
        if kappa == 0:  # the set contains 0 exactly when the sign-flip test does not reject
            hits += r.zero_in_interval
        else:
            hits += [r.bias_norm_lo <= truth <= r.bias_norm_hi, r.relative_bias_lo <= ratio <= r.relative_bias_hi]
    return float(hits[0] / reps), float(hits[1] / reps)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "p", "kappa", "top", "seed"), [
    (16, 5, 0.0, False, 10), (8, 50, 0.0, True, 12),                      # unbiased: contains 0
    (16, 5, 10.0, False, 13), (8, 40, 10.0, True, 15), (32, 50, 3.0, False, 14),  # biased
])
def test_intervals_hold_their_coverage(n: int, p: int, kappa: float, top: bool, seed: int) -> None:
    # nominal 0.95; over 200 replicates the binomial SE is 0.015
    for cover in _coverage(n, p, kappa, top=top, reps=200, seed=seed):
        assert 0.90 <= cover <= 0.99, cover


def test_plugin_interval_defect_is_gone_for_an_unbiased_method() -> None:
    rng = np.random.default_rng(20)
    d, g = rng.normal(size=(32, 400)), 0.3 + rng.normal(size=(32, 400))
    r = ex.expectation_bias(d, g, seed=1)
    assert r.relative_bias_plugin > 0.5          # noise alone: ‖mean d‖ ≈ √(P/N)
    assert r.relative_bias_lo == 0.0 < r.relative_bias_hi
    assert r.bias_norm_lo == 0.0 and r.p_value > 0.05


# -- the test of E d = 0 --------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "p"), [(12, 3), (32, 400)])
def test_zero_mean_test_level_and_power(n: int, p: int) -> None:
    rng = np.random.default_rng(30 + p)
    reps = 300
    null = np.array([(t.p_value, t.p_value_chen_qin, t.p_value_hotelling)
                     for t in (ex.zero_mean_test(rng.normal(size=(n, p)), n_flips=199, seed=rng)
                               for _ in range(reps))])
    shift = math.sqrt(8.0 * math.sqrt(2 * p) / (n * p))  # ‖μ‖² ≈ 8 null SEs of U, spread over all coordinates
    alt = np.array([ex.zero_mean_test(shift + rng.normal(size=(n, p)), n_flips=199, seed=rng).p_value
                    for _ in range(reps)])
    flip_level = float((null[:, 0] <= 0.05).mean())
    assert 0.02 <= flip_level <= 0.08, flip_level
    if n > p:
        assert 0.02 <= float((null[:, 2] <= 0.05).mean()) <= 0.08
    else:
        assert np.isnan(null[:, 2]).all()
        assert 0.02 <= float((null[:, 1] <= 0.05).mean()) <= 0.08  # Chen–Qin needs large P
    assert float((alt <= 0.05).mean()) >= 0.8
    strong = ex.zero_mean_test(2 * shift + rng.normal(size=(n, p)), n_flips=199, seed=0)
    assert strong.p_value <= 0.05


def test_sign_flip_p_value_matches_full_enumeration() -> None:
    x = np.random.default_rng(40).normal(0.25, 1.0, size=(10, 3))
    observed = np.sum(x.sum(0) ** 2)
    every = np.array(list(itertools.product([-1.0, 1.0], repeat=10)))
    exact = float(np.mean(((every @ x) ** 2).sum(1) >= observed - 1e-12))
    approx = ex.zero_mean_test(x, n_flips=20000, seed=1).p_value
    assert approx == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20000) + 1e-4)


def test_hotelling_for_one_parameter_is_the_t_test() -> None:
    x = np.random.default_rng(41).normal(0.4, 1.0, size=(15, 1))
    t = ex.zero_mean_test(x, n_flips=0)
    scipy_t = sps.ttest_1samp(x[:, 0], 0.0)
    assert t.p_value_hotelling == pytest.approx(scipy_t.pvalue, rel=1e-10)
    assert t.hotelling_f == pytest.approx(scipy_t.statistic**2, rel=1e-10)


def test_hotelling_matches_the_f_distribution_of_an_explicit_t_squared() -> None:
    x = np.random.default_rng(42).normal(0.2, 1.0, size=(20, 4))
    n, p = x.shape
    mean, cov = x.mean(0), np.cov(x, rowvar=False)
    t2 = n * mean @ np.linalg.inv(cov) @ mean
    f_stat = t2 * (n - p) / (p * (n - 1))
    t = ex.zero_mean_test(x, n_flips=0)
    assert t.hotelling_f == pytest.approx(f_stat, rel=1e-10)
    assert t.p_value_hotelling == pytest.approx(sps.f.sf(f_stat, p, n - p), rel=1e-10)


# -- agreement with the one-parameter textbook interval -------------------------------------------


def test_one_parameter_interval_agrees_with_the_t_interval_away_from_zero() -> None:
    x = np.random.default_rng(50).normal(1.0, 1.0, size=(400, 1))
    r = ex.expectation_bias(x, np.ones_like(x), n_flips=0)
    half = sps.t.ppf(0.975, 399) * x.std(ddof=1) / math.sqrt(400)
    m = abs(float(x.mean()))
    assert r.bias_norm_lo == pytest.approx(m - half, rel=0.01)
    assert r.bias_norm_hi == pytest.approx(m + half, rel=0.01)
    # an exactly known signal of norm 1: the ratio interval is the norm interval
    assert (r.relative_bias_lo, r.relative_bias_hi) == pytest.approx((r.bias_norm_lo, r.bias_norm_hi), rel=1e-9)


def test_intervals_contain_zero_exactly_when_the_sign_flip_test_does_not_reject() -> None:
    rng = np.random.default_rng(51)
    for _ in range(40):
        x = 0.15 + rng.normal(size=(12, 8))
        r = ex.expectation_bias(x, 1.0 + rng.normal(size=(12, 8)), n_flips=999)
        assert r.flips_enumerated and r.zero_in_interval == (r.p_value > 0.05)
        if r.zero_in_interval:
            assert r.bias_norm_lo == 0.0 and r.relative_bias_lo == 0.0
        assert r.bias_norm_lo <= r.bias_norm <= r.bias_norm_hi
        lo, hi = ex.sq_norm_interval(x)
        assert lo <= max(r.sq_bias, 0.0) <= hi


def _loop_pivot(yd: np.ndarray, yg: np.ndarray, x: float, truth: float) -> tuple[float, bool]:
    """(U(yd) − x U(yg) − truth) / SE by explicit loops: Hoeffding's variance of the kernel Gd − x Gg from
    tuple sums where positive, else the jackknife over deleted rows; and whether it fell back."""
    n = len(yd)
    kern = yd @ yd.T - x * (yg @ yg.T)
    zeta1, delta = _brute_components(kern, kern)
    var = 4 * zeta1 / n + 2 * delta / (n * (n - 1))
    fallback = var <= 0
    if fallback:
        loo = [ex.unbiased_sq_norm_of_mean(np.delete(yd, i, 0)) - x * ex.unbiased_sq_norm_of_mean(np.delete(yg, i, 0))
               for i in range(n)]
        var = (n - 1) / n * float(np.sum((np.array(loo) - np.mean(loo)) ** 2))
    stat = ex.unbiased_sq_norm_of_mean(yd) - x * ex.unbiased_sq_norm_of_mean(yg) - truth
    return (0.0 if stat == 0 and var == 0 else stat / math.sqrt(var)), fallback


def test_studentised_bootstrap_quantiles_against_a_direct_resampling_loop() -> None:
    """The count-weighted pivots equal a loop that resamples rows and recomputes U, its variance from
    tuple sums (jackknife where that is ≤ 0), for the norm and for Fieller's combination at the world's ratio."""
    rng0 = np.random.default_rng(52)
    d = rng0.exponential(size=(6, 4)) - 0.8
    g = d + rng0.normal(1.0, 1.0, size=(6, 4))
    x_d, x_g = float(d.mean(0) @ d.mean(0)), float(g.mean(0) @ g.mean(0))
    (lo_n, hi_n), (lo_r, hi_r) = ex._bootstrap_quantiles(d @ d.T, g @ g.T, 0.9, 150, np.random.default_rng(3))
    idx = np.random.default_rng(3).integers(0, 6, size=(150, 6))
    norm, fell_n = zip(*[_loop_pivot(d[i], g[i], 0.0, x_d) for i in idx])
    ratio, fell_r = zip(*[_loop_pivot(d[i], g[i], x_d / x_g, 0.0) for i in idx])
    assert 0 < sum(fell_n) < len(idx) and 0 < sum(fell_r) < len(idx)  # both variance estimates are exercised
    assert (lo_n, hi_n) == pytest.approx(tuple(np.quantile(norm, [0.05, 0.95])), rel=1e-9)
    assert (lo_r, hi_r) == pytest.approx(tuple(np.quantile(ratio, [0.05, 0.95])), rel=1e-9)


def _loop_floor(yd: np.ndarray, yg: np.ndarray, x: float) -> float:
    """The sample's variance floor by explicit sums: ζ̂1 and δ̂ of the kernel Gd − x Gg from tuple sums, the
    plug-in variance of d̄ᵀd_i − x ḡᵀg_i from the rows, 4 max(ζ̂1, plug-in − δ̂⁺/N)/N + 2 δ̂⁺/N(N−1)."""
    n = len(yd)
    kernel = yd @ yd.T - x * (yg @ yg.T)
    zeta1, delta = _brute_components(kernel, kernel)
    proj = yd @ yd.mean(0) - x * (yg @ yg.mean(0))
    plug_in = float(np.var(proj, ddof=1))
    delta = max(delta, 0.0)
    return 4 * max(zeta1, plug_in - delta / n) / n + 2 * delta / (n * (n - 1))


def test_sample_variance_floor_is_the_explicit_formula_and_only_widens() -> None:
    """The sample's studentising variance is max(Hoeffding-or-jackknife, floor), the floor from explicit sums,
    at the norm (x = 0) and along Fieller's combination; the resamples carry no floor; on a high-SNR sample
    whose Hoeffding ζ̂1 cancels the floor binds, and the interval then contains the unfloored one."""
    rng = np.random.default_rng(64)
    d = 2.0 + 0.3 * rng.normal(size=(8, 5))
    g = d + rng.normal(1.0, 1.0, size=(8, 5))
    gd, gg = d @ d.T, g @ g.T
    piv = ex._Pivot.sample(gd, gg)
    plain = ex._Pivot.of(gd, gg, np.ones((1, 8)))
    assert plain.floor is None
    for x in (0.0, 0.3, 2.0):
        base_var = float(plain.var(x)[0])
        assert float(piv.var(x)[0]) == pytest.approx(max(base_var, _loop_floor(d, g, x)), rel=1e-9)
    assert _loop_floor(d, g, 0.0) > 1.02 * float(plain.var(0.0)[0])  # the floor binds on this sample
    level, n_boot = 0.95, 300
    (norm, ratio) = ex.bootstrap_intervals(gd, gg, level, zero=False, n_boot=n_boot, rng=np.random.default_rng(4))
    qn, qr = ex._bootstrap_quantiles(gd, gg, level, n_boot, np.random.default_rng(4))
    u = ex.unbiased_sq_norm_of_mean(d)
    se = math.sqrt(max(float(plain.var(0.0)[0]), _loop_floor(d, g, 0.0)))
    assert norm == pytest.approx((math.sqrt(max(u - qn[1] * se, 0)), math.sqrt(max(u - qn[0] * se, 0))), rel=1e-12)
    se_plain = math.sqrt(float(plain.var(0.0)[0]))
    assert norm[0] < math.sqrt(max(u - qn[1] * se_plain, 0)) and norm[1] > math.sqrt(max(u - qn[0] * se_plain, 0))
    plain_ratio = ex._ratio_range(plain, qr)
    assert ratio[0] <= plain_ratio[0] and ratio[1] >= plain_ratio[1]


def test_plug_in_linear_variance_less_delta_over_n_is_unbiased_for_gaussian_rows() -> None:
    """The floor's bias correction: for Gaussian rows E[d̄ᵀΣ̂d̄] = μᵀΣμ + tr Σ²/N, so the plug-in less δ/N
    averages to ζ1 = μᵀΣμ (Monte Carlo, 4000 samples of N = 8, within 4 standard errors)."""
    rng = np.random.default_rng(56)
    p, n = 6, 8
    a = rng.normal(size=(p, p)) / math.sqrt(p)
    sigma = a @ a.T
    mu = rng.normal(size=p)
    zeta1, trace_sq = float(mu @ sigma @ mu), float(np.trace(sigma @ sigma))
    vals = []
    for _ in range(4000):
        x = mu + rng.normal(size=(n, p)) @ a.T
        vals.append(float(np.var(x @ x.mean(0), ddof=1)) - trace_sq / n)
    vals = np.array(vals)
    assert abs(vals.mean() - zeta1) < 4 * vals.std(ddof=1) / math.sqrt(len(vals))


def test_exact_sign_flip_p_is_the_enumeration_and_its_floor_is_reported() -> None:
    x = np.random.default_rng(53).normal(0.3, 1.0, size=(9, 3))
    every = np.array(list(itertools.product([-1.0, 1.0], repeat=9)))
    exact = float(np.mean(((every @ x) ** 2).sum(1) >= np.sum(x.sum(0) ** 2) - 1e-12))
    t = ex.zero_mean_test(x, n_flips=5)
    assert t.flips_enumerated and t.p_value == pytest.approx(exact, abs=1e-15)
    assert t.p_value_min == 2.0 / 2**9
    many = ex.zero_mean_test(np.random.default_rng(54).normal(size=(40, 3)), n_flips=99)
    assert not many.flips_enumerated and many.p_value_min == 1 / 100


# -- bookkeeping: fields, scale, seeds, input checks ----------------------------------------------


def test_fields_against_direct_formulas_and_scale_equivariance() -> None:
    rng = np.random.default_rng(60)
    d, g = 0.2 + rng.normal(size=(24, 30)), 1.0 + rng.normal(size=(24, 30))
    r = ex.expectation_bias(d, g, seed=3)
    assert r.variance_trace == pytest.approx(np.var(d, axis=0, ddof=1).sum(), rel=1e-12)
    assert r.variance_trace_estimate == pytest.approx(np.var(d + g, axis=0, ddof=1).sum(), rel=1e-12)
    assert r.relative_bias_plugin == pytest.approx(np.linalg.norm(d.mean(0)) / np.linalg.norm(g.mean(0)))
    assert r.relative_bias == pytest.approx(math.sqrt(r.sq_bias / r.sq_signal))
    assert r.snr_of_mean == pytest.approx(r.sq_signal / (r.variance_trace_estimate / 24))
    assert r.relative_bias_lo <= r.relative_bias <= r.relative_bias_hi
    assert r.bias_norm_lo <= r.bias_norm <= r.bias_norm_hi
    assert set(r.as_row()) >= {"sq_bias", "relative_bias", "relative_bias_lo", "p_value", "variance_trace"}
    scaled = ex.expectation_bias(1e-6 * d, 1e-6 * g, seed=3)
    assert scaled.relative_bias_lo == pytest.approx(r.relative_bias_lo, rel=1e-9)
    assert scaled.relative_bias_hi == pytest.approx(r.relative_bias_hi, rel=1e-9)
    assert scaled.bias_norm_hi == pytest.approx(1e-6 * r.bias_norm_hi, rel=1e-9)
    assert scaled.p_value == r.p_value


def test_seeded_and_generator_runs_repeat() -> None:
    rng = np.random.default_rng(61)
    d, g = 0.1 + rng.normal(size=(10, 5)), rng.normal(size=(10, 5))
    assert ex.expectation_bias(d, g, seed=5) == ex.expectation_bias(d, g, seed=5)
    a = ex.expectation_bias(d, g, seed=np.random.default_rng(9))
    assert a == ex.expectation_bias(d, g, seed=np.random.default_rng(9))


def test_signal_not_distinguishable_from_zero_gives_an_unbounded_ratio() -> None:
    rng = np.random.default_rng(62)
    r = ex.expectation_bias(0.5 + rng.normal(size=(16, 10)), rng.normal(size=(16, 10)), n_flips=0)
    assert r.relative_bias_hi == math.inf
    if r.sq_signal <= 0:
        assert math.isnan(r.relative_bias)


def test_few_batches_give_estimates_without_intervals() -> None:
    rng = np.random.default_rng(63)
    r = ex.expectation_bias(rng.normal(size=(3, 4)), rng.normal(size=(3, 4)), n_flips=7)
    assert math.isfinite(r.sq_bias) and math.isfinite(r.p_value)
    assert math.isnan(r.bias_norm_lo) and math.isnan(r.relative_bias_hi) and math.isnan(r.p_value_chen_qin)


@pytest.mark.parametrize(("d", "g", "match"), [
    (np.ones((1, 3)), np.ones((1, 3)), "at least 2 independent batches"),
    (np.ones((4, 3)), np.ones((4, 2)), "same shape"),
    (np.ones(4), np.ones(4), "2-D array"),
    (np.full((4, 3), np.nan), np.ones((4, 3)), "NaN or infinite"),
    (np.ones((4, 0)), np.ones((4, 0)), "no columns"),
])
def test_bad_input_is_a_usage_error(d: np.ndarray, g: np.ndarray, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        ex.expectation_bias(d, g)


def test_bad_options_are_usage_errors() -> None:
    x = np.random.default_rng(64).normal(size=(6, 2))
    with pytest.raises(UsageError, match="level"):
        ex.expectation_bias(x, x, level=1.5)
    with pytest.raises(UsageError, match="n_flips"):
        ex.zero_mean_test(x, n_flips=-1)
    with pytest.raises(UsageError, match="at least 4"):
        ex.sq_norm_summary(x[:3])


def test_bootstrap_quantiles_between_two_infinities_are_infinite_not_nan():
    from tbptt_bench.analysis.expectation import _quantiles

    x = np.array([-np.inf, -np.inf, -np.inf, 0.0, 1.0, np.inf, np.inf, np.inf])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = _quantiles(x, 0.05)
    assert q[0] == -np.inf and q[1] == np.inf
    finite = np.arange(11.0)
    np.testing.assert_array_equal(_quantiles(finite, 0.1), np.quantile(finite, [0.1, 0.9]))
