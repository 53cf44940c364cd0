"""Whole K curves: the nested ladder against one full forward+backward, the naive per-K approach and
per-loss backprop; peak memory of the true gradient, exact against checkpointed.

    python benchmarks/bench_kcurve.py --threads 1 --rounds 7 --out kcurve.json     # timings
    python benchmarks/bench_kcurve.py --threads 1 --memory-only --memory-seq-len 8192   # peak memory

Sections (each variant timed in turn, A B C … then … C B A, medians over rounds, one process):

* ``large`` — copy data, LSTM hidden 64, batch 16, T = 1024, float32: ``full`` (one full forward +
  backward through the engine), ``kcurve`` (chunked K = 1, 2, …, 128 through
  :mod:`tbptt_bench.analysis.kcurve`), ``naive`` (one engine run per K), both with and without the true
  gradient; and the TBPTT grid ``tbptt:k1=K,k2=2K-1`` the same way;
* ``small`` — T = 128, hidden 16, batch 4, K = 1, …, 32: the same plus ``per_loss`` (every loss
  backpropagated on its own through its window, from stored states) and the sliding curve from one
  lag decomposition against one engine run per K;
* ``floor`` (``--floor``) — what the fused kernel costs per step-row in the layouts a ladder can use:
  a chain of leaf-started segments of L steps over blocks of W steps stacked along the batch
  (T·B/W rows), on the model's input fold, timed as a forward pass with graph and as one backward
  pass with an adjoint injected at every segment end; against the engine's full forward + backward
  in the same process. With the cheapest layout's costs, ``rows`` backward step-rows and one forward
  cost ``(forward + rows · backward) / full`` — the estimate of the lowest ratio any ladder that
  uses this kernel can reach (docs/bias.md derives the rows; it is an estimate, not a bound: other
  shapes may be cheaper still);
* ``memory`` — peak resident memory (``ru_maxrss``) of a fresh process per configuration at
  T = 8192: exact full BPTT, ``full:checkpoint=C`` (C ≈ √T), forward-mode probes, and a baseline
  process that imports everything and builds the same model and data but computes nothing.

Every timed variant's gradients are checked against the engine's before timing (float32 tolerance).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from tbptt_bench.analysis.gradients import Gradient, method_gradient, true_gradient
from tbptt_bench.analysis.kcurve import kcurve_gradients
from tbptt_bench.core.lags import lag_decomposition
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.protocol import input_fold, map_state
from tbptt_bench.core.mask import update_owner
from tbptt_bench.perf.harness import interleaved_times
from tbptt_bench.perf.tables import write_json_atomic
from tbptt_bench.provenance import provenance
from tbptt_bench.seeding import derive_seed, generator
from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.tasks.base import Batch
from tbptt_bench.core.trajectory import blocked, core_fn, dense_states, leaf, parts, readout_fn, rows
from tbptt_bench.core.engine import step_loss_sum

LOSS = "cross_entropy"


def setup(seq_len: int, hidden: int, batch: int, seed: int = 0) -> tuple[torch.nn.Module, Batch]:
    task = make_task("copy")
    model = make_model("lstm", task, hidden, seed=seed)
    data = task.sample(batch, seq_len, generator(derive_seed("bench-kcurve", seed)))
    return model, data


def per_loss_gradient(model: torch.nn.Module, data: Batch, spec: str) -> Gradient:
    """Every loss backpropagated alone through the steps its mask row keeps, from the stored state."""
    method = parse_method(spec)
    T, B = data.length, data.batch_size
    updates = method.updates(T)
    owner = update_owner(updates, T)
    dense = dense_states(model, data, model.initial_state(B))
    core, readout = core_fn(model), readout_fn(model)
    names = [n for n, p in model.named_parameters()]
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    for t in range(T):
        start = updates[owner[t]].start_for(t)
        state = map_state(lambda s: s.detach(), rows(dense, start * B, (start + 1) * B))
        features, _ = core(data.inputs[:, start : t + 1], state)
        loss = step_loss_sum(readout(features[:, -1:]), data.slice(t, t + 1), LOSS, B)
        for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                acc += g
    return dict(zip(names, total))


def max_diff(a: Gradient, b: Gradient) -> float:
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in b)


def check(name: str, got: dict[str, Gradient], model: torch.nn.Module, data: Batch) -> float:
    worst = 0.0
    for spec, g in got.items():
        worst = max(worst, max_diff(g, method_gradient(model, data, spec, LOSS)))
    print(f"  check {name}: max relative difference to the engine {worst:.2e}", flush=True)
    if worst > 1e-3:
        raise SystemExit(f"{name} disagrees with the engine ({worst:.2e}); not timing it")
    return worst


def summarise(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    ref = statistics.median(times[base])
    out = {}
    for name, values in times.items():
        med = statistics.median(values)
        q = statistics.quantiles(values, n=4) if len(values) >= 2 else [med, med, med]
        out[name] = {"median_ms": med * 1e3, "q1_ms": q[0] * 1e3, "q3_ms": q[2] * 1e3, "ratio_to_" + base: med / ref}
    return out


def show(title: str, summary: dict[str, dict[str, float]], base: str) -> None:
    print(f"\n{title}")
    print(f"  {'variant':<26} {'median ms':>10} {'IQR ms':>19} {'x ' + base:>9}")
    for name, s in summary.items():
        iqr = f"[{s['q1_ms']:.1f}, {s['q3_ms']:.1f}]"
        print(f"  {name:<26} {s['median_ms']:>10.1f} {iqr:>19} {s['ratio_to_' + base]:>9.2f}")


def grid_section(model: torch.nn.Module, data: Batch, specs: list[str], rounds: int, per_loss: bool,
                 sliding: list[str] | None, naive: bool = True) -> dict[str, Any]:
    fns: dict[str, Callable[[], Any]] = {
        "full": lambda: true_gradient(model, data, LOSS),
        "kcurve": lambda: kcurve_gradients(model, data, LOSS, specs),
        "kcurve+truth": lambda: (kcurve_gradients(model, data, LOSS, specs), true_gradient(model, data, LOSS)),
        "naive": lambda: [method_gradient(model, data, s, LOSS) for s in specs],
        "naive+truth": lambda: ([method_gradient(model, data, s, LOSS) for s in specs],
                                true_gradient(model, data, LOSS)),
    }
    if not naive:
        fns = {k: v for k, v in fns.items() if not k.startswith("naive")}
    check("kcurve", {m.spec: g for m, g in kcurve_gradients(model, data, LOSS, specs).items()}, model, data)
    if per_loss:
        check("per_loss", {specs[1]: per_loss_gradient(model, data, specs[1])}, model, data)
        fns["per_loss"] = lambda: [per_loss_gradient(model, data, s) for s in specs]
    if sliding:
        top = max(parse_method(s).params["k"] for s in sliding)
        dec = lag_decomposition(model, data, LOSS, top, profile=False)
        one_update = {s: f"{s},k1={data.length}" for s in sliding}  # same estimate, one update
        check("lag decomposition", {one_update[s]: dec.sliding(parse_method(s).params["k"]) for s in sliding},
              model, data)
        fns["sliding: lag decomposition"] = lambda: lag_decomposition(model, data, LOSS, top, profile=False)
        fns["sliding: naive"] = lambda: [method_gradient(model, data, one_update[s], LOSS) for s in sliding]
    times = interleaved_times(fns, rounds, warmup=1)
    return summarise(times, "full")


#: (W, L) layouts of the floor section: W-step blocks stacked along the batch, L-step segments.
FLOOR_LAYOUTS = [(8, 1), (8, 8), (16, 1), (16, 16), (32, 8), (32, 32), (64, 16), (64, 64), (128, 8), (128, 32)]
#: Backward step-rows (in units of T·B) an exact ladder needs for 8 dyadic K: base 1, 7 rungs of 1/2;
#: tbptt(K, 2K−1) adds 1/2 for each of K = 2…64 and 1 for K = 128 (docs/bias.md).
FLOOR_ROWS = {"chunked": 1 + 7 * 0.5, "tbptt": 1 + 7 * 0.5 + 6 * 0.5 + 1}


def floor_section(model: torch.nn.Module, data: Batch, rounds: int) -> dict[str, Any]:
    """Per-step-row costs of the fused kernel by layout, and the ratios they imply (see the module doc)."""
    fold = input_fold(model)
    target = fold.model if fold is not None else model
    core = core_fn(target)
    params = [p for p in target.parameters() if p.requires_grad]
    T, B = data.length, data.batch_size
    rows = T * B
    layouts = [(W, L) for W, L in FLOOR_LAYOUTS if T % W == 0]
    graphs: dict[tuple[int, int], Any] = {}

    def build(W: int, L: int) -> Any:
        x = blocked(data.inputs, W, T // W)
        h = target.initial_state(x.shape[0])
        leaves, outs = [], []
        for a in range(0, W, L):
            start = leaf(h)
            _, h = core(x[:, a : a + L], start)
            leaves.append(start)
            outs.append(h)
        graphs[(W, L)] = (leaves, outs)

    def push(W: int, L: int) -> Any:
        leaves, outs = graphs[(W, L)]
        out = [t for s in outs for t in parts(s)]
        ins = [t for s in leaves for t in parts(s)]
        return torch.autograd.grad(out, [*params, *ins], [torch.ones_like(t) for t in out], retain_graph=True,
                                   allow_unused=True)

    def no_graph() -> Any:
        W = max(W for W, _ in layouts)
        x = blocked(data.inputs, W, T // W)
        with torch.no_grad():
            return core(x, target.initial_state(x.shape[0]))

    fns: dict[str, Callable[[], Any]] = {"full": lambda: true_gradient(model, data, LOSS), "no graph": no_graph}
    for W, L in layouts:
        fns[f"forward W={W} L={L}"] = lambda W=W, L=L: build(W, L)
        fns[f"backward W={W} L={L}"] = lambda W=W, L=L: push(W, L)
    for W, L in layouts:
        build(W, L)
    times = interleaved_times(fns, rounds, warmup=1)
    ns = {name: statistics.median(v) / rows * 1e9 for name, v in times.items()}
    fwd = min(v for k, v in ns.items() if k.startswith("forward"))
    bwd = min(v for k, v in ns.items() if k.startswith("backward"))
    out: dict[str, Any] = {"ns_per_step_row": ns, "cheapest_forward_ns": fwd, "cheapest_backward_ns": bwd,
                           "folded": fold is not None,
                           "floor": {g: (fwd + r * bwd) / ns["full"] for g, r in FLOOR_ROWS.items()}}
    print(f"\nper step-row, T={T}, batch {B}{' (input fold)' if fold is not None else ''}: full (engine) "
          f"{ns['full']:.0f} ns; forward without graph (largest W, one call) {ns['no graph']:.0f} ns")
    print(f"  {'layout':<14} {'rows/call':>9} {'forward ns':>11} {'backward ns':>12}")
    for W, L in layouts:
        print(f"  W={W:<4} L={L:<5} {T // W * B:>9} {ns[f'forward W={W} L={L}']:>11.0f} {ns[f'backward W={W} L={L}']:>12.0f}")
    for g, r in FLOOR_ROWS.items():
        print(f"  {g}: one forward + {r:g}·T·B backward rows at the cheapest layouts = {out['floor'][g]:.2f} × full")
    return out


def memory_child(kind: str, seq_len: int, hidden: int, batch: int, checkpoint: int) -> dict[str, Any]:
    """Runs in a fresh process: one configuration, then its peak resident memory."""
    model, data = setup(seq_len, hidden, batch)
    t0 = time.perf_counter()
    if kind == "baseline":
        pass
    elif kind == "exact":
        true_gradient(model, data, LOSS)
    elif kind == "checkpoint":
        true_gradient(model, data, LOSS, checkpoint=checkpoint)
    elif kind == "probes":
        from tbptt_bench.analysis.truegrad import directional_derivatives, probe_directions

        directional_derivatives(model, data, LOSS, probe_directions(model, 2, 0), chunk=checkpoint)
    else:
        raise SystemExit(f"unknown memory configuration {kind!r}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"kind": kind, "seconds": time.perf_counter() - t0, "peak_mib": peak * scale / 2**20}


def memory_section(seq_len: int, hidden: int, batch: int, threads: int) -> dict[str, Any]:
    checkpoint = max(1, round(math.sqrt(seq_len)))
    out: dict[str, Any] = {"seq_len": seq_len, "checkpoint": checkpoint}
    for kind in ("baseline", "exact", "checkpoint", "probes"):
        cmd = [sys.executable, __file__, "--memory-child", kind, "--memory-seq-len", str(seq_len),
               "--hidden", str(hidden), "--batch", str(batch), "--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"memory child {kind!r} failed:\n{res.stderr[-2000:]}")
        out[kind] = json.loads(res.stdout.strip().splitlines()[-1])
    base = out["baseline"]["peak_mib"]
    print(f"\npeak memory, T={seq_len}, LSTM hidden {hidden}, batch {batch} (fresh process each, ru_maxrss):")
    for kind in ("baseline", "exact", "checkpoint", "probes"):
        r = out[kind]
        extra = "" if kind == "baseline" else f"  (+{r['peak_mib'] - base:.1f} MiB over baseline)"
        label = f"checkpoint C={checkpoint}" if kind == "checkpoint" else ("probes (2, forward mode)" if kind == "probes" else kind)
        print(f"  {label:<26} {r['peak_mib']:>9.1f} MiB {r['seconds']:>7.2f} s{extra}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (recorded)")
    p.add_argument("--rounds", type=int, default=7, help="timed calls per variant (after one warm-up)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--kmax", type=int, default=128, help="largest K of the grid 1, 2, 4, …, kmax")
    p.add_argument("--grids", default="chunked,tbptt", help="grids of the large section: chunked, tbptt")
    p.add_argument("--no-naive", action="store_true", help="leave out the one-engine-run-per-K variants (slow at long T)")
    p.add_argument("--skip-large", action="store_true", help="only the small section (and memory)")
    p.add_argument("--skip-small", action="store_true", help="no small section")
    p.add_argument("--floor", action="store_true", help="only the per-step-row kernel costs by layout (floor section)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory (fresh processes)")
    p.add_argument("--memory-seq-len", type=int, default=8192)
    p.add_argument("--memory-only", action="store_true", help="only the memory section")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help="write all numbers as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.memory_seq_len, args.hidden, args.batch,
                                      max(1, round(math.sqrt(args.memory_seq_len))))))
        return 0
    results: dict[str, Any] = {"provenance": provenance("cpu"), "threads": args.threads, "rounds": args.rounds}
    ks = [2**i for i in range(int(math.log2(args.kmax)) + 1)]
    if args.memory_only:
        results["memory"] = memory_section(args.memory_seq_len, args.hidden, args.batch, args.threads)
        if args.out:
            write_json_atomic(args.out, results)
        return 0
    if args.floor:
        model, data = setup(args.seq_len, args.hidden, args.batch)
        results["floor"] = floor_section(model, data, args.rounds)
        if args.out:
            write_json_atomic(args.out, results)
        return 0
    if not args.skip_large:
        model, data = setup(args.seq_len, args.hidden, args.batch)
        label = f"T={args.seq_len}, LSTM hidden {args.hidden}, batch {args.batch}"
        grids = {"chunked": [f"chunked:k={k}" for k in ks], "tbptt": [f"tbptt:k1={k},k2={2 * k - 1}" for k in ks]}
        for name in args.grids.split(","):
            if name not in grids:
                raise SystemExit(f"unknown grid {name!r}; accepted: {', '.join(grids)}")
            specs = grids[name]
            print(f"\n[{name} K = {ks[0]}..{ks[-1]} ({len(ks)} points), {label}]", flush=True)
            summary = grid_section(model, data, specs, args.rounds, per_loss=False, sliding=None,
                                   naive=not args.no_naive)
            show(f"{name} curve, {label}", summary, "full")
            results[f"large_{name}"] = summary
    small_ks = [1, 2, 4, 8, 16, 32]
    if args.skip_small:
        if args.out:
            write_json_atomic(args.out, results)
        return 0
    model, data = setup(128, 16, 4)
    print("\n[small: chunked K = 1..32, T=128, LSTM hidden 16, batch 4]", flush=True)
    summary = grid_section(model, data, [f"chunked:k={k}" for k in small_ks], max(3, args.rounds // 2),
                           per_loss=True, sliding=[f"sliding:k={k}" for k in small_ks])
    show("small: chunked and sliding curves, T=128, hidden 16, batch 4", summary, "full")
    results["small"] = summary
    if args.memory:
        results["memory"] = memory_section(args.memory_seq_len, args.hidden, args.batch, args.threads)
    if args.out:
        write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
