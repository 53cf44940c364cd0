"""Coverage, level and power of :mod:`tbptt_bench.analysis.expectation`, by simulation.

    PYTHONPATH=. python benchmarks/coverage_expectation.py            # the table in docs/statistics.md
    PYTHONPATH=. python benchmarks/coverage_expectation.py --reps 1000 --flips 999

Each scenario draws ``reps`` data sets of N batches, each row a P-vector:
g_i = μ_g + ξ_i and d_i = μ_d − 0.3 ξ_i + η_i, with ξ, η independent noise of covariance Λ, so d and
g are correlated as a truncated and a true gradient are. Λ is ``flat`` (identity: high effective
dimension) or ``decay`` (diag(1/k), k = 1..P: a few directions dominate, as in gradients).
‖μ_d‖² = κ · √(2 tr Σ_d² / N(N−1)), i.e. κ null standard errors of the U-statistic (κ = 0: an
unbiased method), pointing in a ``random`` direction or along the ``top`` noise direction (then
the linear part of Var U dominates). ‖μ_g‖² = SNR · tr Cov(ĝ)/N, SNR = 10 unless stated. Noise:
``gauss``, ``skewed`` (centred exponential, skewness 2: d is not symmetric, so the sign-flip test
is only asymptotically valid) or ``t5`` (Student t with 5 degrees of freedom, scaled to unit
variance; its fourth moment is just finite).

Columns: share of intervals containing the true ‖E d‖ and ‖E d‖/‖E g‖ (κ = 0: sets containing 0,
``zero_in_interval``); the share of rejections of E d = 0 at the 5% level by each
test (nan: not defined, Hotelling needs N > P); the true ratio and the mean plug-in ratio.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import numpy as np

from tbptt_bench.analysis.expectation import expectation_bias

COUPLING = 0.3  # d_i = μ_d − COUPLING·ξ_i + η_i


@dataclass(frozen=True)
class Scenario:
    """One simulated setting (see the module docstring)."""

    n: int
    p: int
    kappa: float
    spectrum: str = "flat"
    direction: str = "random"
    noise: str = "gauss"
    snr: float = 10.0


@dataclass(frozen=True)
class Outcome:
    """Shares over replicates: interval coverage, test rejections at 5%; ratios as means."""

    cover_bias: float
    cover_ratio: float
    reject_flip: float
    reject_chen_qin: float
    reject_hotelling: float
    true_ratio: float
    plugin_ratio: float
    seconds: float


def _noise(rng: np.random.Generator, kind: str, shape: tuple[int, int]) -> np.ndarray:
    """Unit-variance noise of the named law."""
    if kind == "gauss":
        return rng.standard_normal(shape)
    if kind == "skewed":
        return rng.standard_exponential(shape) - 1.0
    if kind == "t5":
        return rng.standard_t(5, shape) / math.sqrt(5.0 / 3.0)
    raise ValueError(f"unknown noise {kind!r}; use gauss, skewed or t5")


def _setting(sc: Scenario, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise scale √Λ, μ_d and μ_g of a scenario."""
    lam = np.ones(sc.p) if sc.spectrum == "flat" else 1.0 / np.arange(1, sc.p + 1)
    cov_d = (1.0 + COUPLING**2) * lam
    null_se = math.sqrt(2.0 * float((cov_d**2).sum()) / (sc.n * (sc.n - 1)))
    u = np.eye(sc.p)[0] if sc.direction == "top" else rng.standard_normal(sc.p)
    v = rng.standard_normal(sc.p)
    mu_d = u / np.linalg.norm(u) * math.sqrt(sc.kappa * null_se)
    trace_est = (1.0 + (1.0 - COUPLING) ** 2) * float(lam.sum())
    mu_g = v / np.linalg.norm(v) * math.sqrt(sc.snr * trace_est / sc.n)
    return np.sqrt(lam), mu_d, mu_g


def simulate(sc: Scenario, *, reps: int, flips: int, seed: int) -> Outcome:
    """Run ``reps`` replicates of one scenario at level 0.95 and count coverage and rejections."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    scale, mu_d, mu_g = _setting(sc, rng)
    bias, ratio = float(np.linalg.norm(mu_d)), float(np.linalg.norm(mu_d) / np.linalg.norm(mu_g))
    hits, rejects, plugin = np.zeros(2), np.zeros(3), 0.0
    for _ in range(reps):
        xi = _noise(rng, sc.noise, (sc.n, sc.p)) * scale
        eta = _noise(rng, sc.noise, (sc.n, sc.p)) * scale
        r = expectation_bias(mu_d - COUPLING * xi + eta, mu_g + xi, n_flips=flips, seed=rng)
        if sc.kappa == 0:  # the sets contain 0 exactly when the sign-flip test does not reject
            hits += r.zero_in_interval
        else:
            hits += [r.bias_norm_lo <= bias <= r.bias_norm_hi, r.relative_bias_lo <= ratio <= r.relative_bias_hi]
        rejects += [p <= 0.05 for p in (r.p_value, r.p_value_chen_qin, r.p_value_hotelling)]
        plugin += r.relative_bias_plugin
    if sc.n <= sc.p:
        rejects[2] = math.nan
    cover, rej = hits / reps, rejects / reps
    return Outcome(cover[0], cover[1], rej[0], rej[1], rej[2], ratio,
                   plugin / reps, time.perf_counter() - start)


SCENARIOS = (
    [Scenario(n, p, k) for n, p in ((16, 5), (64, 500), (256, 1000)) for k in (0.0, 3.0, 10.0)]
    + [Scenario(n, p, 0.0, "decay") for n, p in ((16, 50), (64, 2000), (256, 200))]
    + [Scenario(n, p, k, "decay", way) for way in ("top", "random") for n, p in ((16, 50), (64, 2000))
       for k in (3.0, 10.0)]
    + [Scenario(32, 200, k, noise=noise) for noise in ("skewed", "t5") for k in (0.0, 10.0)]
    + [Scenario(32, 200, k, snr=1.0) for k in (0.0, 10.0)]
)


def main(argv: list[str] | None = None) -> None:
    """Print the table (markdown), one row per scenario."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--reps", type=int, default=300, help="replicates per scenario (default 300)")
    ap.add_argument("--flips", type=int, default=199, help="sign patterns per randomisation test (default 199)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--rows", default=f"0:{len(SCENARIOS)}", help="START:STOP, a slice of the scenarios (to split "
                    "the table over processes; each row keeps its own seed)")
    args = ap.parse_args(argv)
    start, stop = (int(v) for v in args.rows.split(":"))
    print(f"{args.reps} replicates per row (binomial SE of a 95% coverage ≈ "
          f"{math.sqrt(0.95 * 0.05 / args.reps):.3f}, of a 5% rate ≈ {math.sqrt(0.05 * 0.95 / args.reps):.3f}); "
          f"level 0.95; tests at 5%; {args.flips} sign flips\n")
    print("| N | P | Λ | μ_d | noise | SNR | κ | cover ‖E d‖ | cover ratio | reject: sign-flip "
          "| Chen–Qin | Hotelling | true ratio | plug-in ratio |")
    print("|" + "---|" * 14)
    total = 0.0
    for i, sc in list(enumerate(SCENARIOS))[start:stop]:
        o = simulate(sc, reps=args.reps, flips=args.flips, seed=args.seed + i)
        total += o.seconds
        way = sc.direction if sc.kappa > 0 else "0"
        print(f"| {sc.n} | {sc.p} | {sc.spectrum} | {way} | {sc.noise} | {sc.snr:g} | {sc.kappa:g} | "
              f"{o.cover_bias:.3f} | {o.cover_ratio:.3f} | {o.reject_flip:.3f} | "
              f"{o.reject_chen_qin:.3f} | {o.reject_hotelling:.3f} | {o.true_ratio:.3f} | {o.plugin_ratio:.3f} |",
              flush=True)
    print(f"\n{total:.0f} s")


if __name__ == "__main__":
    main()
