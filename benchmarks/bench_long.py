"""Bias against K at long horizons (char-lm, T up to 65,536) and the effective context over training.

    python benchmarks/bench_long.py --threads 1 --out long.json                      # T = 65,536, K = 1..4096
    python benchmarks/bench_long.py --threads 1 --train-steps 300 --eval-every 100 \\
        --seq-len 8192 --figure effective_context.png --out context.json          # K_1% / K_5% over training

One process, one configuration (run it fresh for a memory figure). LSTM (hidden 128 by default), B = 8
parallel char-lm streams of the bundled Tiny Shakespeare corpus (``train`` split, read one slice at a
time), float32. For every dyadic K the relative error ‖ĝ_K − g‖/‖g‖ and cosine of chunked(K) against
the true gradient g (``full:checkpoint=C``) on that one batch of streams, from
:func:`tbptt_bench.analysis.kcurve.streamed_chunked_curve`; its wall time; and the peak resident
memory of the measurement (Linux ``VmHWM`` reset after model and data exist, minus the resident set
then; ``tbptt_bench.perf.harness``). With ``--train-steps`` the model is first trained with the
project's ``train`` (chunked:k=``--train-k``), and the curve is measured at update 0 and every
``--eval-every`` updates: the *effective context* is the smallest K whose relative error is ≤ 1% / 5%.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tbptt_bench.analysis.gradients import compare_vectors, flatten
from tbptt_bench.analysis.kcurve import effective_context, streamed_chunked_curve
from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.perf.harness import current_rss_bytes, peak_rss_bytes, reset_peak_rss, write_json_atomic
from tbptt_bench.provenance import provenance
from tbptt_bench.training.loop import TrainConfig, train

LEVELS = (0.01, 0.05)


def curve(model: torch.nn.Module, task: Any, seq_len: int, batch: int, kmax: int, split: str) -> dict[str, Any]:
    """The chunked K curve against g on the first ``seq_len`` steps of the split's streams."""
    stream = task.stream(batch, split)
    if stream.length < seq_len:
        raise SystemExit(f"the {split} split gives {stream.length} steps per stream at batch {batch}; "
                         f"ask for --seq-len ≤ {stream.length}")
    source = stream.slice(0, seq_len)
    ks = [2**i for i in range(int(math.log2(min(kmax, seq_len))) + 1)]
    base = current_rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    out = streamed_chunked_curve(model, source, task.loss_kind, ks)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    assert out.truth is not None
    g = flatten(out.truth)
    rows = {}
    for k, est in out.gradients.items():
        c = compare_vectors(flatten(est), g)
        rows[k] = {"relative_error": c.relative_error, "cosine": c.cosine}
    rel = {k: r["relative_error"] for k, r in rows.items()}
    return {"seq_len": seq_len, "batch": batch, "span": out.span, "checkpoint": out.checkpoint, "seconds": seconds,
            "peak_extra_mib": (peak - base) / 2**20 if base is not None else None,
            "curve": rows, **{f"k_{round(100 * lv)}pct": effective_context(rel, lv) for lv in LEVELS}}


def show(result: dict[str, Any], title: str) -> None:
    print(f"\n{title}: T={result['seq_len']}, batch {result['batch']}, span {result['span']}, "
          f"checkpoint {result['checkpoint']}: {result['seconds']:.1f} s, peak +{result['peak_extra_mib']:.1f} MiB")
    for k, r in result["curve"].items():
        print(f"  K={k:>6}  relative error {r['relative_error']:.3e}  cosine {r['cosine']:.6f}")
    print(f"  effective context: K(1%) = {result['k_1pct']}, K(5%) = {result['k_5pct']}", flush=True)


def figure(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for lv in LEVELS:
        key = f"k_{round(100 * lv)}pct"
        xs = [p["update"] for p in points if p[key] is not None]
        ax.plot(xs, [p[key] for p in points if p[key] is not None], marker="o", label=f"relative error ≤ {lv:.0%}")
    ax.set_yscale("log", base=2)
    ax.set_xlabel("training update (chunked K for training)")
    ax.set_ylabel("smallest chunked K")
    ax.set_title(f"effective context, char-lm, T = {points[0]['seq_len']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kmax", type=int, default=4096)
    p.add_argument("--split", default="train")
    p.add_argument("--train-steps", type=int, default=0, help="train first, measuring every --eval-every updates")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--train-k", type=int, default=32)
    p.add_argument("--train-seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    task = make_task("char-lm")
    results: dict[str, Any] = {"provenance": provenance("cpu"), "threads": args.threads}
    if args.train_steps <= 0:
        model = make_model("lstm", task, args.hidden, seed=0)
        results["long"] = curve(model, task, args.seq_len, args.batch, args.kmax, args.split)
        show(results["long"], "chunked K curve at initial θ")
    else:
        points: list[dict[str, Any]] = []

        def on_eval(update: int, model: torch.nn.Module) -> dict[str, Any]:
            r = curve(copy.deepcopy(model), task, args.seq_len, args.batch, args.kmax, args.split)
            r["update"] = update
            points.append(r)
            show(r, f"update {update}")
            return {}

        cfg = TrainConfig(task="char-lm", model="lstm", method=f"chunked:k={args.train_k}", steps=args.train_steps,
                          seq_len=args.train_seq_len, batch_size=args.batch, hidden_size=args.hidden, lr=args.lr,
                          eval_every=args.eval_every, eval_batches=2)
        res = train(cfg, on_eval=on_eval)
        results["training"] = {"config": cfg.__dict__, "curve": res.curve, "snapshots": points}
        if args.figure:
            figure(points, args.figure)
    if args.out:
        write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
