"""Engine overhead and fused-vs-cell speed, each as a ratio measured in one process (issue 5 and 26 targets).

    python benchmarks/bench_overhead.py --threads 1 --out overhead.json
    python benchmarks/bench_overhead.py --threads 1 --hidden 8,16,32 --seq-len 512 --k 16 --parts chunked --rounds 61

1. **Overhead**: the project's chunked TBPTT (``chunked:k=K``) and full BPTT, timed as the harness
   times them (:class:`tbptt_bench.perf.harness.Workload`: the engine, an optimiser step after each update;
   here the method's list of updates is made inside the timed call too), against the hand-written loops
   of ``benchmarks/baselines.py`` (fused ``nn.LSTM`` per chunk, detach at chunk edges, the same loss and
   the same Adam; for full BPTT both the minimal one-call loop and a chain of 64-step calls, which is
   what the engine does on the CPU). Target: engine throughput ≥ 0.95 × hand-written, at every hidden
   size (small sizes, where each update does little arithmetic, show the engine's own per-update cost).
2. **Fused vs cell**: the same workload on the fused path and on the per-step cell path (and with
   ``--compile``, the compiled cell). Target: fused ≥ 3 × cell on the CPU.

Calls are interleaved (A B, then B A, …) so that drift on a shared machine hits both alike. Each round
gives one ratio (the two calls of a round ran next to each other); the result is the median of those
per-round ratios with a distribution-free 95% interval for it (order statistics of the binomial), and,
beside it, the ratio of median times. Each call's process CPU time is recorded too and compared the
same way (it leaves out time spent waiting for a core). The load average before and after each
comparison is recorded: on a busy machine, run more rounds. Defaults: copy task, LSTM, hidden 128, batch 32, T = 1024, K = 64.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from scipy.stats import binom

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # the hand-written comparison loops, beside this file

from tbptt_bench.perf.config import PerfConfig

from tbptt_bench.perf.harness import interleaved_times, Workload

from tbptt_bench.perf.tables import write_json_atomic
from tbptt_bench.provenance import provenance
from tbptt_bench.core.build import make_model


def engine_runner(cfg: PerfConfig) -> tuple[Workload, Callable[[], None]]:
    w = Workload(cfg, torch.device(cfg.device), torch.float32)

    def run() -> None:
        w.sequence(w.prepare())

    return w, run


def hand_runner(cfg: PerfConfig, w: Workload, k: int) -> Callable[[], None]:
    """The hand-written loop on its own copy of the model (same seed) and its own Adam.

    ``k`` < T with a full-BPTT config: full BPTT as a chain of k-step calls (no detach).
    """
    model = make_model(cfg.model, w.task, cfg.hidden_size, cfg.num_layers, seed=cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cfg.method == "full" and k < cfg.seq_len:
        return lambda: baselines.full_split(model, w.batch, k, step)
    return lambda: baselines.chunked(model, w.batch, k, step)


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``: order statistics ``x_(j) ≤ m ≤ x_(n+1-j)``
    with the largest ``j`` whose coverage ``1 − 2·P(Bin(n, ½) < j)`` is still ≥ ``level``; the whole
    range when there are too few values for that."""
    xs = sorted(values)
    n = len(xs)
    j = 0
    while j + 1 <= n // 2 and 1 - 2 * binom.cdf(j, n, 0.5) >= level:
        j += 1  # x_(j+1) still gives the coverage asked for
    return (xs[j - 1], xs[n - j]) if j > 0 else (xs[0], xs[-1])


def compare(times: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
    """Throughput of ``a`` over ``b``: the median of per-round ratios with its 95% interval (and p10,
    p90), and the ratio of median times."""
    per_round = sorted(tb / ta for ta, tb in zip(times[a], times[b]))
    n = len(per_round)
    lo, hi = median_interval(per_round)
    return {
        "ratio_of_medians": statistics.median(times[b]) / statistics.median(times[a]),
        "median_round_ratio": statistics.median(per_round), "rounds": n,
        "median_round_ratio_ci95": [lo, hi],
        "round_ratio_p10": per_round[int(0.1 * (n - 1))], "round_ratio_p90": per_round[int(0.9 * (n - 1))],
    }


#: Untimed calls of each loop before the timed rounds.
WARMUP = 2


def cpu_timed(fn: Callable[[], None], seconds: list[float]) -> Callable[[], None]:
    """``fn`` that also appends the process CPU time of each call to ``seconds``: on a shared machine
    CPU time leaves out the time a call waited for a core, which wall time charges to whichever
    implementation was unlucky."""

    def call() -> None:
        t0 = time.process_time()
        fn()
        seconds.append(time.process_time() - t0)

    return call


def load_average() -> float | None:
    """The 1-minute load average (None where the system has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def overhead(base: PerfConfig, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Engine against the hand-written loops for the methods in ``args.parts``, at ``base``'s size."""
    tokens = args.batch * args.seq_len
    methods = {"chunked": (f"chunked:k={args.k}", {"hand": args.k}),
               "full": ("full", {"hand": args.seq_len, "hand_64_step_calls": 64})}
    for name in (m for m in methods if m in args.parts):
        method, hand = methods[name]
        cfg = dataclasses.replace(base, method=method)
        w, engine = engine_runner(cfg)
        fns = {"engine": engine, **{label: hand_runner(cfg, w, k) for label, k in hand.items()}}
        cpu: dict[str, list[float]] = {label: [] for label in fns}
        load_before = load_average()
        times = interleaved_times({label: cpu_timed(fn, cpu[label]) for label, fn in fns.items()}, args.rounds,
                                  warmup=WARMUP)
        load_after = load_average()
        cpu = {label: seconds[WARMUP:] for label, seconds in cpu.items()}
        for label in hand:
            r = compare(times, "engine", label)
            r.update({f"{side}_tokens_per_s": tokens / statistics.median(times[side]) for side in ("engine", label)})
            r.update(hidden=base.hidden_size, load_before=load_before, load_after=load_after,
                     cpu_time=compare(cpu, "engine", label))
            results[_key(f"overhead_{name}_vs_{label}", base, args)] = r
            lo, hi = r["median_round_ratio_ci95"]
            c = r["cpu_time"]
            print(f"overhead {method:>14} vs {label:<18} hidden {base.hidden_size:>4}: engine "
                  f"{r['engine_tokens_per_s']:>9,.0f} tok/s, hand {r[label + '_tokens_per_s']:>9,.0f} tok/s; "
                  f"engine/hand per-round median {r['median_round_ratio']:.3f} (95% {lo:.3f}-{hi:.3f}, "
                  f"{r['rounds']} rounds; ratio of medians {r['ratio_of_medians']:.3f}); in CPU time "
                  f"{c['median_round_ratio']:.3f} (95% {c['median_round_ratio_ci95'][0]:.3f}-"
                  f"{c['median_round_ratio_ci95'][1]:.3f}); load {_load(load_before)} -> {_load(load_after)}; "
                  f"target >= 0.95")


def _load(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=_sizes, default=[128], help="hidden size, or several: 8,16,32")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--parts", type=_parts, default=list(PARTS),
                   help=f"what to measure, comma-separated from {','.join(PARTS)} (default all)")
    p.add_argument("--rounds", type=int, default=15, help="timed calls of each engine/hand loop")
    p.add_argument("--cell-rounds", type=int, default=5, help="timed calls of each fused/cell run")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd cell")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"provenance": provenance("cpu"), "args": {k: str(v) for k, v in vars(args).items()},
                               "tokens_per_sequence": args.batch * args.seq_len}
    for hidden in args.hidden:
        base = PerfConfig(task="copy", model="lstm", seq_len=args.seq_len, batch_size=args.batch,
                          hidden_size=hidden, threads=args.threads, optimizer="adam", lr=1e-3)
        overhead(base, args, results)
        if "cell" in args.parts:
            fused_vs_cell(base, args, results)
    if args.out:
        write_json_atomic(args.out, results)
    return 0


PARTS = ("chunked", "full", "cell")


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas (8,16,32), got {text!r}")
    return sizes


def _parts(text: str) -> list[str]:
    parts = text.split(",")
    unknown = [v for v in parts if v not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part {unknown[0]!r}; expected some of {','.join(PARTS)}")
    return parts


def fused_vs_cell(base: PerfConfig, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Fused path against the per-step cell (and the compiled cell with ``--compile``)."""
    tokens = args.batch * args.seq_len
    paths = {"fused": dataclasses.replace(base, method=f"chunked:k={args.k}"),
             "cell": dataclasses.replace(base, method=f"chunked:k={args.k}", path="cell")}
    if args.compile:
        paths["cell+compile"] = dataclasses.replace(base, method=f"chunked:k={args.k}", path="cell", compile=True)
    runners = {}
    for name, cfg in paths.items():
        w, runners[name] = engine_runner(cfg)
        if cfg.compile:
            results[_key("compile_s", base, args)] = w.compile()
    times = interleaved_times(runners, args.cell_rounds, warmup=1)
    for name in paths:
        if name == "fused":
            continue
        r = compare(times, "fused", name)
        r.update({f"{side}_tokens_per_s": tokens / statistics.median(times[side]) for side in ("fused", name)})
        results[_key(f"fused_vs_{name}", base, args)] = r
        print(f"fused vs {name}: fused {r['fused_tokens_per_s']:,.0f} tok/s, {name} {r[name + '_tokens_per_s']:,.0f}"
              f" tok/s; fused/{name} {r['ratio_of_medians']:.2f}x (per-round median {r['median_round_ratio']:.2f}x);"
              f" target >= 3")
    if args.compile:
        print(f"compile time of the cell step (first forward+backward): {results[_key('compile_s', base, args)]:.1f} s")


def _key(name: str, base: PerfConfig, args: argparse.Namespace) -> str:
    """A result's name, with the hidden size appended when several sizes are measured."""
    return name if len(args.hidden) == 1 else f"{name}_h{base.hidden_size}"


if __name__ == "__main__":
    sys.exit(main())
