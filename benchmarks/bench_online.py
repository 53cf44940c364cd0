"""Cost per step of the online estimators against hidden size, with fitted exponents (docs/online.md).

    python benchmarks/bench_online.py --threads 1 --hidden 16,32,64,128 --steps 12

For a tanh RNN with real inputs (4 channels), batch B, each estimator (rtrl, snap:n=1, rflo, uoro)
is stepped over a sequence at fixed θ and its time per step is the median over repeats after a
warm-up; full BPTT's time per step is the engine's ``full`` over the same sequence divided by its
length (forward and backward, fused kernels). Memory is the size of what the method carries from one
step to the next, read off the estimator's tensors after the run (the influence matrix; UORO's two
vectors per row), and for BPTT the stored activations (a state per step, ``T·B·H``). Exponents are the
least-squares slopes of log cost on log hidden over the largest three sizes, beside the theoretical ones
(RTRL: time n⁴, memory n³; UORO: time n², memory n²; BPTT per step: time n², memory n per step).
The snap and rflo numbers are those of this dense implementation (masking a dense matrix), not of a
sparse one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from tbptt_bench.analysis.gradients import method_gradient
from tbptt_bench.core.forward_mode import Influence, RankOne, run_forward_mode
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.tasks.base import Batch

THEORY = {"rtrl": (4, 3), "snap:n=1": (4, 3), "rflo": (3, 3), "uoro": (2, 2), "full": (2, 1)}


def setup(hidden: int, batch: int, steps: int, dtype: torch.dtype) -> tuple[RecurrentNet, Batch]:
    torch.manual_seed(0)
    model = RecurrentNet("rnn", "real", 4, 4, hidden, 1).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, steps, 4, generator=g).to(dtype)
    y = torch.randn(batch, steps, 4, generator=g).to(dtype)
    return model, Batch(x, y, torch.ones(batch, steps, dtype=dtype))


def carried_bytes(est: object) -> int:
    if isinstance(est, Influence):
        assert est.M is not None
        return est.M.numel() * est.M.element_size()
    assert isinstance(est, RankOne) and est.h is not None and est.th is not None
    return (est.h.numel() + est.th.numel()) * est.h.element_size()


def measure(spec: str, hidden: int, batch: int, steps: int, repeats: int, dtype: torch.dtype) -> tuple[float, int]:
    """Median seconds per step and bytes carried between steps."""
    model, data = setup(hidden, batch, steps, dtype)
    times: list[float] = []
    mem = 0
    for r in range(repeats + 1):
        if spec == "full":
            t0 = time.perf_counter()
            method_gradient(model, data, "full", "mse")
            elapsed = time.perf_counter() - t0
            mem = steps * batch * hidden * torch.finfo(dtype).bits // 8
        else:
            held: list[object] = []
            method = parse_method(spec)

            def make(cell, b):  # type: ignore[no-untyped-def]
                held.append(method.estimator(cell, b))
                return held[-1]

            t0 = time.perf_counter()
            run_forward_mode(model, data, "mse", model.initial_state(batch), make)
            elapsed = time.perf_counter() - t0
            mem = carried_bytes(held[0])
        if r > 0:  # the first run warms up
            times.append(elapsed / steps)
    return statistics.median(times), mem


def slope(hs: list[int], values: list[float]) -> float:
    return float(np.polyfit(np.log(hs[-3:]), np.log(values[-3:]), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="16,32,64,128")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="full,uoro,rflo,snap:n=1,rtrl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hs = [int(h) for h in args.hidden.split(",")]
    specs = args.methods.split(",")
    print(f"tanh RNN, real inputs, batch {args.batch}, {args.steps} steps, float32, {args.threads} thread(s)")
    print(f"{'method':<10}" + "".join(f"{'H=' + str(h):>20}" for h in hs) + "   time exp (theory)   memory exp (theory)")
    for spec in specs:
        rows = [measure(spec, h, args.batch, args.steps, args.repeats, torch.float32) for h in hs]
        secs, mems = [r[0] for r in rows], [float(r[1]) for r in rows]
        cells = "".join(f"{s * 1e3:>9.3f} ms {m / 2**20:>6.2f} MiB" for s, m in zip(secs, mems))
        tt, tm = THEORY[spec]
        print(f"{spec:<10}{cells}   {slope(hs, secs):>5.2f} ({tt})         {slope(hs, mems):>5.2f} ({tm})")


if __name__ == "__main__":
    main()
