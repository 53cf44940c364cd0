"""Arguments shared by several sub-commands, and turning them into a task and a model."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
import json
import sys
from typing import Any, Callable, Iterator

from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.tasks.base import Task
from tbptt_bench.training.run import parse_kwargs
from tbptt_bench.validation import check_run_size, integer, writable_file


def add_run_args(p: argparse.ArgumentParser, *, seq_len: int = 64, batch: int = 16, hidden: int = 32) -> None:
    """--task --task-param --model --hidden --layers --seq-len --batch --seed --dtype --device --path."""
    p.add_argument("--task", default="copy", help="task name (see `tbptt-bench tasks`)")
    p.add_argument("--task-param", action="append", default=[], metavar="KEY=VALUE",
                   help="task constructor parameter, repeatable (e.g. --task-param corpus=text --task-param path=f.txt)")
    p.add_argument("--model", default="lstm", help="model name (see `tbptt-bench tasks`)")
    p.add_argument("--model-param", action="append", default=[], metavar="KEY=VALUE",
                   help="model factory parameter, repeatable (e.g. --model-param memory=32 for xl)")
    p.add_argument("--hidden", type=int, default=hidden, help="hidden size")
    p.add_argument("--layers", type=int, default=1, help="number of recurrent layers")
    p.add_argument("--seq-len", type=int, default=seq_len, help="sequence (or stream segment) length T")
    p.add_argument("--batch", type=int, default=batch, help="batch size B")
    p.add_argument("--seed", type=int, default=0, help="seed for parameters and data")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--path", default="fused", choices=["fused", "cell"], help="execution path of built-in models")


def parse_task_params(items: list[str], option: str = "--task-param") -> dict[str, Any]:
    """``KEY=VALUE`` items as a dict; numbers become int or float (non-finite ones are refused by the task)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"malformed {option} {item!r}; expected KEY=VALUE")
        out[key] = _coerce(value)
    return out


def _coerce(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


ITEMSIZE = {"float32": 4, "float64": 8}
MAX_SEED = 2**63 - 1


def check_sizes(args: argparse.Namespace) -> None:
    """Sizes are integers ≥ 1 whose tensors fit in memory, and the seed is in range (docs/reliability.md)."""
    for name in ("hidden", "layers", "seq_len", "batch"):
        integer(f"--{name.replace('_', '-')}", getattr(args, name), lo=1)
    integer("--seed", args.seed, lo=0, hi=MAX_SEED)
    check_run_size(args.batch, args.seq_len, args.hidden, args.layers, ITEMSIZE.get(args.dtype, 8))


#: The largest count (steps, batches, resamples, repeats...) any flag accepts: a documented cap, so that
#: a count typed by mistake (10**20) is an error instead of a run that never ends (docs/reliability.md).
MAX_COUNT = 2**31 - 1


def check_counts(args: argparse.Namespace, lows: dict[str, int]) -> None:
    """Each named attribute (None allowed) is an integer between its low bound and :data:`MAX_COUNT`."""
    for attr, low in lows.items():
        value = getattr(args, attr)
        if value is not None:
            integer(f"--{attr.replace('_', '-')}", value, lo=low, hi=MAX_COUNT)


def check_output(path: str | None, name: str) -> None:
    """A file that the command will write: its folder must exist and be writable (checked before any work)."""
    if path is not None:
        writable_file(path, name)


def build(args: argparse.Namespace) -> tuple[Task, nn.Module]:
    """The task and the model that the shared arguments describe."""
    check_sizes(args)
    task = make_task(args.task, **parse_task_params(args.task_param))
    model = make_model(args.model, task, args.hidden, args.layers, seed=args.seed, dtype=args.dtype,
                       device=args.device, path=args.path,
                       model_params=parse_task_params(getattr(args, "model_param", []), "--model-param"))
    return task, model


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")


def add_optimizer_args(p: argparse.ArgumentParser, *, clip: float | None, allow_none: bool = False) -> None:
    """--optimizer --optimizer-args --lr --lr-schedule --lr-schedule-args --clip-norm (docs/design.md §2.3)."""
    extra = ", or none (θ fixed: the cost of gradient estimates)" if allow_none else ""
    p.add_argument("--optimizer", default="adam",
                   help=f"any torch.optim optimiser by name, any case (adam, sgd, adamw, rmsprop, …){extra}")
    p.add_argument("--optimizer-args", default="", metavar="JSON|K=V,...",
                   help='its keyword arguments besides lr, e.g. momentum=0.9,nesterov=true or {"betas": [0.9, 0.99]}')
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--lr-schedule", default=None, metavar="NAME",
                   help="a torch.optim.lr_scheduler scheduler by name, stepped after every update (e.g. StepLR)")
    p.add_argument("--lr-schedule-args", default="", metavar="JSON|K=V,...",
                   help="its keyword arguments, e.g. step_size=100,gamma=0.5")
    p.add_argument("--clip-norm", "--clip", dest="clip_norm", type=float, default=clip,
                   help=f"clip gradients to this global norm before each step (0 disables; default {clip or 0})")


def optimizer_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run-configuration fields that :func:`add_optimizer_args` describes."""
    return {
        "optimizer": args.optimizer, "lr": args.lr,
        "optimizer_args": parse_kwargs(args.optimizer_args, "--optimizer-args") or None,
        "lr_schedule": args.lr_schedule,
        "lr_schedule_args": parse_kwargs(args.lr_schedule_args, "--lr-schedule-args") or None,
        "clip": args.clip_norm or None,
    }


@contextmanager
def progress_bar(label: str, total: int, *, quiet: bool = False) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr while ``label`` runs, shown only when stderr is a terminal (logs stay
    clean); yields ``update(done, total)``."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    show = not quiet and console.is_terminal
    with Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console, disable=not show, transient=True) as bar:
        job = bar.add_task(label, total=total)
        yield lambda done, of: bar.update(job, completed=done, total=of)
