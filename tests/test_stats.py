"""Statistics on synthetic data with known answers, checked against scipy and against hand computation."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from tbptt_bench.report import stats


def test_bootstrap_ci_is_scipys_bca_interval() -> None:
    x = np.random.default_rng(1).gamma(2.0, size=30)
    ours = stats.bootstrap_ci(x, n_resamples=3000, seed=7)
    theirs = sps.bootstrap((x,), np.mean, n_resamples=3000, method="BCa", rng=np.random.default_rng(7))
    assert ours.estimate == pytest.approx(x.mean())
    assert ours.low == pytest.approx(theirs.confidence_interval.low)
    assert ours.high == pytest.approx(theirs.confidence_interval.high)
    assert ours.n == 30


def test_bootstrap_ci_coverage_is_near_nominal() -> None:
    rng = np.random.default_rng(0)
    reps, hits = 300, 0
    for i in range(reps):
        x = rng.normal(1.0, 2.0, size=25)
        iv = stats.bootstrap_ci(x, n_resamples=1000, seed=i)
        hits += iv.low <= 1.0 <= iv.high
    coverage = hits / reps
    # nominal 0.95; the binomial standard error over 300 replications is about 0.013
    assert 0.90 <= coverage <= 0.985, coverage


def _clustered(rng: np.random.Generator, seeds: int, batches: int) -> pd.DataFrame:
    seed_effect = rng.normal(0.0, 1.0, size=seeds)
    values = seed_effect[:, None] + rng.normal(0.0, 1.0, size=(seeds, batches))
    return pd.DataFrame({"seed": np.repeat(np.arange(seeds), batches), "v": values.ravel()})


def test_cluster_bootstrap_covers_seed_variation_that_a_row_bootstrap_misses() -> None:
    rng = np.random.default_rng(3)
    reps, cluster_hits, row_hits = 300, 0, 0
    for i in range(reps):
        df = _clustered(rng, seeds=16, batches=8)
        c = stats.cluster_bootstrap_ci(df["v"], df["seed"], n_resamples=800, seed=i)
        r = stats.bootstrap_ci(df["v"], n_resamples=800, seed=i)
        cluster_hits += c.low <= 0.0 <= c.high
        row_hits += r.low <= 0.0 <= r.high
        assert c.n == 16 and r.n == 128
    # intra-class correlation 0.5 with 8 batches per seed: the row bootstrap's standard error is about
    # 1/sqrt(4.5) of the truth, so its 95% interval covers roughly 65% of the time; resampling 16
    # clusters covers a little under nominal (about 0.91)
    assert 0.86 <= cluster_hits / reps <= 0.99, cluster_hits / reps
    assert row_hits / reps < 0.75, row_hits / reps


def test_cluster_bootstrap_pooled_mean_weights_rows() -> None:
    iv = stats.cluster_bootstrap_ci([1.0, 1.0, 1.0, 5.0], ["a", "a", "a", "b"], n_resamples=500)
    assert iv.estimate == pytest.approx(2.0)
    assert iv.n == 2
    assert 1.0 <= iv.low <= iv.high <= 5.0


def test_bootstrap_ci_edge_cases() -> None:
    assert stats.bootstrap_ci([]).n == 0 and math.isnan(stats.bootstrap_ci([]).estimate)
    one = stats.bootstrap_ci([2.5])
    assert one.estimate == 2.5 and math.isnan(one.low) and math.isnan(one.high)
    same = stats.bootstrap_ci([3.0, 3.0, 3.0])
    assert (same.low, same.estimate, same.high) == (3.0, 3.0, 3.0)
    two = stats.bootstrap_ci([1.0, 2.0, np.nan])
    assert two.n == 2 and 1.0 <= two.low <= two.high <= 2.0


def test_summarise_groups_and_counts() -> None:
    df = pd.DataFrame({"m": ["a"] * 4 + ["b"] * 3, "v": [1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0]})
    out = stats.summarise(df, "v", ["m"])
    assert list(out.columns) == ["m", "mean", "ci_low", "ci_high", "n", "interval"]
    a, b = out.set_index("m").loc["a"], out.set_index("m").loc["b"]
    low, high = sps.t.interval(0.95, 3, loc=2.5, scale=sps.sem([1.0, 2.0, 3.0, 4.0]))
    assert a["mean"] == 2.5 and a["n"] == 4 and a["interval"] == "t"
    assert (a["ci_low"], a["ci_high"]) == pytest.approx((low, high), rel=1e-12)
    assert (b["mean"], b["ci_low"], b["ci_high"], b["n"]) == (10.0, 10.0, 10.0, 3)
    with pytest.raises(KeyError, match="nope"):
        stats.summarise(df, "nope", ["m"])


def test_two_seeds_give_their_range_labelled_as_such_and_no_level() -> None:
    iv, kind = stats.seed_summary([0.2, 0.5])
    assert kind == "range" and (iv.low, iv.high) == (0.2, 0.5)
    assert "range" in stats.format_interval(iv.estimate, iv.low, iv.high, kind) and "[" not in \
        stats.format_interval(iv.estimate, iv.low, iv.high, kind)
    assert stats.seed_summary([0.3])[1] == "single"


def test_seed_t_interval_covers_at_its_level_by_simulation() -> None:
    rng = np.random.default_rng(7)
    hits = [(lambda iv: iv.low <= 1.0 <= iv.high)(stats.seed_summary(rng.normal(1.0, 2.0, 3))[0])
            for _ in range(3000)]
    assert 0.93 <= float(np.mean(hits)) <= 0.97  # exact for normal seeds, even with 3 (binomial SE 0.004)


def test_interval_notes_explain_infinite_wide_ends_and_the_p_floor() -> None:
    rows = pd.DataFrame({"spec": ["a", "b", "c"], "relative_bias": [0.1, 0.01, 0.2],
                         "relative_bias_hi": [math.inf, 0.5, 0.3], "snr": [0.2, 1.0, 1.0],
                         "bias_p_value_min": [0.125] * 3})
    notes = stats.interval_notes(rows, level=0.95, n_batches=4, n_flips=200)
    assert notes[0].startswith("a: upper end ∞") and f"{math.ceil(1.96 * math.sqrt(2) / 0.04)} batches" in notes[0]
    assert notes[1].startswith("b: upper end 0.5 is over 10×")
    assert "smallest attainable p is 0.125" in notes[2] and "≥ 6 batches" in notes[2] and len(notes) == 3


def test_holm_matches_hand_computed_family() -> None:
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → running max 0.06
    p = [0.01, 0.04, 0.03, 0.005]
    np.testing.assert_allclose(stats.holm(p), [0.03, 0.06, 0.06, 0.02])
    # capped at 1 and NaN left alone (m counts finite values only: here 3)
    np.testing.assert_allclose(stats.holm([0.5, np.nan, 0.2, 0.01]), [0.5, np.nan, 0.4, 0.03], equal_nan=True)
    assert stats.holm([]).size == 0
    np.testing.assert_allclose(stats.holm([0.6, 0.7]), [1.0, 1.0])


def test_holm_controls_family_wise_error_under_the_null() -> None:
    rng = np.random.default_rng(5)
    p = rng.uniform(size=(4000, 10))
    rejections = np.array([np.any(stats.holm(row) <= 0.05) for row in p])
    assert rejections.mean() <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)


@pytest.mark.parametrize("n, floor", [(5, 0.0625), (6, 0.03125)])
def test_min_attainable_p_is_what_scipy_reaches(n: int, floor: float) -> None:
    diffs = np.arange(1, n + 1, dtype=float)
    assert stats.min_attainable_p(n) == floor
    assert sps.wilcoxon(diffs).pvalue == pytest.approx(floor)
    assert stats.paired_test(diffs, np.zeros(n), test="permutation").pvalue == pytest.approx(floor)


def test_seeds_needed_and_warnings() -> None:
    assert stats.seeds_needed(0.05) == 6  # 2/2^6 = 0.031 ≤ 0.05 < 2/2^5
    assert stats.seeds_needed(0.05, family_size=3) == 7  # 3·2/2^7 = 0.047
    assert stats.seeds_needed(0.05, alternative="less") == 5
    assert "cannot detect" in stats.seed_warning(5)
    assert "no test" in stats.seed_warning(1)
    assert "Holm over 3" in stats.seed_warning(6, family_size=3)
    assert "little power" in stats.seed_warning(7)
    assert stats.seed_warning(12, family_size=3) == ""


@pytest.mark.parametrize("test", stats.TESTS)
def test_known_significant_difference(test: str) -> None:
    rng = np.random.default_rng(11)
    ref = rng.normal(0.0, 1.0, size=12)
    treat = ref + 1.0 + rng.normal(0.0, 0.1, size=12)
    res = stats.paired_test(treat, ref, test=test)
    assert res.n == 12
    assert res.pvalue == pytest.approx(2 / 2**12)  # every difference positive: the exact floor
    assert res.diff_low <= 1.0 <= res.diff_high
    assert res.mean_diff == pytest.approx(np.mean(treat - ref))
    assert res.effect_dz == pytest.approx(np.mean(treat - ref) / np.std(treat - ref, ddof=1))


@pytest.mark.parametrize("test", stats.TESTS)
def test_known_null_difference_keeps_its_level(test: str) -> None:
    rng = np.random.default_rng(12)
    reps = 200
    pvals = np.array([stats.paired_test(rng.normal(size=10), rng.normal(size=10), test=test,
                                        n_resamples=2000, seed=i).pvalue for i in range(reps)])
    assert np.mean(pvals <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / reps)
    # p-values under the null are roughly uniform
    assert 0.35 <= np.median(pvals) <= 0.65


def test_wilcoxon_agrees_with_scipy_and_zero_differences() -> None:
    x = np.array([1.3, 2.1, 0.4, 3.3, 1.9, 2.8, 0.2])
    y = np.array([1.0, 2.5, 0.1, 2.0, 1.0, 2.9, 0.3])
    res = stats.paired_test(x, y)
    ref = sps.wilcoxon(x, y)
    assert (res.statistic, res.pvalue) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    same = stats.paired_test(x, x)
    assert same.pvalue == 1.0 and same.mean_diff == 0.0
    with pytest.raises(ValueError, match="length"):
        stats.paired_test(x, y[:3])
    with pytest.raises(ValueError, match="unknown test"):
        stats.paired_test(x, y, test="t")


def _methods_table(seeds: int, rng: np.random.Generator) -> pd.DataFrame:
    base = rng.normal(0.0, 1.0, size=seeds)
    rows = []
    for task in ("copy", "adding"):
        for s in range(seeds):
            rows.append({"task": task, "method": "full", "seed": s, "v": base[s]})
            rows.append({"task": task, "method": "better", "seed": s, "v": base[s] + 2.0 + rng.normal(0, 0.1)})
            rows.append({"task": task, "method": "same", "seed": s, "v": base[s] + rng.normal(0, 1.0)})
    return pd.DataFrame(rows)


def test_paired_comparisons_family() -> None:
    df = _methods_table(12, np.random.default_rng(2))
    out = stats.paired_comparisons(df, value="v", condition="method", unit="seed", by=["task"],
                                   pairs=[("better", "full"), ("same", "full"), ("absent", "full")])
    assert len(out) == 4
    np.testing.assert_allclose(out["p_holm"], stats.holm(out["p"]))
    better = out[out["treatment"] == "better"]
    assert better["significant"].all() and (better["mean_diff"] > 1.5).all()
    assert not out[out["treatment"] == "same"]["significant"].any()
    assert (out["n"] == 12).all() and (out["warning"] == "").all()


def test_paired_comparisons_pairs_on_shared_seeds_and_warns() -> None:
    df = _methods_table(5, np.random.default_rng(4))
    df = df[~((df["method"] == "better") & (df["seed"] == 0))]
    out = stats.paired_comparisons(df, value="v", condition="method", unit="seed", by=["task"],
                                   pairs=[("better", "full")])
    assert (out["n"] == 4).all()
    assert out["warning"].str.contains("cannot detect").all()
    assert not out["significant"].any()


def test_paired_comparisons_rejects_bad_tables() -> None:
    df = _methods_table(3, np.random.default_rng(0))
    with pytest.raises(KeyError, match="seed"):
        stats.paired_comparisons(df.drop(columns="seed"), value="v", condition="method", unit="seed",
                                 pairs=[("better", "full")])
    with pytest.raises(ValueError, match="duplicate"):
        stats.paired_comparisons(df, value="v", condition="method", unit="seed", pairs=[("better", "full")])
    empty = stats.paired_comparisons(df, value="v", condition="method", unit="seed", by=["task"],
                                     pairs=[("x", "y")])
    assert empty.empty and "p_holm" in empty.columns
