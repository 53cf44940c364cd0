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
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tbptt_bench.commands.common import (ITEMSIZE, MAX_SEED, add_optimizer_args, check_counts, check_output,
                                         emit_json, optimizer_values, parse_task_params)
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.base import split_specs
from tbptt_bench.methods.length import warn_long_windows
from tbptt_bench.perf.config import PerfConfig
from tbptt_bench.validation import check_run_size, finite_float, integer, integer_list

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perf", help="throughput, ms per update and peak memory of methods (fresh process each)")
    p.add_argument("--task", default="copy", help="task name (see `tbptt-bench tasks`)")
    p.add_argument("--task-param", action="append", default=[], metavar="KEY=VALUE",
                   help="task constructor parameter, repeatable")
    p.add_argument("--model", default="lstm", help="model names, comma-separated (e.g. rnn,lstm,gru)")
    p.add_argument("--model-param", action="append", default=[], metavar="KEY=VALUE",
                   help="model factory parameter, repeatable, applied to every model (e.g. --model-param mem=16 for sab)")
    p.add_argument("--method", action="append", default=[], metavar="SPECS",
                   help="method specs, comma-separated or repeated (default chunked:k=64)")
    p.add_argument("--seq-len", default="1024", help="sequence lengths T, comma-separated")
    p.add_argument("--batch", default="32", help="batch sizes B, comma-separated")
    p.add_argument("--hidden", default="128", help="hidden sizes H, comma-separated")
    p.add_argument("--layers", default="1", help="numbers of layers, comma-separated")
    p.add_argument("--path", default="fused", help="execution paths, comma-separated: fused, cell")
    p.add_argument("--compile", action="store_true", help="torch.compile the per-step cell (cell path only)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every CPU available)")
    p.add_argument("--warmup", type=int, default=1, help="untimed sequences before timing")
    p.add_argument("--repeats", type=int, default=5, help="timed sequences (median and p10/p90 reported)")
    add_optimizer_args(p, clip=None, allow_none=True)
    p.add_argument("--seed", type=int, default=0, help="seed for parameters and data")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="cap what each run may add, e.g. 2G or 512M; beyond it the cell is recorded as oom")
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


def int_list(text: str, name: str) -> list[int]:
    """``"256,1024"`` → ``[256, 1024]``, each an integer ≥ 1 (no empty items)."""
    return integer_list(f"--{name}", text, lo=1, example="256,1024", skip_empty=False)


def parse_size(text: str | None) -> int | None:
    """``"512M"`` → bytes (binary units: K = 1024); None stays None."""
    if text is None:
        return None
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"--memory-limit {text!r} is not a size; expected e.g. 2G, 512M or a number of bytes")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[match.group(2).lower()]
    size = finite_float("--memory-limit", match.group(1), 0, lo_open=True) * scale
    return integer("--memory-limit", float(min(size, 2.0**62)) // 1, lo=1)


def check_args(args: argparse.Namespace) -> dict[str, list[int]]:
    """Counts, rates and the size grid checked before anything is built; the size lists by flag."""
    check_counts(args, {"threads": 1, "warmup": 0, "repeats": 1})
    integer("--seed", args.seed, lo=0, hi=MAX_SEED)
    finite_float("--lr", args.lr, 0, lo_open=True)
    if args.timeout is not None:
        finite_float("--timeout", args.timeout, 0, lo_open=True)
    sizes = {name: int_list(getattr(args, name.replace("-", "_")), name)
             for name in ("layers", "hidden", "batch", "seq-len")}
    check_run_size(max(sizes["batch"]), max(sizes["seq-len"]), max(sizes["hidden"]), max(sizes["layers"]),
                   ITEMSIZE.get(args.dtype, 8))
    return sizes


def configs_from_args(args: argparse.Namespace) -> list[PerfConfig]:
    """The grid of configurations the flags describe (every value checked first)."""
    from tbptt_bench.perf.tables import expand_grid  # imported where used: the CLI starts without pandas

    sizes = check_args(args)
    base = PerfConfig(task=args.task, device=args.device, dtype=args.dtype, threads=args.threads,
                      warmup=args.warmup, repeats=args.repeats, seed=args.seed, **optimizer_values(args),
                      compile=args.compile, task_params=parse_task_params(args.task_param),
                      model_params=parse_task_params(args.model_param, "--model-param"),
                      memory_limit=parse_size(args.memory_limit))
    return expand_grid(
        base,
        model=[m.strip() for m in args.model.split(",")],
        path=[p.strip() for p in args.path.split(",")],
        num_layers=sizes["layers"],
        hidden_size=sizes["hidden"],
        batch_size=sizes["batch"],
        method=split_methods(args.method or ["chunked:k=64"]),
        seq_len=sizes["seq-len"],
    )


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
