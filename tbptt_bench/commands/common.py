"""Arguments shared by several sub-commands, and turning them into a task and a model."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
import json
import sys
from typing import Any, Callable, Collection, Iterator, Mapping

from torch import nn

from tbptt_bench.core.build import make_model, make_task
from tbptt_bench.tasks.base import Task
from tbptt_bench.options import MAX_COUNT, Option, declared
from tbptt_bench.training.run import MAX_SEED, RunConfig  # noqa: F401 (MAX_SEED: the report's --seed)
from tbptt_bench.validation import check_run_size, integer, writable_file

#: The run fields that build a task and a model, as commands take them.
RUN_BUILD = ("task", "task_params", "model", "model_params", "hidden_size", "num_layers", "seq_len", "batch_size",
             "seed", "dtype", "device", "path")


def run_options(*, only: Collection[str] = RUN_BUILD, **defaults: Any) -> dict[str, Option]:
    """The declarations (:class:`~tbptt_bench.training.run.RunConfig`'s) of the run fields ``only``, with
    this command's ``defaults``: what :func:`add_arguments` turns into flags."""
    return declared(RunConfig, only=only, defaults=defaults)


ITEMSIZE = {"float32": 4, "float64": 8}


def check_sizes(values: Mapping[str, Any]) -> None:
    """The tensors of a run of these sizes (field values) fit in memory (docs/reliability.md)."""
    check_run_size(values["batch_size"], values["seq_len"], values["hidden_size"], values.get("num_layers", 1),
                   ITEMSIZE.get(values.get("dtype", "float64"), 8))


def check_counts(args: argparse.Namespace, lows: dict[str, int]) -> None:
    """Each named attribute (None allowed) is an integer between its low bound and :data:`MAX_COUNT`
    (for flags that belong to no declared option)."""
    for attr, low in lows.items():
        value = getattr(args, attr)
        if value is not None:
            integer(f"--{attr.replace('_', '-')}", value, lo=low, hi=MAX_COUNT)


def check_output(path: str | None, name: str) -> None:
    """A file that the command will write: its folder must exist and be writable (checked before any work)."""
    if path is not None:
        writable_file(path, name)


def build(values: Mapping[str, Any]) -> tuple[Task, nn.Module]:
    """The task and the model that run field values (``task``, ``model``, sizes, seed, dtype...) describe."""
    check_sizes(values)
    task = make_task(values["task"], **values["task_params"])
    model = make_model(values["model"], task, values["hidden_size"], values["num_layers"], seed=values["seed"],
                       dtype=values["dtype"], device=values["device"], path=values["path"],
                       model_params=values["model_params"])
    return task, model


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=float)
    sys.stdout.write("\n")


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
