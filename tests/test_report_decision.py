"""The decision summary and the equal-budget interpolation against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tbptt_bench.report.budget import at_common_budget, common_budget, interpolate_runs, run_value_at
from tbptt_bench.report.report import build_report
from tbptt_bench.report.sections.decision import chosen_k, decision_table, smallest_k
from tbptt_bench.report.load import as_tables
from test_report import FAST, quick_tables

ADAPTIVE = "adaptive:delta=0.5,kmin=2,kmax=12,every=8"


def _bias_row(spec: str, seed: int, hi: float) -> dict[str, object]:
    return {"key": f"b{seed}", "measure": "bias", "status": "ok", "task": "copy", "model": "lstm", "seq_len": 24,
            "seed": seed, "spec": spec, "group": "all", "relative_bias": hi / 2, "relative_bias_lo": 0.0,
            "relative_bias_hi": hi}


def _perf_row(spec: str, seq_len: int, tokens_per_s: float, mib: float) -> dict[str, object]:
    return {"key": f"p{spec}{seq_len}", "measure": "perf", "status": "ok", "task": "copy", "model": "lstm",
            "method": spec, "seq_len": seq_len, "tokens_per_s": tokens_per_s, "ms_per_update": 1.0,
            "mem_delta_bytes": mib * 2**20}


def small_store() -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """Bias upper ends per seed chosen so the answer can be read off by hand (see the test)."""
    his = {"full": (0.0, 0.0), "chunked:k=2": (0.2, 0.3), "chunked:k=4": (0.04, 0.06), "chunked:k=8": (0.008, 0.03),
           "sliding:k=2": (0.04, 0.045), "sliding:k=4": (0.009, 0.0095)}
    rows = [_bias_row(spec, seed, hi) for spec, pair in his.items() for seed, hi in zip((1, 2), pair)]
    rows += [_perf_row("full", 24, 1000, 100), _perf_row("chunked:k=4", 24, 500, 10), _perf_row("sliding:k=4", 24, 250, 20),
             _perf_row("full", 12, 10, 1), _perf_row("chunked:k=4", 12, 10, 10)]
    train = pd.DataFrame([
        {"key": f"t{m}{s}", "task": "copy", "model": "lstm", "method": m, "seed": s, "eval_metric": v,
         "metric_name": "accuracy", "higher": True}
        for m, values in {"full": (0.5, 0.6), "chunked:k=8": (0.7, 0.9), "sliding:k=2": (0.55, 0.65),
                          "sliding:k=4": (0.4, 0.4)}.items() for s, v in zip((1, 2), values)])
    return {"results": pd.DataFrame(rows)}, train


def test_smallest_k_uses_every_seeds_upper_end() -> None:
    tables, _ = small_store()
    bias = tables["results"].assign(series=lambda f: f["spec"].str.split(":").str[0],
                                    K=lambda f: pd.to_numeric(f["spec"].str.extract(r"k=(\d+)")[0]))
    five = smallest_k(bias[bias["K"].notna()], 0.05).set_index("series")
    # chunked: K=4 has one seed at 0.06 ≥ 5%, K=8 has both below; sliding: K=2 both below 5%
    assert five.loc["chunked", "K"] == 8 and five.loc["sliding", "K"] == 2
    one = smallest_k(bias[bias["K"].notna()], 0.01).set_index("series")
    assert math.isnan(one.loc["chunked", "K"]) and one.loc["chunked", "largest_k"] == 8
    assert one.loc["sliding", "K"] == 4


def test_decision_table_against_hand_computation() -> None:
    tables, train = small_store()
    table = decision_table(as_tables(tables), train).set_index("series")
    chunked, sliding = table.loc["chunked"], table.loc["sliding"]
    assert chunked["k_0.05"] == 8 and math.isnan(chunked["k_0.01"])
    # no perf cell at K=8: the nearest measured K (4) at the largest T both have (24), over full's
    assert chunked["cost_k_0.05"] == 4 and chunked["speed_0.05"] == pytest.approx(500 / 1000)
    assert chunked["memory_0.05"] == pytest.approx(10 / 100)
    # trained at K=8: paired differences 0.7-0.5 and 0.9-0.6
    assert chunked["train_k_0.05"] == 8 and chunked["metric_gap_0.05"] == pytest.approx(0.25)
    assert math.isnan(chunked["metric_gap_0.01"])
    assert sliding["k_0.05"] == 2 and sliding["cost_k_0.05"] == 4 and sliding["speed_0.05"] == pytest.approx(0.25)
    assert sliding["metric_gap_0.05"] == pytest.approx(0.05)
    assert sliding["k_0.01"] == 4 and sliding["memory_0.01"] == pytest.approx(0.2)
    assert sliding["metric_gap_0.01"] == pytest.approx(-0.15)
    assert chunked["metric"] == "accuracy ↑"


def test_chosen_k_is_the_median_last_k_of_methods_that_vary_it() -> None:
    curves = pd.DataFrame({"key": ["a"] * 3 + ["b"] * 3 + ["c"] * 3, "n_updates": [0, 8, 16] * 3,
                           "k_used": [2, 4, 6, 2, 8, 8, 4, 4, 4]})
    train = pd.DataFrame({"key": ["a", "b", "c"], "task": "copy", "model": "lstm",
                          "method": [ADAPTIVE, ADAPTIVE, "chunked:k=4"]})
    chosen = chosen_k(curves.merge(train, on="key"), train)
    assert len(chosen) == 1 and chosen["K"].iloc[0] == 7.0


def test_run_value_at_interpolates_and_never_extrapolates() -> None:
    run = pd.DataFrame({"tokens": [0, 100, 300], "eval_metric": [1.0, 0.5, 0.1]})
    got = run_value_at(run, "tokens", "eval_metric", np.array([50.0, 200.0, 300.0, 400.0]))
    assert got[:3] == pytest.approx([0.75, 0.3, 0.1]) and math.isnan(got[3])


def test_common_budget_and_values_at_it() -> None:
    curves = pd.DataFrame({"key": ["a"] * 3 + ["b"] * 2, "panel": "p", "method": ["full"] * 3 + ["chunked:k=4"] * 2,
                           "tokens": [0, 100, 300, 0, 250], "eval_metric": [1.0, 0.5, 0.1, 1.0, 0.0]})
    assert common_budget(curves, "tokens")["p"] == 250
    at = at_common_budget(curves, "tokens", "eval_metric").set_index("key")
    assert at.loc["a", "value"] == pytest.approx(0.5 + (0.1 - 0.5) * 150 / 200)
    assert at.loc["b", "value"] == pytest.approx(0.0)
    long = interpolate_runs(curves, "tokens", "eval_metric", np.array([200.0, 300.0]))
    assert len(long) == 3  # run b never reached 300 tokens
    assert long.set_index(["key", "budget"]).loc[("b", 200.0), "value"] == pytest.approx(0.2)


def test_report_compares_at_equal_tokens(tmp_path: Path) -> None:
    """chunked:k=4 reads 16 tokens per update, full 96: the final metric is read at 16·24 = 384 tokens, where
    full's curve lies halfway between its evaluations at 0 and 768 tokens."""
    tables = quick_tables(tasks=("copy",), models=("lstm",))
    curves = tables["curves"]
    chunked = curves["method"] == "chunked:k=4"
    curves.loc[chunked, "tokens"] = 16 * curves.loc[chunked, "update"]
    build_report(tables, tmp_path / "rep", FAST)
    final = pd.read_csv(tmp_path / "rep" / "tables" / "final_metric.csv")
    assert set(final["budget"]) == {384.0}
    full = curves[curves["method"] == "full"]
    by_seed = full.groupby("seed").apply(
        lambda r: 0.5 * (r.loc[r["update"] == 0, "eval_metric"].iloc[0] + r.loc[r["update"] == 8, "eval_metric"].iloc[0]),
        include_groups=False)
    assert final.set_index("method").loc["full", "mean"] == pytest.approx(by_seed.mean())
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "equal tokens" in text and "time to target, in tokens" in text.lower()


def test_cost_at_the_training_size_and_at_scale_against_hand_computation() -> None:
    """Perf cells at the trained size (hidden 8, batch 4) give the train-size ratios, the largest hidden × batch
    (no run trained there) the at-scale ones; the first-screen cell names both, marks the busy one, and the
    summary says that overhead dominates where the small size runs at under half the at-scale ratio."""
    from tbptt_bench.report.sections.decision import first_screen, overhead_words, split_sizes

    tables, train = small_store()
    results = tables["results"]
    perf = results["measure"] == "perf"
    results.loc[perf, ["hidden_size", "batch_size"]] = [8, 4]
    results["busy"] = False
    scale = [{**_perf_row(spec, 256, tps, mib), "key": f"s{spec}", "hidden_size": 128, "batch_size": 32,
              "busy": spec == "full"} for spec, tps, mib in (("full", 4000, 400), ("chunked:k=8", 3000, 40))]
    tables = {"results": pd.concat([results, pd.DataFrame(scale)], ignore_index=True)}
    train = train.assign(hidden_size=8, batch_size=4)
    small, big = split_sizes(tables["results"][tables["results"]["measure"] == "perf"], train)
    assert set(big["hidden_size"]) == {128} and set(small["hidden_size"]) == {8}
    table = decision_table(as_tables(tables), train).set_index("series")
    chunked = table.loc["chunked"]
    assert chunked["speed_0.05"] == pytest.approx(500 / 1000) and chunked["cost_k_0.05"] == 4
    assert chunked["speed_scale_0.05"] == pytest.approx(3000 / 4000) and chunked["cost_k_scale_0.05"] == 8
    assert chunked["memory_scale_0.05"] == pytest.approx(40 / 400) and bool(chunked["busy_scale_0.05"])
    assert math.isnan(table.loc["sliding", "speed_scale_0.05"])  # no sliding cell at scale
    shown = first_screen(table.reset_index(), train, "tokens").set_index("task · model")
    cell = shown.loc["copy · lstm\n(accuracy ↑)", "chunked"].split("\n")
    assert cell == ["K 8 · > 8 · metric +0.25 vs full", "train size (K=4): 0.5× tok/s, 0.1× mem",
                    "at scale: 0.75× tok/s, 0.1× mem*"]
    assert shown.loc["copy · lstm\n(accuracy ↑)", "sliding"].split("\n")[2] == "at scale: not measured"
    # chunked: 0.5 at the small size against 0.75 at scale is not under half; sliding has no scale ratio
    assert overhead_words(table) == ""
    assert "overhead dominates" in overhead_words(table.assign(**{"speed_0.05": 0.2}))


def test_report_progress_logs_each_section_off_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    from tbptt_bench.report.report import progress

    with caplog.at_level("INFO", logger="tbptt_bench.report.report"), progress(2) as step:
        step("gradient bias")
        step("cost")
    assert [r.getMessage() for r in caplog.records] == ["report: gradient bias", "report: cost"]


def test_cost_ratios_are_over_full_alone_in_the_same_configuration() -> None:
    """The cost_ratio figure's numbers: each method's median tokens/s and peak memory over those of `full`
    (never pooled with full:checkpoint=8, which is a method of its own) in the same configuration."""
    from tbptt_bench.report.common import with_method_axes
    from tbptt_bench.report.sections.cost import ratio_rows

    rows = [_perf_row("full", 24, 1000, 100), _perf_row("full:checkpoint=8", 24, 400, 30),
            _perf_row("chunked:k=4", 24, 500, 10), _perf_row("chunked:k=4", 24, 700, 10),
            _perf_row("chunked:k=4", 48, 900, 10)]
    perf = with_method_axes(pd.DataFrame(rows)).assign(busy=[False, False, True, False, False])
    perf["peak_mib"] = perf["mem_delta_bytes"] / 2**20
    got = ratio_rows(perf).set_index(["panel", "label", "what"])["ratio"]
    t24 = [p for p in got.index.get_level_values("panel") if "24" in p][0]
    assert got[(t24, "chunked K=4", "tokens/s ÷ full BPTT's")] == pytest.approx(600 / 1000)
    assert got[(t24, "chunked K=4", "peak memory ÷ full BPTT's")] == pytest.approx(10 / 100)
    assert got[(t24, "full:checkpoint=8", "tokens/s ÷ full BPTT's")] == pytest.approx(400 / 1000)
    assert len(got) == 4  # T=48 has no full BPTT cell: no ratio
    assert ratio_rows(perf).set_index(["label", "what"])["busy"].loc[("chunked K=4", "tokens/s ÷ full BPTT's")]
