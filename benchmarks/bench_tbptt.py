"""tbptt(k1=16, k2=64): the engine against hand-written alternatives, timed in one process.

    python benchmarks/bench_tbptt.py --threads 1 --out tbptt.json

Two settings, each with every implementation interleaved (A B C …, then … C B A):

* ``estimate`` — θ fixed, update gradients summed over the sequence (the estimate ĝ of bias analysis;
  the engine runs without an update callback, so it may reuse the graphs of overlapping windows);
  every implementation computes the same gradient here (tests/test_fast_paths.py checks it in float64);
* ``train`` — an Adam step after every update. Only ``recompute`` computes the engine's gradients
  here; the others use states or Jacobians from older θ, so their numbers are shown for scale.

Implementations (benchmarks/baselines.py): ``recompute`` (window recomputed from the state at u - k2,
k2/k1 fused calls), ``one_call`` (one fused call per window), ``keep_graphs`` (each segment forwarded
once, last k2/k1 graphs kept and chained by hand), ``per_step`` (per-step states and k2 chained
backward calls, the common recipe; slow, fewer rounds). Defaults: copy, LSTM, hidden 128, batch 32,
T = 1024.
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

HAND = {
    "recompute": baselines.tbptt_recompute,
    "one_call": baselines.tbptt_one_call,
    "keep_graphs": baselines.tbptt_keep_graphs,
    "per_step": baselines.tbptt_per_step,
}


def runners(cfg: PerfConfig, k1: int, k2: int, train: bool, names: list[str]) -> dict[str, Callable[[], None]]:
    """The engine (through the harness's Workload) and each hand-written loop, each on its own model."""
    w = Workload(dataclasses.replace(cfg, optimizer="adam" if train else "none"), torch.device("cpu"), torch.float32)
    out: dict[str, Callable[[], None]] = {"engine": lambda: w.sequence(w.prepare())}
    for name in names:
        model = make_model(cfg.model, w.task, cfg.hidden_size, seed=cfg.seed)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

        def step(model=model, opt=opt) -> None:  # type: ignore[no-untyped-def]
            if train:  # otherwise the update gradients add up to ĝ, as in the engine
                opt.step()
                model.zero_grad(set_to_none=True)

        out[name] = (lambda f=HAND[name], m=model, s=step: f(m, w.batch, k1, k2, s))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--k1", type=int, default=16)
    p.add_argument("--k2", type=int, default=64)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--per-step-rounds", type=int, default=3, help="0 leaves the slow per-step recipe out")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PerfConfig(task="copy", model="lstm", method=f"tbptt:k1={args.k1},k2={args.k2}", seq_len=args.seq_len,
                     batch_size=args.batch, hidden_size=args.hidden, threads=args.threads, lr=1e-3)
    tokens = args.batch * args.seq_len
    results: dict[str, Any] = {"provenance": provenance("cpu"), "config": dataclasses.asdict(cfg)}
    for setting in ("estimate", "train"):
        fns = runners(cfg, args.k1, args.k2, setting == "train", ["recompute", "one_call", "keep_graphs"])
        times = interleaved_times(fns, args.rounds, warmup=1)
        if args.per_step_rounds:
            slow = runners(cfg, args.k1, args.k2, setting == "train", ["per_step"])
            slow_times = interleaved_times({"engine": slow["engine"], "per_step": slow["per_step"]},
                                           args.per_step_rounds, warmup=1)
            times["per_step"] = slow_times["per_step"]
            times["engine (beside per_step)"] = slow_times["engine"]
        med = {k: statistics.median(v) for k, v in times.items()}
        rows = {k: {"tokens_per_s": tokens / m, "seconds_per_sequence": m} for k, m in med.items()}
        for k in ("recompute", "one_call", "keep_graphs"):
            rows[k]["engine_speedup"] = med[k] / med["engine"]
        for k in ("recompute", "one_call", "keep_graphs"):
            per_round = sorted(b / a for a, b in zip(times["engine"], times[k]))
            rows[k]["engine_speedup_median_round"] = per_round[len(per_round) // 2]
        if "per_step" in rows:
            rows["per_step"]["engine_speedup"] = med["per_step"] / med["engine (beside per_step)"]
        results[setting] = rows
        print(f"{setting}: tbptt:k1={args.k1},k2={args.k2}, T={args.seq_len}, B={args.batch}, H={args.hidden}")
        for k, r in rows.items():
            extra = f"  engine is {r['engine_speedup']:.2f}x as fast" if not k.startswith("engine") else ""
            print(f"  {k:<24} {r['tokens_per_s']:>10,.0f} tok/s  {1000 * r['seconds_per_sequence']:>9.1f} ms/seq{extra}")
    if args.out:
        write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
