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
then; ``tbptt_bench.perf.memory``). With ``--train-steps`` the model is first trained with the
project's ``train`` (chunked:k=``--train-k``), and the curve is measured at update 0 and every
``--eval-every`` updates on ``--batches`` held-out segments (:func:`tbptt_bench.training.context.train_context`,
the library function of the suites' ``[[context]]`` cells): the *effective context* is the smallest K whose
relative bias is ≤ 1% / 5% (interval rule, point estimate and per-batch error; docs/bias.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tbptt_bench.analysis.context import LEVELS, dyadic_grid
from tbptt_bench.analysis.gradients import compare_vectors, flatten
from tbptt_bench.analysis.kcurve import effective_context, streamed_chunked_curve
from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.perf.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from tbptt_bench.perf.tables import write_json_atomic
from tbptt_bench.provenance import provenance
from tbptt_bench.training.context import ContextConfig, train_context



def curve(model: torch.nn.Module, task: Any, seq_len: int, batch: int, kmax: int, split: str) -> dict[str, Any]:
    """The chunked K curve against g on the first ``seq_len`` steps of the split's streams."""
    stream = task.stream(batch, split)
    if stream.length < seq_len:
        raise SystemExit(f"the {split} split gives {stream.length} steps per stream at batch {batch}; "
                         f"ask for --seq-len ≤ {stream.length}")
    source = stream.slice(0, seq_len)
    ks = dyadic_grid(min(kmax, seq_len))
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


def figure(levels: list[dict[str, Any]], kmax: int, path: Path) -> None:
    """K(1%) and K(5%) against training tokens, as the report draws them (``figures.seed_lines``)."""
    import pandas as pd

    from tbptt_bench.report import figures

    frame = pd.DataFrame(levels)
    frame = frame.melt(id_vars=["tokens", "level"], value_vars=["k_effective", "k_effective_point"], var_name="rule",
                       value_name="K").assign(seed=0, ceiling=float(kmax))
    frame["K"] = pd.to_numeric(frame["K"], errors="coerce").astype(float)
    frame["level"] = frame["level"].map(lambda v: f"bias ≤ {v:.0%}")
    fig = figures.seed_lines(frame, x="tokens", y="K", hue="level", style="rule", unit="seed", ceiling="ceiling",
                             log_base=2, xlabel="training tokens", ylabel="smallest chunked K",
                             title="effective context over training, char-lm")
    figures.save(fig, path.parent, path.stem, (path.suffix.lstrip("."),))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--kmax", type=int, default=4096)
    p.add_argument("--split", default="train")
    p.add_argument("--batches", type=int, default=4, help="held-out segments per checkpoint (with --train-steps)")
    p.add_argument("--warmup", type=int, default=1024, help="steps run without gradient before each segment")
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
        cfg = ContextConfig(task="char-lm", model="lstm", method=f"chunked:k={args.train_k}", steps=args.train_steps,
                            seq_len=args.train_seq_len, batch_size=args.batch, hidden_size=args.hidden, lr=args.lr,
                            eval_every=args.eval_every, eval_batches=2, curve_seq_len=args.seq_len, kmax=args.kmax,
                            n_batches=args.batches, curve_split=args.split, curve_warmup=args.warmup)
        res = train_context(cfg)
        for row in res.levels:
            print(f"update {row['n_updates']:>5} ({row['tokens']} tokens): K({row['level']:.0%}) = {row['k_effective']} "
                  f"(interval rule), {row['k_effective_point']} (point), {row['k_effective_error']} (per-batch error)")
        results["training"] = {"config": cfg.flat(), "curve": res.training.curve, "context": res.curve,
                               "levels": res.levels}
        if args.figure:
            figure(res.levels, args.kmax, args.figure)
    if args.out:
        write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
