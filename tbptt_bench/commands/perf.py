"""``tbptt-bench perf``: throughput, time per update and peak memory over a grid, one process per cell.

Lists are comma-separated: ``--seq-len 256,1024``, ``--method chunked:k=64,full`` (a method's own
``KEY=VALUE`` parameters stay with it: ``--method tbptt:k1=16,k2=64,full`` is two methods).
Exit status 0 when every configuration's status is ``ok``, 1 otherwise (``oom``, ``failed``,
``timeout``, or ``busy`` under ``--strict``), 2 for bad input; one line on stderr says which.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tbptt_bench.commands.common import ITEMSIZE, check_output, emit_json
from tbptt_bench.methods.base import split_specs
from tbptt_bench.methods.length import warn_long_windows
from tbptt_bench.options import add_arguments, from_args, grid_values
from tbptt_bench.perf.config import PerfConfig, parse_size  # noqa: F401 (parse_size: the --memory-limit syntax)
from tbptt_bench.validation import check_run_size, finite_float

log = logging.getLogger(__name__)

#: The options that take a list of values, crossed into a grid (``--seq-len 256,1024``).
GRID = ("model", "path", "num_layers", "hidden_size", "batch_size", "method", "seq_len")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perf", help="throughput, ms per update and peak memory of methods (fresh process each)")
    add_arguments(p, PerfConfig.options(), grid=GRID)
    p.add_argument("--timeout", type=float, default=None, help="seconds per configuration before it is abandoned")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process (faster; memory columns then depend on what ran before)")
    p.add_argument("--strict", action="store_true",
                   help="refuse timings taken on a busy machine: status busy, exit status 1 (docs/perf.md)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    p.add_argument("--save", metavar="FILE", help="write the table: .csv, .parquet or .json")
    p.set_defaults(run=run)


def split_methods(items: list[str]) -> list[str]:
    """``["tbptt:k1=16,k2=64,full"]`` → ``["tbptt:k1=16,k2=64", "full"]``: each item split by
    :func:`tbptt_bench.methods.base.split_specs` (the one rule every command uses)."""
    return [spec for item in items for spec in split_specs(item)]


def configs_from_args(args: argparse.Namespace) -> list[PerfConfig]:
    """The grid of configurations the flags describe (every value checked first)."""
    from tbptt_bench.perf.tables import expand_grid  # imported where used: the CLI starts without pandas

    options = PerfConfig.options()
    base = from_args(args, {name: o for name, o in options.items() if name not in GRID})
    if args.timeout is not None:
        finite_float("--timeout", args.timeout, 0, lo_open=True)
    grid = {name: grid_values(args, options[name], split_specs if name == "method" else _commas) for name in GRID}
    check_run_size(max(grid["batch_size"]), max(grid["seq_len"]), max(grid["hidden_size"]), max(grid["num_layers"]),
                   ITEMSIZE.get(base["dtype"], 8))
    return expand_grid(PerfConfig(**base), **grid)


def _commas(text: str) -> list[str]:
    return text.split(",")


def run(args: argparse.Namespace) -> int:
    from tbptt_bench.perf.child import perf_grid
    from tbptt_bench.perf.tables import check_output_path, save_table

    configs = configs_from_args(args)
    if args.save:
        check_output_path(Path(args.save))
    check_output(args.save, "--save")
    for config in configs:
        warn_long_windows([config.method], config.seq_len)
    console = Console(stderr=True)

    def progress(row: dict[str, Any]) -> None:
        if not args.json:
            console.print(f"[dim]{row['model']} {row['path']} {row['method']} T={row['seq_len']}: {row['status']}[/]")

    frame = perf_grid(configs, fresh=not args.in_process, timeout=args.timeout, on_row=progress, strict=args.strict)
    if args.save:
        save_table(frame, args.save)
    if args.json:
        emit_json(json.loads(frame.to_json(orient="records")))
    else:
        out = Console()
        if not out.is_terminal:  # a file or a pipe: do not squeeze the table into 80 columns
            out = Console(width=200)
        out.print(render_table(frame.to_dict("records")))
    rc, line = outcome(frame.to_dict("records"))
    print(line, file=sys.stderr)
    return rc


def outcome(rows: list[dict[str, Any]]) -> tuple[int, str]:
    """Exit status (0 every row ``ok``, else 1) and the one stderr line that says so."""
    counts = Counter(str(r["status"]) for r in rows)
    busy = sum(1 for r in rows if r.get("busy") is True and r["status"] == "ok")
    note = f"; {busy} measured on a busy machine (see the warnings; --strict refuses them)" if busy else ""
    bad = {s: n for s, n in counts.items() if s != "ok"}
    if not bad:
        return 0, f"tbptt-bench perf: all {len(rows)} configurations ok{note}"
    listed = ", ".join(f"{s} {n}" for s, n in sorted(bad.items()))
    return 1, f"tbptt-bench perf: {sum(bad.values())} of {len(rows)} configurations not ok ({listed}){note}; exit status 1"


def _num(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def _status_cell(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"[red]{row['status']}[/]"
    return "[yellow]ok, busy[/]" if row.get("busy") is True else "ok"


def render_table(rows: list[dict[str, Any]]) -> Table:
    """The rows as a rich table: throughput, time per update with its spread, peak memory."""
    first = rows[0] if rows else {}
    title = (f"{first.get('task', '')} on {first.get('device', '')} ({first.get('cpu_model', '')}"
             f"{', ' + first['gpu_model'] if first.get('gpu_model') else ''}), {first.get('threads', '')} threads, "
             f"torch {first.get('torch_version', '')}")
    table = Table(title=title)
    for name, justify in [("model", "left"), ("path", "left"), ("method", "left"), ("T", "right"), ("B", "right"),
                          ("H", "right"), ("status", "left"), ("tokens/s", "right"), ("ms/update", "right"),
                          ("p10–p90", "right"), ("peak MiB", "right"), ("seq MiB", "right")]:
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    mib = 2.0**20
    for r in rows:
        delta = r.get("mem_delta_bytes")
        steady = r.get("mem_sequence_bytes")
        table.add_row(
            str(r["model"]), str(r["path"]) + ("+compile" if r.get("compile") else ""), str(r["method"]),
            str(r["seq_len"]), str(r["batch_size"]), str(r["hidden_size"]),
            _status_cell(r),
            _num(r.get("tokens_per_s"), ",.0f"), _num(r.get("ms_per_update"), ".3f"),
            f"{_num(r.get('ms_per_update_p10'), '.3f')}–{_num(r.get('ms_per_update_p90'), '.3f')}",
            _num(None if delta is None or math.isnan(delta) else delta / mib, ".1f"),
            _num(None if steady is None or math.isnan(steady) else steady / mib, ".1f"),
        )
    return table
