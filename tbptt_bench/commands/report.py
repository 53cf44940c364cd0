"""``tbptt-bench report [RESULTS] --out reports/NAME``: a statistical report of a result store."""

from __future__ import annotations

import argparse
import re

from tbptt_bench.errors import UsageError
from tbptt_bench.report.figures import FORMATS
from tbptt_bench.methods.base import parse_method
from tbptt_bench.report.document import AXES, Options
from tbptt_bench.report.load import load_tables
from tbptt_bench.report.report import build_report
from tbptt_bench.report.stats import TESTS


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
                        "(default: the task's trivial baseline)")
    p.add_argument("--formats", default="png,pdf",
                   help=f"figure formats besides the PNG the HTML embeds, comma-separated from {','.join(FORMATS)}")
    p.add_argument("--axis", default="tokens", choices=tuple(AXES),
                   help="the budget learning is compared at (curves, final metric, time to target, paired tests): "
                        "tokens (default), compute (recurrent steps), update or wall (training seconds)")
    p.add_argument("--dpi", type=int, default=80, help="PNG resolution (default 80)")
    p.set_defaults(run=run)


def options_from(args: argparse.Namespace) -> Options:
    """The report options the command line asks for, checked."""
    if not 0 < args.alpha < 1:
        raise UsageError(f"--alpha must be in (0, 1), got {args.alpha}")
    if not 0 < args.confidence < 1:
        raise UsageError(f"--confidence must be in (0, 1), got {args.confidence}")
    if args.resamples < 100:
        raise UsageError(f"--resamples must be ≥ 100, got {args.resamples}")
    if not 20 <= args.dpi <= 600:
        raise UsageError(f"--dpi must be between 20 and 600, got {args.dpi}")
    formats = tuple(f.strip().lower() for f in args.formats.split(",") if f.strip())
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UsageError(f"unknown figure format(s) {', '.join(unknown)}; accepted: {', '.join(FORMATS)}")
    return Options(title=args.title, confidence=args.confidence, alpha=args.alpha, test=args.test,
                   n_resamples=args.resamples, seed=args.seed, formats=formats, dpi=args.dpi,
                   comparisons=tuple(parse_comparison(c) for c in args.compare),
                   targets=dict(parse_target(t) for t in args.target), axis=args.axis)


def run(args: argparse.Namespace) -> int:
    options = options_from(args)
    tables = load_tables(args.results)
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
