"""Per-cell cost of the local executor's processes: a fresh process per cell against warm workers.

    python benchmarks/bench_workers.py --cells 12 --repeats 3

Runs the first ``--cells`` cells of the ``quick`` suite that time nothing, one job, once with a fresh
process per cell (``cells_per_worker=1``, the executor before warm workers) and once with warm workers,
alternating over the repeats so that both see the same machine load. Per cell it prints the median over
the repeats of the wall time, of the time the cells report for themselves (``duration_s``), of the rest
(wall − Σ ``duration_s``: starting a process, returning the result, stamping provenance) and of the CPU
time of the worker processes (user + system, read from the fork server that reaps them: on a shared
machine this moves far less with the load than wall time does).

    python benchmarks/bench_workers.py --whole-suite quick

instead runs that whole suite once (``tbptt-bench run SUITE`` into a temporary folder) and prints its wall
time and the CPU seconds of its workers and of the driver. Numbers in docs/suites.md ("Executors").
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from tbptt_bench.suites.executors import LocalExecutor
from tbptt_bench.suites.suite import load_suite

MODES = {"fresh process per cell": 1, "warm workers": None}


def reaped_cpu_seconds() -> float:
    """CPU seconds of the ended children of this process's fork server (the workers), 0 before it starts."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and b"multiprocessing.forkserver" in cmdline:
            total += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime + cstime
    return total


def one_run(cells: list, cells_per_worker: int | None) -> tuple[float, float, float]:
    """Wall seconds of running ``cells``, the sum of their own ``duration_s`` and the workers' CPU seconds."""
    cpu0, t0 = reaped_cpu_seconds(), time.perf_counter()
    results = list(LocalExecutor(jobs=1, cells_per_worker=cells_per_worker).run(cells))
    wall = time.perf_counter() - t0
    time.sleep(0.5)  # the fork server reaps the last worker
    bad = [r for r in results if r.status != "ok"]
    if bad:
        raise SystemExit(f"cell {bad[0].key} ended {bad[0].status}: {bad[0].error}")
    return wall, sum(r.duration_s for r in results), reaped_cpu_seconds() - cpu0


def whole_suite(suite: str) -> None:
    """Run ``suite`` once with the default executor and print its wall time and CPU seconds."""
    from tbptt_bench.cli import main as cli

    with tempfile.TemporaryDirectory() as results:
        t0 = time.perf_counter()
        status = cli(["run", suite, "--results", results, "--quiet"])
        wall = time.perf_counter() - t0
    time.sleep(0.5)  # the fork server reaps the last worker
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(f"run {suite}: exit status {status}, wall {wall:.0f} s, CPU of the workers {reaped_cpu_seconds():.0f} s, "
          f"of the driver {own.ru_utime + own.ru_stime:.0f} s; load average (1 min) at the end {os.getloadavg()[0]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=12, help="cells of the quick suite to run (default 12)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each mode, alternating (default 3)")
    parser.add_argument("--whole-suite", metavar="SUITE", help="run this whole suite once instead (wall and CPU)")
    args = parser.parse_args()
    if args.whole_suite:
        whole_suite(args.whole_suite)
        return
    cells = [c for c in load_suite("quick").cells if not c.timing][:args.cells]
    runs: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode, per_worker in MODES.items():
            runs[mode].append(one_run(cells, per_worker))
    load = os.getloadavg()[0]
    print(f"{len(cells)} cells, {args.repeats} repeats, {os.cpu_count()} CPUs, load average (1 min) at the end {load:.1f}")
    print(f"{'':24} {'wall':>8} {'in cell':>8} {'outside':>8} {'CPU':>8}   (medians, seconds per cell)")
    for mode, triples in runs.items():
        wall, inside, outside, cpu = (statistics.median(v) / len(cells) for v in (
            [w for w, _, _ in triples], [d for _, d, _ in triples], [w - d for w, d, _ in triples],
            [c for _, _, c in triples]))
        print(f"{mode:24} {wall:8.3f} {inside:8.3f} {outside:8.3f} {cpu:8.3f}")


if __name__ == "__main__":
    main()
