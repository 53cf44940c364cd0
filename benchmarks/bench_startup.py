"""Start-up time of the CLI: ``--help``, ``tasks`` and ``explain`` in fresh processes, beside a bare
``import torch`` (which every command needs) and ``import pandas, matplotlib`` (which they avoid).

    python benchmarks/bench_startup.py --repeats 7

Prints the median and the spread (min–max) of the wall time over the repeats, interleaved so that all
commands see the same machine load. Numbers in docs/perf.md ("CLI start-up").
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'import torch, pandas, matplotlib.pyplot'": [sys.executable, "-c",
                                                          "import torch, pandas, matplotlib.pyplot"],
    "tbptt-bench --help": [sys.executable, "-m", "tbptt_bench.cli", "--help"],
    "tbptt-bench tasks": [sys.executable, "-m", "tbptt_bench.cli", "tasks"],
    "tbptt-bench explain tbptt:k1=4,k2=8 --seq-len 12": [sys.executable, "-m", "tbptt_bench.cli", "explain",
                                                         "tbptt:k1=4,k2=8", "--seq-len", "12"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per command (default 7)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, argv in COMMANDS.items():
            t0 = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times[name].append(time.perf_counter() - t0)
    width = max(map(len, COMMANDS))
    print(f"{'command':<{width}}  median s   min–max s")
    for name, values in times.items():
        print(f"{name:<{width}}  {statistics.median(values):8.2f}   {min(values):.2f}–{max(values):.2f}")


if __name__ == "__main__":
    main()
