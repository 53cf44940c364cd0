"""Engine overhead and fused-vs-cell speed, each as a ratio measured in one process (issue 5 targets).

    python benchmarks/bench_overhead.py --threads 1 --out overhead.json

1. **Overhead**: the project's chunked TBPTT (``chunked:k=K``) and full BPTT, timed as the harness
   times them (:class:`tbptt_bench.perf.harness.Workload`: the engine, an optimiser step after each update),
   against the hand-written loops of ``benchmarks/baselines.py`` (fused ``nn.LSTM`` per chunk, detach at
   chunk edges, the same loss and the same Adam; for full BPTT both the minimal one-call loop and a
   chain of 64-step calls, which is what the engine does on the CPU). Target: engine throughput
   ≥ 0.95 × hand-written.
2. **Fused vs cell**: the same workload on the fused path and on the per-step cell path (and with
   ``--compile``, the compiled cell). Target: fused ≥ 3 × cell on the CPU.

Calls are interleaved (A B, B A, …) so that drift on a shared machine hits both alike; the ratio is
reported as the ratio of median throughputs and, beside it, the median of per-round ratios.
Defaults: copy task, LSTM, hidden 128, batch 32, T = 1024, K = 64.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

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


def compare(times: dict[str, list[float]], a: str, b: str) -> dict[str, Any]:
    """Throughput of ``a`` over ``b``: ratio of medians and median of per-round ratios (with p10, p90)."""
    per_round = sorted(tb / ta for ta, tb in zip(times[a], times[b]))
    n = len(per_round)
    return {
        "ratio_of_medians": statistics.median(times[b]) / statistics.median(times[a]),
        "median_round_ratio": statistics.median(per_round),
        "round_ratio_p10": per_round[int(0.1 * (n - 1))], "round_ratio_p90": per_round[int(0.9 * (n - 1))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15, help="timed calls of each engine/hand loop")
    p.add_argument("--cell-rounds", type=int, default=5, help="timed calls of each fused/cell run")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd cell")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokens = args.batch * args.seq_len
    base = PerfConfig(task="copy", model="lstm", seq_len=args.seq_len, batch_size=args.batch,
                      hidden_size=args.hidden, threads=args.threads, optimizer="adam", lr=1e-3)
    results: dict[str, Any] = {"provenance": provenance("cpu"), "args": {k: str(v) for k, v in vars(args).items()},
                               "tokens_per_sequence": tokens}

    for name, method, hand in [("chunked", f"chunked:k={args.k}", {"hand": args.k}),
                               ("full", "full", {"hand": args.seq_len, "hand_64_step_calls": 64})]:
        cfg = dataclasses.replace(base, method=method)
        w, engine = engine_runner(cfg)
        fns = {"engine": engine, **{label: hand_runner(cfg, w, k) for label, k in hand.items()}}
        times = interleaved_times(fns, args.rounds, warmup=2)
        for label in hand:
            r = compare(times, "engine", label)
            r.update({f"{side}_tokens_per_s": tokens / statistics.median(times[side]) for side in ("engine", label)})
            results[f"overhead_{name}_vs_{label}"] = r
            print(f"overhead {method:>14} vs {label:<18}: engine {r['engine_tokens_per_s']:>9,.0f} tok/s, "
                  f"hand {r[label + '_tokens_per_s']:>9,.0f} tok/s; engine/hand {r['ratio_of_medians']:.3f} "
                  f"(per-round median {r['median_round_ratio']:.3f}, p10-p90 {r['round_ratio_p10']:.3f}-"
                  f"{r['round_ratio_p90']:.3f}); target >= 0.95")

    paths = {"fused": dataclasses.replace(base, method=f"chunked:k={args.k}"),
             "cell": dataclasses.replace(base, method=f"chunked:k={args.k}", path="cell")}
    if args.compile:
        paths["cell+compile"] = dataclasses.replace(base, method=f"chunked:k={args.k}", path="cell", compile=True)
    runners = {}
    for name, cfg in paths.items():
        w, runners[name] = engine_runner(cfg)
        if cfg.compile:
            results["compile_s"] = w.compile()
    times = interleaved_times(runners, args.cell_rounds, warmup=1)
    for name in paths:
        if name == "fused":
            continue
        r = compare(times, "fused", name)
        r.update({f"{side}_tokens_per_s": tokens / statistics.median(times[side]) for side in ("fused", name)})
        results[f"fused_vs_{name}"] = r
        print(f"fused vs {name}: fused {r['fused_tokens_per_s']:,.0f} tok/s, {name} {r[name + '_tokens_per_s']:,.0f}"
              f" tok/s; fused/{name} {r['ratio_of_medians']:.2f}x (per-round median {r['median_round_ratio']:.2f}x);"
              f" target >= 3")
    if "compile_s" in results:
        print(f"compile time of the cell step (first forward+backward): {results['compile_s']:.1f} s")
    if args.out:
        write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
