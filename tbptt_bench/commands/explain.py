"""``tbptt-bench explain SPEC --seq-len N``: which lags each loss receives, and its update."""

from __future__ import annotations

import argparse

from tbptt_bench.core.mask import explain, render_mask
from tbptt_bench.methods.base import parse_method
from tbptt_bench.methods.length import warn_long_windows
from tbptt_bench.validation import integer

#: The longest sequence whose mask is printed.
MAX_PRINTED = 2000


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="print the truncation mask of a method for a small T")
    p.add_argument("spec", help="method spec, e.g. tbptt:k1=4,k2=8")
    p.add_argument("--seq-len", type=int, required=True, help="sequence length T")
    p.add_argument("--picture", action="store_true", help="also draw the mask (row t, column s)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    integer("--seq-len", args.seq_len, lo=1, hi=MAX_PRINTED)
    method = parse_method(args.spec)
    warn_long_windows([method], args.seq_len)
    updates = method.updates(args.seq_len)
    print(f"{method.spec} over T = {args.seq_len}: {len(updates)} update(s); steps and updates are 1-based")
    print(explain(updates, args.seq_len))
    if args.picture:
        print("\nmask (row: loss t, column: step s = 1..t; '#' kept, '.' dropped, '~' reweighted):")
        print(render_mask(updates, args.seq_len))
    return 0
