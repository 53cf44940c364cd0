"""Statistics for reports: confidence intervals over seeds, paired tests, Holm's correction, effect sizes.

Every routine that scipy provides is taken from scipy.stats (``bootstrap``, ``wilcoxon``,
``permutation_test``); what scipy lacks is written here small enough to check by hand: Holm's
step-down adjustment, the smallest p-value an exact paired test can reach with n pairs, and the
warning that says when a seed count is too low for a test to mean anything.

The functions take plain arrays or a tidy DataFrame with the columns named explicitly, so they can
be tested on synthetic tables with known answers.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import stats
from tbptt_bench.report import TESTS  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

#: Below this many seeds a percentile/BCa bootstrap interval is known to be too narrow.
FEW_SEEDS = 8


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval over ``n`` independent units."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float


def _as_array(values: Sequence[float] | np.ndarray | pd.Series) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    return arr[np.isfinite(arr)]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray | pd.Series,
    statistic: Callable[..., np.ndarray] = np.mean,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """BCa bootstrap interval of ``statistic`` over the finite ``values`` (scipy.stats.bootstrap).

    ``statistic`` must accept ``axis=``. Falls back to the percentile interval where BCa is undefined
    (e.g. two distinct values); one value gives an interval of NaN, identical values a zero-width one.
    """
    x = _as_array(values)
    n = x.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence)
    estimate = float(statistic(x, axis=-1))
    if n == 1:
        return Interval(estimate, math.nan, math.nan, 1, confidence)
    if np.ptp(x) == 0:
        return Interval(estimate, estimate, estimate, n, confidence)
    low, high = _interval(x, statistic, confidence, n_resamples, seed)
    return Interval(estimate, low, high, n, confidence)


def _interval(data: np.ndarray, statistic: Callable[..., np.ndarray], confidence: float, n_resamples: int,
              seed: int) -> tuple[float, float]:
    """scipy's BCa interval, or the percentile interval where BCa is undefined."""
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = stats.bootstrap((data,), statistic, confidence_level=confidence, n_resamples=n_resamples,
                                  method=method, vectorized=True, rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if math.isfinite(low) and math.isfinite(high):
            return low, high
    return math.nan, math.nan


def cluster_bootstrap_ci(
    values: Sequence[float] | np.ndarray | pd.Series,
    clusters: Sequence[object] | np.ndarray | pd.Series,
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Interval of the pooled mean when rows come in clusters (batches within seeds).

    Resamples whole clusters (the independent unit) with scipy.stats.bootstrap and pools every row of
    the drawn clusters, so the interval covers both seed-to-seed and batch-to-batch variation. With one
    cluster only the rows can be resampled, and the interval says nothing about other seeds.
    """
    x = np.asarray(values, dtype=float).ravel()
    keys = pd.Series(np.asarray(clusters).ravel())
    ok = np.isfinite(x)
    x, keys = x[ok], keys[ok].reset_index(drop=True)
    codes, uniques = pd.factorize(keys)
    if len(uniques) < 2:
        return bootstrap_ci(x, confidence=confidence, n_resamples=n_resamples, seed=seed)
    sums = np.bincount(codes, weights=x)
    counts = np.bincount(codes).astype(float)

    def pooled_mean(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = idx.astype(int)
        return sums[idx].sum(axis=axis) / counts[idx].sum(axis=axis)

    est = float(sums.sum() / counts.sum())
    ids = np.arange(len(uniques), dtype=float)
    if np.ptp(sums / counts) == 0:
        return Interval(est, est, est, len(uniques), confidence)
    low, high = _interval(ids, pooled_mean, confidence, n_resamples, seed)
    return Interval(est, low, high, len(uniques), confidence)


#: ``interval`` of a seed-level summary: what its ends are (see :func:`seed_summary`).
INTERVAL_KINDS = {"t": "Student t interval over seeds", "range": "range of the seeds' values (not a confidence "
                  "interval)", "single": "one seed: the measurement's own interval", "none": "no interval"}


def seed_summary(values: Sequence[float] | np.ndarray | pd.Series, *, confidence: float = 0.95) -> tuple[Interval, str]:
    """Mean over seeds with an interval that means what its label says, and that label (:data:`INTERVAL_KINDS`).

    Three or more seeds: the Student t interval mean ± t_{n−1}·sd/√n (for a mean over a few seeds the
    bootstrap's percentile or BCa interval is known to be too narrow: with two seeds it is their min and
    max, about 50% coverage). Two seeds: their range, labelled ``range`` — no confidence level is claimed.
    One: no interval here (``single``; a caller may show the measurement's own). Identical values: zero width.
    """
    x = _as_array(values)
    n = x.size
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0, confidence), "none"
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, confidence), "single"
    if n == 2:
        return Interval(mean, float(x.min()), float(x.max()), 2, confidence), "range"
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, confidence), "t"


def format_interval(mean: float, low: float, high: float, kind: str, digits: int = 3) -> str:
    """``mean [low, high]`` for a confidence interval; ``mean (range low–high, 2 seeds)`` for a range."""
    def fmt(v: float) -> str:
        return "–" if v is None or not np.isfinite(v) and not np.isinf(v) else ("∞" if v == math.inf else f"{v:.{digits}g}")

    if kind == "range":
        return f"{fmt(mean)} (range {fmt(low)}–{fmt(high)}, 2 seeds)"
    return f"{fmt(mean)} [{fmt(low)}, {fmt(high)}]"


def interval_notes(rows: pd.DataFrame, *, level: float, n_batches: int, n_flips: int) -> list[str]:
    """One line for each bias row whose interval has an infinite or very wide end, or whose test cannot reject.

    Reads the bias table's columns (``spec``, ``relative_bias``, ``relative_bias_hi``, ``snr``,
    ``bias_p_value_min``). An infinite upper end: ‖E g‖ was not told from 0, so no ratio is bounded; the
    null SE of U(g) is about √2·tr Cov/N, so ‖E g‖² clears z of them once N ≳ z√2 / SNR² (SNR: ‖mean ĝ‖ over
    √tr Cov ĝ per batch); past that, the few batches limit the bootstrap itself. A wide one (upper end > 10×
    the estimate): the width falls about as 1/√N.
    """
    z = float(stats.norm.ppf(0.5 + level / 2))
    out = []
    for _, r in rows.iterrows():
        hi, est, snr = float(r.get("relative_bias_hi", math.nan)), float(r.get("relative_bias", math.nan)), \
            float(r.get("snr", math.nan))
        if hi == math.inf:
            need = math.ceil(z * math.sqrt(2) / snr**2) if snr > 0 else math.inf
            need = (f"roughly {need} batches would bound it" if n_batches < need < math.inf else
                    f"the signal is clear but {n_batches} batches are too few for the studentised bootstrap; "
                    f"about {2 * n_batches} would bound it" if need <= n_batches else "more batches are needed")
            out.append(f"{r['spec']}: upper end ∞ — with {n_batches} batches the mean gradient ‖E g‖ cannot be told "
                       f"from 0 (per-batch SNR {snr:.2g}), so no ratio to it is bounded; {need}.")
        elif np.isfinite(hi) and hi > 10 * max(est, 0.0) and hi > 0:
            out.append(f"{r['spec']}: upper end {hi:.3g} is over 10× the estimate {max(est, 0.0):.3g} — the batches' "
                       f"noise dominates the bias; the width falls about as 1/√N (4× the {n_batches} batches halve it).")
    floors = rows["bias_p_value_min"].dropna() if "bias_p_value_min" in rows else pd.Series(dtype=float)
    if len(floors) and float(floors.min()) > 1 - level:
        need = max(math.ceil(math.log2(2 / (1 - level))), 2)
        out.append(f"p(0 bias): with {n_batches} batches and {n_flips} flips the smallest attainable p is "
                   f"{float(floors.min()):.3g} > {1 - level:.3g}, so the test cannot reject; use ≥ {need} batches "
                   f"and ≥ {math.ceil(1 / (1 - level))} flips.")
    return out


def summarise(
    table: pd.DataFrame,
    value: str,
    by: Sequence[str],
    *,
    cluster: str | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """Mean of ``value`` per group of ``by`` with its interval.

    Returns the ``by`` columns plus ``mean``, ``ci_low``, ``ci_high``, ``n`` and ``interval`` (what the ends
    are, :data:`INTERVAL_KINDS`). Rows are the units (seeds): :func:`seed_summary` (t interval from 3, the
    range of 2). With ``cluster`` naming a column such as ``seed``, whole clusters are resampled by the
    bootstrap (``interval = "bootstrap"``).
    """
    missing = [c for c in [value, *by, *([cluster] if cluster else [])] if c not in table.columns]
    if missing:
        raise KeyError(f"columns not in table: {', '.join(missing)}")
    rows = []
    groups = table.groupby(list(by), dropna=False, sort=True) if by else [((), table)]
    for key, grp in groups:
        key = key if isinstance(key, tuple) else (key,)
        if cluster:
            iv = cluster_bootstrap_ci(grp[value], grp[cluster], confidence=confidence, n_resamples=n_resamples,
                                      seed=seed)
            kind = "bootstrap"
        else:
            iv, kind = seed_summary(grp[value], confidence=confidence)
        rows.append({**dict(zip(by, key)), "mean": iv.estimate, "ci_low": iv.low, "ci_high": iv.high, "n": iv.n,
                     "interval": kind})
    return pd.DataFrame(rows, columns=[*by, "mean", "ci_low", "ci_high", "n", "interval"])


def holm(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN entries stay NaN.

    With the m finite p-values sorted, p_(1) ≤ … ≤ p_(m), the adjusted value of p_(i) is
    max_{j ≤ i} min(1, (m - j + 1) · p_(j)); rejecting where it is ≤ α is Holm's procedure.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    m = q.size
    if m == 0:
        return out
    order = np.argsort(q, kind="stable")
    scaled = (m - np.arange(m)) * q[order]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    out[ok] = adjusted
    return out


def min_attainable_p(n: int, alternative: str = "two-sided") -> float:
    """Smallest p-value an exact paired test (Wilcoxon signed-rank, sign-flip permutation) reaches.

    Among the 2^n equally likely sign patterns of n non-zero differences, only the observed one (and,
    two-sided, its mirror image) is as extreme as all differences of one sign.
    """
    if n < 1:
        return 1.0
    return min(1.0, (2.0 if alternative == "two-sided" else 1.0) / 2.0**n)


def seeds_needed(alpha: float = 0.05, family_size: int = 1, alternative: str = "two-sided") -> int:
    """Fewest pairs for which the smallest attainable p, Holm-adjusted over the family, is ≤ alpha."""
    tails = 2.0 if alternative == "two-sided" else 1.0
    return max(1, math.ceil(math.log2(tails * max(family_size, 1) / alpha) - 1e-12))


def seed_warning(n: int, *, alpha: float = 0.05, family_size: int = 1, alternative: str = "two-sided") -> str:
    """A plain-words warning when ``n`` pairs are too few for the test to mean anything, else ``""``."""
    if n < 2:
        return f"{n} paired seed(s): no test is possible"
    floor = min_attainable_p(n, alternative)
    if floor > alpha:
        return (f"{n} seeds: the smallest attainable p is {floor:.3g} > α = {alpha:g}, so the test cannot "
                f"detect any difference; use ≥ {seeds_needed(alpha, family_size, alternative)} seeds"
                + (f" (for {family_size} comparisons under Holm)" if family_size > 1 else ""))
    if floor * family_size > alpha:
        return (f"{n} seeds: after Holm over {family_size} comparisons the smallest attainable adjusted p is "
                f"{min(1.0, floor * family_size):.3g} > α = {alpha:g}; use ≥ "
                f"{seeds_needed(alpha, family_size, alternative)} seeds")
    if n < FEW_SEEDS:
        return f"{n} seeds: the test has little power and bootstrap intervals are too narrow below {FEW_SEEDS}"
    return ""


@dataclass(frozen=True)
class PairedTest:
    """A paired test of ``treatment - reference`` across seeds, with the effect size and its interval."""

    test: str
    n: int
    statistic: float
    pvalue: float
    mean_diff: float
    diff_low: float
    diff_high: float
    effect_dz: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _mean_diff(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x - y, axis=axis)


def paired_test(
    treatment: Sequence[float] | np.ndarray,
    reference: Sequence[float] | np.ndarray,
    *,
    test: str = "wilcoxon",
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> PairedTest:
    """Two-sided paired test of the differences ``treatment - reference`` (same seed = one pair).

    ``test`` is ``wilcoxon`` (scipy.stats.wilcoxon: exact for small n without ties, zero differences
    dropped) or ``permutation`` (scipy.stats.permutation_test on the mean difference, swapping within
    pairs; exact when 2^n ≤ ``n_resamples``). The effect size is the mean difference, in the metric's
    units, with a bootstrap interval, and Cohen's d_z = mean / sd of the differences.
    """
    if test not in TESTS:
        raise ValueError(f"unknown test {test!r}; accepted: {', '.join(TESTS)}")
    x = np.asarray(treatment, dtype=float).ravel()
    y = np.asarray(reference, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    d = x - y
    n = d.size
    ci = bootstrap_ci(d, confidence=confidence, n_resamples=min(n_resamples, 4999), seed=seed)
    sd = float(np.std(d, ddof=1)) if n > 1 else math.nan
    dz = float(np.mean(d) / sd) if n > 1 and sd > 0 else math.nan
    stat, p = math.nan, math.nan
    if n >= 2 and not np.any(d):
        stat, p = 0.0, 1.0
    elif n >= 2 and test == "wilcoxon":
        res = stats.wilcoxon(x, y, alternative="two-sided")
        stat, p = float(res.statistic), float(res.pvalue)
    elif n >= 2:
        res = stats.permutation_test((x, y), _mean_diff, permutation_type="samples", vectorized=True,
                                     n_resamples=n_resamples, alternative="two-sided",
                                     rng=np.random.default_rng(seed))
        stat, p = float(res.statistic), float(res.pvalue)
    return PairedTest(test, n, stat, p, ci.estimate, ci.low, ci.high, dz)


def paired_comparisons(
    table: pd.DataFrame,
    *,
    value: str,
    condition: str,
    unit: str,
    pairs: Sequence[tuple[object, object]],
    by: Sequence[str] = (),
    test: str = "wilcoxon",
    alpha: float = 0.05,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
) -> pd.DataFrame:
    """Paired tests of ``value`` between conditions across units, Holm-corrected over the whole family.

    ``table`` has one row per (``by``…, ``condition``, ``unit``); each ``(treatment, reference)`` in
    ``pairs`` is tested within every ``by`` group that holds both, on the units they share. Returns one
    row per comparison: the ``by`` columns, ``treatment``, ``reference``, ``n``, ``test``,
    ``statistic``, ``p``, ``p_holm``, ``mean_diff``, ``diff_low``, ``diff_high``, ``effect_dz``,
    ``significant`` (p_holm ≤ alpha) and ``warning``.
    """
    cols = [*by, condition, unit, value]
    missing = [c for c in cols if c not in table.columns]
    if missing:
        raise KeyError(f"columns not in table: {', '.join(missing)}")
    dup = table.duplicated([*by, condition, unit])
    if dup.any():
        raise ValueError(f"{int(dup.sum())} duplicate rows per ({', '.join([*by, condition, unit])}); "
                         "aggregate them before testing")
    rows = []
    groups = table.groupby(list(by), dropna=False, sort=True) if by else [((), table)]
    for key, grp in groups:
        key = key if isinstance(key, tuple) else (key,)
        wide = grp.pivot(index=unit, columns=condition, values=value)
        for treatment, reference in pairs:
            if treatment not in wide.columns or reference not in wide.columns or treatment == reference:
                continue
            both = wide[[treatment, reference]].dropna()
            res = paired_test(both[treatment].to_numpy(), both[reference].to_numpy(), test=test,
                              confidence=confidence, n_resamples=n_resamples, seed=seed)
            rows.append({**dict(zip(by, key)), "treatment": treatment, "reference": reference,
                         **{k: v for k, v in res.as_dict().items()}})
    columns = [*by, "treatment", "reference", "n", "test", "statistic", "p", "p_holm", "mean_diff", "diff_low",
               "diff_high", "effect_dz", "significant", "warning"]
    if not rows:
        return pd.DataFrame(columns=columns)
    out = pd.DataFrame(rows).rename(columns={"pvalue": "p"})
    out["p_holm"] = holm(out["p"].to_numpy())
    out["significant"] = out["p_holm"] <= alpha
    family = int(out["p"].notna().sum())
    out["warning"] = [seed_warning(int(n), alpha=alpha, family_size=family) for n in out["n"]]
    log.debug("%d paired comparisons of %s, Holm over %d", len(out), value, family)
    return out[columns]
