"""Coverage of the bias intervals on real gradients, with a known truth, by resampling a large pool.

    PYTHONPATH=. python benchmarks/coverage_real.py                      # the table in docs/statistics.md
    PYTHONPATH=. python benchmarks/coverage_real.py --pool 300 --reps 100 --ns 8,16   # small (the test)
    PYTHONPATH=. python benchmarks/coverage_real.py --cells adding/lstm/chunked:k=4 --worlds biased


For each (task, model) the script draws ``--pool`` independent batches at fixed θ (float64, T=24, B=4,
H=8, as the referee's check in issue 24) and stores every batch's true gradient g and each method's
error d = ĝ − g (a cell TASK/MODEL/SPEC names its own truncating method instead of
:data:`BIASED`). The pool's empirical law is then a world with a known truth: a data set of N batches
is N rows drawn with replacement from the pool (independent and identically distributed, exactly),
and the truth is the pool's own ‖mean d‖ and ‖mean d‖ / ‖mean g‖. The *biased* world uses a truncating
method's errors as they are; the *unbiased* world subtracts the pool mean from ARTBP's errors (whose
noise comes from its random cuts), so E d = 0 exactly while the noise keeps the real gradients' shape,
concentrated in few directions.

Per world and N, the share of 95% intervals (``expectation_bias``) that contain the truth, and the
shares that miss below (the interval lies below the truth) and above.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from tbptt_bench.analysis.expectation import expectation_bias
from tbptt_bench.analysis.gradients import flatten, method_gradient, true_gradient
from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.methods.base import parse_method
from tbptt_bench.seeding import derive_seed, generator

SEQ_LEN, BATCH, HIDDEN = 24, 4, 8
CELLS = (("copy", "rnn"), ("copy", "lstm"), ("char-lm", "rnn"), ("char-lm", "lstm"))
BIASED, UNBIASED = "chunked:k=2", "artbp:c=0.2,min=2"


def gradient_pool(task_name: str, model_name: str, size: int, seed: int = 0,
                  biased: str = BIASED) -> dict[str, np.ndarray]:
    """``size`` batches' true gradients ``g`` and errors ``d:SPEC`` of ``biased`` and :data:`UNBIASED`."""
    task = make_task(task_name)
    model = make_model(model_name, task, HIDDEN, seed=seed, dtype="float64")
    rows: dict[str, list[np.ndarray]] = {"g": [], f"d:{biased}": [], f"d:{UNBIASED}": []}
    for n in range(size):
        batch = task.sample(BATCH, SEQ_LEN, generator(derive_seed("coverage-pool", seed, n)), "valid")
        g = flatten(true_gradient(model, batch, task.loss_kind)).numpy()
        rows["g"].append(g)
        for spec in (biased, UNBIASED):
            est = method_gradient(model, batch, parse_method(spec), task.loss_kind, seed=derive_seed("draws", n))
            rows[f"d:{spec}"].append(flatten(est).numpy() - g)
    return {k: np.stack(v) for k, v in rows.items()}


def cached_pool(task_name: str, model_name: str, size: int, cache: Path | None,
                biased: str = BIASED) -> dict[str, np.ndarray]:
    """:func:`gradient_pool`, read from / written to ``cache`` (a folder) when given."""
    if cache is None:
        return gradient_pool(task_name, model_name, size, biased=biased)
    path = cache / f"{task_name}-{model_name}-{size}-{biased.replace(':', '_')}.npz"
    if path.exists():
        return dict(np.load(path))
    pool = gradient_pool(task_name, model_name, size, biased=biased)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, **pool)
    return pool


def worlds(pool: dict[str, np.ndarray], biased: str = BIASED) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """(d, g, unbiased) of each world: the biased method's errors as they are, ARTBP's centred."""
    g = pool["g"]
    d_b, d_u = pool[f"d:{biased}"], pool[f"d:{UNBIASED}"]
    return {f"{biased} (biased)": (d_b, g, False), f"{UNBIASED} (centred)": (d_u - d_u.mean(0), g, True)}


def coverage(d: np.ndarray, g: np.ndarray, unbiased: bool, n: int, reps: int, seed: int) -> dict[str, float]:
    """Shares of ``reps`` resampled data sets of ``n`` rows whose intervals cover / lie below / above the truth.

    With E d = 0 the truth is 0, which a set contains exactly when ``zero_in_interval`` (a set (0, hi]
    with lower end 0 does not contain it)."""
    rng = np.random.default_rng(seed)
    bias = 0.0 if unbiased else float(np.linalg.norm(d.mean(0)))
    ratio = bias / float(np.linalg.norm(g.mean(0)))
    counts = np.zeros((2, 2))
    for _ in range(reps):
        idx = rng.integers(0, d.shape[0], n)
        r = expectation_bias(d[idx], g[idx], n_flips=0, seed=rng)
        for row, (truth, lo, hi) in enumerate(((bias, r.bias_norm_lo, r.bias_norm_hi),
                                               (ratio, r.relative_bias_lo, r.relative_bias_hi))):
            if unbiased:
                counts[row] += [0.0, not r.zero_in_interval]
            else:
                counts[row] += [hi < truth, lo > truth]
    miss = counts / reps
    return {"norm_below": miss[0, 0], "norm_above": miss[0, 1], "ratio_below": miss[1, 0],
            "ratio_above": miss[1, 1], "truth_ratio": ratio}


def main(argv: list[str] | None = None) -> None:
    """Print the markdown table: one row per (task, model, world, N)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--pool", type=int, default=600, help="batches in each pool (default 600)")
    ap.add_argument("--reps", type=int, default=1000, help="resampled data sets per row (default 1000)")
    ap.add_argument("--ns", default="8,16,64", help="numbers of batches N (default 8,16,64)")
    ap.add_argument("--cells", default=",".join(f"{t}/{m}" for t, m in CELLS),
                    help=f"TASK/MODEL[/SPEC],... (SPEC: the biased world's method, default {BIASED}; no commas)")
    ap.add_argument("--worlds", default="biased,unbiased", help="which worlds to measure (default biased,unbiased)")
    ap.add_argument("--cache", type=Path, default=None, help="folder to keep the pools in between runs")
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    ns = [int(v) for v in args.ns.split(",")]
    se = math.sqrt(0.95 * 0.05 / args.reps)
    print(f"pool {args.pool} batches, {args.reps} data sets per row (binomial SE of a 0.95 coverage ≈ {se:.3f}); "
          f"level 0.95\n")
    print("| task | model | world | N | true ratio | cover ratio | below / above | cover ‖E d‖ | below / above |")
    print("|" + "---|" * 9)
    start = time.perf_counter()
    wanted = set(args.worlds.split(","))
    if not wanted or wanted - {"biased", "unbiased"}:
        ap.error(f"--worlds takes biased and/or unbiased; got {args.worlds!r}")
    for i, cell in enumerate(args.cells.split(",")):
        parts = cell.split("/")
        if len(parts) not in (2, 3):
            ap.error(f"a cell is TASK/MODEL or TASK/MODEL/SPEC; got {cell!r}")
        task_name, model_name, biased = parts[0], parts[1], parts[2] if len(parts) == 3 else BIASED
        pool = cached_pool(task_name, model_name, args.pool, args.cache, biased)
        for j, (name, (d, g, unbiased)) in enumerate(worlds(pool, biased).items()):
            if ("unbiased" if unbiased else "biased") not in wanted:
                continue
            for n in ns:
                c = coverage(d, g, unbiased, n, args.reps, derive_seed(args.seed, i, j, n))
                print(f"| {task_name} | {model_name} | {name} | {n} | {c['truth_ratio']:.4f} | "
                      f"{1 - c['ratio_below'] - c['ratio_above']:.3f} | {c['ratio_below']:.3f} / "
                      f"{c['ratio_above']:.3f} | {1 - c['norm_below'] - c['norm_above']:.3f} | "
                      f"{c['norm_below']:.3f} / {c['norm_above']:.3f} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
