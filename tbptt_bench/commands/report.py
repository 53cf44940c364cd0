"""``tbptt-bench report [RESULTS] --out reports/NAME``: a statistical report of a result store."""

from __future__ import annotations

import argparse
import re

from typing import TYPE_CHECKING

from tbptt_bench.commands.common import MAX_SEED
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import parse_method
from tbptt_bench.report import AXES, FORMATS, TESTS
from tbptt_bench.tasks import TASKS
from tbptt_bench.validation import finite_float, integer, writable_dir

if TYPE_CHECKING:
    import pandas as pd

    from tbptt_bench.report.document import Options

#: The most bootstrap resamples --resamples accepts (each figure's interval costs resamples × rows).
MAX_RESAMPLES = 10**7

def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="report.md, a self-contained report.html, figures and CSV tables from a result store",
        description="Turn a result store (as written by `tbptt-bench run`) into a report directory: provenance, "
                    "gradient bias, cost, learning, trade-off and paired statistics with Holm's correction.")
    p.add_argument("results", nargs="?", default="results/quick",
                   help="a store directory (results/SUITE), a results root holding one store, or a .parquet/.csv "
                        "results file (default: results/quick)")
    p.add_argument("--out", required=True, metavar="DIR", help="report directory to write, e.g. reports/quick")
    p.add_argument("--title", default="", help="report title (default: from the suite name)")
    p.add_argument("--test", default="wilcoxon", choices=TESTS, help="paired test across seeds (default: wilcoxon)")
    p.add_argument("--alpha", type=float, default=0.05, help="family-wise error rate for Holm (default 0.05)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of intervals (default 0.95)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutation resampling")
    p.add_argument("--compare", action="append", default=[], metavar="'A vs B'",
                   help="a declared comparison of two method specs, repeatable, e.g. 'chunked:k=8 vs full' "
                        "(default: each method against full and against the best fixed K)")
    p.add_argument("--target", action="append", default=[], metavar="TASK=VALUE",
                   help="time-to-target threshold of a task in its metric's units, repeatable "
                        "(default: the task's memoryless baseline)")
    p.add_argument("--formats", default="png,pdf",
                   help=f"figure formats besides the PNG the HTML embeds, comma-separated from {','.join(FORMATS)}")
    p.add_argument("--axis", default="tokens", choices=tuple(AXES),
                   help="the budget learning is compared at (curves, final metric, time to target, paired tests): "
                        "tokens (default), compute (recurrent steps), update or wall (training seconds)")
    p.add_argument("--dpi", type=int, default=80, help="PNG resolution (default 80)")
    p.set_defaults(run=run)


def options_from(args: argparse.Namespace) -> "Options":
    from tbptt_bench.report.document import Options  # imported where used: the CLI starts without pandas

    """The report options the command line asks for, checked."""
    finite_float("--alpha", args.alpha, 0, 1, lo_open=True, hi_open=True)
    finite_float("--confidence", args.confidence, 0, 1, lo_open=True, hi_open=True)
    integer("--resamples", args.resamples, lo=100, hi=MAX_RESAMPLES)
    integer("--dpi", args.dpi, lo=20, hi=600)
    integer("--seed", args.seed, lo=0, hi=MAX_SEED)
    formats = tuple(f.strip().lower() for f in args.formats.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown figure format(s) {', '.join(unknown)}; accepted: {', '.join(FORMATS)}")
    return Options(title=args.title, confidence=args.confidence, alpha=args.alpha, test=args.test,
                   n_resamples=args.resamples, seed=args.seed, formats=formats, dpi=args.dpi,
                   comparisons=tuple(parse_comparison(c) for c in args.compare),
                   targets=dict(_target(t) for t in args.target), axis=args.axis)


def _target(text: str) -> tuple[str, float]:
    """``TASK=VALUE`` with a registered task name and a finite value."""
    task, value = parse_target(text)
    if task not in TASKS:
        raise UsageError(f"--target {text!r}: unknown task {task!r}; accepted: {', '.join(TASKS.names())}")
    return task, finite_float(f"--target {task}", value)


def check_targets(targets: dict[str, float], tables: "dict[str, pd.DataFrame]") -> None:
    """Every task named by --target has rows in the results (a target for another task would be ignored)."""
    from tbptt_bench.report.common import measured_rows

    rows = measured_rows(tables)
    present = sorted(set(map(str, rows["task"].dropna()))) if "task" in rows.columns else []
    for task in targets:
        if task not in present:
            raise UsageError(f"--target {task}=…: the results hold no {task!r} rows; tasks there: "
                             f"{', '.join(present) or 'none'}")


def run(args: argparse.Namespace) -> int:
    from tbptt_bench.report.load import load_tables
    from tbptt_bench.report.report import build_report

    options = options_from(args)
    writable_dir(args.out, "--out")
    tables = load_tables(args.results)
    check_targets(options.targets, tables)
    files = build_report(tables, args.out, options)
    print(f"wrote {files.markdown} and {files.html}: {len(files.figures)} figures, {len(files.tables)} tables")
    return 0


def parse_target(text: str) -> tuple[str, float]:
    """``TASK=VALUE`` for --target."""
    task, sep, value = text.partition("=")
    try:
        return task.strip(), float(value)
    except ValueError:
        pass
    raise UsageError(f"malformed --target {text!r}; expected TASK=VALUE, e.g. copy=0.9")


def parse_comparison(text: str) -> tuple[str, str]:
    """``TREATMENT vs REFERENCE`` (method specs) for --compare, canonicalised."""
    parts = re.split(r"\s+vs\s+", text.strip())
    if len(parts) != 2 or not all(parts):
        raise UsageError(f"malformed --compare {text!r}; expected 'TREATMENT vs REFERENCE', e.g. 'chunked:k=8 vs full'")
    return parse_method(parts[0]).spec, parse_method(parts[1]).spec
