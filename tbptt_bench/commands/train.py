"""``tbptt-bench train``: train a model on a task with a method; print and save the learning curve."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from tbptt_bench.atomic import check_parent, write_text
from tbptt_bench.analysis.bias_options import SnapshotOptions
from tbptt_bench.commands.common import check_output, check_sizes, emit_json
from tbptt_bench.errors import UsageError
from tbptt_bench.methods.length import warn_long_windows
from tbptt_bench.training.loop import TrainConfig, train
from tbptt_bench.options import add_arguments, declared, from_args

log = logging.getLogger(__name__)

#: The options of ``--bias-at`` snapshots.
SNAPSHOT = declared(SnapshotOptions)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train with a method and record the learning curve")
    add_arguments(p, TrainConfig.options())
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", metavar="FILE.json", help="write the learning curve and config as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--bias-at", metavar="N,N,...",
                   help="measure gradient bias at these update counts (0, multiples of --eval-every, or --steps); "
                        "the learning-curve rows get the bias columns (docs/bias.md)")
    p.add_argument("--bias-methods", metavar="SPECS", default=None,
                   help="methods measured by --bias-at, comma-separated specs (default: --method)")
    add_arguments(p, SNAPSHOT)
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The training configuration the flags describe, every value checked (docs/reliability.md)."""
    cfg = TrainConfig(**from_args(args, TrainConfig.options()))
    check_sizes(cfg.flat())
    from_args(args, SNAPSHOT)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()
    check_output(args.save, "--save")
    warn_long_windows([cfg.method], cfg.seq_len)
    show = not (args.quiet or args.json)
    with Progress(TextColumn("[bold]train[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), disable=not show, transient=True) as bar:
        job = bar.add_task(f"{cfg.task}/{cfg.model} {cfg.method}", total=cfg.steps)
        result = train(cfg, on_eval=bias_hook(args, cfg), progress=lambda done, total: bar.update(job, completed=done))
    if result.diverged_at is not None:
        raise UsageError(f"training diverged: loss became non-finite by update {result.diverged_at}; "
                         "try a smaller --lr or --clip-norm")
    out = result.as_dict()
    if args.save:
        write_text(args.save, json.dumps(out, indent=2, default=float))
    if args.json:
        emit_json(out)
    else:
        show_k = any("k_used" in row for row in result.curve)
        print(f"{'update':>7} {'train loss':>11} {'eval loss':>10} {result.metric_name:>10} {'seconds':>8}"
              + (f" {'K':>5}" if show_k else ""))
        for row in result.curve:
            tl = "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
            k = f" {row.get('k_used', '-')!s:>5}" if show_k else ""
            print(f"{row['update']:>7} {tl:>11} {row['eval_loss']:>10.4f} {row['eval_metric']:>10.4f} {row['wall_time']:>8.2f}{k}")
        print(f"memoryless baseline {result.metric_name}: {result.baseline:.4f}")
    return 0


def bias_hook(args: argparse.Namespace, cfg: TrainConfig):  # type: ignore[no-untyped-def]
    """The ``on_eval`` hook for ``--bias-at`` (None without it): bias snapshots at evaluation points."""
    if not args.bias_at:
        return None
    from tbptt_bench.analysis.bias import bias_snapshots, parse_update_list
    from tbptt_bench.methods.base import split_specs
    from tbptt_bench.core.build import make_task

    at = parse_update_list(args.bias_at)
    for n in at:
        if n > cfg.steps or not (n == 0 or n == cfg.steps or n % cfg.eval_every == 0):
            raise UsageError(f"--bias-at {n} is not an evaluation point; use 0, multiples of --eval-every "
                             f"{cfg.eval_every}, or --steps {cfg.steps}")
    specs = split_specs(args.bias_methods) if args.bias_methods else [cfg.method]
    return bias_snapshots(make_task(cfg.task, **cfg.task_params), specs, at, seq_len=cfg.seq_len,
                          batch_size=cfg.batch_size, **from_args(args, SNAPSHOT), seed=cfg.seed)
