"""The benchmark grid: registered tasks × registered method families, each at the task's tiny size.

A *cell* is one (task, method family) pair, run with the :data:`MODEL` model at the task's
``Task.tiny`` sizes (``seq_len``, ``batch_size``, ``hidden_size``). Its method is the family's
*representative spec* (:func:`representative_spec`): the first spec of that family in the ``quick``
suite (``tasks/quick.toml``), or, for a family the suite does not list, one built from the family's
schema. Parameters come from a fixed seed (:data:`SEED`); cost benchmarks use ``tbptt-bench perf``'s
workload (:func:`workload`), bias benchmarks ``tbptt-bench bias``'s batches, both seeded from it.

The grid is read from the registries and the suite when asv imports the benchmarks, so plugins count:
a task or method family registered through ``TBPTT_BENCH_PLUGINS`` appears in every benchmark's
``params`` without code changes. ``TBPTT_ASV_TASKS`` (task names, comma-separated) narrows the task axis: CI's
smoke run uses one task, so that every benchmark and method family still runs once at a fifth of the time.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch
import torch._dynamo  # noqa: F401  (the optimiser imports it lazily, ~3 s; asv's forkserver imports it once)
from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.core.mask import Update
from tbptt_bench.methods.base import METHODS, parse_method
from tbptt_bench.tasks import TASKS
from tbptt_bench.core.build import make_model, make_task, resolve_device, resolve_dtype
from tbptt_bench.tasks.base import Task

log = logging.getLogger(__name__)

#: The suite whose method specs represent their families.
SUITE = "quick"
#: The model of every cell. Models are not a grid axis: the engine treats every model alike, and
#: ``tbptt-bench perf`` compares models; a third axis would triple the CI smoke run.
MODEL = "lstm"
#: Torch threads of every cell: timings on shared CI machines compare, and bias figures are reproducible.
THREADS = 1
#: Seed of every cell's parameters, data and (for randomised methods) truncation draws.
SEED = 0
PARAM_NAMES = ["task", "method"]
#: Length at which a family without a suite spec is tried when deciding whether it is in the grid.
PROBE_LENGTH = 16
#: Environment variable that narrows the task axis (comma-separated task names; unset: every registered task).
TASKS_ENV = "TBPTT_ASV_TASKS"


@functools.lru_cache(maxsize=1)
def suite_specs() -> dict[str, str]:
    """The first method spec of each family in the :data:`SUITE` suite, in file order.

    Empty (with a warning) when this version of tbptt-bench has no suites module or no such suite:
    asv also benchmarks older commits.
    """
    try:
        from tbptt_bench.suites.suite import load_suite
    except ModuleNotFoundError as exc:
        if exc.name != "tbptt_bench.suites.suite":
            raise
        log.warning("tbptt_bench.suites.suite is missing; method specs come from the registry alone")
        return {}
    try:
        cells = load_suite(SUITE).cells
    except UsageError as exc:
        log.warning("suite %r unavailable (%s); method specs come from the registry alone", SUITE, exc)
        return {}
    out: dict[str, str] = {}
    for cell in cells:
        specs = [cell.params["method"]] if "method" in cell.params else list(cell.params.get("methods", ()))
        for method in map(parse_method, specs):
            out.setdefault(method.family, method.spec)
    return out


def truncation_length(seq_len: int) -> int:
    """K of a family without a suite spec: a quarter of the sequence, so that the method truncates."""
    return max(1, seq_len // 4)


def representative_spec(family: str, seq_len: int) -> str:
    """One spec that stands for ``family`` in a cell of length ``seq_len``.

    The suite's spec when it lists the family; otherwise every required integer parameter is K
    (:func:`truncation_length`) and the rest take their defaults. Canonical form (as ``Method.spec``).
    A family with a required parameter of another type and no suite spec has no representative:
    UsageError.
    """
    listed = suite_specs().get(family)
    if listed is not None:
        return listed
    k = truncation_length(seq_len)
    values = []
    for name, param in METHODS.get(family).schema.items():
        if not (param.required and param.default is None):
            continue
        if param.kind is not int:
            raise UsageError(f"method family {family!r} needs {name}= ({param.rule}); list it in the {SUITE} suite")
        values.append(f"{name}={k}")
    return parse_method(family + (":" + ",".join(values) if values else "")).spec


def families() -> list[str]:
    """Registered method families that have a representative spec (others are logged and left out)."""
    out = []
    for family in METHODS.names():
        cells = getattr(METHODS.get(family), "cells", None)  # a family defined for some models only
        if cells is not None and MODEL not in cells:
            log.warning("method family %r left out of the asv grid: not defined for %s", family, MODEL)
            continue
        try:
            representative_spec(family, PROBE_LENGTH)
        except UsageError as exc:
            log.warning("method family %r left out of the asv grid: %s", family, exc)
            continue
        out.append(family)
    return out


def tasks() -> list[str]:
    """Registered tasks, or those named in :data:`TASKS_ENV` (in registry order; an unknown name is a UsageError)."""
    names = TASKS.names()
    wanted = [t.strip() for t in os.environ.get(TASKS_ENV, "").split(",") if t.strip()]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise UsageError(f"{TASKS_ENV} names unknown task(s) {', '.join(unknown)}; registered: {', '.join(names)}")
    return [t for t in names if t in wanted] if wanted else names


@functools.lru_cache(maxsize=1)
def grid() -> list[list[str]]:
    """asv ``params``: [tasks, method families], read from the registries, the suite and :data:`TASKS_ENV` once."""
    return [tasks(), families()]


def tiny_size(task_name: str) -> tuple[int, int, int]:
    """(seq_len, batch_size, hidden_size) of the task's tiny configuration."""
    tiny = TASKS.get(task_name).tiny
    return int(tiny["seq_len"]), int(tiny["batch_size"]), int(tiny["hidden_size"])


def task_and_model(task_name: str, *, dtype: str = "float32", device: str = "cpu") -> tuple[Task, nn.Module]:
    """The task with default parameters and the :data:`MODEL` at its tiny hidden size, θ from :data:`SEED`.

    Sets torch to :data:`THREADS` threads for the process (asv runs each benchmark in its own process).
    """
    torch.set_num_threads(THREADS)
    task = make_task(task_name)
    return task, make_model(MODEL, task, tiny_size(task_name)[2], seed=SEED, dtype=dtype, device=device)


def workload(task_name: str, family: str, *, device: str = "cpu",
             sizes: tuple[int, int, int] | None = None) -> tuple[Any, list[Update]]:
    """``tbptt-bench perf``'s timed unit for the cell, and the updates of one sequence.

    ``sizes``: (seq_len, batch_size, hidden_size) instead of the task's tiny ones.

    A :class:`tbptt_bench.perf.harness.Workload` (model, Adam optimiser, engine, one batch) for the cell's
    configuration; ``Workload.sequence(updates)`` runs every update over the batch with an optimiser
    step after each, exactly what ``tbptt-bench perf`` times. ``prepare`` (a method's between-sequence
    work) has run. Raises NotImplementedError (asv: skipped) for a version without the perf module.
    """
    try:
        from tbptt_bench.perf.harness import Workload
    except ModuleNotFoundError as exc:
        if exc.name != "tbptt_bench.perf.harness":
            raise
        raise NotImplementedError("this version of tbptt-bench has no tbptt_bench.perf.harness") from None
    try:
        from tbptt_bench.perf.config import PerfConfig
    except ModuleNotFoundError:  # versions before the perf package was split
        from tbptt_bench.perf.harness import PerfConfig  # type: ignore[attr-defined, no-redef]
    seq_len, batch_size, hidden = sizes or tiny_size(task_name)
    cfg = PerfConfig(task=task_name, model=MODEL, method=representative_spec(family, seq_len), seq_len=seq_len,
                     batch_size=batch_size, hidden_size=hidden, device=device, threads=THREADS, seed=SEED)
    cfg.validate()
    torch.set_num_threads(THREADS)
    work = Workload(cfg, resolve_device(device), resolve_dtype(cfg.dtype))
    return work, work.prepare()
