"""Per-cell cost of the local executor's processes: a fresh process per cell against warm workers.

    python benchmarks/bench_workers.py --cells 12 --repeats 3

Runs the first ``--cells`` cells of the ``quick`` suite that time nothing, one job, once with a fresh
process per cell (``cells_per_worker=1``, the executor before warm workers) and once with warm workers,
alternating over the repeats so that both see the same machine load. Per cell it prints the median over
the repeats of the wall time, of the time the cells report for themselves (``duration_s``) and of the rest
(wall − Σ ``duration_s``: starting a process, returning the result, stamping provenance). Numbers in
docs/suites.md ("Executors").
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from tbptt_bench.suites.executors import LocalExecutor
from tbptt_bench.suites.suite import load_suite

MODES = {"fresh process per cell": 1, "warm workers": None}


def one_run(cells: list, cells_per_worker: int | None) -> tuple[float, float]:
    """Wall seconds of running ``cells`` and the sum of their own ``duration_s``."""
    t0 = time.perf_counter()
    results = list(LocalExecutor(jobs=1, cells_per_worker=cells_per_worker).run(cells))
    wall = time.perf_counter() - t0
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise SystemExit(f"cell {bad[0].key} ended {bad[0].status}: {bad[0].error}")
    return wall, sum(r.duration_s for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=12, help="cells of the quick suite to run (default 12)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating (default 3)")
    args = parser.parse_args()
    cells = [c for c in load_suite("quick").cells if not c.timing][:args.cells]
    runs: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, per_worker in MODES.items():
            runs[mode].append(one_run(cells, per_worker))
    load = os.getloadavg()[0]
    print(f"{len(cells)} cells, {args.repeats} repeats, {os.cpu_count()} CPUs, load average (1 min) at the end {load:.1f}")
    print(f"{'':24} {'wall/cell':>10} {'in cell':>10} {'outside':>10}   (medians, seconds per cell)")
    for mode, pairs in runs.items():
        wall = statistics.median(w for w, _ in pairs) / len(cells)
        inside = statistics.median(d for _, d in pairs) / len(cells)
        outside = statistics.median(w - d for w, d in pairs) / len(cells)
        print(f"{mode:24} {wall:10.3f} {inside:10.3f} {outside:10.3f}")


if __name__ == "__main__":
    main()
