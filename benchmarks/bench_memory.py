"""Peak memory against sequence length, one fresh process per configuration (issue 5 memory targets).

    python benchmarks/bench_memory.py --threads 1 --out memory.csv

For T in 512 … 8192 (LSTM, hidden 128, batch 32, Adam, copy task) it measures ``chunked:k=64``,
``tbptt:k1=16,k2=64``, ``full`` and ``full:checkpoint=C`` with C = round(√T), each in its own process
(:func:`tbptt_bench.perf.child.measure_in_fresh_process`), and reports

* ``mem_delta_bytes`` — peak over warm-up and one sequence above the baseline taken after the model,
  the optimiser and the batch exist: what training adds, optimiser state included;
* ``mem_sequence_bytes`` — peak of one sequence of updates above the memory in use just before it,
  once optimiser state exists: the activation memory of the method (gradients and workspaces included).

The batch itself is drawn before the baseline (copy at T = 8192, B = 32: inputs, targets and weights
take 5.2 MB), so the numbers are the method's memory, not the data's. Targets: truncated methods grow
< 10% from T = 512 to 8192; full BPTT grows linearly (least-squares fit, R² reported); the checkpointed
run at the largest T uses ≤ 20% of full BPTT's activation memory (mem_sequence_bytes) for ≤ 1.5× its time —
times from an interleaved comparison in one process (``--time-rounds``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbptt_bench.perf.child import perf_grid

from tbptt_bench.perf.config import PerfConfig

from tbptt_bench.perf.harness import interleaved_times, Workload

from tbptt_bench.perf.tables import save_table, write_json_atomic
from tbptt_bench.provenance import provenance

MiB = 2.0**20


def checkpoint_length(seq_len: int) -> int:
    """C ≈ √T: boundary states (T/C of them) and one chunk's activations (C steps) balance."""
    return max(1, round(math.sqrt(seq_len)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-lens", default="512,1024,2048,4096,8192")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--time-rounds", type=int, default=3, help="interleaved full/checkpoint timings at the largest T")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per configuration")
    p.add_argument("--out", type=Path, default=None, help="the table (.csv/.parquet/.json); a .summary.json beside it")
    args = p.parse_args(argv)
    lens = [int(v) for v in args.seq_lens.split(",")]
    base = PerfConfig(task="copy", model="lstm", batch_size=args.batch, hidden_size=args.hidden, threads=args.threads,
                      warmup=1, repeats=1, optimizer="adam")
    configs = []
    for t in lens:
        for method in ("chunked:k=64", "tbptt:k1=16,k2=64", "full", f"full:checkpoint={checkpoint_length(t)}"):
            configs.append(dataclasses.replace(base, method=method, seq_len=t))

    def show(row: dict[str, Any]) -> None:
        d, s = row["mem_delta_bytes"], row["mem_sequence_bytes"]
        print(f"  {row['method']:<22} T={row['seq_len']:>5}: {row['status']:<6} peak +{(d or 0) / MiB:8.1f} MiB, "
              f"sequence +{(s or 0) / MiB:8.1f} MiB, {row['ms_per_update'] or float('nan'):9.1f} ms/update", flush=True)

    frame = perf_grid(configs, fresh=True, timeout=args.timeout, on_row=show)
    frame["family"] = frame["method"].str.replace(r"full:checkpoint=\d+", "full:checkpoint", regex=True)
    summary: dict[str, Any] = {"provenance": provenance("cpu"), "growth": {}}
    lo, hi = min(lens), max(lens)
    for family, group in frame[frame["status"] == "ok"].groupby("family"):
        by_t = group.set_index("seq_len")
        if lo in by_t.index and hi in by_t.index:
            summary["growth"][family] = {
                col: float(by_t.loc[hi, col] / by_t.loc[lo, col] - 1.0)
                for col in ("mem_delta_bytes", "mem_sequence_bytes")
            }
        if family == "full" and len(by_t) >= 2:
            t = by_t.index.to_numpy(dtype=float)
            m = by_t["mem_sequence_bytes"].to_numpy(dtype=float)
            slope, intercept = np.polyfit(t, m, 1)
            r2 = 1.0 - float(np.sum((m - (slope * t + intercept)) ** 2) / np.sum((m - m.mean()) ** 2))
            summary["full_linear_fit"] = {"bytes_per_step": float(slope), "intercept_bytes": float(intercept), "r2": r2}
    ok = frame[(frame["status"] == "ok") & (frame["seq_len"] == hi)].set_index("family")
    if {"full", "full:checkpoint"} <= set(ok.index):
        summary["checkpoint_over_full_sequence_memory"] = float(
            ok.loc["full:checkpoint", "mem_sequence_bytes"] / ok.loc["full", "mem_sequence_bytes"])
        summary["checkpoint_over_full_run_memory"] = float(
            ok.loc["full:checkpoint", "mem_delta_bytes"] / ok.loc["full", "mem_delta_bytes"])
    if args.time_rounds:
        torch.set_num_threads(args.threads)
        spec = f"full:checkpoint={checkpoint_length(hi)}"
        work = {m: Workload(dataclasses.replace(base, method=m, seq_len=hi), torch.device("cpu"), torch.float32)
                for m in ("full", spec)}
        times = interleaved_times({m: (lambda w=w: w.sequence(w.prepare())) for m, w in work.items()},
                                  args.time_rounds, warmup=1)
        summary["checkpoint_over_full_time"] = statistics.median(times[spec]) / statistics.median(times["full"])
        summary["time_seconds"] = times
    print(f"growth from T={lo} to T={hi}: " + "; ".join(
        f"{f} run peak {100 * g['mem_delta_bytes']:+.1f}% sequence {100 * g['mem_sequence_bytes']:+.1f}%"
        for f, g in summary["growth"].items()))
    if "full_linear_fit" in summary:
        fit = summary["full_linear_fit"]
        print(f"full BPTT: {fit['bytes_per_step'] / 1024:.1f} KiB per step, R² = {fit['r2']:.5f}")
    for key in ("checkpoint_over_full_sequence_memory", "checkpoint_over_full_run_memory", "checkpoint_over_full_time"):
        if key in summary:
            print(f"{key} at T={hi}: {summary[key]:.3f}")
    if args.out:
        save_table(frame, args.out)
        write_json_atomic(args.out.with_suffix(".summary.json"), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
