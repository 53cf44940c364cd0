"""``tbptt-bench bias``: relative bias, alignment and noise of truncated gradients over a K grid.

    tbptt-bench bias --task copy --model lstm --method chunked,sliding --k 1,2,4,8,16,32 --batches 16 \\
        --save bias.csv --figure bias.png

``--method`` takes family names (combined with every K of ``--k``: ``chunked:k=K``, ``sliding:k=K``,
``tbptt:k1=K,k2=2K-1``) or complete specs, comma-separated or repeated. ``--save`` writes the tidy
table (``.csv`` or ``.parquet``) and the lag-profile table next to it (``NAME.lags.csv``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING

from tbptt_bench.commands.common import build, check_output, check_sizes, emit_json, progress_bar
from tbptt_bench.atomic import atomic_path
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import Method, describe, grid, split_specs
from tbptt_bench.options import add_arguments, from_args
from tbptt_bench.suites.measures import bias_options, measured_options
from tbptt_bench.validation import integer_list

if TYPE_CHECKING:
    import pandas as pd

TABLE_FORMATS = (".csv", ".parquet")
FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bias", help="gradient bias of methods over a K grid against the true gradient")
    add_arguments(p, bias_options())
    p.add_argument("--method", action="append", default=[], metavar="FAMILY|SPEC",
                   help="method families (chunked, sliding, tbptt, full) combined with --k, or complete specs; "
                        "comma-separated or repeated (default: chunked)")
    p.add_argument("--k", default="", metavar="K,K,...", help="truncation lengths, e.g. 1,2,4,8,16,32")
    p.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.add_argument("--save", metavar="FILE.csv|FILE.parquet", help="write the tidy table (and FILE.lags.*)")
    p.add_argument("--figure", metavar="FILE.png", help="write the figure (png, pdf or svg)")
    p.set_defaults(run=run)


def parse_ks(text: str) -> list[int]:
    """``--k 1,2,4,8`` → ``[1, 2, 4, 8]`` (integers ≥ 1)."""
    return integer_list("--k", text, lo=1, example="1,2,4,8")


def methods_from_args(args: argparse.Namespace) -> list[Method]:
    families: list[str] = []
    for value in args.method or ["chunked"]:
        families.extend(split_specs(value))
    return grid(families, parse_ks(args.k))


def lags_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.lags{path.suffix}")


def write_table(df: "pd.DataFrame", path: Path) -> None:
    """CSV or Parquet by suffix, atomically (temporary file in the same folder, then rename)."""
    if path.suffix not in TABLE_FORMATS:
        raise UsageError(f"cannot write {path}: use a file ending in .csv or .parquet")
    with atomic_path(path) as tmp:
        if path.suffix == ".csv":
            df.to_csv(tmp, index=False)
        else:
            df.to_parquet(tmp, index=False)


def run(args: argparse.Namespace) -> int:
    from tbptt_bench.analysis.bias import analyse_bias  # imported here: the CLI starts without scipy

    methods = methods_from_args(args)
    v = from_args(args, bias_options())
    check_sizes(v)
    if args.save and Path(args.save).suffix not in TABLE_FORMATS:
        raise UsageError(f"cannot write {args.save}: use a file ending in .csv or .parquet")
    check_output(args.save, "--save")
    check_output(str(lags_path(Path(args.save))) if args.save else None, "the lag table")
    if args.figure and Path(args.figure).suffix.lower() not in FIGURE_SUFFIXES:
        raise UsageError(f"cannot write {args.figure}: use a figure file ending in {', '.join(FIGURE_SUFFIXES)}")
    check_output(args.figure, "--figure")
    task, model = build(v)
    measured = {k: v[k] for k in ("seq_len", "batch_size", "seed", "device", "dtype", *measured_options())}
    with progress_bar(f"bias {v['task']}/{v['model']}: batches", v["n_batches"], quiet=args.json) as update:
        report = analyse_bias(task, model, methods, progress=update, **measured,
                              labels={"model": v["model"], "hidden": v["hidden_size"], "layers": v["num_layers"]})
    if args.save:
        write_table(report.table, Path(args.save))
        write_table(report.lags, lags_path(Path(args.save)))
    if args.figure:
        from tbptt_bench.report.bias_plots import bias_figure, save_figure

        title = (f"{v['task']} / {v['model']} (H={v['hidden_size']}), T={v['seq_len']}, B={v['batch_size']}, "
                 f"N={v['n_batches']}")
        save_figure(bias_figure(report.table, report.lags, title), args.figure)
    if args.json:
        emit_json({"meta": report.meta, "rows": _records(report.table), "lags": _records(report.lags),
                   "exact": _records(exact_table(report.table))})
        return 0
    _print_summary(report)
    return 0


#: The columns of the JSON field ``exact``: the draw-free bias of each method at the measured batches.
EXACT_COLUMNS = ["spec", "group", "exact_relative_bias", "exact_relative_error_max", "extrapolation",
                 "extrapolation_ratio"]


def exact_table(df: "pd.DataFrame") -> "pd.DataFrame":
    """The rows of methods with an exact expectation (deterministic ones, and random ones measured with
    ``--expectation exact``), only the draw-free columns."""
    if "exact_relative_bias" not in df.columns:
        return df.iloc[:0]
    return df.loc[df["exact_relative_bias"].notna(), [c for c in EXACT_COLUMNS if c in df.columns]]


def _records(df: "pd.DataFrame") -> list[dict]:  # type: ignore[type-arg]
    import pandas as pd

    out = []
    for rec in df.to_dict(orient="records"):
        out.append({k: (None if v is pd.NA or isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in rec.items()})
    return out


def _print_summary(report) -> None:  # type: ignore[no-untyped-def]
    import pandas as pd

    m = report.meta
    print(f"{m['task']}: T={m['seq_len']}, B={m['batch_size']}, N={m['n_batches']} batches, true gradient "
          f"{m['true_method']}, {m['dtype']}, {m['seconds']:.1f} s")
    level = f"{m['ci_level']:.0%} CI"
    print(f"{'method':<22} {'series':<16} {'K':>4} {'rel. bias':>10} {level:>21} {'p(0 bias)':>9} {'plug-in':>9} "
          f"{'cosine':>8} {'rel. err':>9} {'SNR':>8} {'exact':>9} {'extrap.':>9} {'ext/exact':>9}")
    rows = report.table[report.table["group"] == "all"]
    rows = rows.iloc[sorted(range(len(rows)), key=lambda i: describe(rows["spec"].iloc[i])["sort_key"])]
    for _, r in rows.iterrows():
        ci = f"[{r['relative_bias_lo']:.3g}, {r['relative_bias_hi']:.3g}]"
        k = "–" if pd.isna(r["k"]) else str(int(r["k"]))
        print(f"{r['spec']:<22} {r['series']:<16} {k:>4} {r['relative_bias']:>10.4g} {ci:>21} {r['bias_p_value']:>9.3g} "
              f"{r['relative_bias_plugin']:>9.4g} {r['cosine_mean']:>8.4f} {r['relative_error_mean']:>9.4g} "
              f"{r['snr']:>8.3g} {r['exact_relative_bias']:>9.3g} {r['extrapolation']:>9.3g} "
              f"{r['extrapolation_ratio']:>9.3g}")
    from tbptt_bench.report.stats import interval_notes

    for note in interval_notes(rows, level=m["ci_level"], n_batches=m["n_batches"], n_flips=m["n_flips"]):
        print(note)
    print("exact = ‖Σ(E ĝ − g)‖/‖Σ g‖ over these batches, E over the method's own draws (no sampling; random "
          "methods need --expectation exact)")
    if report.profile is not None:
        f = report.profile.fit
        print(f"lag profile d=1..{report.profile.max_lag}: decay rate {f.rate:.4g} (least squares), "
              f"{f.rate_robust:.4g} [{f.rate_robust_lo:.4g}, {f.rate_robust_hi:.4g}] (Theil–Sen)")
        print(extrapolation_verdict(report.profile.decay_check(), rows["extrapolation_ratio"]))


def extrapolation_verdict(check, ratios: "pd.Series") -> str:  # type: ignore[no-untyped-def]
    """One line: what the decay check tested, and that the extrapolation is an estimate, with the worst
    measured ratio extrapolation / exact among ``ratios``."""
    finite = ratios[ratios.notna() & (ratios > 0)]
    worst = (f"here extrap./exact ranges {finite.min():.3g}–{finite.max():.3g}" if len(finite)
             else "no exact figure to compare with here")
    shape = "geometric" if check.geometric else "NOT geometric"
    return (f"extrap. = bias extrapolated from the lag profile (Aicher et al.): an estimate, not a bound, and it can "
            f"be far from the exact bias, below as well as above ({worst}; docs/statistics.md gives the worst "
            f"measured). Checked: only "
            f"whether the lag norms decay geometrically — {shape} ({check.reason}); that does not make the "
            f"extrapolation right.")
