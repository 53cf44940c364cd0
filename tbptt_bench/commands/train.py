"""``tbptt-bench train``: train a model on a task with a method; print and save the learning curve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from tbptt_bench.commands.common import add_run_args, check_sizes, emit_json, parse_task_params
from tbptt_bench.errors import UsageError
from tbptt_bench.training import Diverged, TrainConfig, train

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train with a method and record the learning curve")
    add_run_args(p)
    p.add_argument("--method", default="chunked:k=16", help="method spec")
    p.add_argument("--steps", type=int, default=200, help="number of optimiser updates")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (0 disables)")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N updates")
    p.add_argument("--eval-batches", type=int, default=4, help="held-out batches per evaluation")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--save", metavar="FILE.json", help="write the learning curve and config as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    check_sizes(args)
    return TrainConfig(
        task=args.task, model=args.model, method=args.method, steps=args.steps, seq_len=args.seq_len,
        batch_size=args.batch, hidden_size=args.hidden, num_layers=args.layers, optimizer=args.optimizer,
        lr=args.lr, clip=args.clip or None, eval_every=args.eval_every, eval_batches=args.eval_batches,
        seed=args.seed, device=args.device, dtype=args.dtype, path=args.path,
        task_params=parse_task_params(args.task_param),
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    cfg.validate()
    if args.save and not Path(args.save).parent.exists():
        raise UsageError(f"cannot write {args.save}: folder {Path(args.save).parent} does not exist")
    show = not (args.quiet or args.json)
    with Progress(TextColumn("[bold]train[/] {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), disable=not show, transient=True) as bar:
        job = bar.add_task(f"{cfg.task}/{cfg.model} {cfg.method}", total=cfg.steps)
        try:
            result = train(cfg, progress=lambda done, total: bar.update(job, completed=done))
        except Diverged as exc:
            raise UsageError(f"training diverged: {exc}; try a smaller --lr or --clip") from None
    out = result.as_dict()
    if args.save:
        write_json_atomic(Path(args.save), out)
    if args.json:
        emit_json(out)
    else:
        print(f"{'update':>7} {'train loss':>11} {'eval loss':>10} {result.metric_name:>10} {'seconds':>8}")
        for row in result.curve:
            tl = "-" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
            print(f"{row['update']:>7} {tl:>11} {row['eval_loss']:>10.4f} {row['eval_metric']:>10.4f} {row['wall_time']:>8.2f}")
        print(f"trivial baseline {result.metric_name}: {result.baseline:.4f}")
    return 0


def write_json_atomic(path: Path, obj: object) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, default=float)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
