"""benchmarks/bench_overhead.py (the numbers of docs/perf.md's overhead rows): its median interval against
exact binomial coverage, and one tiny end-to-end run with several hidden sizes (no timing asserted)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_overhead import median_interval  # noqa: E402


def coverage(n: int, j: int) -> float:
    """P(x_(j) ≤ median ≤ x_(n+1-j)) for n draws of a continuous distribution: 1 − 2·P(Bin(n, ½) < j)."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n


@pytest.mark.parametrize("n", [6, 11, 21, 41, 61, 101])
def test_the_median_interval_is_the_narrowest_order_statistic_pair_with_95_percent_coverage(n: int) -> None:
    values = [float(v) for v in range(1, n + 1)][::-1]  # x_(i) = i, given unsorted
    lo, hi = median_interval(values)
    j = int(lo)
    assert hi == n + 1 - j
    assert coverage(n, j) >= 0.95 > coverage(n, j + 1)


def test_too_few_rounds_give_the_whole_range() -> None:
    assert coverage(5, 1) < 0.95
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0)


def test_runs_end_to_end_for_several_hidden_sizes(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py"), "--hidden", "4,8",
                          "--seq-len", "24", "--k", "8", "--batch", "2", "--parts", "chunked", "--rounds", "3",
                          "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {k for k in data if k.startswith("overhead")} == {"overhead_chunked_vs_hand_h4", "overhead_chunked_vs_hand_h8"}
    for h in (4, 8):
        r = data[f"overhead_chunked_vs_hand_h{h}"]
        assert r["hidden"] == h and r["rounds"] == 3
        for measure in (r, r["cpu_time"]):
            lo, hi = measure["median_round_ratio_ci95"]
            assert lo <= measure["median_round_ratio"] <= hi
