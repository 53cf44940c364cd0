"""The real-gradient coverage script at a small size: its worlds have the truth they claim, and the intervals
cover it near their level (the full table, 300+ data sets per row: docs/statistics.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import coverage_real  # noqa: E402


@pytest.fixture(scope="module")
def pool() -> dict[str, np.ndarray]:
    return coverage_real.gradient_pool("copy", "rnn", 60)


def test_pool_rows_are_each_batchs_gradient_and_error(pool) -> None:
    from tbptt_bench.analysis.gradients import flatten, method_gradient
    from tbptt_bench.core.build import make_model, make_task
    from tbptt_bench.seeding import derive_seed, generator

    task = make_task("copy")
    model = make_model("rnn", task, coverage_real.HIDDEN, seed=0, dtype="float64")
    batch = task.sample(coverage_real.BATCH, coverage_real.SEQ_LEN, generator(derive_seed("coverage-pool", 0, 7)),
                        "valid")
    est = flatten(method_gradient(model, batch, coverage_real.BIASED, task.loss_kind)).numpy()
    np.testing.assert_allclose(pool[f"d:{coverage_real.BIASED}"][7] + pool["g"][7], est, rtol=1e-12, atol=1e-14)
    worlds = coverage_real.worlds(pool)
    d, _, unbiased = worlds[f"{coverage_real.UNBIASED} (centred)"]
    assert unbiased and np.abs(d.mean(0)).max() < 1e-12 * np.abs(d).max()


def test_small_coverage_run_is_near_the_level(pool) -> None:
    """300 data sets of N = 8 per world (binomial SE 0.013): within 0.9–0.99, misses on both sides ≤ 0.07."""
    for i, (d, g, unbiased) in enumerate(coverage_real.worlds(pool).values()):
        c = coverage_real.coverage(d, g, unbiased, 8, 300, seed=i)
        for key in ("ratio", "norm"):
            cover = 1 - c[f"{key}_below"] - c[f"{key}_above"]
            assert 0.90 <= cover <= 0.99 and max(c[f"{key}_below"], c[f"{key}_above"]) <= 0.07, (key, c)


def test_a_cell_can_name_its_own_biased_method() -> None:
    """``TASK/MODEL/SPEC``: the pool stores that method's errors, and its biased world is built from them."""
    from tbptt_bench.analysis.gradients import flatten, method_gradient
    from tbptt_bench.core.build import make_model, make_task
    from tbptt_bench.methods.base import parse_method
    from tbptt_bench.seeding import derive_seed, generator

    pool = coverage_real.gradient_pool("copy", "rnn", 3, biased="chunked:k=4")
    task = make_task("copy")
    model = make_model("rnn", task, coverage_real.HIDDEN, seed=0, dtype="float64")
    batch = task.sample(coverage_real.BATCH, coverage_real.SEQ_LEN, generator(derive_seed("coverage-pool", 0, 2)),
                        "valid")
    est = flatten(method_gradient(model, batch, parse_method("chunked:k=4"), task.loss_kind,
                                  seed=derive_seed("draws", 2))).numpy()
    np.testing.assert_allclose(pool["d:chunked:k=4"][2] + pool["g"][2], est, rtol=1e-12, atol=1e-14)
    d, _, unbiased = coverage_real.worlds(pool, "chunked:k=4")["chunked:k=4 (biased)"]
    assert not unbiased and d is pool["d:chunked:k=4"]


@pytest.mark.parametrize("argv", [["--cells", "copy"], ["--cells", "copy/rnn/chunked:k=2/x"], ["--worlds", "both"]])
def test_bad_cells_and_worlds_are_usage_errors(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        coverage_real.main(argv)
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err
