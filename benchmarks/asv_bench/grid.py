"""The benchmark grid: registered tasks × registered method families, each at the task's tiny size.

A *cell* is one (task, method family) pair, run with the :data:`MODEL` model at the task's
``Task.tiny`` sizes (``seq_len``, ``batch_size``, ``hidden_size``). Its method is the family's
*representative spec* (:func:`representative_spec`): the first spec of that family in the ``quick``
suite (``tasks/quick.toml``), or, for a family the suite does not list, one built from the family's
schema. Parameters and data come from fixed seeds, so every benchmark of a cell sees the same θ and
the same batch.

The grid is read from the registries and the suite when asv imports the benchmarks, so plugins count:
a task or method family registered through ``TBPTT_BENCH_PLUGINS`` appears in every benchmark's
``params`` without code changes.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch._dynamo  # noqa: F401  (the optimiser imports it lazily, ~3 s; asv's forkserver imports it once)
from torch import nn

from tbptt_bench.engine import Engine
from tbptt_bench.errors import UsageError
from tbptt_bench.mask import Update
from tbptt_bench.methods import METHODS, Method, parse_method
from tbptt_bench.registry import TASKS
from tbptt_bench.setup import derive_seed, generator, make_model, make_task
from tbptt_bench.tasks.base import Batch, Task
from tbptt_bench.training import TrainConfig

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


@functools.lru_cache(maxsize=1)
def suite_specs() -> dict[str, str]:
    """The first method spec of each family in the :data:`SUITE` suite, in file order.

    Empty (with a warning) when this version of tbptt-bench has no suites module or no such suite:
    asv also benchmarks older commits.
    """
    try:
        from tbptt_bench.suites import load_suite
    except ModuleNotFoundError as exc:
        if exc.name != "tbptt_bench.suites":
            raise
        log.warning("tbptt_bench.suites is missing; method specs come from the registry alone")
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
        try:
            representative_spec(family, PROBE_LENGTH)
        except UsageError as exc:
            log.warning("method family %r left out of the asv grid: %s", family, exc)
            continue
        out.append(family)
    return out


@functools.lru_cache(maxsize=1)
def grid() -> list[list[str]]:
    """asv ``params``: [tasks, method families], read from the registries and the suite once."""
    return [TASKS.names(), families()]


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


@dataclass
class Cell:
    """A built cell: task, model at the fixed seed, one batch, the method and its updates."""

    task: Task
    model: nn.Module
    batch: Batch
    method: Method
    updates: list[Update]

    def trainer(self) -> "SequenceTrainer":
        """One sequence of this cell's updates, each followed by an optimiser step."""
        return SequenceTrainer(self)


def build(task_name: str, family: str, *, dtype: str = "float32", device: str = "cpu") -> Cell:
    """Build a cell: :func:`task_and_model`, one batch drawn with ``derive_seed("data", SEED)``, the updates."""
    seq_len, batch_size, _ = tiny_size(task_name)
    task, model = task_and_model(task_name, dtype=dtype, device=device)
    batch = task.sample(batch_size, seq_len, generator(derive_seed("data", SEED)))
    method = parse_method(representative_spec(family, seq_len))
    observe = getattr(method, "observe", None)  # adaptive methods estimate K at θ before a sequence
    if observe is not None:
        observe(0, model, batch, model.initial_state(batch_size), task.loss_kind)  # type: ignore[operator]
    updates = method.updates(seq_len, 0, np.random.default_rng(derive_seed("method", SEED)))
    return Cell(task, model, batch, method, updates)


class SequenceTrainer:
    """Runs one sequence's updates through the engine with the training loop's optimiser step.

    The optimiser, learning rate and gradient clipping are :class:`TrainConfig`'s defaults, so a timed
    sequence does what ``tbptt-bench train`` does per sequence, without evaluation or logging.
    """

    def __init__(self, cell: Cell) -> None:
        defaults = TrainConfig()
        first = next(cell.model.parameters())
        self.cell = cell
        self.engine = Engine(cell.model, cell.task.loss_kind, device=first.device, dtype=first.dtype,
                             checkpoint=cell.method.checkpoint, non_blocking=first.device.type == "cuda")
        self.params = [p for p in cell.model.parameters() if p.requires_grad]
        self.clip = defaults.clip
        optimizer = torch.optim.Adam if defaults.optimizer == "adam" else torch.optim.SGD
        self.optimizer = optimizer(self.params, lr=defaults.lr)

    def _step(self, index: int, update: Update, loss: torch.Tensor) -> None:
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self) -> None:
        """One ``Engine.run`` over the cell's batch from the initial state."""
        state = self.cell.model.initial_state(self.cell.batch.batch_size)  # type: ignore[operator]
        self.engine.run(self.cell.batch, self.cell.updates, state, self._step)
