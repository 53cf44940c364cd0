"""Bias against K at long horizons (char-lm, T up to 65,536) and the effective context over training.

    python benchmarks/bench_long.py --threads 1 --float64-spot 64,4096 --out long.json  # T = 65,536, K = 1..4096
    python benchmarks/bench_long.py --threads 1 --train-steps 300 --eval-every 100 \\
        --seq-len 8192 --figure effective_context.png --out context.json          # K_1% / K_5% over training
    python benchmarks/bench_long.py --threads 1 --lag-profile 4096 --positions 64 --train-steps 300 \\
        --figure lag_profile.png --out lags.json          # lag profile to D = 4096 at T = 65,536

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

With ``--lag-profile D`` the lag profile φ̄_d out to lag D instead, from ``--positions`` loss positions
spread over the T steps (:func:`tbptt_bench.analysis.long_lags.long_lag_profile`, each value exact), at
initial θ and, with ``--train-steps``, after that many updates of chunked:k=``--train-k``; in float32 and
again in float64 (a copy of the model) at the same positions, with the lag up to which float32 agrees.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tbptt_bench.analysis.context import LEVELS, dyadic_grid
from tbptt_bench.analysis.gradients import compare_vectors, flatten
from tbptt_bench.analysis.kcurve import effective_context, streamed_chunked_curve
from tbptt_bench.analysis.long_lags import long_lag_profile
from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.perf.memory import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from tbptt_bench.perf.tables import write_json_atomic
from tbptt_bench.provenance import provenance
from tbptt_bench.training.context import ContextConfig, train_context
from tbptt_bench.training.loop import TrainConfig, train



def curve(model: torch.nn.Module, task: Any, seq_len: int, batch: int, kmax: int, split: str,
          spot: list[int] | None = None) -> dict[str, Any]:
    """The chunked K curve against g on the first ``seq_len`` steps of the split's streams; with ``spot``,
    those K and g again in float64 (a copy of the model), compared with the float32 results."""
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
    result = {"seq_len": seq_len, "batch": batch, "span": out.span, "checkpoint": out.checkpoint, "seconds": seconds,
              "peak_extra_mib": (peak - base) / 2**20 if base is not None else None,
              "curve": rows, **{f"k_{round(100 * lv)}pct": effective_context(rel, lv) for lv in LEVELS}}
    if spot:
        t0 = time.perf_counter()
        wide = streamed_chunked_curve(copy.deepcopy(model).double(), source, task.loss_kind, spot)
        assert wide.truth is not None
        g64 = flatten(wide.truth)
        checks = {"truth": compare_vectors(g.double(), g64).relative_error}
        for k in spot:
            est64 = flatten(wide.gradients[k])
            checks[k] = {"float32_vs_float64": compare_vectors(flatten(out.gradients[k]).double(), est64).relative_error,
                         "relative_error_float64": compare_vectors(est64, g64).relative_error,
                         "relative_error_float32": rows[k]["relative_error"]}
        result["float64_spot"] = {"seconds": time.perf_counter() - t0, "checks": checks}
    return result


def show(result: dict[str, Any], title: str) -> None:
    print(f"\n{title}: T={result['seq_len']}, batch {result['batch']}, span {result['span']}, "
          f"checkpoint {result['checkpoint']}: {result['seconds']:.1f} s, peak +{result['peak_extra_mib']:.1f} MiB")
    for k, r in result["curve"].items():
        print(f"  K={k:>6}  relative error {r['relative_error']:.3e}  cosine {r['cosine']:.6f}")
    print(f"  effective context: K(1%) = {result['k_1pct']}, K(5%) = {result['k_5pct']}", flush=True)
    if "float64_spot" in result:
        spot = result["float64_spot"]
        print(f"  float64 spot check ({spot['seconds']:.1f} s): g in float32 off by {spot['checks']['truth']:.2e}")
        for k, c in spot["checks"].items():
            if k != "truth":
                print(f"    K={k}: ĝ_K float32 off by {c['float32_vs_float64']:.2e}; relative error "
                      f"{c['relative_error_float64']:.6e} (float64) against {c['relative_error_float32']:.6e} (float32)",
                      flush=True)


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


def lag_profile(model: torch.nn.Module, task: Any, seq_len: int, batch: int, max_lag: int, positions: int,
                split: str) -> dict[str, Any]:
    """φ̄_d to lag ``max_lag`` on the first ``seq_len`` steps of the split's streams, in float32 (time and
    peak memory measured) and again in float64 at the same positions, with how far float32 agrees."""
    source = task.stream(batch, split).slice(0, seq_len)
    base = current_rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    single = long_lag_profile(model, source, task.loss_kind, max_lag, n_positions=positions)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    t0 = time.perf_counter()
    double = long_lag_profile(copy.deepcopy(model).double(), source, task.loss_kind, max_lag, n_positions=positions)
    seconds64 = time.perf_counter() - t0
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(single.phi - double.phi) / double.phi
    positive = double.phi > 0
    worst = np.array([rel[..., j][positive[..., j]].max() if positive[..., j].any() else np.nan
                      for j in range(len(double.lags))])  # per lag, over pairs
    within = np.flatnonzero(~(worst <= 0.01))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_rel = np.abs(single.mean - double.mean) / double.mean
    rows = [{**r, "phi_mean_float64": m, "phi_se_float64": e, "float32_max_relative_difference": w,
             "float32_mean_relative_difference": mr}
            for r, m, e, w, mr in zip(single.frame().to_dict("records"), double.mean, double.standard_error, worst,
                                      mean_rel)]
    mean_off = np.flatnonzero(~(mean_rel <= 0.01))
    out: dict[str, Any] = {
        "seq_len": seq_len, "batch": batch, "max_lag": max_lag, "positions": single.n_positions,
        "seconds": seconds, "seconds_float64": seconds64,
        "peak_extra_mib": (peak - base) / 2**20 if base is not None else None, "profile": rows,
        "float32_within_1pct_to_lag": int(single.lags[within[0] - 1]) if len(within) and within[0] > 0 else
        (None if len(within) else max_lag),
        "float32_mean_within_1pct_to_lag": int(single.lags[mean_off[0] - 1]) if len(mean_off) and mean_off[0] > 0
        else (None if len(mean_off) else max_lag),
    }
    for name, prof in (("float32", single), ("float64", double)):
        fit = prof.fit(fit_to=64)
        zero = np.flatnonzero(prof.underflow > 0)
        out[name] = {"fit_to_64": {"rate": fit.rate, "rate_robust": fit.rate_robust, "r_squared": fit.r_squared},
                     "first_zero_lag": int(prof.lags[zero[0]]) if len(zero) else None}
    return out


def show_lags(result: dict[str, Any], title: str) -> None:
    print(f"\n{title}: T={result['seq_len']}, batch {result['batch']}, D={result['max_lag']}, "
          f"{result['positions']} positions: {result['seconds']:.1f} s in float32 (peak +{result['peak_extra_mib']:.1f} MiB), "
          f"{result['seconds_float64']:.1f} s in float64")
    for row in result["profile"]:
        if row["lag"] & (row["lag"] - 1) == 0:
            print(f"  d={row['lag']:>5}  φ̄ float64 {row['phi_mean_float64']:.3e} ± {row['phi_se_float64']:.1e}   "
                  f"float32 {row['phi_mean']:.3e} (mean off by {row['float32_mean_relative_difference']:.1e}, "
                  f"worst pair {row['float32_max_relative_difference']:.1e})")
    for name in ("float64", "float32"):
        fit = result[name]["fit_to_64"]
        print(f"  {name}: geometric fit d ≤ 64: rate {fit['rate']:.4f} (Theil–Sen {fit['rate_robust']:.4f}), "
              f"R² {fit['r_squared']:.4f}; first lag with exact zeros: {result[name]['first_zero_lag']}")
    print(f"  float32 within 1% of float64: every pair up to lag {result['float32_within_1pct_to_lag']}, "
          f"the mean φ̄ up to lag {result['float32_mean_within_1pct_to_lag']}", flush=True)


def lag_figure(results: dict[str, dict[str, Any]], path: Path) -> None:
    """φ̄_d against d (both log scales) from :func:`lag_profile`'s results: float64 with ± 1.96 SE bands,
    float32 as dots where it is a normal float32 number, and where the float32 mean leaves float64 by 1%."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from tbptt_bench.report import figures

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colours = figures.palette(list(results))
    top, floor = 0.0, 1e-120
    for label, res in results.items():
        frame, colour = pd.DataFrame(res["profile"]), colours[label]
        wide = frame[frame["phi_mean_float64"] > 0]
        mean, se = wide["phi_mean_float64"], wide["phi_se_float64"]
        top = max(top, float(mean.max()))
        ax.plot(wide["lag"], mean, color=colour, label=f"{label}: float64 ± 1.96 SE")
        ax.fill_between(wide["lag"], (mean - 1.96 * se).clip(lower=mean * 1e-3), mean + 1.96 * se, color=colour,
                        alpha=0.25, linewidth=0)
        narrow = frame[frame["phi_mean"] >= float(torch.finfo(torch.float32).tiny)]
        ax.plot(narrow["lag"], narrow["phi_mean"], ".", color=colour, markersize=3, label=f"{label}: float32")
        d = res.get("float32_mean_within_1pct_to_lag")
        if d is not None and d < res["max_lag"]:
            ax.axvline(d, color=colour, linestyle=":", linewidth=1)
            ax.annotate(f"float32 within 1%\nup to d = {d}", (d, 0.04), xycoords=("data", "axes fraction"),
                        xytext=(-3, 0), textcoords="offset points", ha="right", fontsize=8, color=colour)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(floor, top * 10)
    ax.set_xlabel("lag d (steps from the state to the loss)")
    ax.set_ylabel("mean ‖∂ℓ_t / ∂state‖ over sampled losses")
    first = next(iter(results.values()))
    ax.set_title(f"Lag profile, char-lm LSTM, T = {first['seq_len']:,}, {first['positions']} loss positions "
                 f"(curves below {floor:.0e} not drawn)", fontsize=9)
    ax.legend(frameon=False, fontsize=8, loc="lower left")
    ax.grid(True, which="major", alpha=0.3)
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
    p.add_argument("--float64-spot", default="", metavar="K,K",
                   help="K (nested, e.g. 64,4096) to recompute with g in float64 and compare (K-curve mode)")
    p.add_argument("--lag-profile", type=int, default=0, metavar="D", help="measure the lag profile to lag D instead")
    p.add_argument("--positions", type=int, default=64, help="loss positions sampled for --lag-profile")
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    task = make_task("char-lm")
    results: dict[str, Any] = {"provenance": provenance("cpu"), "threads": args.threads}
    if args.lag_profile > 0:
        def measure(update: int, model: torch.nn.Module) -> dict[str, Any]:
            label = "initial θ" if update == 0 else f"after {update} updates"
            res = lag_profile(model, task, args.seq_len, args.batch, args.lag_profile, args.positions, args.split)
            show_lags(res, f"lag profile, {label}")
            results.setdefault("lag_profile", {})[label] = res
            return {}

        if args.train_steps > 0:
            cfg = TrainConfig(task="char-lm", model="lstm", method=f"chunked:k={args.train_k}", steps=args.train_steps,
                              seq_len=args.train_seq_len, batch_size=args.batch, hidden_size=args.hidden, lr=args.lr,
                              eval_every=args.train_steps, eval_batches=2)
            train(cfg, on_eval=measure)
        else:
            measure(0, make_model("lstm", task, args.hidden, seed=0))
        if args.figure:
            lag_figure(results["lag_profile"], args.figure)
    elif args.train_steps <= 0:
        model = make_model("lstm", task, args.hidden, seed=0)
        spot = [int(k) for k in args.float64_spot.split(",")] if args.float64_spot else None
        results["long"] = curve(model, task, args.seq_len, args.batch, args.kmax, args.split, spot)
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
